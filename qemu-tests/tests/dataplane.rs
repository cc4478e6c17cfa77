//! The firewall VM end to end under QEMU: frames crafted on the client and
//! upstream wires, judged by what comes out of the other side and by the
//! kernel's counters.

use std::time::{Duration, Instant};

use qemu_tests::lab::*;

const WAIT: Duration = Duration::from_secs(10);

fn client_udp(dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    udp(
        (CLIENT_MAC, DOWNLINK_MAC),
        CLIENT_IP,
        dst,
        64,
        (sport, dport),
        payload,
    )
}

/// A frame that the rules accept, sent after frames that must be dropped:
/// frames on one wire are handled in order, so when this one comes out
/// first, the earlier ones did not come out at all.
fn marker(lab: &Lab, sport: u16) {
    lab.downlink
        .send(&client_udp(SERVER_IP, sport, 5201, b"marker"));
    let f = lab.uplink.recv(WAIT).expect("the marker is forwarded");
    let ip = f.as_slice();
    let ip = Frame::parse(ip);
    assert_eq!(
        (ip.ip().dport, &ip.ip().l4[8..]),
        (5201, &b"marker"[..]),
        "something else came out first: {ip:?}"
    );
}

/// Asks for the counters (console key `s`) until core 0 reports a halt,
/// for up to 20 s: the core halts after 32 rounds without work, and on a
/// loaded host the guest can get so little time that it has not yet run
/// them when the test's last reply arrives.
fn wait_for_a_halt(lab: &mut Lab) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        lab.machine.send_keys(b"s");
        let line = lab.machine.wait_for(Duration::from_millis(500), |l| {
            l.starts_with("stats: core0 ")
        });
        let halts = line.as_deref().and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("halts="))
                .and_then(|n| n.parse::<u64>().ok())
        });
        if halts.is_some_and(|n| n > 0) {
            return;
        }
    }
}

#[test]
fn answers_arp_and_ping_on_both_sides() {
    let mut lab = Lab::start(QUBESDB);
    assert!(
        lab.ready_line
            .contains("uplink 10.0.2.15/24 gateway 10.0.2.2"),
        "{}",
        lab.ready_line
    );
    lab.downlink.send(&arp(
        1,
        CLIENT_MAC,
        CLIENT_IP,
        [0; 6],
        CLIENT_GATEWAY,
        [0xff; 6],
    ));
    let r = lab
        .downlink
        .recv_matching(WAIT, |f| f.arp.is_some())
        .expect("ARP reply to the client");
    let a = r.arp.unwrap();
    assert_eq!(
        (a.op, a.sender_mac, a.sender_ip, a.target_ip),
        (2, DOWNLINK_MAC, CLIENT_GATEWAY, CLIENT_IP)
    );
    assert_eq!(r.dst, CLIENT_MAC);

    lab.downlink.send(&ping(
        CLIENT_MAC,
        DOWNLINK_MAC,
        CLIENT_IP,
        CLIENT_GATEWAY,
        77,
        1,
    ));
    let r = lab
        .downlink
        .recv(WAIT)
        .map(|f| Frame::parse(&f))
        .expect("echo reply");
    let ip = r.ip();
    assert_eq!(
        (ip.src, ip.dst, ip.proto, ip.sport),
        (CLIENT_GATEWAY, CLIENT_IP, 1, 0)
    );
    assert!(ip.checksums_ok);

    let r = lab.gateway_asks_for_uplink().expect("ARP reply upstream");
    assert_eq!(r.arp.unwrap().sender_mac, UPLINK_MAC);
    lab.uplink
        .send(&ping(GATEWAY_MAC, UPLINK_MAC, GATEWAY_IP, UPLINK_IP, 5, 9));
    let r = lab
        .uplink
        .recv_matching(WAIT, |f| f.ipv4.is_some())
        .expect("echo reply upstream");
    assert_eq!(
        (r.ip().src, r.ip().dst, r.ip().sport),
        (UPLINK_IP, GATEWAY_IP, 0)
    );

    wait_for_a_halt(&mut lab);
    let done = lab.finish();
    assert_eq!(done.counter("firewall.echo_replies"), 2, "{}", done.console);
    assert!(done.counter("firewall.arp_replies") >= 2);
    assert!(
        done.counter("core0.halts") > 0,
        "idle=halt (the default) halts between packets: {}",
        done.console
    );
}

