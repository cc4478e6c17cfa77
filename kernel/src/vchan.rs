//! vchan (`xen_shim::vchan` for the layout and arithmetic), both ends,
//! and QubesDB over it: how a Qubes VM gets its configuration from dom0.
//!
//! Serving (qrexec's control connection, `Vchan::serve`): three pages of
//! our own — the shared page and one page per ring — granted to the
//! client, an unbound event channel for it, both published in our
//! XenStore area; the server writes the right ring and reads the left.
//!
//! Connecting as the client: read the server's `ring-ref` and `event-channel` from
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

use crate::gnttab::{self, GrantTable};
use crate::xenstore::{SharedStore, XenStore};
use crate::{clock, phys, xen};
use alloc::string::ToString;
use xen_shim::grant::GrantRef;

pub struct Vchan {
    /// Guest-physical (and, identity-mapped, virtual) address of the
    /// shared page: the server's, mapped at a frame of the foreign window
    /// (client), or our own page (server).
    page: u64,
    port: u32,
    /// Which end we are: the server writes the right ring and reads the
    /// left one, the client the other way round.
    server: bool,
    /// Each ring's address and size.
    left: (u64, u32),
    right: (u64, u32),
    /// The client's mappings of the server's pages: each run of the
    /// foreign window and its grants' handles (unmapped and given back by
    /// `close`).
    mapped: Vec<(u64, Vec<u32>)>,
}

/// Ring pages a client maps at most, per ring: what qrexec's data
/// connections ask (64 KiB); a server asking more is refused rather than
/// let it fill the foreign window.
const MAX_RING_PAGES: usize = 16;

/// Maps grants `grefs` of domain `server` at as many contiguous frames of
/// the foreign window; their address. The run and its handles are added to
/// `mapped` (for `unmap_pages`).
fn map_pages(server: u16, grefs: &[u32], mapped: &mut Vec<(u64, Vec<u32>)>) -> Result<u64, String> {
    let pages = grefs.len() as u64;
    let base = phys::try_alloc_foreign(pages)
        .ok_or_else(|| format!("no room for {pages} more foreign frames"))?;
    match xen::map_grants(server, grefs, base >> 12) {
        Ok(handles) => {
            mapped.push((base, handles));
            Ok(base)
        }
        Err(e) => {
            phys::free_foreign(base, pages);
            Err(e)
        }
    }
}

/// Unmaps what `map_pages` mapped and gives the window's runs back (a run
/// with a mapping that would not go is kept out of use).
fn unmap_pages(mapped: &mut Vec<(u64, Vec<u32>)>) {
    for (base, handles) in mapped.drain(..) {
        if xen::unmap_grants(base >> 12, &handles) == 0 {
            phys::free_foreign(base, handles.len() as u64);
        }
    }
}

fn read_num(store: &mut XenStore, path: &str) -> Result<u32, String> {
    let text = store.read(path).map_err(|e| format!("{path}: {e:?}"))?;
    text.trim()
        .parse()
        .map_err(|_| format!("{path}: '{text}' is not a number"))
}

/// Pages of our own that we serve a vchan from (`Vchan::serve`): the
/// shared page and one page per ring, granted to the client.
pub struct ServerPages {
    base: u64,
    grants: Vec<GrantRef>,
}

/// Ring order of a served vchan: one page per ring (what qrexec's agent
/// asks for its control connection: 4096 bytes each way).
const SERVE_ORDER: u16 = 12;

impl ServerPages {
    /// Three zeroed pages, not yet granted.
    pub fn new() -> Self {
        let (base, _) = phys::alloc_dma(3 * 4096);
        Self {
            base,
            grants: Vec::new(),
        }
    }

    /// Ends the client's access to the pages; false (and the pages must
    /// not be reused) while the client still maps one.
    pub fn end(&mut self, table: &mut GrantTable) -> bool {
        self.grants.retain(|g| !table.end(*g));
        self.grants.is_empty()
    }
}

