//! PCI enumeration: configuration space through ECAM (when the MCFG gives
//! one) or the legacy 0xcf8/0xcfc ports, and a boot-report line for each
//! function with its BARs.

use alloc::vec::Vec;

use kernel::memmap::Range;
use kernel::pci_ids;
use pci_types::{Bar, ConfigRegionAccess, EndpointHeader, HeaderType, PciAddress, PciHeader};
use x86_64::instructions::port::Port;

use crate::acpi_tables::Ecam;
use kernel::memmap::PhysMemory;

use crate::phys;

/// How configuration space is reached.
#[derive(Clone, Copy)]
pub enum ConfigAccess {
    /// Configuration mechanism #1 (ports 0xcf8/0xcfc), segment 0 only.
    Legacy,
    Ecam(Ecam),
}

impl ConfigAccess {
    fn ecam_addr(e: &Ecam, a: PciAddress, offset: u16) -> u64 {
        let bus = u64::from(a.bus() - e.bus_start);
        e.base
            + (bus << 20
                | u64::from(a.device()) << 15
                | u64::from(a.function()) << 12
                | u64::from(offset & 0xffc))
    }

    fn legacy_addr(a: PciAddress, offset: u16) -> u32 {
        0x8000_0000
            | u32::from(a.bus()) << 16
            | u32::from(a.device()) << 11
            | u32::from(a.function()) << 8
            | u32::from(offset & 0xfc)
    }
}

impl ConfigRegionAccess for ConfigAccess {
    unsafe fn read(&self, address: PciAddress, offset: u16) -> u32 {
        match self {
            // SAFETY: the ECAM window was mapped uncached in `enumerate`, and
            // the address lies inside it for buses in the MCFG's range.
            Self::Ecam(e) => unsafe {
                (Self::ecam_addr(e, address, offset) as *const u32).read_volatile()
            },
            // SAFETY: mechanism #1 ports; a read has no effect on memory.
            Self::Legacy => unsafe {
                Port::<u32>::new(0xcf8).write(Self::legacy_addr(address, offset));
                Port::<u32>::new(0xcfc).read()
            },
        }
    }

    unsafe fn write(&self, address: PciAddress, offset: u16, value: u32) {
        match self {
            // SAFETY: as in `read`; the caller vouches for the register.
            Self::Ecam(e) => unsafe {
                (Self::ecam_addr(e, address, offset) as *mut u32).write_volatile(value)
            },
            // SAFETY: as in `read`; the caller vouches for the register.
            Self::Legacy => unsafe {
                Port::<u32>::new(0xcf8).write(Self::legacy_addr(address, offset));
                Port::<u32>::new(0xcfc).write(value);
            },
        }
    }
}

/// One function found on the bus.
#[derive(Debug, Clone, Copy)]
pub struct PciFunction {
    pub address: PciAddress,
    pub vendor: u16,
    pub device: u16,
}

/// Scans every bus the access method covers and prints each function.
pub fn enumerate(ecam: Option<Ecam>, mem: &mut PhysMemory) -> (ConfigAccess, Vec<PciFunction>) {
    let access = match ecam {
        Some(e) => {
            let len = (u64::from(e.bus_end) - u64::from(e.bus_start) + 1) << 20;
            // Pages the boot map already covers keep their attributes; the
            // firmware's MTRRs make the MMIO hole below 4 GiB uncached.
            phys::map_identity(Range::new(e.base, e.base + len), true, mem);
            println!(
                "pci: ecam at {:#x}, buses {}-{}",
                e.base, e.bus_start, e.bus_end
            );
            ConfigAccess::Ecam(e)
        }
        None => {
            println!("pci: legacy configuration ports, buses 0-255");
            ConfigAccess::Legacy
        }
    };
    let (first, last) = match ecam {
        Some(e) => (e.bus_start, e.bus_end),
        None => (0, 255),
    };
    let mut found = Vec::new();
    for bus in first..=last {
        for device in 0..32 {
            let header = PciHeader::new(PciAddress::new(0, bus, device, 0));
            if header.id(access).0 == 0xffff {
                continue;
            }
            let functions = if header.has_multiple_functions(access) {
                8
            } else {
                1
            };
            for function in 0..functions {
                let header = PciHeader::new(PciAddress::new(0, bus, device, function));
                if let Some(f) = describe(access, header) {
                    found.push(f);
                }
            }
        }
    }
    (access, found)
}

fn describe(access: ConfigAccess, header: PciHeader) -> Option<PciFunction> {
    let (vendor, device) = header.id(access);
    if vendor == 0xffff {
        return None;
    }
    let (_rev, class, subclass, interface) = header.revision_and_class(access);
    let a = header.address();
    let name = pci_ids::device_name(vendor, device).unwrap_or(pci_ids::class_name(class, subclass));
    println!(
        "pci {:04x}:{:02x}:{:02x}.{} {vendor:04x}:{device:04x} class {class:02x}.{subclass:02x}.{interface:02x} {name}",
        a.segment(),
        a.bus(),
        a.device(),
        a.function()
    );
    if header.header_type(access) == HeaderType::Endpoint {
        if let Some(endpoint) = EndpointHeader::from_header(header, access) {
            print_bars(access, &endpoint);
        }
    }
    Some(PciFunction {
        address: a,
        vendor,
        device,
    })
}

fn print_bars(access: ConfigAccess, endpoint: &EndpointHeader) {
    let mut slot = 0;
    while slot < 6 {
        let bar = endpoint.bar(slot, access);
        match bar {
            Some(Bar::Memory32 {
                address,
                size,
                prefetchable,
            }) => println!(
                "    bar{slot} mem32{} {address:#x} size {size:#x}",
                if prefetchable { " prefetchable" } else { "" }
            ),
            Some(Bar::Memory64 {
                address,
                size,
                prefetchable,
            }) => println!(
                "    bar{slot} mem64{} {address:#x} size {size:#x}",
                if prefetchable { " prefetchable" } else { "" }
            ),
            Some(Bar::Io { port }) => println!("    bar{slot} io {port:#x}"),
            None => {}
        }
        slot += if matches!(bar, Some(Bar::Memory64 { .. })) {
            2
        } else {
            1
        };
    }
}
