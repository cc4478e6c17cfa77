//! The firewall stage's cost per packet, on the host (`cargo xtask bench
//! netstack`, or `cargo bench -p netstack`). Criterion prints time per
//! packet and packets per second ("Melem/s" = Mpps).

use std::hint::black_box;
use std::net::Ipv4Addr;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use netstack::config::{NetConfig, QubesDb};
use netstack::firewall::{Firewall, Verdict, CONNTRACK_CAPACITY, UPLINK};
use netstack::rules::{Probe, Ruleset};
use netstack::wire::*;

const UP_MAC: Mac = [0x52, 0x54, 0, 0, 0, 1];
const DOWN_MAC: Mac = [0x52, 0x54, 0, 0, 0, 2];
const GW_MAC: Mac = [2, 0, 0, 0, 0, 2];
const CLIENT_MAC: Mac = [2, 0, 0, 0, 0, 0x10];
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 137, 0, 10);
const UPLINK_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
const SERVER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 80);

/// A config whose client has `n` rules that do not match the benchmark's
/// traffic (TCP/UDP to 5201), then one that does.
fn firewall(n: usize) -> Firewall {
    firewall_with(n, CONNTRACK_CAPACITY)
}

/// As `firewall`, with room for `flows` tracked flows.
fn firewall_with(n: usize, flows: usize) -> Firewall {
    let mut db = String::from(
        "/qubes-ip 10.0.2.15\n/qubes-netmask 255.255.255.0\n/qubes-gateway 10.0.2.2\n\
         /qubes-netvm-gateway 10.137.0.1\n/connected-ips 10.137.0.10\n\
         /qubes-firewall/10.137.0.10/policy drop\n",
    );
    for i in 0..n {
        db.push_str(&format!("/qubes-firewall/10.137.0.10/{i:04} action=accept proto=tcp dst4=198.51.{}.0/24 dstports=1-1000\n", i % 250));
    }
    db.push_str(&format!(
        "/qubes-firewall/10.137.0.10/{n:04} action=accept dstports=5201-5201\n"
    ));
    let cfg = NetConfig::from_db(&QubesDb::parse_snapshot(&db).unwrap()).unwrap();
    let mut fw = Firewall::with_capacity(cfg, vec![UP_MAC, DOWN_MAC], flows);
    let mut buf = [0u8; 2048];
    fw.poll_emit(0, &mut buf).expect("ARP request");
    gateway_arp(&mut fw, 0);
    fw
}

/// The gateway's ARP reply: learned (again) at `now`.
fn gateway_arp(fw: &mut Firewall, now: u64) {
    let mut buf = [0u8; 64];
    let reply = Arp {
        op: ARP_REPLY,
        sender_mac: GW_MAC,
        sender_ip: Ipv4Addr::new(10, 0, 2, 2),
        target_mac: UP_MAC,
        target_ip: UPLINK_IP,
    };
    let len = reply.emit(&mut buf, GW_MAC, UP_MAC);
    assert_eq!(fw.handle(now, UPLINK, &mut buf, len), Verdict::Consumed);
}

/// An Ethernet + IPv4 + UDP (or TCP SYN) frame with valid checksums.
fn frame(
    proto: u8,
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    macs: (Mac, Mac),
    payload: usize,
) -> Vec<u8> {
    let l4_len = if proto == PROTO_TCP { 20 } else { 8 } + payload;
    let mut f = vec![0u8; 34 + l4_len];
    put_eth(&mut f, macs.1, macs.0, ETHERTYPE_IPV4);
    put_ipv4_header(&mut f, 14, 20 + l4_len, 64, proto, src, dst);
    put_u16(&mut f, 34, sport);
    put_u16(&mut f, 36, dport);
    if proto == PROTO_TCP {
        put_u8(&mut f, 46, 5 << 4);
        put_u8(&mut f, 47, TCP_SYN);
    } else {
        put_u16(&mut f, 38, l4_len as u16);
    }
    let c = fold(sum16(&f[34..], pseudo_header_sum(src, dst, proto, l4_len)));
    put_u16(&mut f, 34 + l4_checksum_offset(proto).unwrap(), c);
    f
}

fn run(fw: &mut Firewall, now: u64, port: usize, f: &[u8], buf: &mut [u8; 2048]) -> Verdict {
    buf[..f.len()].copy_from_slice(f);
    fw.handle(now, port, buf, f.len())
}

