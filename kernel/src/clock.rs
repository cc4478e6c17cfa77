//! Time: the TSC, calibrated once against the PIT.
//!
//! The dataplane needs milliseconds (connection timeouts, ARP retries, ICMP
//! rate limits, the stats interval), not precision. Where no PIT answers
//! (QEMU's `microvm` without one), calibration gives up after a bounded
//! wait, or measures an impossible rate, and assumes 2 GHz, which the boot
//! report says; under Xen the frequency comes from Xen.

use core::arch::x86_64::_rdtsc;
use core::sync::atomic::{AtomicU64, Ordering};

use spin::Once;
use x86_64::instructions::port::Port;

const PIT_HZ: u64 = 1_193_182;
const CALIBRATION_MS: u64 = 10;
const FALLBACK_HZ: u64 = 2_000_000_000;
/// TSC rates a measurement may give; anything else means the PIT did not
/// count (a missing PIT's gate port reads all ones: done at once).
const PLAUSIBLE_HZ: core::ops::RangeInclusive<u64> = 100_000_000..=20_000_000_000;

struct Calibration {
    start: u64,
    hz: u64,
}

static CLOCK: Once<Calibration> = Once::new();
/// The milliseconds of the latest reading on any core (`recent_ms`).
static RECENT_MS: AtomicU64 = AtomicU64::new(0);

/// The time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects and is available on every x86_64.
    unsafe { _rdtsc() }
}

/// Where the TSC frequency came from.
pub enum Source {
    Pit,
    Xen,
    Assumed,
}

/// Calibrates the TSC; returns its frequency in Hz and its source.
pub fn init() -> (u64, Source) {
    let mut measured = true;
    if let Some(hz) = crate::xen::tsc_hz() {
        // Xen has no PIT for PVH guests, and says the frequency itself.
        let cal = CLOCK.call_once(|| Calibration { start: rdtsc(), hz });
        return (cal.hz, Source::Xen);
    }
    let cal = CLOCK.call_once(|| {
        let ticks = PIT_HZ * CALIBRATION_MS / 1000;
        // SAFETY: PIT channel 2 and the speaker-gate port; channel 2 drives
        // only the (gated off) speaker, so programming it has no other
        // effect.
        let hz = unsafe {
            let mut gate = Port::<u8>::new(0x61);
            let g = gate.read();
            gate.write((g & !0x02) | 0x01); // gate on, speaker off
            Port::<u8>::new(0x43).write(0xb0); // channel 2, lo/hi, mode 0
            Port::<u8>::new(0x42).write(ticks as u8);
            Port::<u8>::new(0x42).write((ticks >> 8) as u8);
            let start = rdtsc();
            // OUT2 goes high when the count reaches zero; give up after
            // what would be a second at 4 GHz.
            while gate.read() & 0x20 == 0 {
                if rdtsc() - start > 4_000_000_000 {
                    measured = false;
                    break;
                }
                core::hint::spin_loop();
            }
            let elapsed = rdtsc() - start;
            gate.write(g);
            let hz = elapsed * 1000 / CALIBRATION_MS;
            measured &= PLAUSIBLE_HZ.contains(&hz);
            if measured {
                hz
            } else {
                FALLBACK_HZ
            }
        };
        Calibration { start: rdtsc(), hz }
    });
    (
        cal.hz,
        if measured {
            Source::Pit
        } else {
            Source::Assumed
        },
    )
}

/// Milliseconds since `init`.
pub fn now_ms() -> u64 {
    now().1
}

/// One reading of the TSC: the cycle count and the milliseconds since
/// `init` it makes. A loop reads the clock once a round: where Xen
/// emulates the TSC (`xen::tsc_emulated`) every read is a trap into Xen.
pub fn now() -> (u64, u64) {
    let cal = CLOCK.get().expect("clock::init runs at boot");
    let tsc = rdtsc();
    let ms = (u128::from(tsc.wrapping_sub(cal.start)) * 1000 / u128::from(cal.hz)) as u64;
    // Written only when it moved on, so cores do not fight over the line.
    if RECENT_MS.load(Ordering::Relaxed) < ms {
        RECENT_MS.fetch_max(ms, Ordering::Relaxed);
    }
    (tsc, ms)
}

/// The milliseconds of the latest reading (`now`), without reading the
/// TSC: behind by at most a loop round, for upkeep that needs no more.
pub fn recent_ms() -> u64 {
    RECENT_MS.load(Ordering::Relaxed)
}

/// What one read of the TSC costs, in nanoseconds (the least of a few
/// back-to-back pairs): a few nanoseconds on hardware, microseconds where
/// a hypervisor traps every read.
pub fn read_cost_ns() -> u64 {
    let Some(cal) = CLOCK.get() else { return 0 };
    let least = (0..8)
        .map(|_| {
            let a = rdtsc();
            rdtsc().wrapping_sub(a)
        })
        .min()
        .unwrap_or(0);
    (u128::from(least) * 1_000_000_000 / u128::from(cal.hz)) as u64
}

/// Busy-waits at least `us` microseconds.
pub fn delay_us(us: u64) {
    let Some(cal) = CLOCK.get() else { return };
    let cycles = u128::from(us) * u128::from(cal.hz) / 1_000_000;
    let start = rdtsc();
    while u128::from(rdtsc().wrapping_sub(start)) < cycles {
        core::hint::spin_loop();
    }
}