#[test]
fn forwards_with_idle_poll_too() {
    let lab = Lab::start_with(QUBESDB, "idle=poll");
    marker(&lab, 7);
    let done = lab.finish();
    assert_eq!(done.counter("firewall.to_upstream"), 1, "{}", done.console);
    assert_eq!(done.counter("core0.halts"), 0, "polling never halts");
    assert!(done.counter("core0.idle_rounds") > 0);
}

/// The benchmark's limit mode: frames cross with new Ethernet addresses
/// and nothing else changed, whatever the rules say; addresses that are not
/// a client's still do not cross.
#[test]
fn firewall_off_forwards_unfiltered_and_untranslated() {
    let lab = Lab::start_with(QUBESDB, "firewall=off");
    // Port 22 is not allowed by the rules; with the firewall off it crosses,
    // not NATed, TTL unchanged.
    let sent = client_udp(SERVER_IP, 40000, 22, b"unfiltered");
    lab.downlink.send(&sent);
    let out = lab.uplink.recv(WAIT).expect("forwarded upstream");
    assert_eq!(&out[..12], &[GATEWAY_MAC, UPLINK_MAC].concat()[..]);
    assert_eq!(out[12..], sent[12..]);
    let reply = udp(
        (GATEWAY_MAC, UPLINK_MAC),
        SERVER_IP,
        CLIENT_IP,
        60,
        (22, 40000),
        b"back",
    );
    lab.uplink.send(&reply);
    let back = lab.downlink.recv(WAIT).expect("delivered to the client");
    assert_eq!(&back[..12], &[CLIENT_MAC, DOWNLINK_MAC].concat()[..]);
    assert_eq!(back[12..], reply[12..]);
    // A source that is no client's is dropped; the next frame comes out
    // first.
    lab.downlink.send(&udp(
        (CLIENT_MAC, DOWNLINK_MAC),
        [10, 137, 0, 99],
        SERVER_IP,
        64,
        (1, 2),
        b"spoofed",
    ));
    lab.downlink.send(&sent);
    let out = lab.uplink.recv(WAIT).expect("forwarded upstream");
    assert_eq!(out[12..], sent[12..]);
    let done = lab.finish();
    assert_eq!(done.counter("drops.spoofed-source"), 1, "{}", done.console);
    assert_eq!(done.counter("firewall.to_upstream"), 2);
    assert_eq!(done.counter("firewall.to_clients"), 1);
    assert_eq!(done.counter("firewall.flows_created"), 0);
}

/// The traffic generator: once the gateway answered ARP, synthetic UDP
/// frames of the asked length leave the uplink for it, and the counters
/// say how many.
#[test]
fn the_generator_sends_synthetic_frames_to_the_gateway() {
    let lab = Lab::start_with(QUBESDB, "generate=100");
    for _ in 0..50 {
        let f = lab.uplink.recv(WAIT).expect("a generated frame");
        let frame = Frame::parse(&f);
        assert_eq!(f.len(), 100);
        assert_eq!((frame.dst, frame.src), (GATEWAY_MAC, UPLINK_MAC));
        let ip = frame.ip();
        assert_eq!(
            (ip.src, ip.dst, ip.proto, ip.sport, ip.dport),
            (UPLINK_IP, GATEWAY_IP, 17, 9, 9)
        );
        assert!(ip.checksums_ok, "{frame:?}");
    }
    let done = lab.finish();
    assert!(done.counter("generator.sent") >= 50, "{}", done.console);
    assert!(done.counter("nic0.tx_packets") >= 50);
}

