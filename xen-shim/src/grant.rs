//! Grant table v1, event channels and the shared-info page: numbers,
//! argument layouts and the bookkeeping that needs no hardware (`public/
//! grant_table.h`, `memory.h`, `event_channel.h`, `xen.h`).
//!
//! A v1 grant entry is 8 bytes: `u16 flags, u16 domid, u32 frame`. To
//! grant, the domid and frame are written first and the flags last (with a
//! write barrier between), so the other domain never sees a permitted entry
//! with stale fields. To end access, the flags are cleared only while the
//! other side is neither reading nor writing through the grant
//! (`GTF_reading`/`GTF_writing`), with a compare-and-swap: a grant still
//! mapped is never reused.

use alloc::vec::Vec;

pub const HYPERVISOR_MEMORY_OP: u32 = 12;
pub const HYPERVISOR_GRANT_TABLE_OP: u32 = 20;

pub const XENMEM_ADD_TO_PHYSMAP: u32 = 7;
pub const XENMAPSPACE_SHARED_INFO: u32 = 0;
pub const XENMAPSPACE_GRANT_TABLE: u32 = 1;

pub const GNTTABOP_QUERY_SIZE: u32 = 6;
/// Mapping another domain's grant into our physical address space.
pub const GNTTABOP_MAP_GRANT_REF: u32 = 0;
/// `GNTMAP_host_map`: map at `host_addr` (for HVM/PVH, a guest-physical
/// address).
pub const GNTMAP_HOST_MAP: u32 = 1 << 1;
/// `XENMEM_decrease_reservation`: give pages back, leaving their frames
/// empty (where a grant can then be mapped); `XENMEM_populate_physmap`
/// fills them again.
pub const XENMEM_DECREASE_RESERVATION: u32 = 1;
pub const XENMEM_POPULATE_PHYSMAP: u32 = 6;
pub const GTF_PERMIT_ACCESS: u16 = 1;
pub const GTF_READONLY: u16 = 1 << 2;
pub const GTF_READING: u16 = 1 << 3;
pub const GTF_WRITING: u16 = 1 << 4;
/// v1 entries in one 4 KiB frame.
pub const ENTRIES_PER_FRAME: u32 = 512;
pub const ENTRY_SIZE: usize = 8;
/// Refs below this are the toolstack's (console, XenStore).
pub const FIRST_FREE_REF: u32 = 8;

pub const EVTCHNOP_BIND_INTERDOMAIN: u32 = 0;
pub const EVTCHNOP_ALLOC_UNBOUND: u32 = 6;
/// `EVTCHNOP_close` (argument: `evtchn_close { u32 port }`).
pub const EVTCHNOP_CLOSE: u32 = 3;
/// In the shared-info page: 32 `vcpu_info` of 64 bytes, then the pending
/// and mask bitmaps (64 words of 64 bits each).
pub const EVTCHN_PENDING: usize = 32 * 64;
pub const EVTCHN_MASK: usize = EVTCHN_PENDING + 64 * 8;
/// Event channel ports the 2-level ABI has.
pub const EVTCHN_PORTS: u32 = 64 * 64;

/// `xen_add_to_physmap`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddToPhysmap {
    pub domid: u16,
    pub size: u16,
    pub space: u32,
    pub idx: u64,
    pub gpfn: u64,
}

/// `gnttab_map_grant_ref`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MapGrantRef {
    pub host_addr: u64,
    pub flags: u32,
    pub gref: u32,
    pub dom: u16,
    pub status: i16,
    pub handle: u32,
    pub dev_bus_addr: u64,
}

/// `xen_memory_reservation`: `extent_start` points at `nr_extents` frame
/// numbers.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryReservation {
    pub extent_start: u64,
    pub nr_extents: u64,
    pub extent_order: u32,
    pub mem_flags: u32,
    pub domid: u16,
}

/// `gnttab_query_size`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QuerySize {
    pub dom: u16,
    pub nr_frames: u32,
    pub max_nr_frames: u32,
    pub status: i16,
}

/// `evtchn_alloc_unbound`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocUnbound {
    pub dom: u16,
    pub remote_dom: u16,
    pub port: u32,
}

/// `evtchn_bind_interdomain`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindInterdomain {
    pub remote_dom: u16,
    pub remote_port: u32,
    pub local_port: u32,
}

pub const GNTTABOP_UNMAP_GRANT_REF: u32 = 1;
pub const GNTTABOP_COPY: u32 = 5;
/// `gnttab_copy` flags: which side is named by a grant reference.
pub const GNTCOPY_SOURCE_GREF: u16 = 1 << 0;
pub const GNTCOPY_DEST_GREF: u16 = 1 << 1;
/// "This domain", for the side of a copy that is our own frame.
pub const DOMID_SELF: u16 = 0x7ff0;
pub const GNTST_OKAY: i16 = 0;

