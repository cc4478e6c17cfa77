//! IPv6 frames in, frames out.

use alloc::vec::Vec;
use core::net::Ipv4Addr;

use super::super::tests::{
    assert_agree, assert_fast_path_used, keep_reply, rng, run, tcp_seg, udp_seg, FLAG_MIX,
};
use super::*;
use crate::config::{NetConfig, QubesDb};

const UP_MAC: Mac = [0x52, 0x54, 0, 0, 0, 1];
const DOWN_MAC: Mac = [0x52, 0x54, 0, 0, 0, 2];
const GW_MAC: Mac = [0x02, 0, 0, 0, 0, 0x99];
const CLIENT_MAC: Mac = [0x02, 0, 0, 0, 0, 0x10];
const OTHER_MAC: Mac = [0x02, 0, 0, 0, 0, 0x11];
const UPLINK6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x15);
const GATEWAY6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
const CLIENT_GW6: Ipv6Addr = Ipv6Addr::new(0xfd09, 0x24ef, 0x4179, 0, 0, 0, 0xa89, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd09, 0x24ef, 0x4179, 0, 0, 0, 0xa89, 0xa);
const OTHER6: Ipv6Addr = Ipv6Addr::new(0xfd09, 0x24ef, 0x4179, 0, 0, 0, 0xa89, 0xb);
const SERVER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x80, 0, 0, 0, 0, 5);
const BLOCKED6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x99, 0, 0, 0, 0, 1);

const DB: &str = "\
/qubes-ip 10.0.2.15
/qubes-netmask 255.255.255.0
/qubes-gateway 10.0.2.2
/qubes-ip6 2001:db8:1::15
/qubes-gateway6 2001:db8:1::1
/qubes-primary-dns 10.0.2.3
/qubes-netvm-gateway 10.137.0.1
/qubes-netvm-gateway6 fd09:24ef:4179::a89:1
/qubes-netvm-primary-dns 10.139.1.1
/connected-ips 10.137.0.10
/connected-ips6 fd09:24ef:4179::a89:a fd09:24ef:4179::a89:b
/qubes-firewall/10.137.0.10/policy accept
/qubes-firewall/fd09:24ef:4179::a89:a/policy drop
/qubes-firewall/fd09:24ef:4179::a89:a/0000 action=accept proto=tcp dst6=2001:db8:80::/48 dstports=443-443
/qubes-firewall/fd09:24ef:4179::a89:a/0001 action=accept proto=icmp icmptype=128
/qubes-firewall/fd09:24ef:4179::a89:a/0002 action=accept proto=udp dst6=2001:db8:80::5
/qubes-firewall/fd09:24ef:4179::a89:a/0003 action=accept specialtarget=dns
/qubes-firewall/fd09:24ef:4179::a89:b/policy accept
";

fn config(db: &str) -> NetConfig {
    NetConfig::from_db(&QubesDb::parse_snapshot(db).unwrap()).unwrap()
}

fn firewall(db: &str) -> Firewall {
    Firewall::new(config(db), alloc::vec![UP_MAC, DOWN_MAC])
}

/// `db` without its `/qubes-gateway6` line: IPv6 off.
fn without_gateway6(db: &str) -> String {
    db.lines()
        .filter(|l| !l.starts_with("/qubes-gateway6"))
        .map(|l| alloc::format!("{l}\n"))
        .collect()
}

/// Ethernet + IPv6 + `l4`, with the upper-layer checksum filled in.
fn ipv6(macs: (Mac, Mac), src: Ipv6Addr, dst: Ipv6Addr, hop: u8, proto: u8, l4: &[u8]) -> Vec<u8> {
    let (dst_mac, src_mac) = macs;
    let len = ETH_HEADER + IPV6_HEADER + l4.len();
    let mut f = alloc::vec![0u8; len];
    put_eth(&mut f, dst_mac, src_mac, ETHERTYPE_IPV6);
    put_ipv6_header(&mut f, ETH_HEADER, l4.len(), proto, hop, src, dst);
    put_bytes(&mut f, ETH_HEADER + IPV6_HEADER, l4);
    let at = match proto {
        PROTO_TCP => 16,
        PROTO_UDP => 6,
        _ => 2,
    };
    let l4_off = ETH_HEADER + IPV6_HEADER;
    put_u16(&mut f, l4_off + at, 0);
    let c = fold(sum16(
        &f[l4_off..],
        pseudo_header_sum6(src, dst, proto, l4.len()),
    ));
    put_u16(&mut f, l4_off + at, c);
    f
}

fn echo6(icmp_type: u8, id: u16) -> Vec<u8> {
    let mut s = alloc::vec![icmp_type, 0, 0, 0, 0, 0, 0, 1];
    put_u16(&mut s, 4, id);
    s.extend_from_slice(b"ping");
    s
}

/// An output frame, checked: valid IPv6 with a valid upper-layer checksum.
fn parsed(frame: &[u8]) -> Ipv6Info {
    let i = parse_ipv6(frame).expect("valid IPv6");
    assert!(l4_checksum_ok6(frame, &i), "upper-layer checksum");
    i
}