#[test]
fn nats_allowed_traffic_and_delivers_replies() {
    let lab = Lab::start(QUBESDB);
    lab.downlink
        .send(&client_udp(SERVER_IP, 40000, 5201, b"hello"));
    let out = lab
        .uplink
        .recv(WAIT)
        .map(|f| Frame::parse(&f))
        .expect("forwarded upstream");
    let ip = out.ip();
    assert_eq!(
        (ip.src, ip.dst, ip.sport, ip.dport, ip.ttl),
        (UPLINK_IP, SERVER_IP, 40000, 5201, 63)
    );
    assert!(ip.checksums_ok, "checksums after NAT: {out:?}");
    assert_eq!((out.dst, out.src), (GATEWAY_MAC, UPLINK_MAC));
    assert_eq!(&ip.l4[8..], b"hello");

    let reply = udp(
        (GATEWAY_MAC, UPLINK_MAC),
        SERVER_IP,
        UPLINK_IP,
        60,
        (5201, ip.sport),
        b"world",
    );
    lab.uplink.send(&reply);
    let back = lab
        .downlink
        .recv(WAIT)
        .map(|f| Frame::parse(&f))
        .expect("reply delivered");
    let ip = back.ip();
    assert_eq!(
        (ip.src, ip.dst, ip.sport, ip.dport, ip.ttl),
        (SERVER_IP, CLIENT_IP, 5201, 40000, 59)
    );
    assert!(ip.checksums_ok);
    assert_eq!((back.dst, back.src), (CLIENT_MAC, DOWNLINK_MAC));

    // TCP to the allowed port: the SYN goes out translated.
    lab.downlink.send(&tcp_syn(
        CLIENT_MAC,
        DOWNLINK_MAC,
        CLIENT_IP,
        SERVER_IP,
        41000,
        5201,
    ));
    let syn = lab
        .uplink
        .recv(WAIT)
        .map(|f| Frame::parse(&f))
        .expect("SYN forwarded");
    assert_eq!(
        (syn.ip().proto, syn.ip().src, syn.ip().dport),
        (6, UPLINK_IP, 5201)
    );
    assert!(syn.ip().checksums_ok);

    let done = lab.finish();
    assert_eq!(done.counter("firewall.to_upstream"), 2, "{}", done.console);
    assert_eq!(done.counter("firewall.to_clients"), 1);
    assert_eq!(done.counter("firewall.flows_created"), 2);
    assert_eq!(done.counter("nic1.rx_packets"), 2);
    assert_eq!(
        done.counter("rules.10.137.0.10.0000"),
        1,
        "tcp rule hit once"
    );
}

#[test]
fn rejects_blocked_flows_and_drops_spoofed_and_isolated_traffic() {
    let lab = Lab::start(QUBESDB);
    // A blocked TCP port: rejected with ICMP admin-prohibited, nothing upstream.
    lab.downlink.send(&tcp_syn(
        CLIENT_MAC,
        DOWNLINK_MAC,
        CLIENT_IP,
        SERVER_IP,
        41001,
        22,
    ));
    let r = lab
        .downlink
        .recv(WAIT)
        .map(|f| Frame::parse(&f))
        .expect("ICMP reject");
    let ip = r.ip();
    assert_eq!(
        (ip.proto, ip.sport, ip.dport, ip.src, ip.dst),
        (1, 3, 13, CLIENT_GATEWAY, CLIENT_IP)
    );
    assert!(ip.checksums_ok);
    // Spoofed source, client to client, and a flow from upstream.
    lab.downlink.send(&udp(
        (CLIENT_MAC, DOWNLINK_MAC),
        [10, 137, 0, 99],
        SERVER_IP,
        64,
        (1, 5201),
        b"spoof",
    ));
    lab.downlink
        .send(&client_udp(OTHER_CLIENT_IP, 2, 5201, b"c2c"));
    lab.uplink.send(&tcp_syn(
        GATEWAY_MAC,
        UPLINK_MAC,
        SERVER_IP,
        UPLINK_IP,
        80,
        40000,
    ));
    lab.uplink.send(&udp(
        (GATEWAY_MAC, UPLINK_MAC),
        SERVER_IP,
        CLIENT_IP,
        64,
        (80, 40000),
        b"direct",
    ));
    marker(&lab, 3);
    assert!(
        lab.downlink.recv(Duration::from_millis(300)).is_none(),
        "nothing reached the client"
    );
    let done = lab.finish();
    assert_eq!(done.counter("drops.rule-reject"), 1, "{}", done.console);
    assert_eq!(done.counter("drops.spoofed-source"), 1);
    assert_eq!(done.counter("drops.client-to-client"), 1);
    assert_eq!(done.counter("drops.upstream-unsolicited"), 1);
    assert_eq!(done.counter("drops.not-for-us"), 1);
    assert_eq!(done.counter("rules.10.137.0.10.policy"), 1);
}

