//! Runs new TCP flows (a SYN each, 100 rules before the match, time
//! advancing so that old half-open flows expire and the table recycles)
//! through the firewall in a loop, for profilers: `cargo run --release -p
//! netstack --example new_flows -- [flows] [table capacity]`. Prints the
//! time per flow.

use std::net::Ipv4Addr;

use netstack::config::{NetConfig, QubesDb};
use netstack::firewall::{Firewall, Verdict, CONNTRACK_CAPACITY, UPLINK};
use netstack::wire::*;

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    let mut db = String::from(
        "/qubes-ip 10.0.2.15\n/qubes-netmask 255.255.255.0\n/qubes-gateway 10.0.2.2\n\
         /qubes-netvm-gateway 10.137.0.1\n/connected-ips 10.137.0.10\n\
         /qubes-firewall/10.137.0.10/policy drop\n",
    );
    for i in 0..100 {
        db.push_str(&format!(
            "/qubes-firewall/10.137.0.10/{i:04} action=accept proto=tcp dst4=198.51.{}.0/24 dstports=1-1000\n",
            i % 250
        ));
    }
    db.push_str("/qubes-firewall/10.137.0.10/0100 action=accept dstports=5201-5201\n");
    let cfg = NetConfig::from_db(&QubesDb::parse_snapshot(&db).unwrap()).unwrap();
    let (up, down, gw) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 3]);
    let flows = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(CONNTRACK_CAPACITY);
    let mut fw = Firewall::with_capacity(cfg, vec![up, down], flows);
    let mut buf = [0u8; 2048];
    fw.poll_emit(0, &mut buf).unwrap();
    let arp = Arp {
        op: ARP_REPLY,
        sender_mac: gw,
        sender_ip: Ipv4Addr::new(10, 0, 2, 2),
        target_mac: up,
        target_ip: Ipv4Addr::new(10, 0, 2, 15),
    };
    let mut arp_frame = [0u8; 64];
    let arp_len = arp.emit(&mut arp_frame, gw, up);
    // 1024 frames, each of its own client port, built before the clock
    // starts and used in turn: a frame comes round again 1024 (virtual)
    // seconds later, long after its flow's 60 s handshake expired, so each
    // one starts a new flow.
    let src = Ipv4Addr::new(10, 137, 0, 10);
    let frames: Vec<[u8; 54]> = (0..1024u32)
        .map(|i| {
            let dst = Ipv4Addr::from(0xc000_0200u32 + i % 200);
            let mut f = [0u8; 54];
            put_eth(&mut f, down, [2, 0, 0, 0, 0, 0x10], ETHERTYPE_IPV4);
            put_ipv4_header(&mut f, 14, 40, 64, PROTO_TCP, src, dst);
            put_u16(&mut f, 34, 1024 + i as u16);
            put_u16(&mut f, 36, 5201);
            put_u8(&mut f, 46, 5 << 4);
            put_u8(&mut f, 47, TCP_SYN);
            let c = fold(sum16(&f[34..], pseudo_header_sum(src, dst, PROTO_TCP, 20)));
            put_u16(&mut f, 50, c);
            f
        })
        .collect();
    let mut forwarded = 0u64;
    let start = std::time::Instant::now();
    for i in 0..n {
        if i % 300 == 0 {
            // The gateway's ARP entry lasts 10 minutes; renew it.
            let mut f = arp_frame;
            assert_eq!(
                fw.handle(i * 1000, UPLINK, &mut f, arp_len),
                Verdict::Consumed
            );
        }
        let f = &frames[(i % 1024) as usize];
        buf[..f.len()].copy_from_slice(f);
        if matches!(
            fw.handle(i * 1000, 1, &mut buf, f.len()),
            Verdict::Forward { .. }
        ) {
            forwarded += 1;
        }
    }
    let ns = start.elapsed().as_nanos() as f64 / n as f64;
    println!("{forwarded} of {n} forwarded, {ns:.1} ns each");
}
