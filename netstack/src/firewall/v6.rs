//! The IPv6 half of the pipeline, on when `NetConfig::ip6` is set.
//!
//! The decisions mirror IPv4's: neighbour discovery answered for own
//! addresses (on the uplink) and for the gateway and off-link addresses
//! (towards clients, as proxy ARP does), the gateway's MAC learned from
//! its advertisements; from a client: anti-spoofing against
//! `/connected-ips6`, ping of own addresses, client-to-client drop, hop
//! limit, connection tracking, the client's IPv6 rules (rejects with
//! ICMPv6 admin-prohibited), masquerade to the uplink address; from
//! upstream: replies and ICMPv6 errors quoting them, translated back.
//! Multicast and link-local traffic is not forwarded. Fragments after the
//! first follow their first fragment's verdict and translation, in order,
//! as for IPv4.

use core::net::{IpAddr, Ipv6Addr};

use super::{
    bind, flow_tuple, quoted_reply, rewrite_l4, swap_macs, DropReason, Firewall, Piece, Verdict,
    ARP_LIFETIME_MS, ARP_RETRY_MS, TTL_OWN, UPLINK,
};
use crate::config::Ipv6Config;
use crate::conntrack::{Outbound, Tuple};
use crate::ipv6::*;
use crate::rules::Probe;
use crate::wire::*;

/// An ICMPv6 error the firewall sends instead of forwarding.
struct Icmp6Error {
    icmp_type: u8,
    code: u8,
    from: Ipv6Addr,
    drop: DropReason,
}

/// Unicast addresses that are never forwarded: link-local, loopback,
/// unspecified (multicast is refused before this).
pub(super) fn local_scope(a: Ipv6Addr) -> bool {
    a.is_unspecified() || a.is_loopback() || (a.segments()[0] & 0xffc0) == 0xfe80
}

impl Piece<Ipv6Addr> {
    fn of6(info: &Ipv6Info) -> Self {
        Self {
            key: (info.src, info.dst, 0, info.frag_id),
            offset: info.frag_offset,
            len: info.end.saturating_sub(info.frag_data),
            more: info.more_fragments,
        }
    }
}

impl Firewall {
    pub(super) fn handle_ipv6(
        &mut self,
        now: u64,
        port: usize,
        buf: &mut [u8],
        len: usize,
    ) -> Verdict {
        let Some(v6) = self.cfg.ip6 else {
            return self.drop(DropReason::Ipv6Off);
        };
        let info = match parse_ipv6(&buf[..len]) {
            Ok(i) => i,
            Err(m) => return self.drop(m.into()),
        };
        self.ipv6_parsed(now, port, buf, &info, v6)
    }

    /// `handle_ipv6` after the parse (where the fast path hands over).
    pub(super) fn ipv6_parsed(
        &mut self,
        now: u64,
        port: usize,
        buf: &mut [u8],
        info: &Ipv6Info,
        v6: Ipv6Config,
    ) -> Verdict {
        let nd = [ND_NEIGHBOR_SOLICIT, ND_NEIGHBOR_ADVERT].map(u16::from);
        if info.proto == PROTO_ICMPV6 && nd.contains(&info.sport) {
            return self.handle_nd(now, port, buf, info, v6);
        }
        if info.dst.is_multicast() || get_u8(buf, 0).is_some_and(|b| b & 1 != 0) {
            return self.drop(DropReason::NotForUs);
        }
        if local_scope(info.src) || local_scope(info.dst) {
            return self.drop(DropReason::Ipv6Scope);
        }
        if port == UPLINK {
            self.upstream_packet6(now, buf, info, v6)
        } else {
            self.client_packet6(now, port, buf, info, v6)
        }
    }

    // ---- Neighbour discovery --------------------------------------------