#[test]
fn redirects_dns_both_ways() {
    let lab = Lab::start(QUBESDB);
    lab.downlink
        .send(&client_udp(VIRTUAL_DNS, 33333, 53, b"query"));
    // The upstream DNS server is on the uplink's subnet: the kernel asks
    // for it by ARP (the first query is dropped meanwhile).
    let req = lab
        .uplink
        .recv_matching(WAIT, |f| {
            f.arp.as_ref().is_some_and(|a| a.target_ip == UPSTREAM_DNS)
        })
        .expect("ARP for the DNS server");
    assert_eq!(req.arp.unwrap().op, 1);
    lab.uplink.send(&arp(
        2,
        DNS_MAC,
        UPSTREAM_DNS,
        UPLINK_MAC,
        UPLINK_IP,
        UPLINK_MAC,
    ));
    // The ARP reply and the query travel on different sockets: the query
    // may be read first and dropped again while the address is unknown,
    // so it is sent again until it comes out (the same flow each time).
    let q = (0..10)
        .find_map(|_| {
            lab.downlink
                .send(&client_udp(VIRTUAL_DNS, 33333, 53, b"query"));
            lab.uplink
                .recv_matching(Duration::from_secs(1), |f| f.ipv4.is_some())
        })
        .expect("redirected query");
    let ip = q.ip();
    assert_eq!(
        (ip.src, ip.dst, ip.dport, q.dst),
        (UPLINK_IP, UPSTREAM_DNS, 53, DNS_MAC)
    );
    assert!(ip.checksums_ok);
    lab.uplink.send(&udp(
        (DNS_MAC, UPLINK_MAC),
        UPSTREAM_DNS,
        UPLINK_IP,
        64,
        (53, ip.sport),
        b"answer",
    ));
    let a = lab
        .downlink
        .recv(WAIT)
        .map(|f| Frame::parse(&f))
        .expect("answer delivered");
    let ip = a.ip();
    assert_eq!(
        (ip.src, ip.sport, ip.dst, ip.dport),
        (VIRTUAL_DNS, 53, CLIENT_IP, 33333)
    );
    assert!(ip.checksums_ok);
    assert_eq!(&ip.l4[8..], b"answer");
    let done = lab.finish();
    assert_eq!(
        done.counter("firewall.dns_redirected"),
        1,
        "{}",
        done.console
    );
    assert_eq!(
        done.counter("rules.10.137.0.10.0002"),
        1,
        "specialtarget=dns matched"
    );
}

#[test]
fn ttl_expiry_is_answered_with_time_exceeded() {
    let lab = Lab::start(QUBESDB);
    lab.downlink.send(&udp(
        (CLIENT_MAC, DOWNLINK_MAC),
        CLIENT_IP,
        SERVER_IP,
        1,
        (5000, 5201),
        b"x",
    ));
    let r = lab
        .downlink
        .recv(WAIT)
        .map(|f| Frame::parse(&f))
        .expect("time exceeded");
    assert_eq!((r.ip().proto, r.ip().sport, r.ip().dst), (1, 11, CLIENT_IP));
    assert!(r.ip().checksums_ok);
    let done = lab.finish();
    assert_eq!(done.counter("drops.ttl-exceeded"), 1);
}