fn nd_frame(kind: u8, macs: (Mac, Mac), src: Ipv6Addr, dst: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let mut f = alloc::vec![0u8; 86];
    let n = Neighbor {
        kind,
        target,
        lladdr: Some(macs.1),
        flags: if kind == ND_NEIGHBOR_ADVERT {
            NA_SOLICITED | NA_OVERRIDE
        } else {
            0
        },
    };
    assert_eq!(n.emit(&mut f, (macs.1, macs.0), src, dst), 86);
    f
}

/// The IPv6 gateway's neighbour advertisement, to the uplink.
fn gateway6_advert() -> Vec<u8> {
    nd_frame(
        ND_NEIGHBOR_ADVERT,
        (UP_MAC, GW_MAC),
        GATEWAY6,
        UPLINK6,
        GATEWAY6,
    )
}

/// The MAC of a second downlink (port 2).
const PORT2_MAC: Mac = [0x52, 0x54, 0, 0, 0, 3];

/// A firewall with two downlinks (ports 1 and 2) whose IPv6 gateway is
/// resolved.
fn two_downlinks() -> Firewall {
    let mut fw = Firewall::new(config(DB), alloc::vec![UP_MAC, DOWN_MAC, PORT2_MAC]);
    let mut buf = [0u8; 128];
    while fw.poll_emit(0, &mut buf).is_some() {}
    let (v, _) = run(&mut fw, 0, UPLINK, &gateway6_advert());
    assert_eq!(v, Verdict::Consumed);
    fw
}

/// A firewall whose IPv6 gateway is resolved (the IPv4 one is not needed).
fn ready() -> Firewall {
    let mut fw = firewall(DB);
    let mut buf = [0u8; 128];
    // First the ARP request for the IPv4 gateway, then the solicitation.
    let (port, len) = fw.poll_emit(0, &mut buf).unwrap();
    assert_eq!((port, get_u16(&buf, 12)), (UPLINK, Some(ETHERTYPE_ARP)));
    let _ = len;
    let (port, len) = fw.poll_emit(0, &mut buf).expect("NS for the gateway");
    assert_eq!(port, UPLINK);
    let info = parsed(&buf[..len]);
    let ns = Neighbor::parse(&buf, &info).unwrap();
    assert_eq!(
        (
            ns.kind,
            ns.target,
            ns.lladdr,
            info.src,
            info.dst,
            info.hop_limit
        ),
        (
            ND_NEIGHBOR_SOLICIT,
            GATEWAY6,
            Some(UP_MAC),
            UPLINK6,
            "ff02::1:ff00:1".parse().unwrap(),
            255
        )
    );
    assert_eq!(get_mac(&buf, 0), Some([0x33, 0x33, 0xff, 0, 0, 1]));
    assert!(
        fw.poll_emit(500, &mut buf).is_none(),
        "retries wait a second"
    );
    assert_eq!(
        run(&mut fw, 600, UPLINK, &gateway6_advert()).0,
        Verdict::Consumed
    );
    while let Some((_, len)) = fw.poll_emit(5000, &mut buf) {
        assert_eq!(
            get_u16(&buf[..len], 12),
            Some(ETHERTYPE_ARP),
            "resolved: no NS"
        );
    }
    fw
}

#[test]
fn off_unless_configured() {
    let mut fw = firewall(&without_gateway6(DB));
    let f = ipv6(
        (DOWN_MAC, CLIENT_MAC),
        CLIENT6,
        SERVER6,
        64,
        PROTO_ICMPV6,
        &echo6(ICMPV6_ECHO_REQUEST, 1),
    );
    assert_eq!(run(&mut fw, 0, 1, &f).0, Verdict::Drop(DropReason::Ipv6Off));
    let mut buf = [0u8; 128];
    fw.poll_emit(0, &mut buf).unwrap(); // ARP
    assert!(fw.poll_emit(0, &mut buf).is_none(), "no solicitations");
}

