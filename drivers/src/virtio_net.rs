//! virtio-net (virtio 1.x, section 5.1) with our own split queues.
//!
//! The `virtio-drivers` crate supplies the transport — PCI capability
//! discovery, feature and status registers, queue addresses, notification
//! and configuration space — through its `Transport` trait. The queues are
//! ours (`virtqueue`): they publish one batch with one notification check
//! and validate what the device writes. (`virtio-drivers`' own net driver
//! notifies per packet and compares event indices without wraparound, which
//! stalls a long-running forwarder.)
//!
//! Features: `VERSION_1` (required) and `MAC`; with more than one queue
//! pair asked for, `CTRL_VQ` and `MQ`: the driver sets up that many
//! receive/transmit pairs (at most what the device offers) and tells the
//! device with `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET` on the control queue (a
//! chain: the command, then the byte the device answers in). Until then
//! the device uses pair 0 only. No offloads yet, so frames are at most
//! 1514 bytes and carry complete checksums; a 12-byte `virtio_net_hdr`
//! precedes each frame in its buffer.
//!
//! Receiving polls every pair's queue, starting one further each batch;
//! transmitting uses pair 0 (one core owns the device: the host's tap then
//! steers the flows it has seen leave on pair 0 back to it). Or, for the
//! `rtc` layout, `into_queues` splits the device into one `VirtioQueue`
//! per pair, each driven by its own core through the queues' own
//! doorbells.

use alloc::vec::Vec;

use virtio_drivers::transport::{DeviceStatus, Transport};

use crate::pool::{BufId, Packet, PacketPool, HEADROOM, MAX_FRAME};
use crate::virtqueue::{ring_bytes, QueueError, SplitQueue, UsedError};
use crate::{DmaRegion, Nic, NicStats};

const FEATURE_MAC: u64 = 1 << 5;
const FEATURE_CTRL_VQ: u64 = 1 << 17;
const FEATURE_MQ: u64 = 1 << 22;
const FEATURE_VERSION_1: u64 = 1 << 32;
/// `virtio_net_hdr` with `num_buffers` (always present with VERSION_1).
pub const NET_HDR: usize = 12;
/// Ring entries per queue, at most.
pub const QUEUE_SIZE: u16 = 256;
/// Configuration space: `max_virtqueue_pairs` (with `MQ`).
const CONFIG_MAX_PAIRS: usize = 8;
/// Control queue: class `MQ`, command `VQ_PAIRS_SET`, answer `OK`.
const CTRL_MQ: u8 = 4;
const CTRL_MQ_VQ_PAIRS_SET: u8 = 0;
const CTRL_OK: u8 = 0;
/// Entries of the control queue.
const CTRL_QUEUE_SIZE: u16 = 8;
/// Where the control command's answer byte lies in its buffer.
const CTRL_ACK: usize = 8;
/// Polls of the control queue before a command counts as unanswered
/// (QEMU answers during the notification itself).
const CTRL_POLLS: u32 = if cfg!(test) { 10_000 } else { 50_000_000 };

/// Why a device could not be brought up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetError {
    /// The device does not offer VIRTIO_F_VERSION_1 (a legacy-only device).
    NotModern,
    /// The device did not accept the features (FEATURES_OK cleared).
    FeaturesRefused,
    /// A queue is missing or could not be set up.
    Queue(u16, Option<QueueError>),
    /// The MAC or the queue-pair count could not be read from
    /// configuration space, or the count is impossible.
    Config,
    /// The device refused or did not answer the control command setting
    /// the number of queue pairs (its answer, if any).
    Control(Option<u8>),
}

/// A queue's notification register, written directly: one store, where
/// the transport's `notify` first selects the queue and reads its offset
/// (two more device accesses, each a VM exit under virtualisation); and
/// usable from whichever core owns the queue.
pub struct Doorbell(core::ptr::NonNull<u16>);

// SAFETY: the register is device memory, not shared Rust data; whoever
// holds the doorbell of a queue is the only one to ring it.
unsafe impl Send for Doorbell {}

