//! The boot console: COM1 (16550 UART at 0x3f8) and the 0xe9 debug port,
//! each used when present, plus the `log` facade on top of them.
//!
//! The console is for boot, reports and errors. The packet path never
//! prints: it counts, and the counters are printed from here on demand.

use core::fmt::{self, Write};

use log::{LevelFilter, Log, Metadata, Record};
use spin::Mutex;
use x86_64::instructions::port::Port;

const COM1: u16 = 0x3f8;
const DEBUGCON: u16 = 0xe9;
/// Polls of the line-status register before a byte is given up on, so a
/// UART that stops draining cannot hang the kernel.
const TX_SPIN_LIMIT: u32 = 100_000;

struct Console {
    uart: bool,
    debugcon: bool,
    /// A fatal report is being printed (`emergency`): every sink is used.
    fatal: bool,
}

static CONSOLE: Mutex<Console> = Mutex::new(Console {
    uart: false,
    debugcon: false,
    fatal: false,
});
static LOGGER: Logger = Logger;

fn outb(port: u16, v: u8) {
    // SAFETY: only called for the UART registers and the debug port, whose
    // writes have no effect on memory; absent devices ignore them.
    unsafe { Port::<u8>::new(port).write(v) }
}

fn inb(port: u16) -> u8 {
    // SAFETY: reads of the UART registers and the debug port have no side
    // effect on memory; absent devices read as 0xff.
    unsafe { Port::<u8>::new(port).read() }
}

/// Detects and programs the console devices, and installs the logger.
pub fn init() {
    let mut c = CONSOLE.lock();
    // The scratch register holds what is written only when a UART is there.
    outb(COM1 + 7, 0x5a);
    c.uart = inb(COM1 + 7) == 0x5a;
    if c.uart {
        outb(COM1 + 1, 0x00); // no interrupts
        outb(COM1 + 3, 0x80); // DLAB on
        outb(COM1, 0x01); // 115200 baud
        outb(COM1 + 1, 0x00);
        outb(COM1 + 3, 0x03); // 8N1, DLAB off
        outb(COM1 + 2, 0xc7); // FIFO on, cleared
        outb(COM1 + 4, 0x03); // DTR, RTS
    }
    // QEMU's and Bochs's debug console reads back its own port number;
    // Xen's (for HVM and PVH guests) only takes writes, which it prints on
    // its own console when `guest_loglvl` allows. Under Xen each byte
    // written there is a trap into Xen, so once the PV console ring is in
    // use the port only gets fatal reports (`put`).
    c.debugcon = inb(DEBUGCON) == 0xe9 || crate::xen::present();
    drop(c);
    // A second call would only find the logger already set.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(LevelFilter::Info);
}

pub fn set_level(level: LevelFilter) {
    log::set_max_level(level);
}

impl Console {
    fn put(&mut self, b: u8) {
        if self.uart {
            let mut spins = 0;
            while inb(COM1 + 5) & 0x20 == 0 && spins < TX_SPIN_LIMIT {
                spins += 1;
                core::hint::spin_loop();
            }
            outb(COM1, b);
        }
        if self.debugcon && (self.fatal || !crate::xen::has_console_ring()) {
            outb(DEBUGCON, b);
        }
    }
}

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                self.put(b'\r');
            }
            self.put(b);
        }
        crate::xen::console_ring_write(s.as_bytes());
        Ok(())
    }
}

pub fn print(args: fmt::Arguments) {
    // Formatting into the console cannot fail.
    let _ = CONSOLE.lock().write_fmt(args);
}

/// A key typed on the serial console, if one is waiting.
pub fn read_key() -> Option<u8> {
    let c = CONSOLE.lock();
    // LSR bit 0: data ready.
    (c.uart && inb(COM1 + 5) & 0x01 != 0).then(|| inb(COM1))
}

/// Waits until the UART (and under Xen, the PV console's backend) has
/// taken everything, so that nothing is lost when the machine stops right
/// after.
pub fn flush() {
    crate::xen::console_ring_drain();
    if CONSOLE.lock().uart {
        let mut spins = 0;
        while inb(COM1 + 5) & 0x40 == 0 && spins < TX_SPIN_LIMIT {
            spins += 1;
            core::hint::spin_loop();
        }
    }
}

/// Makes the console usable from a panic or exception that may have struck
/// while it was held. Portcullis reports fatal errors from one CPU and then
/// stops, so taking the lock over is the lesser harm.
pub fn emergency() {
    if CONSOLE.is_locked() {
        // SAFETY: the holder was interrupted by this fatal path and will not
        // run again; at worst a half-written line precedes the report.
        unsafe { CONSOLE.force_unlock() };
    }
    CONSOLE.lock().fatal = true;
}

struct Logger;

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if self.enabled(record.metadata()) {
            print(format_args!("[{}] {}\n", record.level(), record.args()));
        }
    }

    fn flush(&self) {}
}

macro_rules! print {
    ($($arg:tt)*) => ($crate::console::print(format_args!($($arg)*)));
}

macro_rules! println {
    () => ($crate::console::print(format_args!("\n")));
    ($($arg:tt)*) => ($crate::console::print(format_args!("{}\n", format_args!($($arg)*))));
}