#[test]
fn neighbor_discovery_both_sides() {
    let mut fw = ready();
    // The gateway asks for our uplink address.
    let ns = nd_frame(
        ND_NEIGHBOR_SOLICIT,
        (multicast_mac(solicited_node(UPLINK6)), GW_MAC),
        GATEWAY6,
        solicited_node(UPLINK6),
        UPLINK6,
    );
    let (v, out) = run(&mut fw, 1000, UPLINK, &ns);
    assert_eq!(
        v,
        Verdict::Forward {
            port: UPLINK,
            len: 86
        }
    );
    let i = parsed(&out);
    let na = Neighbor::parse(&out, &i).unwrap();
    assert_eq!(
        (na.kind, na.target, na.lladdr, i.src, i.dst),
        (ND_NEIGHBOR_ADVERT, UPLINK6, Some(UP_MAC), UPLINK6, GATEWAY6)
    );
    assert_eq!(get_mac(&out, 0), Some(GW_MAC));
    // A client asks for its gateway, and for an address upstream.
    for target in [CLIENT_GW6, SERVER6] {
        let ns = nd_frame(
            ND_NEIGHBOR_SOLICIT,
            (multicast_mac(solicited_node(target)), CLIENT_MAC),
            CLIENT6,
            solicited_node(target),
            target,
        );
        let (v, out) = run(&mut fw, 1000, 1, &ns);
        assert_eq!(v, Verdict::Forward { port: 1, len: 86 });
        let i = parsed(&out);
        let na = Neighbor::parse(&out, &i).unwrap();
        assert_eq!(
            (na.target, na.lladdr, i.dst),
            (target, Some(DOWN_MAC), CLIENT6)
        );
        assert_eq!(na.flags, NA_ROUTER | NA_SOLICITED | NA_OVERRIDE);
    }
    // Not answered: another client's address, duplicate address detection,
    // a spoofed global source; a bad checksum is counted as such.
    let other = nd_frame(
        ND_NEIGHBOR_SOLICIT,
        (multicast_mac(solicited_node(OTHER6)), CLIENT_MAC),
        CLIENT6,
        solicited_node(OTHER6),
        OTHER6,
    );
    assert_eq!(
        run(&mut fw, 1000, 1, &other).0,
        Verdict::Drop(DropReason::NdIgnored)
    );
    let mut dad = nd_frame(
        ND_NEIGHBOR_SOLICIT,
        (multicast_mac(solicited_node(CLIENT6)), CLIENT_MAC),
        Ipv6Addr::UNSPECIFIED,
        solicited_node(CLIENT6),
        CLIENT_GW6,
    );
    assert_eq!(
        run(&mut fw, 1000, 1, &dad).0,
        Verdict::Drop(DropReason::NdIgnored)
    );
    let spoofed = nd_frame(
        ND_NEIGHBOR_SOLICIT,
        (DOWN_MAC, CLIENT_MAC),
        SERVER6,
        CLIENT_GW6,
        CLIENT_GW6,
    );
    assert_eq!(
        run(&mut fw, 1000, 1, &spoofed).0,
        Verdict::Drop(DropReason::Spoofed)
    );
    dad[ETH_HEADER + IPV6_HEADER + 2] ^= 1;
    assert_eq!(
        run(&mut fw, 1000, 1, &dad).0,
        Verdict::Drop(DropReason::BadL4Checksum)
    );
}

#[test]
fn masquerades_flows_and_translates_replies_back() {
    let mut fw = ready();
    let syn = ipv6(
        (DOWN_MAC, CLIENT_MAC),
        CLIENT6,
        SERVER6,
        64,
        PROTO_TCP,
        &tcp_seg(40000, 443, TCP_SYN),
    );
    let (v, out) = run(&mut fw, 1000, 1, &syn);
    assert_eq!(
        v,
        Verdict::Forward {
            port: UPLINK,
            len: syn.len()
        }
    );
    let i = parsed(&out);
    assert_eq!(
        (i.src, i.dst, i.sport, i.dport, i.hop_limit),
        (UPLINK6, SERVER6, 40000, 443, 63)
    );
    assert_eq!(
        (get_mac(&out, 0), get_mac(&out, 6)),
        (Some(GW_MAC), Some(UP_MAC))
    );
    let synack = ipv6(
        (UP_MAC, GW_MAC),
        SERVER6,
        UPLINK6,
        50,
        PROTO_TCP,
        &tcp_seg(443, 40000, TCP_SYN | TCP_ACK),
    );
    let (v, out) = run(&mut fw, 1001, UPLINK, &synack);
    assert_eq!(
        v,
        Verdict::Forward {
            port: 1,
            len: synack.len()
        }
    );
    let i = parsed(&out);
    assert_eq!(
        (i.src, i.dst, i.sport, i.dport, i.hop_limit),
        (SERVER6, CLIENT6, 443, 40000, 49)
    );
    assert_eq!(
        (get_mac(&out, 0), get_mac(&out, 6)),
        (Some(CLIENT_MAC), Some(DOWN_MAC))
    );

    // Ping through (rule 0001), with its identifier translated both ways.
    let ping = ipv6(
        (DOWN_MAC, CLIENT_MAC),
        CLIENT6,
        BLOCKED6,
        64,
        PROTO_ICMPV6,
        &echo6(ICMPV6_ECHO_REQUEST, 77),
    );
    let (v, out) = run(&mut fw, 1002, 1, &ping);
    assert!(matches!(v, Verdict::Forward { port: UPLINK, .. }));
    let i = parsed(&out);
    let id = get_u16(&out, i.l4 + 4).unwrap();
    assert_eq!((i.src, i.dst), (UPLINK6, BLOCKED6));
    let pong = ipv6(
        (UP_MAC, GW_MAC),
        BLOCKED6,
        UPLINK6,
        60,
        PROTO_ICMPV6,
        &echo6(ICMPV6_ECHO_REPLY, id),
    );
    let (v, out) = run(&mut fw, 1003, UPLINK, &pong);
    assert!(matches!(v, Verdict::Forward { port: 1, .. }));
    let i = parsed(&out);
    assert_eq!((i.dst, get_u16(&out, i.l4 + 4)), (CLIENT6, Some(77)));

    // Unsolicited from upstream: dropped.
    let probe = ipv6(
        (UP_MAC, GW_MAC),
        SERVER6,
        UPLINK6,
        50,
        PROTO_TCP,
        &tcp_seg(443, 40001, TCP_SYN),
    );
    assert_eq!(
        run(&mut fw, 1004, UPLINK, &probe).0,
        Verdict::Drop(DropReason::UpstreamUnsolicited)
    );
    let hits: Vec<_> = fw
        .rule_hits()
        .filter(|(ip, _)| *ip == IpAddr::V6(CLIENT6))
        .collect();
    assert_eq!(hits[0].1, Ok(&[1u64, 1, 0, 0, 0][..]));
    assert_eq!(fw.flows(), 2);
}