impl Vchan {
    fn u32_at(&self, off: usize) -> &AtomicU32 {
        // SAFETY: `off` is one of the 4-aligned index fields at the start of
        // the shared page, which stays mapped for the connection's life;
        // the other end changes them concurrently, hence atomics.
        unsafe { AtomicU32::from_ptr((self.page as usize + off) as *mut u32) }
    }

    fn u8_at(&self, off: usize) -> &AtomicU8 {
        // SAFETY: as `u32_at`, for the live and notify bytes.
        unsafe { AtomicU8::from_ptr((self.page as usize + off) as *mut u8) }
    }

    /// Connects to the server in domain `server` that published itself at
    /// `path`.
    pub fn connect(store: &mut XenStore, server: u16, path: &str) -> Result<Self, String> {
        let mut mapped = Vec::new();
        let r = Self::connect_mapping(store, server, path, &mut mapped);
        if r.is_err() {
            unmap_pages(&mut mapped);
        }
        r
    }

    fn connect_mapping(
        store: &mut XenStore,
        server: u16,
        path: &str,
        mapped: &mut Vec<(u64, Vec<u32>)>,
    ) -> Result<Self, String> {
        let gref = read_num(store, &format!("{path}/ring-ref"))?;
        let event = read_num(store, &format!("{path}/event-channel"))?;
        let page = map_pages(server, &[gref], mapped)?;
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
        let mut ring = |(place, size): (Place, u32), left: bool| match place {
            Place::InPage(off) => Ok((page + off as u64, size)),
            Place::Pages(n) if n > MAX_RING_PAGES => {
                Err(format!("a ring of {n} pages (at most {MAX_RING_PAGES})"))
            }
            Place::Pages(_) => {
                let grefs: Vec<u32> = g.grants(left).map(gref_at).collect();
                map_pages(server, &grefs, mapped).map(|base| (base, size))
            }
        };
        let (left, right) = (ring(g.left, true)?, ring(g.right, false)?);
        let port = xen::bind_interdomain(server, event).ok_or(format!(
            "binding event channel {event} of domain {server} failed"
        ))?;
        let vc = Self {
            page,
            port,
            server: false,
            left,
            right,
            mapped: core::mem::take(mapped),
        };
        vc.u8_at(v::CLI_LIVE).store(1, Ordering::Release);
        fence(Ordering::SeqCst);
        xen::notify(port);
        Ok(vc)
    }

    /// Serves a vchan to domain `client` from `pages`: rings of one page
    /// each, the pages granted to it, an unbound event channel for it, and
    /// both published at our XenStore path `path` (`ring-ref`,
    /// `event-channel`), where a libxenvchan client looks.
    pub fn serve(
        store: &mut XenStore,
        table: &mut GrantTable,
        pages: &mut ServerPages,
        client: u16,
        path: &str,
    ) -> Result<Self, String> {
        let page = pages.base;
        let (left, right) = (page + 4096, page + 8192);
        // SAFETY: the three pages are ours (`ServerPages::new`) and not
        // granted yet (a new grant is made below), so nothing else writes
        // them now; zeroed for a clean start after an earlier client.
        unsafe { core::ptr::write_bytes(page as *mut u8, 0, 3 * 4096) };
        let mut grant = |frame: u64| {
            let g = table
                .grant(client, frame >> 12, false)
                .ok_or("no grant reference free")?;
            pages.grants.push(g);
            Ok::<u32, &str>(g.0)
        };
        let shared = grant(page)?;
        let grefs = [grant(left)?, grant(right)?];
        let order = |off: usize| {
            // SAFETY: the 2-aligned order fields of our shared page.
            unsafe { AtomicU16::from_ptr((page as usize + off) as *mut u16) }
        };
        order(v::LEFT_ORDER).store(SERVE_ORDER, Ordering::Relaxed);
        order(v::RIGHT_ORDER).store(SERVE_ORDER, Ordering::Relaxed);
        for (i, g) in grefs.iter().enumerate() {
            // SAFETY: a 4-aligned word of the grant list, inside our page.
            unsafe { AtomicU32::from_ptr((page as usize + v::GRANTS + 4 * i) as *mut u32) }
                .store(*g, Ordering::Relaxed);
        }
        let port = gnttab::alloc_unbound(client).ok_or("EVTCHNOP_alloc_unbound failed")?;
        let vc = Self {
            page,
            port,
            server: true,
            left: (left, 1 << SERVE_ORDER),
            right: (right, 1 << SERVE_ORDER),
            mapped: Vec::new(),
        };
        // Release: the page is complete before it says we are live, and
        // before the client can find it in XenStore.
        vc.u8_at(v::CLI_LIVE).store(2, Ordering::Release);
        vc.u8_at(v::SRV_LIVE).store(1, Ordering::Release);
        fence(Ordering::SeqCst);
        store
            .write(&format!("{path}/ring-ref"), &shared.to_string())
            .and_then(|_| store.write(&format!("{path}/event-channel"), &port.to_string()))
            .map_err(|e| format!("publishing {path}: {e:?}"))?;
        Ok(vc)
    }

