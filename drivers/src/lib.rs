//! NIC drivers behind one batch interface.
//!
//! This crate owns the network devices Portcullis drives — virtio-net over
//! PCI, Xen netfront and Xen netback — behind the `Nic` trait, which
//! moves *batches* of packet buffers and notifies the device once per batch,
//! never once per packet. Buffers come from a preallocated `PacketPool` in
//! DMA memory and travel between NICs without copies.
//!
//! Memory shared with a device is never a Rust reference: the split
//! virtqueue (`virtqueue`) reads and writes it through raw pointers with
//! volatile and atomic accesses, and checks every index and length the
//! device writes before using it. The kernel supplies the DMA memory
//! (`DmaRegion`, whose constructor is `unsafe`) and the PCI transport; host
//! tests supply heap memory and play the device. Drivers own no policy:
//! what happens to a frame is the firewall stage's decision.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod netback;
pub mod netfront;
pub mod pool;
pub mod spsc;
pub mod virtio_net;
pub mod virtqueue;

use alloc::vec::Vec;
use core::ptr::NonNull;

pub use pool::{BufId, Packet, PacketPool};

/// Memory a device may read and write by physical address.
#[derive(Debug)]
pub struct DmaRegion {
    vaddr: NonNull<u8>,
    paddr: u64,
    len: usize,
}

impl DmaRegion {
    /// # Safety
    ///
    /// `vaddr` must point to `len` bytes of memory that nothing else uses
    /// for as long as the region (and whatever it is given to) lives, that
    /// the device sees at physical address `paddr`, and that is aligned to
    /// 4096 bytes.
    pub unsafe fn new(vaddr: NonNull<u8>, paddr: u64, len: usize) -> Self {
        Self { vaddr, paddr, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn paddr(&self) -> u64 {
        self.paddr
    }

    pub(crate) fn ptr(&self) -> NonNull<u8> {
        self.vaddr
    }

    /// The 4-aligned word at `off`, as an atomic: a ring index that another
    /// domain (or the device) changes concurrently.
    pub(crate) fn index_at(&self, off: usize) -> &core::sync::atomic::AtomicU32 {
        assert!(
            off.is_multiple_of(4) && off + 4 <= self.len,
            "an index inside the region"
        );
        // SAFETY: in bounds and aligned (checked; the region is page
        // aligned); the other side writes it concurrently, hence atomics.
        unsafe { core::sync::atomic::AtomicU32::from_ptr(self.vaddr.as_ptr().add(off) as *mut u32) }
    }

    /// `N` bytes at `off`, read volatile (a ring entry the other side
    /// wrote; it may change under us, so callers check what they read).
    pub(crate) fn read_shared<const N: usize>(&self, off: usize) -> [u8; N] {
        debug_assert!(off + N <= self.len);
        let mut out = [0u8; N];
        // SAFETY: callers pass ring slots (`slot_offset`) inside the
        // region; volatile, the other side writes them.
        unsafe {
            let p = self.vaddr.as_ptr().add(off);
            for (i, b) in out.iter_mut().enumerate() {
                *b = p.add(i).read_volatile();
            }
        }
        out
    }

    /// Writes `bytes` at `off`, volatile (a ring entry the other side
    /// reads once an index published with release covers it).
    pub(crate) fn write_shared(&self, off: usize, bytes: &[u8]) {
        debug_assert!(off + bytes.len() <= self.len);
        // SAFETY: as `read_shared`.
        unsafe {
            let p = self.vaddr.as_ptr().add(off);
            for (i, b) in bytes.iter().enumerate() {
                p.add(i).write_volatile(*b);
            }
        }
    }
}

/// Counters a NIC keeps about itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NicStats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Frames the device returned with impossible lengths.
    pub rx_errors: u64,
    /// Times a batch found the TX ring full (the rest waits in the batch).
    pub tx_ring_full: u64,
    /// Device-written ring entries that failed validation.
    pub ring_errors: u64,
    /// Frames the device reported it could not send, or that were dropped
    /// because it stopped working.
    pub tx_errors: u64,
    /// Notifications sent to the device.
    pub notifications: u64,
}

impl core::ops::AddAssign for NicStats {
    /// Adds another device's counters (a reconnected device's totals).
    fn add_assign(&mut self, o: Self) {
        self.rx_packets += o.rx_packets;
        self.rx_bytes += o.rx_bytes;
        self.tx_packets += o.tx_packets;
        self.tx_bytes += o.tx_bytes;
        self.rx_errors += o.rx_errors;
        self.tx_ring_full += o.tx_ring_full;
        self.ring_errors += o.ring_errors;
        self.tx_errors += o.tx_errors;
        self.notifications += o.notifications;
    }
}

/// A network device that moves batches of packets.
pub trait Nic {
    fn mac(&self) -> [u8; 6];

    /// Appends received frames to `out`, at most `max` of them. Buffers
    /// the device returned with impossible lengths go back to `pool`.
    fn rx_batch(&mut self, pool: &mut PacketPool, out: &mut Vec<Packet>, max: usize);

    /// Queues packets from the front of `batch` for transmission and
    /// notifies the device at most once. Packets that do not fit the ring
    /// stay in `batch` for the next call.
    fn tx_batch(&mut self, pool: &mut PacketPool, batch: &mut Vec<Packet>);

    /// Returns transmitted buffers to the pool and gives the device fresh
    /// receive buffers.
    fn maintain(&mut self, pool: &mut PacketPool);

    fn stats(&self) -> NicStats;

    /// Before the core blocks until this device signals (Xen netfront's
    /// event channel): asks the device to signal its next received frame,
    /// and returns whether frames are already waiting (then the core must
    /// not block). Devices that do not wake a blocked core return false.
    fn arm(&mut self) -> bool {
        false
    }

    /// Frames received per receive queue, for devices with several
    /// (empty otherwise).
    fn rx_queues(&self) -> Vec<u64> {
        Vec::new()
    }

    /// Who may send on this port. `None`: a network is behind it, and the
    /// firewall binds each client to the port it first appears on. A Xen
    /// netback vif serves one client VM: its addresses as dom0 wrote them
    /// (none while no client is connected), with a number that changes
    /// whenever they do, for the loop to apply (`Firewall::assign_port`).
    fn assigned(&self) -> Option<(u64, &[core::net::IpAddr])> {
        None
    }
}
