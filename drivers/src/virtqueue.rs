//! A split virtqueue (virtio 1.x, section 2.7), driver side, for polling.
//!
//! Layout in one DMA region: the descriptor table (16 bytes each), the
//! available ring (`flags, idx, ring[size], used_event`) and the used ring
//! (`flags, idx, ring[size] of {id, len}, avail_event`). Each packet is one
//! descriptor; a request made of parts (a control-queue command: what the
//! device reads, then where it writes its answer) is a chain
//! (`push_chain`), whose links the driver keeps its own copy of, so freeing
//! it never follows memory the device can write. The driver publishes a
//! whole batch with one store of `avail.idx` and then asks once whether the
//! device wants a notification.
//!
//! The device is not trusted: a used entry whose id is out of range or not
//! in flight, a length beyond what was offered, or a used index that runs
//! more than `size` ahead is counted and ignored, never followed.

use alloc::vec::Vec;
use core::sync::atomic::{fence, AtomicU16, Ordering};

use crate::pool::BufId;
use crate::DmaRegion;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
/// `avail.flags`: the driver polls and wants no interrupts.
const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// `used.flags`: the device does not need to be notified.
const USED_F_NO_NOTIFY: u16 = 1;

/// Why a queue could not be set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueError {
    /// The size is zero, not a power of two, or above 32768.
    BadSize,
    /// The memory region is too small for the rings.
    RegionTooSmall,
}

/// Bytes of ring memory a queue of `size` entries needs.
pub const fn ring_bytes(size: u16) -> usize {
    let n = size as usize;
    let used = align4(16 * n + 6 + 2 * n);
    used + 6 + 8 * n
}

const fn align4(x: usize) -> usize {
    (x + 3) & !3
}

/// A device-written used entry that failed validation.
#[derive(Debug, PartialEq, Eq)]
pub enum UsedError {
    /// The id names no descriptor in flight; the entry is skipped.
    BadId(u32),
    /// The device claims to have written more than it was given; the
    /// buffer comes back for the caller to recycle.
    BadLength { buf: BufId, len: u32 },
    /// The used index ran more than a ring ahead. The queue is then dead:
    /// nothing more is read from it.
    IndexRunaway,
}

#[derive(Debug)]
pub struct SplitQueue {
    mem: DmaRegion,
    size: u16,
    avail_off: usize,
    used_off: usize,
    free: Vec<u16>,
    /// Per descriptor: the buffer in flight and the length offered (for
    /// a chain: at its head, the device-writable length).
    inflight: Vec<Option<(BufId, u32)>>,
    /// Per chain head: its descriptors in order (ours; the device's copy
    /// of the links is never read back). Empty for a single descriptor.
    chains: Vec<Vec<u16>>,
    /// Next `avail.idx` to publish (shadow of what is written so far).
    avail_idx: u16,
    /// Next used entry to read.
    last_used: u16,
    /// The device broke the ring protocol; it is no longer read.
    dead: bool,
}

impl SplitQueue {
    pub fn new(mem: DmaRegion, size: u16) -> Result<Self, QueueError> {
        if size == 0 || !size.is_power_of_two() || size > 32768 {
            return Err(QueueError::BadSize);
        }
        if mem.len() < ring_bytes(size) {
            return Err(QueueError::RegionTooSmall);
        }
        let n = usize::from(size);
        let q = Self {
            avail_off: 16 * n,
            used_off: align4(16 * n + 6 + 2 * n),
            mem,
            size,
            free: (0..size).rev().collect(),
            inflight: (0..n).map(|_| None).collect(),
            chains: (0..n).map(|_| Vec::new()).collect(),
            avail_idx: 0,
            last_used: 0,
            dead: false,
        };
        // SAFETY: the region is ours alone and large enough (checked above).
        unsafe { core::ptr::write_bytes(q.mem.ptr().as_ptr(), 0, ring_bytes(size)) };
        q.write_u16(q.avail_off, AVAIL_F_NO_INTERRUPT);
        Ok(q)
    }

    pub fn size(&self) -> u16 {
        self.size
    }
    pub fn desc_paddr(&self) -> u64 {
        self.mem.paddr()
    }
    pub fn avail_paddr(&self) -> u64 {
        self.mem.paddr() + self.avail_off as u64
    }
    pub fn used_paddr(&self) -> u64 {
        self.mem.paddr() + self.used_off as u64
    }
    /// Descriptors free for `push`.
    pub fn free_slots(&self) -> usize {
        self.free.len()
    }
    /// Buffers the device holds.
    pub fn in_flight(&self) -> usize {
        usize::from(self.size) - self.free.len()
    }
    /// Whether the device broke the ring protocol (see `UsedError`).
    pub fn is_dead(&self) -> bool {
        self.dead
    }

    fn ptr(&self, off: usize) -> *mut u8 {
        debug_assert!(off < ring_bytes(self.size));
        // SAFETY: every offset used below lies inside the ring layout, which
        // fits in the region (checked in `new`).
        unsafe { self.mem.ptr().as_ptr().add(off) }
    }

    fn write_u16(&self, off: usize, v: u16) {
        // SAFETY: in bounds (see `ptr`) and 2-aligned by the layout; the
        // device may read concurrently, hence volatile.
        unsafe { (self.ptr(off) as *mut u16).write_volatile(v.to_le()) }
    }

