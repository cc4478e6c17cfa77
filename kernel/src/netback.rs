//! Serving client VMs under Xen: the Qubes firewall VM's netback. Each
//! client VM's vif is one dataplane port (`ClientVif`, ports 1..), driven by
//! `drivers::netback` once connected.
//!
//! Finding clients: the toolstack (libxl in dom0, for a VM whose `vif`
//! names us as `backend=`) writes the device's backend directory into our
//! XenStore area, `backend/vif/<frontend domid>/<devid>` (`frontend`,
//! `frontend-id`, `online`, `state` 1, `mac`, `ip`, ...), and waits for
//! the backend to reach InitWait. A free slot looks there when something
//! changed in the area, and claims a device nobody serves.
//!
//! Watches, not polling: the area is watched (`backend/vif`: devices
//! appearing and going, the toolstack's `online` and `state`), and so is
//! each claimed device's frontend `state` (`EVENTS`, a `WatchLog`). An
//! event about a claimed device (its directory, its frontend's state)
//! makes that slot read its states; one elsewhere in the area makes a
//! free slot scan; without events nothing is read, however many slots
//! there are. A slow fallback
//! (`FALLBACK_MS`) covers an event that never comes; a slot whose
//! frontend could not be watched (XenStore's quota of watches) reads its
//! states every `UNWATCHED_MS` instead.
//!
//! The handshake, as Linux netback does it (`xen_shim::netif::backend_step`
//! decides from the frontend's state and ours): write the features we
//! offer (`feature-rx-copy` only: no scatter-gather, no GSO, one queue)
//! and switch to InitWait; once the frontend is Initialised or Connected,
//! read its `tx-ring-ref`, `rx-ring-ref`, `event-channel` and
//! `request-rx-copy` (which must be 1), map its two ring pages at the
//! slot's two frames of the foreign window above our RAM
//! (`phys::alloc_foreign`), bind the event channel, and switch to
//! Connected. The client's addresses (`ip`, as dom0 wrote them) become the
//! only ones the firewall accepts on the port.
//!
//! Teardown, when the frontend closes or disappears, the toolstack sets
//! our state to Closing or `online` to 0 (`xl network-detach`, the client
//! destroyed), or the client breaks the ring protocol: unmap the rings,
//! close the channel, switch to Closed, and wait (`Vif::Closing`): once
//! the toolstack sets `online` to 0 the slot removes the device's
//! directory, as `xl devd` does in a Linux driver domain (libxl waits for
//! that, up to 10 s, before `xl destroy` or `xl network-detach` returns),
//! and is free; a frontend that starts again is offered the device again;
//! a directory already gone frees the slot at once. The same two frames
//! serve the slot's next client, so hundreds of restarts take no memory.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::net::IpAddr;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use drivers::netback::{BackIo, Direction, GrantCopy, Netback, RINGS_BYTES};
use drivers::{DmaRegion, Nic, NicStats, Packet, PacketPool};
use xen_shim::grant::{GnttabCopy, GNTST_OKAY};
use xen_shim::netif::{backend_step, BackendStep, XenbusState};
use xen_shim::xenstore::{self, WatchLog};

use crate::xenstore::SharedStore;
use crate::{clock, idle, phys, xen};

/// Our side's MAC on every client vif, as a Qubes net VM's vifs have.
pub const CLIENT_SIDE_MAC: [u8; 6] = [0xfe, 0xff, 0xff, 0xff, 0xff, 0xff];
/// The token of the netback's XenStore watches.
const WATCH_TOKEN: &str = "netback";
/// How often the watch events are collected.
const PUMP_MS: u64 = 10;
/// A scan for new devices, and each claimed slot's reading of its states,
/// at least this often even without events.
const FALLBACK_MS: u64 = 5_000;
/// How often a claimed slot whose frontend is not watched reads its
/// states.
const UNWATCHED_MS: u64 = 200;
/// How long a device the toolstack removes stays Closed before its
/// directory goes: the toolstack must read Closed first (it waits for that
/// state, and a directory gone before it looked reads to it as an error).
/// `xl devd` in a Linux driver domain runs the hotplug script in between.
const REMOVE_AFTER_MS: u64 = 500;

