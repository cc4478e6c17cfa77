//! Xen netfront (`public/io/netif.h`): the frontend half of a Xen virtual
//! NIC, whose backend (Linux netback in sys-net or dom0) moves frames
//! between our granted pages and its bridge.
//!
//! Memory: one region of pages — the TX and RX shared rings, then
//! `RX_BUFFERS` receive pages, then the transmit slots (two 2 KiB slots a
//! page). Everything is granted to the backend once, when the device is
//! made (rings and receive pages writable, transmit pages read-only), and
//! the grants are ended by `release`. The backend copies received frames
//! into our receive pages (`request-rx-copy`) and reads transmitted ones
//! from our transmit slots; frames are copied between those pages and the
//! packet pool. So the backend never sees a pool buffer: a frame the
//! firewall judged is never in memory another domain can change, and a
//! granted page never holds anything but frames for that backend. (The
//! copy costs one `memcpy` of the frame each way; zero-copy would need
//! page-sized pool slots and the backend's `xdp-headroom`.)
//!
//! The backend is not trusted: response indices more than a ring ahead,
//! or beyond the requests we made, make the device dead (nothing more is
//! read from it); an id with no request outstanding, a frame outside its
//! page, flags we did not negotiate or an error status are counted and
//! skipped, never followed.
//!
//! Notifications: we poll; only before the core blocks in Xen (`arm_rx`)
//! is the backend asked to notify us of the next receive response; we
//! notify it
//! after publishing a batch when its `req_event` lies within what we
//! published (`need_notify`, behind a full fence as `RING_PUSH_REQUESTS_AND_CHECK_NOTIFY`).

use alloc::vec::Vec;
use core::sync::atomic::{fence, AtomicU32, Ordering};

use xen_shim::netif::*;

use crate::pool::{Packet, PacketPool, MAX_FRAME};
use crate::{DmaRegion, Nic, NicStats};

/// Receive pages (requests kept posted).
pub const RX_BUFFERS: usize = 128;
/// Transmit slots.
pub const TX_SLOTS: usize = 128;
const TX_SLOT: usize = 2048;
const _: () = assert!(MAX_FRAME <= TX_SLOT, "a frame fits a transmit slot");
const TX_RING: usize = 0;
const RX_RING: usize = PAGE;
const RX_PAGES: usize = 2 * PAGE;
const TX_PAGES: usize = RX_PAGES + RX_BUFFERS * PAGE;
/// Shortest frame accepted from the backend (an Ethernet header).
const MIN_FRAME: usize = 14;

/// Bytes of memory a netfront needs (page-aligned).
pub const fn region_bytes() -> usize {
    TX_PAGES + TX_SLOTS / (PAGE / TX_SLOT) * PAGE
}

/// What the driver needs from Xen: grants to the backend domain and the
/// event channel to it.
pub trait XenIo {
    /// Grants the backend access to the page at guest-physical `paddr`;
    /// the grant reference, or `None` when none is free.
    fn grant(&mut self, paddr: u64, readonly: bool) -> Option<u32>;
    /// Ends a grant; false while the backend still uses the page.
    fn end_grant(&mut self, gref: u32) -> bool;
    /// Sends an event to the backend.
    fn notify(&mut self);
}

/// A device that could not be made: why, and what it was given back.
pub struct NewError<X> {
    pub error: NetfrontError,
    pub io: X,
    pub mem: DmaRegion,
}

impl<X> core::fmt::Debug for NewError<X> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        self.error.fmt(f)
    }
}

/// Why the device could not be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetfrontError {
    /// The region is smaller than `region_bytes()`.
    RegionTooSmall,
    /// No grant reference was free.
    NoGrants,
}

pub struct Netfront<X: XenIo> {
    io: X,
    mem: DmaRegion,
    mac: [u8; 6],
    /// Grant references: the two rings, each receive page, each transmit
    /// page.
    ring_refs: (u32, u32),
    rx_grefs: Vec<u32>,
    tx_grefs: Vec<u32>,
    /// Per receive id: whether a request for it is outstanding.
    rx_out: Vec<bool>,
    /// Receive ids to post again.
    rx_idle: Vec<u16>,
    /// Per transmit id: whether a request for it is outstanding.
    tx_out: Vec<bool>,
    tx_free: Vec<u16>,
    /// Private producer (requests) and consumer (responses) indices.
    tx_prod: u32,
    tx_cons: u32,
    rx_prod: u32,
    rx_cons: u32,
    dead: bool,
    /// Grants not yet ended after `release` began.
    unreleased: Option<Vec<u32>>,
    stats: NicStats,
}