impl Doorbell {
    /// # Safety
    ///
    /// `reg` must be the mapped, 2-aligned notification register of the
    /// queue this doorbell will be used for, for as long as it lives.
    pub unsafe fn new(reg: core::ptr::NonNull<u16>) -> Self {
        Self(reg)
    }

    fn ring(&self, queue: u16) {
        // SAFETY: a mapped device register (`new`'s contract); writing the
        // queue's index to it is the notification (virtio 4.1.5.2).
        unsafe { self.0.as_ptr().write_volatile(queue.to_le()) }
    }
}

/// What the driver needs from the platform: ring memory, and each queue's
/// doorbell when the platform can find it.
pub trait Platform {
    /// `bytes` of zeroed DMA memory.
    fn dma(&mut self, bytes: usize) -> DmaRegion;
    /// The doorbell of queue `queue`, or `None` to notify through the
    /// transport.
    fn doorbell(&mut self, queue: u16) -> Option<Doorbell>;
}

/// One receive/transmit queue pair.
struct Pair {
    rx: SplitQueue,
    tx: SplitQueue,
    /// Doorbells of the receive and transmit queues.
    bells: (Option<Doorbell>, Option<Doorbell>),
    /// Frames received on this pair.
    rx_packets: u64,
}

impl Pair {
    /// Takes up to `max - *taken` received frames into `out`.
    fn receive(
        &mut self,
        stats: &mut NicStats,
        pool: &mut PacketPool,
        out: &mut Vec<Packet>,
        max: usize,
        taken: &mut usize,
    ) {
        while *taken < max {
            match self.rx.pop_used() {
                None => break,
                Some(Ok((buf, written))) => {
                    let written = written as usize;
                    if written < NET_HDR || written - NET_HDR > MAX_FRAME {
                        stats.rx_errors += 1;
                        pool.free(buf);
                    } else {
                        let len = written - NET_HDR;
                        stats.rx_packets += 1;
                        stats.rx_bytes += len as u64;
                        self.rx_packets += 1;
                        out.push(Packet { buf, len });
                    }
                    *taken += 1;
                }
                Some(Err(UsedError::BadLength { buf, .. })) => {
                    stats.ring_errors += 1;
                    pool.free(buf);
                }
                Some(Err(_)) => stats.ring_errors += 1,
            }
        }
    }

    /// Queues what fits of `batch` on the transmit queue; whether the
    /// device must be notified.
    fn transmit(
        &mut self,
        stats: &mut NicStats,
        pool: &mut PacketPool,
        batch: &mut Vec<Packet>,
    ) -> bool {
        let tx = &mut self.tx;
        let room = tx.free_slots().min(batch.len());
        if room < batch.len() {
            stats.tx_ring_full += 1;
        }
        for mut p in batch.drain(..room) {
            let len = p.len.min(MAX_FRAME);
            // The header sits right before the frame: all zero, no offloads.
            pool.slot(&mut p.buf)[HEADROOM - NET_HDR..HEADROOM].fill(0);
            let addr = pool.paddr(&p.buf) + (HEADROOM - NET_HDR) as u64;
            match tx.push(p.buf, addr, (NET_HDR + len) as u32, false) {
                Ok(()) => {
                    stats.tx_packets += 1;
                    stats.tx_bytes += len as u64;
                }
                // Not reached: `room` free descriptors were counted above.
                Err(buf) => pool.free(buf),
            }
        }
        tx.publish()
    }

    /// Takes back transmitted buffers and refills the receive queue;
    /// whether the device must be notified of new receive buffers.
    fn replenish(&mut self, stats: &mut NicStats, pool: &mut PacketPool) -> bool {
        while let Some(done) = self.tx.pop_used() {
            match done {
                Ok((buf, _)) | Err(UsedError::BadLength { buf, .. }) => pool.free(buf),
                Err(_) => stats.ring_errors += 1,
            }
        }
        while self.rx.free_slots() > 0 {
            let Some(buf) = pool.alloc() else { break };
            let addr = pool.paddr(&buf) + (HEADROOM - NET_HDR) as u64;
            if let Err(buf) = self.rx.push(buf, addr, (NET_HDR + MAX_FRAME) as u32, true) {
                pool.free(buf);
                break;
            }
        }
        self.rx.publish()
    }
}

