//! What a polling loop does when it finds no work: spin (`idle=poll`) or
//! halt until the local APIC timer wakes the core (`idle=halt`).
//!
//! Under TCG a spinning vCPU keeps a host thread busy; on a small host that
//! is CPU QEMU's network backend then lacks. With `halt`, a loop that found
//! nothing for `QUIET_ROUNDS` rounds executes `sti; hlt; cli`: the core
//! sleeps until the next timer tick (every `wake_us`), so a packet waits at
//! most that long, and under load (work every round) nothing changes.
//! Each core that halts programs its own APIC timer (`start`).
//!
//! Under Xen the boot CPU's loop blocks in Xen instead (`start_xen`):
//! `SCHEDOP_poll` on the netfront's event channel, with a timeout of
//! `wake_us` in Xen's system time, after asking netback to signal the next
//! received frame. (Halting with the APIC timer stopped the loop after its
//! first halt in the nested test; not diagnosed, and not needed any more.)

use core::arch::asm;
use core::sync::atomic::{AtomicU32, Ordering};

use kernel::cmdline::Idle;
use spin::Once;

use crate::{clock, cpu, gnttab, lapic, xen};

const LVT_MASKED: u32 = 1 << 16;
const LVT_PERIODIC: u32 = 1 << 17;
/// Empty rounds before a halt: a short gap between packets of a burst is
/// spun through.
const QUIET_ROUNDS: u32 = 32;
const CALIBRATION_US: u64 = 10_000;

/// Blocking in Xen: the event channel that wakes the loop, the longest
/// block, and the shared-info page with the pending bits and the clock.
struct XenWait {
    /// Changed when the netfront reconnects (`set_xen_port`).
    port: AtomicU32,
    /// The client vifs' channels (0: none), `set_client_port`.
    clients: [AtomicU32; kernel::cmdline::MAX_CLIENTS],
    wake_ns: u64,
    shared: &'static gnttab::SharedInfo,
}

static XEN_WAIT: Once<XenWait> = Once::new();

/// Makes `idle=halt` loops on the boot CPU block in Xen on event channel
/// `port` for at most `wake_us`; false (the loops poll) when the
/// shared-info page cannot be mapped or carries no time record.
pub fn start_xen(port: u32, wake_us: u32) -> bool {
    let Ok(shared) = gnttab::SharedInfo::get() else {
        return false;
    };
    if shared.vcpu0_time().is_none() {
        return false;
    }
    XEN_WAIT.call_once(|| XenWait {
        port: AtomicU32::new(port),
        clients: [const { AtomicU32::new(0) }; kernel::cmdline::MAX_CLIENTS],
        wake_ns: u64::from(wake_us) * 1000,
        shared,
    });
    true
}

/// Makes blocking in Xen wait on `port` from now on (a new netfront
/// connection's channel, or XenStore's while there is none).
pub fn set_xen_port(port: u32) {
    if let Some(x) = XEN_WAIT.get() {
        x.port.store(port, Ordering::Relaxed);
    }
}

/// Makes blocking in Xen wake on client vif `slot`'s channel too (0: the
/// slot has no client).
pub fn set_client_port(slot: usize, port: u32) {
    if let Some(c) = XEN_WAIT.get().and_then(|x| x.clients.get(slot)) {
        c.store(port, Ordering::Relaxed);
    }
}

impl XenWait {
    /// Blocks until a port is signalled or the timeout, unless `arm`
    /// (asking the devices to signal) says work is already waiting.
    fn block(&self, arm: impl FnOnce() -> bool) {
        let mut ports = [0u32; 1 + kernel::cmdline::MAX_CLIENTS];
        let mut n = 0;
        for p in core::iter::once(&self.port).chain(&self.clients) {
            let p = p.load(Ordering::Relaxed);
            if p != 0 {
                ports[n] = p;
                n += 1;
            }
        }
        let ports = &ports[..n];
        // An old signal would end the block at once: clear it first.
        for &p in ports {
            self.shared.take_pending(p);
        }
        if arm() {
            return;
        }
        let Some(t) = self.shared.vcpu0_time() else {
            return;
        };
        let deadline = t
            .system_time_ns(clock::rdtsc())
            .saturating_add(self.wake_ns);
        xen::poll(ports, deadline);
        for &p in ports {
            self.shared.take_pending(p);
        }
    }
}

