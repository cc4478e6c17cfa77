//! Portcullis kernel: the logic half.
//!
//! The kernel crate has two halves. This library holds the parts that are
//! decisions rather than hardware access — the boot command line, the memory
//! map and frame allocation, PCI identification — so they build and are
//! tested on the host with `cargo test -p kernel --lib`. The binary
//! (`src/main.rs`, target `x86_64-unknown-none`) owns every `unsafe` line:
//! the PVH entry, page tables, descriptor tables, port and MMIO access, ACPI
//! and PCI configuration space, and the wiring of the dataplane. Nothing here
//! may touch hardware or allocate on a packet path.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

pub mod cmdline;
pub mod memmap;
pub mod pci_ids;
pub mod virtio_pci;
