//! Starting the application processors (APs) that the MADT lists.
//!
//! Under QEMU (and on hardware) each AP is started with the local APIC's
//! INIT-SIPI-SIPI sequence into the real-mode trampoline of `ap_boot.S`,
//! copied to `AP_BASE`. APs are started one at a time, since they share the
//! trampoline's data words; each gets its own stack, GDT, TSS and IST stack
//! and reports itself online. One that does not report within
//! `START_TIMEOUT_MS` is reported and left out, never waited on forever.
//! Online APs wait for a task (`run_on`) — the dataplane's firewall core,
//! say — and those left without one are parked in `hlt` (`park_idle`).
//! (Xen PVH starts vCPUs with `VCPUOP_up` instead; that comes with the Xen
//! work.)

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};

use x86_64::registers::control::Cr3;

use crate::{clock, cpu, lapic, phys};

/// Where the trampoline runs: below 1 MiB, page aligned (SIPI vector 0x08).
const AP_BASE: u64 = 0x8000;
const ICR_PENDING: u32 = 1 << 12;
const AP_STACK_SIZE: usize = 64 * 1024;
const START_TIMEOUT_MS: u64 = 200;

extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_end: u8;
    static ap_cr3: u8;
    static ap_stack: u8;
    static ap_entry: u8;
    static ap_arg: u8;
}

/// Set by an AP once it runs on its own tables; cleared before each start.
static STARTED: AtomicBool = AtomicBool::new(false);
/// CPUs running, the boot CPU included.
static ONLINE: AtomicU32 = AtomicU32::new(1);
/// Most CPUs the kernel drives (by MADT position).
pub const MAX_CPUS: usize = 64;
/// Bit `i` set: the CPU at MADT position `i` is an online AP.
static ONLINE_APS: AtomicU64 = AtomicU64::new(0);
/// Work handed to each AP: null (none yet), `PARK`, or a leaked
/// `Box<Task>`.
static WORK: [AtomicPtr<()>; MAX_CPUS] =
    [const { AtomicPtr::new(core::ptr::null_mut()) }; MAX_CPUS];
const PARK: *mut () = core::ptr::dangling_mut::<()>();

/// A job an AP runs once it is handed it.
pub type Task = Box<dyn FnOnce() + Send>;

fn send_ipi(apic_id: u32, low: u32) {
    lapic::write(lapic::ICR_HIGH, apic_id << 24);
    lapic::write(lapic::ICR_LOW, low);
    for _ in 0..100_000 {
        if lapic::read(lapic::ICR_LOW) & ICR_PENDING == 0 {
            break;
        }
        core::hint::spin_loop();
    }
}

/// Offset of a trampoline symbol from the start of the blob.
fn offset_of(sym: *const u8) -> u64 {
    sym as u64 - core::ptr::addr_of!(ap_trampoline_start) as u64
}

fn put_data(sym: *const u8, value: u64) {
    let at = AP_BASE + offset_of(sym);
    // SAFETY: `at` lies inside the trampoline copy at AP_BASE (checked to be
    // mapped low RAM), 8-aligned by `.balign 8`; no AP reads it until the
    // next SIPI.
    unsafe { (at as *mut u64).write_volatile(value) }
}

/// What starting the APs gave.
pub struct SmpReport {
    /// APIC ids of the CPUs online, the boot CPU first.
    pub online: Vec<u32>,
    /// APIC ids of the CPUs that did not start.
    pub failed: Vec<u32>,
}

