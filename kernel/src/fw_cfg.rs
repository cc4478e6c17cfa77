//! QEMU's firmware configuration device (fw_cfg) over I/O ports: how the
//! QubesDB snapshot (`-fw_cfg name=opt/portcullis/qubesdb,file=...`)
//! reaches the kernel under QEMU.

use alloc::vec::Vec;

use x86_64::instructions::port::Port;

const SELECTOR: u16 = 0x510;
const DATA: u16 = 0x511;
const SIGNATURE: u16 = 0x0000;
const FILE_DIR: u16 = 0x0019;
/// Largest file read; anything larger is refused.
pub const MAX_FILE: usize = 64 * 1024;

fn select(key: u16) {
    // SAFETY: the fw_cfg selector port; on machines without fw_cfg the
    // write goes nowhere.
    unsafe { Port::<u16>::new(SELECTOR).write(key) }
}

fn read(buf: &mut [u8]) {
    for b in buf {
        // SAFETY: the fw_cfg data port; reads have no memory effect.
        *b = unsafe { Port::<u8>::new(DATA).read() };
    }
}

fn be32() -> u32 {
    let mut b = [0u8; 4];
    read(&mut b);
    u32::from_be_bytes(b)
}

/// Whether QEMU's fw_cfg answers.
pub fn present() -> bool {
    select(SIGNATURE);
    let mut sig = [0u8; 4];
    read(&mut sig);
    &sig == b"QEMU"
}

/// Why a file could not be read.
#[derive(Debug)]
pub enum FwCfgError {
    TooLarge(usize),
}

impl core::fmt::Display for FwCfgError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::TooLarge(n) => write!(f, "{n} bytes, more than the {MAX_FILE} accepted"),
        }
    }
}

/// The contents of the fw_cfg file `name`, or `None` if it is absent.
pub fn read_file(name: &str) -> Result<Option<Vec<u8>>, FwCfgError> {
    if !present() {
        return Ok(None);
    }
    select(FILE_DIR);
    let count = be32();
    for _ in 0..count.min(4096) {
        let size = be32() as usize;
        let mut sel = [0u8; 4];
        read(&mut sel);
        let mut raw = [0u8; 56];
        read(&mut raw);
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        if &raw[..end] == name.as_bytes() {
            if size > MAX_FILE {
                return Err(FwCfgError::TooLarge(size));
            }
            select(u16::from_be_bytes([sel[0], sel[1]]));
            let mut data = alloc::vec![0u8; size];
            read(&mut data);
            return Ok(Some(data));
        }
    }
    Ok(None)
}