impl<X: XenIo> Netfront<X> {
    /// Initialises both shared rings in `mem` and grants every page to the
    /// backend. Nothing is posted yet (`post_rx`).
    /// Hands `io` and `mem` back when it fails (no grant is left).
    pub fn new(mut io: X, mem: DmaRegion, mac: [u8; 6]) -> Result<Self, NewError<X>> {
        if mem.len() < region_bytes() {
            return Err(NewError {
                error: NetfrontError::RegionTooSmall,
                io,
                mem,
            });
        }
        // SAFETY: the region is ours alone (`DmaRegion::new`) and at least
        // `region_bytes()` long (checked above); nothing is granted yet.
        unsafe { core::ptr::write_bytes(mem.ptr().as_ptr(), 0, region_bytes()) };
        let base = mem.paddr();
        let mut granted: Vec<u32> = Vec::new();
        let mut grant = |io: &mut X, off: usize, readonly: bool| {
            let r = io.grant(base + off as u64, readonly);
            granted.extend(r);
            r
        };
        let mut all = || -> Option<(u32, u32, Vec<u32>, Vec<u32>)> {
            let tx = grant(&mut io, TX_RING, false)?;
            let rx = grant(&mut io, RX_RING, false)?;
            let rx_pages = (0..RX_BUFFERS)
                .map(|i| grant(&mut io, RX_PAGES + i * PAGE, false))
                .collect::<Option<Vec<u32>>>()?;
            let tx_pages = (0..TX_SLOTS * TX_SLOT / PAGE)
                .map(|i| grant(&mut io, TX_PAGES + i * PAGE, true))
                .collect::<Option<Vec<u32>>>()?;
            Some((tx, rx, rx_pages, tx_pages))
        };
        let Some((tx, rx, rx_grefs, tx_grefs)) = all() else {
            for r in granted {
                io.end_grant(r);
            }
            return Err(NewError {
                error: NetfrontError::NoGrants,
                io,
                mem,
            });
        };
        let nf = Self {
            io,
            mem,
            mac,
            ring_refs: (tx, rx),
            rx_grefs,
            tx_grefs,
            rx_out: alloc::vec![false; RX_BUFFERS],
            rx_idle: (0..RX_BUFFERS as u16).rev().collect(),
            tx_out: alloc::vec![false; TX_SLOTS],
            tx_free: (0..TX_SLOTS as u16).rev().collect(),
            tx_prod: 0,
            tx_cons: 0,
            rx_prod: 0,
            rx_cons: 0,
            dead: false,
            unreleased: None,
            stats: NicStats::default(),
        };
        // SHARED_RING_INIT: producers 0, events 1.
        for ring in [TX_RING, RX_RING] {
            nf.index(ring, REQ_EVENT).store(1, Ordering::Relaxed);
            nf.index(ring, RSP_EVENT).store(1, Ordering::Relaxed);
        }
        fence(Ordering::Release);
        Ok(nf)
    }

    /// The grant references of the TX and RX rings, for XenStore.
    pub fn ring_refs(&self) -> (u32, u32) {
        self.ring_refs
    }

    /// Whether the backend broke the ring protocol (nothing more is read).
    pub fn is_dead(&self) -> bool {
        self.dead
    }

    /// Receive requests outstanding.
    pub fn rx_posted(&self) -> usize {
        self.rx_out.iter().filter(|o| **o).count()
    }

    /// Ends every grant, for a disconnect; the device is unusable from
    /// then on. False while the backend still uses a page (the memory must
    /// not be reused then); call again later to end the rest.
    pub fn release(&mut self) -> bool {
        self.dead = true;
        let unreleased = self.unreleased.get_or_insert_with(|| {
            let (tx, rx) = self.ring_refs;
            [tx, rx]
                .into_iter()
                .chain(self.rx_grefs.iter().copied())
                .chain(self.tx_grefs.iter().copied())
                .collect()
        });
        unreleased.retain(|r| !self.io.end_grant(*r));
        unreleased.is_empty()
    }

    /// The backend access and the memory back, for a new device on the
    /// next connection; only once `release` has ended every grant (the
    /// device is handed back unchanged otherwise).
    pub fn into_parts(self) -> Result<(X, DmaRegion), alloc::boxed::Box<Self>> {
        match &self.unreleased {
            Some(left) if left.is_empty() => Ok((self.io, self.mem)),
            _ => Err(alloc::boxed::Box::new(self)),
        }
    }