/// One side of a `gnttab_copy`: a grant reference of `domid`'s, or (for
/// `DOMID_SELF`) one of our frame numbers, and the offset in that page.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CopyPtr {
    /// `union { grant_ref_t ref; xen_pfn_t gmfn; }`.
    pub gref_or_frame: u64,
    pub domid: u16,
    pub offset: u16,
}

/// `gnttab_copy`: `len` bytes from `source` to `dest`, neither crossing a
/// page; Xen writes `status`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GnttabCopy {
    pub source: CopyPtr,
    pub dest: CopyPtr,
    pub len: u16,
    pub flags: u16,
    pub status: i16,
}

impl GnttabCopy {
    /// From page `gref` of `domid`'s, at `offset`, into our memory at
    /// `paddr` (`None` if either side would cross its page).
    pub fn from_grant(domid: u16, gref: u32, offset: u16, paddr: u64, len: u16) -> Option<Self> {
        Self::between(false, domid, (gref, offset), paddr, len)
    }

    /// From our memory at `paddr` into page `gref` of `domid`'s, at
    /// `offset`.
    pub fn to_grant(domid: u16, gref: u32, offset: u16, paddr: u64, len: u16) -> Option<Self> {
        Self::between(true, domid, (gref, offset), paddr, len)
    }

    fn between(
        to_grant: bool,
        domid: u16,
        (gref, offset): (u32, u16),
        paddr: u64,
        len: u16,
    ) -> Option<Self> {
        let ours = own_side(paddr, len)?;
        let theirs = grant_side(domid, gref, offset, len)?;
        let (source, dest, flags) = if to_grant {
            (ours, theirs, GNTCOPY_DEST_GREF)
        } else {
            (theirs, ours, GNTCOPY_SOURCE_GREF)
        };
        Some(Self {
            source,
            dest,
            len,
            flags,
            status: 1,
        })
    }
}

const PAGE_SIZE: u64 = 4096;

fn own_side(paddr: u64, len: u16) -> Option<CopyPtr> {
    let offset = paddr % PAGE_SIZE;
    (offset + u64::from(len) <= PAGE_SIZE).then_some(CopyPtr {
        gref_or_frame: paddr / PAGE_SIZE,
        domid: DOMID_SELF,
        offset: offset as u16,
    })
}

fn grant_side(domid: u16, gref: u32, offset: u16, len: u16) -> Option<CopyPtr> {
    (u64::from(offset) + u64::from(len) <= PAGE_SIZE).then_some(CopyPtr {
        gref_or_frame: u64::from(gref),
        domid,
        offset,
    })
}

/// `gnttab_unmap_grant_ref`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UnmapGrantRef {
    pub host_addr: u64,
    pub dev_bus_addr: u64,
    pub handle: u32,
    pub status: i16,
}

/// A grant reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantRef(pub u32);

/// The flags that permit `domid` access (read-only or not); written last.
pub fn permit_flags(readonly: bool) -> u16 {
    GTF_PERMIT_ACCESS | if readonly { GTF_READONLY } else { 0 }
}

/// Whether access through a grant whose flags are `flags` may be ended now.
pub fn can_end(flags: u16) -> bool {
    flags & (GTF_READING | GTF_WRITING) == 0
}

/// Byte offset of `r`'s entry in the table, if it is within `frames`.
pub fn entry_offset(r: GrantRef, frames: u32) -> Option<usize> {
    (r.0 < frames * ENTRIES_PER_FRAME).then(|| r.0 as usize * ENTRY_SIZE)
}

/// The free grant references of a table of `frames` frames.
#[derive(Debug, Clone)]
pub struct RefAllocator {
    free: Vec<u32>,
    limit: u32,
}

impl RefAllocator {
    pub fn new(frames: u32) -> Self {
        let limit = frames * ENTRIES_PER_FRAME;
        Self {
            free: (FIRST_FREE_REF..limit).rev().collect(),
            limit,
        }
    }

    pub fn alloc(&mut self) -> Option<GrantRef> {
        self.free.pop().map(GrantRef)
    }

    /// Returns a reference whose access has ended; a reference outside the
    /// table, reserved, or already free is refused.
    pub fn release(&mut self, r: GrantRef) -> bool {
        if r.0 < FIRST_FREE_REF || r.0 >= self.limit || self.free.contains(&r.0) {
            return false;
        }
        self.free.push(r.0);
        true
    }

    pub fn available(&self) -> usize {
        self.free.len()
    }

    /// Moves `n` free references (fewer if there are not as many) to a new
    /// allocator over the same table: two owners of one table, each
    /// granting from its own references.
    pub fn split_off(&mut self, n: usize) -> Self {
        let keep = self.free.len().saturating_sub(n);
        Self {
            free: self.free.split_off(keep),
            limit: self.limit,
        }
    }
}

