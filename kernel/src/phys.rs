//! Physical memory access and the identity map.
//!
//! Portcullis runs on an identity map: virtual address = physical address.
//! The trampoline maps the first 4 GiB with 2 MiB pages; `map_all_ram`
//! extends the map over RAM above that before anything else runs, so the
//! kernel never takes a page fault in normal operation (a page fault is a
//! bug, reported by the exception handler). Reads of memory that another
//! party described (start info, memory map, command line) go through
//! `read`, which first checks that the range is mapped.

use core::ptr::NonNull;

use kernel::memmap::{PhysMemory, Range, PAGE_SIZE};
use spin::Mutex;
use x86_64::registers::control::Cr3;

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const WRITE_THROUGH: u64 = 1 << 3;
const CACHE_DISABLE: u64 = 1 << 4;
const HUGE: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const SIZE_2M: u64 = 2 << 20;
/// Canonical lower-half addresses end here.
const LOWER_HALF_END: u64 = 1 << 47;
/// An address that is never mapped, for `test-fault=page-fault`.
pub const UNMAPPED_PROBE: u64 = 0x7000_0000_0000;

extern "C" {
    static __kernel_start: u8;
    static __kernel_end: u8;
}

/// The physical range the kernel image (code, data, bss, boot stack and
/// page tables) occupies.
pub fn kernel_image() -> Range {
    // Only the addresses of the linker-defined symbols are taken.
    let (start, end) = (
        core::ptr::addr_of!(__kernel_start),
        core::ptr::addr_of!(__kernel_end),
    );
    Range::new(start as u64, end as u64)
}

fn table_at(paddr: u64) -> *mut u64 {
    paddr as *mut u64
}

fn root_table() -> u64 {
    Cr3::read().0.start_address().as_u64()
}

/// The size of the page that maps `addr`, or `None` when it is unmapped.
fn page_size_at(addr: u64) -> Option<u64> {
    if addr >= LOWER_HALF_END {
        return None;
    }
    let mut table = root_table();
    // Level shifts: PML4 39, PDPT 30, PD 21, PT 12.
    for shift in [39u32, 30, 21, 12] {
        let index = ((addr >> shift) & 0x1ff) as usize;
        // SAFETY: page tables live in identity-mapped RAM below 4 GiB (the
        // trampoline's in .bss, later ones from `alloc_table`), and entry
        // `index` < 512 lies inside the 4 KiB table.
        let entry = unsafe { table_at(table).add(index).read_volatile() };
        if entry & PRESENT == 0 {
            return None;
        }
        if shift == 12 || (shift != 39 && entry & HUGE != 0) {
            return Some(1u64 << shift);
        }
        table = entry & ADDR_MASK;
    }
    None
}

/// Whether every byte of `[start, start + len)` is mapped.
pub fn is_mapped(start: u64, len: u64) -> bool {
    let Some(end) = start.checked_add(len) else {
        return false;
    };
    let mut addr = start;
    while addr < end {
        let Some(size) = page_size_at(addr) else {
            return false;
        };
        addr = (addr & !(size - 1)) + size;
    }
    true
}

/// Copies physical memory into `buf`; false (and nothing read) when any of
/// the range is unmapped.
pub fn read(paddr: u64, buf: &mut [u8]) -> bool {
    if !is_mapped(paddr, buf.len() as u64) {
        return false;
    }
    // SAFETY: the whole range is identity-mapped RAM or firmware memory,
    // checked just above, and `buf` is a distinct Rust buffer.
    unsafe { core::ptr::copy_nonoverlapping(paddr as *const u8, buf.as_mut_ptr(), buf.len()) };
    true
}

