//! IPv6 wire format: the fixed header, extension headers walked with
//! bounds, the transport header behind them, ICMPv6 checksums and the
//! neighbour discovery messages the firewall answers and sends (RFC 8200,
//! RFC 4443, RFC 4861).
//!
//! As for IPv4, `parse_ipv6` validates a frame once and returns offsets
//! that stay in bounds; every access still goes through the checked
//! helpers of `wire`. Nothing here panics on input.

use core::net::Ipv6Addr;

use crate::wire::{
    fold, get_mac, get_u16, get_u32, get_u8, put_bytes, put_eth, put_u16, put_u8, sum16, transport,
    Mac, Malformed, ETHERTYPE_IPV6, ETH_HEADER, PROTO_TCP, PROTO_UDP,
};

pub const IPV6_HEADER: usize = 40;
pub const PROTO_ICMPV6: u8 = 58;
pub const NEXT_HOP_BY_HOP: u8 = 0;
pub const NEXT_ROUTING: u8 = 43;
pub const NEXT_FRAGMENT: u8 = 44;
pub const NEXT_DEST_OPTS: u8 = 60;
/// Extension headers walked at most; a packet with more is refused.
pub const MAX_EXT_HEADERS: usize = 8;

pub const ICMPV6_DEST_UNREACH: u8 = 1;
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;
pub const ICMPV6_TIME_EXCEEDED: u8 = 3;
pub const ICMPV6_PARAM_PROBLEM: u8 = 4;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_ECHO_REPLY: u8 = 129;
pub const ND_ROUTER_SOLICIT: u8 = 133;
pub const ND_ROUTER_ADVERT: u8 = 134;
pub const ND_NEIGHBOR_SOLICIT: u8 = 135;
pub const ND_NEIGHBOR_ADVERT: u8 = 136;
pub const ND_REDIRECT: u8 = 137;
/// Neighbour discovery messages are sent with, and only accepted with,
/// this hop limit (so they cannot come from off the link).
pub const ND_HOP_LIMIT: u8 = 255;
/// Length of a neighbour solicitation or advertisement with one
/// link-layer address option, from the ICMPv6 header on.
pub const ND_LEN: usize = 32;
/// NA flags: router, solicited, override.
pub const NA_ROUTER: u8 = 0x80;
pub const NA_SOLICITED: u8 = 0x40;
pub const NA_OVERRIDE: u8 = 0x20;
const OPT_SOURCE_LLADDR: u8 = 1;
const OPT_TARGET_LLADDR: u8 = 2;
/// The IPv6 minimum MTU: ICMPv6 errors are at most this long (RFC 4443).
pub const MIN_MTU: usize = 1280;

/// What the rest of the stage needs to know about a valid IPv6 packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Info {
    /// Offset of the IPv6 header (after Ethernet).
    pub l3: usize,
    /// Offset of the upper-layer header, after any extension headers.
    pub l4: usize,
    /// End of the packet (frames may carry padding after it).
    pub end: usize,
    /// The upper-layer protocol (the last "next header").
    pub proto: u8,
    pub hop_limit: u8,
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    /// A Fragment header says this is part of a larger datagram.
    pub fragment: bool,
    /// For a fragment: its data's offset in the datagram (bytes), whether
    /// more follow, the datagram's identification, and where the
    /// fragmentable part starts in the frame (after the Fragment header).
    pub frag_offset: usize,
    pub more_fragments: bool,
    pub frag_id: u32,
    pub frag_data: usize,
    /// TCP/UDP ports, or ICMPv6 (type, code) in `sport`/`dport`.
    pub sport: u16,
    pub dport: u16,
    /// TCP flags, 0 for other protocols.
    pub tcp_flags: u8,
}

pub fn get_ip6(b: &[u8], off: usize) -> Option<Ipv6Addr> {
    let a: [u8; 16] = b.get(off..off + 16)?.try_into().ok()?;
    Some(Ipv6Addr::from(a))
}

pub fn put_ip6(b: &mut [u8], off: usize, ip: Ipv6Addr) -> bool {
    put_bytes(b, off, &ip.octets())
}

