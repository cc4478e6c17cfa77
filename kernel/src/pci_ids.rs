//! Names for the PCI functions a firewall VM meets, for the boot report.

/// Red Hat / virtio vendor id.
pub const VENDOR_VIRTIO: u16 = 0x1af4;

/// A short name for a known vendor/device pair.
pub fn device_name(vendor: u16, device: u16) -> Option<&'static str> {
    Some(match (vendor, device) {
        (VENDOR_VIRTIO, 0x1000) => "virtio-net (transitional)",
        (VENDOR_VIRTIO, 0x1041) => "virtio-net",
        (VENDOR_VIRTIO, 0x1001 | 0x1042) => "virtio-blk",
        (VENDOR_VIRTIO, 0x1005 | 0x1044) => "virtio-rng",
        (0x8086, 0x29c0) => "q35 host bridge",
        (0x8086, 0x2918) => "ich9 lpc bridge",
        (0x8086, 0x2922) => "ich9 ahci",
        (0x8086, 0x2930) => "ich9 smbus",
        (0x8086, 0x1237) => "i440fx host bridge",
        (0x8086, 0x7000) => "piix3 isa bridge",
        (0x8086, 0x100e) => "e1000",
        (0x8086, 0x10d3) => "e1000e",
        (0x1234, 0x1111) => "vga",
        _ => return None,
    })
}

/// A short name for a base class / subclass pair.
pub fn class_name(class: u8, subclass: u8) -> &'static str {
    match (class, subclass) {
        (0x01, 0x06) => "sata controller",
        (0x01, _) => "storage controller",
        (0x02, 0x00) => "ethernet controller",
        (0x02, _) => "network controller",
        (0x03, _) => "display controller",
        (0x06, 0x00) => "host bridge",
        (0x06, 0x01) => "isa bridge",
        (0x06, 0x04) => "pci bridge",
        (0x06, _) => "bridge",
        (0x0c, 0x05) => "smbus",
        (0x0c, _) => "serial bus controller",
        (0xff, _) => "unassigned class",
        _ => "other",
    }
}

/// Whether a function is a virtio network device (modern or transitional).
pub fn is_virtio_net(vendor: u16, device: u16) -> bool {
    vendor == VENDOR_VIRTIO && matches!(device, 0x1000 | 0x1041)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(device_name(0x1af4, 0x1041), Some("virtio-net"));
        assert_eq!(device_name(0xdead, 0xbeef), None);
        assert_eq!(class_name(2, 0), "ethernet controller");
        assert_eq!(class_name(0x42, 1), "other");
        assert!(is_virtio_net(0x1af4, 0x1000));
        assert!(!is_virtio_net(0x1af4, 0x1001));
    }
}
