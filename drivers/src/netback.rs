//! Xen netback (`public/io/netif.h`, backend side): the half of a client
//! VM's virtual NIC that a Qubes firewall VM serves. The client's netfront
//! owns the two shared rings and the pages its frames live in; we map its
//! ring pages and move frames with grant copies (`GNTTABOP_copy`, batched):
//! what the client transmits (its TX requests) is copied into our packet
//! pool and becomes frames we *receive*; what we transmit to the client is
//! copied into the pages it posted (its RX requests). No page of the
//! client's is ever mapped into the packet path, and no pool buffer is
//! ever granted to it.
//!
//! Everything the client writes is hostile input: a request index more than
//! a ring ahead of what we consumed makes the connection *dead* (nothing
//! more is read; the kernel disconnects the client); a transmit request
//! with flags we did not offer (scatter-gather, extra info), a size outside
//! an Ethernet frame, a frame crossing its page, or a grant the hypervisor
//! refuses to copy gets an error response and is counted (`rx_errors`),
//! never followed. Ids are the client's business: they are echoed back.
//!
//! Checksums: a client's TCP and UDP frames may come with the transport
//! checksum left for the backend to fill (`NETTXF_csum_blank`, what Linux
//! netfront does for every such frame: it offers checksum offload
//! unconditionally). Those are completed here, before the firewall sees
//! them (`netstack::wire::complete_checksum`, with the firewall's
//! word-at-a-time sum); one that cannot be completed (not plain IPv4/IPv6
//! TCP or UDP, or truncated) goes on as it is and fails the firewall's
//! checksum check.
//!
//! Notifications: we poll both rings; after publishing responses we
//! notify the client only when its `rsp_event` lies within what we
//! published (behind a full fence, as `RING_PUSH_RESPONSES_AND_CHECK_NOTIFY`).

use alloc::vec::Vec;
use core::sync::atomic::{fence, AtomicU32, Ordering};

use netstack::wire::complete_checksum;
use xen_shim::netif::*;

use crate::pool::{BufId, Packet, PacketPool, HEADROOM, MAX_FRAME};
use crate::{DmaRegion, Nic, NicStats};

/// Shortest frame accepted from a client (an Ethernet header).
const MIN_FRAME: usize = 14;
/// The client's TX ring page and RX ring page, mapped one after the other.
const TX_RING: usize = 0;
const RX_RING: usize = PAGE;
/// Bytes of the mapping the driver needs.
pub const RINGS_BYTES: usize = 2 * PAGE;
/// Requests taken per batch at most (one copy hypercall each way).
const BATCH: usize = 64;

/// Requests of one frame at most (Linux netback's
/// `XEN_NETBK_LEGACY_SLOTS_MAX`): a longer chain is the client breaking
/// the protocol.
const MAX_SLOTS: usize = 18;

/// One frame of a receive batch: the ids of its requests (each gets a
/// response), our buffer (none: refused), whether its transport checksum
/// is blank, and how many of the batch's copies fill it.
struct Taken {
    ids: [u16; MAX_SLOTS],
    slots: usize,
    buf: Option<BufId>,
    blank: bool,
    ops: usize,
}

/// The bytes the first request of a chain carries — the frame's length
/// (its size) less the later pieces — once the chain is checked for a
/// backend that took no extra info (GSO): a frame of `MIN_FRAME..=MAX_FRAME`
/// bytes, later pieces no longer than it, every piece inside its granted
/// page. `None` to refuse it. The later requests carry their own sizes.
fn first_piece(chain: &[TxRequest]) -> Option<usize> {
    let total = usize::from(chain.first()?.size);
    if !(MIN_FRAME..=MAX_FRAME).contains(&total) {
        return None;
    }
    let rest: usize = chain[1..].iter().map(|r| usize::from(r.size)).sum();
    let first = total.checked_sub(rest)?;
    let fits = chain.iter().enumerate().all(|(i, r)| {
        let len = if i == 0 { first } else { usize::from(r.size) };
        r.flags & NETTXF_EXTRA_INFO == 0 && usize::from(r.offset) + len <= PAGE
    });
    fits.then_some(first)
}

