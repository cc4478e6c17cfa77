//! Packet buffers: fixed-size slots in one DMA region.
//!
//! A `BufId` is the right to use one slot: it cannot be copied or made
//! outside this crate, so a slot is either free in the pool, owned by the
//! code holding its id, or in flight in a device ring. Every frame starts
//! `HEADROOM` bytes into its slot, which leaves room for the virtio-net
//! header in front of it and lets a received buffer be transmitted on
//! another NIC without moving the frame.

use alloc::vec::Vec;

use crate::DmaRegion;

/// Bytes per buffer slot.
pub const BUF_SIZE: usize = 2048;
/// Offset of the frame inside a slot.
pub const HEADROOM: usize = 64;
/// Largest frame a slot holds.
pub const MAX_FRAME: usize = BUF_SIZE - HEADROOM;

/// The right to one buffer slot.
#[derive(Debug, PartialEq, Eq)]
pub struct BufId(u16);

impl BufId {
    pub fn index(&self) -> usize {
        usize::from(self.0)
    }
}

/// A frame in a buffer: `len` bytes at `HEADROOM`.
#[derive(Debug, PartialEq, Eq)]
pub struct Packet {
    pub buf: BufId,
    pub len: usize,
}

#[derive(Debug)]
pub struct PacketPool {
    region: DmaRegion,
    count: usize,
    free: Vec<BufId>,
}

impl PacketPool {
    /// Cuts `region` into `BUF_SIZE` slots (at most 65536).
    pub fn new(region: DmaRegion) -> Self {
        let count = (region.len() / BUF_SIZE).min(1 << 16);
        let free = (0..count).rev().map(|i| BufId(i as u16)).collect();
        Self {
            region,
            count,
            free,
        }
    }

    pub fn capacity(&self) -> usize {
        self.count
    }

    pub fn available(&self) -> usize {
        self.free.len()
    }

    pub fn alloc(&mut self) -> Option<BufId> {
        self.free.pop()
    }

    pub fn free(&mut self, b: BufId) {
        self.free.push(b);
    }

    /// Physical address of the slot's first byte.
    pub fn paddr(&self, b: &BufId) -> u64 {
        self.region.paddr() + (b.index() * BUF_SIZE) as u64
    }

    /// The whole slot.
    pub fn slot_mut(&mut self, b: &BufId) -> &mut [u8] {
        debug_assert!(b.index() < self.count);
        // SAFETY: the index is below `count`, so the slot lies inside the
        // region, which this pool owns alone (`DmaRegion::new`'s contract).
        // Holding `b` means no device ring holds this slot, and `&mut self`
        // means no other slice of the pool is alive.
        unsafe {
            core::slice::from_raw_parts_mut(
                self.region.ptr().as_ptr().add(b.index() * BUF_SIZE),
                BUF_SIZE,
            )
        }
    }

    /// Room for a frame: everything after the headroom.
    pub fn frame_room(&mut self, b: &BufId) -> &mut [u8] {
        &mut self.slot_mut(b)[HEADROOM..]
    }

    /// The frame of `p`.
    pub fn frame(&mut self, p: &Packet) -> &mut [u8] {
        let len = p.len.min(MAX_FRAME);
        &mut self.frame_room(&p.buf)[..len]
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use core::ptr::NonNull;

    /// Heap memory standing in for DMA memory; physical = virtual.
    pub(crate) fn region(len: usize) -> (Vec<u64>, DmaRegion) {
        let mut mem = alloc::vec![0u64; len.div_ceil(8) + 512];
        let base = mem.as_mut_ptr() as usize;
        let aligned = (base + 4095) & !4095;
        let ptr = NonNull::new(aligned as *mut u8).unwrap();
        // SAFETY: `mem` is kept alive by the caller for the region's life,
        // and the aligned range lies inside it.
        (mem, unsafe { DmaRegion::new(ptr, aligned as u64, len) })
    }

    #[test]
    fn slots_are_disjoint_and_recycled() {
        let (_mem, r) = region(4 * BUF_SIZE);
        let mut pool = PacketPool::new(r);
        assert_eq!(pool.capacity(), 4);
        let a = pool.alloc().unwrap();
        let b = pool.alloc().unwrap();
        pool.frame_room(&a).fill(0xaa);
        pool.frame_room(&b).fill(0xbb);
        assert!(pool.slot_mut(&a)[HEADROOM..].iter().all(|&x| x == 0xaa));
        assert_eq!(pool.paddr(&b) - pool.paddr(&a), BUF_SIZE as u64);
        pool.free(a);
        assert_eq!(pool.available(), 3);
        let p = Packet {
            buf: pool.alloc().unwrap(),
            len: 5000,
        };
        assert_eq!(
            pool.frame(&p).len(),
            MAX_FRAME,
            "lengths are clamped to the slot"
        );
    }
}
