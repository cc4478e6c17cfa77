//! Runs established-flow packets through the firewall in a loop, for
//! profilers (`valgrind --tool=callgrind`, `perf`): `cargo run --release -p
//! netstack --example established -- [packets] [batch] [general]`; with
//! a batch size, frames go through `Firewall::batch` that many at a time
//! (0: one `Firewall::handle` each); `general` turns the fast path off.

use std::net::Ipv4Addr;

use netstack::config::{NetConfig, QubesDb};
use netstack::firewall::{Firewall, Verdict, UPLINK};
use netstack::wire::*;

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let batch: usize = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(0);
    let db = "/qubes-ip 10.0.2.15\n/qubes-netmask 255.255.255.0\n/qubes-gateway 10.0.2.2\n\
              /qubes-netvm-gateway 10.137.0.1\n/connected-ips 10.137.0.10\n\
              /qubes-firewall/10.137.0.10/policy accept\n";
    let cfg = NetConfig::from_db(&QubesDb::parse_snapshot(db).unwrap()).unwrap();
    let (up, down, gw) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 3]);
    let mut fw = Firewall::new(cfg, vec![up, down]);
    fw.set_fast_path(std::env::args().nth(3).as_deref() != Some("general"));
    let mut buf = [0u8; 2048];
    fw.poll_emit(0, &mut buf).unwrap();
    let arp = Arp {
        op: ARP_REPLY,
        sender_mac: gw,
        sender_ip: Ipv4Addr::new(10, 0, 2, 2),
        target_mac: up,
        target_ip: Ipv4Addr::new(10, 0, 2, 15),
    };
    let len = arp.emit(&mut buf, gw, up);
    assert_eq!(fw.handle(0, UPLINK, &mut buf, len), Verdict::Consumed);
    let (src, dst) = (Ipv4Addr::new(10, 137, 0, 10), Ipv4Addr::new(192, 0, 2, 80));
    let mut f = vec![0u8; 60];
    put_eth(&mut f, down, [2, 0, 0, 0, 0, 0x10], ETHERTYPE_IPV4);
    put_ipv4_header(&mut f, 14, 46, 64, PROTO_UDP, src, dst);
    put_u16(&mut f, 34, 40000);
    put_u16(&mut f, 36, 5201);
    put_u16(&mut f, 38, 26);
    let c = fold(sum16(&f[34..], pseudo_header_sum(src, dst, PROTO_UDP, 26)));
    put_u16(&mut f, 40, c);
    let mut forwarded = 0u64;
    let start = std::time::Instant::now();
    if batch == 0 {
        for _ in 0..n {
            buf[..f.len()].copy_from_slice(&f);
            if matches!(fw.handle(1, 1, &mut buf, f.len()), Verdict::Forward { .. }) {
                forwarded += 1;
            }
        }
    } else {
        // As a NIC's receive batch: `batch` frames, then the firewall
        // over all of them (`Firewall::batch`).
        let mut bufs = vec![[0u8; 2048]; batch];
        for _ in 0..n / batch as u64 {
            for b in bufs.iter_mut() {
                b[..f.len()].copy_from_slice(&f);
            }
            let mut fb = fw.batch(1, 1);
            for b in bufs.iter_mut() {
                if matches!(fb.handle(b, f.len()), Verdict::Forward { .. }) {
                    forwarded += 1;
                }
            }
        }
    }
    let ns = start.elapsed().as_nanos() as f64 / n as f64;
    println!("{forwarded} of {n} forwarded, {ns:.1} ns each");
}