/// A UDP flow's frame each way, from client port `sport`, `payload` bytes
/// of data, the flow set up: (from the client, the reply from the server,
/// the frame size with FCS).
fn flow_frames(fw: &mut Firewall, sport: u16, payload: usize) -> (Vec<u8>, Vec<u8>, usize) {
    let out = frame(
        PROTO_UDP,
        CLIENT,
        sport,
        SERVER,
        5201,
        (CLIENT_MAC, DOWN_MAC),
        payload,
    );
    let mut buf = [0u8; 2048];
    assert!(matches!(
        run(fw, 1, 1, &out, &mut buf),
        Verdict::Forward { port: UPLINK, .. }
    ));
    let nat_port = get_u16(&buf, 34).unwrap();
    let back = frame(
        PROTO_UDP,
        SERVER,
        5201,
        UPLINK_IP,
        nat_port,
        (GW_MAC, UP_MAC),
        payload,
    );
    let size = out.len() + 4; // with FCS: a 64-byte frame for the small case
    (out, back, size)
}

/// Frames received from the NIC per batch in the batch benchmarks (the
/// kernel's `RX_BATCH`).
const BATCH: usize = 32;

/// An established flow's packets, both ways, small and full-size:
/// - `established_flow`: one frame per `Firewall::handle` call;
/// - `established_flow_general`: the same with the fast path off
///   (`Firewall::set_fast_path`), for what the fast path saves;
/// - `established_batch`: 32 frames per `Firewall::batch`, as the kernel
///   hands over a NIC's receive batch (time per frame).
///
/// Each frame gets back the 64 header bytes the firewall rewrites before it
/// goes through again (a NIC would bring a fresh frame); the payload is
/// never read on this path, so copying it would measure memcpy, not the
/// firewall.
fn established(c: &mut Criterion) {
    for (group, fast) in [
        ("established_flow", true),
        ("established_flow_general", false),
    ] {
        let mut g = c.benchmark_group(group);
        g.throughput(Throughput::Elements(1));
        for payload in [18usize, 1472] {
            let mut fw = firewall(100);
            fw.set_fast_path(fast);
            let (out, back, size) = flow_frames(&mut fw, 40000, payload);
            let restore = |fw: &mut Firewall, port: usize, f: &[u8], buf: &mut [u8; 2048]| {
                let n = f.len().min(64);
                buf[..n].copy_from_slice(&f[..n]);
                fw.handle(2, port, buf, f.len())
            };
            for (name, port, f) in [
                ("client_to_upstream", 1, &out),
                ("upstream_to_client", UPLINK, &back),
            ] {
                let mut buf = [0u8; 2048];
                buf[..f.len()].copy_from_slice(f);
                g.bench_function(BenchmarkId::new(name, size), |b| {
                    b.iter(|| black_box(restore(&mut fw, port, black_box(f), &mut buf)))
                });
                assert!(matches!(
                    restore(&mut fw, port, f, &mut buf),
                    Verdict::Forward { .. }
                ));
                assert_eq!(buf[..f.len()].get(64..), f.get(64..), "payload untouched");
            }
            assert_eq!(fw.stats().fast_path > 0, fast);
        }
        g.finish();
    }
    // Time and throughput per frame: each measured iteration is a whole
    // batch, its time divided by the batch's frames.
    let mut g = c.benchmark_group("established_batch");
    g.throughput(Throughput::Elements(1));
    for payload in [18usize, 1472] {
        let mut fw = firewall(100);
        let (out, back, size) = flow_frames(&mut fw, 40000, payload);
        for (name, port, f) in [
            ("client_to_upstream", 1, &out),
            ("upstream_to_client", UPLINK, &back),
        ] {
            let mut bufs = vec![[0u8; 2048]; BATCH];
            for b in bufs.iter_mut() {
                b[..f.len()].copy_from_slice(f);
            }
            let n = f.len().min(64);
            let run_batch = |fw: &mut Firewall, bufs: &mut [[u8; 2048]]| {
                let mut forwarded = 0;
                for b in bufs.iter_mut() {
                    b[..n].copy_from_slice(&black_box(f)[..n]);
                }
                let mut batch = fw.batch(2, port);
                for b in bufs.iter_mut() {
                    if let Verdict::Forward { .. } = batch.handle(b, f.len()) {
                        forwarded += 1;
                    }
                }
                forwarded
            };
            g.bench_function(BenchmarkId::new(name, size), |b| {
                b.iter_custom(|frames| {
                    let batches = frames.div_ceil(BATCH as u64);
                    let start = std::time::Instant::now();
                    for _ in 0..batches {
                        black_box(run_batch(&mut fw, &mut bufs));
                    }
                    // The time of `frames` frames, of the batches' frames.
                    start
                        .elapsed()
                        .mul_f64(frames as f64 / (batches * BATCH as u64) as f64)
                })
            });
            assert_eq!(run_batch(&mut fw, &mut bufs), BATCH);
            assert_eq!(bufs[0].get(64..f.len()), f.get(64..), "payload untouched");
        }
    }
    g.finish();
}

