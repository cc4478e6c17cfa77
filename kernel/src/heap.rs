//! The kernel heap: one span of RAM handed to `talc` at boot.
//!
//! The heap serves boot-time and control-plane allocations (tables, config,
//! the PCI list). Packet buffers do not come from here: drivers take DMA
//! memory straight from the frame allocator.

use kernel::memmap::{PhysMemory, Range};
use talc::{ErrOnOom, Span, Talc, Talck};

/// A quarter of free memory, within these bounds. The lower bound is what
/// the firewall's fixed tables take (connection tracking for 16384 IPv4
/// and 4096 IPv6 flows, about 2.5 MiB): with less RAM the boot stops at
/// the DMA allocation with a clear message instead of an allocation
/// failure later.
const MIN_HEAP: u64 = 3 << 20;
const MAX_HEAP: u64 = 64 << 20;

#[global_allocator]
static ALLOCATOR: Talck<spin::Mutex<()>, ErrOnOom> = Talc::new(ErrOnOom).lock();

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
        if ALLOCATOR.lock().claim(span).is_err() {
            crate::fatal_boot(format_args!("heap span at {start:#x} refused"));
        }
    }
    Range::new(start, start + size)
}
