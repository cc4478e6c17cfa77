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
//! Features: `VERSION_1` (required) and `MAC`. No offloads yet, so frames
//! are at most 1514 bytes and carry complete checksums; a 12-byte
//! `virtio_net_hdr` precedes each frame in its buffer.

use alloc::vec::Vec;

use virtio_drivers::transport::{DeviceStatus, Transport};

use crate::pool::{Packet, PacketPool, HEADROOM, MAX_FRAME};
use crate::virtqueue::{QueueError, SplitQueue, UsedError};
use crate::{DmaRegion, Nic, NicStats};

const FEATURE_MAC: u64 = 1 << 5;
const FEATURE_VERSION_1: u64 = 1 << 32;
/// `virtio_net_hdr` with `num_buffers` (always present with VERSION_1).
pub const NET_HDR: usize = 12;
const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
/// Ring entries per queue, at most.
pub const QUEUE_SIZE: u16 = 256;

/// Why a device could not be brought up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetError {
    /// The device does not offer VIRTIO_F_VERSION_1 (a legacy-only device).
    NotModern,
    /// The device did not accept the features (FEATURES_OK cleared).
    FeaturesRefused,
    /// A queue is missing or could not be set up.
    Queue(u16, Option<QueueError>),
    /// The MAC could not be read from configuration space.
    Config,
}

pub struct VirtioNet<T: Transport> {
    transport: T,
    mac: [u8; 6],
    rx: SplitQueue,
    tx: SplitQueue,
    stats: NicStats,
}

impl<T: Transport> VirtioNet<T> {
    /// Initialises the device (virtio 3.1.1) with one receive and one
    /// transmit queue in `rx_mem` and `tx_mem`.
    pub fn new(mut transport: T, rx_mem: DmaRegion, tx_mem: DmaRegion) -> Result<Self, NetError> {
        transport.set_status(DeviceStatus::empty());
        transport.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
        let offered = transport.read_device_features();
        if offered & FEATURE_VERSION_1 == 0 {
            transport.set_status(DeviceStatus::FAILED);
            return Err(NetError::NotModern);
        }
        transport.write_driver_features(offered & (FEATURE_VERSION_1 | FEATURE_MAC));
        let features_ok =
            DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK;
        transport.set_status(features_ok);
        if !transport.get_status().contains(DeviceStatus::FEATURES_OK) {
            transport.set_status(DeviceStatus::FAILED);
            return Err(NetError::FeaturesRefused);
        }
        let rx = Self::queue(&mut transport, RX_QUEUE, rx_mem)?;
        let tx = Self::queue(&mut transport, TX_QUEUE, tx_mem)?;
        let mac = if offered & FEATURE_MAC != 0 {
            transport
                .read_config_space::<[u8; 6]>(0)
                .map_err(|_| NetError::Config)?
        } else {
            // No MAC from the device: a fixed locally administered one.
            [0x02, 0, 0, 0, 0, 0x01]
        };
        transport.set_status(features_ok | DeviceStatus::DRIVER_OK);
        Ok(Self {
            transport,
            mac,
            rx,
            tx,
            stats: NicStats::default(),
        })
    }

    fn queue(transport: &mut T, index: u16, mem: DmaRegion) -> Result<SplitQueue, NetError> {
        let max = transport.max_queue_size(index);
        if max == 0 {
            return Err(NetError::Queue(index, None));
        }
        // The largest power of two the device allows, up to QUEUE_SIZE.
        let cap = max.min(u32::from(QUEUE_SIZE));
        let size = 1u16 << (31 - cap.leading_zeros());
        let q = SplitQueue::new(mem, size).map_err(|e| NetError::Queue(index, Some(e)))?;
        transport.queue_set(
            index,
            u32::from(size),
            q.desc_paddr(),
            q.avail_paddr(),
            q.used_paddr(),
        );
        Ok(q)
    }

    fn notify(&mut self, queue: u16) {
        self.transport.notify(queue);
        self.stats.notifications += 1;
    }

    /// Buffers the receive ring holds.
    pub fn rx_posted(&self) -> usize {
        self.rx.in_flight()
    }
}

impl<T: Transport> Nic for VirtioNet<T> {
    fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn rx_batch(&mut self, pool: &mut PacketPool, out: &mut Vec<Packet>, max: usize) {
        let mut taken = 0;
        while taken < max {
            match self.rx.pop_used() {
                None => break,
                Some(Ok((buf, written))) => {
                    let written = written as usize;
                    if written < NET_HDR || written - NET_HDR > MAX_FRAME {
                        self.stats.rx_errors += 1;
                        pool.free(buf);
                    } else {
                        let len = written - NET_HDR;
                        self.stats.rx_packets += 1;
                        self.stats.rx_bytes += len as u64;
                        out.push(Packet { buf, len });
                    }
                    taken += 1;
                }
                Some(Err(UsedError::BadLength { buf, .. })) => {
                    self.stats.ring_errors += 1;
                    pool.free(buf);
                }
                Some(Err(_)) => self.stats.ring_errors += 1,
            }
        }
    }

    fn tx_batch(&mut self, pool: &mut PacketPool, batch: &mut Vec<Packet>) {
        let room = self.tx.free_slots().min(batch.len());
        if room < batch.len() {
            self.stats.tx_ring_full += 1;
        }
        for mut p in batch.drain(..room) {
            let len = p.len.min(MAX_FRAME);
            // The header sits right before the frame: all zero, no offloads.
            pool.slot(&mut p.buf)[HEADROOM - NET_HDR..HEADROOM].fill(0);
            let addr = pool.paddr(&p.buf) + (HEADROOM - NET_HDR) as u64;
            match self.tx.push(p.buf, addr, (NET_HDR + len) as u32, false) {
                Ok(()) => {
                    self.stats.tx_packets += 1;
                    self.stats.tx_bytes += len as u64;
                }
                // Not reached: `room` free descriptors were counted above.
                Err(buf) => pool.free(buf),
            }
        }
        if self.tx.publish() {
            self.notify(TX_QUEUE);
        }
    }

    fn maintain(&mut self, pool: &mut PacketPool) {
        while let Some(done) = self.tx.pop_used() {
            match done {
                Ok((buf, _)) | Err(UsedError::BadLength { buf, .. }) => pool.free(buf),
                Err(_) => self.stats.ring_errors += 1,
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
        if self.rx.publish() {
            self.notify(RX_QUEUE);
        }
    }

    fn stats(&self) -> NicStats {
        self.stats
    }
}

#[cfg(test)]
mod tests;