/// The same over IPv6 (masqueraded to the uplink's IPv6 address).
fn established_v6(c: &mut Criterion) {
    use netstack::ipv6::*;
    use std::net::Ipv6Addr;
    let db = "/qubes-ip 10.0.2.15\n/qubes-netmask 255.255.255.0\n/qubes-gateway 10.0.2.2\n\
              /qubes-netvm-gateway 10.137.0.1\n/qubes-ip6 2001:db8:1::15\n\
              /qubes-gateway6 2001:db8:1::1\n/qubes-netvm-gateway6 fd09::1\n\
              /connected-ips6 fd09::a\n/qubes-firewall/fd09::a/policy accept\n";
    let cfg = NetConfig::from_db(&QubesDb::parse_snapshot(db).unwrap()).unwrap();
    let mut fw = Firewall::new(cfg, vec![UP_MAC, DOWN_MAC]);
    let up6: Ipv6Addr = "2001:db8:1::15".parse().unwrap();
    let gw6: Ipv6Addr = "2001:db8:1::1".parse().unwrap();
    let client: Ipv6Addr = "fd09::a".parse().unwrap();
    let server: Ipv6Addr = "2001:db8:80::5".parse().unwrap();
    let mut buf = [0u8; 2048];
    while fw.poll_emit(0, &mut buf).is_some() {}
    let na = Neighbor {
        kind: ND_NEIGHBOR_ADVERT,
        target: gw6,
        lladdr: Some(GW_MAC),
        flags: NA_SOLICITED | NA_OVERRIDE,
    };
    let n = na.emit(&mut buf, (GW_MAC, UP_MAC), gw6, up6);
    assert_eq!(fw.handle(0, UPLINK, &mut buf, n), Verdict::Consumed);
    // UDP, 64 bytes on the wire with the FCS: 14 + 40 + 8 + 2 + 4.
    let payload = 2;
    let mut f = vec![0u8; 14 + 40 + 8 + payload];
    put_eth(&mut f, DOWN_MAC, CLIENT_MAC, ETHERTYPE_IPV6);
    put_ipv6_header(&mut f, 14, 8 + payload, PROTO_UDP, 64, client, server);
    put_u16(&mut f, 54, 40000);
    put_u16(&mut f, 56, 5201);
    put_u16(&mut f, 58, (8 + payload) as u16);
    let sum = fold(sum16(
        &f[54..],
        pseudo_header_sum6(client, server, PROTO_UDP, 8 + payload),
    ));
    put_u16(&mut f, 60, sum);
    assert!(matches!(
        run(&mut fw, 1, 1, &f, &mut buf),
        Verdict::Forward { port: UPLINK, .. }
    ));
    let mut g = c.benchmark_group("established_flow_v6");
    g.throughput(Throughput::Elements(1));
    g.bench_function(BenchmarkId::new("client_to_upstream", f.len() + 4), |b| {
        b.iter(|| black_box(run(&mut fw, 2, 1, black_box(&f), &mut buf)))
    });
    g.finish();
}

