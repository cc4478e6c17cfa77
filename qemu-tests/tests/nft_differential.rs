//! Differential test of the rule semantics against Linux nftables, the way
//! the Qubes firewall agent (`qubesagent/firewall.py`, `prepare_rules`)
//! turns QubesDB rules into nftables rules. Needs root.
//!
//! For each rule set, a Linux router namespace between a client and a
//! server namespace is loaded with the agent's nftables rules, and every
//! probe (TCP SYN, UDP datagram, ICMP echo to several addresses and ports)
//! is sent from the client; the server's input counter says whether Linux
//! forwarded it. The same probe, as a frame, goes through Portcullis's
//! `Firewall` (the code the kernel runs); forwarded upstream means accept.
//! Every disagreement is listed; the test fails on any.
//!
//! Both families: IPv4 rule sets for the client's IPv4 address, then IPv6
//! rule sets for its IPv6 address (the agent's `ip6` table: `ip6 nexthdr`,
//! `icmpv6 type`, DNS rules skipped as there is no IPv6 DNS server).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::{Command, Stdio};

use netstack::config::{NetConfig, QubesDb};
use netstack::firewall::{Firewall, Verdict, UPLINK};
use netstack::ipv6::*;
use netstack::wire::*;
use qemu_tests::netns::is_root;

const CLIENT: &str = "10.137.0.10";
const CLIENT6: &str = "fd09::a";
const DNS: [&str; 2] = ["10.139.1.1", "10.139.1.2"];
const DESTINATIONS: [&str; 5] = [
    "192.0.2.80",
    "192.0.2.200",
    "198.51.100.7",
    "10.139.1.1",
    "203.0.113.5",
];
const DESTINATIONS6: [&str; 4] = [
    "2001:db8:80::5",
    "2001:db8:80::200",
    "2001:db8:99::7",
    "2001:db8:c8::5",
];
const PORTS: [u16; 6] = [22, 53, 80, 443, 1000, 5201];

/// Rule sets as dom0 writes them: (`policy`, [rule values in order]).
const RULESETS: &[(&str, &[&str])] = &[
    (
        "drop",
        &[
            "action=accept proto=tcp dstports=443-443",
            "action=accept specialtarget=dns",
        ],
    ),
    (
        "accept",
        &[
            "action=drop dst4=192.0.2.0/24",
            "action=drop proto=udp dstports=1-100",
        ],
    ),
    (
        "drop",
        &["action=accept dstports=80-1000", "action=accept proto=icmp"],
    ),
    (
        "drop",
        &[
            "action=accept dst4=198.51.100.7",
            "action=accept specialtarget=dns dstports=5201-5201",
        ],
    ),
    (
        "accept",
        &[
            "action=drop proto=icmp icmptype=8",
            "action=accept proto=tcp dst4=192.0.2.80/32 dstports=22-22",
            "action=drop proto=tcp",
        ],
    ),
    (
        "drop",
        &[
            "action=accept proto=udp specialtarget=dns",
            "action=drop dst4=10.139.1.0/24",
            "action=accept dst4=10.0.0.0/8",
        ],
    ),
];

/// Rule sets for the client's IPv6 address.
const RULESETS6: &[(&str, &[&str])] = &[
    (
        "drop",
        &[
            "action=accept proto=tcp dstports=443-443",
            "action=accept specialtarget=dns",
        ],
    ),
    (
        "accept",
        &[
            "action=drop dst6=2001:db8:80::/48",
            "action=drop proto=udp dstports=1-100",
        ],
    ),
    (
        "drop",
        &["action=accept dstports=80-1000", "action=accept proto=icmp"],
    ),
    (
        "accept",
        &[
            "action=drop proto=icmp icmptype=128",
            "action=accept proto=tcp dst6=2001:db8:80::5/128 dstports=22-22",
            "action=drop proto=tcp",
        ],
    ),
    (
        "drop",
        &[
            "action=accept dst6=2001:db8:99::/64",
            "action=accept proto=udp specialtarget=dns",
        ],
    ),
];

