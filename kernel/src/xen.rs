//! Running under Xen: detection, the hypercall page, and the few
//! hypercalls the kernel needs before the Xen drivers exist: shutting the
//! domain down. (Console output goes to Xen's debug port 0xe9, see
//! `console`.)
//!
//! Detection reads Xen's CPUID leaves; the hypercall page is a page of the
//! kernel image whose physical address is written to the MSR that Xen's
//! leaf `base + 2` names, after which Xen fills it with one 32-byte stub per
//! hypercall.

use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use x86_64::registers::model_specific::Msr;
use xen_shim::hypercall::*;

#[repr(C, align(4096))]
struct HypercallPage([u8; 4096]);

/// Filled by Xen once its physical address is written to the MSR.
static mut HYPERCALL_PAGE: HypercallPage = HypercallPage([0xc3; 4096]); // ret
static PRESENT: AtomicBool = AtomicBool::new(false);
static BASE_LEAF: AtomicU32 = AtomicU32::new(0);

fn cpuid(leaf: u32, sub: u32) -> [u32; 4] {
    // CPUID has no side effects; leaves beyond the maximum return harmless
    // values.
    let r = core::arch::x86_64::__cpuid_count(leaf, sub);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// Looks for Xen and installs the hypercall page; true under Xen.
pub fn init() -> bool {
    let mut leaf = CPUID_BASE_FIRST;
    while leaf < CPUID_BASE_LAST {
        if is_xen_base_leaf(leaf, cpuid(leaf, 0)) {
            let msr = cpuid(leaf + 2, 0)[1];
            let page = core::ptr::addr_of!(HYPERCALL_PAGE) as u64;
            // SAFETY: the MSR is the one Xen names for the hypercall page;
            // the page is identity-mapped kernel memory that nothing else
            // uses, and Xen overwrites it with hypercall stubs.
            unsafe { Msr::new(msr).write(page) };
            BASE_LEAF.store(leaf, Ordering::Relaxed);
            PRESENT.store(true, Ordering::Release);
            return true;
        }
        leaf += 0x100;
    }
    false
}

pub fn present() -> bool {
    PRESENT.load(Ordering::Acquire)
}

/// Xen's version (major, minor), from CPUID.
pub fn version() -> (u32, u32) {
    let v = cpuid(BASE_LEAF.load(Ordering::Relaxed) + 1, 0)[0];
    (v >> 16, v & 0xffff)
}

/// The TSC frequency Xen reports for this domain, if it does.
pub fn tsc_hz() -> Option<u64> {
    if !present() {
        return None;
    }
    let khz = cpuid(BASE_LEAF.load(Ordering::Relaxed) + 3, 0)[2];
    (khz != 0).then(|| u64::from(khz) * 1000)
}

/// A two-argument hypercall.
///
/// # Safety
///
/// The arguments must be valid for hypercall `number` (pointers to memory
/// the hypervisor may read or write as that call defines).
unsafe fn hypercall2(number: u32, a1: u64, a2: u64) -> i64 {
    let entry = core::ptr::addr_of!(HYPERCALL_PAGE) as u64 + u64::from(number) * 32;
    let ret: i64;
    // SAFETY: `entry` is Xen's stub for `number` in the installed page; the
    // stub follows the hypercall ABI (rdi, rsi in; rax out; rcx and r11
    // clobbered by the `vmcall`/`syscall` it contains).
    unsafe {
        core::arch::asm!(
            "call {entry}",
            entry = in(reg) entry,
            inlateout("rdi") a1 => _,
            inlateout("rsi") a2 => _,
            lateout("rax") ret,
            lateout("rcx") _,
            lateout("r11") _,
        );
    }
    ret
}

/// Ends the domain: powered off, or crashed (for failures).
pub fn shutdown(crashed: bool) {
    if !present() {
        return;
    }
    let reason: u32 = if crashed {
        SHUTDOWN_CRASH
    } else {
        SHUTDOWN_POWEROFF
    };
    // SAFETY: SCHEDOP_shutdown reads one `sched_shutdown { u32 reason }`
    // at the pointer, a live local.
    unsafe {
        hypercall2(
            HYPERVISOR_SCHED_OP,
            u64::from(SCHEDOP_SHUTDOWN),
            &reason as *const u32 as u64,
        )
    };
}