    fn handle_nd(
        &mut self,
        now: u64,
        port: usize,
        buf: &mut [u8],
        info: &Ipv6Info,
        v6: Ipv6Config,
    ) -> Verdict {
        if !l4_checksum_ok6(buf, info) {
            return self.drop(DropReason::BadL4Checksum);
        }
        let nd = match Neighbor::parse(buf, info) {
            Ok(n) => n,
            Err(m) => return self.drop(m.into()),
        };
        let frame_src = get_mac(buf, 6).unwrap_or([0; 6]);
        if port == UPLINK {
            // The gateway's address, learned from what it says of itself.
            if nd.kind == ND_NEIGHBOR_ADVERT && nd.target == v6.gateway {
                self.learn_gateway6(nd.lladdr.unwrap_or(frame_src), now);
                return Verdict::Consumed;
            }
            if nd.kind == ND_NEIGHBOR_SOLICIT
                && nd.target == v6.uplink_ip
                && !info.src.is_unspecified()
            {
                if info.src == v6.gateway {
                    if let Some(mac) = nd.lladdr {
                        self.learn_gateway6(mac, now);
                    }
                }
                return self.neighbor_advert(buf, port, info, &nd, frame_src);
            }
            return self.drop(DropReason::NdIgnored);
        }
        if nd.kind != ND_NEIGHBOR_SOLICIT || info.src.is_unspecified() {
            // Clients' own advertisements and duplicate address detection
            // are none of the firewall's business.
            return self.drop(DropReason::NdIgnored);
        }
        match self.client_index6.get(&info.src) {
            Some(ci) => {
                if !self.bind_client(ci, port, frame_src) {
                    return self.drop(DropReason::Spoofed);
                }
            }
            None if local_scope(info.src) => {}
            None => return self.drop(DropReason::Spoofed),
        }
        // Proxy neighbour discovery: the gateway, and every global address
        // that is not a client's, is reached through the firewall.
        let t = nd.target;
        let ours =
            t == v6.client_gateway || (!local_scope(t) && !self.client_index6.contains_key(&t));
        if !ours {
            return self.drop(DropReason::NdIgnored);
        }
        self.neighbor_advert(buf, port, info, &nd, frame_src)
    }

    fn learn_gateway6(&mut self, mac: Mac, now: u64) {
        self.gateway6 = Some((mac, now.saturating_add(ARP_LIFETIME_MS)));
    }

    /// Turns a solicitation into the advertisement answering it.
    fn neighbor_advert(
        &mut self,
        buf: &mut [u8],
        port: usize,
        info: &Ipv6Info,
        ns: &Neighbor,
        frame_src: Mac,
    ) -> Verdict {
        let own = self.mac(port);
        let na = Neighbor {
            kind: ND_NEIGHBOR_ADVERT,
            target: ns.target,
            lladdr: Some(own),
            flags: NA_ROUTER | NA_SOLICITED | NA_OVERRIDE,
        };
        let to = ns.lladdr.unwrap_or(frame_src);
        let len = na.emit(buf, (own, to), ns.target, info.src);
        if len == 0 {
            return self.drop(DropReason::NdIgnored);
        }
        self.stats.nd_adverts += 1;
        Verdict::Forward { port, len }
    }

    /// A neighbour solicitation for the gateway, when its MAC is unknown
    /// or expired (at most one a second).
    pub(super) fn poll_nd(&mut self, now: u64, buf: &mut [u8]) -> Option<(usize, usize)> {
        let v6 = self.cfg.ip6?;
        if self.gateway6.is_some_and(|(_, exp)| exp > now)
            || self
                .gateway6_asked
                .is_some_and(|t| now.saturating_sub(t) < ARP_RETRY_MS)
        {
            return None;
        }
        self.gateway6_asked = Some(now);
        let own = self.mac(UPLINK);
        let ns = Neighbor {
            kind: ND_NEIGHBOR_SOLICIT,
            target: v6.gateway,
            lladdr: Some(own),
            flags: 0,
        };
        let group = solicited_node(v6.gateway);
        let len = ns.emit(buf, (own, multicast_mac(group)), v6.uplink_ip, group);
        self.stats.nd_solicits_sent += 1;
        (len > 0).then_some((UPLINK, len))
    }

    pub(super) fn gateway6_mac(&self, now: u64) -> Option<Mac> {
        self.gateway6
            .and_then(|(mac, exp)| (exp > now).then_some(mac))
    }

