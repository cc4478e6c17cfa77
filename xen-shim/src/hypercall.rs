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
/// `SCHEDOP_poll`: block until one of the given event channels is pending
/// or the timeout (Xen system time, ns; 0 for none) passes. Its argument,
/// `sched_poll { u64 ports (guest pointer); u32 nr_ports; u32 pad; u64
/// timeout }`, is `SchedPoll`.
pub const SCHEDOP_POLL: u32 = 3;

/// `struct sched_poll` as the x86-64 ABI lays it out.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedPoll {
    pub ports: u64,
    pub nr_ports: u32,
    pub pad: u32,
    pub timeout: u64,
}

/// Where vCPU 0's `vcpu_time_info` sits in the shared-info page
/// (`vcpu_info[0]`: upcall flags and selector, 16 bytes of `arch_vcpu_info`,
/// then the time record), and its size.
pub const VCPU0_TIME: usize = 32;
pub const VCPU_TIME_SIZE: usize = 32;

/// `struct vcpu_time_info` (`xen.h`): Xen's system time (ns since boot) at
/// TSC `tsc_timestamp`, and how TSC ticks scale to ns. Xen updates it
/// under `version`: odd while being written, changed when written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VcpuTime {
    pub version: u32,
    pub tsc_timestamp: u64,
    pub system_time: u64,
    pub tsc_to_system_mul: u32,
    pub tsc_shift: i8,
}

impl VcpuTime {
    /// Decodes the 32-byte record.
    pub fn decode(b: &[u8; VCPU_TIME_SIZE]) -> Self {
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| u64::from(u32_at(o)) | (u64::from(u32_at(o + 4)) << 32);
        Self {
            version: u32_at(0),
            tsc_timestamp: u64_at(8),
            system_time: u64_at(16),
            tsc_to_system_mul: u32_at(24),
            tsc_shift: b[28] as i8,
        }
    }

    /// Whether Xen has filled it in (a stable version and a scale).
    pub fn valid(&self) -> bool {
        self.version.is_multiple_of(2) && self.tsc_to_system_mul != 0
    }

    /// Xen system time at TSC value `tsc`, in ns (`pvclock`'s scaling: the
    /// TSC delta shifted by `tsc_shift`, times `tsc_to_system_mul / 2^32`).
    pub fn system_time_ns(&self, tsc: u64) -> u64 {
        let delta = tsc.saturating_sub(self.tsc_timestamp);
        let shifted = match self.tsc_shift {
            s if s < 0 => delta >> s.unsigned_abs().min(63),
            s => delta.checked_shl(s as u32).unwrap_or(u64::MAX),
        };
        let scaled = (u128::from(shifted) * u128::from(self.tsc_to_system_mul)) >> 32;
        self.system_time
            .saturating_add(u64::try_from(scaled).unwrap_or(u64::MAX))
    }
}
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

    #[test]
    fn xen_system_time_from_the_tsc() {
        let mut raw = [0u8; VCPU_TIME_SIZE];
        raw[0..4].copy_from_slice(&2u32.to_le_bytes());
        raw[8..16].copy_from_slice(&1_000_000u64.to_le_bytes());
        raw[16..24].copy_from_slice(&5_000_000_000u64.to_le_bytes());
        // A 2 GHz TSC: shift -1 then x(2^32 - 1)/2^32 ~ 0.5 ns per tick.
        raw[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
        raw[28] = (-1i8) as u8;
        let t = VcpuTime::decode(&raw);
        assert!(t.valid());
        assert_eq!(t.system_time_ns(1_000_000), 5_000_000_000);
        // 2e9 ticks later: one second (less the scale's rounding).
        let later = t.system_time_ns(2_001_000_000);
        assert!((5_999_999_990..=6_000_000_000).contains(&later), "{later}");
        // A TSC before the timestamp does not go back in time.
        assert_eq!(t.system_time_ns(0), 5_000_000_000);
        // Positive shift: a 500 MHz TSC (shift 1, mul 2^32 - 1).
        raw[28] = 1;
        let t = VcpuTime::decode(&raw);
        let later = t.system_time_ns(1_000_000 + 500_000_000);
        assert!(
            (999_999_990 + 4_000_000_000..=6_000_000_000).contains(&later),
            "{later}"
        );
        // Being written (odd version), or never filled: not valid.
        raw[0] = 3;
        assert!(!VcpuTime::decode(&raw).valid());
        assert!(!VcpuTime::default().valid());
        assert_eq!(core::mem::size_of::<SchedPoll>(), 24);
    }

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
