//! Frames in, frames out: the firewall pipeline on the host.

use super::*;
use crate::config::QubesDb;

const UP_MAC: Mac = [0x52, 0x54, 0, 0, 0, 1];
const DOWN_MAC: Mac = [0x52, 0x54, 0, 0, 0, 2];
const GW_MAC: Mac = [0x02, 0, 0, 0, 0, 0x99];
const CLIENT_MAC: Mac = [0x02, 0, 0, 0, 0, 0x10];
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 137, 0, 10);
const OTHER: Ipv4Addr = Ipv4Addr::new(10, 137, 0, 11);
const UPLINK_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const SERVER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 80);
const BUF: usize = 2048;

const DB: &str = "\
/qubes-ip 10.0.2.15
/qubes-netmask 255.255.255.0
/qubes-gateway 10.0.2.2
/qubes-primary-dns 10.0.2.3
/qubes-netvm-gateway 10.137.0.1
/qubes-netvm-netmask 255.255.255.255
/qubes-netvm-primary-dns 10.139.1.1
/qubes-netvm-secondary-dns 10.139.1.2
/connected-ips 10.137.0.10 10.137.0.11 10.137.0.12
/qubes-firewall/10.137.0.10/policy drop
/qubes-firewall/10.137.0.10/0000 action=accept proto=tcp dstports=5201-5201
/qubes-firewall/10.137.0.10/0001 action=accept proto=udp dstports=5201-5201
/qubes-firewall/10.137.0.10/0002 action=accept specialtarget=dns
/qubes-firewall/10.137.0.10/0003 action=accept proto=icmp
/qubes-firewall/10.137.0.11/policy accept
/qubes-firewall/10.137.0.12/policy accept
/qubes-firewall/10.137.0.12/0000 action=accept proto=nonsense
";

fn firewall() -> Firewall {
    let cfg = NetConfig::from_db(&QubesDb::parse_snapshot(DB).unwrap()).unwrap();
    Firewall::new(cfg, alloc::vec![UP_MAC, DOWN_MAC])
}

fn ipv4(
    dst_mac: Mac,
    src_mac: Mac,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ttl: u8,
    proto: u8,
    l4: &[u8],
) -> Vec<u8> {
    let mut f = alloc::vec![0u8; BUF];
    put_eth(&mut f, dst_mac, src_mac, ETHERTYPE_IPV4);
    put_ipv4_header(&mut f, 14, 20 + l4.len(), ttl, proto, src, dst);
    put_bytes(&mut f, 34, l4);
    let len = 34 + l4.len();
    let sum = match proto {
        PROTO_TCP | PROTO_UDP => fold(sum16(
            &f[34..len],
            pseudo_header_sum(src, dst, proto, l4.len()),
        )),
        _ => checksum(&f[34..len]),
    };
    put_u16(&mut f, 34 + l4_checksum_offset(proto).unwrap(), sum);
    f.truncate(len);
    f
}

pub(super) fn udp_seg(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut s = alloc::vec![0u8; 8];
    put_u16(&mut s, 0, sport);
    put_u16(&mut s, 2, dport);
    put_u16(&mut s, 4, (8 + payload.len()) as u16);
    s.extend_from_slice(payload);
    s
}

pub(super) fn tcp_seg(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut s = alloc::vec![0u8; 20];
    put_u16(&mut s, 0, sport);
    put_u16(&mut s, 2, dport);
    put_u8(&mut s, 12, 5 << 4);
    put_u8(&mut s, 13, flags);
    s
}

fn echo(icmp_type: u8, id: u16) -> Vec<u8> {
    let mut s = alloc::vec![icmp_type, 0, 0, 0, 0, 0, 0, 1];
    put_u16(&mut s, 4, id);
    s.extend_from_slice(b"ping");
    s
}

/// A client's IPv4 packet to `dst` (TTL 64), from its own MAC on port 1.
fn from_client(dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    ipv4(DOWN_MAC, CLIENT_MAC, CLIENT, dst, 64, proto, l4)
}

/// Runs one frame through; returns the verdict and the output frame.
pub(super) fn run(fw: &mut Firewall, now: u64, port: usize, frame: &[u8]) -> (Verdict, Vec<u8>) {
    let mut buf = alloc::vec![0u8; BUF];
    buf[..frame.len()].copy_from_slice(frame);
    let v = fw.handle(now, port, &mut buf, frame.len());
    let len = match v {
        Verdict::Forward { len, .. } => len,
        _ => 0,
    };
    buf.truncate(len);
    (v, buf)
}

fn arp_frame(
    op: u16,
    sender_mac: Mac,
    sender_ip: Ipv4Addr,
    target_ip: Ipv4Addr,
    eth_dst: Mac,
) -> Vec<u8> {
    let mut f = alloc::vec![0u8; 42];
    Arp {
        op,
        sender_mac,
        sender_ip,
        target_mac: [0; 6],
        target_ip,
    }
    .emit(&mut f, sender_mac, eth_dst);
    f
}

/// A firewall whose gateway is resolved.
fn ready() -> Firewall {
    let mut fw = firewall();
    let mut buf = [0u8; 64];
    let (port, len) = fw.poll_emit(0, &mut buf).expect("ARP for the gateway");
    assert_eq!(port, UPLINK);
    let req = Arp::parse(&buf[..len]).unwrap();
    assert_eq!(
        (req.op, req.target_ip, req.sender_ip),
        (ARP_REQUEST, GATEWAY, UPLINK_IP)
    );
    assert!(fw.poll_emit(1, &mut buf).is_none(), "retries wait a second");
    let reply = arp_frame(ARP_REPLY, GW_MAC, GATEWAY, UPLINK_IP, UP_MAC);
    assert_eq!(run(&mut fw, 2, UPLINK, &reply).0, Verdict::Consumed);
    assert_eq!(fw.gateway_mac(), Some(GW_MAC));
    assert!(
        fw.poll_emit(5000, &mut buf).is_none(),
        "resolved: no more requests"
    );
    fw
}

fn parsed(frame: &[u8]) -> Ipv4Info {
    let i = parse_ipv4(frame).expect("output frame is valid IPv4 with valid checksums");
    if !i.fragment {
        assert!(l4_checksum_ok(frame, &i), "output transport checksum");
    }
    i
}

#[test]
fn answers_arp_for_the_gateway_and_proxies_for_clients() {
    let mut fw = firewall();
    let req = arp_frame(
        ARP_REQUEST,
        CLIENT_MAC,
        CLIENT,
        Ipv4Addr::new(10, 137, 0, 1),
        BROADCAST,
    );
    let (v, out) = run(&mut fw, 0, 1, &req);
    assert_eq!(v, Verdict::Forward { port: 1, len: 42 });
    let a = Arp::parse(&out).unwrap();
    assert_eq!(
        (a.op, a.sender_mac, a.sender_ip, a.target_ip),
        (ARP_REPLY, DOWN_MAC, Ipv4Addr::new(10, 137, 0, 1), CLIENT)
    );
    assert_eq!(get_mac(&out, 0), Some(CLIENT_MAC));
    // A spoofed sender gets nothing.
    let spoof = arp_frame(
        ARP_REQUEST,
        CLIENT_MAC,
        Ipv4Addr::new(10, 137, 0, 99),
        Ipv4Addr::new(10, 137, 0, 1),
        BROADCAST,
    );
    assert_eq!(
        run(&mut fw, 0, 1, &spoof).0,
        Verdict::Drop(DropReason::Spoofed)
    );
    // Upstream asks for our uplink address.
    let up = arp_frame(ARP_REQUEST, GW_MAC, GATEWAY, UPLINK_IP, BROADCAST);
    let (v, out) = run(&mut fw, 0, UPLINK, &up);
    assert!(matches!(v, Verdict::Forward { port: UPLINK, .. }));
    assert_eq!(Arp::parse(&out).unwrap().sender_mac, UP_MAC);
}