#[test]
fn rules_reject_with_icmpv6_admin_prohibited() {
    let mut fw = ready();
    // TCP to a port the rules do not open.
    let syn = ipv6(
        (DOWN_MAC, CLIENT_MAC),
        CLIENT6,
        SERVER6,
        64,
        PROTO_TCP,
        &tcp_seg(40000, 80, TCP_SYN),
    );
    let (v, out) = run(&mut fw, 1000, 1, &syn);
    assert!(matches!(v, Verdict::Forward { port: 1, .. }));
    let i = parsed(&out);
    assert_eq!((i.src, i.dst, i.proto), (CLIENT_GW6, CLIENT6, PROTO_ICMPV6));
    assert_eq!((i.sport, i.dport), (u16::from(ICMPV6_DEST_UNREACH), 1));
    // The quote is the packet as the client sent it.
    assert_eq!(&out[i.l4 + 8..], &syn[ETH_HEADER..]);
    assert_eq!(fw.stats().drop_count(DropReason::RuleReject), 1);
    // UDP to the one address rule 0002 opens passes; a DNS rule opens
    // nothing over IPv6.
    let ok = ipv6(
        (DOWN_MAC, CLIENT_MAC),
        CLIENT6,
        SERVER6,
        64,
        PROTO_UDP,
        &udp_seg(5000, 53, b"q"),
    );
    assert!(matches!(
        run(&mut fw, 1001, 1, &ok).0,
        Verdict::Forward { port: UPLINK, .. }
    ));
    let other = ipv6(
        (DOWN_MAC, CLIENT_MAC),
        CLIENT6,
        BLOCKED6,
        64,
        PROTO_UDP,
        &udp_seg(5000, 53, b"q"),
    );
    assert!(matches!(
        run(&mut fw, 1002, 1, &other).0,
        Verdict::Forward { port: 1, .. }
    ));
    let hits: Vec<_> = fw
        .rule_hits()
        .filter(|(ip, _)| *ip == IpAddr::V6(CLIENT6))
        .collect();
    assert_eq!(hits[0].1, Ok(&[0u64, 0, 1, 0, 2][..]));
    // The other client's policy is accept.
    let f = ipv6(
        (DOWN_MAC, OTHER_MAC),
        OTHER6,
        BLOCKED6,
        64,
        PROTO_TCP,
        &tcp_seg(40000, 80, TCP_SYN),
    );
    assert!(matches!(
        run(&mut fw, 1003, 1, &f).0,
        Verdict::Forward { port: UPLINK, .. }
    ));
}

#[test]
fn isolation_anti_spoofing_scope_and_limits() {
    let mut fw = ready();
    let tcp = |src, dst, hop| {
        ipv6(
            (DOWN_MAC, CLIENT_MAC),
            src,
            dst,
            hop,
            PROTO_TCP,
            &tcp_seg(40000, 443, TCP_SYN),
        )
    };
    let cases = [
        (tcp(SERVER6, SERVER6, 64), DropReason::Spoofed),
        (tcp(CLIENT6, OTHER6, 64), DropReason::ClientToClient),
        (
            tcp("fe80::1".parse().unwrap(), SERVER6, 64),
            DropReason::Ipv6Scope,
        ),
        (
            tcp(CLIENT6, "fe80::1".parse().unwrap(), 64),
            DropReason::Ipv6Scope,
        ),
        (
            tcp(CLIENT6, "ff0e::1".parse().unwrap(), 64),
            DropReason::NotForUs,
        ),
        (tcp(CLIENT6, CLIENT_GW6, 64), DropReason::ToFirewall),
        (
            ipv6(
                (DOWN_MAC, CLIENT_MAC),
                CLIENT6,
                SERVER6,
                64,
                PROTO_ICMPV6,
                &[ND_ROUTER_ADVERT, 0, 0, 0, 0, 0, 0, 0],
            ),
            DropReason::IcmpUnsupported,
        ),
    ];
    for (f, reason) in cases {
        assert_eq!(
            run(&mut fw, 1000, 1, &f).0,
            Verdict::Drop(reason),
            "{reason:?}"
        );
    }
    // The same client address from another port: spoofed.
    let port2_mac = [2, 0, 0, 0, 0, 3];
    let mut fw2 = Firewall::new(fw.cfg.clone(), alloc::vec![UP_MAC, DOWN_MAC, port2_mac]);
    let _ = run(&mut fw2, 0, 1, &tcp(CLIENT6, SERVER6, 64));
    let mut f = tcp(CLIENT6, SERVER6, 64);
    put_bytes(&mut f, 0, &port2_mac);
    assert_eq!(
        run(&mut fw2, 0, 2, &f).0,
        Verdict::Drop(DropReason::Spoofed)
    );
    // Hop limit 1: time exceeded from the client gateway.
    let (v, out) = run(&mut fw, 1000, 1, &tcp(CLIENT6, SERVER6, 1));
    assert!(matches!(v, Verdict::Forward { port: 1, .. }));
    let i = parsed(&out);
    assert_eq!(
        (i.src, i.sport),
        (CLIENT_GW6, u16::from(ICMPV6_TIME_EXCEEDED))
    );
    // Pings of the firewall's own addresses are answered.
    for own in [CLIENT_GW6, UPLINK6] {
        let ping = ipv6(
            (DOWN_MAC, CLIENT_MAC),
            CLIENT6,
            own,
            64,
            PROTO_ICMPV6,
            &echo6(ICMPV6_ECHO_REQUEST, 5),
        );
        let (v, out) = run(&mut fw, 1000, 1, &ping);
        assert!(matches!(v, Verdict::Forward { port: 1, .. }));
        let i = parsed(&out);
        assert_eq!(
            (i.src, i.dst, i.sport),
            (own, CLIENT6, u16::from(ICMPV6_ECHO_REPLY))
        );
    }
    // An IPv4 client address gives no right to IPv6 traffic.
    assert!(fw.client_index.contains_key(&Ipv4Addr::new(10, 137, 0, 10)));
}