    /// Our event channel.
    pub fn port(&self) -> u32 {
        self.port
    }

    /// The other end's state.
    pub fn peer(&self) -> Result<Live, v::VchanError> {
        let at = if self.server {
            v::CLI_LIVE
        } else {
            v::SRV_LIVE
        };
        Live::parse(self.u8_at(at).load(Ordering::Acquire))
    }

    /// The ring we write (address, size) and its producer and consumer
    /// index offsets; then the one we read.
    fn rings(&self) -> [((u64, u32), usize, usize); 2] {
        let left = (self.left, v::LEFT_PROD, v::LEFT_CONS);
        let right = (self.right, v::RIGHT_PROD, v::RIGHT_CONS);
        if self.server {
            [right, left]
        } else {
            [left, right]
        }
    }

    /// Writes as much of `data` as our outgoing ring has room for; the
    /// bytes written.
    pub fn send(&mut self, data: &[u8]) -> Result<usize, v::VchanError> {
        let [((base, size), prod_at, cons_at), _] = self.rings();
        let prod = self.u32_at(prod_at).load(Ordering::Relaxed);
        // Acquire: the other end has finished reading what it released.
        let cons = self.u32_at(cons_at).load(Ordering::Acquire);
        let n = v::writable(prod, cons, size)?.min(data.len() as u32);
        if n == 0 {
            return Ok(0); // full: nothing to publish, no event to send
        }
        let mut from = 0;
        for (at, len) in v::pieces(prod, n, size) {
            for (i, b) in data[from..from + len].iter().enumerate() {
                // SAFETY: `at + i` lies inside our outgoing ring (`pieces`),
                // whose `size` bytes at `base` are mapped; the other end
                // reads them only after the producer index covers them.
                unsafe { ((base as usize + at + i) as *mut u8).write_volatile(*b) };
            }
            from += len;
        }
        // Release: the bytes before the index that publishes them; a full
        // fence before the notification.
        self.u32_at(prod_at)
            .store(prod.wrapping_add(n), Ordering::Release);
        fence(Ordering::SeqCst);
        xen::notify(self.port);
        Ok(n as usize)
    }

    /// Appends what has arrived on our incoming ring to `out`; the byte
    /// count.
    pub fn recv(&mut self, out: &mut Vec<u8>) -> Result<usize, v::VchanError> {
        let [_, ((base, size), prod_at, cons_at)] = self.rings();
        // Acquire: the bytes are read after the index that covers them.
        let prod = self.u32_at(prod_at).load(Ordering::Acquire);
        let cons = self.u32_at(cons_at).load(Ordering::Relaxed);
        let n = v::readable(prod, cons, size)?;
        for (at, len) in v::pieces(cons, n, size) {
            for i in 0..len {
                // SAFETY: inside the incoming ring's mapped `size` bytes,
                // below the other end's producer index.
                out.push(unsafe { ((base as usize + at + i) as *const u8).read_volatile() });
            }
        }
        if n > 0 {
            // Release: our reads are done before the other end may reuse
            // them.
            self.u32_at(cons_at)
                .store(cons.wrapping_add(n), Ordering::Release);
            fence(Ordering::SeqCst);
            xen::notify(self.port);
        }
        Ok(n as usize)
    }

