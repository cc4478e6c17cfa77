//! A single-producer single-consumer ring of packet handles, for joining
//! the stages that run on different cores (NIC core → firewall core → TX).
//!
//! Both sides move *batches*: the producer writes any number of slots and
//! publishes them with one release store of `tail`; the consumer reads what
//! `tail` covers and frees the slots with one release store of `head`. The
//! two indices live on separate cache lines, and each side keeps a cached
//! copy of the other's index, so in the common case a batch costs one
//! shared-line read per side. `Producer` and `Consumer` are the only ways
//! in; neither can be cloned, which is what makes the single-producer,
//! single-consumer reasoning below hold.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::cell::UnsafeCell;
use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicUsize, Ordering};

#[repr(align(64))]
struct CacheLine(AtomicUsize);

struct Ring<T> {
    /// Next slot the consumer reads (written by the consumer only).
    head: CacheLine,
    /// Next slot the producer writes (written by the producer only).
    tail: CacheLine,
    mask: usize,
    slots: Box<[UnsafeCell<MaybeUninit<T>>]>,
}

// SAFETY: a slot is accessed by the producer only between `head` and
// `head + capacity` (not yet published) and by the consumer only between
// `head` and `tail` (published, not yet freed); the release/acquire pairs
// on `tail` and `head` order each slot's write before its read and its read
// before its reuse. `T: Send` because values cross threads.
unsafe impl<T: Send> Sync for Ring<T> {}

/// The writing end.
pub struct Producer<T: 'static> {
    ring: &'static Ring<T>,
    tail: usize,
    /// Last `head` seen; refreshed only when the ring looks full.
    head_cache: usize,
}

/// The reading end.
pub struct Consumer<T: 'static> {
    ring: &'static Ring<T>,
    head: usize,
    /// Last `tail` seen; refreshed only when it covers less than a batch.
    tail_cache: usize,
}

// SAFETY: each end is used by one thread at a time (it is not Clone and its
// methods take `&mut self`); the ring it points to is Sync.
unsafe impl<T: Send> Send for Producer<T> {}
// SAFETY: as for `Producer`.
unsafe impl<T: Send> Send for Consumer<T> {}

/// A ring of `capacity` (a power of two, at least 2) slots, allocated once
/// and kept for the kernel's life.
pub fn ring<T: Send>(capacity: usize) -> (Producer<T>, Consumer<T>) {
    assert!(
        capacity.is_power_of_two() && capacity >= 2,
        "ring capacity must be a power of two"
    );
    let slots: Vec<UnsafeCell<MaybeUninit<T>>> = (0..capacity)
        .map(|_| UnsafeCell::new(MaybeUninit::uninit()))
        .collect();
    let ring: &'static Ring<T> = Box::leak(Box::new(Ring {
        head: CacheLine(AtomicUsize::new(0)),
        tail: CacheLine(AtomicUsize::new(0)),
        mask: capacity - 1,
        slots: slots.into_boxed_slice(),
    }));
    (
        Producer {
            ring,
            tail: 0,
            head_cache: 0,
        },
        Consumer {
            ring,
            head: 0,
            tail_cache: 0,
        },
    )
}

impl<T: Send> Producer<T> {
    /// Slots free for writing, refreshing the view of the consumer's
    /// progress only when needed.
    fn room(&mut self, wanted: usize) -> usize {
        let cap = self.ring.mask + 1;
        let mut free = cap - self.tail.wrapping_sub(self.head_cache);
        if free < wanted {
            // Acquire: the consumer's reads of these slots happened before
            // it released them, so they may be overwritten now.
            self.head_cache = self.ring.head.0.load(Ordering::Acquire);
            free = cap - self.tail.wrapping_sub(self.head_cache);
        }
        free
    }

    /// Moves items from the front of `items` into the ring, as many as fit,
    /// and publishes them with one store. Returns how many moved.
    pub fn push_batch(&mut self, items: &mut Vec<T>) -> usize {
        let n = self.room(items.len()).min(items.len());
        for (i, item) in items.drain(..n).enumerate() {
            let slot = &self.ring.slots[self.tail.wrapping_add(i) & self.ring.mask];
            // SAFETY: the slot is between head and head + capacity, free
            // (see `room`), and only this producer writes free slots.
            unsafe { (*slot.get()).write(item) };
        }
        if n > 0 {
            self.tail = self.tail.wrapping_add(n);
            // Release: the slot writes above are visible before the new
            // tail that publishes them.
            self.ring.tail.0.store(self.tail, Ordering::Release);
        }
        n
    }

