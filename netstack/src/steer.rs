//! Which core handles a frame, when every core runs its own firewall
//! (the kernel's `rtc` layout: each core owns one queue pair of every NIC
//! and a `Firewall` of its own).
//!
//! A flow's state lives on one core only, so both directions of a flow
//! must reach that core whichever queue the device put them on. The owner
//! is a hash of the flow's *remote* address, the one address both
//! directions carry in every packet (fragments included):
//!
//! - from a client: the destination, after the DNS redirection's mapping
//!   (a query to a virtual DNS address belongs to the upstream server its
//!   answer comes from);
//! - from the uplink: the source; for an ICMP error, the destination of the
//!   packet it quotes (the remote the flow was going to).
//!
//! Flows to one remote address therefore share a core, and that core's
//! NAT port allocator alone hands out ports towards that remote: two cores
//! never hand out the same translated tuple. Neighbour discovery must
//! reach every core (each keeps its own neighbour cache): ARP replies and
//! neighbour advertisements from the uplink go to all cores; requests and
//! solicitations from the uplink to core 0, so that one core answers.
//! Each core's resolver (for `dsthost` rules) asks from a port of its own
//! (`resolver_port`), and the answers go back to the core that asked.
//! Frames from clients that are not IP (ARP) and frames that do not parse
//! stay on the core that received them, whose firewall answers or drops
//! and counts them.

use core::net::Ipv4Addr;

use crate::config::NetConfig;
use crate::dns::{DNS_PORT, RESOLVER_PORT};
use crate::firewall::UPLINK;
use crate::ipv6::{ND_NEIGHBOR_ADVERT, PROTO_ICMPV6};
use crate::wire::{
    get_ip, get_u16, get_u8, ARP_REPLY, ETHERTYPE_ARP, ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETH_HEADER,
    PROTO_ICMP, PROTO_UDP,
};

/// The port core `core`'s resolver asks from (`Firewall::set_resolver_port`):
/// `RESOLVER_PORT` downwards, one per core.
pub fn resolver_port(core: usize) -> u16 {
    RESOLVER_PORT.saturating_sub(core.min(usize::from(RESOLVER_PORT)) as u16)
}

/// Where a frame goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Steer {
    /// The core with this index handles it.
    Core(usize),
    /// Every core gets a copy (neighbour answers from the uplink).
    All,
    /// The core that received it handles it.
    Here,
}

/// IPv4 ICMP errors that quote the packet they answer.
const ICMP_ERRORS: [u8; 4] = [3, 4, 11, 12];
/// ICMPv6 errors (types below 128 that quote a packet).
const ICMPV6_LAST_ERROR: u8 = 127;

/// The steering function of one configuration and core count.
#[derive(Debug, Clone)]
pub struct Steering {
    cores: usize,
    /// Virtual DNS address → the upstream server it is redirected to.
    dns: [(Option<Ipv4Addr>, Option<Ipv4Addr>); 2],
}

impl Steering {
    /// For `cores` cores (at least one).
    pub fn new(cfg: &NetConfig, cores: usize) -> Self {
        Self {
            cores: cores.max(1),
            dns: [
                (cfg.virtual_dns[0], cfg.upstream_dns[0]),
                (cfg.virtual_dns[1], cfg.upstream_dns[1]),
            ],
        }
    }

    pub fn cores(&self) -> usize {
        self.cores
    }

    /// The core that owns flows to or from `remote`.
    pub fn owner4(&self, remote: Ipv4Addr) -> usize {
        self.spread(u64::from(u32::from(remote)))
    }

    /// As `owner4`, for an IPv6 remote.
    pub fn owner6(&self, remote: [u8; 16]) -> usize {
        let v = u128::from_be_bytes(remote);
        self.spread((v as u64) ^ ((v >> 64) as u64))
    }

    /// Multiplicative hashing: the high bits of the product, reduced to
    /// the core count without a division.
    fn spread(&self, key: u64) -> usize {
        let h = key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32;
        ((h * self.cores as u64) >> 32) as usize
    }

    /// Where the frame received on `port` goes.
    pub fn steer(&self, port: usize, frame: &[u8]) -> Steer {
        if self.cores == 1 {
            return Steer::Here;
        }
        match get_u16(frame, 12) {
            Some(ETHERTYPE_IPV4) => self.ipv4(port, frame).unwrap_or(Steer::Here),
            Some(ETHERTYPE_IPV6) => self.ipv6(port, frame).unwrap_or(Steer::Here),
            Some(ETHERTYPE_ARP) if port == UPLINK => match get_u16(frame, ETH_HEADER + 6) {
                Some(ARP_REPLY) => Steer::All,
                _ => Steer::Core(0),
            },
            _ => Steer::Here,
        }
    }

