//! NIC drivers behind one batch interface.
//!
//! This crate will own every network device Portcullis drives — virtio-net
//! over PCI, Xen netfront and netback — behind a single trait that moves
//! batches of packet buffers (`rx_batch` / `tx_batch`) from a preallocated
//! pool, never one packet at a time. Hardware and hypervisor access enters
//! through a small `unsafe` HAL trait (DMA memory, notification, grants)
//! that the kernel implements and a fake implements for host tests; the
//! descriptor and ring bookkeeping is plain logic tested here. Drivers own
//! no policy: what to do with a frame is the firewall stage's decision.
//! (Foundation stage: the crate is empty until the virtio-net driver lands.)
#![no_std]