/// Validates the IPv6 packet of `frame` (Ethernet type already checked):
/// version, payload length, the chain of extension headers (hop-by-hop
/// only first, at most `MAX_EXT_HEADERS`, each inside the packet), and for
/// TCP/UDP/ICMPv6 the upper-layer header. Fragments after the first carry
/// no upper-layer header and come back with `fragment` set and no ports.
/// The upper-layer checksum is checked separately (`l4_checksum_ok6`).
pub fn parse_ipv6(frame: &[u8]) -> Result<Ipv6Info, Malformed> {
    let l3 = ETH_HEADER;
    let h: &[u8; IPV6_HEADER] = frame
        .get(l3..l3 + IPV6_HEADER)
        .and_then(|s| s.try_into().ok())
        .ok_or(Malformed::Ipv6Header)?;
    if h[0] >> 4 != 6 {
        return Err(Malformed::Ipv6Header);
    }
    let payload = usize::from(u16::from_be_bytes([h[4], h[5]]));
    let end = l3 + IPV6_HEADER + payload;
    // A zero payload length announces a jumbogram, which needs a
    // hop-by-hop option and links far larger than ours.
    if payload == 0 || end > frame.len() {
        return Err(Malformed::Ipv6Length);
    }
    let mut info = Ipv6Info {
        l3,
        l4: l3 + IPV6_HEADER,
        end,
        proto: h[6],
        hop_limit: h[7],
        src: get_ip6(h, 8).ok_or(Malformed::Ipv6Header)?,
        dst: get_ip6(h, 24).ok_or(Malformed::Ipv6Header)?,
        fragment: false,
        frag_offset: 0,
        more_fragments: false,
        frag_id: 0,
        frag_data: 0,
        sport: 0,
        dport: 0,
        tcp_flags: 0,
    };
    let pkt = frame.get(..end).ok_or(Malformed::Ipv6Length)?;
    let mut walked = 0;
    loop {
        let off = info.l4;
        let len = match info.proto {
            NEXT_HOP_BY_HOP if walked > 0 => return Err(Malformed::Ipv6ExtHeader),
            NEXT_HOP_BY_HOP | NEXT_ROUTING | NEXT_DEST_OPTS => {
                (usize::from(get_u8(pkt, off + 1).ok_or(Malformed::Ipv6ExtHeader)?) + 1) * 8
            }
            NEXT_FRAGMENT => {
                if info.frag_data != 0 {
                    return Err(Malformed::Ipv6ExtHeader); // two Fragment headers
                }
                let f = get_u16(pkt, off + 2).ok_or(Malformed::Ipv6ExtHeader)?;
                let (offset, more) = (f & 0xfff8, f & 1 != 0);
                // An atomic fragment (offset 0, no more) is a whole datagram.
                info.fragment = offset != 0 || more;
                info.frag_offset = usize::from(offset);
                info.more_fragments = more;
                info.frag_id = get_u32(pkt, off + 4).ok_or(Malformed::Ipv6ExtHeader)?;
                info.frag_data = off + 8;
                if offset != 0 {
                    info.proto = get_u8(pkt, off).ok_or(Malformed::Ipv6ExtHeader)?;
                    info.l4 = off + 8;
                    if info.l4 > end {
                        return Err(Malformed::Ipv6ExtHeader);
                    }
                    return Ok(info);
                }
                8
            }
            _ => break,
        };
        walked += 1;
        if walked > MAX_EXT_HEADERS || off + len > end {
            return Err(Malformed::Ipv6ExtHeader);
        }
        info.proto = get_u8(pkt, off).ok_or(Malformed::Ipv6ExtHeader)?;
        info.l4 = off + len;
    }
    let seg = pkt.get(info.l4..).ok_or(Malformed::L4Header)?;
    (info.sport, info.dport, info.tcp_flags) =
        transport(seg, info.proto, PROTO_ICMPV6, info.fragment)?;
    Ok(info)
}

/// The pseudo-header sum for an upper-layer checksum over IPv6.
pub fn pseudo_header_sum6(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, len: usize) -> u32 {
    let mut ph = [0u8; 40];
    ph[0..16].copy_from_slice(&src.octets());
    ph[16..32].copy_from_slice(&dst.octets());
    ph[32..36].copy_from_slice(&(len as u32).to_be_bytes());
    ph[39] = proto;
    sum16(&ph, 0)
}

/// Whether the upper-layer checksum of a whole TCP, UDP or ICMPv6 packet
/// is right (in IPv6 every one of them covers the pseudo-header, and a
/// UDP checksum of 0 is not allowed). Fragments and other protocols pass.
pub fn l4_checksum_ok6(frame: &[u8], info: &Ipv6Info) -> bool {
    if info.fragment {
        return true;
    }
    let Some(seg) = frame.get(info.l4..info.end) else {
        return false;
    };
    match info.proto {
        PROTO_UDP if get_u16(seg, 6) == Some(0) => false,
        PROTO_TCP | PROTO_UDP | PROTO_ICMPV6 => {
            fold(sum16(
                seg,
                pseudo_header_sum6(info.src, info.dst, info.proto, seg.len()),
            )) == 0
        }
        _ => true,
    }
}

