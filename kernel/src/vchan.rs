//! A vchan client (`xen_shim::vchan` for the layout and arithmetic) and
//! QubesDB over it: how a Qubes VM gets its configuration from dom0.
//!
//! Connecting: read the server's `ring-ref` and `event-channel` from
//! XenStore, map the server's shared page at a frame of the foreign window
//! above our RAM (`phys::alloc_foreign`, `GNTTABOP_map_grant_ref`),
//! check its ring orders, map the rings that have pages of their own the
//! same way (contiguously, left ring first — dom0's QubesDB asks for
//! 4096-byte rings, one page each), bind the event channel, and set
//! `cli_live` to connected. Bytes go out
//! on the left ring and come in on the right one; every index the server
//! wrote is checked before it is used, and the server is notified after
//! every batch.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{fence, AtomicU16, AtomicU32, AtomicU8, Ordering};

use xen_shim::qubesdb::{self, Client, Decoder, Event};
use xen_shim::vchan::{self as v, Geometry, Live, Place};

use crate::xenstore::XenStore;
use crate::{clock, phys, xen};

pub struct Vchan {
    /// Guest-physical (and, identity-mapped, virtual) address of the
    /// server's shared page, mapped over a page we gave back.
    page: u64,
    port: u32,
    /// Each ring's address and size.
    left: (u64, u32),
    right: (u64, u32),
}

/// Maps grants `grefs` of domain `server` at as many contiguous frames of
/// the foreign window; their address.
fn map_pages(server: u16, grefs: &[u32]) -> Result<u64, String> {
    let base = phys::alloc_foreign(grefs.len() as u64);
    for (i, gref) in grefs.iter().enumerate() {
        let gpfn = (base >> 12) + i as u64;
        if let Err(e) = xen::map_grant(server, *gref, gpfn) {
            return Err(format!(
                "mapping grant {gref} of domain {server}: status {e}"
            ));
        }
    }
    Ok(base)
}

fn read_num(store: &mut XenStore, path: &str) -> Result<u32, String> {
    let text = store.read(path).map_err(|e| format!("{path}: {e:?}"))?;
    text.trim()
        .parse()
        .map_err(|_| format!("{path}: '{text}' is not a number"))
}

impl Vchan {
    fn u32_at(&self, off: usize) -> &AtomicU32 {
        // SAFETY: `off` is one of the 4-aligned index fields at the start of
        // the shared page, which stays mapped for the connection's life;
        // the server changes them concurrently, hence atomics.
        unsafe { AtomicU32::from_ptr((self.page as usize + off) as *mut u32) }
    }

    fn u8_at(&self, off: usize) -> &AtomicU8 {
        // SAFETY: as `u32_at`, for the live and notify bytes.
        unsafe { AtomicU8::from_ptr((self.page as usize + off) as *mut u8) }
    }

    /// Connects to the server in domain `server` that published itself at
    /// `path`.
    pub fn connect(store: &mut XenStore, server: u16, path: &str) -> Result<Self, String> {
        let gref = read_num(store, &format!("{path}/ring-ref"))?;
        let event = read_num(store, &format!("{path}/event-channel"))?;
        let page = map_pages(server, &[gref])?;
        let order = |off: usize| {
            // SAFETY: the 2-aligned order fields of the mapped page.
            unsafe { AtomicU16::from_ptr((page as usize + off) as *mut u16) }
                .load(Ordering::Acquire)
        };
        let g = Geometry::new(order(v::LEFT_ORDER), order(v::RIGHT_ORDER))
            .map_err(|e| format!("shared page: {e:?}"))?;
        // The grant list: left ring's pages, then the right ring's (the
        // geometry checked that it ends inside the page).
        let gref_at = |i: usize| {
            // SAFETY: a 4-aligned word of the grant list inside the mapped
            // page (`Geometry::new` bounds the list).
            unsafe { AtomicU32::from_ptr((page as usize + v::GRANTS + 4 * i) as *mut u32) }
                .load(Ordering::Acquire)
        };
        let ring = |(place, size): (Place, u32), left: bool| match place {
            Place::InPage(off) => Ok((page + off as u64, size)),
            Place::Pages(_) => {
                let grefs: Vec<u32> = g.grants(left).map(gref_at).collect();
                map_pages(server, &grefs).map(|base| (base, size))
            }
        };
        let (left, right) = (ring(g.left, true)?, ring(g.right, false)?);
        let port = xen::bind_interdomain(server, event).ok_or(format!(
            "binding event channel {event} of domain {server} failed"
        ))?;
        let vc = Self {
            page,
            port,
            left,
            right,
        };
        vc.u8_at(v::CLI_LIVE).store(1, Ordering::Release);
        fence(Ordering::SeqCst);
        xen::notify(port);
        Ok(vc)
    }