/// The netback's recent watch events, for each slot to find those about
/// its device.
static EVENTS: spin::Mutex<WatchLog> = spin::Mutex::new(WatchLog::new());
/// `EVENTS.next()` as of the last collection: a slot that has seen up to
/// here skips the lock (each slot looks every loop round).
static EVENTS_NEXT: AtomicU64 = AtomicU64::new(0);
/// `EVENTS.next()` when the last scan for new devices began.
static SCANNED: AtomicU64 = AtomicU64::new(0);
/// The last scan claimed a device: there may be more, the next free slot
/// scans again (also set for the first scan).
static RESCAN: AtomicBool = AtomicBool::new(true);
/// When the next fallback scan is due.
static NEXT_SCAN_MS: AtomicU64 = AtomicU64::new(0);
/// When the watch events are next collected.
static NEXT_PUMP_MS: AtomicU64 = AtomicU64::new(0);
/// Whether the backend area is watched.
static AREA_WATCHED: AtomicBool = AtomicBool::new(false);
/// Backend directories a slot serves.
static CLAIMED: spin::Mutex<Vec<String>> = spin::Mutex::new(Vec::new());

/// The last XenStore error a scan met, so that each new one is reported
/// once (a missing `backend/vif` is normal: no client yet).
static SCAN_ERROR: spin::Mutex<Option<String>> = spin::Mutex::new(None);

fn scan_error(path: &str, e: xen_shim::xenstore::XsError) {
    if path == "backend/vif" && e == xen_shim::xenstore::XsError::Remote("ENOENT".into()) {
        return;
    }
    let text = format!("{path}: {e:?}");
    let mut last = SCAN_ERROR.lock();
    if last.as_deref() != Some(text.as_str()) {
        println!("netback: looking for client vifs: {text}");
        *last = Some(text);
    }
}

/// Collects the netback's watch events (every `PUMP_MS`) into `EVENTS`,
/// watching the backend area first if it is not yet.
fn pump(store: &mut SharedStore, now: u64) {
    if NEXT_PUMP_MS.load(Ordering::Relaxed) > now {
        return;
    }
    NEXT_PUMP_MS.store(now + PUMP_MS, Ordering::Relaxed);
    if !AREA_WATCHED.load(Ordering::Relaxed) {
        match store.watch("backend/vif", WATCH_TOKEN) {
            Ok(()) => AREA_WATCHED.store(true, Ordering::Relaxed),
            Err(e) => scan_error("watching backend/vif", e),
        }
    }
    match store.poll_events_for(&[WATCH_TOKEN]) {
        Ok(events) => {
            let mut log = EVENTS.lock();
            for (path, _) in events {
                log.push(path, now);
            }
            log.prune(now);
            EVENTS_NEXT.store(log.next(), Ordering::Relaxed);
        }
        Err(e) => scan_error("watch events", e),
    }
}

/// Whether a free slot should scan now: something changed in the area
/// that is not a claimed device's own business, the last scan claimed a
/// device, or the fallback is due. The caller scans.
fn scan_due(now: u64) -> bool {
    // Every free slot asks every round: nothing new is answered without
    // the lock.
    if !RESCAN.load(Ordering::Relaxed)
        && NEXT_SCAN_MS.load(Ordering::Relaxed) > now
        && SCANNED.load(Ordering::Relaxed) == EVENTS_NEXT.load(Ordering::Relaxed)
    {
        return false;
    }
    let log = EVENTS.lock();
    let due = RESCAN.swap(false, Ordering::Relaxed)
        || NEXT_SCAN_MS.load(Ordering::Relaxed) <= now
        || log.since(SCANNED.load(Ordering::Relaxed), |p| {
            xenstore::within(p, "backend/vif")
                && !CLAIMED.lock().iter().any(|c| xenstore::within(p, c))
        });
    // The events up to here are looked at, due or not.
    SCANNED.store(log.next(), Ordering::Relaxed);
    if due {
        NEXT_SCAN_MS.store(now + FALLBACK_MS, Ordering::Relaxed);
    }
    due
}

/// Grant copies with one client domain, and the event channel to it.
pub struct ClientIo {
    domid: u16,
    port: u32,
    /// The hypercall's entries, and which op each is.
    ops: Vec<GnttabCopy>,
    index: Vec<usize>,
}

