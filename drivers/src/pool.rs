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
///
/// A pool owns a range of slots: the whole memory, or, after `split`, one
/// core's share. A buffer of another pool's range freed here (a packet
/// another core received and this one transmitted) is set aside as
/// *foreign*, for the caller to send back to its owner (`take_foreign`,
/// `owner`), so every pool keeps its own buffers.
#[derive(Debug)]
pub struct PacketPool {
    memory: &'static PacketMemory,
    free: Vec<BufId>,
    /// This pool's slots: `first..first + span`.
    first: usize,
    span: usize,
    /// Slots per pool of the split (the last pool may have more).
    share: usize,
    pools: usize,
    foreign: Vec<BufId>,
}

impl PacketPool {
    /// Cuts `region` into `BUF_SIZE` slots (at most 65536). The slots are
    /// kept for the kernel's life.
    pub fn new(region: DmaRegion) -> Self {
        let count = (region.len() / BUF_SIZE).min(1 << 16);
        let free = (0..count).rev().map(|i| BufId(i as u16)).collect();
        let memory = Box::leak(Box::new(PacketMemory { region, count }));
        Self {
            memory,
            free,
            first: 0,
            span: count,
            share: count.max(1),
            pools: 1,
            foreign: Vec::new(),
        }
    }

    /// Splits the pool into `parts` pools (at least one, at most one per
    /// slot) over the same memory, each owning a contiguous share of the
    /// slots (the last one the remainder). Free buffers go to their
    /// owner; buffers in use return to their owner when freed.
    pub fn split(self, parts: usize) -> Vec<PacketPool> {
        let count = self.memory.count;
        let parts = parts.clamp(1, count.max(1));
        let share = (count / parts).max(1);
        let mut pools: Vec<PacketPool> = (0..parts)
            .map(|k| {
                let first = k * share;
                let span = if k + 1 == parts { count - first } else { share };
                PacketPool {
                    memory: self.memory,
                    free: Vec::with_capacity(span),
                    first,
                    span,
                    share,
                    pools: parts,
                    foreign: Vec::new(),
                }
            })
            .collect();
        for b in self.free.into_iter().chain(self.foreign) {
            let owner = (b.index() / share).min(parts - 1);
            pools[owner].free.push(b);
        }
        pools
    }

    /// The pool (of the split this pool belongs to) that owns `b`.
    pub fn owner(&self, b: &BufId) -> usize {
        (b.index() / self.share).min(self.pools - 1)
    }

    /// Whether `b` belongs to this pool.
    pub fn owns(&self, b: &BufId) -> bool {
        b.index().wrapping_sub(self.first) < self.span
    }

    /// Moves the foreign buffers freed here into `out`.
    pub fn take_foreign(&mut self, out: &mut Vec<BufId>) {
        out.append(&mut self.foreign);
    }

    /// Slots this pool owns.
    pub fn owned_slots(&self) -> usize {
        self.span
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

    /// Returns `b` to the free list, or sets it aside for its owner.
    pub fn free(&mut self, b: BufId) {
        if self.owns(&b) {
            self.free.push(b);
        } else {
            self.foreign.push(b);
        }
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

    /// Split pools own disjoint shares that cover the memory; a buffer
    /// freed on another pool is set aside for its owner, and once handed
    /// back it is allocated by its owner again.
    #[test]
    fn split_pools_keep_their_own_buffers() {
        let (_mem, r) = region(10 * BUF_SIZE);
        let mut whole = PacketPool::new(r);
        let held = whole.alloc().unwrap();
        let mut pools = whole.split(3);
        assert_eq!(
            pools.iter().map(|p| p.owned_slots()).collect::<Vec<_>>(),
            [3, 3, 4]
        );
        assert_eq!(pools.iter().map(|p| p.available()).sum::<usize>(), 9);
        let mut taken: Vec<Vec<BufId>> = Vec::new();
        for (k, p) in pools.iter_mut().enumerate() {
            let mut mine = Vec::new();
            while let Some(b) = p.alloc() {
                assert!(p.owns(&b));
                assert_eq!(p.owner(&b), k);
                mine.push(b);
            }
            taken.push(mine);
        }
        // The buffer held across the split belongs to the pool whose
        // share holds its slot.
        let owner = pools[0].owner(&held);
        assert!(pools[owner].owns(&held));
        // Pool 0 frees pool 2's buffers: set aside, not reused by pool 0.
        for b in taken.pop().unwrap() {
            pools[0].free(b);
        }
        assert_eq!(pools[0].available(), 0);
        let mut back = Vec::new();
        pools[0].take_foreign(&mut back);
        assert_eq!(back.len(), 4);
        for b in back {
            assert_eq!(pools[0].owner(&b), 2);
            pools[2].free(b);
        }
        assert_eq!(pools[2].available(), 4);
        assert!(pools[2].alloc().is_some_and(|b| pools[2].owns(&b)));
        // More parts than slots: one slot each, at most.
        let (_m2, r2) = region(2 * BUF_SIZE);
        assert_eq!(PacketPool::new(r2).split(5).len(), 2);
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
