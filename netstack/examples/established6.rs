//! Runs established IPv6 flow packets (UDP, 64 bytes with the FCS, as in
//! the `established_flow_v6` bench) through the firewall in a loop, for
//! profilers: `cargo run --release -p netstack --example established6 --
//! [packets] [general]`; `general` turns the fast path off.

use std::net::Ipv6Addr;

use netstack::config::{NetConfig, QubesDb};
use netstack::firewall::{Firewall, Verdict, UPLINK};
use netstack::ipv6::*;
use netstack::wire::*;

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let db = "/qubes-ip 10.0.2.15\n/qubes-netmask 255.255.255.0\n/qubes-gateway 10.0.2.2\n\
              /qubes-netvm-gateway 10.137.0.1\n/qubes-ip6 2001:db8:1::15\n\
              /qubes-gateway6 2001:db8:1::1\n/qubes-netvm-gateway6 fd09::1\n\
              /connected-ips6 fd09::a\n/qubes-firewall/fd09::a/policy accept\n";
    let cfg = NetConfig::from_db(&QubesDb::parse_snapshot(db).unwrap()).unwrap();
    let (up, down, gw) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 3]);
    let mut fw = Firewall::new(cfg, vec![up, down]);
    fw.set_fast_path(std::env::args().nth(2).as_deref() != Some("general"));
    let up6: Ipv6Addr = "2001:db8:1::15".parse().unwrap();
    let gw6: Ipv6Addr = "2001:db8:1::1".parse().unwrap();
    let client: Ipv6Addr = "fd09::a".parse().unwrap();
    let server: Ipv6Addr = "2001:db8:80::5".parse().unwrap();
    let mut buf = [0u8; 2048];
    while fw.poll_emit(0, &mut buf).is_some() {}
    let na = Neighbor {
        kind: ND_NEIGHBOR_ADVERT,
        target: gw6,
        lladdr: Some(gw),
        flags: NA_SOLICITED | NA_OVERRIDE,
    };
    let len = na.emit(&mut buf, (gw, up), gw6, up6);
    assert_eq!(fw.handle(0, UPLINK, &mut buf, len), Verdict::Consumed);
    let payload = 2;
    let mut f = vec![0u8; 14 + 40 + 8 + payload];
    put_eth(&mut f, down, [2, 0, 0, 0, 0, 0x10], ETHERTYPE_IPV6);
    put_ipv6_header(&mut f, 14, 8 + payload, PROTO_UDP, 64, client, server);
    put_u16(&mut f, 54, 40000);
    put_u16(&mut f, 56, 5201);
    put_u16(&mut f, 58, (8 + payload) as u16);
    let sum = fold(sum16(
        &f[54..],
        pseudo_header_sum6(client, server, PROTO_UDP, 8 + payload),
    ));
    put_u16(&mut f, 60, sum);
    let mut forwarded = 0u64;
    for _ in 0..n {
        buf[..f.len()].copy_from_slice(&f);
        if matches!(fw.handle(1, 1, &mut buf, f.len()), Verdict::Forward { .. }) {
            forwarded += 1;
        }
    }
    println!("{forwarded} of {n} forwarded");
}