    // ---- ICMPv6 made here ------------------------------------------------

    /// Turns an echo request into the reply, back out of `port`.
    fn echo_reply6(&mut self, buf: &mut [u8], port: usize, info: &Ipv6Info) -> Verdict {
        if !l4_checksum_ok6(buf, info) {
            return self.drop(DropReason::BadL4Checksum);
        }
        let own = self.mac(port);
        swap_macs(buf, own);
        put_ip6(buf, info.l3 + 8, info.dst);
        put_ip6(buf, info.l3 + 24, info.src);
        put_u8(buf, info.l3 + 7, TTL_OWN);
        // The pseudo-header sum does not change with the swap; the type does.
        let c = update16(
            get_u16(buf, info.l4 + 2).unwrap_or(0),
            u16::from(ICMPV6_ECHO_REQUEST) << 8,
            u16::from(ICMPV6_ECHO_REPLY) << 8,
        );
        put_u8(buf, info.l4, ICMPV6_ECHO_REPLY);
        put_u16(buf, info.l4 + 2, c);
        self.stats.echo_replies += 1;
        Verdict::Forward {
            port,
            len: info.end,
        }
    }

    /// Replaces the frame by an ICMPv6 error about it, quoting as much of
    /// it as fits in the minimum MTU, sent back out of `port`.
    fn icmp6_error(
        &mut self,
        now: u64,
        buf: &mut [u8],
        port: usize,
        info: &Ipv6Info,
        err: Icmp6Error,
    ) -> Verdict {
        let Icmp6Error {
            icmp_type,
            code,
            from,
            drop,
        } = err;
        self.stats.drops[drop as usize] += 1;
        let is_error = info.proto == PROTO_ICMPV6 && info.sport < 128;
        if is_error || !self.icmp_bucket.take(now) {
            self.stats.icmp_errors_suppressed += 1;
            return Verdict::Drop(drop);
        }
        let head = IPV6_HEADER + 8;
        let quote = (info.end - info.l3).min(MIN_MTU - head);
        let body = ETH_HEADER + head;
        let total = body + quote;
        if buf.len() < total {
            return Verdict::Drop(drop);
        }
        buf.copy_within(info.l3..info.l3 + quote, body);
        let own = self.mac(port);
        swap_macs(buf, own);
        put_u16(buf, 12, ETHERTYPE_IPV6);
        put_ipv6_header(
            buf,
            ETH_HEADER,
            total - ETH_HEADER - IPV6_HEADER,
            PROTO_ICMPV6,
            TTL_OWN,
            from,
            info.src,
        );
        let l4 = ETH_HEADER + IPV6_HEADER;
        put_bytes(buf, l4, &[icmp_type, code, 0, 0, 0, 0, 0, 0]);
        set_icmpv6_checksum(buf, l4, total, from, info.src);
        self.stats.icmp_errors_sent += 1;
        Verdict::Forward { port, len: total }
    }

    // ---- From clients ----------------------------------------------------

