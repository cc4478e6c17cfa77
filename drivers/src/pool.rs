//! Packet buffers: fixed-size slots in one DMA region.
//!
//! A `BufId` is the right to use one slot: it cannot be copied or made
//! outside this crate, so a slot is either free in the pool, owned by the
//! code holding its id, or in flight in a device ring. Every frame starts
//! `HEADROOM` bytes into its slot, which leaves room for the virtio-net
//! header in front of it and lets a received buffer be transmitted on
//! another NIC without moving the frame.

use alloc::boxed::Box;
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

    /// A token for a queue whose buffers are not the pool's (the virtio
    /// control queue): it names no pool slot and must never be freed.
    pub(crate) const fn token(n: u16) -> Self {
        Self(n)
    }
}

/// A frame in a buffer: `len` bytes at `HEADROOM`.
#[derive(Debug, PartialEq, Eq)]
pub struct Packet {
    pub buf: BufId,
    pub len: usize,
}

/// The buffer slots themselves, shareable between cores: a slot is reached
/// only through `&mut BufId`, and there is one `BufId` per slot, so two
/// cores never reach the same slot at once.
#[derive(Debug)]
pub struct PacketMemory {
    region: DmaRegion,
    count: usize,
}

// SAFETY: the region is only accessed through `slot`, which needs the
// slot's unique `BufId` borrowed mutably; DMA memory has no thread affinity.
unsafe impl Sync for PacketMemory {}
// SAFETY: as above.
unsafe impl Send for PacketMemory {}

impl PacketMemory {
    /// Physical address of the slot's first byte.
    pub fn paddr(&self, b: &BufId) -> u64 {
        self.region.paddr() + (b.index() * BUF_SIZE) as u64
    }

    /// The whole slot.
    pub fn slot<'a>(&'a self, b: &'a mut BufId) -> &'a mut [u8] {
        assert!(b.index() < self.count, "a BufId of another pool");
        // SAFETY: the index is below `count`, so the slot lies inside the
        // region, which this memory owns alone (`DmaRegion::new`'s
        // contract). `b` is the slot's only id and is borrowed mutably for
        // the slice's life, so no other slice of this slot exists, and no
        // device ring holds the slot while its id is outside the ring.
        unsafe {
            core::slice::from_raw_parts_mut(
                self.region.ptr().as_ptr().add(b.index() * BUF_SIZE),
                BUF_SIZE,
            )
        }
    }

    /// Room for a frame: everything after the headroom.
    pub fn frame_room<'a>(&'a self, b: &'a mut BufId) -> &'a mut [u8] {
        &mut self.slot(b)[HEADROOM..]
    }

    /// The frame of `p`.
    pub fn frame<'a>(&'a self, p: &'a mut Packet) -> &'a mut [u8] {
        let len = p.len.min(MAX_FRAME);
        &mut self.frame_room(&mut p.buf)[..len]
    }
}

/// The free list over a `PacketMemory`; owned by one core.
#[derive(Debug)]
pub struct PacketPool {
    memory: &'static PacketMemory,
    free: Vec<BufId>,
}

impl PacketPool {
    /// Cuts `region` into `BUF_SIZE` slots (at most 65536). The slots are
    /// kept for the kernel's life.
    pub fn new(region: DmaRegion) -> Self {
        let count = (region.len() / BUF_SIZE).min(1 << 16);
        let free = (0..count).rev().map(|i| BufId(i as u16)).collect();
        let memory = Box::leak(Box::new(PacketMemory { region, count }));
        Self { memory, free }
    }

    /// The slots, for a core that holds buffers but not the free list.
    pub fn memory(&self) -> &'static PacketMemory {
        self.memory
    }

    pub fn capacity(&self) -> usize {
        self.memory.count
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

    pub fn paddr(&self, b: &BufId) -> u64 {
        self.memory.paddr(b)
    }

    pub fn slot<'a>(&self, b: &'a mut BufId) -> &'a mut [u8] {
        self.memory.slot(b)
    }

    pub fn frame_room<'a>(&self, b: &'a mut BufId) -> &'a mut [u8] {
        self.memory.frame_room(b)
    }

    pub fn frame<'a>(&self, p: &'a mut Packet) -> &'a mut [u8] {
        self.memory.frame(p)
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
        let mut a = pool.alloc().unwrap();
        let mut b = pool.alloc().unwrap();
        pool.frame_room(&mut a).fill(0xaa);
        pool.frame_room(&mut b).fill(0xbb);
        assert!(pool.slot(&mut a)[HEADROOM..].iter().all(|&x| x == 0xaa));
        assert_eq!(pool.paddr(&b) - pool.paddr(&a), BUF_SIZE as u64);
        pool.free(a);
        assert_eq!(pool.available(), 3);
        let mut p = Packet {
            buf: pool.alloc().unwrap(),
            len: 5000,
        };
        assert_eq!(
            pool.frame(&mut p).len(),
            MAX_FRAME,
            "lengths are clamped to the slot"
        );
    }
}