fn new_flows(c: &mut Criterion) {
    let mut g = c.benchmark_group("new_flow");
    g.throughput(Throughput::Elements(1));
    // The full-size table (its indexes larger than the caches), and one of
    // 1024 flows that stays in them: the difference is memory traffic.
    for (rules, flows, name) in [
        (10usize, CONNTRACK_CAPACITY, "tcp_syn_rules"),
        (100, CONNTRACK_CAPACITY, "tcp_syn_rules"),
        (1000, CONNTRACK_CAPACITY, "tcp_syn_rules"),
        (100, 1024, "tcp_syn_rules_table_1024"),
    ] {
        let mut fw = firewall_with(rules, flows);
        let mut buf = [0u8; 2048];
        let mut n: u64 = 0;
        g.bench_function(BenchmarkId::new(name, rules), |b| {
            b.iter_batched_ref(
                || {
                    n += 1;
                    // A new client port and server address each time; time
                    // advances 1 s per flow, so old half-open flows expire
                    // and the table recycles them.
                    let dst = Ipv4Addr::from(0xc000_0200u32 + (n % 200) as u32);
                    (
                        n * 1000,
                        frame(
                            PROTO_TCP,
                            CLIENT,
                            1024 + (n % 60000) as u16,
                            dst,
                            5201,
                            (CLIENT_MAC, DOWN_MAC),
                            0,
                        ),
                    )
                },
                |(now, f)| {
                    // The gateway's ARP entry lasts 10 minutes: renewed
                    // every 5 (virtual) ones, so every flow goes out.
                    if *now % 300_000 == 0 {
                        gateway_arp(&mut fw, *now);
                    }
                    let v = run(&mut fw, *now, 1, f, &mut buf);
                    debug_assert!(matches!(v, Verdict::Forward { port: UPLINK, .. }));
                    black_box(v)
                },
                BatchSize::SmallInput,
            )
        });
    }
    // As a NIC delivers them: from a fixed ring of receive buffers (1024
    // frames built before the clock starts, each of its own client port
    // and used in turn, so each starts a new flow: its last flow's 60 s
    // handshake expired 1024 (virtual) seconds before), where the runs
    // above stream freshly allocated frames through the caches.
    let mut fw = firewall(100);
    let ring: Vec<Vec<u8>> = (0..1024u32)
        .map(|i| {
            let dst = Ipv4Addr::from(0xc000_0200u32 + i % 200);
            frame(
                PROTO_TCP,
                CLIENT,
                1024 + i as u16,
                dst,
                5201,
                (CLIENT_MAC, DOWN_MAC),
                0,
            )
        })
        .collect();
    let mut buf = [0u8; 2048];
    let (mut n, mut forwarded) = (0u64, 0u64);
    g.bench_function(BenchmarkId::new("tcp_syn_rules_ring", 100), |b| {
        b.iter(|| {
            n += 1;
            let now = n * 1000;
            if now % 300_000 == 0 {
                gateway_arp(&mut fw, now);
            }
            let v = run(&mut fw, now, 1, &ring[(n % 1024) as usize], &mut buf);
            forwarded += u64::from(matches!(v, Verdict::Forward { port: UPLINK, .. }));
            black_box(v)
        })
    });
    assert_eq!(forwarded, n, "every frame started a flow and went out");
    g.finish();
}

fn rule_matching(c: &mut Criterion) {
    let mut g = c.benchmark_group("rules_decide");
    g.throughput(Throughput::Elements(1));
    for n in [10usize, 100, 1000] {
        let mut entries: Vec<(String, String)> = vec![("policy".into(), "drop".into())];
        for i in 0..n {
            entries.push((
                format!("{i:04}"),
                format!(
                    "action=accept proto=tcp dst4=198.51.{}.0/24 dstports=1-1000",
                    i % 250
                ),
            ));
        }
        let rs = Ruleset::from_entries(entries.iter().map(|(a, b)| (a.as_str(), b.as_str())), true)
            .unwrap();
        let probe = Probe {
            proto: PROTO_TCP,
            dst: SERVER.into(),
            dport: 443,
            icmp_type: 0,
            to_dns: false,
        };
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| black_box(rs.decide(black_box(&probe), true)))
        });
    }
    g.finish();
}

fn icmp_error(c: &mut Criterion) {
    let mut fw = firewall(10);
    let mut buf = [0u8; 2048];
    let out = frame(
        PROTO_UDP,
        CLIENT,
        40001,
        SERVER,
        5201,
        (CLIENT_MAC, DOWN_MAC),
        18,
    );
    run(&mut fw, 1, 1, &out, &mut buf);
    let natted = buf[14..42].to_vec();
    let mut body = vec![3u8, 3, 0, 0, 0, 0, 0, 0];
    body.extend_from_slice(&natted);
    let mut f = vec![0u8; 34 + body.len()];
    put_eth(&mut f, UP_MAC, GW_MAC, ETHERTYPE_IPV4);
    put_ipv4_header(
        &mut f,
        14,
        20 + body.len(),
        64,
        PROTO_ICMP,
        SERVER,
        UPLINK_IP,
    );
    put_bytes(&mut f, 34, &body);
    let c2 = checksum(&f[34..]);
    put_u16(&mut f, 36, c2);
    let mut g = c.benchmark_group("icmp_error_translation");
    g.throughput(Throughput::Elements(1));
    g.bench_function("port_unreachable", |b| {
        b.iter(|| black_box(run(&mut fw, 2, UPLINK, black_box(&f), &mut buf)))
    });
    g.finish();
}

