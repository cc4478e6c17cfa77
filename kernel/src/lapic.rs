//! The local APIC's registers, in xAPIC mode (the architectural default) at
//! its identity-mapped page: what `smp` (INIT/SIPI) and `idle` (the timer)
//! use. Callers check `present` first.

use crate::phys;

pub const BASE: u64 = 0xfee0_0000;
pub const ID: u64 = 0x20;
pub const VERSION: u64 = 0x30;
pub const EOI: u64 = 0xb0;
pub const SVR: u64 = 0xf0;
pub const ICR_LOW: u64 = 0x300;
pub const ICR_HIGH: u64 = 0x310;
pub const LVT_TIMER: u64 = 0x320;
pub const TIMER_INITIAL: u64 = 0x380;
pub const TIMER_CURRENT: u64 = 0x390;
pub const TIMER_DIVIDE: u64 = 0x3e0;

/// Whether the APIC page is mapped and answers.
pub fn present() -> bool {
    phys::is_mapped(BASE, 4096) && read(VERSION) != u32::MAX
}

pub fn read(reg: u64) -> u32 {
    // SAFETY: a register offset inside the APIC page, which the identity
    // map covers (callers check `present`); reads have no memory effect.
    unsafe { ((BASE + reg) as *const u32).read_volatile() }
}

pub fn write(reg: u64, v: u32) {
    // SAFETY: as in `read`; the registers written (ICR, spurious vector,
    // timer LVT, divide and counts, EOI) steer this core's APIC: IPIs to
    // APs being started and its own timer, nothing in memory.
    unsafe { ((BASE + reg) as *mut u32).write_volatile(v) }
}