/// Word and bit of event channel `port` in the 2-level bitmaps.
pub fn port_bit(port: u32) -> Option<(usize, u64)> {
    (port < EVTCHN_PORTS).then(|| ((port / 64) as usize, 1u64 << (port % 64)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_c_structures() {
        assert_eq!(core::mem::size_of::<AddToPhysmap>(), 24);
        assert_eq!(core::mem::size_of::<QuerySize>(), 16);
        assert_eq!(core::mem::size_of::<AllocUnbound>(), 8);
        assert_eq!(core::mem::size_of::<BindInterdomain>(), 12);
        assert_eq!(core::mem::size_of::<MapGrantRef>(), 32);
        assert_eq!(core::mem::offset_of!(MapGrantRef, dom), 16);
        assert_eq!(core::mem::offset_of!(MapGrantRef, handle), 20);
        assert_eq!(core::mem::size_of::<MemoryReservation>(), 32);
        assert_eq!(core::mem::offset_of!(MemoryReservation, domid), 24);
        assert_eq!(EVTCHN_PENDING, 2048);
        assert_eq!(EVTCHN_MASK, 2560);
        assert_eq!(core::mem::size_of::<CopyPtr>(), 16);
        assert_eq!(core::mem::size_of::<GnttabCopy>(), 40);
        assert_eq!(core::mem::offset_of!(GnttabCopy, dest), 16);
        assert_eq!(core::mem::offset_of!(GnttabCopy, len), 32);
        assert_eq!(core::mem::offset_of!(GnttabCopy, status), 36);
        assert_eq!(core::mem::size_of::<UnmapGrantRef>(), 24);
        assert_eq!(core::mem::offset_of!(UnmapGrantRef, status), 20);
    }

    /// Copies name the client's side by grant and ours by frame number,
    /// and never cross a page on either side.
    #[test]
    fn grant_copies_stay_inside_their_pages() {
        let c = GnttabCopy::from_grant(5, 77, 100, 0x12_3040, 1514).unwrap();
        assert_eq!(c.flags, GNTCOPY_SOURCE_GREF);
        assert_eq!(
            (c.source.gref_or_frame, c.source.domid, c.source.offset),
            (77, 5, 100)
        );
        assert_eq!(
            (c.dest.gref_or_frame, c.dest.domid, c.dest.offset),
            (0x123, DOMID_SELF, 0x40)
        );
        let t = GnttabCopy::to_grant(5, 78, 0, 0x12_3840, 60).unwrap();
        assert_eq!(t.flags, GNTCOPY_DEST_GREF);
        assert_eq!((t.dest.gref_or_frame, t.dest.offset), (78, 0));
        assert_eq!(t.source.offset, 0x840);
        assert!(GnttabCopy::from_grant(5, 77, 4000, 0x1000, 100).is_none());
        assert!(GnttabCopy::from_grant(5, 77, 0, 0x1f00, 0x200).is_none());
        assert!(GnttabCopy::to_grant(5, 77, u16::MAX, 0x1000, u16::MAX).is_none());
        assert!(GnttabCopy::to_grant(5, 77, 0, 0x1000, 4096).is_some());
    }

    #[test]
    fn refs_are_allocated_once_and_reserved_ones_never() {
        let mut a = RefAllocator::new(1);
        assert_eq!(a.available(), 504);
        let r = a.alloc().unwrap();
        assert_eq!(r, GrantRef(8));
        assert!(!a.release(GrantRef(3)), "reserved");
        assert!(!a.release(GrantRef(512)), "outside the table");
        assert!(!a.release(GrantRef(9)), "already free");
        assert!(a.release(r));
        assert!(!a.release(r), "twice");
        let mut b = a.split_off(4);
        assert_eq!((a.available(), b.available()), (500, 4));
        let mine: Vec<GrantRef> = (0..4).map(|_| b.alloc().unwrap()).collect();
        assert!(b.alloc().is_none(), "only its own four");
        for r in &mine {
            assert!(a.free.iter().all(|f| *f != r.0), "disjoint");
            assert!(b.release(*r));
        }
        assert_eq!(a.split_off(1000).available(), 500);
        assert_eq!(a.available(), 0);
        assert_eq!(entry_offset(GrantRef(511), 1), Some(4088));
        assert_eq!(entry_offset(GrantRef(512), 1), None);
    }

    #[test]
    fn access_ends_only_when_unused() {
        let f = permit_flags(false);
        assert!(can_end(f));
        assert!(!can_end(f | GTF_READING));
        assert!(!can_end(f | GTF_WRITING));
        assert_eq!(permit_flags(true), GTF_PERMIT_ACCESS | GTF_READONLY);
        assert_eq!(port_bit(65), Some((1, 2)));
        assert_eq!(port_bit(EVTCHN_PORTS), None);
    }
}