/// A tracked flow's packets are checked against the client the flow
/// records (as for IPv4): the same tuple from another port is spoofed and
/// leaves the flow as it was.
#[test]
fn an_established_ipv6_flow_from_another_port_is_spoofed() {
    let mut fw = two_downlinks();
    let pkt = |dst_mac, flags| {
        ipv6(
            (dst_mac, CLIENT_MAC),
            CLIENT6,
            SERVER6,
            64,
            PROTO_TCP,
            &tcp_seg(40000, 443, flags),
        )
    };
    assert!(matches!(
        run(&mut fw, 2, 1, &pkt(DOWN_MAC, TCP_SYN)).0,
        Verdict::Forward { port: UPLINK, .. }
    ));
    assert_eq!(
        run(&mut fw, 3, 2, &pkt(PORT2_MAC, TCP_FIN | TCP_ACK)).0,
        Verdict::Drop(DropReason::Spoofed)
    );
    let ack = pkt(DOWN_MAC, TCP_ACK);
    assert!(matches!(
        run(&mut fw, 4, 1, &ack).0,
        Verdict::Forward { port: UPLINK, .. }
    ));
    let tuple = Tuple {
        proto: PROTO_TCP,
        src: CLIENT6,
        sport: 40000,
        dst: SERVER6,
        dport: 443,
    };
    // (The client's ACK made it established; the FIN would have made it
    // closing.)
    let state = fw.ct6.by_client(&tuple, 5).map(|f| f.state);
    assert_eq!(
        state,
        Some(crate::conntrack::FlowState::Established),
        "the spoofed FIN did not close it"
    );
    assert_eq!(fw.stats().flows_created, 1);
}

#[test]
fn translates_icmpv6_errors_quoting_a_masqueraded_packet() {
    let mut fw = ready();
    let out_pkt = ipv6(
        (DOWN_MAC, CLIENT_MAC),
        CLIENT6,
        SERVER6,
        64,
        PROTO_UDP,
        &udp_seg(5000, 53, &[7; 100]),
    );
    let (_, natted) = run(&mut fw, 1000, 1, &out_pkt);
    // Packet too big from a router on the way, quoting the whole packet.
    let mut body = alloc::vec![ICMPV6_PACKET_TOO_BIG, 0, 0, 0, 0, 0, 5, 0];
    body.extend_from_slice(&natted[ETH_HEADER..]);
    let router: Ipv6Addr = "2001:db8:2::1".parse().unwrap();
    let err = ipv6((UP_MAC, GW_MAC), router, UPLINK6, 60, PROTO_ICMPV6, &body);
    let (v, out) = run(&mut fw, 1001, UPLINK, &err);
    assert!(matches!(v, Verdict::Forward { port: 1, .. }));
    let i = parsed(&out);
    assert_eq!((i.src, i.dst, i.hop_limit), (router, CLIENT6, 59));
    // The quoted packet is again the client's own, checksum and all, as
    // it left (one hop less).
    let mut sent = out_pkt[ETH_HEADER..].to_vec();
    sent[7] -= 1;
    assert_eq!(&out[i.l4 + 8..], &sent[..]);
    // An error quoting something we never sent: dropped.
    let mut stray = body.clone();
    stray[8 + 8 + 15] ^= 0x40; // inner source no longer ours
    let err = ipv6((UP_MAC, GW_MAC), router, UPLINK6, 60, PROTO_ICMPV6, &stray);
    assert_eq!(
        run(&mut fw, 1002, UPLINK, &err).0,
        Verdict::Drop(DropReason::UpstreamUnsolicited)
    );
}