/// A zeroed page for a new page table, from RAM below 4 GiB so that it is
/// reachable through the boot map.
fn alloc_table(mem: &mut PhysMemory) -> u64 {
    let frame = match mem.allocate(PAGE_SIZE, PAGE_SIZE) {
        Some(f) if f + PAGE_SIZE <= 1 << 32 => f,
        _ => crate::fatal_boot(format_args!("no memory below 4 GiB for page tables")),
    };
    // SAFETY: the frame was just taken from the free list, is identity
    // mapped (below 4 GiB) and no one else refers to it.
    unsafe { core::ptr::write_bytes(frame as *mut u8, 0, PAGE_SIZE as usize) };
    frame
}

/// Identity-maps `range` (rounded out to 2 MiB) with 2 MiB pages;
/// `uncached` for device memory.
pub fn map_identity(range: Range, uncached: bool, mem: &mut PhysMemory) {
    let flags = PRESENT
        | WRITABLE
        | HUGE
        | if uncached {
            CACHE_DISABLE | WRITE_THROUGH
        } else {
            0
        };
    let mut addr = range.start & !(SIZE_2M - 1);
    let end = range.end.min(LOWER_HALF_END);
    while addr < end {
        if page_size_at(addr).is_none() {
            let mut table = root_table();
            for shift in [39u32, 30] {
                let index = ((addr >> shift) & 0x1ff) as usize;
                // SAFETY: as in `page_size_at`; the entry is written only
                // while it is not present, so no live mapping changes.
                unsafe {
                    let slot = table_at(table).add(index);
                    if slot.read_volatile() & PRESENT == 0 {
                        slot.write_volatile(alloc_table(mem) | PRESENT | WRITABLE);
                    }
                    table = slot.read_volatile() & ADDR_MASK;
                }
            }
            let index = ((addr >> 21) & 0x1ff) as usize;
            // SAFETY: `table` is a page directory reached above; this entry
            // is not present (checked by `page_size_at`).
            unsafe { table_at(table).add(index).write_volatile(addr | flags) };
        }
        addr += SIZE_2M;
    }
    // Reloading CR3 drops any paging-structure caches for the new entries.
    let (frame, cr3_flags) = Cr3::read();
    // SAFETY: the same root table is loaded again.
    unsafe { Cr3::write(frame, cr3_flags) };
}

/// Maps all RAM the firmware reported (the boot map covers only 4 GiB).
pub fn map_all_ram(mem: &mut PhysMemory) {
    let highest = mem.highest_ram();
    if highest > 1 << 32 {
        map_identity(Range::new(1 << 32, highest), false, mem);
        log::info!("memory: identity map extended to {highest:#x}");
    }
}

/// Reads `UNMAPPED_PROBE`, which raises a page fault.
pub fn touch_unmapped() {
    // SAFETY: deliberately faults; the exception reporter ends the kernel
    // before the read could return.
    let v = unsafe { (UNMAPPED_PROBE as *const u64).read_volatile() };
    println!("test-fault: unmapped read returned {v:#x}");
}

/// Free physical memory after boot, for DMA allocations.
static FREE: Mutex<Option<PhysMemory>> = Mutex::new(None);

/// Hands the free list over for DMA allocations once boot set-up is done.
pub fn set_free_memory(mem: PhysMemory) {
    *FREE.lock() = Some(mem);
}

/// Free bytes left for DMA.
pub fn free_bytes() -> u64 {
    FREE.lock().as_ref().map_or(0, PhysMemory::free_bytes)
}

/// `bytes` (rounded up to pages) of zeroed, page-aligned, identity-mapped
/// RAM, for memory shared with devices. Running out at boot is fatal.
pub fn alloc_dma(bytes: usize) -> (u64, NonNull<u8>) {
    let paddr = FREE
        .lock()
        .as_mut()
        .and_then(|m| m.allocate(bytes as u64, PAGE_SIZE));
    let Some(paddr) = paddr else {
        crate::fatal_boot(format_args!(
            "out of memory for {bytes} bytes of DMA memory"
        ));
    };
    // SAFETY: the range was just taken from the free list, is identity
    // mapped RAM, and nothing else refers to it.
    unsafe { core::ptr::write_bytes(paddr as *mut u8, 0, bytes) };
    (
        paddr,
        NonNull::new(paddr as *mut u8).unwrap_or(NonNull::dangling()),
    )
}

