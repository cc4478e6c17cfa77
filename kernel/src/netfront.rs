//! Bringing up a Xen netfront: the xenbus handshake over XenStore (as
//! Linux netfront does it) around `drivers::netfront`, with this domain's
//! grant table and an event channel to the backend.
//!
//! Steps: read `device/vif/N/{backend,backend-id,mac}`; wait for the
//! backend to reach InitWait (netback has read its configuration); grant
//! the rings and buffer pages and post every receive page; allocate an
//! unbound event channel for the backend; write `tx-ring-ref`,
//! `rx-ring-ref`, `event-channel`, `request-rx-copy=1`,
//! `feature-rx-notify=1` and `feature-no-csum-offload=1` (the firewall
//! needs complete checksums, so netback must not hand it frames with
//! checksums left blank); switch to Connected; wait for the backend to
//! be Connected. Each wait has a deadline; a failure is an error string
//! for the boot report, never a hang.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use drivers::netfront::{region_bytes, Netfront, NewError, XenIo};
use drivers::{DmaRegion, Nic, NicStats, Packet, PacketPool};
use xen_shim::grant::GrantRef;
use xen_shim::netif::{frontend_step, parse_mac, FrontendStep, XenbusState};

use crate::gnttab::{self, GrantTable};
use crate::xenstore::SharedStore;
use crate::{clock, idle, phys, xen};

/// How long the backend may take to reach each state.
const STATE_TIMEOUT_MS: u64 = 30_000;
/// How often XenStore's watch events are looked for.
const WATCH_POLL_MS: u64 = 10;
/// How often the states are read while no link is up (besides watches).
const DOWN_CHECK_MS: u64 = 500;
/// After this long closing, a backend that still maps our pages is
/// reported (the memory is not reused until it lets go).
const RELEASE_REPORT_MS: u64 = 10_000;
/// Watch tokens: our `device/vif` area, and the connected backend's state.
const VIF_TOKEN: &str = "uplink-vif";
const BACKEND_TOKEN: &str = "uplink-backend";

/// Grants to one backend domain and the event channel to it.
pub struct XenGrants {
    table: GrantTable,
    backend: u16,
    port: u32,
}

impl XenIo for XenGrants {
    fn grant(&mut self, paddr: u64, readonly: bool) -> Option<u32> {
        self.table
            .grant(self.backend, paddr >> 12, readonly)
            .map(|r| r.0)
    }

    fn end_grant(&mut self, gref: u32) -> bool {
        self.table.end(GrantRef(gref))
    }

    fn notify(&mut self) {
        xen::notify(self.port);
    }
}

/// One connection to a backend.
struct Device {
    nic: Netfront<XenGrants>,
    /// `device/vif/<dev>`, and the backend's path and domain.
    dev: String,
    node: String,
    backend: String,
    backend_id: u16,
    port: u32,
}

enum Link {
    Up(Device),
    /// Reconnecting: we are Connected, the backend not yet (since when).
    Connecting(Device, u64),
    /// Told the backend we closed; ending the grants (since when).
    Closing(Device, u64),
    /// No connection; the grant table and (after the first connection)
    /// the memory wait for the next.
    Down(GrantTable, Option<DmaRegion>),
    /// Only while a transition moves the parts.
    Moving,
}

/// The uplink netfront through its life (see the module's comment).
pub struct Uplink {
    store: SharedStore,
    /// Our MAC: the first connection's (the firewall keeps it).
    mac: [u8; 6],
    link: Link,
    /// Counters of earlier connections, and frames dropped while down.
    past: NicStats,
    last_poll_ms: u64,
    next_check_ms: u64,
    reported: bool,
    /// XenStore broke (a bad index or reply): the backend's changes are no
    /// longer followed; the link stays as it is.
    store_failed: bool,
}

fn read(store: &mut SharedStore, path: &str) -> Result<String, String> {
    store.read(path).map_err(|e| format!("{path}: {e:?}"))
}

/// The state at `path`; a missing or unreadable node counts as Closed
/// (the toolstack removes a device's nodes when it is gone).
fn state(store: &mut SharedStore, path: &str) -> XenbusState {
    store
        .read(path)
        .ok()
        .and_then(|v| XenbusState::parse(&v))
        .unwrap_or(XenbusState::Closed)
}