/// Which way a grant copy goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the client's granted page into our memory.
    FromClient,
    /// From our memory into the client's granted page.
    ToClient,
}

/// One grant copy between a page the client granted (`gref`, at
/// `offset`) and our memory at `paddr`; `ok` says whether it happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantCopy {
    pub dir: Direction,
    pub gref: u32,
    pub offset: u16,
    pub paddr: u64,
    pub len: u16,
    pub ok: bool,
}

/// What the driver needs from Xen.
pub trait BackIo {
    /// Performs every copy (one hypercall for the batch), setting `ok` on
    /// each that the hypervisor carried out.
    fn copy(&mut self, ops: &mut [GrantCopy]);
    /// Sends an event to the client.
    fn notify(&mut self);
}

pub struct Netback<B: BackIo> {
    io: B,
    /// The client's two ring pages, mapped.
    rings: DmaRegion,
    mac: [u8; 6],
    tx_req_cons: u32,
    tx_rsp_prod: u32,
    rx_req_cons: u32,
    rx_rsp_prod: u32,
    dead: bool,
    ops: Vec<GrantCopy>,
    /// Per frame of a receive batch: its requests, buffer and copies.
    taken: Vec<Taken>,
    stats: NicStats,
}

impl<B: BackIo> Netback<B> {
    /// Serves the client whose TX and RX ring pages are mapped, in that
    /// order, at `rings` (at least `RINGS_BYTES`; the client initialised
    /// them). `mac` is our side's address (the client's gateway).
    /// A connecting client's rings are fresh (`SHARED_RING_INIT`: every
    /// index 0), so both sides start at 0.
    pub fn new(io: B, rings: DmaRegion, mac: [u8; 6]) -> Option<Self> {
        if rings.len() < RINGS_BYTES {
            return None;
        }
        let nb = Self {
            io,
            rings,
            mac,
            tx_req_cons: 0,
            tx_rsp_prod: 0,
            rx_req_cons: 0,
            rx_rsp_prod: 0,
            dead: false,
            ops: Vec::with_capacity(BATCH),
            taken: Vec::with_capacity(BATCH),
            stats: NicStats::default(),
        };
        Some(nb)
    }

    /// Whether the client broke the ring protocol (nothing more is read;
    /// the kernel disconnects it).
    pub fn is_dead(&self) -> bool {
        self.dead
    }

    /// The Xen side (its event channel, for the kernel).
    pub fn io(&self) -> &B {
        &self.io
    }

    /// Gives back the parts (to unmap the rings).
    pub fn into_parts(self) -> (B, DmaRegion) {
        (self.io, self.rings)
    }

    fn index(&self, ring: usize, field: usize) -> &AtomicU32 {
        self.rings.index_at(ring + field)
    }

    fn read_entry<const N: usize>(&self, off: usize) -> [u8; N] {
        self.rings.read_shared(off)
    }

    fn write_entry(&self, off: usize, bytes: &[u8]) {
        self.rings.write_shared(off, bytes)
    }

    /// Requests the client published on `ring` beyond `cons`, at most
    /// `max`; a runaway index kills the connection.
    fn requests(&mut self, ring: usize, cons: u32, size: u32, max: usize) -> u32 {
        // Acquire: the client's request entries are visible once its
        // producer index is.
        let prod = self.index(ring, REQ_PROD).load(Ordering::Acquire);
        match requests_ready(prod, cons, size) {
            Ok(n) => n.min(max as u32),
            Err(_) => {
                self.dead = true;
                self.stats.ring_errors += 1;
                0
            }
        }
    }

    /// Publishes responses up to `new` on `ring` and notifies the client
    /// if it asked.
    fn publish(&mut self, ring: usize, old: u32, new: u32) {
        if old == new {
            return;
        }
        // Release: the response entries are visible before the index.
        self.index(ring, RSP_PROD).store(new, Ordering::Release);
        // The client's event index is read after the producer is
        // published (RING_PUSH_RESPONSES_AND_CHECK_NOTIFY's mb()).
        fence(Ordering::SeqCst);
        let event = self.index(ring, RSP_EVENT).load(Ordering::Relaxed);
        if need_notify(old, new, event) {
            self.io.notify();
            self.stats.notifications += 1;
        }
    }

