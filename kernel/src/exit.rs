//! Leaving the kernel with a status that a test harness can read.
//!
//! Under QEMU the `isa-debug-exit` device at port 0xf4 turns a written value
//! `v` into the process exit status `(v << 1) | 1`: 0x10 gives 33 (success)
//! and 0x11 gives 35 (failure). Under Xen the domain is shut down with
//! `SCHEDOP_shutdown` (poweroff, or crash for a failure). Elsewhere the
//! write is ignored and the CPU halts with interrupts off.

use x86_64::instructions::port::Port;

const DEBUG_EXIT_PORT: u16 = 0xf4;
const SUCCESS: u32 = 0x10;
const FAILURE: u32 = 0x11;

pub fn success() -> ! {
    leave(SUCCESS)
}

pub fn failure() -> ! {
    leave(FAILURE)
}

fn leave(code: u32) -> ! {
    crate::console::flush();
    // SAFETY: port 0xf4 is either QEMU's isa-debug-exit (which ends the VM)
    // or unclaimed, where a write has no effect.
    unsafe { Port::<u32>::new(DEBUG_EXIT_PORT).write(code) };
    // Under Xen the domain ends through the hypervisor.
    crate::xen::shutdown(code == FAILURE);
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}