#[test]
fn nats_an_accepted_flow_and_translates_replies_back() {
    let mut fw = ready();
    let syn = from_client(SERVER, PROTO_TCP, &tcp_seg(40000, 5201, TCP_SYN));
    let (v, out) = run(&mut fw, 10, 1, &syn);
    assert_eq!(
        v,
        Verdict::Forward {
            port: UPLINK,
            len: syn.len()
        }
    );
    let i = parsed(&out);
    assert_eq!(
        (i.src, i.dst, i.sport, i.dport, i.ttl),
        (UPLINK_IP, SERVER, 40000, 5201, 63)
    );
    assert_eq!(
        (get_mac(&out, 0), get_mac(&out, 6)),
        (Some(GW_MAC), Some(UP_MAC))
    );

    let synack = ipv4(
        UP_MAC,
        GW_MAC,
        SERVER,
        UPLINK_IP,
        50,
        PROTO_TCP,
        &tcp_seg(5201, 40000, TCP_SYN | TCP_ACK),
    );
    let (v, out) = run(&mut fw, 11, UPLINK, &synack);
    assert_eq!(
        v,
        Verdict::Forward {
            port: 1,
            len: synack.len()
        }
    );
    let i = parsed(&out);
    assert_eq!(
        (i.src, i.dst, i.sport, i.dport, i.ttl),
        (SERVER, CLIENT, 5201, 40000, 49)
    );
    assert_eq!(
        (get_mac(&out, 0), get_mac(&out, 6)),
        (Some(CLIENT_MAC), Some(DOWN_MAC))
    );
    assert_eq!(
        (fw.stats().to_upstream, fw.stats().to_clients, fw.flows()),
        (1, 1, 1)
    );

    // Mid-flow packets pass without the rules being asked again.
    let ack = from_client(SERVER, PROTO_TCP, &tcp_seg(40000, 5201, TCP_ACK));
    assert!(matches!(
        run(&mut fw, 12, 1, &ack).0,
        Verdict::Forward { port: UPLINK, .. }
    ));
    let hits: Vec<_> = fw.rule_hits().collect();
    assert_eq!(hits[0].1, Ok(&[1u64, 0, 0, 0, 0][..]));
}

#[test]
fn rejects_blocked_flows_with_admin_prohibited() {
    let mut fw = ready();
    let syn = from_client(SERVER, PROTO_TCP, &tcp_seg(40001, 22, TCP_SYN));
    let (v, out) = run(&mut fw, 10, 1, &syn);
    assert!(matches!(v, Verdict::Forward { port: 1, .. }), "{v:?}");
    let i = parsed(&out);
    assert_eq!(
        (i.proto, i.src, i.dst, i.sport, i.dport),
        (PROTO_ICMP, Ipv4Addr::new(10, 137, 0, 1), CLIENT, 3, 13)
    );
    // The quoted header is the client's original packet.
    assert_eq!(get_ip(&out, i.l4 + 8 + 12), Some(CLIENT));
    assert_eq!(get_u16(&out, i.l4 + 8 + 20 + 2), Some(22));
    assert_eq!(fw.stats().drop_count(DropReason::RuleReject), 1);
    assert_eq!(fw.flows(), 0);
    // UDP to a blocked port, and everything from a client whose rules
    // failed to parse.
    let u = from_client(SERVER, PROTO_UDP, &udp_seg(5000, 9999, b"x"));
    assert!(matches!(
        run(&mut fw, 11, 1, &u).0,
        Verdict::Forward { port: 1, .. }
    ));
    let bad = Ipv4Addr::new(10, 137, 0, 12);
    let u = ipv4(
        DOWN_MAC,
        [2; 6],
        bad,
        SERVER,
        64,
        PROTO_UDP,
        &udp_seg(5000, 5201, b"x"),
    );
    assert_eq!(
        run(&mut fw, 12, 1, &u).0,
        Verdict::Drop(DropReason::RulesInvalid)
    );
}

#[test]
fn isolation_and_anti_spoofing() {
    let mut fw = ready();
    let spoofed = ipv4(
        DOWN_MAC,
        CLIENT_MAC,
        Ipv4Addr::new(10, 137, 0, 50),
        SERVER,
        64,
        PROTO_UDP,
        &udp_seg(1, 5201, b""),
    );
    assert_eq!(
        run(&mut fw, 0, 1, &spoofed).0,
        Verdict::Drop(DropReason::Spoofed)
    );
    let c2c = from_client(OTHER, PROTO_UDP, &udp_seg(1, 5201, b""));
    assert_eq!(
        run(&mut fw, 0, 1, &c2c).0,
        Verdict::Drop(DropReason::ClientToClient)
    );
    let unsolicited = ipv4(
        UP_MAC,
        GW_MAC,
        SERVER,
        UPLINK_IP,
        64,
        PROTO_TCP,
        &tcp_seg(80, 40000, TCP_SYN),
    );
    assert_eq!(
        run(&mut fw, 0, UPLINK, &unsolicited).0,
        Verdict::Drop(DropReason::UpstreamUnsolicited)
    );
    // A client seen on port 1 cannot appear on port 2.
    let mut fw2 = Firewall::new(fw.config().clone(), alloc::vec![UP_MAC, DOWN_MAC, DOWN_MAC]);
    let ok = from_client(Ipv4Addr::new(10, 137, 0, 1), PROTO_ICMP, &echo(8, 1));
    assert!(matches!(
        run(&mut fw2, 0, 1, &ok).0,
        Verdict::Forward { port: 1, .. }
    ));
    assert_eq!(
        run(&mut fw2, 0, 2, &ok).0,
        Verdict::Drop(DropReason::Spoofed)
    );
    assert_eq!(fw.stats().drop_count(DropReason::Spoofed), 1);
    assert_eq!(fw.stats().drop_count(DropReason::ClientToClient), 1);
}

#[test]
fn redirects_dns_both_ways() {
    let mut fw = ready();
    let q = from_client(
        Ipv4Addr::new(10, 139, 1, 1),
        PROTO_UDP,
        &udp_seg(33333, 53, b"query"),
    );
    // 10.0.2.3 is on the uplink subnet: it is resolved itself, not through
    // the gateway; until then the query is dropped and an ARP request made.
    let dns = Ipv4Addr::new(10, 0, 2, 3);
    let dns_mac = [2, 0, 0, 0, 0, 3];
    assert_eq!(
        run(&mut fw, 0, 1, &q).0,
        Verdict::Drop(DropReason::ArpUnresolved)
    );
    let mut buf = [0u8; 64];
    let (_, n) = fw.poll_emit(0, &mut buf).unwrap();
    assert_eq!(Arp::parse(&buf[..n]).unwrap().target_ip, dns);
    assert_eq!(
        run(
            &mut fw,
            0,
            UPLINK,
            &arp_frame(ARP_REPLY, dns_mac, dns, UPLINK_IP, UP_MAC)
        )
        .0,
        Verdict::Consumed
    );
    let (v, out) = run(&mut fw, 0, 1, &q);
    assert!(matches!(v, Verdict::Forward { port: UPLINK, .. }), "{v:?}");
    let i = parsed(&out);
    assert_eq!((i.src, i.dst, i.dport), (UPLINK_IP, dns, 53));
    assert_eq!(get_mac(&out, 0), Some(dns_mac));
    let a = ipv4(
        UP_MAC,
        GW_MAC,
        dns,
        UPLINK_IP,
        64,
        PROTO_UDP,
        &udp_seg(53, i.sport, b"answer"),
    );
    let (v, out) = run(&mut fw, 1, UPLINK, &a);
    assert!(matches!(v, Verdict::Forward { port: 1, .. }), "{v:?}");
    let i = parsed(&out);
    assert_eq!(
        (i.src, i.sport, i.dst, i.dport),
        (Ipv4Addr::new(10, 139, 1, 1), 53, CLIENT, 33333)
    );
    assert_eq!(fw.stats().dns_redirected, 1);
}

#[test]
fn answers_pings_to_its_own_addresses_and_forwards_others() {
    let mut fw = ready();
    let p = from_client(Ipv4Addr::new(10, 137, 0, 1), PROTO_ICMP, &echo(8, 7));
    let (v, out) = run(&mut fw, 0, 1, &p);
    assert!(matches!(v, Verdict::Forward { port: 1, .. }));
    let i = parsed(&out);
    assert_eq!(
        (i.src, i.dst, i.sport),
        (Ipv4Addr::new(10, 137, 0, 1), CLIENT, 0)
    );
    let p = ipv4(
        UP_MAC,
        GW_MAC,
        GATEWAY,
        UPLINK_IP,
        64,
        PROTO_ICMP,
        &echo(8, 7),
    );
    let (v, out) = run(&mut fw, 0, UPLINK, &p);
    assert!(matches!(v, Verdict::Forward { port: UPLINK, .. }));
    assert_eq!(parsed(&out).dst, GATEWAY);
    // Through the firewall: id translated, reply translated back.
    let p = from_client(SERVER, PROTO_ICMP, &echo(8, 7));
    let (_, out) = run(&mut fw, 0, 1, &p);
    let i = parsed(&out);
    let nat_id = get_u16(&out, i.l4 + 4).unwrap();
    let r = ipv4(
        UP_MAC,
        GW_MAC,
        SERVER,
        UPLINK_IP,
        60,
        PROTO_ICMP,
        &echo(0, nat_id),
    );
    let (v, out) = run(&mut fw, 1, UPLINK, &r);
    assert!(matches!(v, Verdict::Forward { port: 1, .. }), "{v:?}");
    let i = parsed(&out);
    assert_eq!((i.dst, get_u16(&out, i.l4 + 4)), (CLIENT, Some(7)));
}