/// A flood of new flows: the table never grows past its capacity; new
/// unanswered flows displace the oldest unanswered ones, and an answered
/// flow set up before the flood survives it.
fn flood(c: &mut Criterion) {
    let mut fw = firewall(10);
    let mut buf = [0u8; 2048];
    let before = fw.conntrack_memory();
    // One answered flow before the flood.
    let (_, back, _) = flow_frames(&mut fw, 999, 18);
    assert!(matches!(
        run(&mut fw, 2, UPLINK, &back, &mut buf),
        Verdict::Forward { port: 1, .. }
    ));
    for n in 0..1_000_000u64 {
        let dst = Ipv4Addr::from(0xc000_0200u32 + (n % 250) as u32);
        let f = frame(
            PROTO_TCP,
            CLIENT,
            1024 + (n % 64000) as u16,
            dst,
            5201,
            (CLIENT_MAC, DOWN_MAC),
            0,
        );
        run(&mut fw, 5, 1, &f, &mut buf);
    }
    let refused = fw
        .stats()
        .drop_count(netstack::firewall::DropReason::ConntrackFull);
    let survived = matches!(
        run(&mut fw, 6, UPLINK, &back, &mut buf),
        Verdict::Forward { port: 1, .. }
    );
    println!(
        "flood: 1000000 new flows in one second of virtual time: {} tracked (capacity {}), {} evicted, {} refused; \
         the answered flow from before {}; conntrack memory {} KiB before, {} KiB after",
        fw.flows(),
        CONNTRACK_CAPACITY,
        fw.conntrack_evictions(),
        refused,
        if survived { "survived" } else { "was LOST" },
        before / 1024,
        fw.conntrack_memory() / 1024
    );
    let _ = c;
}

/// The same job — validate an Ethernet/IPv4/UDP frame (header checksum
/// included) and read the addresses and ports — done by our hand-written
/// views and by the two crates one might use instead.
fn parsers(c: &mut Criterion) {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};
    use smoltcp::wire::{EthernetFrame, EthernetProtocol, Ipv4Packet, UdpPacket};
    let f = frame(
        PROTO_UDP,
        CLIENT,
        40000,
        SERVER,
        5201,
        (CLIENT_MAC, DOWN_MAC),
        18,
    );
    let mut g = c.benchmark_group("parse_udp_64B");
    g.throughput(Throughput::Elements(1));
    g.bench_function("netstack_wire", |b| {
        b.iter(|| {
            let i = parse_ipv4(black_box(&f)).unwrap();
            black_box((i.src, i.dst, i.sport, i.dport))
        })
    });
    g.bench_function("smoltcp_wire", |b| {
        b.iter(|| {
            let eth = EthernetFrame::new_checked(black_box(&f[..])).unwrap();
            assert!(eth.ethertype() == EthernetProtocol::Ipv4);
            let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
            assert!(ip.verify_checksum());
            let udp = UdpPacket::new_checked(ip.payload()).unwrap();
            black_box((ip.src_addr(), ip.dst_addr(), udp.src_port(), udp.dst_port()))
        })
    });
    g.bench_function("etherparse", |b| {
        b.iter(|| {
            let p = SlicedPacket::from_ethernet(black_box(&f)).unwrap();
            let Some(NetSlice::Ipv4(ip)) = p.net else {
                panic!("not IPv4")
            };
            let h = ip.header();
            assert_eq!(h.to_header().calc_header_checksum(), h.header_checksum());
            let Some(TransportSlice::Udp(u)) = p.transport else {
                panic!("not UDP")
            };
            black_box((
                h.source(),
                h.destination(),
                u.source_port(),
                u.destination_port(),
            ))
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    parsers,
    established,
    established_v6,
    new_flows,
    rule_matching,
    icmp_error,
    flood
);
criterion_main!(benches);