/// Writes the ICMPv6 checksum of the message at `info.l4..info.end`.
pub fn set_icmpv6_checksum(buf: &mut [u8], l4: usize, end: usize, src: Ipv6Addr, dst: Ipv6Addr) {
    put_u16(buf, l4 + 2, 0);
    let sum = match buf.get(l4..end) {
        Some(seg) => fold(sum16(
            seg,
            pseudo_header_sum6(src, dst, PROTO_ICMPV6, seg.len()),
        )),
        None => return,
    };
    put_u16(buf, l4 + 2, sum);
}

/// Writes a 40-byte IPv6 header (traffic class and flow label 0).
pub fn put_ipv6_header(
    buf: &mut [u8],
    off: usize,
    payload: usize,
    next: u8,
    hop_limit: u8,
    src: Ipv6Addr,
    dst: Ipv6Addr,
) -> bool {
    put_bytes(buf, off, &[0x60, 0, 0, 0])
        && put_u16(buf, off + 4, payload as u16)
        && put_u8(buf, off + 6, next)
        && put_u8(buf, off + 7, hop_limit)
        && put_ip6(buf, off + 8, src)
        && put_ip6(buf, off + 24, dst)
}

/// A neighbour solicitation or advertisement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Neighbor {
    /// `ND_NEIGHBOR_SOLICIT` or `ND_NEIGHBOR_ADVERT`.
    pub kind: u8,
    pub target: Ipv6Addr,
    /// The link-layer address option: the sender's (NS) or the target's (NA).
    pub lladdr: Option<Mac>,
    /// NA flags (router, solicited, override); 0 for NS.
    pub flags: u8,
}

impl Neighbor {
    /// Validates an NS or NA as RFC 4861 (7.1) asks of a receiver: hop
    /// limit 255, code 0, at least 24 bytes, a target that is not
    /// multicast, options of non-zero length inside the message. The
    /// ICMPv6 checksum is the caller's (`l4_checksum_ok6`).
    pub fn parse(frame: &[u8], info: &Ipv6Info) -> Result<Self, Malformed> {
        let msg = frame.get(info.l4..info.end).ok_or(Malformed::Nd)?;
        let kind = get_u8(msg, 0).ok_or(Malformed::Nd)?;
        if !matches!(kind, ND_NEIGHBOR_SOLICIT | ND_NEIGHBOR_ADVERT)
            || get_u8(msg, 1) != Some(0)
            || info.hop_limit != ND_HOP_LIMIT
            || info.fragment
            || msg.len() < 24
        {
            return Err(Malformed::Nd);
        }
        let target = get_ip6(msg, 8).ok_or(Malformed::Nd)?;
        if target.is_multicast() {
            return Err(Malformed::Nd);
        }
        let want = if kind == ND_NEIGHBOR_SOLICIT {
            OPT_SOURCE_LLADDR
        } else {
            OPT_TARGET_LLADDR
        };
        let mut lladdr = None;
        let mut off = 24;
        while off < msg.len() {
            let ty = get_u8(msg, off).ok_or(Malformed::Nd)?;
            let len = usize::from(get_u8(msg, off + 1).ok_or(Malformed::Nd)?) * 8;
            if len == 0 || off + len > msg.len() {
                return Err(Malformed::Nd);
            }
            if ty == want && len == 8 {
                lladdr = get_mac(msg, off + 2);
            }
            off += len;
        }
        Ok(Self {
            kind,
            target,
            lladdr,
            flags: if kind == ND_NEIGHBOR_ADVERT {
                get_u8(msg, 4).unwrap_or(0) & 0xe0
            } else {
                0
            },
        })
    }

