//! The fast path: a TCP or UDP packet of a tracked flow, in the common
//! shape, forwarded by one straight-line function; and `Batch`, the entry
//! for a NIC's batch of frames, which compiles it into the caller's loop.
//!
//! `Firewall::handle` and `Batch::handle` try it first. It takes only what
//! the general path would forward with nothing more to decide: a unicast
//! frame for the port's MAC; an IPv4 TCP or UDP datagram with no options,
//! not fragmented, its lengths and header checksum right (`plain_ipv4`:
//! from 42 bytes for UDP, 54 for TCP), TTL above 1 — or an IPv6 TCP or
//! UDP datagram without a Fragment header, parsed by the general
//! `parse_ipv6`, hop limit above 1, no multicast or local-scope address;
//! a live flow; from a client, the port and MAC the client is bound to
//! and a known next-hop MAC; upstream, a reply to the uplink address for
//! a client bound to a port. It then does what the general path does with
//! such a packet: the flow's state and expiry (`Flow::touch`), the
//! translation (`rewrite`, `rewrite6`), the Ethernet addresses and the
//! counters (and `Stats::fast_path`). Anything else it hands on having
//! changed nothing, and the general path takes the frame up where the
//! fast path left it (`after_fast`, `ipv6_parsed`).
//!
//! What it saves is plumbing: the parsed header stays in registers
//! instead of an `Ipv4Info` passed between functions, there are no
//! general-case branches, and in a batch no per-frame call at all.
//! Instructions per established-flow packet on the development machine
//! (callgrind, `examples/established.rs`, each with the 60-byte copy of
//! the example's loop): 516 with the fast path off, 426 through `handle`,
//! 328 through a batch of 32 (478 before the fast path, whose own lookup
//! hashes a tuple in a way that costs the general path more instructions
//! but no store-forwarding stall: `Addr::hash_tuple`); for IPv6
//! (`examples/established6.rs`) 692 with it off, 612 through `handle`.
//! The tests `fast_path_agrees_with_the_general_one` (IPv4) and
//! `fast_path_agrees_with_the_general_one_for_ipv6`, and the pipeline
//! fuzz target, feed the same frames, valid and corrupted, to a firewall
//! with the fast path and one without, and compare every verdict, output
//! byte and counter.

use super::*;
use crate::config::Ipv6Config;
use crate::conntrack::{Inbound, Peek};
use crate::ipv6::{parse_ipv6, Ipv6Info};

/// Frames received on one port at one time — a NIC's receive batch —
/// handled one after the other: `Firewall::batch`, then `handle` for each
/// frame. The same verdicts, output and counters as `Firewall::handle` on
/// each frame; what is looked up once per batch (the port's MAC, whether
/// the fast path is on) is not looked up again, and the fast path is
/// compiled into the caller's loop.
pub struct Batch<'a> {
    fw: &'a mut Firewall,
    now: u64,
    port: usize,
    /// The port's MAC (`mac_bits`), or `None` when the fast path takes no
    /// frame of this port: turned off, forward-only mode, no such port, or
    /// a multicast MAC (whose frames `handle` drops).
    own: Option<u64>,
}

impl Firewall {
    /// Starts a batch of frames received on `port` at `now`.
    #[inline(always)]
    pub fn batch(&mut self, now: u64, port: usize) -> Batch<'_> {
        let own = match self.macs.get(port) {
            Some(m) if self.fast_path && !self.forward_only && m[0] & 1 == 0 => Some(mac_bits(m)),
            _ => None,
        };
        Batch {
            fw: self,
            now,
            port,
            own,
        }
    }
}

impl Batch<'_> {
    /// `Firewall::handle` for the batch's next frame.
    #[inline(always)]
    pub fn handle(&mut self, buf: &mut [u8], len: usize) -> Verdict {
        match self.own {
            Some(own) => self.fw.fast_ipv4(self.now, self.port, own, buf, len),
            None => self.fw.handle_general(self.now, self.port, buf, len),
        }
    }
}