#[test]
fn ttl_expiry_makes_time_exceeded() {
    let mut fw = ready();
    let p = ipv4(
        DOWN_MAC,
        CLIENT_MAC,
        CLIENT,
        SERVER,
        1,
        PROTO_UDP,
        &udp_seg(5000, 5201, b"x"),
    );
    let (v, out) = run(&mut fw, 0, 1, &p);
    assert!(matches!(v, Verdict::Forward { port: 1, .. }));
    let i = parsed(&out);
    assert_eq!((i.proto, i.sport, i.dst), (PROTO_ICMP, 11, CLIENT));
    assert_eq!(fw.stats().drop_count(DropReason::TtlExceeded), 1);
}

#[test]
fn translates_icmp_errors_quoting_a_natted_packet() {
    let mut fw = ready();
    let p = from_client(SERVER, PROTO_UDP, &udp_seg(5000, 5201, b"data"));
    let (_, natted) = run(&mut fw, 0, 1, &p);
    // The server answers "port unreachable", quoting what it received.
    let i = parsed(&natted);
    let mut body = alloc::vec![3u8, 3, 0, 0, 0, 0, 0, 0];
    body.extend_from_slice(&natted[i.l3..i.l4 + 8]);
    let err = ipv4(UP_MAC, GW_MAC, SERVER, UPLINK_IP, 64, PROTO_ICMP, &body);
    let (v, out) = run(&mut fw, 1, UPLINK, &err);
    assert!(matches!(v, Verdict::Forward { port: 1, .. }), "{v:?}");
    let o = parsed(&out);
    assert_eq!((o.dst, o.sport, o.dport), (CLIENT, 3, 3));
    let inner = o.l4 + 8;
    assert_eq!(get_ip(&out, inner + 12), Some(CLIENT));
    assert_eq!(get_u16(&out, inner + 20), Some(5000));
    assert_eq!(
        checksum(&out[inner..inner + 20]),
        0,
        "inner header checksum fixed"
    );
}

#[test]
fn malformed_frames_are_counted_drops() {
    let mut fw = ready();
    let good = from_client(SERVER, PROTO_UDP, &udp_seg(5000, 5201, b"data"));
    let mut cases: Vec<(Vec<u8>, DropReason)> = Vec::new();
    cases.push((good[..10].to_vec(), DropReason::Runt));
    cases.push((alloc::vec![0u8; 1600], DropReason::Giant));
    let mut f = good.clone();
    f[24] ^= 0xff;
    cases.push((f, DropReason::BadIpv4Checksum));
    let mut f = good.clone();
    f[14] = 0x43;
    cases.push((f, DropReason::BadIpv4Header));
    let mut f = good.clone();
    f[17] = 200; // total length beyond the frame
    cases.push((f, DropReason::BadIpv4Length));
    let mut f = good.clone();
    f[45] ^= 1;
    cases.push((f, DropReason::BadL4Checksum));
    let mut f = good.clone();
    f[12] = 0x88;
    f[13] = 0xb5;
    cases.push((f, DropReason::UnknownEthertype));
    let mut f = good.clone();
    f[0] = 0x33;
    cases.push((f, DropReason::NotForUs));
    for (frame, reason) in cases {
        let mut buf = alloc::vec![0u8; 2048];
        let n = frame.len().min(2048);
        buf[..n].copy_from_slice(&frame[..n]);
        assert_eq!(
            fw.handle(0, 1, &mut buf, frame.len()),
            Verdict::Drop(reason)
        );
        assert_eq!(fw.stats().drop_count(reason), 1, "{reason:?}");
    }
    // Forwarding continues.
    assert!(matches!(
        run(&mut fw, 0, 1, &good).0,
        Verdict::Forward { port: UPLINK, .. }
    ));
}

#[test]
fn unresolved_next_hop_asks_arp_and_drops() {
    let mut fw = firewall();
    let p = from_client(SERVER, PROTO_UDP, &udp_seg(5000, 5201, b"x"));
    assert_eq!(
        run(&mut fw, 0, 1, &p).0,
        Verdict::Drop(DropReason::ArpUnresolved)
    );
    let mut buf = [0u8; 64];
    assert!(fw.poll_emit(0, &mut buf).is_some());
}

#[test]
fn every_truncation_of_every_frame_is_handled() {
    let mut fw = ready();
    let frames = [
        from_client(SERVER, PROTO_TCP, &tcp_seg(1, 5201, TCP_SYN)),
        ipv4(
            UP_MAC,
            GW_MAC,
            SERVER,
            UPLINK_IP,
            64,
            PROTO_ICMP,
            &[3, 3, 0, 0, 0, 0, 0, 0, 0x45, 0, 0, 28],
        ),
        arp_frame(ARP_REQUEST, CLIENT_MAC, CLIENT, GATEWAY, BROADCAST),
    ];
    for f in &frames {
        for n in 0..=f.len() {
            for port in [UPLINK, 1, 7] {
                let mut buf = alloc::vec![0u8; 128];
                buf[..n].copy_from_slice(&f[..n]);
                let _ = fw.handle(0, port, &mut buf, n);
            }
        }
    }
}

/// Splits an IPv4 frame into two fragments at `at` bytes of IP payload
/// (a multiple of 8), with identification `id`.
fn fragments(frame: &[u8], at: usize, id: u16) -> (Vec<u8>, Vec<u8>) {
    let payload = &frame[34..];
    let make = |data: &[u8], offset: usize, more: bool| {
        let mut f = frame[..34].to_vec();
        f.extend_from_slice(data);
        put_u16(&mut f, 16, (20 + data.len()) as u16);
        put_u16(&mut f, 18, id);
        put_u16(
            &mut f,
            20,
            (offset / 8) as u16 | if more { 0x2000 } else { 0 },
        );
        put_u16(&mut f, 24, 0);
        let c = checksum(&f[14..34]);
        put_u16(&mut f, 24, c);
        f
    };
    (
        make(&payload[..at], 0, true),
        make(&payload[at..], at, false),
    )
}

#[test]
fn fragments_follow_the_first_fragment() {
    let mut fw = ready();
    let body = [0x5au8; 100];
    let whole = from_client(SERVER, PROTO_UDP, &udp_seg(7000, 5201, &body));
    let (first, second) = fragments(&whole, 48, 0x1234);
    let (v1, out1) = run(&mut fw, 0, 1, &first);
    assert!(
        matches!(v1, Verdict::Forward { port: UPLINK, .. }),
        "{v1:?}"
    );
    let (v2, out2) = run(&mut fw, 0, 1, &second);
    assert!(
        matches!(v2, Verdict::Forward { port: UPLINK, .. }),
        "{v2:?}"
    );
    for f in [&out1, &out2] {
        assert_eq!(checksum(&f[14..34]), 0, "header checksum");
        assert_eq!(
            (get_ip(f, 26), get_ip(f, 30), f[22]),
            (Some(UPLINK_IP), Some(SERVER), 63)
        );
    }
    // Reassembled upstream, the UDP checksum holds for the new addresses.
    let mut seg = out1[34..].to_vec();
    seg.extend_from_slice(&out2[34..]);
    assert_eq!(
        fold(sum16(
            &seg,
            pseudo_header_sum(UPLINK_IP, SERVER, PROTO_UDP, seg.len())
        )),
        0
    );

    // The reply comes back fragmented too.
    let nat_port = get_u16(&out1, 34).unwrap();
    let reply = ipv4(
        UP_MAC,
        GW_MAC,
        SERVER,
        UPLINK_IP,
        64,
        PROTO_UDP,
        &udp_seg(5201, nat_port, &body),
    );
    let (r1, r2) = fragments(&reply, 56, 0x4321);
    let (v, o1) = run(&mut fw, 1, UPLINK, &r1);
    assert!(matches!(v, Verdict::Forward { port: 1, .. }), "{v:?}");
    let (v, o2) = run(&mut fw, 1, UPLINK, &r2);
    assert!(matches!(v, Verdict::Forward { port: 1, .. }), "{v:?}");
    assert_eq!(
        (get_ip(&o2, 30), get_mac(&o2, 0)),
        (Some(CLIENT), Some(CLIENT_MAC))
    );
    let mut seg = o1[34..].to_vec();
    seg.extend_from_slice(&o2[34..]);
    assert_eq!(
        fold(sum16(
            &seg,
            pseudo_header_sum(SERVER, CLIENT, PROTO_UDP, seg.len())
        )),
        0
    );
    assert_eq!(get_u16(&seg, 2), Some(7000));
}

