//! Running under Xen: detection, the hypercall page, and the few
//! hypercalls the kernel needs before the Xen drivers exist: the PV
//! console ring (what `xl console` and xenconsoled's logs show), and
//! shutting the domain down. Console output also goes to Xen's debug port
//! 0xe9 (see `console`), which works before anything is set up.
//!
//! Detection reads Xen's CPUID leaves; the hypercall page is a page of the
//! kernel image whose physical address is written to the MSR that Xen's
//! leaf `base + 2` names, after which Xen fills it with one 32-byte stub per
//! hypercall.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering};

use x86_64::registers::model_specific::Msr;
use xen_shim::hypercall::*;

#[repr(C, align(4096))]
struct HypercallPage([u8; 4096]);

/// Filled by Xen once its physical address is written to the MSR.
static mut HYPERCALL_PAGE: HypercallPage = HypercallPage([0xc3; 4096]); // ret
static PRESENT: AtomicBool = AtomicBool::new(false);
static BASE_LEAF: AtomicU32 = AtomicU32::new(0);
/// The PV console: ring page address (0: none) and event channel.
static CONSOLE_RING: AtomicU64 = AtomicU64::new(0);
static CONSOLE_EVTCHN: AtomicU32 = AtomicU32::new(0);

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
            init_console();
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

/// Whether Xen emulates RDTSC for this domain (Xen's time leaf, sub-leaf
/// 0, EAX bit 0): then every read of the TSC is a trap into Xen. Xen does
/// that where the TSC is not invariant (`tsc_mode="default"`), e.g. when
/// it runs nested on an emulator.
pub fn tsc_emulated() -> bool {
    present() && cpuid(BASE_LEAF.load(Ordering::Relaxed) + 3, 0)[0] & 1 != 0
}

/// A two-argument hypercall.
///
/// # Safety
///
/// The arguments must be valid for hypercall `number` (pointers to memory
/// the hypervisor may read or write as that call defines).
unsafe fn hypercall2(number: u32, a1: u64, a2: u64) -> i64 {
    // SAFETY: as the caller promised; the unused third argument is 0.
    unsafe { hypercall3(number, a1, a2, 0) }
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

/// Blocks this vCPU in Xen until one of event channels `ports` is pending
/// or Xen's system time reaches `timeout_ns` (`SCHEDOP_poll`); Xen's
/// return code.
pub fn poll(ports: &[u32], timeout_ns: u64) -> i64 {
    let arg = SchedPoll {
        ports: ports.as_ptr() as u64,
        nr_ports: ports.len() as u32,
        pad: 0,
        timeout: timeout_ns,
    };
    // SAFETY: SCHEDOP_poll reads one `sched_poll` at the pointer and
    // `nr_ports` ports at `arg.ports`, both live locals.
    unsafe {
        hypercall2(
            HYPERVISOR_SCHED_OP,
            u64::from(SCHEDOP_POLL),
            &arg as *const SchedPoll as u64,
        )
    }
}

#[repr(C)]
struct HvmParam {
    domid: u16,
    pad: u16,
    index: u32,
    value: u64,
}

/// An HVM parameter of this domain (`HVMOP_get_param`).
pub fn hvm_param(index: u32) -> Option<u64> {
    let mut p = HvmParam {
        domid: DOMID_SELF,
        pad: 0,
        index,
        value: 0,
    };
    // SAFETY: HVMOP_get_param reads and writes one `xen_hvm_param` at the
    // pointer, a live local.
    let rc = unsafe {
        hypercall2(
            HYPERVISOR_HVM_OP,
            u64::from(HVMOP_GET_PARAM),
            &mut p as *mut HvmParam as u64,
        )
    };
    (rc == 0).then_some(p.value)
}

/// Finds the PV console ring (what `xl console` and xenconsoled's logs
/// read) and remembers it if its page is in the identity map.
fn init_console() {
    let (Some(pfn), Some(port)) = (
        hvm_param(HVM_PARAM_CONSOLE_PFN),
        hvm_param(HVM_PARAM_CONSOLE_EVTCHN),
    ) else {
        return;
    };
    let page = pfn << 12;
    if pfn != 0 && port != 0 && port <= u64::from(u32::MAX) && crate::phys::is_mapped(page, 4096) {
        CONSOLE_EVTCHN.store(port as u32, Ordering::Relaxed);
        CONSOLE_RING.store(page, Ordering::Release);
    }
}

/// The PV console's event channel (0 when there is none).
pub fn console_port() -> u32 {
    CONSOLE_EVTCHN.load(Ordering::Relaxed)
}

/// Whether the PV console ring is in use.
pub fn has_console_ring() -> bool {
    CONSOLE_RING.load(Ordering::Acquire) != 0
}

fn ring_index(page: u64, off: usize) -> &'static core::sync::atomic::AtomicU32 {
    // SAFETY: `off` is one of the 4-aligned index fields inside the console
    // page, which Xen placed in our memory for this domain and which stays
    // there; the other side (xenconsoled) accesses it concurrently, hence
    // atomics.
    unsafe { core::sync::atomic::AtomicU32::from_ptr((page as usize + off) as *mut u32) }
}

