//! What `virtio-drivers` needs from the kernel: DMA memory, the MMIO map
//! and PCI configuration access, all over the identity map.

use core::ptr::NonNull;

use virtio_drivers::transport::pci::bus::{Command, ConfigurationAccess, DeviceFunction, PciRoot};
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::{BufferDirection, Hal, PhysAddr};

use alloc::vec::Vec;

use drivers::virtio_net::{Doorbell, Platform};
use kernel::virtio_pci::{self, QUEUE_NOTIFY_OFF, QUEUE_SELECT};

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

/// Ring memory from the frame allocator, and each queue's doorbell read
/// from the device's notification capability (`kernel::virtio_pci`).
pub struct NetPlatform {
    /// Per queue index: its notification register's address.
    bells: Vec<Option<u64>>,
}

impl NetPlatform {
    /// Finds the notification registers of the first `queues` queues of
    /// the function at `bus:device.function` (after `transport` enabled
    /// its memory decoding). Without the capabilities, or with a register
    /// outside the mapped BAR, the queue notifies through the transport.
    pub fn new(access: ConfigAccess, bus: u8, device: u8, function: u8, queues: u16) -> Self {
        let address = pci_types::PciAddress::new(0, bus, device, function);
        let read = |off: u16| {
            use pci_types::ConfigRegionAccess;
            // SAFETY: a dword-aligned register of an enumerated function;
            // configuration reads have no memory effect.
            unsafe { access.read(address, off) }
        };
        let bells = virtio_pci::find_caps(read)
            .and_then(|caps| {
                let common =
                    virtio_pci::bar_address(read, caps.common.bar)? + u64::from(caps.common.offset);
                let notify = virtio_pci::bar_address(read, caps.notify.bar)?;
                phys::is_mapped(common, u64::from(caps.common.length)).then_some(())?;
                Some(
                    (0..queues)
                        .map(|q| {
                            // SAFETY: `common` is the device's mapped common
                            // configuration (checked above); selecting a queue
                            // and reading its notification offset changes
                            // nothing else, and nothing else uses the device
                            // while it is being set up.
                            let off = unsafe {
                                ((common + QUEUE_SELECT) as *mut u16).write_volatile(q.to_le());
                                u16::from_le(
                                    ((common + QUEUE_NOTIFY_OFF) as *const u16).read_volatile(),
                                )
                            };
                            virtio_pci::notify_address(&caps, notify, off)
                                .filter(|a| a % 2 == 0 && phys::is_mapped(*a, 2))
                        })
                        .collect(),
                )
            })
            .unwrap_or_default();
        Self { bells }
    }
}

impl Platform for NetPlatform {
    fn dma(&mut self, bytes: usize) -> drivers::DmaRegion {
        phys::dma_region(bytes)
    }

    fn doorbell(&mut self, queue: u16) -> Option<Doorbell> {
        let addr = (*self.bells.get(usize::from(queue))?)?;
        let reg = core::ptr::NonNull::new(addr as *mut u16)?;
        // SAFETY: the queue's notification register inside the device's
        // mapped BAR, 2-aligned (checked in `new`); device memory lives as
        // long as the kernel.
        Some(unsafe { Doorbell::new(reg) })
    }
}
