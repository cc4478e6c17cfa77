//! What `virtio-drivers` needs from the kernel: DMA memory, the MMIO map
//! and PCI configuration access, all over the identity map.

use core::ptr::NonNull;

use virtio_drivers::transport::pci::bus::{Command, ConfigurationAccess, DeviceFunction, PciRoot};
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::{BufferDirection, Hal, PhysAddr};

use crate::pci_bus::ConfigAccess;
use crate::phys;

pub struct IdentityHal;

// SAFETY: memory from `dma_alloc` is fresh, zeroed, page-aligned RAM taken
// from the frame allocator and never handed out again; every address is
// identity-mapped, so physical and virtual addresses are the same.
unsafe impl Hal for IdentityHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let region = phys::alloc_dma(pages * 4096);
        (region.0, region.1)
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, _vaddr: NonNull<u8>, _pages: usize) -> i32 {
        // Boot-time allocations live for the kernel's life.
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, size: usize) -> NonNull<u8> {
        if !phys::is_mapped(paddr, size as u64) {
            crate::fatal_boot(format_args!(
                "virtio BAR at {paddr:#x} (+{size:#x}) is not mapped"
            ));
        }
        NonNull::new(paddr as *mut u8).unwrap_or(NonNull::dangling())
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr() as *mut u8 as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

/// `virtio-drivers`' view of configuration space, through ours.
pub struct VirtioConfigAccess(pub ConfigAccess);

fn address(df: DeviceFunction) -> pci_types::PciAddress {
    pci_types::PciAddress::new(0, df.bus, df.device, df.function)
}

impl ConfigurationAccess for VirtioConfigAccess {
    fn read_word(&self, df: DeviceFunction, register_offset: u8) -> u32 {
        use pci_types::ConfigRegionAccess;
        // SAFETY: a dword-aligned register of a function found by
        // enumeration; configuration reads have no memory effect.
        unsafe { self.0.read(address(df), u16::from(register_offset)) }
    }

    fn write_word(&mut self, df: DeviceFunction, register_offset: u8, data: u32) {
        use pci_types::ConfigRegionAccess;
        // SAFETY: `virtio-drivers` writes only the command register, BARs
        // (while sizing them) and virtio capability fields of the function.
        unsafe { self.0.write(address(df), u16::from(register_offset), data) }
    }

    unsafe fn unsafe_clone(&self) -> Self {
        Self(self.0)
    }
}

/// Opens the virtio PCI transport of one function, with memory decoding
/// and bus mastering on.
pub fn transport(
    access: ConfigAccess,
    bus: u8,
    device: u8,
    function: u8,
) -> Result<PciTransport, &'static str> {
    let mut root = PciRoot::new(VirtioConfigAccess(access));
    let df = DeviceFunction {
        bus,
        device,
        function,
    };
    root.set_command(
        df,
        Command::MEMORY_SPACE | Command::IO_SPACE | Command::BUS_MASTER,
    );
    PciTransport::new::<IdentityHal, _>(&mut root, df).map_err(|_| "not a usable virtio PCI device")
}