/// How far the fast path got with a frame it leaves to the general path,
/// once past the parse (before it, it calls `handle_general`, which takes
/// the frame from the start). Only these go through memory: a forwarded
/// frame's verdict is returned directly, since moving a larger enum
/// holding it costs a store-forwarding stall per frame.
enum Fast {
    /// Parsed it (an IPv4 datagram of the common shape, addressed to this
    /// port's MAC) and left the rest to the general path.
    Parsed(Ipv4Info),
    /// Parsed a client's datagram with TTL above 1 and found no flow for
    /// its tuple, live or expired: it may start one.
    NoFlow(Ipv4Info, Key),
}

impl Firewall {
    /// The general path for a frame the fast path parsed but did not
    /// forward, taken up where the fast path left it. Each case joins the
    /// general path where it would be with the same frame: `handle_general`
    /// checks the size, the MAC and the ethertype, parses (`plain_ipv4`
    /// gives what `parse_ipv4` gives) and calls `upstream_packet` or
    /// `client_packet`, which calls `client_packet_slow` when the TTL is
    /// above 1 and no live flow has the tuple (an expired one it removes
    /// first).
    #[inline(never)]
    fn after_fast(&mut self, now: u64, port: usize, buf: &mut [u8], fast: &Fast) -> Verdict {
        match fast {
            Fast::Parsed(info) if port == UPLINK => self.upstream_packet(now, buf, info),
            Fast::Parsed(info) => self.client_packet(now, port, buf, info),
            Fast::NoFlow(info, key) => {
                let src_mac = get_mac(buf, 6).unwrap_or([0; 6]);
                self.client_packet_slow(now, port, buf, info, Some(*key), src_mac)
            }
        }
    }

    /// The fast path (see the module's text), which hands what it does not
    /// forward to `handle_general` or, once parsed, to `after_fast`. `own`
    /// is the port's MAC as `mac_bits`, unicast. Changes nothing unless it
    /// forwards the frame.
    #[inline(always)]
    fn fast_ipv4(
        &mut self,
        now: u64,
        port: usize,
        own: u64,
        buf: &mut [u8],
        len: usize,
    ) -> Verdict {
        if len > MAX_FRAME {
            return self.handle_general(now, port, buf, len);
        }
        let Some(frame) = buf.get(..len) else {
            return self.handle_general(now, port, buf, len);
        };
        let Some(&[d0, d1, d2, d3, d4, d5, s0, s1, s2, s3, s4, s5, t0, t1]) = frame.first_chunk()
        else {
            return self.handle_general(now, port, buf, len);
        };
        if mac_bits(&[d0, d1, d2, d3, d4, d5]) != own {
            return self.handle_general(now, port, buf, len);
        }
        if [t0, t1] == ETHERTYPE_IPV6.to_be_bytes() {
            return match (self.cfg.ip6, parse_ipv6(frame)) {
                (Some(v6), Ok(info)) => {
                    self.fast_ipv6(now, port, [s0, s1, s2, s3, s4, s5], buf, &info, v6)
                }
                _ => self.handle_general(now, port, buf, len),
            };
        }
        if [t0, t1] != ETHERTYPE_IPV4.to_be_bytes() {
            return self.handle_general(now, port, buf, len);
        }
        let Some(info) = plain_ipv4(frame) else {
            return self.handle_general(now, port, buf, len);
        };
        let done = if info.ttl <= 1 {
            None
        } else if port == UPLINK {
            self.fast_reply(now, buf, &info)
        } else {
            let src_mac = [s0, s1, s2, s3, s4, s5];
            match self.fast_client(now, port, src_mac, buf, &info) {
                Ok(v) => v,
                Err(key) => return self.after_fast(now, port, buf, &Fast::NoFlow(info, key)),
            }
        };
        match done {
            Some(v) => v,
            None => self.after_fast(now, port, buf, &Fast::Parsed(info)),
        }
    }