#[test]
fn malformed_frames_are_dropped_counted_and_forwarding_goes_on() {
    let lab = Lab::start(QUBESDB);
    let good = client_udp(SERVER_IP, 6000, 5201, b"payload!");
    let mut cases: Vec<(Vec<u8>, &str)> = Vec::new();
    cases.push((good[..12].to_vec(), "runt"));
    cases.push((good[..30].to_vec(), "bad-ipv4-header"));
    let mut f = good.clone();
    f[14] = 0x43; // IHL 3
    cases.push((f, "bad-ipv4-header"));
    let mut f = good.clone();
    f[16] = 0x10; // total length beyond the frame
    cases.push((f, "bad-ipv4-length"));
    let mut f = good.clone();
    f[24] ^= 0x55; // header checksum
    cases.push((f, "bad-ipv4-checksum"));
    let mut f = good.clone();
    let last = f.len() - 1;
    f[last] ^= 0x01; // payload: UDP checksum no longer matches
    cases.push((f, "bad-l4-checksum"));
    let mut f = good.clone();
    f[12] = 0x88;
    f[13] = 0xb5;
    cases.push((f, "unknown-ethertype"));
    let mut giant = good.clone();
    giant.resize(1600, 0);
    cases.push((giant, "giant"));
    for (frame, _) in &cases {
        lab.downlink.send(frame);
    }
    marker(&lab, 7);
    let done = lab.finish();
    for (_, reason) in &cases {
        let want = cases.iter().filter(|(_, r)| r == reason).count() as u64;
        let got = done.counter(&format!("drops.{reason}"));
        // A giant frame may already be refused by the device (rx_errors).
        if *reason == "giant" {
            assert_eq!(
                got + done.counter("nic1.rx_errors"),
                want,
                "{reason}\n{}",
                done.console
            );
        } else {
            assert_eq!(got, want, "{reason}\n{}", done.console);
        }
    }
    assert_eq!(done.counter("firewall.to_upstream"), 1);
}

#[test]
fn replies_reach_the_right_client_when_nat_ports_collide() {
    let lab = Lab::start(QUBESDB);
    const OTHER_MAC: Mac = [0x02, 0, 0, 0, 0, 0x11];
    // Both clients use source port 40000 towards the same server port.
    lab.downlink
        .send(&client_udp(SERVER_IP, 40000, 5201, b"one"));
    let a = lab
        .uplink
        .recv(WAIT)
        .map(|f| Frame::parse(&f))
        .expect("first flow");
    lab.downlink.send(&udp(
        (OTHER_MAC, DOWNLINK_MAC),
        OTHER_CLIENT_IP,
        SERVER_IP,
        64,
        (40000, 5201),
        b"two",
    ));
    let b = lab
        .uplink
        .recv(WAIT)
        .map(|f| Frame::parse(&f))
        .expect("second flow");
    let (pa, pb) = (a.ip().sport, b.ip().sport);
    assert_ne!(pa, pb, "the second flow got another NAT port");
    assert_eq!((a.ip().src, b.ip().src), (UPLINK_IP, UPLINK_IP));
    // Replies, second flow first.
    for (port, mac, ip, body) in [
        (pb, OTHER_MAC, OTHER_CLIENT_IP, b"to-two"),
        (pa, CLIENT_MAC, CLIENT_IP, b"to-one"),
    ] {
        lab.uplink.send(&udp(
            (GATEWAY_MAC, UPLINK_MAC),
            SERVER_IP,
            UPLINK_IP,
            64,
            (5201, port),
            body,
        ));
        let r = lab
            .downlink
            .recv(WAIT)
            .map(|f| Frame::parse(&f))
            .expect("reply");
        assert_eq!(
            (r.dst, r.ip().dst, r.ip().dport, &r.ip().l4[8..]),
            (mac, ip, 40000, &body[..])
        );
        assert!(r.ip().checksums_ok);
    }
    let done = lab.finish();
    assert_eq!(done.counter("firewall.to_clients"), 2, "{}", done.console);
}