#[test]
fn stray_out_of_order_and_blocked_fragments_are_dropped() {
    let mut fw = ready();
    let whole = from_client(SERVER, PROTO_UDP, &udp_seg(7001, 5201, &[1u8; 100]));
    let (first, second) = fragments(&whole, 48, 7);
    // A later fragment whose first fragment was never seen.
    assert_eq!(
        run(&mut fw, 0, 1, &second).0,
        Verdict::Drop(DropReason::Fragment)
    );
    // Out of order: the offset does not continue the datagram.
    assert!(matches!(
        run(&mut fw, 0, 1, &first).0,
        Verdict::Forward { .. }
    ));
    let mut gap = second.clone();
    put_u16(&mut gap, 20, 8); // offset 64 instead of 48
    put_u16(&mut gap, 24, 0);
    let c = checksum(&gap[14..34]);
    put_u16(&mut gap, 24, c);
    assert_eq!(
        run(&mut fw, 0, 1, &gap).0,
        Verdict::Drop(DropReason::FragmentOutOfOrder)
    );
    assert_eq!(
        run(&mut fw, 0, 1, &second).0,
        Verdict::Drop(DropReason::Fragment),
        "datagram forgotten"
    );
    // A blocked flow: the first fragment is rejected, the rest dropped.
    let blocked = from_client(SERVER, PROTO_UDP, &udp_seg(7002, 9999, &[2u8; 100]));
    let (b1, b2) = fragments(&blocked, 48, 8);
    assert!(
        matches!(run(&mut fw, 0, 1, &b1).0, Verdict::Forward { port: 1, .. }),
        "ICMP reject"
    );
    assert_eq!(
        run(&mut fw, 0, 1, &b2).0,
        Verdict::Drop(DropReason::Fragment)
    );
    // A first fragment too short to hold the UDP header.
    let (tiny, _) = fragments(&whole, 0, 9);
    assert_eq!(
        run(&mut fw, 0, 1, &tiny).0,
        Verdict::Drop(DropReason::BadL4Header)
    );
}

/// A DNS answer to `query` (a DNS message) with one A record, or NXDOMAIN.
fn dns_answer(query: &[u8], a: Option<[u8; 4]>, ttl: u32) -> Vec<u8> {
    let mut m = query.to_vec();
    match a {
        Some(addr) => {
            put_u16(&mut m, 2, 0x8180);
            put_u16(&mut m, 6, 1);
            m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
            m.extend_from_slice(&ttl.to_be_bytes());
            m.extend_from_slice(&[0, 4]);
            m.extend_from_slice(&addr);
        }
        None => {
            put_u16(&mut m, 2, 0x8183);
        }
    }
    m
}

#[test]
fn dsthost_rules_are_resolved_through_the_upstream_dns_server() {
    let db = "\
/qubes-ip 10.0.2.15
/qubes-netmask 255.255.255.0
/qubes-gateway 10.0.2.2
/qubes-primary-dns 10.0.2.3
/qubes-netvm-gateway 10.137.0.1
/connected-ips 10.137.0.10
/qubes-firewall/10.137.0.10/policy drop
/qubes-firewall/10.137.0.10/0000 action=accept proto=tcp dsthost=www.example.com dstports=443-443
/qubes-firewall/10.137.0.10/0001 action=accept dsthost=gone.example
";
    let cfg = NetConfig::from_db(&QubesDb::parse_snapshot(db).unwrap()).unwrap();
    let mut fw = Firewall::new(cfg, alloc::vec![UP_MAC, DOWN_MAC]);
    let dns = Ipv4Addr::new(10, 0, 2, 3);
    let www = Ipv4Addr::new(93, 184, 216, 34);
    let syn = |dst: Ipv4Addr, sport| from_client(dst, PROTO_TCP, &tcp_seg(sport, 443, TCP_SYN));
    // Until the names are resolved the client starts nothing, and there
    // is nothing to tell dom0 (`dns_info`).
    assert_eq!(
        run(&mut fw, 0, 1, &syn(www, 40000)).0,
        Verdict::Drop(DropReason::RulesPending)
    );
    assert!(fw.dns_info().is_empty());
    // The firewall asks ARP for the gateway and the DNS server, then
    // queries the server; the test answers each.
    let mut buf = [0u8; BUF];
    let mut queries = Vec::new();
    for now in (0..10_000).step_by(500) {
        while let Some((port, len)) = fw.poll_emit(now, &mut buf) {
            assert_eq!(port, UPLINK);
            let f = buf[..len].to_vec();
            if let Ok(req) = Arp::parse(&f) {
                let mac = [2, 0, 0, 0, 0, req.target_ip.octets()[3]];
                let reply = arp_frame(ARP_REPLY, mac, req.target_ip, UPLINK_IP, UP_MAC);
                assert_eq!(run(&mut fw, now, UPLINK, &reply).0, Verdict::Consumed);
                continue;
            }
            let i = parsed(&f);
            assert!(l4_checksum_ok(&f, &i));
            assert_eq!((i.src, i.dst, i.sport, i.dport), (UPLINK_IP, dns, 1023, 53));
            assert_eq!(
                get_mac(&f, 0),
                Some([2, 0, 0, 0, 0, 3]),
                "to the server's MAC"
            );
            queries.push((now, f[42..i.end].to_vec()));
        }
        if queries.len() == 2 {
            break;
        }
    }
    assert_eq!(queries.len(), 2, "one query per name");
    let reply = |q: &[u8], a, from| {
        ipv4(
            UP_MAC,
            [2, 0, 0, 0, 0, 3],
            from,
            UPLINK_IP,
            64,
            PROTO_UDP,
            &udp_seg(53, 1023, &dns_answer(q, a, 300)),
        )
    };
    let (now, q_www) = (queries[0].0, &queries[0].1);
    let (www_q, gone_q) = if q_www.windows(3).any(|w| w == b"www") {
        (q_www.clone(), queries[1].1.clone())
    } else {
        (queries[1].1.clone(), q_www.clone())
    };
    // A forged answer from elsewhere is not taken.
    let forged = reply(&www_q, Some([6, 6, 6, 6]), Ipv4Addr::new(10, 0, 2, 99));
    assert_eq!(
        run(&mut fw, now, UPLINK, &forged).0,
        Verdict::Drop(DropReason::UpstreamUnsolicited)
    );
    assert_eq!(
        run(
            &mut fw,
            now,
            UPLINK,
            &reply(&www_q, Some(www.octets()), dns)
        )
        .0,
        Verdict::Consumed
    );
    assert_eq!(
        run(&mut fw, now, 1, &syn(www, 40001)).0,
        Verdict::Drop(DropReason::RulesPending),
        "one name still pending"
    );
    let resolved = [IpAddr::V4(www)];
    assert_eq!(
        fw.dns_info(),
        [(IpAddr::V4(CLIENT), "www.example.com", &resolved[..])]
    );
    assert_eq!(
        run(&mut fw, now, UPLINK, &reply(&gone_q, None, dns)).0,
        Verdict::Consumed
    );
    // Now: the resolved address is allowed on 443, others rejected.
    assert!(matches!(
        run(&mut fw, now, 1, &syn(www, 40002)).0,
        Verdict::Forward { port: UPLINK, .. }
    ));
    let (v, out) = run(&mut fw, now, 1, &syn(Ipv4Addr::new(6, 6, 6, 6), 40003));
    assert!(matches!(v, Verdict::Forward { port: 1, .. }));
    assert_eq!(parsed(&out).proto, PROTO_ICMP, "rejected");
    let names: Vec<_> = fw
        .dsthosts()
        .map(|(n, _, a, r)| (n, a.to_vec(), r))
        .collect();
    assert!(names.contains(&("www.example.com", alloc::vec![IpAddr::V4(www)], true)));
    assert!(names.contains(&("gone.example", alloc::vec![], true)));
    assert_eq!(
        fw.dns_info(),
        [
            (IpAddr::V4(CLIENT), "www.example.com", &resolved[..]),
            (IpAddr::V4(CLIENT), "gone.example", &[][..])
        ]
    );
    assert_eq!(
        (fw.stats().dns_queries_sent, fw.stats().dns_answers),
        (2, 2)
    );
    // When the TTL runs out the name is asked again; the old address
    // keeps working meanwhile.
    let later = now + 300_000;
    let mut asked = false;
    while let Some((_, len)) = fw.poll_emit(later, &mut buf) {
        asked |= parse_ipv4(&buf[..len]).is_ok_and(|i| i.dport == 53);
    }
    assert!(asked, "re-resolved at TTL expiry");
    assert!(matches!(
        run(&mut fw, later, 1, &syn(www, 40004)).0,
        Verdict::Forward { port: UPLINK, .. }
    ));
}

