//! Xen interfaces for Portcullis, as pure data and logic.
//!
//! This crate owns the Xen-facing formats: the PVH start-of-day structure
//! (`hvm_start_info` and its memory map), hypercall numbers and CPUID
//! decoding, grant-table and event-channel layouts and bookkeeping
//! (`grant`), the XenStore wire codec, the netfront/netback ring protocol
//! and xenbus handshake (`netif`, for the netfront driver to come); later
//! vchan and QubesDB codecs.
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
pub mod xenstore;