pub struct VirtioNet<T: Transport> {
    transport: T,
    mac: [u8; 6],
    pairs: Vec<Pair>,
    /// The pair the next receive batch starts with.
    next_rx: usize,
    /// What the device offers (`max_virtqueue_pairs`, 1 without `MQ`).
    offered_pairs: u16,
    stats: NicStats,
}

impl<T: Transport> VirtioNet<T> {
    /// Initialises the device (virtio 3.1.1) with up to `want_pairs`
    /// receive/transmit queue pairs (at least one), with ring memory and
    /// doorbells from `platform`.
    pub fn new(
        mut transport: T,
        want_pairs: u16,
        platform: &mut dyn Platform,
    ) -> Result<Self, NetError> {
        transport.set_status(DeviceStatus::empty());
        transport.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
        let offered = transport.read_device_features();
        if offered & FEATURE_VERSION_1 == 0 {
            transport.set_status(DeviceStatus::FAILED);
            return Err(NetError::NotModern);
        }
        let mq = want_pairs > 1
            && offered & (FEATURE_CTRL_VQ | FEATURE_MQ) == FEATURE_CTRL_VQ | FEATURE_MQ;
        let mut wanted = FEATURE_VERSION_1 | FEATURE_MAC;
        if mq {
            wanted |= FEATURE_CTRL_VQ | FEATURE_MQ;
        }
        transport.write_driver_features(offered & wanted);
        let features_ok =
            DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK;
        transport.set_status(features_ok);
        if !transport.get_status().contains(DeviceStatus::FEATURES_OK) {
            transport.set_status(DeviceStatus::FAILED);
            return Err(NetError::FeaturesRefused);
        }
        let fail = |t: &mut T, e| {
            t.set_status(DeviceStatus::FAILED);
            Err(e)
        };
        // Without MQ the device has one pair (and this driver no control
        // queue); with it, `max_virtqueue_pairs` (1..=0x8000, virtio 5.1.4).
        let offered_pairs = if mq {
            match transport.read_config_space::<u16>(CONFIG_MAX_PAIRS) {
                Ok(n) if (1..=0x8000).contains(&n) => n,
                _ => return fail(&mut transport, NetError::Config),
            }
        } else {
            1
        };
        let n = want_pairs.clamp(1, offered_pairs);
        let mut pairs = Vec::with_capacity(usize::from(n));
        for i in 0..n {
            let made = Self::queue(&mut transport, 2 * i, platform).and_then(|rx| {
                Self::queue(&mut transport, 2 * i + 1, platform).map(|tx| Pair {
                    rx,
                    tx,
                    bells: (platform.doorbell(2 * i), platform.doorbell(2 * i + 1)),
                    rx_packets: 0,
                })
            });
            match made {
                Ok(p) => pairs.push(p),
                Err(e) => return fail(&mut transport, e),
            }
        }
        // The control queue comes after every pair the device offers.
        let ctrl = if mq {
            match Self::queue_sized(&mut transport, 2 * offered_pairs, CTRL_QUEUE_SIZE, platform) {
                Ok(q) => Some(q),
                Err(e) => return fail(&mut transport, e),
            }
        } else {
            None
        };
        let mac = if offered & FEATURE_MAC != 0 {
            match transport.read_config_space::<[u8; 6]>(0) {
                Ok(m) => m,
                Err(_) => return fail(&mut transport, NetError::Config),
            }
        } else {
            // No MAC from the device: a fixed locally administered one.
            [0x02, 0, 0, 0, 0, 0x01]
        };
        transport.set_status(features_ok | DeviceStatus::DRIVER_OK);
        if let Some(mut ctrl) = ctrl {
            let queue = 2 * offered_pairs;
            if let Err(e) = Self::set_pairs(&mut transport, &mut ctrl, queue, n, platform) {
                return fail(&mut transport, e);
            }
        }
        Ok(Self {
            transport,
            mac,
            pairs,
            next_rx: 0,
            offered_pairs,
            stats: NicStats::default(),
        })
    }