    /// A client's packet of a flow (`client_packet`'s fast case): the
    /// verdict, `None` for the general path, or the tuple (with its hash)
    /// when no flow has it.
    #[inline(always)]
    fn fast_client(
        &mut self,
        now: u64,
        port: usize,
        src_mac: Mac,
        buf: &mut [u8],
        info: &Ipv4Info,
    ) -> Result<Option<Verdict>, Key> {
        let t = Tuple {
            proto: info.proto,
            src: info.src,
            sport: info.sport,
            dst: info.dst,
            dport: info.dport,
        };
        let flow = match self.ct.peek_client(&t, now) {
            Peek::Live(f) => f,
            Peek::Expired => return Ok(None),
            Peek::Absent(key) => return Err(key),
        };
        if !bound(&self.clients, flow.owner as usize, port, src_mac) {
            return Ok(None);
        }
        let hop = if self.cfg.on_uplink_subnet(flow.remote) {
            flow.remote
        } else {
            self.cfg.gateway
        };
        let Some(mac) = arp_find(&self.arp, hop, now) else {
            return Ok(None);
        };
        flow.touch(now, true, info.tcp_flags);
        let out = flow.outbound();
        rewrite(
            buf,
            info,
            (self.cfg.uplink_ip, out.nat_port),
            (out.remote, out.remote_port),
            out.deltas,
        );
        Ok(Some(self.fast_send(
            buf,
            (UPLINK, mac),
            (ETHERTYPE_IPV4, true),
            info.end,
        )))
    }

    /// A reply from upstream of a flow (`upstream_packet`'s TCP and UDP
    /// case).
    #[inline(always)]
    fn fast_reply(&mut self, now: u64, buf: &mut [u8], info: &Ipv4Info) -> Option<Verdict> {
        // (A DNS answer to the resolver never gets past the lookup: its
        // port is below the NAT ports, which flows use.)
        let uplink = self.cfg.uplink_ip;
        if info.dst != uplink {
            return None;
        }
        let t = Tuple {
            proto: info.proto,
            src: info.src,
            sport: info.sport,
            dst: uplink,
            dport: info.dport,
        };
        let (back, to) = answer(&mut self.ct, &self.clients, &t, now, info.tcp_flags)?;
        let (sport, dport) = back.ports;
        rewrite(
            buf,
            info,
            (back.client_dst, sport),
            (back.client_src, dport),
            back.deltas,
        );
        Some(self.fast_send(buf, to, (ETHERTYPE_IPV4, false), info.end))
    }
}

impl Firewall {
    /// The fast path for IPv6, as for IPv4: a TCP or UDP datagram of a
    /// tracked flow, whole (no Fragment header), its hop limit above 1,
    /// neither address multicast or local in scope. `info` is the frame's
    /// general parse (`parse_ipv6`, extension headers walked); the frame is
    /// at most `MAX_FRAME` and for the port's unicast MAC, and IPv6 is on
    /// (`v6`). What it does not forward goes to the general path as parsed
    /// (`ipv6_parsed`).
    #[inline(never)]
    fn fast_ipv6(
        &mut self,
        now: u64,
        port: usize,
        src_mac: Mac,
        buf: &mut [u8],
        info: &Ipv6Info,
        v6: Ipv6Config,
    ) -> Verdict {
        let plain = matches!(info.proto, PROTO_TCP | PROTO_UDP)
            && !info.fragment
            && info.hop_limit > 1
            && !info.dst.is_multicast()
            && !v6::local_scope(info.src)
            && !v6::local_scope(info.dst);
        let done = match (plain, port == UPLINK) {
            (false, _) => None,
            (true, true) => self.fast_reply6(now, buf, info, v6),
            (true, false) => self.fast_client6(now, port, src_mac, buf, info, v6),
        };
        match done {
            Some(v) => v,
            None => self.ipv6_parsed(now, port, buf, info, v6),
        }
    }

