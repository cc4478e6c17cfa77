//! The kernel heap: one span of RAM handed to `talc` at boot.
//!
//! The heap serves boot-time and control-plane allocations (tables, config,
//! the PCI list). Packet buffers do not come from here: drivers take DMA
//! memory straight from the frame allocator.

use core::alloc::{GlobalAlloc, Layout};
use core::sync::atomic::{AtomicUsize, Ordering};
use kernel::memmap::{PhysMemory, Range};

use talc::{ErrOnOom, Span, Talc, Talck};

/// A quarter of free memory, within these bounds. The lower bound is what
/// the firewall's fixed tables take (connection tracking for 16384 IPv4
/// and 4096 IPv6 flows, about 2.5 MiB): with less RAM the boot stops at
/// the DMA allocation with a clear message instead of an allocation
/// failure later.
const MIN_HEAP: u64 = 3 << 20;
const MAX_HEAP: u64 = 64 << 20;

static TALC: Talck<spin::Mutex<()>, ErrOnOom> = Talc::new(ErrOnOom).lock();

/// `talc`, counting the bytes in use (`in_use`), so the statistics show
/// whether anything leaks (clients coming and going, rule updates).
struct Counted;

static IN_USE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed to `talc` unchanged; the counter only
// observes the sizes of what succeeded.
unsafe impl GlobalAlloc for Counted {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { TALC.alloc(layout) };
        if !p.is_null() {
            IN_USE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { TALC.dealloc(ptr, layout) };
        IN_USE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { TALC.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            IN_USE.fetch_add(new_size, Ordering::Relaxed);
            IN_USE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counted = Counted;

/// Heap bytes in use.
pub fn in_use() -> usize {
    IN_USE.load(Ordering::Relaxed)
}

/// Takes the heap from free memory and hands it to the allocator.
pub fn init(mem: &mut PhysMemory) -> Range {
    let want = (mem.free_bytes() / 4).clamp(MIN_HEAP, MAX_HEAP);
    let (start, size) = match mem.allocate(want, 1 << 21) {
        Some(start) => (start, want),
        None => match mem.allocate(MIN_HEAP, 4096) {
            Some(start) => (start, MIN_HEAP),
            None => crate::fatal_boot(format_args!("no memory for a {} KiB heap", MIN_HEAP / 1024)),
        },
    };
    let span = Span::from_base_size(start as *mut u8, size as usize);
    // SAFETY: [start, start + size) was just removed from the free list, is
    // identity-mapped RAM, and is handed to the allocator alone.
    unsafe {
        if TALC.lock().claim(span).is_err() {
            crate::fatal_boot(format_args!("heap span at {start:#x} refused"));
        }
    }
    Range::new(start, start + size)
}