    /// Our event channel.
    pub fn port(&self) -> u32 {
        self.port
    }

    /// The server's state.
    pub fn server(&self) -> Result<Live, v::VchanError> {
        Live::parse(self.u8_at(v::SRV_LIVE).load(Ordering::Acquire))
    }

    /// Writes as much of `data` as the left ring has room for; the bytes
    /// written.
    pub fn send(&mut self, data: &[u8]) -> Result<usize, v::VchanError> {
        let (base, size) = self.left;
        let prod = self.u32_at(v::LEFT_PROD).load(Ordering::Relaxed);
        // Acquire: the server has finished reading what it released.
        let cons = self.u32_at(v::LEFT_CONS).load(Ordering::Acquire);
        let n = v::writable(prod, cons, size)?.min(data.len() as u32);
        if n == 0 {
            return Ok(0); // full: nothing to publish, no event to send
        }
        let mut from = 0;
        for (at, len) in v::pieces(prod, n, size) {
            for (i, b) in data[from..from + len].iter().enumerate() {
                // SAFETY: `at + i` lies inside the left ring (`pieces`),
                // whose `size` bytes at `base` are mapped from the server;
                // it reads them only after the producer index covers them.
                unsafe { ((base as usize + at + i) as *mut u8).write_volatile(*b) };
            }
            from += len;
        }
        // Release: the bytes before the index that publishes them; a full
        // fence before the notification.
        self.u32_at(v::LEFT_PROD)
            .store(prod.wrapping_add(n), Ordering::Release);
        fence(Ordering::SeqCst);
        xen::notify(self.port);
        Ok(n as usize)
    }

    /// Appends what has arrived on the right ring to `out`; the byte count.
    pub fn recv(&mut self, out: &mut Vec<u8>) -> Result<usize, v::VchanError> {
        let (base, size) = self.right;
        // Acquire: the bytes are read after the index that covers them.
        let prod = self.u32_at(v::RIGHT_PROD).load(Ordering::Acquire);
        let cons = self.u32_at(v::RIGHT_CONS).load(Ordering::Relaxed);
        let n = v::readable(prod, cons, size)?;
        for (at, len) in v::pieces(cons, n, size) {
            for i in 0..len {
                // SAFETY: inside the right ring's mapped `size` bytes,
                // below the server's producer index.
                out.push(unsafe { ((base as usize + at + i) as *const u8).read_volatile() });
            }
        }
        if n > 0 {
            // Release: our reads are done before the server may reuse them.
            self.u32_at(v::RIGHT_CONS)
                .store(cons.wrapping_add(n), Ordering::Release);
            fence(Ordering::SeqCst);
            xen::notify(self.port);
        }
        Ok(n as usize)
    }

    /// Sends all of `data`, waiting for room until `deadline_ms`.
    fn send_all(&mut self, mut data: &[u8], deadline_ms: u64) -> Result<(), String> {
        while !data.is_empty() {
            let n = self.send(data).map_err(|e| format!("{e:?}"))?;
            data = &data[n..];
            if clock::now_ms() > deadline_ms {
                return Err("no room in the ring".into());
            }
            if n == 0 {
                core::hint::spin_loop();
            }
        }
        Ok(())
    }
}

/// QubesDB over vchan: the connection, the conversation and the decoder.
pub struct QubesDbLink {
    pub vchan: Vchan,
    pub client: Client,
    decoder: Decoder,
    /// Events that arrived with the end of the load, not yet taken.
    early: Vec<Event>,
}