/// Polls `path` until it holds state `want`, or the deadline passes.
fn wait_state(store: &mut SharedStore, path: &str, want: XenbusState) -> Result<(), String> {
    let deadline = clock::now_ms() + STATE_TIMEOUT_MS;
    loop {
        let v = read(store, path)?;
        if XenbusState::parse(&v) == Some(want) {
            return Ok(());
        }
        if clock::now_ms() > deadline {
            return Err(format!(
                "{path} is {}, not {} after {} s",
                v.trim(),
                want.value(),
                STATE_TIMEOUT_MS / 1000
            ));
        }
        clock::delay_us(5_000);
    }
}

/// What a failed connection attempt leaves.
enum Failed {
    /// Nothing was granted: the parts are back.
    Before(GrantTable, Option<DmaRegion>),
    /// The device exists: it must be closed and released.
    After(alloc::boxed::Box<Device>),
}

/// Connects the frontend of `device/vif/<dev>` with `table` and `mem`
/// (fresh memory when `None`) and watches the backend's state; with
/// `wait`, waits for the backend to be Connected too. The device and the
/// milliseconds it took.
fn connect(
    store: &mut SharedStore,
    table: GrantTable,
    mem: Option<DmaRegion>,
    dev: &str,
    wait: bool,
) -> Result<(Device, u64), (String, Failed)> {
    let start = clock::now_ms();
    let node = format!("device/vif/{dev}");
    let before = |e: String, table, mem| Err((e, Failed::Before(table, mem)));
    let ids = (|| {
        let backend = read(store, &format!("{node}/backend"))?;
        let backend_id: u16 = read(store, &format!("{node}/backend-id"))?
            .trim()
            .parse()
            .map_err(|_| format!("{node}/backend-id: not a domain id"))?;
        let mac_text = read(store, &format!("{node}/mac"))?;
        let mac = parse_mac(&mac_text).ok_or(format!("{node}/mac: bad MAC '{mac_text}'"))?;
        wait_state(store, &format!("{backend}/state"), XenbusState::InitWait)?;
        Ok::<_, String>((backend, backend_id, mac))
    })();
    let (backend, backend_id, mac) = match ids {
        Ok(i) => i,
        Err(e) => return before(e, table, mem),
    };
    let Some(port) = gnttab::alloc_unbound(backend_id) else {
        return before("EVTCHNOP_alloc_unbound failed".into(), table, mem);
    };
    let io = XenGrants {
        table,
        backend: backend_id,
        port,
    };
    let mem = mem.unwrap_or_else(|| phys::dma_region(region_bytes()));
    let nic = match Netfront::new(io, mem, mac) {
        Ok(n) => n,
        Err(NewError { error, io, mem }) => {
            xen::close_port(port);
            return before(format!("netfront: {error:?}"), io.table, Some(mem));
        }
    };
    let mut d = Device {
        nic,
        dev: dev.into(),
        node,
        backend,
        backend_id,
        port,
    };
    d.nic.post_rx();
    let (tx, rx) = d.nic.ring_refs();
    let handshake = (|| {
        // The keys and our state in one transaction, as Linux netfront
        // writes them: netback sees all of them or none.
        let keys = [
            ("tx-ring-ref", tx.to_string()),
            ("rx-ring-ref", rx.to_string()),
            ("event-channel", port.to_string()),
            ("request-rx-copy", "1".to_string()),
            ("feature-rx-notify", "1".to_string()),
            ("feature-no-csum-offload", "1".to_string()),
            ("state", XenbusState::Connected.value().to_string()),
        ];
        store
            .transaction(|t| {
                keys.iter()
                    .try_for_each(|(key, value)| t.write(&format!("{}/{key}", d.node), value))
            })
            .map_err(|e| format!("{}: handshake transaction: {e:?}", d.node))?;
        let theirs = format!("{}/state", d.backend);
        if let Err(e) = store.watch(&theirs, BACKEND_TOKEN) {
            println!("netfront: cannot watch {theirs} ({e:?})");
        }
        if wait {
            wait_state(store, &theirs, XenbusState::Connected)?;
        }
        Ok(())
    })();
    match handshake {
        Ok(()) => Ok((d, clock::now_ms() - start)),
        Err(e) => Err((e, Failed::After(alloc::boxed::Box::new(d)))),
    }
}