/// Waits, at most about a second, until the backend (xenconsoled) has
/// read everything written to the PV console ring: a domain that ends
/// right after a report would otherwise lose its last lines.
pub fn console_ring_drain() {
    use xen_shim::hypercall::console_ring::*;
    let page = CONSOLE_RING.load(Ordering::Acquire);
    if page == 0 {
        return;
    }
    let (prod_ix, cons_ix) = (ring_index(page, OUT_PROD), ring_index(page, OUT_CONS));
    for _ in 0..1000 {
        if room(
            prod_ix.load(Ordering::Acquire),
            cons_ix.load(Ordering::Acquire),
        ) == OUT_SIZE
        {
            return;
        }
        crate::clock::delay_us(1000);
    }
}

/// Writes `bytes` to the PV console ring and notifies the backend once.
/// When the ring stays full (no backend reading), bytes are dropped after a
/// bounded wait: the console must never hang the kernel.
pub fn console_ring_write(bytes: &[u8]) {
    use xen_shim::hypercall::console_ring::*;
    let page = CONSOLE_RING.load(Ordering::Acquire);
    if page == 0 {
        return;
    }
    let (prod_ix, cons_ix) = (ring_index(page, OUT_PROD), ring_index(page, OUT_CONS));
    let mut prod = prod_ix.load(Ordering::Relaxed);
    for &b in bytes {
        let mut spins = 0u32;
        // Acquire: the backend's reads of the slots it freed are done.
        while room(prod, cons_ix.load(Ordering::Acquire)) == 0 {
            if spins == 0 {
                prod_ix.store(prod, Ordering::Release);
                notify(CONSOLE_EVTCHN.load(Ordering::Relaxed));
            }
            spins += 1;
            if spins > 1_000_000 {
                return;
            }
            core::hint::spin_loop();
        }
        let slot = page as usize + OUT + (prod % OUT_SIZE) as usize;
        // SAFETY: `slot` lies in the output ring of the console page; the
        // slot is free (room > 0), so the backend is not reading it.
        unsafe { (slot as *mut u8).write_volatile(b) };
        prod = prod.wrapping_add(1);
    }
    // Release: the bytes are visible before the index that publishes them.
    prod_ix.store(prod, Ordering::Release);
    // The index store must be visible before the backend is woken.
    fence(Ordering::SeqCst);
    notify(CONSOLE_EVTCHN.load(Ordering::Relaxed));
}

/// `XENMEM_add_to_physmap` for this domain: places frame `idx` of
/// `space` at guest frame `gpfn`. 0 on success.
pub fn add_to_physmap(space: u32, idx: u64, gpfn: u64) -> i64 {
    let mut a = xen_shim::grant::AddToPhysmap {
        domid: DOMID_SELF,
        size: 0,
        space,
        idx,
        gpfn,
    };
    // SAFETY: XENMEM_add_to_physmap reads one `xen_add_to_physmap` at the
    // pointer, a live local; `gpfn` is a frame of the foreign window (no
    // RAM of ours is there).
    unsafe {
        hypercall2(
            xen_shim::grant::HYPERVISOR_MEMORY_OP,
            u64::from(xen_shim::grant::XENMEM_ADD_TO_PHYSMAP),
            &mut a as *mut _ as u64,
        )
    }
}

