//! Physical memory: what the firmware's map says is RAM, minus what is in use.
//!
//! Built once at boot from the PVH memory map. RAM ranges are shrunk to page
//! boundaries, overlapping ranges merged, and anything the map also marks as
//! non-RAM is carved out (a reserved range wins over RAM). The kernel then
//! reserves its own image and the low megabyte, and allocates frames by
//! carving from the lowest range that fits. Memory is never freed: the
//! dataplane preallocates everything it needs at boot.

use xen_shim::pvh::{MemmapEntry, MemoryKind};

pub const PAGE_SIZE: u64 = 4096;
/// Ranges kept; a map that fragments further loses its smallest pieces.
pub const MAX_RANGES: usize = 64;

/// A half-open physical address range `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Range {
    pub start: u64,
    pub end: u64,
}

impl Range {
    pub const fn new(start: u64, end: u64) -> Self {
        Self { start, end }
    }
    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

fn align_up(x: u64, a: u64) -> Option<u64> {
    debug_assert!(a.is_power_of_two());
    x.checked_add(a - 1).map(|v| v & !(a - 1))
}

fn align_down(x: u64, a: u64) -> u64 {
    x & !(a - 1)
}

/// Free physical memory, as a sorted list of disjoint page-aligned ranges.
#[derive(Debug, Clone)]
pub struct PhysMemory {
    free: [Range; MAX_RANGES],
    len: usize,
    /// Bytes of RAM the map describes (overlaps counted once).
    total_ram: u64,
    /// End of the highest RAM range: everything below it must be mapped.
    highest_ram: u64,
    /// Ranges that did not fit in `MAX_RANGES` and were dropped.
    lost_ranges: usize,
}

impl PhysMemory {
    /// Builds the free list from a firmware memory map.
    pub fn from_entries<I>(entries: I) -> Self
    where
        I: IntoIterator<Item = MemmapEntry> + Clone,
    {
        let mut mem = Self {
            free: [Range::default(); MAX_RANGES],
            len: 0,
            total_ram: 0,
            highest_ram: 0,
            lost_ranges: 0,
        };
        for e in entries
            .clone()
            .into_iter()
            .filter(|e| e.kind == MemoryKind::Ram)
        {
            let raw = Range::new(e.addr, e.end());
            mem.total_ram += raw.len() - mem.overlap(raw);
            mem.highest_ram = mem.highest_ram.max(raw.end);
            let Some(start) = align_up(raw.start, PAGE_SIZE) else {
                continue;
            };
            mem.add(Range::new(start, align_down(raw.end, PAGE_SIZE)));
        }
        for e in entries.into_iter().filter(|e| e.kind != MemoryKind::Ram) {
            mem.reserve(Range::new(e.addr, e.end()));
        }
        mem
    }

    pub fn total_ram(&self) -> u64 {
        self.total_ram
    }
    pub fn highest_ram(&self) -> u64 {
        self.highest_ram
    }
    pub fn lost_ranges(&self) -> usize {
        self.lost_ranges
    }
    pub fn free_ranges(&self) -> &[Range] {
        &self.free[..self.len]
    }
    pub fn free_bytes(&self) -> u64 {
        self.free_ranges().iter().map(Range::len).sum()
    }

    /// Bytes of `r` already covered by free ranges.
    fn overlap(&self, r: Range) -> u64 {
        self.free_ranges()
            .iter()
            .map(|f| f.end.min(r.end).saturating_sub(f.start.max(r.start)))
            .sum()
    }

    /// Adds a range, merging with neighbours and keeping the list sorted.
    fn add(&mut self, r: Range) {
        if r.is_empty() {
            return;
        }
        let mut merged = r;
        let mut kept = [Range::default(); MAX_RANGES];
        let mut n = 0;
        for f in self.free_ranges() {
            if f.end < merged.start || f.start > merged.end {
                kept[n] = *f;
                n += 1;
            } else {
                merged = Range::new(merged.start.min(f.start), merged.end.max(f.end));
            }
        }
        let pos = kept[..n]
            .iter()
            .position(|f| f.start > merged.start)
            .unwrap_or(n);
        if n == MAX_RANGES {
            self.lost_ranges += 1;
            return;
        }
        kept.copy_within(pos..n, pos + 1);
        kept[pos] = merged;
        self.free = kept;
        self.len = n + 1;
    }

    /// Removes `r` (any alignment) from the free list; pages it touches go.
    pub fn reserve(&mut self, r: Range) {
        let r = Range::new(
            align_down(r.start, PAGE_SIZE),
            align_up(r.end, PAGE_SIZE).unwrap_or(u64::MAX),
        );
        if r.is_empty() {
            return;
        }
        let mut out = [Range::default(); MAX_RANGES];
        let mut n = 0;
        let current = self.free;
        for f in &current[..self.len] {
            let pieces = [
                Range::new(f.start, f.end.min(r.start)),
                Range::new(f.start.max(r.end), f.end),
            ];
            for p in pieces.into_iter().filter(|p| !p.is_empty()) {
                if n == MAX_RANGES {
                    self.lost_ranges += 1;
                } else {
                    out[n] = p;
                    n += 1;
                }
            }
        }
        self.free = out;
        self.len = n;
    }