    fn read_u32(&self, off: usize) -> u32 {
        // SAFETY: in bounds and 4-aligned (used ring entries).
        u32::from_le(unsafe { (self.ptr(off) as *const u32).read_volatile() })
    }

    fn atomic_u16(&self, off: usize) -> &AtomicU16 {
        // SAFETY: in bounds and 2-aligned; ring index fields are only ever
        // accessed atomically or volatilely, by us and by the device.
        unsafe { AtomicU16::from_ptr(self.ptr(off) as *mut u16) }
    }

    fn write_desc(&self, d: u16, (addr, len, device_writes): (u64, u32, bool), next: Option<u16>) {
        let off = 16 * usize::from(d);
        let flags = if device_writes { DESC_F_WRITE } else { 0 }
            | if next.is_some() { DESC_F_NEXT } else { 0 };
        // SAFETY: descriptor `d` is free, so the device does not read it;
        // the 16 bytes lie inside the table.
        unsafe {
            let p = self.ptr(off);
            (p as *mut u64).write_volatile(addr.to_le());
            (p.add(8) as *mut u32).write_volatile(len.to_le());
            (p.add(12) as *mut u16).write_volatile(flags.to_le());
            (p.add(14) as *mut u16).write_volatile(next.unwrap_or(0).to_le());
        }
    }

    /// Offers a request of several parts — (address, length, whether the
    /// device writes it), readable parts first — as one chain, not yet
    /// visible to the device. Gives `buf` back when there are fewer free
    /// descriptors than parts (or no part); `pop_used` returns it with the
    /// length the device wrote into the writable parts.
    pub fn push_chain(&mut self, buf: BufId, parts: &[(u64, u32, bool)]) -> Result<(), BufId> {
        if parts.is_empty() || parts.len() > self.free.len() {
            return Err(buf);
        }
        let ids: Vec<u16> = (0..parts.len()).filter_map(|_| self.free.pop()).collect();
        for (i, part) in parts.iter().enumerate() {
            self.write_desc(ids[i], *part, ids.get(i + 1).copied());
        }
        let writable = parts.iter().filter(|p| p.2).map(|p| p.1).sum();
        let head = ids[0];
        self.chains[usize::from(head)] = ids;
        self.offer(head, buf, writable);
        Ok(())
    }

    /// Puts descriptor (or chain head) `head` in the next slot of the
    /// available ring, in flight with `buf` and the length the device may
    /// write.
    fn offer(&mut self, head: u16, buf: BufId, len: u32) {
        let slot = usize::from(self.avail_idx & (self.size - 1));
        self.write_u16(self.avail_off + 4 + 2 * slot, head);
        self.inflight[usize::from(head)] = Some((buf, len));
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Offers one buffer (`len` bytes at `addr`) to the device, not yet
    /// visible to it. Gives the buffer back when the ring is full.
    pub fn push(
        &mut self,
        buf: BufId,
        addr: u64,
        len: u32,
        device_writes: bool,
    ) -> Result<(), BufId> {
        let Some(d) = self.free.pop() else {
            return Err(buf);
        };
        self.write_desc(d, (addr, len, device_writes), None);
        self.offer(d, buf, len);
        Ok(())
    }

    /// Makes every pushed buffer visible to the device; true when the
    /// device asked to be notified.
    pub fn publish(&mut self) -> bool {
        let idx = self.atomic_u16(self.avail_off + 2);
        if idx.load(Ordering::Relaxed) == self.avail_idx {
            return false;
        }
        // Release: descriptors and ring slots written above are visible to
        // the device before the new index is.
        idx.store(self.avail_idx.to_le(), Ordering::Release);
        // Full fence: the index store must be globally visible before we
        // read the device's NO_NOTIFY flag, or both sides may decide the
        // other will act and the queue stalls (virtio 2.7.13).
        fence(Ordering::SeqCst);
        self.atomic_u16(self.used_off).load(Ordering::Relaxed) & USED_F_NO_NOTIFY == 0
    }

    /// The next buffer the device has finished with, and the length it
    /// wrote (for device-writable buffers).
    pub fn pop_used(&mut self) -> Option<Result<(BufId, u32), UsedError>> {
        if self.dead {
            return None;
        }
        let used_idx = u16::from_le(self.atomic_u16(self.used_off + 2).load(Ordering::Acquire));
        let pending = used_idx.wrapping_sub(self.last_used);
        if pending == 0 {
            return None;
        }
        if pending > self.size {
            self.dead = true;
            return Some(Err(UsedError::IndexRunaway));
        }
        // Acquire (above): the entry is read after the index that covers it.
        let slot = usize::from(self.last_used & (self.size - 1));
        let entry = self.used_off + 4 + 8 * slot;
        let (id, len) = (self.read_u32(entry), self.read_u32(entry + 4));
        self.last_used = self.last_used.wrapping_add(1);
        let Some((buf, offered)) = usize::try_from(id)
            .ok()
            .and_then(|i| self.inflight.get_mut(i))
            .and_then(Option::take)
        else {
            return Some(Err(UsedError::BadId(id)));
        };
        let chain = core::mem::take(&mut self.chains[id as usize]);
        if chain.is_empty() {
            self.free.push(id as u16);
        } else {
            self.free.extend(chain);
        }
        if len > offered {
            return Some(Err(UsedError::BadLength { buf, len }));
        }
        Some(Ok((buf, len)))
    }
}

#[cfg(test)]
pub(crate) mod tests;