impl Uplink {
    /// Connects `device/vif/<dev>` at boot (waiting for its backend) and
    /// starts following it; the error for the boot report otherwise.
    pub fn boot(mut store: SharedStore, table: GrantTable, dev: &str) -> Result<Self, String> {
        let (d, ms) = connect(&mut store, table, None, dev, true).map_err(|(e, _)| e)?;
        let mut up = Self {
            store,
            mac: d.nic.mac(),
            link: Link::Moving,
            past: NicStats::default(),
            last_poll_ms: 0,
            next_check_ms: 0,
            reported: false,
            store_failed: false,
        };
        if let Err(e) = up.store.watch("device/vif", VIF_TOKEN) {
            println!("netfront: cannot watch device/vif ({e:?}); re-attached devices are not seen");
        }
        up.up(d, ms);
        Ok(up)
    }

    /// The event channel of the current connection.
    pub fn port(&self) -> Option<u32> {
        match &self.link {
            Link::Up(d) => Some(d.port),
            _ => None,
        }
    }

    fn up(&mut self, d: Device, ms: u64) {
        let mac = d.nic.mac();
        println!(
            "netfront: vif/{} connected to backend domain {} in {ms} ms (event channel {}, {} receive pages)",
            d.dev,
            d.backend_id,
            d.port,
            d.nic.rx_posted()
        );
        if mac != self.mac {
            println!(
                "netfront: vif/{} has MAC {}; frames keep going out from the first one's",
                d.dev,
                crate::fmt_mac(&mac)
            );
        }
        idle::set_xen_port(d.port);
        self.link = Link::Up(d);
    }

    /// Stops using `d` and tells its backend we closed; the grants end
    /// once it has unmapped our pages (`check` in Closing).
    fn close(&mut self, mut d: Device, why: &str) {
        println!("netfront: vif/{}: {why}; disconnecting", d.dev);
        d.nic.release();
        // The node may be gone already (the toolstack removed it).
        let _ = self
            .store
            .write(&format!("{}/state", d.node), XenbusState::Closed.value());
        idle::set_xen_port(self.store.port());
        self.reported = false;
        self.link = Link::Closing(d, clock::now_ms());
    }

    /// Reads the states and moves the link on.
    fn check(&mut self, now: u64) {
        match core::mem::replace(&mut self.link, Link::Moving) {
            Link::Up(d) => {
                let backend = state(&mut self.store, &format!("{}/state", d.backend));
                if d.nic.is_dead() {
                    self.close(d, "the backend broke the ring protocol");
                    return;
                }
                match frontend_step(backend, XenbusState::Connected) {
                    FrontendStep::Close | FrontendStep::Restart => {
                        let why = format!("backend state {}", backend.value());
                        self.close(d, &why);
                    }
                    _ => self.link = Link::Up(d),
                }
            }
            Link::Connecting(d, start) => {
                let backend = state(&mut self.store, &format!("{}/state", d.backend));
                if d.nic.is_dead() {
                    self.close(d, "the backend broke the ring protocol");
                    return;
                }
                match frontend_step(backend, XenbusState::Connected) {
                    FrontendStep::Running => self.up(d, now.saturating_sub(start)),
                    FrontendStep::Close | FrontendStep::Restart => {
                        let why = format!("backend state {} while connecting", backend.value());
                        self.close(d, &why);
                    }
                    _ if now.saturating_sub(start) > STATE_TIMEOUT_MS => {
                        let why = format!(
                            "backend still in state {} after {} s",
                            backend.value(),
                            STATE_TIMEOUT_MS / 1000
                        );
                        self.close(d, &why);
                    }
                    _ => self.link = Link::Connecting(d, start),
                }
            }
            Link::Closing(mut d, since) => {
                if !d.nic.release() {
                    if !self.reported && now.saturating_sub(since) > RELEASE_REPORT_MS {
                        self.reported = true;
                        println!(
                            "netfront: vif/{}: backend domain {} still maps our pages after {} s; \
                             waiting for it to let go",
                            d.dev,
                            d.backend_id,
                            RELEASE_REPORT_MS / 1000
                        );
                    }
                    self.link = Link::Closing(d, since);
                    return;
                }
                let _ = self
                    .store
                    .unwatch(&format!("{}/state", d.backend), BACKEND_TOKEN);
                xen::close_port(d.port);
                self.past += d.nic.stats();
                let dev = d.dev.clone();
                match d.nic.into_parts() {
                    Ok((io, mem)) => {
                        println!(
                            "netfront: vif/{dev} disconnected: every grant ended; waiting for a backend"
                        );
                        self.link = Link::Down(io.table, Some(mem));
                    }
                    // Unreachable (release said every grant ended).
                    Err(nic) => self.link = Link::Closing(Device { nic: *nic, ..d }, since),
                }
            }
            Link::Down(table, mem) => self.try_connect(table, mem),
            Link::Moving => {}
        }
    }