    /// Pushes one item; gives it back if the ring is full.
    pub fn push(&mut self, item: T) -> Result<(), T> {
        if self.room(1) == 0 {
            return Err(item);
        }
        let slot = &self.ring.slots[self.tail & self.ring.mask];
        // SAFETY: as in `push_batch`.
        unsafe { (*slot.get()).write(item) };
        self.tail = self.tail.wrapping_add(1);
        // Release: as in `push_batch`.
        self.ring.tail.0.store(self.tail, Ordering::Release);
        Ok(())
    }
}

impl<T: Send> Consumer<T> {
    /// Moves up to `max` items into `out` and frees their slots with one
    /// store. Returns how many moved.
    pub fn pop_batch(&mut self, out: &mut Vec<T>, max: usize) -> usize {
        let mut ready = self.tail_cache.wrapping_sub(self.head);
        if ready < max {
            // Acquire: the producer's slot writes are visible once its
            // tail store is.
            self.tail_cache = self.ring.tail.0.load(Ordering::Acquire);
            ready = self.tail_cache.wrapping_sub(self.head);
        }
        let n = ready.min(max);
        for i in 0..n {
            let slot = &self.ring.slots[self.head.wrapping_add(i) & self.ring.mask];
            // SAFETY: the slot is between head and tail: written and
            // published by the producer, read once here, then freed below.
            out.push(unsafe { (*slot.get()).assume_init_read() });
        }
        if n > 0 {
            self.head = self.head.wrapping_add(n);
            // Release: the reads above finish before the producer may reuse
            // the slots.
            self.ring.head.0.store(self.head, Ordering::Release);
        }
        n
    }

    /// Items waiting, as last seen.
    pub fn len(&mut self) -> usize {
        self.tail_cache = self.ring.tail.0.load(Ordering::Acquire);
        self.tail_cache.wrapping_sub(self.head)
    }

    pub fn is_empty(&mut self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_in_order_and_full_ring_refuses() {
        let (mut p, mut c) = ring::<u32>(4);
        let mut items = alloc::vec![1, 2, 3, 4, 5, 6];
        assert_eq!(p.push_batch(&mut items), 4);
        assert_eq!(items, [5, 6]);
        assert_eq!(p.push(7), Err(7));
        let mut out = Vec::new();
        assert_eq!(c.pop_batch(&mut out, 3), 3);
        assert_eq!(out, [1, 2, 3]);
        assert_eq!(p.push_batch(&mut items), 2);
        out.clear();
        assert_eq!(c.pop_batch(&mut out, 10), 3);
        assert_eq!(out, [4, 5, 6]);
        assert!(c.is_empty());
    }

    #[test]
    fn indices_wrap_without_loss() {
        let (mut p, mut c) = ring::<usize>(8);
        let mut out = Vec::new();
        for i in 0..100_000 {
            p.push(i).unwrap();
            out.clear();
            c.pop_batch(&mut out, 8);
            assert_eq!(out, [i]);
        }
    }

    #[test]
    fn two_threads_move_every_item_once_in_order() {
        const N: u64 = 2_000_000;
        let (mut p, mut c) = ring::<u64>(256);
        let producer = std::thread::spawn(move || {
            let mut batch = Vec::with_capacity(32);
            let mut next = 0;
            while next < N {
                while batch.len() < 32 && next < N {
                    batch.push(next);
                    next += 1;
                }
                while !batch.is_empty() {
                    if p.push_batch(&mut batch) == 0 {
                        std::hint::spin_loop();
                    }
                }
            }
        });
        let mut expected = 0;
        let mut out = Vec::with_capacity(64);
        while expected < N {
            out.clear();
            c.pop_batch(&mut out, 64);
            for v in &out {
                assert_eq!(*v, expected);
                expected += 1;
            }
        }
        producer.join().unwrap();
    }
}
