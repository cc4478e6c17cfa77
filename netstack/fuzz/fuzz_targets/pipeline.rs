//! Random frames through a configured firewall, on random ports, with the
//! isolation invariants checked on every verdict:
//! - nothing from a downlink reaches the uplink unless its source was a
//!   connected client, and it leaves with the uplink address as source;
//! - nothing from a downlink goes to a downlink other than back out of the
//!   port it came from (replies the firewall makes): no client-to-client;
//! - nothing from the uplink reaches a downlink unless addressed to a
//!   connected client.
#![no_main]

use std::net::Ipv4Addr;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use netstack::config::{NetConfig, QubesDb};
use netstack::firewall::{Firewall, Verdict, UPLINK};
use netstack::wire::{get_ip, get_u16, ETHERTYPE_IPV4};

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
";
const CLIENTS: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 137, 0, 10), Ipv4Addr::new(10, 137, 0, 11)];
const UPLINK_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
const MACS: [[u8; 6]; 3] = [
    [0x52, 0x54, 0, 0, 0, 1],
    [0x52, 0x54, 0, 0, 0, 2],
    [0x52, 0x54, 0, 0, 0, 3],
];

fn config() -> &'static NetConfig {
    static CFG: OnceLock<NetConfig> = OnceLock::new();
    CFG.get_or_init(|| NetConfig::from_db(&QubesDb::parse_snapshot(DB).unwrap()).unwrap())
}

fn ipv4_field(frame: &[u8], off: usize) -> Option<Ipv4Addr> {
    (get_u16(frame, 12) == Some(ETHERTYPE_IPV4))
        .then(|| get_ip(frame, 14 + off))
        .flatten()
}

fuzz_target!(|data: &[u8]| {
    let mut fw = Firewall::with_capacity(config().clone(), MACS.to_vec(), 64);
    let mut now = 0u64;
    let mut rest = data;
    // Each record: port (1 byte), time step (1 byte), length (2 bytes), frame.
    while rest.len() >= 4 {
        let port = usize::from(rest[0] % 4); // 3 is not a port: must be refused
        now += u64::from(rest[1]) * 100;
        let len = usize::from(u16::from_le_bytes([rest[2], rest[3]]) % 1600);
        rest = &rest[4..];
        let take = len.min(rest.len());
        let mut buf = [0u8; 2048];
        buf[..take].copy_from_slice(&rest[..take]);
        rest = &rest[take..];
        let src_in = ipv4_field(&buf[..take], 12);
        let verdict = fw.handle(now, port, &mut buf, take);
        let Verdict::Forward { port: out, len } = verdict else {
            continue;
        };
        assert!(len <= buf.len());
        let frame = &buf[..len];
        if port != UPLINK {
            if out == UPLINK {
                if let Some(src) = src_in {
                    assert!(
                        CLIENTS.contains(&src),
                        "unconnected source {src} forwarded upstream"
                    );
                }
                if let Some(src_out) = ipv4_field(frame, 12) {
                    assert_eq!(src_out, UPLINK_IP, "upstream packet not translated");
                }
            } else {
                assert_eq!(out, port, "a client's frame went to another downlink");
            }
        } else if out != UPLINK {
            let dst = ipv4_field(frame, 16).expect("only IPv4 goes from the uplink to a client");
            assert!(
                CLIENTS.contains(&dst),
                "upstream frame to {dst} reached a client port"
            );
        }
        let mut arp = [0u8; 64];
        let _ = fw.poll_emit(now, &mut arp);
    }
});