#[test]
fn every_truncation_and_corruption_is_handled() {
    let mut fw = ready();
    let frames = [
        ipv6(
            (DOWN_MAC, CLIENT_MAC),
            CLIENT6,
            SERVER6,
            64,
            PROTO_TCP,
            &tcp_seg(40000, 443, TCP_SYN),
        ),
        nd_frame(
            ND_NEIGHBOR_SOLICIT,
            (DOWN_MAC, CLIENT_MAC),
            CLIENT6,
            CLIENT_GW6,
            CLIENT_GW6,
        ),
        ipv6(
            (UP_MAC, GW_MAC),
            SERVER6,
            UPLINK6,
            64,
            PROTO_ICMPV6,
            &[ICMPV6_DEST_UNREACH, 0, 0, 0, 0, 0, 0, 0, 0x60, 0, 0, 0],
        ),
    ];
    for f in &frames {
        for port in [UPLINK, 1] {
            for n in 0..f.len() {
                let _ = run(&mut fw, 2000, port, &f[..n]);
            }
            for byte in 0..f.len() {
                let mut g = f.clone();
                g[byte] ^= 0xa5;
                let _ = run(&mut fw, 2000, port, &g);
            }
        }
    }
}

/// A fragment: IPv6 + Fragment header (of datagram `id`, next header UDP)
/// + `data`, the piece of the datagram at `offset`.
fn frag6(
    macs: (Mac, Mac),
    src: Ipv6Addr,
    dst: Ipv6Addr,
    id: u32,
    offset: u16,
    more: bool,
    data: &[u8],
) -> Vec<u8> {
    let mut f = alloc::vec![0u8; ETH_HEADER + IPV6_HEADER + 8];
    put_eth(&mut f, macs.0, macs.1, ETHERTYPE_IPV6);
    put_ipv6_header(
        &mut f,
        ETH_HEADER,
        8 + data.len(),
        NEXT_FRAGMENT,
        64,
        src,
        dst,
    );
    let h = ETH_HEADER + IPV6_HEADER;
    put_u8(&mut f, h, PROTO_UDP);
    put_u16(&mut f, h + 2, offset | u16::from(more));
    put_bytes(&mut f, h + 4, &id.to_be_bytes());
    f.extend_from_slice(data);
    f
}

/// The data after the Fragment header of an output frame.
fn frag_data(f: &[u8]) -> &[u8] {
    &f[ETH_HEADER + IPV6_HEADER + 8..]
}

#[test]
fn fragments_follow_their_first_fragment_both_ways() {
    let mut fw = ready();
    // A UDP datagram of 108 bytes in two pieces (56 + 52).
    let mut dgram = udp_seg(5000, 53, &[9; 100]);
    let c = fold(sum16(
        &dgram,
        pseudo_header_sum6(CLIENT6, SERVER6, PROTO_UDP, dgram.len()),
    ));
    put_u16(&mut dgram, 6, c);
    let out = (DOWN_MAC, CLIENT_MAC);
    let first = frag6(out, CLIENT6, SERVER6, 9, 0, true, &dgram[..56]);
    let second = frag6(out, CLIENT6, SERVER6, 9, 56, false, &dgram[56..]);
    let (v, o1) = run(&mut fw, 1000, 1, &first);
    assert!(matches!(v, Verdict::Forward { port: UPLINK, .. }), "{v:?}");
    let (v, o2) = run(&mut fw, 1001, 1, &second);
    assert!(matches!(v, Verdict::Forward { port: UPLINK, .. }), "{v:?}");
    for o in [&o1, &o2] {
        let i = parse_ipv6(o).unwrap();
        assert_eq!((i.src, i.dst, i.hop_limit), (UPLINK6, SERVER6, 63));
        assert_eq!(get_mac(o, 0), Some(GW_MAC));
    }
    // Reassembled, the datagram's checksum is right for its new source.
    let sent: Vec<u8> = [frag_data(&o1), frag_data(&o2)].concat();
    assert_eq!(
        fold(sum16(
            &sent,
            pseudo_header_sum6(UPLINK6, SERVER6, PROTO_UDP, sent.len())
        )),
        0
    );
    let nat_port = u16::from_be_bytes([sent[0], sent[1]]);
    // A piece of a datagram never started, or a repeat: dropped.
    let stray = frag6(out, CLIENT6, SERVER6, 10, 56, false, &dgram[56..]);
    assert_eq!(
        run(&mut fw, 1002, 1, &stray).0,
        Verdict::Drop(DropReason::Fragment)
    );
    assert_eq!(
        run(&mut fw, 1002, 1, &second).0,
        Verdict::Drop(DropReason::Fragment)
    );

    // The answer, in pieces too, goes back to the client translated.
    let mut back = udp_seg(53, nat_port, &[7; 100]);
    let c = fold(sum16(
        &back,
        pseudo_header_sum6(SERVER6, UPLINK6, PROTO_UDP, back.len()),
    ));
    put_u16(&mut back, 6, c);
    let up = (UP_MAC, GW_MAC);
    let (v, r1) = run(
        &mut fw,
        1003,
        UPLINK,
        &frag6(up, SERVER6, UPLINK6, 77, 0, true, &back[..56]),
    );
    assert!(matches!(v, Verdict::Forward { port: 1, .. }), "{v:?}");
    let (v, r2) = run(
        &mut fw,
        1004,
        UPLINK,
        &frag6(up, SERVER6, UPLINK6, 77, 56, false, &back[56..]),
    );
    assert!(matches!(v, Verdict::Forward { port: 1, .. }), "{v:?}");
    let got: Vec<u8> = [frag_data(&r1), frag_data(&r2)].concat();
    assert_eq!(parse_ipv6(&r2).unwrap().dst, CLIENT6);
    assert_eq!(
        fold(sum16(
            &got,
            pseudo_header_sum6(SERVER6, CLIENT6, PROTO_UDP, got.len())
        )),
        0
    );
    assert_eq!(
        u16::from_be_bytes([got[2], got[3]]),
        5000,
        "the client's own port"
    );
}