/// Maps grant `gref` of domain `dom` at the empty guest frame `gpfn`
/// (a frame of the foreign window, `phys::alloc_foreign`): the mapping's
/// handle, or Xen's status.
pub fn map_grant(dom: u16, gref: u32, gpfn: u64) -> Result<u32, i64> {
    let mut m = xen_shim::grant::MapGrantRef {
        host_addr: gpfn << 12,
        flags: xen_shim::grant::GNTMAP_HOST_MAP,
        gref,
        dom,
        ..Default::default()
    };
    // SAFETY: GNTTABOP_map_grant_ref with a count of 1 reads and writes one
    // `gnttab_map_grant_ref` at the pointer, a live local; the frame it
    // maps into holds no RAM of ours.
    let rc = unsafe {
        hypercall3(
            xen_shim::grant::HYPERVISOR_GRANT_TABLE_OP,
            u64::from(xen_shim::grant::GNTTABOP_MAP_GRANT_REF),
            &mut m as *mut _ as u64,
            1,
        )
    };
    match (rc, m.status) {
        (0, 0) => Ok(m.handle),
        (0, s) => Err(i64::from(s)),
        (e, _) => Err(e),
    }
}

/// Maps grants `grefs` of domain `dom` at consecutive frames from `gpfn`
/// (`map_grant`): their handles. When one is refused, those mapped are
/// unmapped again and the error names it.
pub fn map_grants(dom: u16, grefs: &[u32], gpfn: u64) -> Result<Vec<u32>, String> {
    let mut handles = Vec::with_capacity(grefs.len());
    for (i, &gref) in grefs.iter().enumerate() {
        match map_grant(dom, gref, gpfn + i as u64) {
            Ok(h) => handles.push(h),
            Err(status) => {
                unmap_grants(gpfn, &handles);
                return Err(format!(
                    "mapping grant {gref} of domain {dom}: status {status}"
                ));
            }
        }
    }
    Ok(handles)
}

/// Unmaps grants mapped by `map_grants` at frames from `gpfn`: how many
/// would not go (their frames must not be reused).
pub fn unmap_grants(gpfn: u64, handles: &[u32]) -> usize {
    handles
        .iter()
        .enumerate()
        .filter(|&(i, &h)| !unmap_grant(gpfn + i as u64, h))
        .count()
}

/// The grant table's current and maximum size in frames.
pub fn grant_table_size() -> Option<xen_shim::grant::QuerySize> {
    let mut q = xen_shim::grant::QuerySize {
        dom: DOMID_SELF,
        ..Default::default()
    };
    // SAFETY: GNTTABOP_query_size with a count of 1 reads and writes one
    // `gnttab_query_size` at the pointer, a live local.
    let rc = unsafe {
        hypercall3(
            xen_shim::grant::HYPERVISOR_GRANT_TABLE_OP,
            u64::from(xen_shim::grant::GNTTABOP_QUERY_SIZE),
            &mut q as *mut _ as u64,
            1,
        )
    };
    (rc == 0 && q.status == 0).then_some(q)
}

/// `EVTCHNOP_alloc_unbound`: a new port of `dom` that `remote` may bind.
pub fn alloc_unbound(dom: u16, remote: u16) -> Option<u32> {
    let mut a = xen_shim::grant::AllocUnbound {
        dom,
        remote_dom: remote,
        port: 0,
    };
    // SAFETY: EVTCHNOP_alloc_unbound reads and writes one
    // `evtchn_alloc_unbound` at the pointer, a live local.
    let rc = unsafe {
        hypercall2(
            HYPERVISOR_EVENT_CHANNEL_OP,
            u64::from(xen_shim::grant::EVTCHNOP_ALLOC_UNBOUND),
            &mut a as *mut _ as u64,
        )
    };
    (rc == 0).then_some(a.port)
}

