//! The driver side against a device played by the test.

use super::*;
use crate::pool::tests::region;
use crate::pool::{PacketPool, BUF_SIZE};

/// The device's view: reads the available ring, writes the used ring.
pub(crate) struct FakeDevice {
    base: *mut u8,
    size: u16,
    next_avail: u16,
    used_idx: u16,
}

impl FakeDevice {
    fn new(q: &SplitQueue) -> Self {
        Self::at(q.desc_paddr(), q.size())
    }
    /// A device for the queue whose rings start at `desc` (host memory).
    pub(crate) fn at(desc: u64, size: u16) -> Self {
        Self {
            base: desc as *mut u8,
            size,
            next_avail: 0,
            used_idx: 0,
        }
    }
    fn rd16(&self, off: usize) -> u16 {
        // SAFETY: test memory, inside the ring layout.
        unsafe { (self.base.add(off) as *const u16).read_volatile() }
    }
    pub(crate) fn wr16(&self, off: usize, v: u16) {
        // SAFETY: as above.
        unsafe { (self.base.add(off) as *mut u16).write_volatile(v) }
    }
    fn wr32(&self, off: usize, v: u32) {
        // SAFETY: as above.
        unsafe { (self.base.add(off) as *mut u32).write_volatile(v) }
    }
    fn avail_off(&self) -> usize {
        16 * usize::from(self.size)
    }
    pub(crate) fn used_off(&self) -> usize {
        align4(16 * usize::from(self.size) + 6 + 2 * usize::from(self.size))
    }
    /// Takes every newly available descriptor: (id, addr, len, flags).
    pub(crate) fn take(&mut self) -> Vec<(u16, u64, u32, u16)> {
        let mut out = Vec::new();
        let idx = self.rd16(self.avail_off() + 2);
        while self.next_avail != idx {
            let slot = usize::from(self.next_avail & (self.size - 1));
            let d = self.rd16(self.avail_off() + 4 + 2 * slot);
            let off = 16 * usize::from(d);
            // SAFETY: test memory, inside the descriptor table.
            let (addr, len, flags) = unsafe {
                (
                    (self.base.add(off) as *const u64).read_volatile(),
                    (self.base.add(off + 8) as *const u32).read_volatile(),
                    (self.base.add(off + 12) as *const u16).read_volatile(),
                )
            };
            out.push((d, addr, len, flags));
            self.next_avail = self.next_avail.wrapping_add(1);
        }
        out
    }
    /// The descriptors of the chain starting at `head`, following the
    /// links: (addr, len, flags).
    pub(crate) fn chain(&self, head: u16) -> Vec<(u64, u32, u16)> {
        let mut out = Vec::new();
        let mut d = head;
        loop {
            let off = 16 * usize::from(d);
            // SAFETY: test memory, inside the descriptor table.
            let (addr, len, flags, next) = unsafe {
                (
                    (self.base.add(off) as *const u64).read_volatile(),
                    (self.base.add(off + 8) as *const u32).read_volatile(),
                    (self.base.add(off + 12) as *const u16).read_volatile(),
                    (self.base.add(off + 14) as *const u16).read_volatile(),
                )
            };
            out.push((addr, len, flags));
            if flags & DESC_F_NEXT == 0 || out.len() > usize::from(self.size) {
                return out;
            }
            d = next;
        }
    }
    pub(crate) fn complete(&mut self, id: u32, len: u32) {
        let slot = usize::from(self.used_idx & (self.size - 1));
        self.wr32(self.used_off() + 4 + 8 * slot, id);
        self.wr32(self.used_off() + 8 + 8 * slot, len);
        self.used_idx = self.used_idx.wrapping_add(1);
        self.wr16(self.used_off() + 2, self.used_idx);
    }
}

fn setup(size: u16, bufs: usize) -> (Vec<u64>, Vec<u64>, SplitQueue, PacketPool) {
    let (qmem, qr) = region(ring_bytes(size));
    let (pmem, pr) = region(bufs * BUF_SIZE);
    (
        qmem,
        pmem,
        SplitQueue::new(qr, size).unwrap(),
        PacketPool::new(pr),
    )
}

#[test]
fn refuses_bad_sizes_and_small_regions() {
    let (_m, r) = region(100);
    assert_eq!(
        SplitQueue::new(r, 8).unwrap_err(),
        QueueError::RegionTooSmall
    );
    let (_m, r) = region(ring_bytes(256));
    assert_eq!(SplitQueue::new(r, 100).unwrap_err(), QueueError::BadSize);
}

#[test]
fn batch_is_published_once_and_completed_in_order() {
    let (_q, _p, mut q, mut pool) = setup(8, 16);
    let mut dev = FakeDevice::new(&q);
    for _ in 0..5 {
        let b = pool.alloc().unwrap();
        let a = pool.paddr(&b);
        q.push(b, a, 100, true).unwrap();
    }
    assert!(dev.take().is_empty(), "nothing visible before publish");
    assert!(q.publish(), "device wants a notification");
    assert!(!q.publish(), "nothing new: no notification");
    let taken = dev.take();
    assert_eq!(taken.len(), 5);
    assert!(taken.iter().all(|t| t.2 == 100 && t.3 == DESC_F_WRITE));
    for (id, ..) in &taken {
        dev.complete(u32::from(*id), 60);
    }
    for _ in 0..5 {
        let (b, len) = q.pop_used().unwrap().unwrap();
        assert_eq!(len, 60);
        pool.free(b);
    }
    assert!(q.pop_used().is_none());
    assert_eq!(q.free_slots(), 8);
}