    /// Writes Ethernet + IPv6 + this message with its link-layer option
    /// (`lladdr` must be set) into `buf`; returns the frame length, 0 when
    /// `buf` is too small.
    pub fn emit(&self, buf: &mut [u8], eth: (Mac, Mac), src: Ipv6Addr, dst: Ipv6Addr) -> usize {
        let (eth_src, eth_dst) = eth;
        let l4 = ETH_HEADER + IPV6_HEADER;
        let len = l4 + ND_LEN;
        let Some(mac) = self.lladdr else {
            return 0;
        };
        if buf.len() < len {
            return 0;
        }
        put_eth(buf, eth_dst, eth_src, ETHERTYPE_IPV6);
        put_ipv6_header(
            buf,
            ETH_HEADER,
            ND_LEN,
            PROTO_ICMPV6,
            ND_HOP_LIMIT,
            src,
            dst,
        );
        put_bytes(buf, l4, &[self.kind, 0, 0, 0, self.flags, 0, 0, 0]);
        put_ip6(buf, l4 + 8, self.target);
        let opt = if self.kind == ND_NEIGHBOR_SOLICIT {
            OPT_SOURCE_LLADDR
        } else {
            OPT_TARGET_LLADDR
        };
        put_bytes(buf, l4 + 24, &[opt, 1]);
        put_bytes(buf, l4 + 26, &mac);
        set_icmpv6_checksum(buf, l4, len, src, dst);
        len
    }
}

/// The solicited-node multicast address of `ip` (ff02::1:ffXX:XXXX).
pub fn solicited_node(ip: Ipv6Addr) -> Ipv6Addr {
    let o = ip.octets();
    Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(o[13]),
        u16::from_be_bytes([o[14], o[15]]),
    )
}

/// The Ethernet address IPv6 multicast `ip` is sent to (33:33 + low 32 bits).
pub fn multicast_mac(ip: Ipv6Addr) -> Mac {
    let o = ip.octets();
    [0x33, 0x33, o[12], o[13], o[14], o[15]]
}