struct Namespaces;

fn sh(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn must(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ns(name: &str, args: &[&str]) -> Vec<String> {
    let mut v = vec!["ip".to_string(), "netns".into(), "exec".into(), name.into()];
    v.extend(args.iter().map(|s| s.to_string()));
    v
}

fn must_ns(name: &str, args: &[&str]) {
    let v = ns(name, args);
    must(&v.iter().map(String::as_str).collect::<Vec<_>>());
}

/// Names unique to this process, so parallel runs do not collide.
struct Names {
    cl: String,
    rt: String,
    sv: String,
    /// veth names: client, router-client, router-server, server.
    veth: [String; 4],
}

fn names() -> &'static Names {
    static N: std::sync::OnceLock<Names> = std::sync::OnceLock::new();
    N.get_or_init(|| {
        let t = format!("{:x}", std::process::id() % 0xffff);
        Names {
            cl: format!("pcl-diff-{t}-cl"),
            rt: format!("pcl-diff-{t}-rt"),
            sv: format!("pcl-diff-{t}-sv"),
            veth: [
                format!("pcd{t}c"),
                format!("pcd{t}r0"),
                format!("pcd{t}r1"),
                format!("pcd{t}s"),
            ],
        }
    })
}

impl Namespaces {
    fn create() -> Self {
        Self::destroy();
        for n in [&names().cl, &names().rt, &names().sv] {
            must(&["ip", "netns", "add", n]);
            must_ns(n, &["ip", "link", "set", "lo", "up"]);
        }
        must(&[
            "ip",
            "link",
            "add",
            &names().veth[0],
            "netns",
            &names().cl,
            "type",
            "veth",
            "peer",
            "name",
            &names().veth[1],
            "netns",
            &names().rt,
        ]);
        must(&[
            "ip",
            "link",
            "add",
            &names().veth[2],
            "netns",
            &names().rt,
            "type",
            "veth",
            "peer",
            "name",
            &names().veth[3],
            "netns",
            &names().sv,
        ]);
        must_ns(
            &names().cl,
            &[
                "ip",
                "addr",
                "add",
                "10.137.0.10/32",
                "dev",
                &names().veth[0],
            ],
        );
        must_ns(&names().cl, &["ip", "link", "set", &names().veth[0], "up"]);
        must_ns(
            &names().cl,
            &["ip", "route", "add", "10.137.0.1", "dev", &names().veth[0]],
        );
        must_ns(
            &names().cl,
            &["ip", "route", "add", "default", "via", "10.137.0.1"],
        );
        must_ns(
            &names().rt,
            &[
                "ip",
                "addr",
                "add",
                "10.137.0.1/32",
                "dev",
                &names().veth[1],
            ],
        );
        must_ns(&names().rt, &["ip", "link", "set", &names().veth[1], "up"]);
        must_ns(
            &names().rt,
            &["ip", "route", "add", "10.137.0.10", "dev", &names().veth[1]],
        );
        must_ns(
            &names().rt,
            &["ip", "addr", "add", "10.0.2.15/24", "dev", &names().veth[2]],
        );
        must_ns(&names().rt, &["ip", "link", "set", &names().veth[2], "up"]);
        must_ns(
            &names().rt,
            &["ip", "route", "add", "default", "via", "10.0.2.2"],
        );
        must_ns(&names().rt, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        // Every reject must be answered at once, or a rejected probe waits
        // for a retransmission.
        must_ns(&names().rt, &["sysctl", "-qw", "net.ipv4.icmp_ratelimit=0"]);
        must_ns(
            &names().sv,
            &["ip", "addr", "add", "10.0.2.2/24", "dev", &names().veth[3]],
        );
        must_ns(&names().sv, &["ip", "link", "set", &names().veth[3], "up"]);
        for d in DESTINATIONS.iter().chain(DNS.iter()) {
            let _ = sh(&ns(
                &names().sv,
                &["ip", "addr", "add", &format!("{d}/32"), "dev", "lo"],
            )
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>());
        }
        must_ns(
            &names().sv,
            &["ip", "route", "add", "10.137.0.0/24", "via", "10.0.2.15"],
        );
        // IPv6: the client fd09::a behind fd09::1, the router 2001:db8:1::15
        // on the server's link 2001:db8:1::/64.
        let cl = &names().cl;
        let (v0, v1, v2, v3) = (
            &names().veth[0],
            &names().veth[1],
            &names().veth[2],
            &names().veth[3],
        );
        must_ns(
            cl,
            &["ip", "addr", "add", "fd09::a/128", "dev", v0, "nodad"],
        );
        must_ns(cl, &["ip", "route", "add", "fd09::1", "dev", v0]);
        must_ns(
            cl,
            &["ip", "-6", "route", "add", "default", "via", "fd09::1"],
        );
        let rt = &names().rt;
        must_ns(
            rt,
            &["ip", "addr", "add", "fd09::1/128", "dev", v1, "nodad"],
        );
        must_ns(rt, &["ip", "route", "add", "fd09::a", "dev", v1]);
        must_ns(
            rt,
            &["ip", "addr", "add", "2001:db8:1::15/64", "dev", v2, "nodad"],
        );
        must_ns(
            rt,
            &[
                "ip",
                "-6",
                "route",
                "add",
                "default",
                "via",
                "2001:db8:1::1",
            ],
        );
        must_ns(rt, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
        must_ns(rt, &["sysctl", "-qw", "net.ipv6.icmp.ratelimit=0"]);
        let sv = &names().sv;
        must_ns(
            sv,
            &["ip", "addr", "add", "2001:db8:1::1/64", "dev", v3, "nodad"],
        );
        for d in DESTINATIONS6 {
            must_ns(sv, &["ip", "addr", "add", &format!("{d}/128"), "dev", "lo"]);
        }
        must_ns(
            sv,
            &["ip", "route", "add", "fd09::/64", "via", "2001:db8:1::15"],
        );
        must_ns(&names().sv, &["nft", "add table inet probe; add chain inet probe input { type filter hook input priority 0; policy accept; }; add rule inet probe input ip saddr 10.137.0.10 counter; add rule inet probe input ip6 saddr fd09::a counter"]);
        Namespaces
    }

    fn destroy() {
        for n in [&names().cl, &names().rt, &names().sv] {
            let _ = sh(&["ip", "netns", "del", n]);
        }
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        Self::destroy();
    }
}

/// The nftables rules the Qubes agent writes for one client address.
fn qubes_nft(policy: &str, rules: &[&str], v6: bool) -> String {
    let mut out = Vec::new();
    // The agent's DNS servers of the family (resolv.conf has IPv4 only).
    let dns = if v6 {
        String::new()
    } else {
        DNS.iter()
            .map(|d| format!("{d}/32"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (family, reject, client) = if v6 {
        ("ip6", "reject with icmpv6 type admin-prohibited", CLIENT6)
    } else {
        ("ip", "reject with icmp type admin-prohibited", CLIENT)
    };
    let all: Vec<String> = rules
        .iter()
        .map(|r| r.to_string())
        .chain([format!("action={policy}")])
        .collect();
    for rule in &all {
        let kv: Vec<(&str, &str)> = rule.split(' ').filter_map(|w| w.split_once('=')).collect();
        let get = |k: &str| kv.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);
        let action = if get("action") == Some("accept") {
            "accept"
        } else {
            reject
        };
        let mut r = String::new();
        match get("proto") {
            Some(p) if v6 => {
                let p = if p == "icmp" { "icmpv6" } else { p };
                r += &format!(" ip6 nexthdr {p}");
            }
            Some(p) => r += &format!(" ip protocol {p}"),
            None => {}
        }
        if let Some(d) = get("dst4") {
            r += &format!(" ip daddr {d}");
        }
        if let Some(d) = get("dst6") {
            r += &format!(" ip6 daddr {d}");
        }
        let mut ports = get("dstports").map(|p| match p.split_once('-') {
            Some((a, b)) if a == b => a.to_string(),
            _ => p.to_string(),
        });
        if get("specialtarget") == Some("dns") {
            if !matches!(ports.as_deref(), None | Some("53")) {
                continue;
            }
            ports = Some("53".into());
            if dns.is_empty() {
                continue;
            }
            r += &format!(" ip daddr {{ {dns} }}");
        }
        if let Some(t) = get("icmptype") {
            let icmp = if v6 { "icmpv6" } else { "icmp" };
            r += &format!(" {icmp} type {t}");
        }
        match (ports, get("proto")) {
            (Some(p), None) => {
                out.push(format!("{r} tcp dport {p} {action}"));
                out.push(format!("{r} udp dport {p} {action}"));
            }
            (Some(p), Some(proto)) => out.push(format!("{r} {proto} dport {p} {action}")),
            (None, _) => out.push(format!("{r} {action}")),
        }
    }
    format!(
        "table {family} qubes-firewall {{\n  chain qbs-client {{\n{}\n  }}\n  chain forward {{\n    type filter hook forward priority 0; policy drop;\n    ct state established,related accept\n    meta iifname != \"{rt0}\" accept\n    {family} saddr {client} jump qbs-client\n  }}\n}}\n",
        out.iter().map(|r| format!("   {}", r.trim())).collect::<Vec<_>>().join("\n"),
        rt0 = names().veth[1]
    )
}

fn load_router(nft: &str) {
    for table in [
        "delete table ip qubes-firewall",
        "delete table ip6 qubes-firewall",
    ] {
        let _ = sh(&ns(&names().rt, &["nft", table])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>());
    }
    let path = std::env::temp_dir().join(format!("pcl-diff-{}.nft", std::process::id()));
    std::fs::write(&path, nft).unwrap();
    must_ns(&names().rt, &["nft", "-f", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(path);
}

fn server_count() -> u64 {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &names().sv,
            "nft",
            "list",
            "chain",
            "inet",
            "probe",
            "input",
        ])
        .output()
        .unwrap();
    // One counter per family; a probe raises one of them.
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("packets ")
        .skip(1)
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

#[derive(Debug, Clone, Copy)]
enum Probe {
    Tcp(&'static str, u16),
    Udp(&'static str, u16),
    Ping(&'static str),
}

/// Sends the probe from the client namespace; true if it reached the server.
fn linux_accepts(p: Probe) -> bool {
    let before = server_count();
    let script = match p {
        Probe::Tcp(d, port) => format!("exec 3<>/dev/tcp/{d}/{port}"),
        Probe::Udp(d, port) => format!("echo probe > /dev/udp/{d}/{port}"),
        Probe::Ping(d) if d.contains(':') => format!("ping -6 -c 1 -W 1 {d}"),
        Probe::Ping(d) => format!("ping -c 1 -W 1 {d}"),
    };
    // A rejected SYN is retried by the client after a second; whether the
    // first one reached the server is known long before that.
    let _ = Command::new("ip")
        .args([
            "netns",
            "exec",
            &names().cl,
            "timeout",
            "0.5",
            "bash",
            "-c",
            &script,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    server_count() > before
}

fn portcullis(policy: &str, rules: &[&str], v6: bool) -> Firewall {
    let mut db = String::from(
        "/qubes-ip 10.0.2.15\n/qubes-netmask 255.255.255.0\n/qubes-gateway 10.0.2.2\n\
         /qubes-primary-dns 10.139.1.1\n/qubes-secondary-dns 10.139.1.2\n\
         /qubes-netvm-gateway 10.137.0.1\n/qubes-netvm-primary-dns 10.139.1.1\n\
         /qubes-netvm-secondary-dns 10.139.1.2\n/connected-ips 10.137.0.10\n\
         /qubes-ip6 2001:db8:1::15\n/qubes-gateway6 2001:db8:1::1\n\
         /qubes-netvm-gateway6 fd09::1\n/connected-ips6 fd09::a\n",
    );
    let client = if v6 { CLIENT6 } else { CLIENT };
    db += &format!("/qubes-firewall/{client}/policy {policy}\n");
    for (i, r) in rules.iter().enumerate() {
        db += &format!("/qubes-firewall/{client}/{i:04} {r}\n");
    }
    let cfg = NetConfig::from_db(&QubesDb::parse_snapshot(&db).unwrap()).unwrap();
    let (up, down, gw) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 3]);
    let mut fw = Firewall::new(cfg, vec![up, down]);
    let mut buf = [0u8; 2048];
    fw.poll_emit(0, &mut buf).unwrap();
    let arp = Arp {
        op: ARP_REPLY,
        sender_mac: gw,
        sender_ip: Ipv4Addr::new(10, 0, 2, 2),
        target_mac: up,
        target_ip: Ipv4Addr::new(10, 0, 2, 15),
    };
    let n = arp.emit(&mut buf, gw, up);
    assert_eq!(fw.handle(0, UPLINK, &mut buf, n), Verdict::Consumed);
    // And the IPv6 gateway, by neighbour discovery.
    let (_, n) = fw.poll_emit(0, &mut buf).expect("NS for the IPv6 gateway");
    assert_eq!(get_u16(&buf[..n], 12), Some(ETHERTYPE_IPV6));
    let gw6: Ipv6Addr = "2001:db8:1::1".parse().unwrap();
    let na = Neighbor {
        kind: ND_NEIGHBOR_ADVERT,
        target: gw6,
        lladdr: Some(gw),
        flags: NA_SOLICITED | NA_OVERRIDE,
    };
    let n = na.emit(&mut buf, (gw, up), gw6, "2001:db8:1::15".parse().unwrap());
    assert_eq!(fw.handle(0, UPLINK, &mut buf, n), Verdict::Consumed);
    fw
}

fn portcullis_accepts(fw: &mut Firewall, p: Probe, sport: u16) -> bool {
    let (proto, dst, l4): (u8, &str, Vec<u8>) = match p {
        Probe::Tcp(d, port) => {
            let mut s = vec![0u8; 20];
            put_u16(&mut s, 0, sport);
            put_u16(&mut s, 2, port);
            s[12] = 5 << 4;
            s[13] = TCP_SYN;
            (PROTO_TCP, d, s)
        }
        Probe::Udp(d, port) => {
            let mut s = vec![0u8; 14];
            put_u16(&mut s, 0, sport);
            put_u16(&mut s, 2, port);
            put_u16(&mut s, 4, 14);
            (PROTO_UDP, d, s)
        }
        Probe::Ping(d) if d.contains(':') => {
            let mut s = vec![ICMPV6_ECHO_REQUEST, 0, 0, 0, 0, 0, 0, 1];
            put_u16(&mut s, 4, sport);
            (PROTO_ICMPV6, d, s)
        }
        Probe::Ping(d) => {
            let mut s = vec![8u8, 0, 0, 0, 0, 0, 0, 1];
            put_u16(&mut s, 4, sport);
            (PROTO_ICMP, d, s)
        }
    };
    let f = match dst.parse::<IpAddr>().unwrap() {
        IpAddr::V4(dst) => frame4(proto, dst, &l4),
        IpAddr::V6(dst) => frame6(proto, dst, &l4),
    };
    let mut buf = [0u8; 2048];
    buf[..f.len()].copy_from_slice(&f);
    matches!(
        fw.handle(1, 1, &mut buf, f.len()),
        Verdict::Forward { port: UPLINK, .. }
    )
}

/// The client's frame: IPv6 to `dst`, checksum filled in.
fn frame6(proto: u8, dst: Ipv6Addr, l4: &[u8]) -> Vec<u8> {
    let client: Ipv6Addr = CLIENT6.parse().unwrap();
    let l4_off = 14 + IPV6_HEADER;
    let mut f = vec![0u8; l4_off + l4.len()];
    put_eth(
        &mut f,
        [2, 0, 0, 0, 0, 2],
        [2, 0, 0, 0, 0, 0x10],
        ETHERTYPE_IPV6,
    );
    put_ipv6_header(&mut f, 14, l4.len(), proto, 64, client, dst);
    put_bytes(&mut f, l4_off, l4);
    let c = fold(sum16(
        &f[l4_off..],
        pseudo_header_sum6(client, dst, proto, l4.len()),
    ));
    let at = if proto == PROTO_ICMPV6 {
        2
    } else {
        l4_checksum_offset(proto).unwrap()
    };
    put_u16(&mut f, l4_off + at, c);
    f
}

/// The client's frame: IPv4 to `dst`, checksum filled in.
fn frame4(proto: u8, dst: Ipv4Addr, l4: &[u8]) -> Vec<u8> {
    let client = Ipv4Addr::new(10, 137, 0, 10);
    let mut f = vec![0u8; 34 + l4.len()];
    put_eth(
        &mut f,
        [2, 0, 0, 0, 0, 2],
        [2, 0, 0, 0, 0, 0x10],
        ETHERTYPE_IPV4,
    );
    put_ipv4_header(&mut f, 14, 20 + l4.len(), 64, proto, client, dst);
    put_bytes(&mut f, 34, l4);
    let c = match proto {
        PROTO_ICMP => checksum(&f[34..]),
        _ => fold(sum16(
            &f[34..],
            pseudo_header_sum(client, dst, proto, l4.len()),
        )),
    };
    put_u16(&mut f, 34 + l4_checksum_offset(proto).unwrap(), c);
    f
}

#[test]
fn qubes_rules_decide_as_linux_nftables_does() {
    assert!(is_root(), "needs root: it creates network namespaces");
    let _n = Namespaces::create();
    let probes = |dests: &[&'static str]| {
        let mut probes = Vec::new();
        for &d in dests {
            for p in PORTS {
                probes.push(Probe::Tcp(d, p));
                probes.push(Probe::Udp(d, p));
            }
            probes.push(Probe::Ping(d));
        }
        probes
    };
    // Linux must be able to forward at all: a permissive rule set first.
    for (v6, dst) in [(false, "192.0.2.80"), (true, "2001:db8:80::5")] {
        load_router(&qubes_nft("accept", &[], v6));
        // (Neighbour discovery on links just brought up may need a retry.)
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !linux_accepts(Probe::Ping(dst)) {
            assert!(
                std::time::Instant::now() < deadline,
                "the Linux router does not forward to {dst}"
            );
        }
    }

    let mut disagreements = Vec::new();
    let mut compared = 0;
    let families = [
        (false, RULESETS, probes(&DESTINATIONS)),
        (true, RULESETS6, probes(&DESTINATIONS6)),
    ];
    for (v6, rulesets, probes) in &families {
        for (policy, rules) in rulesets.iter() {
            load_router(&qubes_nft(policy, rules, *v6));
            let mut fw = portcullis(policy, rules, *v6);
            for (i, p) in probes.iter().enumerate() {
                let linux = linux_accepts(*p);
                let ours = portcullis_accepts(&mut fw, *p, 20000 + i as u16);
                compared += 1;
                if linux != ours {
                    disagreements.push(format!(
                    "policy={policy} rules={rules:?} probe={p:?}: linux={linux} portcullis={ours}"
                ));
                }
            }
        }
    }
    println!(
        "nft differential: {compared} probes compared, {} disagreements",
        disagreements.len()
    );
    assert!(
        disagreements.is_empty(),
        "disagreements:\n{}",
        disagreements.join("\n")
    );
}