impl BackIo for ClientIo {
    fn copy(&mut self, ops: &mut [GrantCopy]) {
        self.ops.clear();
        self.index.clear();
        for (i, op) in ops.iter_mut().enumerate() {
            op.ok = false;
            let c = match op.dir {
                Direction::FromClient => {
                    GnttabCopy::from_grant(self.domid, op.gref, op.offset, op.paddr, op.len)
                }
                Direction::ToClient => {
                    GnttabCopy::to_grant(self.domid, op.gref, op.offset, op.paddr, op.len)
                }
            };
            // An op that would cross a page is not issued (not ok).
            if let Some(c) = c {
                self.ops.push(c);
                self.index.push(i);
            }
        }
        if xen::grant_copy(&mut self.ops) {
            for (c, &i) in self.ops.iter().zip(&self.index) {
                ops[i].ok = c.status == GNTST_OKAY;
            }
        }
    }

    fn notify(&mut self) {
        xen::notify(self.port);
    }
}

/// A device found in our backend area.
struct Device {
    /// `backend/vif/<fe>/<dev>` (relative to our domain's node).
    path: String,
    frontend: String,
    fe_id: u16,
}

// Eight slots live for the kernel's life: a box would cost an indirection
// per batch and save nothing.
#[allow(clippy::large_enum_variant)]
enum Vif {
    Free,
    /// We are in InitWait; the frontend has not published its rings.
    Offered(Device),
    Up(Device, Netback<ClientIo>, Vec<u32>),
    /// Closed, and waiting for the toolstack to take the device away
    /// (`online` 0: the directory goes at the time given, ms, set when
    /// that is first seen) or for the frontend to start again.
    Closing(Device, Option<u64>),
}

/// One client vif: a dataplane port that serves whichever client VM it
/// claimed, or nobody.
pub struct ClientVif {
    slot: usize,
    store: SharedStore,
    vif: Vif,
    /// Two frames of the foreign window for the client's ring pages.
    rings: u64,
    /// The client's addresses while connected, and their generation.
    addrs: Vec<IpAddr>,
    generation: u64,
    /// Counters of earlier clients, and frames dropped with no client.
    past: NicStats,
    /// `EVENTS.next()` when the slot last looked at the events, and when
    /// it must read its states again without an event.
    seen: u64,
    next_check_ms: u64,
    /// The frontend `state` path watched for the claimed device.
    watching: Option<String>,
}

fn state(store: &mut SharedStore, path: &str) -> Option<XenbusState> {
    store.read(path).ok().and_then(|v| XenbusState::parse(&v))
}

fn number(store: &mut SharedStore, path: &str) -> Result<u32, String> {
    let v = store.read(path).map_err(|e| format!("{path}: {e:?}"))?;
    v.trim()
        .parse()
        .map_err(|_| format!("{path}: '{}' is not a number", v.trim()))
}

impl ClientVif {
    pub fn new(slot: usize, store: SharedStore) -> Self {
        let rings = phys::alloc_foreign((RINGS_BYTES / 4096) as u64);
        Self {
            slot,
            store,
            vif: Vif::Free,
            rings,
            addrs: Vec::new(),
            generation: 0,
            past: NicStats::default(),
            seen: 0,
            next_check_ms: 0,
            watching: None,
        }
    }

    fn port_name(&self) -> usize {
        self.slot + 1
    }

    /// Looks for a device nobody serves whose frontend is starting, and
    /// offers it our features.
    fn scan(&mut self) {
        let domains = match self.store.directory("backend/vif") {
            Ok(d) => d,
            Err(e) => {
                scan_error("backend/vif", e);
                return;
            }
        };
        for fe in domains {
            let devs = match self.store.directory(&format!("backend/vif/{fe}")) {
                Ok(d) => d,
                Err(e) => {
                    scan_error(&format!("backend/vif/{fe}"), e);
                    continue;
                }
            };
            for dev in devs {
                let path = format!("backend/vif/{fe}/{dev}");
                if CLAIMED.lock().contains(&path) {
                    continue;
                }
                if let Some(d) = self.consider(path) {
                    self.offer(d);
                    return;
                }
            }
        }
    }