    fn index(&self, ring: usize, field: usize) -> &AtomicU32 {
        self.mem.index_at(ring + field)
    }

    fn write_entry(&self, off: usize, bytes: &[u8]) {
        self.mem.write_shared(off, bytes)
    }

    /// Copies a frame into transmit slot `id` (plain stores: the backend
    /// reads the slot only after the request naming it is published,
    /// with a release store, as a device reads a pool buffer); the length
    /// copied, which the request must carry (a pool frame always fits).
    fn fill_tx_slot(&mut self, id: u16, frame: &[u8]) -> usize {
        let len = frame.len().min(TX_SLOT);
        // SAFETY: transmit slot `id < TX_SLOTS` lies inside the region
        // (`region_bytes`), and no request for it is outstanding (it came
        // from `tx_free`), so nothing else writes it.
        unsafe {
            let slot = self
                .mem
                .ptr()
                .as_ptr()
                .add(TX_PAGES + usize::from(id) * TX_SLOT);
            core::ptr::copy_nonoverlapping(frame.as_ptr(), slot, len);
        }
        len
    }

    fn read_entry<const N: usize>(&self, off: usize) -> [u8; N] {
        self.mem.read_shared(off)
    }

    /// Publishes requests up to `new` on `ring` and notifies the backend
    /// if it asked (its event index lies in what was just published).
    fn publish(&mut self, ring: usize, old: u32, new: u32) {
        if old == new {
            return;
        }
        // Release: the entries before the index that publishes them.
        self.index(ring, REQ_PROD).store(new, Ordering::Release);
        // The index must be visible before the event index is read (the
        // backend sets it, then re-reads the producer).
        fence(Ordering::SeqCst);
        let event = self.index(ring, REQ_EVENT).load(Ordering::Relaxed);
        if need_notify(old, new, event) {
            self.io.notify();
            self.stats.notifications += 1;
        }
    }

    /// Posts a receive request for every idle receive page.
    pub fn post_rx(&mut self) {
        if self.dead {
            return;
        }
        let old = self.rx_prod;
        while let Some(id) = self.rx_idle.pop() {
            let req = RxRequest {
                id,
                gref: self.rx_grefs[usize::from(id)],
            };
            self.write_entry(
                slot_offset(self.rx_prod, RX_RING_SIZE, RX_ENTRY) + RX_RING,
                &req.encode(),
            );
            self.rx_out[usize::from(id)] = true;
            self.rx_prod = self.rx_prod.wrapping_add(1);
        }
        self.publish(RX_RING, old, self.rx_prod);
    }

    /// Asks the backend to notify the event channel at its next receive
    /// response (`rsp_event` one past what we consumed, as
    /// `RING_FINAL_CHECK_FOR_RESPONSES`), before the core blocks on it.
    /// Returns whether responses are already waiting — then the core must
    /// not block: the backend may have produced them before it could see
    /// the request.
    pub fn arm_rx(&mut self) -> bool {
        if self.dead {
            return false;
        }
        self.index(RX_RING, RSP_EVENT)
            .store(self.rx_cons.wrapping_add(1), Ordering::Relaxed);
        // The store must be visible before rsp_prod is read again.
        fence(Ordering::SeqCst);
        self.index(RX_RING, RSP_PROD).load(Ordering::Acquire) != self.rx_cons
    }

    /// Responses ready on `ring` given our consumer index and the
    /// requests made; a count beyond either is the backend misbehaving.
    fn ready(&mut self, ring: usize, cons: u32, prod: u32, size: u32) -> u32 {
        // Acquire: the entries are read after the index that covers them.
        let rsp_prod = self.index(ring, RSP_PROD).load(Ordering::Acquire);
        match responses_ready(rsp_prod, cons, size) {
            Ok(n) if n <= prod.wrapping_sub(cons) => n,
            _ => {
                self.dead = true;
                self.stats.ring_errors += 1;
                0
            }
        }
    }
}

impl<X: XenIo> Nic for Netfront<X> {
    fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn arm(&mut self) -> bool {
        self.arm_rx()
    }