/// Starts every CPU in `apic_ids` other than the boot CPU.
pub fn start_aps(apic_ids: &[u32]) -> SmpReport {
    let mut report = SmpReport {
        online: Vec::new(),
        failed: Vec::new(),
    };
    if !lapic::present() {
        log::warn!(
            "smp: no local APIC at {:#x}; running on the boot CPU only",
            lapic::BASE
        );
        report.online.push(apic_ids.first().copied().unwrap_or(0));
        report.failed.extend(apic_ids.iter().skip(1));
        return report;
    }
    let bsp = lapic::read(lapic::ID) >> 24;
    report.online.push(bsp);
    // SAFETY: only the addresses of the linker symbols are taken.
    let (start, end) = (
        core::ptr::addr_of!(ap_trampoline_start),
        core::ptr::addr_of!(ap_trampoline_end),
    );
    let len = end as u64 - start as u64;
    if len > 4096 || !phys::is_mapped(AP_BASE, 4096) {
        log::warn!("smp: trampoline of {len} bytes does not fit at {AP_BASE:#x}");
        report
            .failed
            .extend(apic_ids.iter().filter(|&&id| id != bsp));
        return report;
    }
    // SAFETY: AP_BASE is low RAM the kernel never allocates (the first MiB
    // is reserved) and no longer needs the firmware's data there; the blob
    // is `len` bytes of the kernel image.
    unsafe { core::ptr::copy_nonoverlapping(start, AP_BASE as *mut u8, len as usize) };
    put_data(
        core::ptr::addr_of!(ap_cr3),
        Cr3::read().0.start_address().as_u64(),
    );
    put_data(core::ptr::addr_of!(ap_entry), ap_main as *const () as u64);

    for (index, &apic) in apic_ids
        .iter()
        .enumerate()
        .filter(|(i, &id)| id != bsp && *i < MAX_CPUS)
    {
        let stack: &'static mut [u8] = alloc::vec![0u8; AP_STACK_SIZE].leak();
        let top = (stack.as_ptr() as u64 + AP_STACK_SIZE as u64) & !0xf;
        put_data(core::ptr::addr_of!(ap_stack), top);
        put_data(core::ptr::addr_of!(ap_arg), index as u64);
        STARTED.store(false, Ordering::SeqCst);
        send_ipi(apic, 0x0000_4500); // INIT, level assert
        clock::delay_us(10_000);
        for _ in 0..2 {
            send_ipi(apic, 0x0000_4600 | (AP_BASE >> 12) as u32); // SIPI
            clock::delay_us(200);
        }
        let deadline = clock::now_ms() + START_TIMEOUT_MS;
        while !STARTED.load(Ordering::Acquire) && clock::now_ms() < deadline {
            core::hint::spin_loop();
        }
        if STARTED.load(Ordering::Acquire) {
            ONLINE_APS.fetch_or(1 << index, Ordering::AcqRel);
            report.online.push(apic);
        } else {
            println!("smp: cpu {index} (apic id {apic}) did not start; left out");
            report.failed.push(apic);
        }
    }
    report
}

/// How many CPUs are running.
pub fn online() -> u32 {
    ONLINE.load(Ordering::Acquire)
}

/// MADT positions of the online APs.
pub fn online_aps() -> Vec<usize> {
    let set = ONLINE_APS.load(Ordering::Acquire);
    (0..MAX_CPUS).filter(|i| set & (1 << i) != 0).collect()
}

/// Hands `task` to the AP at MADT position `index`, which runs it at once;
/// false if that AP is not online or already has work.
pub fn run_on(index: usize, task: Task) -> bool {
    if index >= MAX_CPUS || ONLINE_APS.load(Ordering::Acquire) & (1 << index) == 0 {
        return false;
    }
    let raw = Box::into_raw(Box::new(task)) as *mut ();
    // Release: the task's captured state is visible to the AP before the
    // pointer it will take.
    match WORK[index].compare_exchange(
        core::ptr::null_mut(),
        raw,
        Ordering::AcqRel,
        Ordering::Acquire,
    ) {
        Ok(_) => true,
        Err(_) => {
            // SAFETY: `raw` came from `Box::into_raw` just above and was not
            // handed over.
            drop(unsafe { Box::from_raw(raw as *mut Task) });
            false
        }
    }
}

/// Sends every AP that has no work to sleep (`hlt`), so that idle CPUs do
/// not spin.
pub fn park_idle() {
    for i in online_aps() {
        let _ = WORK[i].compare_exchange(
            core::ptr::null_mut(),
            PARK,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }
}

/// First Rust code on an AP, on its own stack, with the kernel's page
/// tables; `index` is its position in the MADT's list.
extern "C" fn ap_main(index: u64) -> ! {
    cpu::init_ap();
    ONLINE.fetch_add(1, Ordering::AcqRel);
    // Release: the boot CPU sees this CPU's set-up done before it moves on
    // and reuses the trampoline's data words.
    STARTED.store(true, Ordering::Release);
    let slot = &WORK[(index as usize).min(MAX_CPUS - 1)];
    loop {
        // Acquire: pairs with the release in `run_on`.
        let w = slot.load(Ordering::Acquire);
        if w == PARK {
            break;
        }
        if !w.is_null() {
            // SAFETY: a non-null, non-PARK pointer was stored by `run_on`
            // from `Box::into_raw(Box<Task>)`, exactly once per slot, and
            // only this CPU takes it.
            let task = unsafe { Box::from_raw(w as *mut Task) };
            task();
            break;
        }
        core::hint::spin_loop();
    }
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}