    fn client_packet6(
        &mut self,
        now: u64,
        port: usize,
        buf: &mut [u8],
        info: &Ipv6Info,
        v6: Ipv6Config,
    ) -> Verdict {
        // A packet of a tracked flow, as for IPv4 (`client_packet`): flows
        // exist only for a connected client's traffic that passed every
        // check below, so what is left to check is the client's port and
        // MAC (anti-spoofing, through the client the flow records) and the
        // hop limit.
        let src_mac = get_mac(buf, 6).unwrap_or([0; 6]);
        let ports = (info.sport, info.dport);
        let protos = (info.proto, PROTO_ICMPV6);
        let tuple = flow_tuple(buf, protos, (info.src, info.dst), ports, info.l4);
        if let (0, true, Some(t)) = (info.frag_offset, info.hop_limit > 1, &tuple) {
            if let Some(f) = self.ct6.by_client(t, now) {
                let (clients, pinned) = (&mut self.clients, &self.pinned);
                if !bind(clients, pinned, f.owner as usize, port, src_mac) {
                    return self.drop(DropReason::Spoofed);
                }
                f.touch(now, true, info.tcp_flags);
                let out = f.outbound();
                return self.send_upstream6(now, buf, info, v6, &out);
            }
        }
        let Some(ci) = self.client_index6.get(&info.src) else {
            return self.drop(DropReason::Spoofed);
        };
        if !self.bind_client(ci, port, src_mac) {
            return self.drop(DropReason::Spoofed);
        }
        if info.dst == v6.client_gateway || info.dst == v6.uplink_ip {
            let echo = info.proto == PROTO_ICMPV6 && info.sport == u16::from(ICMPV6_ECHO_REQUEST);
            if echo && !info.fragment {
                return self.echo_reply6(buf, port, info);
            }
            return self.drop(DropReason::ToFirewall);
        }
        if self.client_index6.contains_key(&info.dst) {
            return self.drop(DropReason::ClientToClient);
        }
        if info.frag_offset != 0 {
            return self.later_fragment6(now, buf, info);
        }
        if info.hop_limit <= 1 {
            let err = Icmp6Error {
                icmp_type: ICMPV6_TIME_EXCEEDED,
                code: 0,
                from: v6.client_gateway,
                drop: DropReason::TtlExceeded,
            };
            return self.icmp6_error(now, buf, port, info, err);
        }
        let tuple = match tuple {
            Some(t) => t,
            None if info.proto == PROTO_ICMPV6 => return self.drop(DropReason::IcmpUnsupported),
            None => return self.drop(DropReason::ProtoUnsupported),
        };
        // No live flow has this tuple (looked up above): it starts one.
        if !l4_checksum_ok6(buf, info) {
            return self.drop(DropReason::BadL4Checksum);
        }
        let created = self.check_rules6(ci, info).and_then(|()| {
            self.ct6
                .create_owned(self.ct6.key(tuple), info.dst, tuple.dport, now, ci as u32)
                .map_err(DropReason::from)
        });
        let flow = match created {
            Ok(f) => {
                self.stats.flows_created += 1;
                f.outbound()
            }
            Err(DropReason::RuleReject) => {
                let err = Icmp6Error {
                    icmp_type: ICMPV6_DEST_UNREACH,
                    code: 1, // administratively prohibited
                    from: v6.client_gateway,
                    drop: DropReason::RuleReject,
                };
                return self.icmp6_error(now, buf, port, info, err);
            }
            Err(reason) => return self.drop(reason),
        };
        self.send_upstream6(now, buf, info, v6, &flow)
    }

    /// Runs client `ci`'s rules on the first packet of an IPv6 flow, as
    /// `check_rules` does for IPv4, building the probe from the parsed
    /// header (DNS rules never match IPv6: Qubes's DNS addresses are IPv4).
    #[inline(never)]
    fn check_rules6(&mut self, ci: usize, info: &Ipv6Info) -> Result<(), DropReason> {
        let tcp_udp = matches!(info.proto, PROTO_TCP | PROTO_UDP);
        let probe = Probe {
            proto: info.proto,
            dst: IpAddr::V6(info.dst),
            dport: if tcp_udp { info.dport } else { 0 },
            icmp_type: if tcp_udp { 0 } else { info.sport as u8 },
            to_dns: false,
        };
        self.check_probe(ci, &probe, false, info.tcp_flags)
    }

    /// Sends a client's packet of a flow to the IPv6 gateway, translated.
    fn send_upstream6(
        &mut self,
        now: u64,
        buf: &mut [u8],
        info: &Ipv6Info,
        v6: Ipv6Config,
        flow: &Outbound<Ipv6Addr>,
    ) -> Verdict {
        let Some(mac) = self.gateway6_mac(now) else {
            return self.drop(DropReason::NeighborUnresolved);
        };
        if info.more_fragments {
            let to = (v6.uplink_ip, flow.remote);
            if let Err(reason) = self.frags6.start(Piece::of6(info), to, None, now) {
                return self.drop(reason);
            }
        }
        let (up, remote) = (
            (v6.uplink_ip, flow.nat_port),
            (flow.remote, flow.remote_port),
        );
        rewrite6(buf, info, up, remote, flow.deltas);
        self.send_on_uplink(buf, mac, ETHERTYPE_IPV6, info.end)
    }