#[test]
fn an_established_flow_from_another_port_is_spoofed() {
    // A firewall with two downlinks; the client's flow is set up on port 1.
    let cfg = NetConfig::from_db(&QubesDb::parse_snapshot(DB).unwrap()).unwrap();
    let port2_mac = [0x52, 0x54, 0, 0, 0, 3];
    let mut fw = Firewall::new(cfg, alloc::vec![UP_MAC, DOWN_MAC, port2_mac]);
    let mut buf = [0u8; 64];
    fw.poll_emit(0, &mut buf).unwrap();
    let reply = arp_frame(ARP_REPLY, GW_MAC, GATEWAY, UPLINK_IP, UP_MAC);
    assert_eq!(run(&mut fw, 0, UPLINK, &reply).0, Verdict::Consumed);
    let pkt = |dst_mac, flags| {
        ipv4(
            dst_mac,
            CLIENT_MAC,
            CLIENT,
            SERVER,
            64,
            PROTO_TCP,
            &tcp_seg(40000, 5201, flags),
        )
    };
    assert!(matches!(
        run(&mut fw, 1, 1, &pkt(DOWN_MAC, TCP_SYN)).0,
        Verdict::Forward { port: UPLINK, .. }
    ));
    // The same tuple from port 2 (a FIN that would close the flow): dropped
    // as spoofed, and the flow is untouched.
    assert_eq!(
        run(&mut fw, 2, 2, &pkt(port2_mac, TCP_FIN | TCP_ACK)).0,
        Verdict::Drop(DropReason::Spoofed)
    );
    assert!(matches!(
        run(&mut fw, 3, 1, &pkt(DOWN_MAC, TCP_ACK)).0,
        Verdict::Forward { port: UPLINK, .. }
    ));
    assert_eq!(fw.flows(), 1);
    let ack = pkt(DOWN_MAC, TCP_ACK);
    let tuple = client_tuple(&ack, &parsed(&ack)).unwrap();
    let state = fw.ct.by_client(&tuple, 4).map(|f| f.state);
    assert_eq!(
        state,
        Some(crate::conntrack::FlowState::Established),
        "the spoofed FIN did not close it"
    );
}

#[test]
fn forward_only_rewrites_ethernet_addresses_and_nothing_else() {
    let mut fw = ready();
    fw.set_forward_only(true);
    // A port no rule allows, from a client: out unchanged but for the MACs
    // (no NAT, no TTL change), to the gateway.
    let out = from_client(SERVER, PROTO_TCP, &tcp_seg(40000, 22, TCP_SYN));
    let (v, sent) = run(&mut fw, 10, 1, &out);
    assert_eq!(
        v,
        Verdict::Forward {
            port: UPLINK,
            len: out.len()
        }
    );
    assert_eq!(get_mac(&sent, 0), Some(GW_MAC));
    assert_eq!(get_mac(&sent, 6), Some(UP_MAC));
    assert_eq!(sent[12..], out[12..]);
    assert_eq!(fw.flows(), 0);
    // The reply, addressed to the client itself, goes to its port and MAC.
    let back = ipv4(
        UP_MAC,
        GW_MAC,
        SERVER,
        CLIENT,
        64,
        PROTO_TCP,
        &tcp_seg(22, 40000, TCP_SYN | TCP_ACK),
    );
    let (v, sent) = run(&mut fw, 11, UPLINK, &back);
    assert_eq!(
        v,
        Verdict::Forward {
            port: 1,
            len: back.len()
        }
    );
    assert_eq!(get_mac(&sent, 0), Some(CLIENT_MAC));
    assert_eq!(get_mac(&sent, 6), Some(DOWN_MAC));
    assert_eq!(sent[12..], back[12..]);
    // Not a client's address: neither way.
    let spoofed = ipv4(
        DOWN_MAC,
        CLIENT_MAC,
        Ipv4Addr::new(10, 137, 0, 99),
        SERVER,
        64,
        PROTO_UDP,
        &udp_seg(1, 2, b"x"),
    );
    assert_eq!(
        run(&mut fw, 12, 1, &spoofed).0,
        Verdict::Drop(DropReason::Spoofed)
    );
    let stray = ipv4(
        UP_MAC,
        GW_MAC,
        SERVER,
        Ipv4Addr::new(10, 137, 0, 99),
        64,
        PROTO_UDP,
        &udp_seg(1, 2, b"x"),
    );
    assert_eq!(
        run(&mut fw, 13, UPLINK, &stray).0,
        Verdict::Drop(DropReason::ClientUnreachable)
    );
    // Turned back on, the rules apply again: port 22 is rejected.
    fw.set_forward_only(false);
    let (v, _) = run(&mut fw, 14, 1, &out);
    assert!(matches!(v, Verdict::Forward { port: 1, .. }), "{v:?}");
    assert_eq!(fw.flows(), 0);
}

/// A UDP frame from client address `src` to the server's port 5201.
fn udp_from(src: Ipv4Addr, sport: u16) -> Vec<u8> {
    ipv4(
        DOWN_MAC,
        CLIENT_MAC,
        src,
        SERVER,
        64,
        PROTO_UDP,
        &udp_seg(sport, 5201, b"x"),
    )
}

/// UDP's checksum rules through the translation, both ways, on a flow's
/// first packet and on later ones (the fast path): a datagram sent
/// without a checksum (zero) keeps none, and one whose translated
/// checksum comes to zero carries it as all ones.
#[test]
fn udp_checksum_zero_means_none_and_a_computed_zero_is_sent_as_ones() {
    let mut fw = ready();
    let udp = |payload: &[u8], checksum: Option<u16>| {
        let mut f = from_client(SERVER, PROTO_UDP, &udp_seg(40001, 5201, payload));
        if let Some(c) = checksum {
            put_u16(&mut f, 40, c);
        }
        f
    };
    let reply = |checksum: u16| {
        let mut f = ipv4(
            UP_MAC,
            GW_MAC,
            SERVER,
            UPLINK_IP,
            50,
            PROTO_UDP,
            &udp_seg(5201, 40001, b"pong"),
        );
        put_u16(&mut f, 40, checksum);
        f
    };
    for now in [10, 11] {
        let (v, out) = run(&mut fw, now, 1, &udp(b"ping", Some(0)));
        assert!(matches!(v, Verdict::Forward { port: UPLINK, .. }));
        let i = parsed(&out);
        assert_eq!((i.src, i.sport), (UPLINK_IP, 40001));
        assert_eq!(get_u16(&out, 40), Some(0), "no checksum stays none");
        let (v, back) = run(&mut fw, now, UPLINK, &reply(0));
        assert!(matches!(v, Verdict::Forward { port: 1, .. }));
        assert_eq!(parsed(&back).dst, CLIENT);
        assert_eq!(get_u16(&back, 40), Some(0), "none on the way back");
    }
    // The translated checksum of a two-byte payload of zeros is `c0`; a
    // payload word of `c0` adds its complement to the sum, which the
    // translation then makes all ones: the checksum computes to zero.
    let (_, out) = run(&mut fw, 12, 1, &udp(&[0, 0], None));
    let c0 = get_u16(&out, 40).unwrap();
    assert_ne!(c0, 0xffff);
    let zero = udp(&c0.to_be_bytes(), None);
    assert_ne!(get_u16(&zero, 40), Some(0), "the client sent a checksum");
    for now in [13, 14] {
        let (v, out) = run(&mut fw, now, 1, &zero);
        assert!(matches!(v, Verdict::Forward { port: UPLINK, .. }));
        parsed(&out);
        assert_eq!(
            get_u16(&out, 40),
            Some(0xffff),
            "a computed zero is sent as ones"
        );
    }
    assert!(
        fw.stats().fast_path >= 3,
        "later packets took the fast path"
    );
}

