//! The firewall stage: parsing, rules, connection tracking, NAT.
//!
//! This crate owns everything Portcullis decides about a packet — frame and
//! header parsing that never panics (`wire`, `ipv6`), the QubesDB
//! configuration model (`config`), the Qubes rule language and its matching
//! (`rules`), the resolver for `dsthost` names (`dns`), stateful connection
//! tracking with source NAT and DNS redirection (`conntrack`), and the
//! per-frame pipeline for IPv4 and IPv6 with ARP, neighbour discovery, ICMP
//! and counters (`firewall`), and which core owns a frame when every core
//! runs a firewall of its own (`steer`). It is pure logic: no `unsafe`, no
//! hardware, no logging; the kernel moves batches of frames through
//! `Firewall::handle` and supplies the time. Allocation happens when configuration loads and when a flow is
//! created, never per established-flow packet.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod config;
pub mod conntrack;
pub mod dns;
pub mod firewall;
pub mod ipv6;
pub mod rules;
pub mod steer;
pub mod wire;