    /// Sends all of `data`, waiting for room until `deadline_ms`.
    pub fn send_all(&mut self, mut data: &[u8], deadline_ms: u64) -> Result<(), String> {
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

    /// Ends the connection: says we have gone, tells the other end, closes
    /// our event channel and, as a client, unmaps the server's pages and
    /// gives their frames back. (A server's pages are ended by their
    /// owner: `ServerPages::end`.)
    pub fn close(mut self) {
        let ours = if self.server {
            v::SRV_LIVE
        } else {
            v::CLI_LIVE
        };
        self.u8_at(ours).store(0, Ordering::Release);
        fence(Ordering::SeqCst);
        xen::notify(self.port);
        xen::close_port(self.port);
        unmap_pages(&mut self.mapped);
    }
}

/// QubesDB over vchan: the connection, the conversation and the decoder.
/// When dom0's QubesDB daemon for this domain goes away (restarted), the
/// link is closed and made again from the loop (`follow`): the database
/// loads anew and every client's rules are applied from it.
pub struct QubesDbLink {
    /// `None` while dom0's end is gone and the link waits to reconnect.
    vchan: Option<Vchan>,
    pub client: Client,
    decoder: Decoder,
    /// Events that arrived with the end of the load, not yet taken.
    early: Vec<Event>,
    /// dom0's vchan path for us.
    path: String,
    /// XenStore for reconnecting, once the loop shares it (`set_store`).
    store: Option<SharedStore>,
    /// When to look for dom0's end again, while it is gone.
    next_try: u64,
    /// A reconnected link whose database has not loaded completely yet.
    reloading: bool,
    /// Keys the command line sets (they win over the database's, as at
    /// boot: `set_overrides`).
    overrides: Vec<(String, String)>,
    /// When `/dns/...` is next brought up to date (`dns_info`).
    next_dns_ms: u64,
    /// `/dns/...` paths dom0 would refuse (too long), reported once.
    dns_refused: Vec<String>,
}

/// How often the `dsthost` addresses are compared with what dom0 has.
const DNS_INFO_MS: u64 = 1000;

/// How often a gone QubesDB is looked for again.
const RECONNECT_MS: u64 = 1000;

impl QubesDbLink {
    /// Our event channel (0 while reconnecting).
    pub fn port(&self) -> u32 {
        self.vchan.as_ref().map_or(0, Vchan::port)
    }

    /// The XenStore connection to reconnect with, once the loop shares it.
    pub fn set_store(&mut self, store: SharedStore) {
        self.store = Some(store);
    }

    /// The keys the command line sets: they stay in force over what dom0
    /// writes, as they did over the database at boot.
    pub fn set_overrides(&mut self, overrides: Vec<(String, String)>) {
        self.overrides = overrides;
    }