#[test]
fn replaced_rules_apply_at_once_to_that_client_only() {
    let mut fw = ready();
    let udp = udp_from;
    let forwarded = |v: Verdict| matches!(v, Verdict::Forward { port: UPLINK, .. });
    // Two clients, each with a flow through.
    assert!(forwarded(run(&mut fw, 10, 1, &udp(CLIENT, 40000)).0));
    assert!(forwarded(run(&mut fw, 10, 1, &udp(OTHER, 40001)).0));
    assert_eq!(fw.flows(), 2);
    // Dom0 replaces the first client's rules with "drop everything".
    let drop_all = Ruleset::from_entries([("policy", "drop")], true);
    assert_eq!(fw.replace_rules(IpAddr::V4(CLIENT), drop_all), Some(1));
    assert_eq!(fw.flows(), 1, "only that client's flow is gone");
    // Its flow is judged again, and refused; the other client's goes on.
    let before = fw.stats().drop_count(DropReason::RuleReject);
    assert!(!forwarded(run(&mut fw, 11, 1, &udp(CLIENT, 40000)).0));
    assert_eq!(fw.stats().drop_count(DropReason::RuleReject), before + 1);
    assert!(forwarded(run(&mut fw, 11, 1, &udp(OTHER, 40001)).0));
    // Accepting again lets a new flow through; hits start from zero.
    let accept = Ruleset::from_entries([("policy", "accept")], true);
    assert_eq!(fw.replace_rules(IpAddr::V4(CLIENT), accept), Some(0));
    assert!(forwarded(run(&mut fw, 12, 1, &udp(CLIENT, 40000)).0));
    let hits: Vec<_> = fw
        .rule_hits()
        .filter(|(ip, _)| *ip == IpAddr::V4(CLIENT))
        .collect();
    assert_eq!(hits[0].1, Ok(&[1u64][..]));
    // A rule set that does not parse drops all of the client's traffic.
    let bad = Ruleset::from_entries([("policy", "maybe")], true);
    assert!(bad.is_err());
    assert_eq!(fw.replace_rules(IpAddr::V4(CLIENT), bad), Some(1));
    assert!(!forwarded(run(&mut fw, 13, 1, &udp(CLIENT, 40000)).0));
    assert!(fw.stats().drop_count(DropReason::RulesInvalid) >= 1);
    // Not a client: nothing changes.
    let any = Ruleset::from_entries([("policy", "accept")], true);
    assert_eq!(fw.replace_rules(IpAddr::V4(SERVER), any), None);
}

#[test]
fn replaced_rules_bring_their_dsthost_names_to_the_resolver() {
    let mut fw = ready();
    assert_eq!(fw.dsthosts().count(), 0);
    let named = Ruleset::from_entries(
        [
            ("policy", "drop"),
            ("0000", "action=accept dsthost=example.org"),
        ],
        true,
    );
    assert_eq!(fw.replace_rules(IpAddr::V4(CLIENT), named), Some(0));
    let names: Vec<_> = fw
        .dsthosts()
        .map(|(n, v6, _, resolved)| (n, v6, resolved))
        .collect();
    assert_eq!(names, [("example.org", false, false)]);
    // Until it resolves, the client starts nothing.
    run(&mut fw, 20, 1, &udp_from(CLIENT, 40000));
    assert_eq!(fw.stats().drop_count(DropReason::RulesPending), 1);
}

#[test]
fn assigned_ports_serve_their_clients_alone() {
    // Two netback ports: port 1 for CLIENT, port 2 for OTHER, assigned
    // before either client sent anything.
    let cfg = NetConfig::from_db(&QubesDb::parse_snapshot(DB).unwrap()).unwrap();
    let port2_mac = [0x52, 0x54, 0, 0, 0, 3];
    let mut fw = Firewall::new(cfg, alloc::vec![UP_MAC, DOWN_MAC, port2_mac]);
    let stranger = Ipv4Addr::new(10, 137, 0, 99);
    assert_eq!(
        fw.assign_port(1, &[IpAddr::V4(CLIENT), IpAddr::V4(stranger)]),
        alloc::vec![IpAddr::V4(stranger)],
        "an address that is no connected client is named"
    );
    assert!(fw.assign_port(2, &[IpAddr::V4(OTHER)]).is_empty());
    assert!(fw.assign_port(UPLINK, &[]).is_empty());
    let ping = |src, mac| {
        ipv4(
            mac,
            CLIENT_MAC,
            src,
            Ipv4Addr::new(10, 137, 0, 1),
            64,
            PROTO_ICMP,
            &echo(8, 1),
        )
    };
    // OTHER speaks first, but on CLIENT's port (spoofing CLIENT's address,
    // then its own): both dropped.
    assert_eq!(
        run(&mut fw, 0, 2, &ping(CLIENT, port2_mac)).0,
        Verdict::Drop(DropReason::Spoofed)
    );
    assert_eq!(
        run(&mut fw, 0, 1, &ping(OTHER, DOWN_MAC)).0,
        Verdict::Drop(DropReason::Spoofed)
    );
    // An ARP claim on a port that is not the client's: dropped too.
    let claim = arp_frame(
        ARP_REQUEST,
        CLIENT_MAC,
        CLIENT,
        Ipv4Addr::new(10, 137, 0, 1),
        [0xff; 6],
    );
    assert_eq!(
        run(&mut fw, 0, 2, &claim).0,
        Verdict::Drop(DropReason::Spoofed)
    );
    // Each on its own port passes.
    assert!(matches!(
        run(&mut fw, 0, 1, &ping(CLIENT, DOWN_MAC)).0,
        Verdict::Forward { port: 1, .. }
    ));
    assert!(matches!(
        run(&mut fw, 0, 2, &ping(OTHER, port2_mac)).0,
        Verdict::Forward { port: 2, .. }
    ));
    // CLIENT's vif goes away: port 1 serves nobody, and CLIENT cannot come
    // back on it (nor claim port 2).
    assert!(fw.assign_port(1, &[]).is_empty());
    assert_eq!(
        run(&mut fw, 1, 1, &ping(CLIENT, DOWN_MAC)).0,
        Verdict::Drop(DropReason::Spoofed)
    );
    assert_eq!(
        run(&mut fw, 1, 2, &ping(CLIENT, port2_mac)).0,
        Verdict::Drop(DropReason::Spoofed)
    );
    // It comes back on port 2's old place after OTHER left: it moves.
    assert!(fw.assign_port(2, &[IpAddr::V4(CLIENT)]).is_empty());
    assert_eq!(
        run(&mut fw, 2, 2, &ping(OTHER, port2_mac)).0,
        Verdict::Drop(DropReason::Spoofed)
    );
    assert!(matches!(
        run(&mut fw, 2, 2, &ping(CLIENT, port2_mac)).0,
        Verdict::Forward { port: 2, .. }
    ));
    assert_eq!(fw.stats().drop_count(DropReason::Spoofed), 6);
}

#[test]
fn clients_follow_dom0s_list_of_connected_clients() {
    // At creation only CLIENT is connected; OTHER's rules are already in
    // the database (dom0 may write them first) and its vif already has a
    // port, but it is not a client yet.
    let db = |connected: &str| {
        let text = DB.replace(
            "/connected-ips 10.137.0.10 10.137.0.11 10.137.0.12",
            &alloc::format!("/connected-ips {connected}"),
        );
        QubesDb::parse_snapshot(&text).unwrap()
    };
    let cfg = NetConfig::from_db(&db("10.137.0.10")).unwrap();
    let port2_mac = [0x52, 0x54, 0, 0, 0, 3];
    let mut fw = Firewall::new(cfg, alloc::vec![UP_MAC, DOWN_MAC, port2_mac]);
    let reply = arp_frame(ARP_REPLY, GW_MAC, GATEWAY, UPLINK_IP, UP_MAC);
    assert_eq!(run(&mut fw, 0, UPLINK, &reply).0, Verdict::Consumed);
    assert_eq!(
        fw.assign_port(2, &[IpAddr::V4(OTHER)]),
        alloc::vec![IpAddr::V4(OTHER)]
    );
    let udp = |src, sport, mac| {
        ipv4(
            mac,
            CLIENT_MAC,
            src,
            SERVER,
            64,
            PROTO_UDP,
            &udp_seg(sport, 5201, b"x"),
        )
    };
    let forwarded = |v: Verdict| matches!(v, Verdict::Forward { port: UPLINK, .. });
    assert!(forwarded(
        run(&mut fw, 1, 1, &udp(CLIENT, 40000, DOWN_MAC)).0
    ));
    assert_eq!(
        run(&mut fw, 1, 2, &udp(OTHER, 40001, port2_mac)).0,
        Verdict::Drop(DropReason::Spoofed)
    );
    let ips = |list: &[Ipv4Addr]| list.iter().map(|&a| IpAddr::V4(a)).collect::<Vec<_>>();
    assert_eq!(fw.clients(), ips(&[CLIENT]));
    // OTHER starts: dom0 adds it to the list. It is connected with its
    // rules (accept) on the port its vif has; CLIENT keeps its flow.
    let both = NetConfig::clients_from_db(&db("10.137.0.10 10.137.0.11")).unwrap();
    assert_eq!(fw.set_clients(both.clone()), (ips(&[OTHER]), ips(&[])));
    assert_eq!(fw.set_clients(both), (ips(&[]), ips(&[])), "no change");
    assert_eq!(fw.flows(), 1);
    assert!(forwarded(
        run(&mut fw, 2, 2, &udp(OTHER, 40001, port2_mac)).0
    ));
    assert_eq!(
        run(&mut fw, 2, 1, &udp(OTHER, 40002, DOWN_MAC)).0,
        Verdict::Drop(DropReason::Spoofed),
        "only on its own port"
    );
    assert_eq!(fw.clients(), ips(&[CLIENT, OTHER]));
    // CLIENT stops: its flow ends, its frames are spoofed, an answer to
    // its old flow finds nobody, and its counters leave the report.
    let only_other = NetConfig::clients_from_db(&db("10.137.0.11")).unwrap();
    assert_eq!(fw.set_clients(only_other), (ips(&[]), ips(&[CLIENT])));
    assert_eq!(fw.flows(), 1);
    assert_eq!(
        run(&mut fw, 3, 1, &udp(CLIENT, 40000, DOWN_MAC)).0,
        Verdict::Drop(DropReason::Spoofed)
    );
    let answer = ipv4(
        UP_MAC,
        GW_MAC,
        SERVER,
        UPLINK_IP,
        64,
        PROTO_UDP,
        &udp_seg(5201, 40000, b"y"),
    );
    assert!(!matches!(
        run(&mut fw, 3, UPLINK, &answer).0,
        Verdict::Forward { .. }
    ));
    let reported: Vec<IpAddr> = fw.rule_hits().map(|(ip, _)| ip).collect();
    assert_eq!(reported, ips(&[OTHER]));
    // It starts again: connected anew, with the rules the database has
    // for it (TCP/UDP 5201, DNS, ICMP), on the port it is first seen on.
    let again = NetConfig::clients_from_db(&db("10.137.0.11 10.137.0.10")).unwrap();
    assert_eq!(fw.set_clients(again), (ips(&[CLIENT]), ips(&[])));
    assert!(forwarded(
        run(&mut fw, 4, 1, &udp(CLIENT, 40003, DOWN_MAC)).0
    ));
    assert_eq!(fw.clients(), ips(&[CLIENT, OTHER]));
}