    fn ipv4(&self, port: usize, f: &[u8]) -> Option<Steer> {
        let l3 = ETH_HEADER;
        let ihl = usize::from(get_u8(f, l3)? & 0x0f) * 4;
        let src = get_ip(f, l3 + 12)?;
        let dst = get_ip(f, l3 + 16)?;
        if port != UPLINK {
            let remote = self
                .dns
                .iter()
                .find(|(virt, _)| *virt == Some(dst))
                .and_then(|(_, real)| *real)
                .unwrap_or(dst);
            return Some(Steer::Core(self.owner4(remote)));
        }
        let first_fragment = get_u16(f, l3 + 6)? & 0x1fff == 0;
        let proto = get_u8(f, l3 + 9)?;
        let l4 = l3 + ihl;
        if proto == PROTO_UDP && first_fragment && get_u16(f, l4)? == DNS_PORT {
            // An answer to a core's resolver goes to that core.
            let dport = get_u16(f, l4 + 2)?;
            let asker = usize::from(RESOLVER_PORT.wrapping_sub(dport));
            if asker < self.cores {
                return Some(Steer::Core(asker));
            }
        }
        if proto == PROTO_ICMP && first_fragment && ICMP_ERRORS.contains(&get_u8(f, l4)?) {
            // The quoted header starts 8 bytes in; its destination 16
            // bytes further.
            if let Some(quoted_dst) = get_ip(f, l4 + 8 + 16) {
                return Some(Steer::Core(self.owner4(quoted_dst)));
            }
        }
        Some(Steer::Core(self.owner4(src)))
    }

    fn ipv6(&self, port: usize, f: &[u8]) -> Option<Steer> {
        let l3 = ETH_HEADER;
        let addr = |off: usize| -> Option<[u8; 16]> { f.get(off..off + 16)?.try_into().ok() };
        let src = addr(l3 + 8)?;
        let dst = addr(l3 + 24)?;
        if port != UPLINK {
            return Some(Steer::Core(self.owner6(dst)));
        }
        if get_u8(f, l3 + 6)? == PROTO_ICMPV6 {
            let l4 = l3 + 40;
            let kind = get_u8(f, l4)?;
            if kind == ND_NEIGHBOR_ADVERT {
                return Some(Steer::All);
            }
            if (133..=137).contains(&kind) {
                return Some(Steer::Core(0));
            }
            if kind <= ICMPV6_LAST_ERROR {
                // The quoted header starts 8 bytes in; its destination 24
                // bytes further.
                if let Some(quoted_dst) = addr(l4 + 8 + 24) {
                    return Some(Steer::Core(self.owner6(quoted_dst)));
                }
            }
        }
        Some(Steer::Core(self.owner6(src)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::QubesDb;
    use crate::wire::*;

    const DB: &str = "/qubes-ip 10.0.2.15\n/qubes-netmask 255.255.255.0\n/qubes-gateway 10.0.2.2\n\
                      /qubes-primary-dns 10.0.2.3\n/qubes-netvm-primary-dns 10.139.1.1\n\
                      /qubes-netvm-gateway 10.137.0.1\n/connected-ips 10.137.0.10\n\
                      /qubes-firewall/10.137.0.10/policy accept\n";

    fn steering(cores: usize) -> Steering {
        let cfg = NetConfig::from_db(&QubesDb::parse_snapshot(DB).unwrap()).unwrap();
        Steering::new(&cfg, cores)
    }

    fn frame(proto: u8, src: Ipv4Addr, dst: Ipv4Addr, l4: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 34 + l4.len()];
        put_eth(&mut f, [2; 6], [4; 6], ETHERTYPE_IPV4);
        put_ipv4_header(&mut f, 14, 20 + l4.len(), 64, proto, src, dst);
        put_bytes(&mut f, 34, l4);
        f
    }

    const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 137, 0, 10);
    const UP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);