    /// A device this slot may take: online, and its frontend starting.
    fn consider(&mut self, path: String) -> Option<Device> {
        let online = self.store.read(&format!("{path}/online")).ok()?;
        if online.trim() != "1" {
            return None;
        }
        let ours = state(&mut self.store, &format!("{path}/state"))?;
        let frontend = self.store.read(&format!("{path}/frontend")).ok()?;
        let frontend = frontend.trim().to_string();
        let fe_id: u16 = self
            .store
            .read(&format!("{path}/frontend-id"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let theirs =
            state(&mut self.store, &format!("{frontend}/state")).unwrap_or(XenbusState::Unknown);
        (backend_step(theirs, ours) == BackendStep::Offer).then_some(Device {
            path,
            frontend,
            fe_id,
        })
    }

    fn offer(&mut self, d: Device) {
        let features = [
            ("feature-rx-copy", "1"),
            ("feature-rx-flip", "0"),
            ("feature-sg", "0"),
            ("feature-gso-tcpv4", "0"),
            ("feature-gso-tcpv6", "0"),
            ("feature-ipv6-csum-offload", "0"),
            ("state", XenbusState::InitWait.value()),
        ];
        let path = d.path.clone();
        let written = self.store.transaction(|t| {
            features
                .iter()
                .try_for_each(|(k, v)| t.write(&format!("{path}/{k}"), v))
        });
        if let Err(e) = written {
            println!("netback: {path}: offering features: {e:?}");
            return;
        }
        CLAIMED.lock().push(path);
        // Another scan, by the next free slot: more devices may wait.
        RESCAN.store(true, Ordering::Relaxed);
        let theirs = format!("{}/state", d.frontend);
        self.watching = match self.store.watch(&theirs, WATCH_TOKEN) {
            Ok(()) => Some(theirs),
            Err(e) => {
                println!(
                    "netback: vif{}: watching {theirs}: {e:?}; reading it every {UNWATCHED_MS} ms",
                    self.port_name()
                );
                None
            }
        };
        println!(
            "netback: vif{}: domain {} ({}) found; waiting for its frontend",
            self.port_name(),
            d.fe_id,
            d.path
        );
        self.vif = Vif::Offered(d);
    }

    /// Maps the frontend's rings, binds its channel, and goes Connected.
    fn connect(&mut self, d: &Device) -> Result<(Netback<ClientIo>, Vec<u32>), String> {
        let fe = &d.frontend;
        let tx = number(&mut self.store, &format!("{fe}/tx-ring-ref"))?;
        let rx = number(&mut self.store, &format!("{fe}/rx-ring-ref"))?;
        let evtchn = number(&mut self.store, &format!("{fe}/event-channel"))?;
        let copy = number(&mut self.store, &format!("{fe}/request-rx-copy")).unwrap_or(0);
        if copy != 1 {
            return Err(
                "the frontend does not ask for request-rx-copy (page flipping is not offered)"
                    .into(),
            );
        }
        let handles = xen::map_grants(d.fe_id, &[tx, rx], self.rings >> 12)?;
        let Some(port) = xen::bind_interdomain(d.fe_id, evtchn) else {
            self.unmap(&handles);
            return Err(format!("binding event channel {evtchn} failed"));
        };
        let io = ClientIo {
            domid: d.fe_id,
            port,
            ops: Vec::with_capacity(64),
            index: Vec::with_capacity(64),
        };
        // SAFETY: the two frames at `rings` now hold the client's ring
        // pages (mapped above), identity-mapped, used by this slot alone
        // until `unmap`.
        let region = unsafe {
            DmaRegion::new(
                core::ptr::NonNull::new(self.rings as *mut u8)
                    .unwrap_or(core::ptr::NonNull::dangling()),
                self.rings,
                RINGS_BYTES,
            )
        };
        let Some(nb) = Netback::new(io, region, CLIENT_SIDE_MAC) else {
            xen::close_port(port);
            self.unmap(&handles);
            return Err("ring region too small".into());
        };
        if let Err(e) = self
            .store
            .write(&format!("{}/state", d.path), XenbusState::Connected.value())
        {
            let (io, _) = nb.into_parts();
            xen::close_port(io.port);
            self.unmap(&handles);
            return Err(format!("switching to Connected: {e:?}"));
        }
        Ok((nb, handles))
    }

    /// Unmaps the ring pages mapped with `handles`.
    fn unmap(&self, handles: &[u32]) {
        let stuck = xen::unmap_grants(self.rings >> 12, handles);
        if stuck > 0 {
            println!(
                "netback: vif{}: {stuck} ring pages would not unmap",
                self.port_name()
            );
        }
    }

    /// Lets the device go: switch to Closed and wait for the toolstack
    /// (`Vif::Closing`), or, when its directory is gone, free the slot.
    fn release(&mut self, d: Device, why: &str) {
        println!(
            "netback: vif{}: domain {}: {why}; disconnected",
            self.port_name(),
            d.fe_id
        );
        idle::set_client_port(self.slot, 0);
        self.set_addrs(Vec::new());
        if state(&mut self.store, &format!("{}/state", d.path)).is_some() {
            let _ = self
                .store
                .write(&format!("{}/state", d.path), XenbusState::Closed.value());
            // Looked at again next round: the toolstack may be waiting.
            self.next_check_ms = 0;
            self.vif = Vif::Closing(d, None);
        } else {
            self.forget(d);
        }
    }

    /// A closed device's next step: removed once the toolstack set
    /// `online` to 0 and `REMOVE_AFTER_MS` passed, forgotten when its
    /// directory is gone, offered again when its frontend starts again.
    fn closing(&mut self, d: Device, due: Option<u64>, now: u64) {
        let online = self.store.read(&format!("{}/online", d.path)).ok();
        match (online.as_deref().map(str::trim), due) {
            (None, _) => self.forget(d),
            (Some("0"), Some(at)) if now >= at => self.remove(d),
            (Some("0"), _) => {
                let at = due.unwrap_or(now + REMOVE_AFTER_MS);
                self.vif = Vif::Closing(d, Some(at));
            }
            (Some(_), _) => match self.consider(d.path.clone()) {
                Some(again) => {
                    self.forget(d);
                    self.offer(again);
                }
                None => self.vif = Vif::Closing(d, None),
            },
        }
    }

    /// Removes a closed device's directory, as `xl devd` does in a Linux
    /// driver domain once the toolstack set `online` to 0: libxl waits
    /// for that (up to 10 s, then removes it itself and reports an error)
    /// before it finishes `xl destroy` or `xl network-detach`. (The
    /// frontend domain's directory above it is dom0's, made with our
    /// domain node's permissions: dom0 removes it.) Then frees the slot.
    fn remove(&mut self, d: Device) {
        match self.store.remove(&d.path) {
            Ok(()) => println!("netback: vif{}: removed {}", self.port_name(), d.path),
            Err(e) => println!(
                "netback: vif{}: cannot remove {}: {e:?}",
                self.port_name(),
                d.path
            ),
        }
        self.forget(d);
    }

    /// Frees the slot of `d`.
    fn forget(&mut self, d: Device) {
        CLAIMED.lock().retain(|p| *p != d.path);
        if let Some(theirs) = self.watching.take() {
            let _ = self.store.unwatch(&theirs, WATCH_TOKEN);
        }
        self.vif = Vif::Free;
    }

    fn set_addrs(&mut self, addrs: Vec<IpAddr>) {
        self.addrs = addrs;
        self.generation += 1;
    }

    /// The device's next step from its states, or why it must be let go:
    /// the toolstack removed or closed it, or the frontend is gone or
    /// closing.
    fn step(&mut self, d: &Device) -> Result<BackendStep, &'static str> {
        let online = self.store.read(&format!("{}/online", d.path)).ok();
        let ours = state(&mut self.store, &format!("{}/state", d.path));
        let theirs = state(&mut self.store, &format!("{}/state", d.frontend))
            .unwrap_or(XenbusState::Unknown);
        match (online.as_deref().map(str::trim), ours) {
            (None, _) | (_, None) => Err("its device was removed"),
            (Some("0"), _) | (_, Some(XenbusState::Closing | XenbusState::Closed)) => {
                Err("the toolstack closed it")
            }
            (_, Some(ours)) => match backend_step(theirs, ours) {
                BackendStep::Disconnect | BackendStep::Close => Err("its frontend closed"),
                step => Ok(step),
            },
        }
    }

    /// The client's addresses as dom0 wrote them (the vif's `ip`); a token
    /// that is no address is reported, and its frames will be dropped.
    fn addresses(&mut self, d: &Device) -> Vec<IpAddr> {
        let text = self
            .store
            .read(&format!("{}/ip", d.path))
            .unwrap_or_default();
        let mut addrs = Vec::new();
        for token in text.split_whitespace() {
            match token.parse() {
                Ok(a) => addrs.push(a),
                Err(_) => println!(
                    "netback: vif{}: '{token}' in {}/ip is no address; ignored",
                    self.port_name(),
                    d.path
                ),
            }
        }
        addrs
    }

    /// Moves the slot on: a free slot scans when one is due, a claimed
    /// one reads its states.
    fn check(&mut self, now: u64) {
        match core::mem::replace(&mut self.vif, Vif::Free) {
            Vif::Free => {
                if scan_due(now) {
                    self.scan();
                }
            }
            Vif::Offered(d) => {
                match self.step(&d) {
                    Err(why) => {
                        self.release(d, why);
                        return;
                    }
                    Ok(BackendStep::Connect) => {}
                    Ok(_) => {
                        self.vif = Vif::Offered(d);
                        return;
                    }
                }
                match self.connect(&d) {
                    Ok((nb, handles)) => {
                        let addrs = self.addresses(&d);
                        let shown: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
                        println!(
                            "netback: vif{}: domain {} connected (event channel {}, address {})",
                            self.port_name(),
                            d.fe_id,
                            nb_port(&nb),
                            if addrs.is_empty() {
                                "none: all its traffic is dropped".to_string()
                            } else {
                                shown.join(" ")
                            }
                        );
                        idle::set_client_port(self.slot, nb_port(&nb));
                        self.set_addrs(addrs);
                        self.vif = Vif::Up(d, nb, handles);
                    }
                    Err(e) => self.release(d, &e),
                }
            }
            Vif::Closing(d, due) => self.closing(d, due, now),
            Vif::Up(d, nb, handles) => {
                let why = if nb.is_dead() {
                    "it broke the ring protocol"
                } else {
                    match self.step(&d) {
                        Err(why) => why,
                        Ok(_) => {
                            self.vif = Vif::Up(d, nb, handles);
                            return;
                        }
                    }
                };
                self.past += nb.stats();
                let (io, _) = nb.into_parts();
                xen::close_port(io.port);
                self.unmap(&handles);
                self.release(d, why);
            }
        }
    }
}

fn nb_port(nb: &Netback<ClientIo>) -> u32 {
    nb.io().port
}

impl Nic for ClientVif {
    fn mac(&self) -> [u8; 6] {
        CLIENT_SIDE_MAC
    }