    /// Follows what dom0 pushed since the last call (every housekeeping
    /// round of the loop): each change acknowledged, and a client's rules
    /// replaced in `firewall` when dom0 completes their update (the empty
    /// write to `/qubes-firewall/<ip>`). When dom0's end has gone, the
    /// rules in force stay and the link is made again. False once the
    /// link cannot go on (it is then dropped; the rules in force stay).
    pub fn follow(&mut self, firewall: &mut netstack::firewall::Firewall) -> bool {
        let Some(vchan) = self.vchan.as_ref() else {
            return self.reconnect();
        };
        if let Ok(Live::Exited) | Err(_) = vchan.peer() {
            return self.lose("dom0's QubesDB daemon went away");
        }
        let events = match self.poll() {
            Ok(e) => e,
            Err(e) => return self.lose(&e),
        };
        for e in events {
            let path = match e {
                Event::Written(path) | Event::Removed(path) if is_client_list(&path) => {
                    self.follow_clients(firewall);
                    continue;
                }
                Event::Written(path) | Event::Removed(path) if is_uplink_key(&path) => {
                    self.follow_uplink(firewall);
                    continue;
                }
                Event::Written(path) => path,
                Event::Loaded if self.reloading => {
                    self.reloading = false;
                    if let Err(e) = self.reload(firewall) {
                        return self.lose(&e);
                    }
                    continue;
                }
                Event::Unexpected(kind, path) => {
                    println!("qubesdb: unexpected {kind:?} for '{path}' from dom0");
                    continue;
                }
                _ => continue,
            };
            let value = self.client.get(&path).unwrap_or("x");
            let Some(ip) = qubesdb::rules_committed(&path, value).map(String::from) else {
                continue;
            };
            if let Err(e) = self.apply(&ip, firewall) {
                return self.lose(&e);
            }
        }
        let now = clock::recent_ms();
        if now >= self.next_dns_ms && self.client.loaded() && !self.reloading {
            self.next_dns_ms = now + DNS_INFO_MS;
            if let Err(e) = self.dns_info(firewall) {
                return self.lose(&e);
            }
        }
        true
    }

    /// Writes to dom0 what each client's `dsthost` names resolved to
    /// (`/dns/<ip>/<name>`), where it differs from what dom0 has, as
    /// Qubes's firewall agent does for the user.
    fn dns_info(&mut self, firewall: &netstack::firewall::Firewall) -> Result<(), String> {
        for (ip, name, addrs) in firewall.dns_info() {
            let path = format!("{}{ip}/{name}", qubesdb::DNS_INFO);
            if self.client.get(&path) == Some(qubesdb::dns_value(addrs).as_str()) {
                continue;
            }
            match self.client.dns_info(&ip.to_string(), name, addrs) {
                Ok(w) => self.send_all(&w, clock::now_ms() + 1000)?,
                Err(e) => {
                    if !self.dns_refused.contains(&path) {
                        println!("qubesdb: {path}: {e:?}; not written (QubesDB's limit)");
                        self.dns_refused.push(path);
                    }
                }
            }
        }
        Ok(())
    }

    /// Replaces `ip`'s rules in `firewall` with what the database holds
    /// for it (fail closed: rules that do not parse, or none, drop all its
    /// traffic) and tells dom0 they are handled; an error if telling
    /// failed (the link is then broken).
    fn apply(
        &mut self,
        ip: &str,
        firewall: &mut netstack::firewall::Firewall,
    ) -> Result<(), String> {
        let Ok(addr) = ip.parse::<core::net::IpAddr>() else {
            println!("qubesdb: /qubes-firewall/{ip}: not an address");
            return Ok(());
        };
        let prefix = format!("/qubes-firewall/{ip}/");
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
            Some(n) => println!("qubesdb: rules of {ip} replaced: {summary}; {n} flows dropped"),
            None => println!("qubesdb: rules for {ip}, which is not a client, ignored"),
        }
        // What its old names resolved to goes, as the agent clears it
        // (written again as the new rules' names resolve: `dns_info`).
        let clear = self
            .client
            .remove(&format!("{}{ip}/", qubesdb::DNS_INFO))
            .map_err(|e| format!("{ip}: {e:?}"))?;
        self.send_all(&clear, clock::now_ms() + 1000)?;
        self.handled(ip)
    }

    /// The database as the configuration is read from it: dom0's entries,
    /// then the command line's keys over them, as at boot. (The decoder's
    /// limits are the model's, so this does not fail; if it did, what is
    /// in force stays rather than a rule going missing.)
    fn database(&self) -> Result<netstack::config::QubesDb, String> {
        let mut db = netstack::config::QubesDb::default();
        let overrides = self.overrides.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        for (k, v) in self.client.entries().chain(overrides) {
            db.set(k, v).map_err(|e| e.to_string())?;
        }
        Ok(db)
    }

