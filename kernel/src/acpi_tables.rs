//! ACPI discovery: the CPUs (MADT) and PCI Express configuration space
//! (MCFG), through the `acpi` crate over the identity map.

use alloc::vec::Vec;
use core::ptr::NonNull;

use acpi::madt::{Madt, MadtEntry};
use acpi::mcfg::Mcfg;
use acpi::{AcpiHandler, AcpiTables, PhysicalMapping};

use crate::phys;

/// ECAM window for one PCI segment, from the MCFG.
#[derive(Debug, Clone, Copy)]
pub struct Ecam {
    pub base: u64,
    pub bus_start: u8,
    pub bus_end: u8,
}

pub struct AcpiInfo {
    /// APIC ids of the usable CPUs, boot CPU first as the MADT lists it.
    pub cpus: Vec<u32>,
    pub ecam: Option<Ecam>,
}

/// Identity map: a physical range is at the same virtual address.
#[derive(Clone, Copy)]
struct IdentityMapped;

impl AcpiHandler for IdentityMapped {
    unsafe fn map_physical_region<T>(
        &self,
        physical_address: usize,
        size: usize,
    ) -> PhysicalMapping<Self, T> {
        if !phys::is_mapped(physical_address as u64, size as u64) {
            crate::fatal_boot(format_args!(
                "ACPI table at {physical_address:#x} (+{size:#x}) outside mapped memory"
            ));
        }
        let Some(ptr) = NonNull::new(physical_address as *mut T) else {
            crate::fatal_boot(format_args!("ACPI table at address 0"));
        };
        // SAFETY: the range is identity-mapped (checked above) and the
        // caller promises it holds a `T`; unmapping is a no-op.
        unsafe { PhysicalMapping::new(physical_address, ptr, size, size, *self) }
    }

    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
}

/// Reads the MADT and MCFG. `rsdp` 0 means the loader gave none, and the
/// BIOS area is searched (QEMU's PVH ROM passes it; Xen always does).
pub fn discover(rsdp: u64) -> Option<AcpiInfo> {
    let tables = if rsdp != 0 {
        // SAFETY: the loader gave this as the RSDP address; the handler
        // refuses ranges that are not mapped.
        unsafe { AcpiTables::from_rsdp(IdentityMapped, rsdp as usize) }
    } else {
        // SAFETY: the BIOS area below 1 MiB is identity-mapped RAM/ROM.
        unsafe { AcpiTables::search_for_rsdp_bios(IdentityMapped) }
    };
    let tables = match tables {
        Ok(t) => t,
        Err(e) => {
            log::warn!("acpi: no usable tables ({e:?})");
            return None;
        }
    };
    log::info!("acpi: rsdp {:#x} revision {}", rsdp, tables.revision());
    for h in tables.headers() {
        log::debug!("acpi: table {}", h.signature);
    }

    let mut cpus = Vec::new();
    match tables.find_table::<Madt>() {
        Ok(madt) => {
            for entry in madt.get().entries() {
                // Flags bit 0: enabled; bit 1: online capable (hot-pluggable).
                match entry {
                    MadtEntry::LocalApic(e) if e.flags & 1 != 0 => cpus.push(u32::from(e.apic_id)),
                    MadtEntry::LocalX2Apic(e) if e.flags & 1 != 0 => cpus.push(e.x2apic_id),
                    _ => {}
                }
            }
        }
        Err(e) => log::warn!("acpi: no MADT ({e:?})"),
    }
    if cpus.is_empty() {
        cpus.push(0);
    }

    let ecam = tables.find_table::<Mcfg>().ok().and_then(|mcfg| {
        mcfg.entries()
            .iter()
            .find(|e| e.pci_segment_group == 0)
            .map(|e| Ecam {
                base: e.base_address,
                bus_start: e.bus_number_start,
                bus_end: e.bus_number_end,
            })
    });
    Some(AcpiInfo { cpus, ecam })
}
