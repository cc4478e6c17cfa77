//! Any bytes through the wire parsers (Ethernet/IPv4/IPv6/ARP/neighbour
//! discovery, DNS responses): no panic, and what parses is in bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netstack::dns::{parse_response, Response};
use netstack::ipv6::{l4_checksum_ok6, parse_ipv6, Neighbor};
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
    if let Ok(info) = parse_ipv6(data) {
        assert!(info.l3 < info.l4 && info.l4 <= info.end && info.end <= data.len());
        let _ = l4_checksum_ok6(data, &info);
        if let Ok(nd) = Neighbor::parse(data, &info) {
            // What parses re-emits (with a link-layer option) and re-parses.
            let nd = Neighbor {
                lladdr: Some(nd.lladdr.unwrap_or([2, 0, 0, 0, 0, 1])),
                ..nd
            };
            let mut buf = [0u8; 128];
            let n = nd.emit(&mut buf, ([2; 6], [4; 6]), info.src, info.dst);
            let again = parse_ipv6(&buf[..n]).expect("emitted NS/NA is IPv6");
            assert!(l4_checksum_ok6(&buf[..n], &again));
            assert_eq!(Neighbor::parse(&buf[..n], &again), Ok(nd));
        }
    }
    // The bytes as a DNS response to the resolver's queries.
    for qtype in [1, 28] {
        if let Some(Response::Addresses(addrs, _)) = parse_response(data, "example.com", qtype) {
            assert!(addrs.len() <= 16);
            assert!(addrs.iter().all(|a| a.is_ipv6() == (qtype == 28)));
        }
    }
});