    /// dom0 changed the list of connected clients (a client qube started
    /// or stopped): the firewall follows it, each client that came with
    /// the rules the database has for it.
    fn follow_clients(&mut self, firewall: &mut netstack::firewall::Firewall) {
        let wanted = self.database().and_then(|db| {
            netstack::config::NetConfig::clients_from_db(&db).map_err(|e| e.to_string())
        });
        let wanted = match wanted {
            Ok(w) => w,
            Err(e) => {
                println!("qubesdb: connected clients: {e}; the list in force stays");
                return;
            }
        };
        let (added, removed) = firewall.set_clients(wanted);
        for ip in &added {
            println!("qubesdb: client {ip} connected");
        }
        for ip in &removed {
            println!("qubesdb: client {ip} disconnected (its flows ended)");
        }
    }

    /// dom0 changed the uplink's address, gateway or DNS servers (the
    /// firewall's upstream moved): the firewall follows the database's
    /// configuration; one that does not parse leaves the one in force.
    fn follow_uplink(&mut self, firewall: &mut netstack::firewall::Firewall) {
        let cfg = self
            .database()
            .and_then(|db| netstack::config::NetConfig::from_db(&db).map_err(|e| e.to_string()));
        let cfg = match cfg {
            Ok(c) => c,
            Err(e) => {
                println!("qubesdb: uplink: {e}; the configuration in force stays");
                return;
            }
        };
        let change = firewall.set_uplink(&cfg);
        if change.address {
            println!(
                "qubesdb: uplink address now {}/{} ({} flows ended)",
                cfg.uplink_ip, cfg.uplink_prefix, change.flows_ended
            );
        }
        if change.gateway {
            println!("qubesdb: uplink gateway now {}", cfg.gateway);
        }
        if change.dns {
            let dns: Vec<String> = cfg
                .upstream_dns
                .iter()
                .flatten()
                .map(|a| a.to_string())
                .collect();
            println!("qubesdb: upstream DNS now {}", dns.join(" "));
        }
        if change.ip6 {
            match cfg.ip6 {
                Some(v6) => println!(
                    "qubesdb: IPv6 now {} gateway {} client-gateway {} ({} flows ended)",
                    v6.uplink_ip, v6.gateway, v6.client_gateway, change.flows_ended6
                ),
                None => println!(
                    "qubesdb: IPv6 now off ({} flows ended)",
                    change.flows_ended6
                ),
            }
        }
    }

    /// After a reconnection: the connected clients and every client's
    /// rules from the new database (the ones it no longer has rules for
    /// are blocked), each reported handled.
    fn reload(&mut self, firewall: &mut netstack::firewall::Firewall) -> Result<(), String> {
        println!(
            "qubesdb: reloaded {} entries from dom0",
            self.client.initial_entries()
        );
        self.follow_clients(firewall);
        self.follow_uplink(firewall);
        let mut ips: Vec<String> = firewall.clients().iter().map(|ip| ip.to_string()).collect();
        for t in self.client.rule_targets() {
            if !ips.iter().any(|ip| ip == t) {
                ips.push(t.into());
            }
        }
        ips.iter().try_for_each(|ip| self.apply(ip, firewall))
    }

    /// dom0's end is gone: the link is closed and looked for again soon.
    fn lose(&mut self, why: &str) -> bool {
        if let Some(vc) = self.vchan.take() {
            vc.close();
        }
        if self.store.is_none() {
            println!("qubesdb: {why}; live updates stop here");
            return false;
        }
        println!("qubesdb: {why}; the rules in force stay; reconnecting");
        self.next_try = clock::recent_ms() + RECONNECT_MS;
        true
    }