    /// Both directions of every flow meet on one core, and flows to many
    /// remotes use every core.
    #[test]
    fn both_directions_of_a_flow_meet_on_one_core() {
        for cores in [2, 3, 4, 16] {
            let s = steering(cores);
            let mut used = vec![0u32; cores];
            for i in 0..1000u32 {
                let remote = Ipv4Addr::from(0xc633_6400 + i * 7919);
                let out = frame(PROTO_UDP, CLIENT, remote, &[0; 8]);
                let back = frame(PROTO_UDP, remote, UP, &[0; 8]);
                let Steer::Core(c) = s.steer(1, &out) else {
                    panic!("a client's packet goes to one core")
                };
                assert_eq!(s.steer(UPLINK, &back), Steer::Core(c));
                // An ICMP error from a router on the way quotes the
                // translated packet: it goes where the flow lives.
                let mut err = vec![3u8, 3, 0, 0, 0, 0, 0, 0];
                err.extend_from_slice(&back[14..34]);
                put_bytes(&mut err, 8 + 12, &UP.octets());
                put_bytes(&mut err, 8 + 16, &remote.octets());
                let router = Ipv4Addr::new(192, 0, 2, 1);
                assert_eq!(
                    s.steer(UPLINK, &frame(PROTO_ICMP, router, UP, &err)),
                    Steer::Core(c)
                );
                used[c] += 1;
            }
            assert!(
                used.iter().all(|&n| n > 1000 / cores as u32 / 2),
                "{used:?}"
            );
        }
    }

    #[test]
    fn dns_queries_belong_to_the_upstream_server_that_answers() {
        let s = steering(4);
        let query = frame(PROTO_UDP, CLIENT, Ipv4Addr::new(10, 139, 1, 1), &[0; 8]);
        let answer = frame(PROTO_UDP, Ipv4Addr::new(10, 0, 2, 3), UP, &[0; 8]);
        assert_eq!(s.steer(1, &query), s.steer(UPLINK, &answer));
        assert_eq!(
            s.steer(UPLINK, &answer),
            Steer::Core(s.owner4(Ipv4Addr::new(10, 0, 2, 3)))
        );
    }

    /// Each core's resolver asks from its own port; the answer goes back
    /// to the core that asked, whatever the DNS server's address hashes to.
    #[test]
    fn resolver_answers_go_to_the_core_that_asked() {
        let s = steering(4);
        let dns = Ipv4Addr::new(10, 0, 2, 3);
        for core in 0..4 {
            let port = resolver_port(core);
            assert!(port < crate::conntrack::NAT_PORT_FIRST);
            let answer = udp(dns, DNS_PORT, UP, port, ([2; 6], [4; 6]));
            assert_eq!(s.steer(UPLINK, &answer), Steer::Core(core));
        }
        // A client's DNS answer (to a NAT port) follows the server's owner.
        let answer = udp(dns, DNS_PORT, UP, 40000, ([2; 6], [4; 6]));
        assert_eq!(s.steer(UPLINK, &answer), Steer::Core(s.owner4(dns)));
    }

    #[test]
    fn neighbour_answers_go_everywhere_and_requests_to_core_zero() {
        let s = steering(2);
        let mut buf = [0u8; 64];
        for (op, want_up) in [(ARP_REPLY, Steer::All), (ARP_REQUEST, Steer::Core(0))] {
            let a = Arp {
                op,
                sender_mac: [2; 6],
                sender_ip: Ipv4Addr::new(10, 0, 2, 2),
                target_mac: [4; 6],
                target_ip: UP,
            };
            let n = a.emit(&mut buf, [2; 6], [4; 6]);
            assert_eq!(s.steer(UPLINK, &buf[..n]), want_up);
            assert_eq!(s.steer(1, &buf[..n]), Steer::Here, "a client's ARP");
        }
        let mut na = vec![0u8; 14 + 40 + 24];
        put_u16(&mut na, 12, ETHERTYPE_IPV6);
        na[14 + 6] = PROTO_ICMPV6;
        na[54] = ND_NEIGHBOR_ADVERT;
        assert_eq!(s.steer(UPLINK, &na), Steer::All);
        na[54] = crate::ipv6::ND_NEIGHBOR_SOLICIT;
        assert_eq!(s.steer(UPLINK, &na), Steer::Core(0));
    }

    #[test]
    fn one_core_and_unparsable_frames_stay_here() {
        let f = frame(PROTO_UDP, CLIENT, Ipv4Addr::new(192, 0, 2, 80), &[0; 8]);
        assert_eq!(steering(1).steer(1, &f), Steer::Here);
        let s = steering(4);
        for len in 0..34 {
            let got = s.steer(UPLINK, &f[..len]);
            assert_eq!(got, Steer::Here, "{len} bytes");
        }
        assert_eq!(s.steer(1, &[0u8; 60]), Steer::Here, "ethertype 0");
    }

    fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, macs: (Mac, Mac)) -> Vec<u8> {
        let mut seg = [0u8; 12];
        put_u16(&mut seg, 0, sport);
        put_u16(&mut seg, 2, dport);
        put_u16(&mut seg, 4, 12);
        let mut f = frame(PROTO_UDP, src, dst, &seg);
        put_eth(&mut f, macs.1, macs.0, ETHERTYPE_IPV4);
        f
    }

    /// Three firewalls, one per core, each frame handed to the core
    /// `steer` names: every flow's replies find its translation, no two
    /// cores hand out the same translated tuple, a reply on any other core
    /// is dropped (the steering is what makes it work), and the cores'
    /// summaries add up to the traffic.
    #[test]
    fn per_core_firewalls_with_steering_forward_every_flow() {
        use crate::firewall::{Firewall, Verdict};
        const UP_MAC: Mac = [0x52, 0x54, 0, 0, 0, 1];
        const DOWN_MAC: Mac = [0x52, 0x54, 0, 0, 0, 2];
        const GW_MAC: Mac = [2, 0, 0, 0, 0, 0x99];
        const CLIENT_MAC: Mac = [2, 0, 0, 0, 0, 0x10];
        let cfg = NetConfig::from_db(&QubesDb::parse_snapshot(DB).unwrap()).unwrap();
        let s = Steering::new(&cfg, 3);
        let mut fws: Vec<Firewall> = (0..3)
            .map(|_| Firewall::new(cfg.clone(), vec![UP_MAC, DOWN_MAC]))
            .collect();
        let mut buf = [0u8; 2048];
        let reply = Arp {
            op: ARP_REPLY,
            sender_mac: GW_MAC,
            sender_ip: Ipv4Addr::new(10, 0, 2, 2),
            target_mac: UP_MAC,
            target_ip: UP,
        };
        let n = reply.emit(&mut buf, GW_MAC, UP_MAC);
        assert_eq!(s.steer(UPLINK, &buf[..n]), Steer::All);
        for fw in &mut fws {
            let mut b = [0u8; 2048];
            assert!(fw.poll_emit(0, &mut b).is_some(), "each core asks");
            let mut f = buf;
            assert_eq!(fw.handle(0, UPLINK, &mut f, n), Verdict::Consumed);
        }
        let mut handed_out = std::collections::HashSet::new();
        for i in 0..300u16 {
            // 60 servers, 5 client ports each; client ports repeat.
            let server = Ipv4Addr::from(0xc633_6400 + u32::from(i % 60) * 257);
            let sport = 40000 + i % 50;
            let out = udp(CLIENT, sport, server, 5201, (CLIENT_MAC, DOWN_MAC));
            let Steer::Core(c) = s.steer(1, &out) else {
                panic!("one core")
            };
            buf[..out.len()].copy_from_slice(&out);
            let v = fws[c].handle(1, 1, &mut buf, out.len());
            assert!(matches!(v, Verdict::Forward { port: UPLINK, .. }), "{v:?}");
            let nat = get_u16(&buf, 34).unwrap();
            assert!(
                handed_out.insert((nat, server)),
                "one translated tuple, once"
            );
            let back = udp(server, 5201, UP, nat, (GW_MAC, UP_MAC));
            assert_eq!(s.steer(UPLINK, &back), Steer::Core(c));
            let other = (c + 1) % 3;
            buf[..back.len()].copy_from_slice(&back);
            assert!(matches!(
                fws[other].handle(1, UPLINK, &mut buf, back.len()),
                Verdict::Drop(_)
            ));
            buf[..back.len()].copy_from_slice(&back);
            let v = fws[c].handle(1, UPLINK, &mut buf, back.len());
            assert!(matches!(v, Verdict::Forward { port: 1, .. }), "{v:?}");
            assert_eq!(get_ip(&buf, 30), Some(CLIENT));
            assert_eq!(get_u16(&buf, 36), Some(sport));
        }
        let mut total = fws[0].summary();
        for fw in &fws[1..] {
            assert!(fw.stats().to_upstream > 0, "every core had flows");
            total.add(&fw.summary());
        }
        assert_eq!(total.stats.to_upstream, 300);
        assert_eq!(total.stats.to_clients, 300);
        assert_eq!(total.stats.flows_created, 300);
        assert_eq!(total.flows, 300);
        assert_eq!(
            total.stats.dropped(),
            300,
            "the replies shown to the wrong core"
        );
        let hits = &total.rules[0].1;
        assert_eq!(hits.as_ref().map(|h| h.iter().sum::<u64>()), Ok(300));
    }

    /// Two per-core firewalls with a `dsthost` rule: each asks the DNS
    /// server from its own port, the answers are steered back to the
    /// asker, and both cores resolve the name.
    #[test]
    fn every_core_resolves_its_dsthost_names() {
        use crate::firewall::{Firewall, Verdict};
        let db = DB.replace(
            "/qubes-firewall/10.137.0.10/policy accept\n",
            "/qubes-firewall/10.137.0.10/policy drop\n\
             /qubes-firewall/10.137.0.10/0000 action=accept dsthost=example.org\n",
        );
        let cfg = NetConfig::from_db(&QubesDb::parse_snapshot(&db).unwrap()).unwrap();
        let s = Steering::new(&cfg, 2);
        let (up_mac, gw_mac) = ([0x52, 0x54, 0, 0, 0, 1], [2, 0, 0, 0, 0, 0x99]);
        let mut fws: Vec<Firewall> = (0..2)
            .map(|k| {
                let mut fw = Firewall::new(cfg.clone(), vec![up_mac, [0x52, 0x54, 0, 0, 0, 2]]);
                fw.set_resolver_port(resolver_port(k));
                fw
            })
            .collect();
        for (k, fw) in fws.iter_mut().enumerate() {
            // ARP requests (for the gateway, for the DNS server) answered,
            // then the DNS query.
            let mut q = [0u8; 2048];
            let mut now = 0;
            let (port, len) = loop {
                // A query without the next hop's MAC is retried a second
                // later.
                now += 1100;
                let Some((port, len)) = fw.poll_emit(now, &mut q) else {
                    assert!(now < 10_000, "no DNS query");
                    continue;
                };
                if get_u16(&q, 12) == Some(ETHERTYPE_IPV4) {
                    break (port, len);
                }
                let asked = get_ip(&q, 14 + 24).unwrap();
                let mut arp = [0u8; 64];
                let n = Arp {
                    op: ARP_REPLY,
                    sender_mac: gw_mac,
                    sender_ip: asked,
                    target_mac: up_mac,
                    target_ip: UP,
                }
                .emit(&mut arp, gw_mac, up_mac);
                assert_eq!(fw.handle(now, UPLINK, &mut arp, n), Verdict::Consumed);
            };
            assert_eq!(port, UPLINK);
            assert_eq!(get_u16(&q, 34), Some(resolver_port(k)));
            // The server's answer: the query with an A record added.
            let mut msg = q[42..len].to_vec();
            put_u16(&mut msg, 2, 0x8180);
            put_u16(&mut msg, 6, 1);
            msg.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 198, 51, 100, 7]);
            let mut seg = vec![0u8; 8];
            put_u16(&mut seg, 0, DNS_PORT);
            put_u16(&mut seg, 2, resolver_port(k));
            put_u16(&mut seg, 4, (8 + msg.len()) as u16);
            seg.extend_from_slice(&msg);
            let dns = Ipv4Addr::new(10, 0, 2, 3);
            let mut answer = frame(PROTO_UDP, dns, UP, &seg);
            put_eth(&mut answer, up_mac, gw_mac, ETHERTYPE_IPV4);
            let sum = fold(sum16(
                &answer[34..],
                pseudo_header_sum(dns, UP, PROTO_UDP, seg.len()),
            ));
            put_u16(&mut answer, 40, sum);
            assert_eq!(s.steer(UPLINK, &answer), Steer::Core(k));
            let len = answer.len();
            answer.resize(2048, 0);
            assert_eq!(fw.handle(now, UPLINK, &mut answer, len), Verdict::Consumed);
        }
        for fw in &fws {
            let hosts: Vec<_> = fw.dsthosts().collect();
            assert_eq!(hosts.len(), 1);
            assert!(hosts[0].3, "resolved on every core");
            assert_eq!(
                hosts[0].2,
                [core::net::IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7))]
            );
        }
    }

    /// Every prefix of random frames, from either side: never a panic,
    /// always a core that exists.
    #[test]
    fn hostile_frames_never_panic() {
        let s = steering(3);
        let mut x = 0x1234_5678_9abc_def0u64;
        for _ in 0..20_000 {
            let mut f = [0u8; 96];
            for b in &mut f {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            f[12..14].copy_from_slice(&[[0x08, 0x00], [0x86, 0xdd], [0x08, 0x06]][x as usize % 3]);
            let len = (x >> 8) as usize % f.len();
            for port in [UPLINK, 1] {
                if let Steer::Core(c) = s.steer(port, &f[..len]) {
                    assert!(c < 3);
                }
            }
        }
    }
}
