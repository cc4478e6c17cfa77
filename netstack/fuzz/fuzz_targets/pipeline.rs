//! Random frames through a configured firewall, on random ports, with the
//! isolation invariants checked on every verdict:
//! - nothing from a downlink reaches the uplink unless its source was a
//!   connected client, and it leaves with the uplink address as source;
//! - nothing from a downlink goes to a downlink other than back out of the
//!   port it came from (replies the firewall makes): no client-to-client;
//! - nothing from the uplink reaches a downlink unless addressed to a
//!   connected client.
//!
//! The same holds for IPv6, which the configuration turns on, and while
//! dom0 connects and disconnects clients between frames (a record whose
//! first byte is 0xf0 or more: its low four bits say which of the four
//! are connected; "connected" above means at that time). And a twin
//! firewall with the fast path off gives the same verdict, output bytes
//! and counters for every frame (the fast path only saves time).
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use netstack::config::{NetConfig, QubesDb};
use netstack::firewall::{Firewall, Verdict, UPLINK};
use netstack::ipv6::get_ip6;
use netstack::wire::{get_ip, get_u16, ETHERTYPE_IPV4, ETHERTYPE_IPV6};

const DB: &str = "\
/qubes-ip 10.0.2.15
/qubes-netmask 255.255.255.0
/qubes-gateway 10.0.2.2
/qubes-primary-dns 10.0.2.3
/qubes-netvm-gateway 10.137.0.1
/qubes-netvm-primary-dns 10.139.1.1
/connected-ips 10.137.0.10 10.137.0.11
/qubes-firewall/10.137.0.10/policy drop
/qubes-firewall/10.137.0.10/0000 action=accept proto=tcp dstports=1-1000
/qubes-firewall/10.137.0.10/0001 action=accept specialtarget=dns
/qubes-firewall/10.137.0.10/0002 action=accept proto=icmp
/qubes-firewall/10.137.0.11/policy accept
/qubes-ip6 2001:db8:1::15
/qubes-gateway6 2001:db8:1::1
/qubes-netvm-gateway6 fd09::1
/connected-ips6 fd09::a fd09::b
/qubes-firewall/fd09::a/policy drop
/qubes-firewall/fd09::a/0000 action=accept proto=tcp dstports=1-1000
/qubes-firewall/fd09::a/0001 action=accept proto=icmp
/qubes-firewall/fd09::b/policy accept
";
const CLIENTS: [IpAddr; 4] = [
    IpAddr::V4(Ipv4Addr::new(10, 137, 0, 10)),
    IpAddr::V4(Ipv4Addr::new(10, 137, 0, 11)),
    IpAddr::V6(Ipv6Addr::new(0xfd09, 0, 0, 0, 0, 0, 0, 0xa)),
    IpAddr::V6(Ipv6Addr::new(0xfd09, 0, 0, 0, 0, 0, 0, 0xb)),
];
const UPLINK_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
const UPLINK_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x15);
const MACS: [[u8; 6]; 3] = [
    [0x52, 0x54, 0, 0, 0, 1],
    [0x52, 0x54, 0, 0, 0, 2],
    [0x52, 0x54, 0, 0, 0, 3],
];

fn config() -> &'static NetConfig {
    static CFG: OnceLock<NetConfig> = OnceLock::new();
    CFG.get_or_init(|| NetConfig::from_db(&QubesDb::parse_snapshot(DB).unwrap()).unwrap())
}

/// The source (`src`) or destination address of an IPv4 or IPv6 frame.
fn ip_field(frame: &[u8], src: bool) -> Option<IpAddr> {
    match get_u16(frame, 12)? {
        ETHERTYPE_IPV4 => get_ip(frame, if src { 26 } else { 30 }).map(IpAddr::V4),
        ETHERTYPE_IPV6 => get_ip6(frame, if src { 22 } else { 38 }).map(IpAddr::V6),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut fw = Firewall::with_capacity(config().clone(), MACS.to_vec(), 64);
    let mut twin = Firewall::with_capacity(config().clone(), MACS.to_vec(), 64);
    twin.set_fast_path(false);
    let mut now = 0u64;
    let mut rest = data;
    let mut connected = [true; 4];
    // Each record: port (1 byte), time step (1 byte), length (2 bytes),
    // frame; or one byte of 0xf0 or more, a change of the clients.
    while let Some(&first) = rest.first() {
        if first >= 0xf0 {
            connected = core::array::from_fn(|i| first & (1 << i) != 0);
            let wanted: Vec<_> = config()
                .clients
                .iter()
                .filter(|c| {
                    CLIENTS
                        .iter()
                        .zip(connected)
                        .any(|(a, on)| on && *a == c.ip)
                })
                .cloned()
                .collect();
            assert_eq!(fw.set_clients(wanted.clone()), twin.set_clients(wanted));
            rest = &rest[1..];
            continue;
        }
        if rest.len() < 4 {
            break;
        }
        let is_connected = |a: &IpAddr| CLIENTS.iter().zip(connected).any(|(c, on)| on && c == a);
        let port = usize::from(rest[0] % 4); // 3 is not a port: must be refused
        now += u64::from(rest[1]) * 100;
        let len = usize::from(u16::from_le_bytes([rest[2], rest[3]]) % 1600);
        rest = &rest[4..];
        let take = len.min(rest.len());
        let mut buf = [0u8; 2048];
        buf[..take].copy_from_slice(&rest[..take]);
        rest = &rest[take..];
        let src_in = ip_field(&buf[..take], true);
        let mut twin_buf = buf;
        let verdict = fw.handle(now, port, &mut buf, take);
        assert_eq!(verdict, twin.handle(now, port, &mut twin_buf, take));
        assert!(buf == twin_buf, "the fast path wrote other bytes");
        let mut counters = fw.stats().clone();
        counters.fast_path = 0;
        assert_eq!(&counters, twin.stats());
        let Verdict::Forward { port: out, len } = verdict else {
            continue;
        };
        assert!(len <= buf.len());
        let frame = &buf[..len];
        if port != UPLINK {
            if out == UPLINK {
                if let Some(src) = src_in {
                    assert!(
                        is_connected(&src),
                        "unconnected source {src} forwarded upstream"
                    );
                }
                if let Some(src_out) = ip_field(frame, true) {
                    assert!(
                        src_out == IpAddr::V4(UPLINK_IP) || src_out == IpAddr::V6(UPLINK_IP6),
                        "upstream packet not translated: {src_out}"
                    );
                }
            } else {
                assert_eq!(out, port, "a client's frame went to another downlink");
            }
        } else if out != UPLINK {
            let dst = ip_field(frame, false).expect("only IP goes from the uplink to a client");
            assert!(
                is_connected(&dst),
                "upstream frame to {dst} reached a client port"
            );
        }
        let (mut ask, mut twin_ask) = ([0u8; 128], [0u8; 128]);
        assert_eq!(
            fw.poll_emit(now, &mut ask),
            twin.poll_emit(now, &mut twin_ask)
        );
        assert!(ask == twin_ask, "the twins asked differently");
    }
});