#[test]
fn resolves_dsthost_rules_through_the_upstream_dns_server() {
    let db = QUBESDB
        .lines()
        .filter(|l| !l.starts_with("/qubes-firewall/10.137.0.10/0"))
        .chain(["/qubes-firewall/10.137.0.10/0000 action=accept proto=tcp dsthost=www.example.com dstports=443-443"])
        .map(|l| format!("{l}\n"))
        .collect::<String>();
    let lab = Lab::start(&db);
    let www = [93, 184, 216, 34];
    let syn = |dst: [u8; 4], sport| tcp_syn(CLIENT_MAC, DOWNLINK_MAC, CLIENT_IP, dst, sport, 443);
    // Before the name is resolved the client starts nothing.
    lab.downlink.send(&syn(www, 40000));
    // The kernel asks ARP for the DNS server, then sends its query.
    let req = lab
        .uplink
        .recv_matching(WAIT, |f| {
            f.arp.as_ref().is_some_and(|a| a.target_ip == UPSTREAM_DNS)
        })
        .expect("ARP request for the DNS server");
    assert_eq!(req.arp.unwrap().op, 1);
    lab.uplink.send(&arp(
        2,
        DNS_MAC,
        UPSTREAM_DNS,
        UPLINK_MAC,
        UPLINK_IP,
        UPLINK_MAC,
    ));
    let q = lab
        .uplink
        .recv_matching(WAIT, |f| f.ipv4.as_ref().is_some_and(|ip| ip.dport == 53))
        .expect("DNS query for the dsthost name");
    let ip = q.ip();
    assert_eq!((ip.src, ip.dst, ip.sport), (UPLINK_IP, UPSTREAM_DNS, 1023));
    assert!(ip.checksums_ok);
    assert_eq!(q.dst, DNS_MAC);
    let query = &ip.l4[8..];
    assert!(
        query
            .windows(17)
            .any(|w| w == b"\x03www\x07example\x03com\x00"),
        "asks for www.example.com: {query:?}"
    );
    // The answer: one A record.
    let mut answer = query.to_vec();
    answer[2..4].copy_from_slice(&0x8180u16.to_be_bytes());
    answer[6..8].copy_from_slice(&1u16.to_be_bytes());
    answer.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 1, 0x2c, 0, 4]);
    answer.extend_from_slice(&www);
    lab.uplink.send(&udp(
        (DNS_MAC, UPLINK_MAC),
        UPSTREAM_DNS,
        UPLINK_IP,
        64,
        (53, 1023),
        &answer,
    ));
    // Now the named server's port 443 is open, and only that.
    lab.downlink.send(&syn(www, 40001));
    let out = lab
        .uplink
        .recv_matching(WAIT, |f| f.ipv4.as_ref().is_some_and(|ip| ip.proto == 6))
        .expect("SYN to the resolved address forwarded");
    assert_eq!((out.ip().dst, out.ip().dport), (www, 443));
    lab.downlink.send(&syn([93, 184, 216, 35], 40002));
    let r = lab
        .downlink
        .recv_matching(WAIT, |f| f.ipv4.is_some())
        .expect("ICMP reject for another address");
    assert_eq!((r.ip().proto, r.ip().sport, r.ip().dport), (1, 3, 13));

    let done = lab.finish();
    assert_eq!(done.counter("drops.rules-pending"), 1, "{}", done.console);
    assert_eq!(done.counter("dsthost.www.example.com.resolved"), 1);
    assert_eq!(done.counter("firewall.dns_answers"), 1);
    assert_eq!(done.counter("rules.10.137.0.10.0000"), 1);
    assert!(
        done.console
            .contains("stats: dsthost www.example.com ipv4 resolved=1 addresses=1 93.184.216.34"),
        "{}",
        done.console
    );
}