/// A `DmaRegion` of `bytes` for a driver.
pub fn dma_region(bytes: usize) -> drivers::DmaRegion {
    let (paddr, ptr) = alloc_dma(bytes);
    // SAFETY: fresh, exclusive, page-aligned, identity-mapped memory.
    unsafe { drivers::DmaRegion::new(ptr, paddr, bytes) }
}

/// Guest frames for pages that are not our RAM: other domains' pages
/// mapped by grant (a client's rings, dom0's vchan pages) and Xen's own
/// (shared info, grant table). They lie in a window above all RAM and
/// above 4 GiB, identity-mapped at boot (`init_foreign`), where no RAM,
/// device or firmware range is: mapping there gives up no RAM page, so
/// the domain's memory never shrinks or changes under it, and unmapping
/// leaves just a hole.
static FOREIGN: Mutex<Option<Foreign>> = Mutex::new(None);

/// The window's bookkeeping: never-used frames from `next` to `end`, and
/// runs given back (`free_foreign`), reused first.
struct Foreign {
    next: u64,
    end: u64,
    free: alloc::vec::Vec<(u64, u64)>,
}

/// Frames in the foreign window: enough for the grant table's 64 frames,
/// the shared info, every client vif's two rings and vchan's pages.
const FOREIGN_FRAMES: u64 = 512;

/// Sets up the foreign window (under Xen, before anything maps a grant).
pub fn init_foreign(mem: &mut PhysMemory) -> Range {
    let start = mem.highest_ram().max(1 << 32).next_multiple_of(SIZE_2M);
    let window = Range::new(start, start + FOREIGN_FRAMES * PAGE_SIZE);
    map_identity(window, false, mem);
    *FOREIGN.lock() = Some(Foreign {
        next: window.start,
        end: window.end,
        free: alloc::vec::Vec::new(),
    });
    window
}

/// `pages` consecutive frames of the foreign window (nothing is there
/// until something is mapped: never touch them before). Running out is
/// fatal: for what the kernel sets up (the grant table, shared info, the
/// client vifs' rings), the window is sized.
pub fn alloc_foreign(pages: u64) -> u64 {
    match try_alloc_foreign(pages) {
        Some(at) => at,
        None => crate::fatal_boot(format_args!("no room for {pages} more foreign frames")),
    }
}

/// As `alloc_foreign`, `None` when there is no room: for what another
/// domain sizes (a vchan's rings).
pub fn try_alloc_foreign(pages: u64) -> Option<u64> {
    let mut w = FOREIGN.lock();
    let f = w.as_mut()?;
    // First fit among the runs given back, else new frames.
    if let Some(i) = f.free.iter().position(|&(_, n)| n >= pages) {
        let (at, n) = f.free[i];
        if n == pages {
            f.free.remove(i);
        } else {
            f.free[i] = (at + pages * PAGE_SIZE, n - pages);
        }
        return Some(at);
    }
    if f.next + pages * PAGE_SIZE > f.end {
        return None;
    }
    let at = f.next;
    f.next += pages * PAGE_SIZE;
    Some(at)
}

/// Gives back `pages` frames at `at` (from `alloc_foreign`), once nothing
/// is mapped there any more. Runs that touch are merged, and one that
/// ends where the never-used frames begin goes back to them, so the
/// window does not fragment.
pub fn free_foreign(at: u64, pages: u64) {
    let mut w = FOREIGN.lock();
    let Some(f) = w.as_mut() else {
        return;
    };
    let (mut start, mut end) = (at, at + pages * PAGE_SIZE);
    f.free.retain(|&(s, n)| {
        let e = s + n * PAGE_SIZE;
        if e == start || s == end {
            start = start.min(s);
            end = end.max(e);
            false
        } else {
            true
        }
    });
    if end == f.next {
        f.next = start;
    } else {
        f.free.push((start, (end - start) / PAGE_SIZE));
    }
}