    fn rx_batch(&mut self, pool: &mut PacketPool, out: &mut Vec<Packet>, max: usize) {
        if let Vif::Up(_, nb, _) = &mut self.vif {
            nb.rx_batch(pool, out, max);
        }
    }

    fn tx_batch(&mut self, pool: &mut PacketPool, batch: &mut Vec<Packet>) {
        if let Vif::Up(_, nb, _) = &mut self.vif {
            nb.tx_batch(pool, batch);
            return;
        }
        self.past.tx_errors += batch.len() as u64;
        for p in batch.drain(..) {
            pool.free(p.buf);
        }
    }

    fn maintain(&mut self, _pool: &mut PacketPool) {
        let now = clock::recent_ms();
        pump(&mut self.store, now);
        let (Vif::Offered(d) | Vif::Up(d, ..) | Vif::Closing(d, _)) = &self.vif else {
            self.check(now);
            return;
        };
        // Each claimed slot looks every round: without news, no lock.
        let (changed, next) = if self.seen == EVENTS_NEXT.load(Ordering::Relaxed) {
            (false, self.seen)
        } else {
            let log = EVENTS.lock();
            (
                log.any_since(self.seen, &[&d.path, &d.frontend]),
                log.next(),
            )
        };
        // Looked at, whether about this slot or not.
        self.seen = next;
        let dead = matches!(&self.vif, Vif::Up(_, nb, _) if nb.is_dead());
        let due = matches!(&self.vif, Vif::Closing(_, Some(at)) if now >= *at);
        if changed || now >= self.next_check_ms || dead || due {
            let every = if self.watching.is_some() {
                FALLBACK_MS
            } else {
                UNWATCHED_MS
            };
            self.next_check_ms = now + every;
            self.check(now);
        }
    }

    fn stats(&self) -> NicStats {
        let mut s = self.past;
        if let Vif::Up(_, nb, _) = &self.vif {
            s += nb.stats();
        }
        s
    }

    fn arm(&mut self) -> bool {
        match &mut self.vif {
            Vif::Up(_, nb, _) => nb.arm(),
            _ => false,
        }
    }

    fn assigned(&self) -> Option<(u64, &[IpAddr])> {
        Some((self.generation, &self.addrs))
    }
}
