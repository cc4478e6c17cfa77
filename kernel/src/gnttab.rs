//! The domain's grant table (v1) and shared-info page under Xen: frames
//! placed into guest-physical memory with `XENMEM_add_to_physmap`, grants
//! written as `xen_shim::grant` says (domid and frame, a barrier, then the
//! flags), access ended with a compare-and-swap that fails while the other
//! domain still uses the grant. What netfront will give netback its ring
//! and buffer pages with.

use core::sync::atomic::{fence, AtomicU16, AtomicU64, Ordering};

use xen_shim::grant::*;
use xen_shim::hypercall::DOMID_SELF;

use crate::{phys, xen};

pub struct GrantTable {
    /// Guest-physical address of the first frame (frames are contiguous).
    base: u64,
    frames: u32,
    pub max_frames: u32,
    refs: RefAllocator,
}

impl GrantTable {
    /// Maps `frames` frames of the table (at most what Xen allows).
    pub fn setup(frames: u32) -> Result<Self, &'static str> {
        let size = xen::grant_table_size().ok_or("GNTTABOP_query_size failed")?;
        let frames = frames.min(size.max_nr_frames).max(1);
        // Frames of the foreign window: no RAM page is given up for them.
        let base = phys::alloc_foreign(u64::from(frames));
        for i in 0..frames {
            let gpfn = (base >> 12) + u64::from(i);
            if xen::add_to_physmap(XENMAPSPACE_GRANT_TABLE, u64::from(i), gpfn) != 0 {
                return Err("XENMEM_add_to_physmap(grant table) failed");
            }
        }
        Ok(Self {
            base,
            frames,
            max_frames: size.max_nr_frames,
            refs: RefAllocator::new(frames),
        })
    }

    pub fn frames(&self) -> u32 {
        self.frames
    }

    pub fn base(&self) -> u64 {
        self.base
    }

    /// A second owner of this table with `refs` of its free references
    /// (the qrexec agent's, beside netfront's): the entries are disjoint,
    /// so both may grant and end concurrently.
    pub fn split_off(&mut self, refs: usize) -> Self {
        Self {
            base: self.base,
            frames: self.frames,
            max_frames: self.max_frames,
            refs: self.refs.split_off(refs),
        }
    }

    pub fn free_refs(&self) -> usize {
        self.refs.available()
    }

    fn entry(&self, r: GrantRef) -> Option<u64> {
        entry_offset(r, self.frames).map(|off| self.base + off as u64)
    }

    /// Grants `domid` access to the page at guest frame `frame`.
    pub fn grant(&mut self, domid: u16, frame: u64, readonly: bool) -> Option<GrantRef> {
        let frame = u32::try_from(frame).ok()?;
        let r = self.refs.alloc()?;
        let at = self.entry(r)?;
        // SAFETY: `at` is the 8-byte, 8-aligned entry of a free reference
        // inside the table frames this domain owns; Xen reads it
        // concurrently, hence atomic and volatile accesses, and the flags
        // (which make it valid) are written last, after a release fence.
        unsafe {
            ((at + 2) as *mut u16).write_volatile(domid);
            ((at + 4) as *mut u32).write_volatile(frame);
            fence(Ordering::Release);
            AtomicU16::from_ptr(at as *mut u16).store(permit_flags(readonly), Ordering::Release);
        }
        Some(r)
    }

    /// Ends access through `r` if the other domain is not using it; the
    /// reference is then free again. False (and nothing changed) while in
    /// use.
    pub fn end(&mut self, r: GrantRef) -> bool {
        let Some(at) = self.entry(r) else {
            return false;
        };
        // SAFETY: the entry's flags word inside our table frames; Xen sets
        // GTF_reading/GTF_writing in it concurrently, hence the atomic.
        let flags = unsafe { AtomicU16::from_ptr(at as *mut u16) };
        let mut f = flags.load(Ordering::Acquire);
        loop {
            if !can_end(f) {
                return false;
            }
            match flags.compare_exchange(f, 0, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return self.refs.release(r),
                Err(now) => f = now,
            }
        }
    }
}

/// The shared-info page, mapped into a page of our own memory.
pub struct SharedInfo {
    page: u64,
}

static SHARED_INFO: spin::Once<Result<SharedInfo, &'static str>> = spin::Once::new();

impl SharedInfo {
    /// The page, mapped on first use. Once only: mapping it again would
    /// move it and leave a hole where the earlier mapping was.
    pub fn get() -> Result<&'static Self, &'static str> {
        SHARED_INFO
            .call_once(|| {
                let page = phys::alloc_foreign(1);
                if xen::add_to_physmap(XENMAPSPACE_SHARED_INFO, 0, page >> 12) != 0 {
                    return Err("XENMEM_add_to_physmap(shared info) failed");
                }
                Ok(Self { page })
            })
            .as_ref()
            .map_err(|e| *e)
    }

    pub fn address(&self) -> u64 {
        self.page
    }

    fn word(&self, base: usize, port: u32) -> Option<(&'static AtomicU64, u64)> {
        let (w, bit) = port_bit(port)?;
        // SAFETY: one of the 64 bitmap words inside the shared-info page,
        // which Xen updates concurrently, hence the atomic.
        let word = unsafe { AtomicU64::from_ptr((self.page as usize + base + w * 8) as *mut u64) };
        Some((word, bit))
    }

    /// Takes event channel `port`'s pending bit: whether it was set.
    pub fn take_pending(&self, port: u32) -> bool {
        self.word(EVTCHN_PENDING, port)
            .is_some_and(|(w, bit)| w.fetch_and(!bit, Ordering::AcqRel) & bit != 0)
    }

    /// vCPU 0's time record, read consistently (retried while Xen writes
    /// it); `None` if Xen has not filled it in.
    pub fn vcpu0_time(&self) -> Option<xen_shim::hypercall::VcpuTime> {
        use xen_shim::hypercall::{VcpuTime, VCPU0_TIME, VCPU_TIME_SIZE};
        for _ in 0..100 {
            let mut raw = [0u8; VCPU_TIME_SIZE];
            for (i, chunk) in raw.chunks_exact_mut(8).enumerate() {
                // SAFETY: a word of vcpu_info[0].time inside the mapped
                // shared-info page, which Xen updates concurrently.
                let w = unsafe {
                    AtomicU64::from_ptr((self.page as usize + VCPU0_TIME + i * 8) as *mut u64)
                };
                chunk.copy_from_slice(&w.load(Ordering::Acquire).to_le_bytes());
            }
            let t = VcpuTime::decode(&raw);
            fence(Ordering::Acquire);
            // SAFETY: the version word of the same record.
            let again = unsafe {
                core::sync::atomic::AtomicU32::from_ptr(
                    (self.page as usize + VCPU0_TIME) as *mut u32,
                )
            }
            .load(Ordering::Acquire);
            if t.version == again && t.version.is_multiple_of(2) {
                return t.valid().then_some(t);
            }
        }
        None
    }

    /// Whether `port` is masked (no upcall; polling still sees it pending).
    pub fn masked(&self, port: u32) -> bool {
        self.word(EVTCHN_MASK, port)
            .is_some_and(|(w, bit)| w.load(Ordering::Acquire) & bit != 0)
    }
}

/// An unbound event channel that `remote` may bind to.
pub fn alloc_unbound(remote: u16) -> Option<u32> {
    xen::alloc_unbound(DOMID_SELF, remote)
}