    /// A client's IPv6 packet of a flow (`client_packet6`'s first case).
    #[inline(always)]
    fn fast_client6(
        &mut self,
        now: u64,
        port: usize,
        src_mac: Mac,
        buf: &mut [u8],
        info: &Ipv6Info,
        v6: Ipv6Config,
    ) -> Option<Verdict> {
        let t = Tuple {
            proto: info.proto,
            src: info.src,
            sport: info.sport,
            dst: info.dst,
            dport: info.dport,
        };
        let mac = self.gateway6_mac(now)?;
        let Peek::Live(flow) = self.ct6.peek_client(&t, now) else {
            return None;
        };
        if !bound(&self.clients, flow.owner as usize, port, src_mac) {
            return None;
        }
        flow.touch(now, true, info.tcp_flags);
        let out = flow.outbound();
        v6::rewrite6(
            buf,
            info,
            (v6.uplink_ip, out.nat_port),
            (out.remote, out.remote_port),
            out.deltas,
        );
        Some(self.fast_send(buf, (UPLINK, mac), (ETHERTYPE_IPV6, true), info.end))
    }

    /// A reply from upstream of an IPv6 flow (`upstream_packet6`'s TCP and
    /// UDP case).
    #[inline(always)]
    fn fast_reply6(
        &mut self,
        now: u64,
        buf: &mut [u8],
        info: &Ipv6Info,
        v6: Ipv6Config,
    ) -> Option<Verdict> {
        if info.dst != v6.uplink_ip {
            return None;
        }
        let t = Tuple {
            proto: info.proto,
            src: info.src,
            sport: info.sport,
            dst: v6.uplink_ip,
            dport: info.dport,
        };
        let (back, to) = answer(&mut self.ct6, &self.clients, &t, now, info.tcp_flags)?;
        let (sport, dport) = back.ports;
        v6::rewrite6(
            buf,
            info,
            (back.client_dst, sport),
            (back.client_src, dport),
            back.deltas,
        );
        Some(self.fast_send(buf, to, (ETHERTYPE_IPV6, false), info.end))
    }
}

impl Firewall {
    /// The end of the fast path: the Ethernet header for `mac`, from
    /// `port`'s own MAC, the counters (`upstream`: a client's packet on
    /// its way out), the verdict.
    #[inline(always)]
    fn fast_send(
        &mut self,
        buf: &mut [u8],
        (port, mac): (usize, Mac),
        (ethertype, upstream): (u16, bool),
        len: usize,
    ) -> Verdict {
        put_eth(buf, mac, self.mac(port), ethertype);
        if upstream {
            self.stats.to_upstream += 1;
        } else {
            self.stats.to_clients += 1;
        }
        self.stats.fast_path += 1;
        Verdict::Forward { port, len }
    }
}

/// A reply's live flow in `ct`, for a client bound to a port: the flow
/// updated for it, its translation back, and the client's (port, MAC).
/// `None`, with nothing changed, otherwise.
#[inline(always)]
fn answer<A: Addr>(
    ct: &mut Conntrack<A>,
    clients: &[Client],
    t: &Tuple<A>,
    now: u64,
    tcp_flags: u8,
) -> Option<(Inbound<A>, (usize, Mac))> {
    let flow = ct.peek_reply(t, now)?;
    let c = clients.get(flow.owner as usize)?;
    let to = (c.port?, c.mac?);
    flow.touch(now, false, tcp_flags);
    Some((flow.inbound(), to))
}

/// A MAC as a number, for comparing in one instruction.
#[inline(always)]
fn mac_bits(m: &Mac) -> u64 {
    u64::from_le_bytes([m[0], m[1], m[2], m[3], m[4], m[5], 0, 0])
}
