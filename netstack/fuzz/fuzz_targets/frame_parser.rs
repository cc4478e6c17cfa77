//! Any bytes through the wire parsers: no panic, and what parses is in
//! bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netstack::wire::{l4_checksum_ok, parse_ipv4, Arp};

fuzz_target!(|data: &[u8]| {
    if let Ok(info) = parse_ipv4(data) {
        assert!(info.l3 < info.l4 && info.l4 <= info.end && info.end <= data.len());
        let _ = l4_checksum_ok(data, &info);
    }
    if let Ok(arp) = Arp::parse(data) {
        let mut buf = [0u8; 64];
        let n = arp.emit(&mut buf, arp.sender_mac, arp.target_mac);
        assert_eq!(Arp::parse(&buf[..n]), Ok(arp));
    }
});