    fn tx_respond(&mut self, id: u16, status: i16) {
        let off = slot_offset(self.tx_rsp_prod, TX_RING_SIZE, TX_ENTRY);
        self.write_entry(TX_RING + off, &TxResponse { id, status }.encode());
        self.tx_rsp_prod = self.tx_rsp_prod.wrapping_add(1);
    }

    /// Asks the client to notify us of its next transmit request; whether
    /// one is already waiting.
    pub fn arm_tx(&mut self) -> bool {
        self.index(TX_RING, REQ_EVENT)
            .store(self.tx_req_cons.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::SeqCst);
        self.index(TX_RING, REQ_PROD).load(Ordering::Acquire) != self.tx_req_cons
    }
}

impl<B: BackIo> Nic for Netback<B> {
    fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The client's transmitted frames: copied into pool buffers, every
    /// request answered (OKAY, or ERROR for a frame refused). A frame may
    /// span several requests (`NETTXF_more_data`, as Linux netfront sends
    /// a frame whose bytes cross a page even without scatter-gather); a
    /// chain not yet wholly published waits for the next batch. With
    /// fewer free buffers than `max`, only as many frames are taken: the
    /// rest wait in the client's ring (their requests unanswered) rather
    /// than being refused, whatever the other clients hold.
    fn rx_batch(&mut self, pool: &mut PacketPool, out: &mut Vec<Packet>, max: usize) {
        if self.dead {
            return;
        }
        let max = max.min(pool.available());
        let avail = self.requests(
            TX_RING,
            self.tx_req_cons,
            TX_RING_SIZE,
            TX_RING_SIZE as usize,
        );
        self.ops.clear();
        self.taken.clear();
        let old = self.tx_rsp_prod;
        let mut used = 0u32;
        let zero = TxRequest {
            gref: 0,
            offset: 0,
            flags: 0,
            id: 0,
            size: 0,
        };
        'frames: while used < avail && self.taken.len() < max.min(BATCH) {
            let mut chain = [zero; MAX_SLOTS];
            let mut n = 0;
            loop {
                if used + n as u32 >= avail {
                    break 'frames;
                }
                let at = self.tx_req_cons.wrapping_add(used + n as u32);
                let off = slot_offset(at, TX_RING_SIZE, TX_ENTRY);
                chain[n] = TxRequest::decode(&self.read_entry(TX_RING + off));
                n += 1;
                if chain[n - 1].flags & NETTXF_MORE_DATA == 0 {
                    break;
                }
                if n == MAX_SLOTS {
                    // Linux netback's rule: a longer chain is fatal.
                    self.dead = true;
                    self.stats.ring_errors += 1;
                    break 'frames;
                }
            }
            used += n as u32;
            let chain = &chain[..n];
            let mut taken = Taken {
                ids: [0; MAX_SLOTS],
                slots: n,
                buf: None,
                blank: chain[0].flags & NETTXF_CSUM_BLANK != 0,
                ops: 0,
            };
            for (i, r) in chain.iter().enumerate() {
                taken.ids[i] = r.id;
            }
            let first = first_piece(chain);
            match (first, first.and_then(|_| pool.alloc())) {
                (Some(first), Some(buf)) => {
                    let base = pool.paddr(&buf) + HEADROOM as u64;
                    let mut pos = 0;
                    for (i, r) in chain.iter().enumerate() {
                        let len = if i == 0 { first } else { usize::from(r.size) };
                        if len > 0 {
                            self.ops.push(GrantCopy {
                                dir: Direction::FromClient,
                                gref: r.gref,
                                offset: r.offset,
                                paddr: base + pos as u64,
                                len: len as u16,
                                ok: false,
                            });
                            taken.ops += 1;
                        }
                        pos += len;
                    }
                    taken.buf = Some(buf);
                }
                _ => self.stats.rx_errors += 1,
            }
            self.taken.push(taken);
        }
        self.tx_req_cons = self.tx_req_cons.wrapping_add(used);
        if !self.ops.is_empty() {
            self.io.copy(&mut self.ops);
        }
        let mut op = 0;
        for k in 0..self.taken.len() {
            let t = &mut self.taken[k];
            let (buf, ops, blank, slots, ids) = (t.buf.take(), t.ops, t.blank, t.slots, t.ids);
            let copied = &self.ops[op..op + ops];
            op += ops;
            let status = match buf {
                Some(mut buf) if copied.iter().all(|c| c.ok) => {
                    let len: usize = copied.iter().map(|c| usize::from(c.len)).sum();
                    if blank {
                        if let Some(f) = pool.frame_room(&mut buf).get_mut(..len) {
                            complete_checksum(f);
                        }
                    }
                    self.stats.rx_packets += 1;
                    self.stats.rx_bytes += len as u64;
                    out.push(Packet { buf, len });
                    NETIF_RSP_OKAY
                }
                Some(buf) => {
                    self.stats.rx_errors += 1;
                    pool.free(buf);
                    NETIF_RSP_ERROR
                }
                None => NETIF_RSP_ERROR,
            };
            for &id in &ids[..slots] {
                self.tx_respond(id, status);
            }
        }
        self.taken.clear();
        let new = self.tx_rsp_prod;
        self.publish(TX_RING, old, new);
    }

    /// Frames for the client: each copied into a page the client posted
    /// (one RX request each); without a posted page a frame waits in
    /// `batch`.
    fn tx_batch(&mut self, pool: &mut PacketPool, batch: &mut Vec<Packet>) {
        if self.dead {
            for p in batch.drain(..) {
                self.stats.tx_errors += 1;
                pool.free(p.buf);
            }
            return;
        }
        let n = self.requests(
            RX_RING,
            self.rx_req_cons,
            RX_RING_SIZE,
            batch.len().min(BATCH),
        );
        if (n as usize) < batch.len() {
            self.stats.tx_ring_full += 1;
        }
        self.ops.clear();
        let mut ids: [u16; BATCH] = [0; BATCH];
        for (i, p) in batch.iter().take(n as usize).enumerate() {
            let off = slot_offset(self.rx_req_cons, RX_RING_SIZE, RX_ENTRY);
            let req = RxRequest::decode(&self.read_entry(RX_RING + off));
            self.rx_req_cons = self.rx_req_cons.wrapping_add(1);
            ids[i] = req.id;
            self.ops.push(GrantCopy {
                dir: Direction::ToClient,
                gref: req.gref,
                offset: 0,
                paddr: pool.paddr(&p.buf) + HEADROOM as u64,
                len: p.len.min(MAX_FRAME) as u16,
                ok: false,
            });
        }
        if !self.ops.is_empty() {
            self.io.copy(&mut self.ops);
        }
        let old = self.rx_rsp_prod;
        for (i, p) in batch.drain(..n as usize).enumerate() {
            let copy = self.ops[i];
            let status = if copy.ok {
                self.stats.tx_packets += 1;
                self.stats.tx_bytes += u64::from(copy.len);
                copy.len as i16
            } else {
                self.stats.tx_errors += 1;
                NETIF_RSP_ERROR
            };
            let rsp = RxResponse {
                id: ids[i],
                offset: 0,
                flags: 0,
                status,
            };
            let off = slot_offset(self.rx_rsp_prod, RX_RING_SIZE, RX_ENTRY);
            self.write_entry(RX_RING + off, &rsp.encode());
            self.rx_rsp_prod = self.rx_rsp_prod.wrapping_add(1);
            pool.free(p.buf);
        }
        let new = self.rx_rsp_prod;
        self.publish(RX_RING, old, new);
    }

    fn maintain(&mut self, _pool: &mut PacketPool) {}

    fn stats(&self) -> NicStats {
        self.stats
    }

    fn arm(&mut self) -> bool {
        !self.dead && self.arm_tx()
    }
}

#[cfg(test)]
mod tests;