/// Whether `mac` is an IPv6 multicast Ethernet address.
pub fn is_ipv6_multicast_mac(mac: &Mac) -> bool {
    mac[0] == 0x33 && mac[1] == 0x33
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::ETHERTYPE_IPV6;

    const SRC: Ipv6Addr = Ipv6Addr::new(0xfd09, 0x24ef, 0x4179, 0, 0, 0, 0xa89, 0x7);
    const DST: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x80);

    /// Ethernet + IPv6 + `ext` (already chained to `proto`) + a UDP header
    /// with `payload` bytes, checksum filled in.
    fn udp6(ext: &[u8], first_next: u8, payload: usize) -> Vec<u8> {
        let udp_len = 8 + payload;
        let mut f = vec![0u8; ETH_HEADER + IPV6_HEADER + ext.len() + udp_len];
        put_eth(&mut f, [2; 6], [4; 6], ETHERTYPE_IPV6);
        put_ipv6_header(
            &mut f,
            ETH_HEADER,
            ext.len() + udp_len,
            first_next,
            64,
            SRC,
            DST,
        );
        let l4 = ETH_HEADER + IPV6_HEADER + ext.len();
        put_bytes(&mut f, ETH_HEADER + IPV6_HEADER, ext);
        put_u16(&mut f, l4, 40000);
        put_u16(&mut f, l4 + 2, 53);
        put_u16(&mut f, l4 + 4, udp_len as u16);
        let c = fold(sum16(
            &f[l4..],
            pseudo_header_sum6(SRC, DST, PROTO_UDP, udp_len),
        ));
        put_u16(&mut f, l4 + 6, c);
        f
    }

    #[test]
    fn parses_plain_and_extension_headers() {
        let f = udp6(&[], PROTO_UDP, 4);
        let i = parse_ipv6(&f).unwrap();
        assert_eq!(
            (i.proto, i.sport, i.dport, i.l4),
            (PROTO_UDP, 40000, 53, 54)
        );
        assert_eq!((i.src, i.dst, i.hop_limit), (SRC, DST, 64));
        assert!(l4_checksum_ok6(&f, &i));
        // Hop-by-hop (8 bytes of PadN) then destination options, then UDP.
        let ext = [
            NEXT_DEST_OPTS,
            0,
            1,
            4,
            0,
            0,
            0,
            0, // hop-by-hop
            PROTO_UDP,
            0,
            1,
            4,
            0,
            0,
            0,
            0, // destination options
        ];
        let f = udp6(&ext, NEXT_HOP_BY_HOP, 4);
        let i = parse_ipv6(&f).unwrap();
        assert_eq!((i.proto, i.l4, i.dport), (PROTO_UDP, 70, 53));
        assert!(l4_checksum_ok6(&f, &i));
        // An atomic fragment header is a whole datagram.
        let f = udp6(&[PROTO_UDP, 0, 0, 0, 0, 0, 0, 1], NEXT_FRAGMENT, 4);
        let i = parse_ipv6(&f).unwrap();
        assert!(!i.fragment && i.dport == 53);
        // A first fragment (more set) is parsed to its ports, marked.
        let f = udp6(&[PROTO_UDP, 0, 0, 1, 0, 0, 0, 1], NEXT_FRAGMENT, 4);
        assert!(parse_ipv6(&f).unwrap().fragment);
    }

    #[test]
    fn refuses_bad_chains_and_lengths() {
        // Hop-by-hop anywhere but first.
        let ext = [
            NEXT_HOP_BY_HOP,
            0,
            1,
            4,
            0,
            0,
            0,
            0,
            PROTO_UDP,
            0,
            1,
            4,
            0,
            0,
            0,
            0,
        ];
        let f = udp6(&ext, NEXT_DEST_OPTS, 4);
        assert_eq!(parse_ipv6(&f), Err(Malformed::Ipv6ExtHeader));
        // Too many extension headers.
        let mut ext = Vec::new();
        for i in 0..=MAX_EXT_HEADERS {
            let next = if i == MAX_EXT_HEADERS {
                PROTO_UDP
            } else {
                NEXT_DEST_OPTS
            };
            ext.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
        }
        let f = udp6(&ext, NEXT_DEST_OPTS, 4);
        assert_eq!(parse_ipv6(&f), Err(Malformed::Ipv6ExtHeader));
        // An extension header longer than the packet.
        let f = udp6(&[PROTO_UDP, 200, 1, 4, 0, 0, 0, 0], NEXT_DEST_OPTS, 4);
        assert_eq!(parse_ipv6(&f), Err(Malformed::Ipv6ExtHeader));
        // Payload length past the frame, zero payload length, wrong version.
        let mut f = udp6(&[], PROTO_UDP, 4);
        put_u16(&mut f, ETH_HEADER + 4, 100);
        assert_eq!(parse_ipv6(&f), Err(Malformed::Ipv6Length));
        put_u16(&mut f, ETH_HEADER + 4, 0);
        assert_eq!(parse_ipv6(&f), Err(Malformed::Ipv6Length));
        let mut f = udp6(&[], PROTO_UDP, 4);
        f[ETH_HEADER] = 0x40;
        assert_eq!(parse_ipv6(&f), Err(Malformed::Ipv6Header));
        // UDP length past the packet; a zero UDP checksum.
        let mut f = udp6(&[], PROTO_UDP, 4);
        put_u16(&mut f, 58, 13);
        assert_eq!(parse_ipv6(&f), Err(Malformed::L4Header));
        let mut f = udp6(&[], PROTO_UDP, 4);
        put_u16(&mut f, 60, 0);
        let i = parse_ipv6(&f).unwrap();
        assert!(
            !l4_checksum_ok6(&f, &i),
            "UDP over IPv6 must carry a checksum"
        );
        // Every truncation is refused, never a panic.
        let f = udp6(&ext, NEXT_DEST_OPTS, 4);
        for n in 0..f.len() {
            let _ = parse_ipv6(&f[..n]);
        }
    }

    #[test]
    fn neighbor_round_trip() {
        let mut buf = [0u8; 128];
        let ns = Neighbor {
            kind: ND_NEIGHBOR_SOLICIT,
            target: DST,
            lladdr: Some([2, 0, 0, 0, 0, 1]),
            flags: 0,
        };
        let len = ns.emit(
            &mut buf,
            ([2, 0, 0, 0, 0, 1], multicast_mac(solicited_node(DST))),
            SRC,
            solicited_node(DST),
        );
        assert_eq!(len, 86);
        assert_eq!(&buf[..6], &[0x33, 0x33, 0xff, 0, 0, 0x80]);
        let info = parse_ipv6(&buf[..len]).unwrap();
        assert_eq!(info.dst, "ff02::1:ff00:80".parse::<Ipv6Addr>().unwrap());
        assert!(l4_checksum_ok6(&buf, &info));
        assert_eq!(Neighbor::parse(&buf, &info), Ok(ns));
        // Hop limit other than 255: refused.
        buf[ETH_HEADER + 7] = 254;
        let info = parse_ipv6(&buf[..len]).unwrap();
        assert_eq!(Neighbor::parse(&buf, &info), Err(Malformed::Nd));
        // A zero-length option: refused.
        buf[ETH_HEADER + 7] = 255;
        buf[ETH_HEADER + IPV6_HEADER + 25] = 0;
        let info = parse_ipv6(&buf[..len]).unwrap();
        assert_eq!(Neighbor::parse(&buf, &info), Err(Malformed::Nd));
    }
}