/// Programs this core's APIC timer for `mode`: the mode in force, and the
/// timer ticks per wake period (0 for `poll`). `halt` falls back to `poll`
/// when there is no usable local APIC, and under Xen (where the boot CPU
/// blocks in Xen instead, `start_xen`).
pub fn start(mode: Idle) -> (Idle, u32) {
    let Idle::Halt { wake_us } = mode else {
        return (Idle::Poll, 0);
    };
    if !lapic::present() || xen::present() {
        return (Idle::Poll, 0);
    }
    mask_legacy_pic();
    // Software-enable the APIC with the spurious vector; divide by 16.
    lapic::write(lapic::SVR, 0x100 | u32::from(cpu::SPURIOUS_VECTOR));
    lapic::write(lapic::TIMER_DIVIDE, 0b0011);
    // Count down from the top for a known time to learn the rate.
    lapic::write(lapic::LVT_TIMER, LVT_MASKED | u32::from(cpu::WAKE_VECTOR));
    lapic::write(lapic::TIMER_INITIAL, u32::MAX);
    clock::delay_us(CALIBRATION_US);
    let elapsed = u64::from(u32::MAX - lapic::read(lapic::TIMER_CURRENT));
    if elapsed == 0 {
        lapic::write(lapic::TIMER_INITIAL, 0);
        return (Idle::Poll, 0);
    }
    let ticks = (elapsed * u64::from(wake_us) / CALIBRATION_US).clamp(1, u64::from(u32::MAX));
    lapic::write(lapic::LVT_TIMER, LVT_PERIODIC | u32::from(cpu::WAKE_VECTOR));
    lapic::write(lapic::TIMER_INITIAL, ticks as u32);
    // A tick that came before the first halt is pending: acknowledge it.
    lapic::write(lapic::EOI, 0);
    (mode, ticks as u32)
}

/// Masks every line of the legacy 8259 PICs. The firmware leaves their
/// vectors at 8-15, over the CPU exceptions: a timer tick from them while
/// interrupts are on would look like a double fault. (Without the PICs,
/// under Xen, the writes go nowhere.)
fn mask_legacy_pic() {
    for port in [0x21u16, 0xa1] {
        // SAFETY: writing the interrupt mask register of a legacy PIC only
        // masks its lines; nothing in Portcullis uses them.
        unsafe { asm!("out dx, al", in("dx") port, in("al") 0xffu8, options(nomem, nostack)) };
    }
}

/// One loop's idle policy.
pub struct Idler {
    halt: bool,
    xen: Option<&'static XenWait>,
    quiet: u32,
    /// Rounds that found no work.
    pub idle_rounds: u64,
    /// Halts so far (each ended by a timer tick, or, in Xen, by the event
    /// channel or the timeout).
    pub halts: u64,
}

impl Idler {
    /// For a core whose timer `start` set up for `mode`, or, on the boot
    /// CPU under Xen, `start_xen` (mode `halt`).
    pub fn new(mode: Idle) -> Self {
        let halt = matches!(mode, Idle::Halt { .. });
        Self {
            halt,
            xen: XEN_WAIT.get().filter(|_| halt),
            quiet: 0,
            idle_rounds: 0,
            halts: 0,
        }
    }

    /// Called once per round: `busy` says whether it found work. `arm` is
    /// called before blocking in Xen: it asks the devices to signal and
    /// says whether work is already waiting.
    #[inline]
    pub fn round(&mut self, busy: bool, arm: impl FnOnce() -> bool) {
        if busy {
            self.quiet = 0;
            return;
        }
        self.quiet = self.quiet.saturating_add(1);
        self.idle_rounds += 1;
        if let (Some(x), true) = (self.xen, self.quiet >= QUIET_ROUNDS) {
            self.halts += 1;
            x.block(arm);
        } else if self.halt && self.quiet >= QUIET_ROUNDS {
            self.halts += 1;
            // SAFETY: interrupts are enabled only across `hlt` (`sti`
            // takes effect after the next instruction, so no interrupt is
            // lost between them); the only one that can come is the timer,
            // whose handler restores what it touches.
            unsafe { asm!("sti", "hlt", "cli") };
        } else {
            core::hint::spin_loop();
        }
    }
}