    /// Sends `VQ_PAIRS_SET(n)` on the control queue and waits for the
    /// device's answer.
    fn set_pairs(
        transport: &mut T,
        ctrl: &mut SplitQueue,
        queue: u16,
        n: u16,
        platform: &mut dyn Platform,
    ) -> Result<(), NetError> {
        let mem = platform.dma(CTRL_ACK + 1);
        let cmd = mem.ptr().as_ptr();
        let [lo, hi] = n.to_le_bytes();
        // SAFETY: `mem` is ours and at least CTRL_ACK + 1 bytes; the device
        // sees it only once the chain is published below. The answer byte
        // starts at a value that is not OK.
        unsafe {
            for (i, b) in [CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, lo, hi]
                .into_iter()
                .enumerate()
            {
                cmd.add(i).write_volatile(b);
            }
            cmd.add(CTRL_ACK).write_volatile(!CTRL_OK);
        }
        let parts = [
            (mem.paddr(), 4, false),
            (mem.paddr() + CTRL_ACK as u64, 1, true),
        ];
        if ctrl.push_chain(BufId::token(0), &parts).is_err() {
            return Err(NetError::Control(None));
        }
        ctrl.publish();
        transport.notify(queue);
        for _ in 0..CTRL_POLLS {
            match ctrl.pop_used() {
                None => core::hint::spin_loop(),
                Some(Ok((_, 1))) => {
                    // SAFETY: as above; the device has finished with it.
                    let ack = unsafe { cmd.add(CTRL_ACK).read_volatile() };
                    return if ack == CTRL_OK {
                        Ok(())
                    } else {
                        Err(NetError::Control(Some(ack)))
                    };
                }
                Some(_) => return Err(NetError::Control(None)),
            }
        }
        Err(NetError::Control(None))
    }

    fn queue(
        transport: &mut T,
        index: u16,
        platform: &mut dyn Platform,
    ) -> Result<SplitQueue, NetError> {
        Self::queue_sized(transport, index, QUEUE_SIZE, platform)
    }

    fn queue_sized(
        transport: &mut T,
        index: u16,
        most: u16,
        platform: &mut dyn Platform,
    ) -> Result<SplitQueue, NetError> {
        let max = transport.max_queue_size(index);
        if max == 0 {
            return Err(NetError::Queue(index, None));
        }
        // The largest power of two the device allows, up to `most`.
        let cap = max.min(u32::from(most));
        let size = 1u16 << (31 - cap.leading_zeros());
        let q = SplitQueue::new(platform.dma(ring_bytes(size)), size)
            .map_err(|e| NetError::Queue(index, Some(e)))?;
        transport.queue_set(
            index,
            u32::from(size),
            q.desc_paddr(),
            q.avail_paddr(),
            q.used_paddr(),
        );
        Ok(q)
    }

    /// Notifies queue `queue` through `bell`, or the transport without one.
    fn notify(transport: &mut T, stats: &mut NicStats, bell: &Option<Doorbell>, queue: u16) {
        match bell {
            Some(b) => b.ring(queue),
            None => transport.notify(queue),
        }
        stats.notifications += 1;
    }

    /// Buffers the receive rings hold.
    pub fn rx_posted(&self) -> usize {
        self.pairs.iter().map(|p| p.rx.in_flight()).sum()
    }

    /// Data queues notified through their own doorbell.
    pub fn doorbells(&self) -> usize {
        self.pairs
            .iter()
            .map(|p| usize::from(p.bells.0.is_some()) + usize::from(p.bells.1.is_some()))
            .sum()
    }

    /// Queue pairs in use, and how many the device offers.
    pub fn queue_pairs(&self) -> (usize, u16) {
        (self.pairs.len(), self.offered_pairs)
    }