    /// Connects the first `device/vif` whose backend waits for us.
    fn try_connect(&mut self, table: GrantTable, mem: Option<DmaRegion>) {
        let devs = self.store.directory("device/vif").unwrap_or_default();
        let ready = devs.into_iter().find(|dev| {
            let node = format!("device/vif/{dev}");
            let ours = state(&mut self.store, &format!("{node}/state"));
            let Ok(backend) = read(&mut self.store, &format!("{node}/backend")) else {
                return false;
            };
            let theirs = state(&mut self.store, &format!("{backend}/state"));
            matches!(
                frontend_step(theirs, ours),
                FrontendStep::Connect | FrontendStep::Restart
            )
        });
        let Some(dev) = ready else {
            self.link = Link::Down(table, mem);
            return;
        };
        let start = clock::now_ms();
        match connect(&mut self.store, table, mem, &dev, false) {
            Ok((d, _)) => {
                println!(
                    "netfront: vif/{dev}: connecting to backend domain {}",
                    d.backend_id
                );
                self.link = Link::Connecting(d, start);
            }
            Err((e, failed)) => {
                println!("netfront: vif/{dev}: {e}");
                match failed {
                    Failed::Before(table, mem) => self.link = Link::Down(table, mem),
                    Failed::After(d) => self.close(*d, "the handshake failed"),
                }
            }
        }
    }
}

impl Nic for Uplink {
    fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn rx_batch(&mut self, pool: &mut PacketPool, out: &mut Vec<Packet>, max: usize) {
        if let Link::Up(d) = &mut self.link {
            d.nic.rx_batch(pool, out, max);
        }
    }

    fn tx_batch(&mut self, pool: &mut PacketPool, batch: &mut Vec<Packet>) {
        if let Link::Up(d) = &mut self.link {
            d.nic.tx_batch(pool, batch);
            return;
        }
        // No link: dropped, counted as send errors.
        self.past.tx_errors += batch.len() as u64;
        for p in batch.drain(..) {
            pool.free(p.buf);
        }
    }

    /// The device's upkeep, then (every `WATCH_POLL_MS`) the link's: watch
    /// events, and the states when one fired or no link is up.
    fn maintain(&mut self, pool: &mut PacketPool) {
        if let Link::Up(d) = &mut self.link {
            d.nic.maintain(pool);
        }
        let now = clock::recent_ms();
        if self.store_failed || now.wrapping_sub(self.last_poll_ms) < WATCH_POLL_MS {
            return;
        }
        self.last_poll_ms = now;
        let fired = match self.store.poll_events_for(&[VIF_TOKEN, BACKEND_TOKEN]) {
            Ok(events) => !events.is_empty(),
            Err(e) => {
                // The ring is out of step: every later read would fail too.
                println!("netfront: xenstore: {e:?}; the backend's changes are no longer followed");
                self.store_failed = true;
                return;
            }
        };
        let (up, dead) = match &self.link {
            Link::Up(d) => (true, d.nic.is_dead()),
            _ => (false, false),
        };
        if fired || dead || (!up && now >= self.next_check_ms) {
            self.next_check_ms = now + DOWN_CHECK_MS;
            self.check(now);
        }
    }

    fn stats(&self) -> NicStats {
        let mut s = self.past;
        if let Link::Up(d) | Link::Connecting(d, _) | Link::Closing(d, _) = &self.link {
            s += d.nic.stats();
        }
        s
    }

    fn arm(&mut self) -> bool {
        match &mut self.link {
            Link::Up(d) => d.nic.arm(),
            _ => false,
        }
    }
}
