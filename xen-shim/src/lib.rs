//! Xen interfaces for Portcullis, as pure data and logic.
//!
//! This crate owns the Xen-facing formats: the PVH start-of-day structure
//! (`hvm_start_info` and its memory map), hypercall numbers and CPUID
//! decoding, grant-table and event-channel layouts and bookkeeping
//! (`grant`), the XenStore wire codec, the netfront/netback ring protocol
//! and xenbus handshake (`netif`), the QubesDB protocol (`qubesdb`), the
//! qrexec agent's protocol (`qrexec`) and the vchan ring (`vchan`).
//! It decodes what another party (Xen, QEMU's PVH loader, dom0) wrote into
//! typed values and never trusts it: every parser takes bytes and returns a
//! `Result`. It performs no hardware access itself; the kernel reads guest
//! physical memory and hands the bytes over, so everything here is tested on
//! the host.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod grant;
pub mod hypercall;
pub mod netif;
pub mod pvh;
pub mod qrexec;
pub mod qubesdb;
pub mod vchan;
pub mod xenstore;

/// A byte stream (what a vchan delivers, in any pieces) cut into messages
/// of a fixed-size header that gives the body's length, then the body:
/// QubesDB's and qrexec's framing. After a refused header the stream is
/// out of step for good: only the `failed` error comes out.
#[derive(Debug, Default)]
pub(crate) struct Framer {
    buf: alloc::vec::Vec<u8>,
    failed: bool,
}

impl Framer {
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        if !self.failed {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// The next whole message: what `header` made of its header, and its
    /// body; `None` until it has all arrived.
    pub(crate) fn next<const H: usize, T, E>(
        &mut self,
        header: impl FnOnce(&[u8; H]) -> Result<(T, usize), E>,
        failed: E,
    ) -> Option<Result<(T, alloc::vec::Vec<u8>), E>> {
        if self.failed {
            return Some(Err(failed));
        }
        let h: &[u8; H] = self.buf.get(..H)?.try_into().ok()?;
        let (head, len) = match header(h) {
            Ok(x) => x,
            Err(e) => {
                self.failed = true;
                self.buf = alloc::vec::Vec::new();
                return Some(Err(e));
            }
        };
        let body = self.buf.get(H..H.checked_add(len)?)?.to_vec();
        self.buf.drain(..H + len);
        Some(Ok((head, body)))
    }
}

/// How far producer index `prod` is ahead of consumer index `cons` in a
/// ring of `size` entries (free-running indices, wrapping); `None` when
/// they are more than a ring apart — what the other side wrote cannot be
/// right. Shared by every ring here: netif, XenStore, vchan.
pub fn ring_distance(prod: u32, cons: u32, size: u32) -> Option<u32> {
    let n = prod.wrapping_sub(cons);
    (n <= size).then_some(n)
}
