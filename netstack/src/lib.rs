//! The firewall stage: parsing, rules, connection tracking, NAT.
//!
//! This crate will own everything Portcullis decides about a packet — frame
//! and header parsing that never panics, the Qubes rule language and its
//! matching, stateful connection tracking, source NAT to the uplink, DNS
//! redirection, ARP and ICMP — as pure logic: no `unsafe`, no hardware, no
//! allocation on the packet path. It is tested on the host, fuzzed and
//! benchmarked; the kernel only moves batches through it.
//! (Foundation stage: the crate is empty until the dataplane lands.)
#![no_std]
#![forbid(unsafe_code)]