    fn rx_batch(&mut self, pool: &mut PacketPool, out: &mut Vec<Packet>, max: usize) {
        if self.dead {
            return;
        }
        let n = self.ready(RX_RING, self.rx_cons, self.rx_prod, RX_RING_SIZE);
        for _ in 0..n.min(max as u32) {
            let off = RX_RING + slot_offset(self.rx_cons, RX_RING_SIZE, RX_ENTRY);
            let rsp = RxResponse::decode(&self.read_entry::<RX_ENTRY>(off));
            self.rx_cons = self.rx_cons.wrapping_add(1);
            let id = usize::from(rsp.id);
            if !self.rx_out.get(id).copied().unwrap_or(false) {
                self.stats.ring_errors += 1;
                continue;
            }
            self.rx_out[id] = false;
            self.rx_idle.push(rsp.id);
            let frame = match rsp.frame(PAGE, NETRXF_DATA_VALIDATED) {
                Ok(Some((o, len))) if (MIN_FRAME..=MAX_FRAME).contains(&len) => (o, len),
                Ok(_) => {
                    self.stats.rx_errors += 1;
                    continue;
                }
                Err(_) => {
                    self.stats.ring_errors += 1;
                    continue;
                }
            };
            let Some(mut buf) = pool.alloc() else {
                self.stats.rx_errors += 1;
                continue;
            };
            let (o, len) = frame;
            let src = RX_PAGES + id * PAGE + o;
            // SAFETY: `o + len <= PAGE` (checked by `frame`), so the bytes
            // lie in receive page `id` inside the region. The backend may
            // still write the page (it keeps the grant); what is copied is
            // what the firewall judges, and the copy is ours alone.
            let bytes =
                unsafe { core::slice::from_raw_parts(self.mem.ptr().as_ptr().add(src), len) };
            pool.frame_room(&mut buf)[..len].copy_from_slice(bytes);
            self.stats.rx_packets += 1;
            self.stats.rx_bytes += len as u64;
            out.push(Packet { buf, len });
        }
    }

    fn tx_batch(&mut self, pool: &mut PacketPool, batch: &mut Vec<Packet>) {
        if self.dead {
            // A dead device sends nothing: drop (counted) rather than
            // queue forever.
            self.stats.tx_errors += batch.len() as u64;
            for p in batch.drain(..) {
                pool.free(p.buf);
            }
            return;
        }
        let old = self.tx_prod;
        let mut sent = 0;
        for p in batch.iter_mut() {
            let in_ring = self.tx_prod.wrapping_sub(self.tx_cons);
            if in_ring >= TX_RING_SIZE {
                break;
            }
            let Some(id) = self.tx_free.pop() else { break };
            let len = self.fill_tx_slot(id, pool.frame(p));
            let slot = usize::from(id) * TX_SLOT;
            let req = TxRequest {
                gref: self.tx_grefs[slot / PAGE],
                offset: (slot % PAGE) as u16,
                flags: 0, // complete checksums, one slot
                id,
                size: len as u16,
            };
            self.write_entry(
                TX_RING + slot_offset(self.tx_prod, TX_RING_SIZE, TX_ENTRY),
                &req.encode(),
            );
            self.tx_out[usize::from(id)] = true;
            self.tx_prod = self.tx_prod.wrapping_add(1);
            self.stats.tx_packets += 1;
            self.stats.tx_bytes += len as u64;
            sent += 1;
        }
        if sent < batch.len() {
            self.stats.tx_ring_full += 1;
        }
        for p in batch.drain(..sent) {
            pool.free(p.buf);
        }
        self.publish(TX_RING, old, self.tx_prod);
    }

    fn maintain(&mut self, _pool: &mut PacketPool) {
        if self.dead {
            return;
        }
        let n = self.ready(TX_RING, self.tx_cons, self.tx_prod, TX_RING_SIZE);
        for _ in 0..n {
            let off = TX_RING + slot_offset(self.tx_cons, TX_RING_SIZE, TX_ENTRY);
            let rsp = TxResponse::decode(&self.read_entry::<4>(off));
            self.tx_cons = self.tx_cons.wrapping_add(1);
            let id = usize::from(rsp.id);
            if !self.tx_out.get(id).copied().unwrap_or(false) {
                self.stats.ring_errors += 1;
                continue;
            }
            self.tx_out[id] = false;
            self.tx_free.push(rsp.id);
            if rsp.status != NETIF_RSP_OKAY {
                self.stats.tx_errors += 1;
            }
        }
        self.post_rx();
    }

    fn stats(&self) -> NicStats {
        self.stats
    }
}

#[cfg(test)]
mod tests;