    /// One handle per queue pair, each a `Nic` of its own for the core
    /// that will own that pair (the `rtc` layout); the device itself
    /// stays set up for the kernel's life (dropping its transport would
    /// reset it). Needs every queue's own doorbell, since the handles
    /// cannot share the transport: without them the device comes back.
    pub fn into_queues(self) -> Result<Vec<VirtioQueue>, Self> {
        if self.doorbells() != 2 * self.pairs.len() {
            return Err(self);
        }
        let Self {
            transport,
            mac,
            pairs,
            stats,
            ..
        } = self;
        core::mem::forget(transport);
        Ok(pairs
            .into_iter()
            .enumerate()
            .map(|(i, pair)| VirtioQueue {
                mac,
                pair,
                index: i as u16,
                // The set-up's counts (control notifications) stay with
                // the first pair.
                stats: if i == 0 { stats } else { NicStats::default() },
            })
            .collect())
    }
}

/// One receive/transmit pair of a virtio-net device, driven on its own by
/// the core that owns it (`VirtioNet::into_queues`).
pub struct VirtioQueue {
    mac: [u8; 6],
    pair: Pair,
    /// The pair's number: its queues are `2 * index` and `2 * index + 1`.
    index: u16,
    stats: NicStats,
}

// SAFETY: the queue's rings and doorbells are device memory that only this
// handle touches (`into_queues` hands each pair to exactly one handle), so
// moving the handle to another core moves the only access with it.
unsafe impl Send for VirtioQueue {}

impl VirtioQueue {
    /// The pair's number.
    pub fn index(&self) -> u16 {
        self.index
    }

    fn ring(bell: &Option<Doorbell>, queue: u16, stats: &mut NicStats) {
        if let Some(b) = bell {
            b.ring(queue);
            stats.notifications += 1;
        }
    }
}

impl Nic for VirtioQueue {
    fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn rx_batch(&mut self, pool: &mut PacketPool, out: &mut Vec<Packet>, max: usize) {
        let mut taken = 0;
        self.pair
            .receive(&mut self.stats, pool, out, max, &mut taken);
    }

    fn tx_batch(&mut self, pool: &mut PacketPool, batch: &mut Vec<Packet>) {
        if self.pair.transmit(&mut self.stats, pool, batch) {
            Self::ring(&self.pair.bells.1, 2 * self.index + 1, &mut self.stats);
        }
    }

    fn maintain(&mut self, pool: &mut PacketPool) {
        if self.pair.replenish(&mut self.stats, pool) {
            Self::ring(&self.pair.bells.0, 2 * self.index, &mut self.stats);
        }
    }

    fn stats(&self) -> NicStats {
        self.stats
    }

    fn rx_queues(&self) -> Vec<u64> {
        alloc::vec![self.pair.rx_packets]
    }
}

impl<T: Transport> Nic for VirtioNet<T> {
    fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn rx_batch(&mut self, pool: &mut PacketPool, out: &mut Vec<Packet>, max: usize) {
        let n = self.pairs.len();
        let first = self.next_rx % n;
        self.next_rx = first + 1;
        let mut taken = 0;
        for k in 0..n {
            self.pairs[(first + k) % n].receive(&mut self.stats, pool, out, max, &mut taken);
        }
    }

    fn tx_batch(&mut self, pool: &mut PacketPool, batch: &mut Vec<Packet>) {
        let pair = &mut self.pairs[0];
        if pair.transmit(&mut self.stats, pool, batch) {
            Self::notify(&mut self.transport, &mut self.stats, &pair.bells.1, 1);
        }
    }

    fn maintain(&mut self, pool: &mut PacketPool) {
        for i in 0..self.pairs.len() {
            let pair = &mut self.pairs[i];
            if pair.replenish(&mut self.stats, pool) {
                Self::notify(
                    &mut self.transport,
                    &mut self.stats,
                    &pair.bells.0,
                    2 * i as u16,
                );
            }
        }
    }

    fn stats(&self) -> NicStats {
        self.stats
    }

    fn rx_queues(&self) -> Vec<u64> {
        self.pairs.iter().map(|p| p.rx_packets).collect()
    }
}

#[cfg(test)]
mod tests;