    /// Allocates `size` bytes aligned to `align` (a power of two, at least a
    /// page) from the lowest free range that fits.
    pub fn allocate(&mut self, size: u64, align: u64) -> Option<u64> {
        let align = align.max(PAGE_SIZE);
        if !align.is_power_of_two() || size == 0 {
            return None;
        }
        let size = align_up(size, PAGE_SIZE)?;
        let start = self.free_ranges().iter().find_map(|f| {
            let s = align_up(f.start, align)?;
            (s.checked_add(size)? <= f.end).then_some(s)
        })?;
        self.reserve(Range::new(start, start + size));
        Some(start)
    }

    /// The largest free range, for the heap.
    pub fn largest(&self) -> Option<Range> {
        self.free_ranges().iter().copied().max_by_key(Range::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(addr: u64, size: u64, kind: MemoryKind) -> MemmapEntry {
        MemmapEntry { addr, size, kind }
    }

    /// The map QEMU q35 + SeaBIOS hands a PVH guest with 64 MiB.
    fn qemu_64m() -> [MemmapEntry; 4] {
        [
            e(0, 0x9fc00, MemoryKind::Ram),
            e(0x9fc00, 0x400, MemoryKind::Reserved),
            e(0xf0000, 0x10000, MemoryKind::Reserved),
            e(0x10_0000, 0x3f0_0000 - 0x2_0000, MemoryKind::Ram),
        ]
    }

    #[test]
    fn totals_and_free_ranges() {
        let m = PhysMemory::from_entries(qemu_64m());
        assert_eq!(m.total_ram(), 0x9fc00 + 0x3ee_0000);
        assert_eq!(m.highest_ram(), 0x3fe_0000);
        assert_eq!(
            m.free_ranges(),
            &[Range::new(0, 0x9f000), Range::new(0x10_0000, 0x3fe_0000)]
        );
    }

    #[test]
    fn overlapping_ram_counts_once_and_reserved_wins() {
        let m = PhysMemory::from_entries([
            e(0x10_0000, 0x10_0000, MemoryKind::Ram),
            e(0x18_0000, 0x10_0000, MemoryKind::Ram),
            e(0x20_0000, 0x1000, MemoryKind::AcpiNvs),
        ]);
        assert_eq!(m.total_ram(), 0x18_0000);
        assert_eq!(
            m.free_ranges(),
            &[
                Range::new(0x10_0000, 0x20_0000),
                Range::new(0x20_1000, 0x28_0000)
            ]
        );
    }

    #[test]
    fn reserve_splits_and_allocate_carves_lowest_fit() {
        let mut m = PhysMemory::from_entries(qemu_64m());
        m.reserve(Range::new(0, 0x10_0000));
        m.reserve(Range::new(0x10_0000, 0x12_3456));
        assert_eq!(m.free_ranges(), &[Range::new(0x12_4000, 0x3fe_0000)]);
        let a = m.allocate(100, 0x20_0000).unwrap();
        assert_eq!(a, 0x20_0000);
        assert_eq!(
            m.free_ranges(),
            &[
                Range::new(0x12_4000, 0x20_0000),
                Range::new(0x20_1000, 0x3fe_0000)
            ]
        );
        let b = m.allocate(0x1000, 0).unwrap();
        assert_eq!(b, 0x12_4000);
        assert_eq!(m.allocate(0x1_0000_0000, 0), None);
        assert_eq!(m.allocate(0, 0), None);
        assert_eq!(m.allocate(4096, 3 * 4096), None);
        assert_eq!(m.largest(), Some(Range::new(0x20_1000, 0x3fe_0000)));
    }

    #[test]
    fn hostile_entries_do_not_panic() {
        let m = PhysMemory::from_entries([
            e(u64::MAX - 10, 100, MemoryKind::Ram),
            e(0x5000, 0, MemoryKind::Ram),
            e(7, 3, MemoryKind::Ram),
            e(0, u64::MAX, MemoryKind::Other(42)),
        ]);
        assert_eq!(m.free_bytes(), 0);
        let many: [MemmapEntry; 100] =
            core::array::from_fn(|i| e(i as u64 * 0x2000, 0x1000, MemoryKind::Ram));
        let m = PhysMemory::from_entries(many);
        assert_eq!(m.free_ranges().len(), MAX_RANGES);
        assert_eq!(m.lost_ranges(), 100 - MAX_RANGES);
    }
}