#[test]
fn no_notify_flag_suppresses_notification() {
    let (_q, _p, mut q, mut pool) = setup(8, 4);
    let dev = FakeDevice::new(&q);
    dev.wr16(dev.used_off(), USED_F_NO_NOTIFY);
    let b = pool.alloc().unwrap();
    q.push(b, 0, 10, false).unwrap();
    assert!(!q.publish());
}

#[test]
fn full_ring_gives_the_buffer_back() {
    let (_q, _p, mut q, mut pool) = setup(2, 4);
    for _ in 0..2 {
        let b = pool.alloc().unwrap();
        q.push(b, 0, 10, false).unwrap();
    }
    let b = pool.alloc().unwrap();
    assert!(q.push(b, 0, 10, false).is_err());
}

#[test]
fn survives_index_wraparound() {
    let (_q, _p, mut q, mut pool) = setup(4, 8);
    let mut dev = FakeDevice::new(&q);
    for round in 0..70_000u32 {
        let b = pool.alloc().unwrap();
        q.push(b, 0, 10, false).unwrap();
        q.publish();
        let t = dev.take();
        assert_eq!(t.len(), 1, "round {round}");
        dev.complete(u32::from(t[0].0), 0);
        pool.free(q.pop_used().unwrap().unwrap().0);
    }
    assert_eq!(pool.available(), 8);
}

#[test]
fn hostile_used_entries_are_refused() {
    let (_q, _p, mut q, mut pool) = setup(4, 8);
    let mut dev = FakeDevice::new(&q);
    let b = pool.alloc().unwrap();
    q.push(b, 0, 100, true).unwrap();
    q.publish();
    let d = dev.take()[0].0;
    dev.complete(99, 10); // id out of range
    assert_eq!(q.pop_used(), Some(Err(UsedError::BadId(99))));
    dev.complete(u32::from(d) ^ 1, 10); // a descriptor not in flight
    assert!(matches!(q.pop_used(), Some(Err(UsedError::BadId(_)))));
    dev.complete(u32::from(d), 5000); // longer than offered
    match q.pop_used() {
        Some(Err(UsedError::BadLength { buf, len: 5000 })) => pool.free(buf),
        other => panic!("{other:?}"),
    }
    // An index far ahead kills the queue instead of being followed.
    dev.wr16(dev.used_off() + 2, 1000);
    assert_eq!(q.pop_used(), Some(Err(UsedError::IndexRunaway)));
    assert_eq!(q.pop_used(), None);
    assert!(q.is_dead());
}

#[test]
fn chains_are_linked_in_order_and_freed_whole() {
    let (_q, _p, mut q, _pool) = setup(8, 8);
    let mut dev = FakeDevice::new(&q);
    let parts = [(0x1000, 4, false), (0x2000, 8, false), (0x3000, 1, true)];
    q.push_chain(BufId::token(7), &parts).unwrap();
    assert_eq!(q.free_slots(), 5);
    assert!(q.publish());
    let heads = dev.take();
    assert_eq!(heads.len(), 1, "one ring entry for the whole chain");
    let chain = dev.chain(heads[0].0);
    assert_eq!(
        chain,
        [
            (0x1000, 4, DESC_F_NEXT),
            (0x2000, 8, DESC_F_NEXT),
            (0x3000, 1, DESC_F_WRITE)
        ]
    );
    // The device scribbles over the links: freeing uses our own copy.
    for d in 0..8u16 {
        dev.wr16(16 * usize::from(d) + 14, 3);
    }
    dev.complete(u32::from(heads[0].0), 1);
    assert_eq!(q.pop_used(), Some(Ok((BufId::token(7), 1))));
    assert_eq!(q.free_slots(), 8);
    // More parts than free descriptors, or none: refused, nothing taken.
    assert_eq!(
        q.push_chain(BufId::token(1), &[(0, 1, false); 9]),
        Err(BufId::token(1))
    );
    assert_eq!(q.push_chain(BufId::token(2), &[]), Err(BufId::token(2)));
    assert_eq!(q.free_slots(), 8);
    // A writable length beyond the chain's writable parts is refused.
    q.push_chain(BufId::token(3), &parts).unwrap();
    q.publish();
    let head = dev.take()[0].0;
    dev.complete(u32::from(head), 2);
    assert_eq!(
        q.pop_used(),
        Some(Err(UsedError::BadLength {
            buf: BufId::token(3),
            len: 2
        }))
    );
    // Completing a descriptor inside a chain (not its head) is refused.
    q.push_chain(BufId::token(4), &parts).unwrap();
    q.publish();
    let head = dev.take()[0].0;
    let inner = (0..8u32).find(|d| *d != u32::from(head) && !q.free.contains(&(*d as u16)));
    dev.complete(inner.unwrap(), 0);
    assert!(matches!(q.pop_used(), Some(Err(UsedError::BadId(_)))));
}