    // ---- From upstream ---------------------------------------------------

    fn upstream_packet6(
        &mut self,
        now: u64,
        buf: &mut [u8],
        info: &Ipv6Info,
        v6: Ipv6Config,
    ) -> Verdict {
        if info.dst != v6.uplink_ip {
            return self.drop(DropReason::NotForUs);
        }
        if info.frag_offset != 0 {
            return self.later_fragment6(now, buf, info);
        }
        let icmp_type = if info.proto == PROTO_ICMPV6 {
            info.sport as u8
        } else {
            0
        };
        let reply = match info.proto {
            // Only echo replies may come in pieces.
            PROTO_ICMPV6 if info.fragment && icmp_type != ICMPV6_ECHO_REPLY => {
                return self.drop(DropReason::Fragment)
            }
            PROTO_ICMPV6 if icmp_type == ICMPV6_ECHO_REQUEST => {
                return self.echo_reply6(buf, UPLINK, info)
            }
            PROTO_ICMPV6 if icmp_type == ICMPV6_ECHO_REPLY => Tuple {
                proto: PROTO_ICMPV6,
                src: info.src,
                sport: 0,
                dst: v6.uplink_ip,
                dport: get_u16(buf, info.l4 + 4).unwrap_or(0),
            },
            PROTO_ICMPV6
                if matches!(
                    icmp_type,
                    ICMPV6_DEST_UNREACH
                        | ICMPV6_PACKET_TOO_BIG
                        | ICMPV6_TIME_EXCEEDED
                        | ICMPV6_PARAM_PROBLEM
                ) =>
            {
                return self.icmp6_error_from_upstream(now, buf, info, v6)
            }
            PROTO_TCP | PROTO_UDP => Tuple {
                proto: info.proto,
                src: info.src,
                sport: info.sport,
                dst: v6.uplink_ip,
                dport: info.dport,
            },
            _ => return self.drop(DropReason::UpstreamUnsolicited),
        };
        let Some(flow) = self.ct6.answer(&reply, now, info.tcp_flags) else {
            return self.drop(DropReason::UpstreamUnsolicited);
        };
        if info.hop_limit <= 1 {
            return self.drop(DropReason::TtlExceeded);
        }
        let (sport, dport) = flow.ports;
        if info.more_fragments {
            let piece = Piece::of6(info);
            if let Err(reason) = self.frags6.start(
                piece,
                (flow.client_dst, flow.client_src),
                Some(flow.client_src),
                now,
            ) {
                return self.drop(reason);
            }
        }
        rewrite6(
            buf,
            info,
            (flow.client_dst, sport),
            (flow.client_src, dport),
            flow.deltas,
        );
        self.deliver(buf, Some(flow.owner as usize), info.end, ETHERTYPE_IPV6)
    }

    /// A fragment after the first: it follows the first fragment's verdict
    /// and translation, in order, or is dropped.
    fn later_fragment6(&mut self, now: u64, buf: &mut [u8], info: &Ipv6Info) -> Verdict {
        let (src, dst, to_client) = match self.frags6.next(Piece::of6(info), now) {
            Ok(t) => t,
            Err(reason) => return self.drop(reason),
        };
        if info.hop_limit <= 1 {
            return self.drop(DropReason::TtlExceeded);
        }
        // No transport header here: addresses and hop limit only.
        put_u8(buf, info.l3 + 7, info.hop_limit - 1);
        put_ip6(buf, info.l3 + 8, src);
        put_ip6(buf, info.l3 + 24, dst);
        match to_client {
            Some(client) => {
                let ci = self.client_index6.get(&client);
                self.deliver(buf, ci, info.end, ETHERTYPE_IPV6)
            }
            None => match self.gateway6_mac(now) {
                Some(mac) => self.send_on_uplink(buf, mac, ETHERTYPE_IPV6, info.end),
                None => self.drop(DropReason::NeighborUnresolved),
            },
        }
    }

