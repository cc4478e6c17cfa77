//! Numbers of the Xen interface that the kernel's hypercall layer uses
//! (`xen/include/public/xen.h`, `sched.h`, `arch-x86/cpuid.h`), and the
//! decoding of Xen's CPUID leaves.

/// Hypercall numbers (the offset in the hypercall page is `number * 32`).
pub const HYPERVISOR_SCHED_OP: u32 = 29;

/// `SCHEDOP_shutdown` and its reasons.
pub const SCHEDOP_SHUTDOWN: u32 = 2;
pub const SHUTDOWN_POWEROFF: u32 = 0;
pub const SHUTDOWN_CRASH: u32 = 3;

/// The signature Xen puts in EBX, ECX, EDX of its base CPUID leaf.
pub const XEN_SIGNATURE: &[u8; 12] = b"XenVMMXenVMM";
/// Xen's leaves start at 0x40000000 and may be moved up in steps of 0x100
/// (when another hypervisor interface is offered first).
pub const CPUID_BASE_FIRST: u32 = 0x4000_0000;
pub const CPUID_BASE_LAST: u32 = 0x4001_0000;

/// Whether a CPUID result (EAX, EBX, ECX, EDX) is Xen's base leaf; Xen's
/// base leaf reports at least two more leaves (version, hypercall page).
pub fn is_xen_base_leaf(leaf: u32, r: [u32; 4]) -> bool {
    let mut sig = [0u8; 12];
    sig[0..4].copy_from_slice(&r[1].to_le_bytes());
    sig[4..8].copy_from_slice(&r[2].to_le_bytes());
    sig[8..12].copy_from_slice(&r[3].to_le_bytes());
    &sig == XEN_SIGNATURE && r[0] >= leaf + 2
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs(sig: &[u8; 12], max: u32) -> [u32; 4] {
        let w = |i: usize| u32::from_le_bytes([sig[i], sig[i + 1], sig[i + 2], sig[i + 3]]);
        [max, w(0), w(4), w(8)]
    }

    #[test]
    fn recognises_xen_and_nothing_else() {
        assert!(is_xen_base_leaf(
            0x4000_0000,
            regs(XEN_SIGNATURE, 0x4000_0005)
        ));
        assert!(is_xen_base_leaf(
            0x4000_0100,
            regs(XEN_SIGNATURE, 0x4000_0104)
        ));
        assert!(!is_xen_base_leaf(
            0x4000_0000,
            regs(b"KVMKVMKVM\0\0\0", 0x4000_0001)
        ));
        assert!(
            !is_xen_base_leaf(0x4000_0000, regs(XEN_SIGNATURE, 0x4000_0001)),
            "too few leaves"
        );
    }
}