#[test]
fn follows_a_new_uplink_address_gateway_and_dns() {
    let mut fw = ready();
    let udp = |sport| from_client(SERVER, PROTO_UDP, &udp_seg(sport, 5201, b"x"));
    let answer = |to: Ipv4Addr, dport| {
        ipv4(
            UP_MAC,
            GW_MAC,
            SERVER,
            to,
            64,
            PROTO_UDP,
            &udp_seg(5201, dport, b"y"),
        )
    };
    let (v, out) = run(&mut fw, 10, 1, &udp(40000));
    assert!(matches!(v, Verdict::Forward { port: UPLINK, .. }), "{v:?}");
    let old_port = parsed(&out).sport;
    assert_eq!(parsed(&out).src, UPLINK_IP);
    // Nothing changes: nothing happens.
    let same = NetConfig::from_db(&QubesDb::parse_snapshot(DB).unwrap()).unwrap();
    assert_eq!(
        fw.set_uplink(&same),
        UplinkChange {
            address: false,
            gateway: false,
            dns: false,
            ip6: false,
            flows_ended: 0,
            flows_ended6: 0
        }
    );
    assert_eq!(fw.flows(), 1);
    // dom0 moves the uplink: another address, gateway and DNS server.
    let (new_ip, new_gw, new_dns) = (
        Ipv4Addr::new(10, 0, 2, 16),
        Ipv4Addr::new(10, 0, 2, 1),
        Ipv4Addr::new(192, 0, 2, 53),
    );
    let moved = DB
        .replace("/qubes-ip 10.0.2.15", "/qubes-ip 10.0.2.16")
        .replace("/qubes-gateway 10.0.2.2", "/qubes-gateway 10.0.2.1")
        .replace(
            "/qubes-primary-dns 10.0.2.3",
            "/qubes-primary-dns 192.0.2.53",
        );
    let moved = NetConfig::from_db(&QubesDb::parse_snapshot(&moved).unwrap()).unwrap();
    assert_eq!(
        fw.set_uplink(&moved),
        UplinkChange {
            address: true,
            gateway: true,
            dns: true,
            ip6: false,
            flows_ended: 1,
            flows_ended6: 0
        }
    );
    assert_eq!(fw.flows(), 0);
    // The old address is not ours any more; its flow's answer is refused.
    assert_eq!(
        run(&mut fw, 11, UPLINK, &answer(UPLINK_IP, old_port)).0,
        Verdict::Drop(DropReason::NotForUs)
    );
    // The new gateway is asked for, from the new address; until it
    // answers, the client's traffic waits (counted).
    assert_eq!(
        run(&mut fw, 12, 1, &udp(40001)).0,
        Verdict::Drop(DropReason::ArpUnresolved)
    );
    let mut buf = [0u8; 64];
    let (port, len) = fw.poll_emit(13, &mut buf).expect("ARP for the new gateway");
    let req = Arp::parse(&buf[..len]).unwrap();
    assert_eq!(
        (port, req.op, req.target_ip, req.sender_ip),
        (UPLINK, ARP_REQUEST, new_gw, new_ip)
    );
    let new_gw_mac = [0x02, 0, 0, 0, 0, 0x98];
    let reply = arp_frame(ARP_REPLY, new_gw_mac, new_gw, new_ip, UP_MAC);
    assert_eq!(run(&mut fw, 14, UPLINK, &reply).0, Verdict::Consumed);
    assert_eq!(fw.gateway_mac(), Some(new_gw_mac));
    // Now the client's traffic leaves from the new address to the new
    // gateway, and its answers come back.
    let (v, out) = run(&mut fw, 15, 1, &udp(40001));
    assert!(matches!(v, Verdict::Forward { port: UPLINK, .. }), "{v:?}");
    let i = parsed(&out);
    assert_eq!((i.src, &out[0..6]), (new_ip, &new_gw_mac[..]));
    let (v, back) = run(&mut fw, 16, UPLINK, &answer(new_ip, i.sport));
    assert!(matches!(v, Verdict::Forward { port: 1, .. }), "{v:?}");
    assert_eq!(parsed(&back).dst, CLIENT);
    // The client's DNS (to the virtual server) goes to the new server
    // (off the uplink's subnet: through the gateway).
    let query = from_client(
        Ipv4Addr::new(10, 139, 1, 1),
        PROTO_UDP,
        &udp_seg(
            5353,
            53,
            b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x01",
        ),
    );
    let (v, out) = run(&mut fw, 17, 1, &query);
    assert!(matches!(v, Verdict::Forward { port: UPLINK, .. }), "{v:?}");
    let i = parsed(&out);
    assert_eq!((i.src, i.dst, i.dport), (new_ip, new_dns, 53));
}

#[test]
fn a_dsthost_name_waiting_when_the_dns_servers_go_resolves_to_nothing() {
    let db = "\
/qubes-ip 10.0.2.15
/qubes-netmask 255.255.255.0
/qubes-gateway 10.0.2.2
/qubes-primary-dns 10.0.2.3
/qubes-netvm-gateway 10.137.0.1
/connected-ips 10.137.0.10
/qubes-firewall/10.137.0.10/policy drop
/qubes-firewall/10.137.0.10/0000 action=accept proto=tcp dsthost=www.example.com
/qubes-firewall/10.137.0.10/0001 action=accept proto=udp
";
    let mut fw = Firewall::new(
        NetConfig::from_db(&QubesDb::parse_snapshot(db).unwrap()).unwrap(),
        alloc::vec![UP_MAC, DOWN_MAC],
    );
    let reply = arp_frame(ARP_REPLY, GW_MAC, GATEWAY, UPLINK_IP, UP_MAC);
    assert_eq!(run(&mut fw, 0, UPLINK, &reply).0, Verdict::Consumed);
    let udp = from_client(SERVER, PROTO_UDP, &udp_seg(40000, 5201, b"x"));
    assert_eq!(
        run(&mut fw, 1, 1, &udp).0,
        Verdict::Drop(DropReason::RulesPending)
    );
    // dom0 takes the DNS servers away before the name was answered: it
    // resolves to nothing, so the rules apply (the UDP rule lets this
    // through) instead of waiting for ever.
    let no_dns = db.replace("/qubes-primary-dns 10.0.2.3\n", "");
    let cfg = NetConfig::from_db(&QubesDb::parse_snapshot(&no_dns).unwrap()).unwrap();
    assert!(fw.set_uplink(&cfg).dns);
    assert!(matches!(
        run(&mut fw, 2, 1, &udp).0,
        Verdict::Forward { port: UPLINK, .. }
    ));
    assert_eq!(
        fw.dns_info(),
        [(IpAddr::V4(CLIENT), "www.example.com", &[][..])]
    );
}

/// The xorshift generator of the equivalence tests: `rand(n)` is in
/// `0..n`.
pub(super) fn rng(mut seed: u64) -> impl FnMut(u64) -> u64 {
    move |n| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    }
}

/// The TCP flags the equivalence tests draw from.
pub(super) const FLAG_MIX: [u8; 6] = [
    TCP_SYN,
    TCP_ACK,
    TCP_ACK | 0x08,
    TCP_SYN | TCP_ACK,
    TCP_FIN | TCP_ACK,
    TCP_RST,
];

