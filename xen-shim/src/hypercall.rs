//! Numbers of the Xen interface that the kernel's hypercall layer uses
//! (`xen/include/public/xen.h`, `sched.h`, `arch-x86/cpuid.h`), and the
//! decoding of Xen's CPUID leaves.

/// Hypercall numbers (the offset in the hypercall page is `number * 32`).
pub const HYPERVISOR_SCHED_OP: u32 = 29;
pub const HYPERVISOR_EVENT_CHANNEL_OP: u32 = 32;
pub const HYPERVISOR_HVM_OP: u32 = 34;

/// `HVMOP_get_param`, the parameters read with it, and `DOMID_SELF`.
pub const HVMOP_GET_PARAM: u32 = 1;
pub const HVM_PARAM_STORE_PFN: u32 = 1;
pub const HVM_PARAM_STORE_EVTCHN: u32 = 2;
pub const HVM_PARAM_CONSOLE_PFN: u32 = 17;
pub const HVM_PARAM_CONSOLE_EVTCHN: u32 = 18;
pub const DOMID_SELF: u16 = 0x7ff0;

/// `EVTCHNOP_send`.
pub const EVTCHNOP_SEND: u32 = 4;

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

/// The PV console ring page (`io/console.h`, `xencons_interface`): input
/// ring, output ring, then four 32-bit indices.
pub mod console_ring {
    pub const OUT: usize = 1024;
    pub const OUT_SIZE: u32 = 2048;
    pub const OUT_CONS: usize = 3080;
    pub const OUT_PROD: usize = 3084;

    /// Bytes that can be written now, given the indices the page holds; a
    /// consumer index that is ahead of the producer or more than a ring
    /// behind (which only a broken or hostile peer writes) means no room.
    pub fn room(prod: u32, cons: u32) -> u32 {
        let used = prod.wrapping_sub(cons);
        OUT_SIZE.saturating_sub(used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs(sig: &[u8; 12], max: u32) -> [u32; 4] {
        let w = |i: usize| u32::from_le_bytes([sig[i], sig[i + 1], sig[i + 2], sig[i + 3]]);
        [max, w(0), w(4), w(8)]
    }

    #[test]
    fn console_ring_room_is_bounded() {
        use console_ring::room;
        assert_eq!(room(0, 0), 2048);
        assert_eq!(room(100, 50), 1998);
        assert_eq!(room(2048, 0), 0);
        assert_eq!(room(u32::MAX, u32::MAX - 10), 2038, "wraps");
        assert_eq!(room(10, 20), 0, "consumer ahead of producer");
        assert_eq!(room(5000, 0), 0, "more than a ring behind");
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