impl QubesDbLink {
    /// Follows what dom0 pushed since the last call (every housekeeping
    /// round of the loop): each change acknowledged, and a client's rules
    /// replaced in `firewall` when dom0 completes their update (the empty
    /// write to `/qubes-firewall/<ip>`). False once the link failed (it is
    /// then dropped; the rules in force stay).
    pub fn follow(&mut self, firewall: &mut netstack::firewall::Firewall) -> bool {
        let events = match self.poll() {
            Ok(e) => e,
            Err(e) => {
                println!("qubesdb: {e}; live updates stop here");
                return false;
            }
        };
        for e in events {
            let Event::Written(path) = e else { continue };
            let value = self.client.get(&path).unwrap_or("x");
            let Some(ip) = qubesdb::rules_committed(&path, value) else {
                continue;
            };
            let Ok(addr) = ip.parse::<core::net::IpAddr>() else {
                println!("qubesdb: {path}: not an address");
                continue;
            };
            let prefix = format!("{path}/");
            let entries = self
                .client
                .entries()
                .filter_map(|(k, v)| k.strip_prefix(prefix.as_str()).map(|name| (name, v)));
            let rules = netstack::rules::Ruleset::from_entries(entries, addr.is_ipv4());
            let summary = match &rules {
                Ok(r) => format!("{} rules, policy {:?}", r.rules.len(), r.policy),
                Err(e) => format!("invalid ({e}): all its traffic dropped"),
            };
            match firewall.replace_rules(addr, rules) {
                Some(n) => {
                    println!("qubesdb: rules of {ip} replaced: {summary}; {n} flows dropped")
                }
                None => println!("qubesdb: rules for {ip}, which is not a client, ignored"),
            }
        }
        true
    }
}

/// How long dom0 may take to send the whole database.
const LOAD_TIMEOUT_MS: u64 = 10_000;

impl QubesDbLink {
    /// Connects to dom0's QubesDB for this domain and loads every entry.
    /// `None` when dom0 publishes no QubesDB vchan for us (not Qubes).
    pub fn load(store: &mut XenStore, domid: &str) -> Option<Result<Self, String>> {
        let path = format!("/local/domain/0/data/vchan/{domid}/{}", qubesdb::VCHAN_PORT);
        store.read(&format!("{path}/ring-ref")).ok()?;
        Some(Self::connect(store, &path))
    }

    fn connect(store: &mut XenStore, path: &str) -> Result<Self, String> {
        let vchan = Vchan::connect(store, 0, path)?;
        let mut link = Self {
            vchan,
            client: Client::new(),
            decoder: Decoder::new(),
            early: Vec::new(),
        };
        let deadline = clock::now_ms() + LOAD_TIMEOUT_MS;
        link.vchan.send_all(&Client::start(), deadline)?;
        while !link.client.loaded() {
            let events = link.poll()?;
            link.early = events.into_iter().filter(|e| *e != Event::Loaded).collect();
            if let Ok(Live::Exited) = link.vchan.server() {
                return Err("dom0's end closed the connection".into());
            }
            if clock::now_ms() > deadline {
                return Err(format!(
                    "no complete database after {} s",
                    LOAD_TIMEOUT_MS / 1000
                ));
            }
        }
        Ok(link)
    }

    /// Handles what dom0 sent: the events, each acknowledged as dom0
    /// expects. An error leaves the connection unusable.
    pub fn poll(&mut self) -> Result<Vec<Event>, String> {
        let mut events = core::mem::take(&mut self.early);
        let mut bytes = Vec::new();
        self.vchan.recv(&mut bytes).map_err(|e| format!("{e:?}"))?;
        self.decoder.push(&bytes);
        while let Some(m) = self.decoder.next_message() {
            let m = m.map_err(|e| format!("from dom0: {e:?}"))?;
            let (event, answer) = self.client.handle(m);
            if let Some(a) = answer {
                self.vchan.send_all(&a, clock::now_ms() + 1000)?;
            }
            events.extend(event);
        }
        Ok(events)
    }
}