    /// An ICMPv6 error from upstream quoting a packet we translated: the
    /// quoted packet and the outer destination are translated back.
    fn icmp6_error_from_upstream(
        &mut self,
        now: u64,
        buf: &mut [u8],
        info: &Ipv6Info,
        v6: Ipv6Config,
    ) -> Verdict {
        if !l4_checksum_ok6(buf, info) {
            return self.drop(DropReason::BadL4Checksum);
        }
        // The quoted packet: a fixed header straight followed by TCP, UDP
        // or an ICMPv6 echo (we send nothing else), at least 8 bytes of it.
        let inner = info.l4 + 8;
        let il4 = inner + IPV6_HEADER;
        if il4 + 8 > info.end {
            return self.drop(DropReason::BadL4Header);
        }
        let (Some(proto), Some(isrc), Some(idst)) = (
            get_u8(buf, inner + 6),
            get_ip6(buf, inner + 8),
            get_ip6(buf, inner + 24),
        ) else {
            return self.drop(DropReason::BadL4Header);
        };
        if isrc != v6.uplink_ip {
            return self.drop(DropReason::UpstreamUnsolicited);
        }
        let [a, b, id] = [0, 2, 4].map(|o| get_u16(buf, il4 + o).unwrap_or(0));
        let reply = quoted_reply(proto, (isrc, idst), [a, b, id]);
        let Some(flow) = reply.and_then(|r| self.ct6.by_reply(&r, now).copied()) else {
            return self.drop(DropReason::UpstreamUnsolicited);
        };
        if info.hop_limit <= 1 {
            return self.drop(DropReason::TtlExceeded);
        }
        let c = flow.client;
        // Inner packet: source back to the client, destination back to
        // what the client addressed; its checksum is kept right when it
        // was quoted.
        put_ip6(buf, inner + 8, c.src);
        put_ip6(buf, inner + 24, c.dst);
        let addresses = ChecksumDelta::default().ipv6(isrc, c.src).ipv6(idst, c.dst);
        let (delta, sum_at) = match proto {
            PROTO_TCP | PROTO_UDP => {
                put_u16(buf, il4, c.sport);
                put_u16(buf, il4 + 2, c.dport);
                let at = if proto == PROTO_TCP { 16 } else { 6 };
                (addresses.word(a, c.sport).word(b, c.dport), il4 + at)
            }
            _ => {
                put_u16(buf, il4 + 4, c.sport);
                (addresses.word(id, c.sport), il4 + 2)
            }
        };
        if sum_at + 2 <= info.end {
            if let Some(old) = get_u16(buf, sum_at) {
                put_u16(buf, sum_at, delta.apply(old));
            }
        }
        // Outer: to the client, hop limit decremented, ICMPv6 checksum
        // recomputed over the whole message, which is in the frame.
        put_ip6(buf, info.l3 + 24, c.src);
        put_u8(buf, info.l3 + 7, info.hop_limit - 1);
        set_icmpv6_checksum(buf, info.l4, info.end, info.src, c.src);
        self.deliver(buf, Some(flow.owner as usize), info.end, ETHERTYPE_IPV6)
    }
}

/// Rewrites addresses and ports (for ICMPv6 echo: `sport` is the
/// identifier) of a flow's packet with an incremental checksum update by
/// the flow's `deltas` (every IPv6 upper-layer checksum covers the
/// addresses), and decrements the hop limit.
pub(super) fn rewrite6(
    buf: &mut [u8],
    info: &Ipv6Info,
    (src, sport): (Ipv6Addr, u16),
    (dst, dport): (Ipv6Addr, u16),
    deltas: (ChecksumDelta, ChecksumDelta),
) {
    put_u8(buf, info.l3 + 7, info.hop_limit.saturating_sub(1));
    put_ip6(buf, info.l3 + 8, src);
    put_ip6(buf, info.l3 + 24, dst);
    rewrite_l4(buf, info.l4, info.proto, deltas, sport, dport);
}

#[cfg(test)]
mod tests;