    /// Looks for dom0's end again; once there, asks for the whole
    /// database (it loads over the next rounds: `follow`).
    fn reconnect(&mut self) -> bool {
        let now = clock::recent_ms();
        let Some(store) = self.store.as_mut() else {
            return false;
        };
        if now < self.next_try {
            return true;
        }
        self.next_try = now + RECONNECT_MS;
        let path = self.path.clone();
        let Ok(mut vc) = store.with(|s| Vchan::connect(s, 0, &path)) else {
            return true; // not there yet (or a stale entry): later
        };
        if !matches!(vc.peer(), Ok(Live::Connected)) {
            vc.close();
            return true;
        }
        if let Err(e) = vc.send_all(&Client::start(), now + 1000) {
            println!("qubesdb: asking the database again: {e}");
            vc.close();
            return true;
        }
        println!(
            "qubesdb: reconnected to dom0 (event channel {}); loading",
            vc.port()
        );
        self.vchan = Some(vc);
        self.client = Client::new();
        self.decoder = Decoder::new();
        self.early.clear();
        self.reloading = true;
        true
    }

    /// Tells dom0 that a client's rules are handled, as Qubes's firewall
    /// agent does (`/qubes-firewall_handled/<ip>`, one more each time).
    fn handled(&mut self, ip: &str) -> Result<(), String> {
        let w = self
            .client
            .firewall_handled(ip)
            .map_err(|e| format!("{ip}: {e:?}"))?;
        self.send_all(&w, clock::now_ms() + 1000)
    }

    fn send_all(&mut self, bytes: &[u8], deadline: u64) -> Result<(), String> {
        match self.vchan.as_mut() {
            Some(vc) => vc.send_all(bytes, deadline),
            None => Err("not connected".into()),
        }
    }

    /// At the start of forwarding, with the rules of the database in
    /// force: every client that has rules is reported handled once. False
    /// as `follow`.
    pub fn report_handled(&mut self) -> bool {
        // (A target that is no address gets no rules, so none are in
        // force: `apply` says so when dom0 commits it.)
        let targets: Vec<String> = self
            .client
            .rule_targets()
            .into_iter()
            .filter(|t| t.parse::<core::net::IpAddr>().is_ok())
            .map(String::from)
            .collect();
        for ip in &targets {
            if let Err(e) = self.handled(ip) {
                return self.lose(&e);
            }
        }
        if !targets.is_empty() {
            println!(
                "qubesdb: rules in force for {}; told dom0 ({}<ip>)",
                targets.join(" "),
                qubesdb::HANDLED
            );
        }
        true
    }
}

/// The keys that list the connected clients.
fn is_client_list(path: &str) -> bool {
    path == "/connected-ips" || path == "/connected-ips6"
}

/// The keys of the uplink's configuration that are followed live.
fn is_uplink_key(path: &str) -> bool {
    matches!(
        path,
        "/qubes-ip"
            | "/qubes-netmask"
            | "/qubes-gateway"
            | "/qubes-primary-dns"
            | "/qubes-secondary-dns"
            | "/qubes-ip6"
            | "/qubes-gateway6"
            | "/qubes-netvm-gateway6"
    )
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
            vchan: Some(vchan),
            client: Client::new(),
            decoder: Decoder::new(),
            early: Vec::new(),
            path: path.into(),
            store: None,
            next_try: 0,
            reloading: false,
            overrides: Vec::new(),
            next_dns_ms: 0,
            dns_refused: Vec::new(),
        };
        let deadline = clock::now_ms() + LOAD_TIMEOUT_MS;
        link.send_all(&Client::start(), deadline)?;
        while !link.client.loaded() {
            let events = link.poll()?;
            link.early = events.into_iter().filter(|e| *e != Event::Loaded).collect();
            if let Some(Ok(Live::Exited)) = link.vchan.as_ref().map(Vchan::peer) {
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
        let vc = self.vchan.as_mut().ok_or("not connected")?;
        vc.recv(&mut bytes).map_err(|e| format!("{e:?}"))?;
        self.decoder.push(&bytes);
        while let Some(m) = self.decoder.next_message() {
            let m = m.map_err(|e| format!("from dom0: {e:?}"))?;
            let (event, answer) = self.client.handle(m);
            if let Some(a) = answer {
                self.send_all(&a, clock::now_ms() + 1000)?;
            }
            events.extend(event);
        }
        Ok(events)
    }
}
