//! The PVH start-of-day structure (`xen/include/public/arch-x86/hvm/start_info.h`).
//!
//! A PVH kernel is entered in 32-bit protected mode with `%ebx` holding the
//! physical address of an `hvm_start_info`. Version 1 of the structure adds a
//! memory map, which both Xen (4.11+) and QEMU's PVH option ROM provide.

/// `XEN_HVM_START_MAGIC_VALUE`.
pub const START_INFO_MAGIC: u32 = 0x336e_c578;
/// Bytes of a version-1 `hvm_start_info`.
pub const START_INFO_SIZE: usize = 56;
/// Bytes of one `hvm_memmap_table_entry`.
pub const MEMMAP_ENTRY_SIZE: usize = 24;
/// More entries than this is treated as corrupt rather than read.
pub const MAX_MEMMAP_ENTRIES: u32 = 128;

/// Why a start-info structure was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartInfoError {
    /// The magic value is wrong: this was not entered through PVH.
    BadMagic(u32),
    /// Version 0 carries no memory map, and the kernel needs one.
    NoMemoryMap { version: u32 },
    /// The memory map claims an implausible number of entries.
    TooManyEntries(u32),
}

impl core::fmt::Display for StartInfoError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::BadMagic(m) => {
                write!(f, "start info magic {m:#x}, expected {START_INFO_MAGIC:#x}")
            }
            Self::NoMemoryMap { version } => {
                write!(f, "start info version {version} has no memory map")
            }
            Self::TooManyEntries(n) => {
                write!(
                    f,
                    "memory map claims {n} entries (at most {MAX_MEMMAP_ENTRIES})"
                )
            }
        }
    }
}

/// The fields of `hvm_start_info` that Portcullis uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartInfo {
    pub version: u32,
    pub flags: u32,
    pub nr_modules: u32,
    pub modlist_paddr: u64,
    /// Physical address of a NUL-terminated command line, or 0.
    pub cmdline_paddr: u64,
    /// Physical address of the ACPI RSDP, or 0 when the loader gave none.
    pub rsdp_paddr: u64,
    pub memmap_paddr: u64,
    pub memmap_entries: u32,
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

impl StartInfo {
    /// Decodes the structure from its bytes.
    pub fn parse(raw: &[u8; START_INFO_SIZE]) -> Result<Self, StartInfoError> {
        let magic = u32_at(raw, 0);
        if magic != START_INFO_MAGIC {
            return Err(StartInfoError::BadMagic(magic));
        }
        let version = u32_at(raw, 4);
        if version < 1 {
            return Err(StartInfoError::NoMemoryMap { version });
        }
        let memmap_entries = u32_at(raw, 48);
        if memmap_entries > MAX_MEMMAP_ENTRIES {
            return Err(StartInfoError::TooManyEntries(memmap_entries));
        }
        Ok(Self {
            version,
            flags: u32_at(raw, 8),
            nr_modules: u32_at(raw, 12),
            modlist_paddr: u64_at(raw, 16),
            cmdline_paddr: u64_at(raw, 24),
            rsdp_paddr: u64_at(raw, 32),
            memmap_paddr: u64_at(raw, 40),
            memmap_entries,
        })
    }
}

/// The kind of a memory-map range (E820 numbering, which PVH reuses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryKind {
    Ram,
    Reserved,
    AcpiReclaimable,
    AcpiNvs,
    Unusable,
    Disabled,
    Persistent,
    Other(u32),
}

impl MemoryKind {
    pub fn from_raw(raw: u32) -> Self {
        match raw {
            1 => Self::Ram,
            2 => Self::Reserved,
            3 => Self::AcpiReclaimable,
            4 => Self::AcpiNvs,
            5 => Self::Unusable,
            6 => Self::Disabled,
            7 => Self::Persistent,
            other => Self::Other(other),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Ram => "ram",
            Self::Reserved => "reserved",
            Self::AcpiReclaimable => "acpi",
            Self::AcpiNvs => "acpi-nvs",
            Self::Unusable => "unusable",
            Self::Disabled => "disabled",
            Self::Persistent => "persistent",
            Self::Other(_) => "other",
        }
    }
}

/// One `hvm_memmap_table_entry`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemmapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: MemoryKind,
}

impl MemmapEntry {
    pub fn parse(raw: &[u8; MEMMAP_ENTRY_SIZE]) -> Self {
        Self {
            addr: u64_at(raw, 0),
            size: u64_at(raw, 8),
            kind: MemoryKind::from_raw(u32_at(raw, 16)),
        }
    }

    /// End address (exclusive), saturating so a hostile size cannot wrap.
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(version: u32, entries: u32) -> [u8; START_INFO_SIZE] {
        let mut r = [0u8; START_INFO_SIZE];
        r[0..4].copy_from_slice(&START_INFO_MAGIC.to_le_bytes());
        r[4..8].copy_from_slice(&version.to_le_bytes());
        r[24..32].copy_from_slice(&0x1234_5678u64.to_le_bytes());
        r[32..40].copy_from_slice(&0xf_5a40u64.to_le_bytes());
        r[40..48].copy_from_slice(&0x9000u64.to_le_bytes());
        r[48..52].copy_from_slice(&entries.to_le_bytes());
        r
    }

    #[test]
    fn parses_version_1() {
        let si = StartInfo::parse(&raw(1, 6)).unwrap();
        assert_eq!(si.cmdline_paddr, 0x1234_5678);
        assert_eq!(si.rsdp_paddr, 0xf_5a40);
        assert_eq!(si.memmap_paddr, 0x9000);
        assert_eq!(si.memmap_entries, 6);
    }

    #[test]
    fn refuses_bad_magic_old_version_and_huge_maps() {
        let mut r = raw(1, 1);
        r[0] ^= 1;
        assert!(matches!(
            StartInfo::parse(&r),
            Err(StartInfoError::BadMagic(_))
        ));
        assert_eq!(
            StartInfo::parse(&raw(0, 1)),
            Err(StartInfoError::NoMemoryMap { version: 0 })
        );
        assert_eq!(
            StartInfo::parse(&raw(1, 100_000)),
            Err(StartInfoError::TooManyEntries(100_000))
        );
    }

    #[test]
    fn memmap_entry_decodes_and_end_saturates() {
        let mut r = [0u8; MEMMAP_ENTRY_SIZE];
        r[0..8].copy_from_slice(&0x10_0000u64.to_le_bytes());
        r[8..16].copy_from_slice(&0x3f0_0000u64.to_le_bytes());
        r[16..20].copy_from_slice(&1u32.to_le_bytes());
        let e = MemmapEntry::parse(&r);
        assert_eq!(e.kind, MemoryKind::Ram);
        assert_eq!(e.end(), 0x400_0000);
        r[0..8].copy_from_slice(&u64::MAX.to_le_bytes());
        r[16..20].copy_from_slice(&99u32.to_le_bytes());
        let e = MemmapEntry::parse(&r);
        assert_eq!(e.end(), u64::MAX);
        assert_eq!(e.kind, MemoryKind::Other(99));
    }
}