/// One step of an equivalence test: the firewall with the fast path
/// (`fw.0`) and the one without (`fw.1`) gave the same verdicts
/// (`verdicts`), wrote the same bytes (`out`) and count the same.
pub(super) fn assert_agree(
    step: usize,
    fw: (&Firewall, &Firewall),
    verdicts: (Verdict, Verdict),
    out: &[Vec<u8>; 2],
) {
    assert_eq!(verdicts.0, verdicts.1, "step {step}: verdict");
    assert_eq!(out[0], out[1], "step {step}: output");
    let mut counters = fw.0.stats().clone();
    counters.fast_path = 0;
    assert_eq!(&counters, fw.1.stats(), "step {step}: counters");
    let flows = |f: &Firewall| (f.flows(), f.ct6.len());
    assert_eq!(flows(fw.0), flows(fw.1), "step {step}: flows");
}

/// The end of an equivalence test: the fast path forwarded much of the
/// traffic both ways, but not all of it.
pub(super) fn assert_fast_path_used(fast: &Firewall, general: &Firewall) {
    assert_eq!(general.stats().fast_path, 0);
    let s = fast.stats();
    assert!(
        s.fast_path > 1000 && s.fast_path < s.to_upstream + s.to_clients,
        "the fast path forwarded {} of {} packets",
        s.fast_path,
        s.to_upstream + s.to_clients
    );
    assert!(s.to_clients > 1000, "replies forwarded: {}", s.to_clients);
}

/// Keeps `reply` among the replies an equivalence test sends again and
/// again: the first 64, then in place of the one at `slot` (below 64).
pub(super) fn keep_reply(replies: &mut Vec<Vec<u8>>, reply: Vec<u8>, slot: u64) {
    if replies.len() < 64 {
        replies.push(reply);
    } else {
        replies[slot as usize % 64] = reply;
    }
}

/// The fast path (`fast.rs`) decides exactly as the general path: the
/// same frames — flows started, answered, closed and expired, with bytes
/// flipped, TTLs run out, lengths cut, from the wrong port or MAC — go
/// through a firewall with it and one without, one at a time and in
/// batches, and every verdict, output byte and counter must agree.
#[test]
fn fast_path_agrees_with_the_general_one() {
    let port2_mac = [0x52, 0x54, 0, 0, 0, 3];
    // The gateway, the upstream DNS server and another host on the
    // uplink's subnet.
    let neighbours = [
        (GATEWAY, GW_MAC),
        (Ipv4Addr::new(10, 0, 2, 3), [2, 0, 0, 0, 0, 3]),
        (Ipv4Addr::new(10, 0, 2, 7), [2, 0, 0, 0, 0, 7]),
    ];
    let make = |fast: bool| {
        let cfg = NetConfig::from_db(&QubesDb::parse_snapshot(DB).unwrap()).unwrap();
        let mut fw = Firewall::new(cfg, alloc::vec![UP_MAC, DOWN_MAC, port2_mac]);
        fw.set_fast_path(fast);
        let mut buf = [0u8; 64];
        fw.poll_emit(0, &mut buf).unwrap();
        for (ip, mac) in neighbours {
            let reply = arp_frame(ARP_REPLY, mac, ip, UPLINK_IP, UP_MAC);
            assert_eq!(run(&mut fw, 0, UPLINK, &reply).0, Verdict::Consumed);
        }
        fw
    };
    let (mut fast, mut general) = (make(true), make(false));
    let mut rand = rng(0x9e37_79b9_7f4a_7c15);
    let clients = [CLIENT, OTHER, Ipv4Addr::new(10, 137, 0, 12)];
    let remotes = [
        SERVER,
        Ipv4Addr::new(10, 0, 2, 7),
        Ipv4Addr::new(10, 139, 1, 1),
    ];
    let flags = FLAG_MIX;
    // Replies to what went upstream (the last 64 or so), sent again and
    // again.
    let mut replies: Vec<Vec<u8>> = Vec::new();
    let mut now = 3u64;
    let (mut batches, mut reasons) = (0, alloc::collections::BTreeSet::new());
    // Time moves now and then, by 10 s, so that packets also come exactly
    // at a flow's expiry.
    for step in 0..20_000 {
        now += if rand(8) == 0 { 10_000 } else { 0 };
        let (port, mut frame) = if rand(40) == 0 {
            // The neighbours answer ARP now and then (entries live ten
            // minutes).
            let (ip, mac) = neighbours[rand(3) as usize];
            (UPLINK, arp_frame(ARP_REPLY, mac, ip, UPLINK_IP, UP_MAC))
        } else if rand(2) == 0 && !replies.is_empty() {
            let r = replies[rand(replies.len() as u64) as usize].clone();
            (UPLINK, r)
        } else {
            let src = clients[rand(3) as usize];
            let dst = remotes[rand(3) as usize];
            let (sport, dport) = (40000 + rand(4) as u16, [5201, 53, 80][rand(3) as usize]);
            let (proto, seg) = match rand(3) {
                // (Short ones too: 47 bytes, unpadded.)
                0 => (
                    PROTO_UDP,
                    udp_seg(
                        sport,
                        dport,
                        [&b"payload, 19 bytes."[..], b"short"][rand(2) as usize],
                    ),
                ),
                1 => (
                    PROTO_TCP,
                    tcp_seg(sport, dport, flags[rand(flags.len() as u64) as usize]),
                ),
                _ => (PROTO_ICMP, echo(8, sport)),
            };
            // (From step 100 on: a client is bound to the first port it
            // is seen on, and after that only spoofs from the other.)
            let (port, mac) = if step > 100 && rand(20) == 0 {
                (2, port2_mac)
            } else {
                (1, DOWN_MAC)
            };
            let src_mac = if rand(20) == 0 { GW_MAC } else { CLIENT_MAC };
            (port, ipv4(mac, src_mac, src, dst, 64, proto, &seg))
        };
        match rand(8) {
            0 => {
                let i = rand(frame.len().min(60) as u64) as usize;
                frame[i] ^= 1 << rand(8);
            }
            1 if frame.len() >= 34 => {
                // TTL 0, 1 or 2, or another source or destination
                // address, with the header checksum made right.
                match rand(3) {
                    0 => frame[22] = rand(3) as u8,
                    1 => frame[29] ^= 1,
                    _ => frame[33] ^= 1,
                }
                put_u16(&mut frame, 24, 0);
                let c = checksum(&frame[14..34]);
                put_u16(&mut frame, 24, c);
            }
            2 => frame.truncate(rand(frame.len() as u64) as usize),
            3 => frame.extend_from_slice(&[0; 6]), // Ethernet padding
            _ => {}
        }
        let len = frame.len();
        let mut out = [alloc::vec![0u8; BUF], alloc::vec![0u8; BUF]];
        for o in out.iter_mut() {
            o[..len].copy_from_slice(&frame);
        }
        let verdicts = if step % 3 == 0 {
            // In a batch of two: this frame and a copy of it.
            batches += 1;
            let mut again = out.clone();
            let mut b = fast.batch(now, port);
            let v = (b.handle(&mut out[0], len), b.handle(&mut again[0], len));
            let mut b = general.batch(now, port);
            let w = (b.handle(&mut out[1], len), b.handle(&mut again[1], len));
            assert_eq!(v.1, w.1, "step {step}: second of a batch");
            assert_eq!(again[0], again[1], "step {step}: second of a batch");
            (v.0, w.0)
        } else {
            (
                fast.handle(now, port, &mut out[0], len),
                general.handle(now, port, &mut out[1], len),
            )
        };
        assert_agree(step, (&fast, &general), verdicts, &out);
        match verdicts.0 {
            Verdict::Forward { port: UPLINK, len } if get_u16(&out[0], 12) == Some(0x0800) => {
                // (Not `parsed`: a flipped payload byte passes on an
                // established flow, and its checksum stays wrong.)
                let o = parse_ipv4(&out[0][..len]).expect("valid IPv4 out");
                let seg = match o.proto {
                    PROTO_UDP => udp_seg(o.dport, o.sport, b"an answer, 19 bytes"),
                    PROTO_TCP => tcp_seg(o.dport, o.sport, flags[rand(6) as usize]),
                    _ => continue,
                };
                let reply = ipv4(UP_MAC, GW_MAC, o.dst, o.src, 64, o.proto, &seg);
                keep_reply(&mut replies, reply, rand(64));
            }
            Verdict::Drop(r) => {
                reasons.insert(r as usize);
            }
            _ => {}
        }
    }
    assert_fast_path_used(&fast, &general);
    assert!(batches > 1000);
    assert!(reasons.len() >= 10, "drop reasons met: {reasons:?}");
}