/// dom0 turns IPv6 on, moves the uplink's IPv6 address and gateway, and
/// turns it off again (`/qubes-ip6`, `/qubes-gateway6` change when the
/// qube's netvm changes): each is followed without a restart, by traffic.
#[test]
fn follows_ipv6_turned_on_moved_and_off() {
    let mut fw = firewall(&without_gateway6(DB));
    let mut buf = [0u8; 128];
    fw.poll_emit(0, &mut buf).unwrap(); // ARP for the IPv4 gateway
    let ping = |id| {
        ipv6(
            (DOWN_MAC, CLIENT_MAC),
            CLIENT6,
            SERVER6,
            64,
            PROTO_ICMPV6,
            &echo6(ICMPV6_ECHO_REQUEST, id),
        )
    };
    assert_eq!(
        run(&mut fw, 0, 1, &ping(1)).0,
        Verdict::Drop(DropReason::Ipv6Off)
    );

    // On: the gateway is solicited from our address, then pings leave.
    let change = fw.set_uplink(&config(DB));
    assert!(change.ip6 && !change.address && !change.gateway && !change.dns);
    let solicit = |fw: &mut Firewall, now| {
        let mut buf = [0u8; 128];
        let (port, len) = fw.poll_emit(now, &mut buf).expect("a solicitation");
        let info = parsed(&buf[..len]);
        let ns = Neighbor::parse(&buf, &info).unwrap();
        (port, ns.kind, ns.target, info.src)
    };
    assert_eq!(
        solicit(&mut fw, 10),
        (UPLINK, ND_NEIGHBOR_SOLICIT, GATEWAY6, UPLINK6)
    );
    let na = |gw| nd_frame(ND_NEIGHBOR_ADVERT, (UP_MAC, GW_MAC), gw, UPLINK6, gw);
    assert_eq!(run(&mut fw, 20, UPLINK, &na(GATEWAY6)).0, Verdict::Consumed);
    let (v, out) = run(&mut fw, 30, 1, &ping(2));
    assert!(matches!(v, Verdict::Forward { port: UPLINK, .. }), "{v:?}");
    assert_eq!(parsed(&out).src, UPLINK6);
    let reply_to = |dst, id| {
        ipv6(
            (UP_MAC, GW_MAC),
            SERVER6,
            dst,
            50,
            PROTO_ICMPV6,
            &echo6(ICMPV6_ECHO_REPLY, id),
        )
    };
    let id = get_u16(&out, parsed(&out).l4 + 4).unwrap();
    assert!(matches!(
        run(&mut fw, 31, UPLINK, &reply_to(UPLINK6, id)).0,
        Verdict::Forward { port: 1, .. }
    ));

    // A new uplink address: the flow ends, new ones leave from it.
    let moved: Ipv6Addr = "2001:db8:1::16".parse().unwrap();
    let change = fw.set_uplink(&config(
        &DB.replace("/qubes-ip6 2001:db8:1::15", "/qubes-ip6 2001:db8:1::16"),
    ));
    assert!(change.ip6);
    assert_eq!(change.flows_ended6, 1);
    assert!(
        !matches!(
            run(&mut fw, 40, UPLINK, &reply_to(UPLINK6, id)).0,
            Verdict::Forward { .. }
        ),
        "the old address's flow is gone"
    );
    let (v, out) = run(&mut fw, 41, 1, &ping(3));
    assert!(matches!(v, Verdict::Forward { port: UPLINK, .. }), "{v:?}");
    assert_eq!(parsed(&out).src, moved, "the gateway stays known");

    // A new gateway is solicited; traffic waits for it.
    let gw2: Ipv6Addr = "2001:db8:1::2".parse().unwrap();
    let db2 = DB
        .replace("/qubes-ip6 2001:db8:1::15", "/qubes-ip6 2001:db8:1::16")
        .replace(
            "/qubes-gateway6 2001:db8:1::1",
            "/qubes-gateway6 2001:db8:1::2",
        );
    let change = fw.set_uplink(&config(&db2));
    assert!(change.ip6 && change.flows_ended6 == 0);
    assert_eq!(
        solicit(&mut fw, 50),
        (UPLINK, ND_NEIGHBOR_SOLICIT, gw2, moved)
    );
    assert!(!matches!(
        run(&mut fw, 51, 1, &ping(4)).0,
        Verdict::Forward { .. }
    ));
    let na2 = nd_frame(ND_NEIGHBOR_ADVERT, (UP_MAC, GW_MAC), gw2, moved, gw2);
    assert_eq!(run(&mut fw, 52, UPLINK, &na2).0, Verdict::Consumed);
    assert!(matches!(
        run(&mut fw, 53, 1, &ping(5)).0,
        Verdict::Forward { port: UPLINK, .. }
    ));

    // Off: the flows end, client frames are dropped again, no more
    // solicitations.
    let change = fw.set_uplink(&config(&without_gateway6(&db2)));
    assert!(change.ip6);
    assert_eq!(
        change.flows_ended6, 3,
        "pings 3, 4 (tracked, then held for the gateway) and 5"
    );
    assert_eq!(
        run(&mut fw, 60, 1, &ping(6)).0,
        Verdict::Drop(DropReason::Ipv6Off)
    );
    while let Some((_, len)) = fw.poll_emit(5000, &mut buf) {
        assert_eq!(get_u16(&buf[..len], 12), Some(ETHERTYPE_ARP), "no NS");
    }
}