/// `EVTCHNOP_bind_interdomain`: a local port connected to `remote`'s
/// unbound `remote_port`.
pub fn bind_interdomain(remote: u16, remote_port: u32) -> Option<u32> {
    let mut b = xen_shim::grant::BindInterdomain {
        remote_dom: remote,
        remote_port,
        local_port: 0,
    };
    // SAFETY: EVTCHNOP_bind_interdomain reads and writes one
    // `evtchn_bind_interdomain` at the pointer, a live local.
    let rc = unsafe {
        hypercall2(
            HYPERVISOR_EVENT_CHANNEL_OP,
            u64::from(xen_shim::grant::EVTCHNOP_BIND_INTERDOMAIN),
            &mut b as *mut _ as u64,
        )
    };
    (rc == 0).then_some(b.local_port)
}

/// Unmaps the grant mapped at guest frame `gpfn` with `handle`
/// (`map_grant`); the frame is empty afterwards. True on success.
pub fn unmap_grant(gpfn: u64, handle: u32) -> bool {
    let mut u = xen_shim::grant::UnmapGrantRef {
        host_addr: gpfn << 12,
        handle,
        ..Default::default()
    };
    // SAFETY: GNTTABOP_unmap_grant_ref with a count of 1 reads and writes
    // one `gnttab_unmap_grant_ref` at the pointer, a live local; nothing
    // of ours is in the frame (it held the other domain's page).
    let rc = unsafe {
        hypercall3(
            xen_shim::grant::HYPERVISOR_GRANT_TABLE_OP,
            u64::from(xen_shim::grant::GNTTABOP_UNMAP_GRANT_REF),
            &mut u as *mut _ as u64,
            1,
        )
    };
    rc == 0 && u.status == 0
}

/// `GNTTABOP_copy` for every op in `ops` (one hypercall); each op's
/// `status` tells whether it was done (`GNTST_OKAY`).
pub fn grant_copy(ops: &mut [xen_shim::grant::GnttabCopy]) -> bool {
    if ops.is_empty() {
        return true;
    }
    // SAFETY: GNTTABOP_copy reads and writes `ops.len()` `gnttab_copy`
    // entries at the pointer, a live slice; each names a grant of the other
    // domain's and a page-bounded range of our own memory that the caller
    // owns (a pool buffer).
    let rc = unsafe {
        hypercall3(
            xen_shim::grant::HYPERVISOR_GRANT_TABLE_OP,
            u64::from(xen_shim::grant::GNTTABOP_COPY),
            ops.as_mut_ptr() as u64,
            ops.len() as u64,
        )
    };
    rc == 0
}

/// `EVTCHNOP_close` on `port`: false when Xen refused (not ours, or not
/// open).
pub fn close_port(port: u32) -> bool {
    port_op(xen_shim::grant::EVTCHNOP_CLOSE, port) == 0
}

/// A three-argument hypercall.
///
/// # Safety
///
/// The arguments must be valid for hypercall `number` (pointers to memory
/// the hypervisor may read or write as that call defines).
unsafe fn hypercall3(number: u32, a1: u64, a2: u64, a3: u64) -> i64 {
    let entry = core::ptr::addr_of!(HYPERCALL_PAGE) as u64 + u64::from(number) * 32;
    let ret: i64;
    // SAFETY: `entry` is Xen's stub for `number` in the installed page; the
    // stub follows the hypercall ABI (rdi, rsi, rdx in; rax out; rcx and
    // r11 clobbered by the `vmcall`/`syscall` it contains).
    unsafe {
        core::arch::asm!(
            "call {entry}",
            entry = in(reg) entry,
            inlateout("rdi") a1 => _,
            inlateout("rsi") a2 => _,
            inlateout("rdx") a3 => _,
            lateout("rax") ret,
            lateout("rcx") _,
            lateout("r11") _,
        );
    }
    ret
}

/// `EVTCHNOP_send` on `port`.
pub fn notify(port: u32) {
    port_op(EVTCHNOP_SEND, port);
}

/// An event-channel operation whose argument is one port
/// (`evtchn_send`, `evtchn_close`): Xen's return code.
fn port_op(cmd: u32, port: u32) -> i64 {
    // SAFETY: the operations passed here read one `{ u32 port }` at the
    // pointer, a live local.
    unsafe {
        hypercall2(
            HYPERVISOR_EVENT_CHANNEL_OP,
            u64::from(cmd),
            &port as *const u32 as u64,
        )
    }
}
