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

/// How far producer index `prod` is ahead of consumer index `cons` in a
/// ring of `size` entries (free-running indices, wrapping); `None` when
/// they are more than a ring apart — what the other side wrote cannot be
/// right. Shared by every ring here: netif, XenStore, vchan.
pub fn ring_distance(prod: u32, cons: u32, size: u32) -> Option<u32> {
    let n = prod.wrapping_sub(cons);
    (n <= size).then_some(n)
}