/// The fast path decides IPv6 exactly as the general path (as the IPv4
/// test `fast_path_agrees_with_the_general_one` does for IPv4): the same
/// frames through a firewall with it and one without, every verdict,
/// output byte and counter compared.
#[test]
fn fast_path_agrees_with_the_general_one_for_ipv6() {
    let na = gateway6_advert();
    let (mut fast, mut general) = (two_downlinks(), two_downlinks());
    general.set_fast_path(false);
    let mut rand = rng(0x2545_f491_4f6c_dd1d);
    let clients = [CLIENT6, OTHER6, SERVER6];
    let remotes = [SERVER6, BLOCKED6, "2001:db8:80::9".parse().unwrap()];
    let flags = FLAG_MIX;
    let mut replies: Vec<Vec<u8>> = Vec::new();
    let mut tail = None;
    let mut now = 3u64;
    for step in 0..20_000 {
        now += if rand(8) == 0 { 10_000 } else { 0 };
        let (port, mut frame) = if let Some(last) = tail.take() {
            last
        } else if rand(100) == 0 {
            (UPLINK, na.clone())
        } else if rand(2) == 0 && !replies.is_empty() {
            (UPLINK, replies[rand(replies.len() as u64) as usize].clone())
        } else {
            let (src, dst) = (clients[rand(3) as usize], remotes[rand(3) as usize]);
            let (sport, dport) = (40000 + rand(4) as u16, [443, 53, 80][rand(3) as usize]);
            let (proto, seg) = match rand(3) {
                0 => (
                    PROTO_UDP,
                    udp_seg(sport, dport, [&b"payload"[..], b""][rand(2) as usize]),
                ),
                1 => (
                    PROTO_TCP,
                    tcp_seg(sport, dport, flags[rand(flags.len() as u64) as usize]),
                ),
                _ => (PROTO_ICMPV6, echo6(ICMPV6_ECHO_REQUEST, sport)),
            };
            let (port, mac) = if step > 100 && rand(20) == 0 {
                (2, PORT2_MAC)
            } else {
                (1, DOWN_MAC)
            };
            let src_mac = if rand(20) == 0 { OTHER_MAC } else { CLIENT_MAC };
            if rand(8) == 0 && proto == PROTO_UDP {
                // UDP in two pieces: the first (the ports, more to come)
                // now, the last one next.
                let id = step as u32;
                let last = frag6((mac, src_mac), src, dst, id, 16, false, b"the end");
                tail = Some((port, last));
                (port, frag6((mac, src_mac), src, dst, id, 0, true, &seg))
            } else {
                (port, ipv6((mac, src_mac), src, dst, 64, proto, &seg))
            }
        };
        match rand(8) {
            0 => {
                let i = rand(frame.len().min(80) as u64) as usize;
                frame[i] ^= 1 << rand(8);
            }
            // The hop limit (0, 1 or 2), or the last byte of the source or
            // destination address (no header checksum to mend).
            1 if frame.len() >= 54 => match rand(3) {
                0 => frame[21] = rand(3) as u8,
                1 => frame[37] ^= 1,
                _ => frame[53] ^= 1,
            },
            2 => frame.truncate(rand(frame.len() as u64) as usize),
            3 => frame.extend_from_slice(&[0; 6]),
            _ => {}
        }
        let len = frame.len();
        let mut out = [alloc::vec![0u8; 2048], alloc::vec![0u8; 2048]];
        for o in out.iter_mut() {
            o[..len].copy_from_slice(&frame);
        }
        let verdicts = (
            fast.batch(now, port).handle(&mut out[0], len),
            general.handle(now, port, &mut out[1], len),
        );
        assert_agree(step, (&fast, &general), verdicts, &out);
        if let Verdict::Forward { port: UPLINK, len } = verdicts.0 {
            let Ok(o) = parse_ipv6(&out[0][..len]) else {
                continue;
            };
            let seg = match o.proto {
                PROTO_UDP => udp_seg(o.dport, o.sport, b"an answer"),
                PROTO_TCP => tcp_seg(o.dport, o.sport, flags[rand(6) as usize]),
                _ => continue,
            };
            let reply = ipv6((UP_MAC, GW_MAC), o.dst, o.src, 64, o.proto, &seg);
            keep_reply(&mut replies, reply, rand(64));
        }
    }
    assert_fast_path_used(&fast, &general);
}
