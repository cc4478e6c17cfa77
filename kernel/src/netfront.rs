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

use drivers::netfront::{region_bytes, Netfront, XenIo};
use xen_shim::grant::GrantRef;
use xen_shim::netif::{parse_mac, XenbusState};

use crate::gnttab::{self, GrantTable};
use crate::xenstore::XenStore;
use crate::{clock, phys, xen};

/// How long the backend may take to reach each state.
const STATE_TIMEOUT_MS: u64 = 30_000;

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

/// A connected netfront and how long each step took.
pub struct Connected {
    pub nic: Netfront<XenGrants>,
    pub backend_id: u16,
    pub port: u32,
    /// Milliseconds from the start of the handshake to the backend being
    /// Connected.
    pub connect_ms: u64,
}

fn read(store: &mut XenStore, path: &str) -> Result<String, String> {
    store.read(path).map_err(|e| format!("{path}: {e:?}"))
}

fn write(store: &mut XenStore, path: &str, value: &str) -> Result<(), String> {
    store
        .write(path, value)
        .map_err(|e| format!("{path}: {e:?}"))
}

/// Polls `path` until it holds state `want`, or the deadline passes.
fn wait_state(store: &mut XenStore, path: &str, want: XenbusState) -> Result<(), String> {
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

/// Connects the frontend of `device/vif/<dev>` using `table`.
pub fn connect(store: &mut XenStore, table: GrantTable, dev: &str) -> Result<Connected, String> {
    let start = clock::now_ms();
    let node = format!("device/vif/{dev}");
    let backend = read(store, &format!("{node}/backend"))?;
    let backend_id: u16 = read(store, &format!("{node}/backend-id"))?
        .trim()
        .parse()
        .map_err(|_| format!("{node}/backend-id: not a domain id"))?;
    let mac_text = read(store, &format!("{node}/mac"))?;
    let mac = parse_mac(&mac_text).ok_or(format!("{node}/mac: bad MAC '{mac_text}'"))?;
    wait_state(store, &format!("{backend}/state"), XenbusState::InitWait)?;
    let port = gnttab::alloc_unbound(backend_id).ok_or("EVTCHNOP_alloc_unbound failed")?;
    let io = XenGrants {
        table,
        backend: backend_id,
        port,
    };
    let mut nic = Netfront::new(io, phys::dma_region(region_bytes()), mac)
        .map_err(|e| format!("netfront: {e:?}"))?;
    nic.post_rx();
    let (tx, rx) = nic.ring_refs();
    for (key, value) in [
        ("tx-ring-ref", tx.to_string()),
        ("rx-ring-ref", rx.to_string()),
        ("event-channel", port.to_string()),
        ("request-rx-copy", "1".to_string()),
        ("feature-rx-notify", "1".to_string()),
        ("feature-no-csum-offload", "1".to_string()),
    ] {
        write(store, &format!("{node}/{key}"), &value)?;
    }
    write(
        store,
        &format!("{node}/state"),
        XenbusState::Connected.value(),
    )?;
    wait_state(store, &format!("{backend}/state"), XenbusState::Connected)?;
    Ok(Connected {
        nic,
        backend_id,
        port,
        connect_ms: clock::now_ms() - start,
    })
}
