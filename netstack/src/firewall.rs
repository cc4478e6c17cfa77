//! The per-frame pipeline of a Qubes firewall VM.
//!
//! Port 0 is the uplink (towards sys-net / the upstream network); ports
//! 1.. are downlinks serving client VMs. `Firewall::handle` takes one frame
//! as received, rewrites it in place and says where it goes, or why it is
//! dropped. Replies the firewall makes itself (ARP, echo replies, ICMP
//! errors) are written over the frame that caused them; requests it starts
//! itself (ARP for the next hop) come from `poll_emit`.
//!
//! Decisions, in order: frame size and destination MAC; ARP (answered for
//! own addresses upstream, proxy-answered for connected clients
//! downstream); IPv4 validation (header, lengths, checksums; later
//! fragments follow their first fragment's verdict); then by direction —
//! - from a client: anti-spoofing (source must be a connected client, bound
//!   to the first port it appeared on), ping of own addresses,
//!   client-to-client drop, TTL, DNS redirection, connection tracking, the
//!   client's rules (reject with ICMP admin-prohibited), source NAT;
//! - from upstream: ping of own address, replies matched through connection
//!   tracking and rewritten back (ICMP errors quoting a translated packet
//!   included); anything else is dropped.
//!
//! IPv6 (`v6.rs`) takes the same decisions with neighbour discovery in the
//! place of ARP and its own connection table; it is off unless configured.

use alloc::vec::Vec;
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use clients::ClientIndex;

use crate::config::{ClientConfig, Ipv6Config, NetConfig};
use crate::conntrack::{Addr, Conntrack, CreateError, Key, Outbound, Tuple};
use crate::dns::{Resolved, Resolver, DNS_PORT, RESOLVER_PORT};
use crate::ipv6::{is_ipv6_multicast_mac, PROTO_ICMPV6};
use crate::rules::{Action, Probe, RuleError, Ruleset};
use crate::wire::*;

pub const UPLINK: usize = 0;
/// Flows tracked at most.
pub const CONNTRACK_CAPACITY: usize = 16384;
/// IPv6 flows tracked at most (when IPv6 is on).
pub const CONNTRACK_CAPACITY6: usize = 4096;
const ARP_CACHE: usize = 16;
const ARP_LIFETIME_MS: u64 = 10 * 60 * 1000;
const ARP_RETRY_MS: u64 = 1000;
const ICMP_ERRORS_PER_SEC: u32 = 100;
const ICMP_ERROR_BURST: u32 = 50;
const TTL_OWN: u8 = 64;

/// Where a frame goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Transmit the first `len` bytes of the (rewritten) buffer on `port`.
    Forward { port: usize, len: usize },
    /// Not transmitted; `handle` counted why.
    Drop(DropReason),
    /// Used by the firewall itself (an ARP reply it learned from).
    Consumed,
}

macro_rules! drop_reasons {
    ($($name:ident => $text:literal,)*) => {
        /// Why a frame was not forwarded.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum DropReason { $($name,)* }

        impl DropReason {
            pub const ALL: &'static [DropReason] = &[$(DropReason::$name,)*];
            pub const COUNT: usize = Self::ALL.len();
            pub fn name(self) -> &'static str {
                match self { $(DropReason::$name => $text,)* }
            }
        }
    };
}

drop_reasons! {
    Runt => "runt",
    Giant => "giant",
    NotForUs => "not-for-us",
    UnknownEthertype => "unknown-ethertype",
    Ipv6Off => "ipv6-off",
    BadIpv6Header => "bad-ipv6-header",
    BadIpv6Length => "bad-ipv6-length",
    BadIpv6ExtHeader => "bad-ipv6-ext-header",
    Ipv6Scope => "ipv6-scope",
    MalformedNd => "malformed-nd",
    NdIgnored => "nd-ignored",
    NeighborUnresolved => "neighbor-unresolved",
    MalformedArp => "malformed-arp",
    ArpIgnored => "arp-ignored",
    BadIpv4Header => "bad-ipv4-header",
    BadIpv4Length => "bad-ipv4-length",
    BadIpv4Checksum => "bad-ipv4-checksum",
    BadL4Header => "bad-l4-header",
    BadL4Checksum => "bad-l4-checksum",
    Fragment => "fragment-unknown",
    FragmentOutOfOrder => "fragment-out-of-order",
    FragmentTableFull => "fragment-table-full",
    Spoofed => "spoofed-source",
    ClientToClient => "client-to-client",
    ToFirewall => "to-firewall",
    UpstreamUnsolicited => "upstream-unsolicited",
    RuleReject => "rule-reject",
    RulesInvalid => "rules-invalid",
    RulesPending => "rules-pending",
    TtlExceeded => "ttl-exceeded",
    TcpNotSyn => "tcp-not-syn",
    IcmpUnsupported => "icmp-unsupported",
    ProtoUnsupported => "proto-unsupported",
    ConntrackFull => "conntrack-full",
    NatPortsExhausted => "nat-ports-exhausted",
    ArpUnresolved => "arp-unresolved",
    ClientUnreachable => "client-unreachable",
}

impl From<CreateError> for DropReason {
    fn from(e: CreateError) -> Self {
        match e {
            CreateError::TableFull => Self::ConntrackFull,
            CreateError::NoFreePort => Self::NatPortsExhausted,
        }
    }
}

impl From<Malformed> for DropReason {
    fn from(m: Malformed) -> Self {
        match m {
            Malformed::Runt => Self::Runt,
            Malformed::Giant => Self::Giant,
            Malformed::Ipv4Header => Self::BadIpv4Header,
            Malformed::Ipv4Length => Self::BadIpv4Length,
            Malformed::Ipv4Checksum => Self::BadIpv4Checksum,
            Malformed::L4Header => Self::BadL4Header,
            Malformed::L4Checksum => Self::BadL4Checksum,
            Malformed::Arp => Self::MalformedArp,
            Malformed::Ipv6Header => Self::BadIpv6Header,
            Malformed::Ipv6Length => Self::BadIpv6Length,
            Malformed::Ipv6ExtHeader => Self::BadIpv6ExtHeader,
            Malformed::Nd => Self::MalformedNd,
        }
    }
}

/// Counters kept by the firewall.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    pub drops: [u64; DropReason::COUNT],
    /// Client packets forwarded upstream (after NAT).
    pub to_upstream: u64,
    /// Upstream packets forwarded to clients (after reverse NAT).
    pub to_clients: u64,
    pub arp_replies: u64,
    pub echo_replies: u64,
    pub icmp_errors_sent: u64,
    pub icmp_errors_suppressed: u64,
    pub arp_requests_sent: u64,
    /// Neighbour solicitations sent (IPv6's ARP requests) and
    /// advertisements answered.
    pub nd_solicits_sent: u64,
    pub nd_adverts: u64,
    pub flows_created: u64,
    pub dns_redirected: u64,
    /// The firewall's own DNS lookups for `dsthost` rules, and answers.
    pub dns_queries_sent: u64,
    pub dns_answers: u64,
    /// Of `to_upstream` and `to_clients`, the packets the fast path
    /// forwarded (`firewall/fast.rs`).
    pub fast_path: u64,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            drops: [0; DropReason::COUNT],
            to_upstream: 0,
            to_clients: 0,
            arp_replies: 0,
            echo_replies: 0,
            icmp_errors_sent: 0,
            icmp_errors_suppressed: 0,
            arp_requests_sent: 0,
            nd_solicits_sent: 0,
            nd_adverts: 0,
            flows_created: 0,
            dns_redirected: 0,
            dns_queries_sent: 0,
            dns_answers: 0,
            fast_path: 0,
        }
    }
}

impl core::ops::AddAssign<&Stats> for Stats {
    /// Adds another firewall's counters (another core's).
    fn add_assign(&mut self, o: &Stats) {
        for (a, b) in self.drops.iter_mut().zip(o.drops.iter()) {
            *a += b;
        }
        self.to_upstream += o.to_upstream;
        self.to_clients += o.to_clients;
        self.arp_replies += o.arp_replies;
        self.echo_replies += o.echo_replies;
        self.icmp_errors_sent += o.icmp_errors_sent;
        self.icmp_errors_suppressed += o.icmp_errors_suppressed;
        self.arp_requests_sent += o.arp_requests_sent;
        self.nd_solicits_sent += o.nd_solicits_sent;
        self.nd_adverts += o.nd_adverts;
        self.flows_created += o.flows_created;
        self.dns_redirected += o.dns_redirected;
        self.dns_queries_sent += o.dns_queries_sent;
        self.dns_answers += o.dns_answers;
        self.fast_path += o.fast_path;
    }
}

/// What `Firewall::set_uplink` changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UplinkChange {
    /// The uplink's address or prefix.
    pub address: bool,
    pub gateway: bool,
    /// The upstream DNS servers.
    pub dns: bool,
    /// The IPv6 configuration (`/qubes-ip6`, `/qubes-gateway6`,
    /// `/qubes-netvm-gateway6`): IPv6 turned on or off, or one of its
    /// addresses.
    pub ip6: bool,
    /// IPv4 flows ended by a new address.
    pub flows_ended: usize,
    /// IPv6 flows ended by a new IPv6 address or IPv6 turned off.
    pub flows_ended6: usize,
}

/// A copy of what a firewall reports (`stats`), taken on its own core and
/// added up with other cores' copies on another: counters, flows, rule
/// hits and `dsthost` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub stats: Stats,
    pub flows: usize,
    pub evictions: u64,
    /// Per client: per-rule hits (last: the policy), or the rule error.
    pub rules: Vec<(IpAddr, Result<Vec<u64>, alloc::string::String>)>,
    /// `dsthost` names: name, IPv6?, addresses, resolved.
    pub dsthosts: Vec<(alloc::string::String, bool, Vec<IpAddr>, bool)>,
}

impl Summary {
    /// Adds the counters of `o`, a summary of a firewall with the same
    /// clients (another core's); the names' addresses are this one's.
    pub fn add(&mut self, o: &Summary) {
        self.stats += &o.stats;
        self.flows += o.flows;
        self.evictions += o.evictions;
        for ((ip, hits), (ip2, hits2)) in self.rules.iter_mut().zip(o.rules.iter()) {
            if let (true, Ok(h), Ok(h2)) = (ip == ip2, hits, hits2) {
                for (a, b) in h.iter_mut().zip(h2.iter()) {
                    *a += b;
                }
            }
        }
    }
}

impl Stats {
    pub fn drop_count(&self, r: DropReason) -> u64 {
        self.drops[r as usize]
    }
    pub fn dropped(&self) -> u64 {
        self.drops.iter().sum()
    }
}

/// Binds client `ci` to `port` (its first) and learns its MAC; false if it
/// is bound to another port, or is unbound and `port` serves only the
/// clients assigned to it (`pinned`, see `Firewall::assign_port`).
fn bind(clients: &mut [Client], pinned: &[bool], ci: usize, port: usize, mac: Mac) -> bool {
    let Some(c) = clients.get_mut(ci) else {
        return false;
    };
    match c.port {
        Some(p) if p != port => false,
        None if pinned.get(port).copied().unwrap_or(false) => false,
        _ => {
            c.port = Some(port);
            c.mac = Some(mac);
            true
        }
    }
}

/// Whether client `ci` is bound to `port` with MAC `mac` already: `bind`
/// would accept a frame from them and change nothing (the fast path's
/// anti-spoofing check, which must change nothing).
#[inline(always)]
fn bound(clients: &[Client], ci: usize, port: usize, mac: Mac) -> bool {
    clients
        .get(ci)
        .is_some_and(|c| c.port == Some(port) && c.mac == Some(mac))
}

/// The connection-tracking tuple of a client's IPv4 packet.
fn client_tuple(buf: &[u8], info: &Ipv4Info) -> Option<Tuple> {
    let ports = (info.sport, info.dport);
    flow_tuple(
        buf,
        (info.proto, PROTO_ICMP),
        (info.src, info.dst),
        ports,
        info.l4,
    )
}

/// The connection-tracking tuple of a client's packet of either family
/// (`icmp`: the family's ICMP protocol number; `ports`: as parsed, for
/// ICMP (type, code)): TCP and UDP by ports, an echo request of the
/// family's ICMP by its identifier (read at `l4 + 4`) as the source port;
/// `None` for what is not tracked.
fn flow_tuple<A: Addr>(
    buf: &[u8],
    (proto, icmp): (u8, u8),
    (src, dst): (A, A),
    (sport, dport): (u16, u16),
    l4: usize,
) -> Option<Tuple<A>> {
    let echo = if icmp == PROTO_ICMPV6 {
        u16::from(crate::ipv6::ICMPV6_ECHO_REQUEST)
    } else {
        8
    };
    let (sport, dport) = match proto {
        PROTO_TCP | PROTO_UDP => (sport, dport),
        p if p == icmp && sport == echo => (get_u16(buf, l4 + 4).unwrap_or(0), 0),
        _ => return None,
    };
    Some(Tuple {
        proto,
        src,
        sport,
        dst,
        dport,
    })
}

struct Client {
    ip: IpAddr,
    rules: Result<Ruleset, RuleError>,
    /// Hits per rule; the last entry counts the policy.
    hits: Vec<u64>,
    port: Option<usize>,
    mac: Option<Mac>,
    /// In dom0's list of connected clients. A client that left keeps its
    /// entry (flows name clients by index), out of the address indexes, so
    /// its frames are dropped as spoofed until it comes back.
    connected: bool,
}

#[derive(Clone, Copy)]
struct ArpEntry {
    ip: Ipv4Addr,
    mac: Mac,
    expires: u64,
}

#[derive(Clone, Copy)]
struct ArpWanted {
    ip: Ipv4Addr,
    last_sent: Option<u64>,
}

/// Fragmented datagrams in flight: fragments after the first carry no
/// ports, so they follow the first fragment's verdict and translation.
/// Fragments must arrive in order, without gaps or overlaps; a datagram of
/// more than `MAX_FRAGMENTS` pieces or one not finished within
/// `FRAGMENT_LIFETIME_MS` is forgotten, and its later fragments dropped.
/// One table per address family.
struct FragmentTable<A> {
    entries: Vec<FragmentEntry<A>>,
}

impl<A> Default for FragmentTable<A> {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
        }
    }
}

/// A fragment as the table sees it: (source, destination, protocol,
/// identification) as it arrives, its offset and length of data in bytes,
/// whether more follow.
#[derive(Clone, Copy)]
struct Piece<A> {
    key: (A, A, u8, u32),
    offset: usize,
    len: usize,
    more: bool,
}

impl Piece<Ipv4Addr> {
    fn of(info: &Ipv4Info) -> Self {
        Self {
            key: (info.src, info.dst, info.proto, u32::from(info.ip_id)),
            offset: info.frag_offset,
            len: info.end - info.l4,
            more: info.more_fragments,
        }
    }
}

#[derive(Clone, Copy)]
struct FragmentEntry<A> {
    key: (A, A, u8, u32),
    /// The addresses to write.
    src: A,
    dst: A,
    /// The client to deliver to, or `None` for upstream.
    to_client: Option<A>,
    next_offset: usize,
    count: u16,
    expires: u64,
}

const FRAGMENT_TABLE: usize = 64;
const MAX_FRAGMENTS: u16 = 64;
const FRAGMENT_LIFETIME_MS: u64 = 30_000;

impl<A: Addr> FragmentTable<A> {
    /// Remembers a first fragment that was forwarded.
    fn start(
        &mut self,
        first: Piece<A>,
        (src, dst): (A, A),
        to_client: Option<A>,
        now: u64,
    ) -> Result<(), DropReason> {
        self.entries
            .retain(|e| e.expires > now && e.key != first.key);
        if self.entries.len() >= FRAGMENT_TABLE {
            return Err(DropReason::FragmentTableFull);
        }
        self.entries.push(FragmentEntry {
            key: first.key,
            src,
            dst,
            to_client,
            next_offset: first.len,
            count: 1,
            expires: now + FRAGMENT_LIFETIME_MS,
        });
        Ok(())
    }

    /// The translation for a later fragment, if it is the next one of a
    /// datagram whose first fragment was forwarded.
    fn next(&mut self, piece: Piece<A>, now: u64) -> Result<(A, A, Option<A>), DropReason> {
        let i = self
            .entries
            .iter()
            .position(|e| e.key == piece.key && e.expires > now)
            .ok_or(DropReason::Fragment)?;
        let e = &mut self.entries[i];
        if piece.offset != e.next_offset || e.count >= MAX_FRAGMENTS {
            self.entries.swap_remove(i);
            return Err(DropReason::FragmentOutOfOrder);
        }
        e.next_offset += piece.len;
        e.count += 1;
        let out = (e.src, e.dst, e.to_client);
        if !piece.more {
            self.entries.swap_remove(i);
        }
        Ok(out)
    }
}

/// An ICMP error the firewall sends instead of forwarding, and the drop
/// reason it counts.
struct IcmpError {
    icmp_type: u8,
    code: u8,
    from: Ipv4Addr,
    drop: DropReason,
}

struct TokenBucket {
    tokens: u32,
    last: u64,
}

impl TokenBucket {
    fn take(&mut self, now: u64) -> bool {
        let refill = now.saturating_sub(self.last) * u64::from(ICMP_ERRORS_PER_SEC) / 1000;
        if refill > 0 {
            self.tokens = (u64::from(self.tokens) + refill).min(u64::from(ICMP_ERROR_BURST)) as u32;
            self.last = now;
        }
        if self.tokens > 0 {
            self.tokens -= 1;
            true
        } else {
            false
        }
    }
}

/// The firewall stage for one uplink and any number of downlinks.
pub struct Firewall {
    cfg: NetConfig,
    macs: Vec<Mac>,
    clients: Vec<Client>,
    client_index: ClientIndex<Ipv4Addr>,
    client_index6: ClientIndex<Ipv6Addr>,
    arp: Vec<ArpEntry>,
    wanted: Vec<ArpWanted>,
    ct: Conntrack,
    ct6: Conntrack<Ipv6Addr>,
    /// The IPv6 gateway's MAC and when it expires; when a solicitation
    /// for it was last sent.
    gateway6: Option<(Mac, u64)>,
    gateway6_asked: Option<u64>,
    /// Looks up the `dsthost` names of every client's rules.
    resolver: Resolver,
    frags: FragmentTable<Ipv4Addr>,
    frags6: FragmentTable<Ipv6Addr>,
    icmp_bucket: TokenBucket,
    stats: Stats,
    /// The benchmark's limit mode (`set_forward_only`).
    forward_only: bool,
    /// Whether `handle` tries the fast path first (`set_fast_path`).
    fast_path: bool,
    /// The port the resolver asks from (`RESOLVER_PORT` unless another
    /// core's firewall uses it: `set_resolver_port`).
    resolver_port: u16,
    /// Per port: whether only the clients assigned to it may use it
    /// (`assign_port`), rather than whoever appears there first.
    pinned: Vec<bool>,
    /// Per port: the addresses assigned to it (`assign_port`), for clients
    /// that connect later (`set_clients`).
    assigned: Vec<Vec<IpAddr>>,
}

/// The MAC of `ip` in an ARP cache, if known and not expired.
#[inline]
fn arp_find(arp: &[ArpEntry], ip: Ipv4Addr, now: u64) -> Option<Mac> {
    arp.iter()
        .find(|e| e.ip == ip && e.expires > now)
        .map(|e| e.mac)
}

fn swap_macs(buf: &mut [u8], new_src: Mac) {
    if let Some(src) = get_mac(buf, 6) {
        put_bytes(buf, 0, &src);
        put_bytes(buf, 6, &new_src);
    }
}

impl Firewall {
    /// `macs[0]` is the uplink's MAC, `macs[i]` downlink `i`'s.
    pub fn new(cfg: NetConfig, macs: Vec<Mac>) -> Self {
        Self::with_capacity(cfg, macs, CONNTRACK_CAPACITY)
    }

    /// As `new`, with room for `flows` tracked flows.
    pub fn with_capacity(cfg: NetConfig, macs: Vec<Mac>, flows: usize) -> Self {
        let clients: Vec<Client> = cfg
            .clients
            .iter()
            .map(|c| Client {
                ip: c.ip,
                hits: alloc::vec![0; c.rules.as_ref().map(|r| r.rules.len() + 1).unwrap_or(0)],
                rules: c.rules.clone(),
                port: None,
                mac: None,
                connected: true,
            })
            .collect();
        let client_index = clients
            .iter()
            .enumerate()
            .filter_map(|(i, c)| match c.ip {
                IpAddr::V4(a) => Some((a, i)),
                IpAddr::V6(_) => None,
            })
            .collect();
        let client_index6 = clients
            .iter()
            .enumerate()
            .filter_map(|(i, c)| match c.ip {
                IpAddr::V6(a) if cfg.ip6.is_some() => Some((a, i)),
                _ => None,
            })
            .collect();
        let ct = Conntrack::new(cfg.uplink_ip, flows);
        let ct6 = match cfg.ip6 {
            Some(v6) => Conntrack::new(v6.uplink_ip, flows.min(CONNTRACK_CAPACITY6)),
            None => Conntrack::new(Ipv6Addr::UNSPECIFIED, 0),
        };
        let wanted = alloc::vec![ArpWanted {
            ip: cfg.gateway,
            last_sent: None
        }];
        let names = clients
            .iter()
            .filter_map(|c| c.rules.as_ref().ok())
            .flat_map(|r| r.hosts().map(move |h| (h, r.v6)));
        let servers = cfg.upstream_dns.iter().flatten().copied().collect();
        let seed = macs
            .first()
            .map_or(1, |m| u32::from_be_bytes([m[2], m[3], m[4], m[5]]));
        let resolver = Resolver::new(names, servers, seed);
        let pinned = alloc::vec![false; macs.len()];
        let assigned = alloc::vec![Vec::new(); macs.len()];
        let mut fw = Self {
            cfg,
            macs,
            clients,
            client_index,
            client_index6,
            arp: Vec::with_capacity(ARP_CACHE),
            wanted,
            ct,
            ct6,
            gateway6: None,
            gateway6_asked: None,
            resolver,
            frags: FragmentTable::default(),
            frags6: FragmentTable::default(),
            icmp_bucket: TokenBucket {
                tokens: ICMP_ERROR_BURST,
                last: 0,
            },
            stats: Stats::default(),
            forward_only: false,
            fast_path: true,
            resolver_port: RESOLVER_PORT,
            pinned,
            assigned,
        };
        // Names that cannot be asked (no DNS server) are settled already.
        let settled: Vec<Resolved> = fw
            .resolver
            .entries()
            .filter(|e| e.3)
            .map(|(name, v6, addrs, _)| Resolved {
                name: name.into(),
                v6,
                addrs: addrs.to_vec(),
            })
            .collect();
        fw.apply_resolved(settled);
        fw
    }

    /// Gives downlink `port` to the clients at `addrs` alone — a Xen
    /// netback vif, whose client's addresses dom0 wrote — or to nobody
    /// (empty: the client went away). Clients bound to the port before are
    /// unbound (their flows stay; replies to them are dropped as
    /// unreachable until they are bound again); each address that is a
    /// connected client is bound to the port, moving from any other, its
    /// MAC learned from its first frame. From then on the port is pinned:
    /// a frame on it from any other address is dropped as spoofed, however
    /// early it comes. Returns the addresses that are not connected
    /// clients (they can send nothing).
    pub fn assign_port(&mut self, port: usize, addrs: &[IpAddr]) -> Vec<IpAddr> {
        if port == UPLINK || port >= self.pinned.len() {
            return addrs.to_vec();
        }
        self.pinned[port] = true;
        self.assigned[port] = addrs.to_vec();
        for c in &mut self.clients {
            if c.port == Some(port) {
                c.port = None;
                c.mac = None;
            }
        }
        let mut unknown = Vec::new();
        for &a in addrs {
            match self.clients.iter_mut().find(|c| c.ip == a && c.connected) {
                Some(c) => {
                    c.port = Some(port);
                    c.mac = None;
                }
                None => unknown.push(a),
            }
        }
        unknown
    }

    /// The configuration the firewall was made with (its `clients` as they
    /// were then: `clients` gives today's).
    pub fn config(&self) -> &NetConfig {
        &self.cfg
    }

    /// The connected clients' addresses.
    pub fn clients(&self) -> Vec<IpAddr> {
        self.clients
            .iter()
            .filter(|c| c.connected)
            .map(|c| c.ip)
            .collect()
    }

    /// Follows a change of the uplink's configuration from dom0
    /// (`/qubes-ip`, `/qubes-netmask`, `/qubes-gateway`,
    /// `/qubes-primary-dns`, `/qubes-secondary-dns`: `new` holds the
    /// database's whole configuration, of which the uplink part is taken),
    /// as a Qubes net VM follows its upstream: a new address ends every
    /// IPv4 flow and fragment in progress (their translation used the old
    /// one; clients start new ones, which leave from the new address); a
    /// new gateway is asked for by ARP and traffic waits for its answer
    /// (counted drops meanwhile); new DNS servers take the redirected
    /// queries and the firewall's own lookups from then on (every
    /// `dsthost` name is asked again). The client side stays as it is.
    pub fn set_uplink(&mut self, new: &NetConfig) -> UplinkChange {
        let mut change = UplinkChange {
            address: new.uplink_ip != self.cfg.uplink_ip
                || new.uplink_prefix != self.cfg.uplink_prefix,
            gateway: new.gateway != self.cfg.gateway,
            dns: new.upstream_dns != self.cfg.upstream_dns,
            ip6: new.ip6 != self.cfg.ip6,
            flows_ended: 0,
            flows_ended6: 0,
        };
        if change.address {
            change.flows_ended = self.ct.len();
            self.ct = Conntrack::new(new.uplink_ip, self.ct.capacity());
            self.frags = FragmentTable::default();
            self.cfg.uplink_ip = new.uplink_ip;
            self.cfg.uplink_prefix = new.uplink_prefix;
        }
        if change.gateway {
            let old = self.cfg.gateway;
            self.cfg.gateway = new.gateway;
            self.wanted.retain(|w| w.ip != old);
            self.arp_want(new.gateway);
        }
        if change.dns {
            self.cfg.upstream_dns = new.upstream_dns;
            let servers = new.upstream_dns.iter().flatten().copied().collect();
            let settled = self.resolver.set_servers(servers);
            self.apply_resolved(settled);
        }
        if change.ip6 {
            change.flows_ended6 = self.set_ip6(new.ip6);
        }
        change
    }

    /// IPv6 turned on or off, or given new addresses: a new uplink
    /// address ends the IPv6 flows (their NAT used the old one), a new
    /// gateway is solicited anew, and the clients' IPv6 addresses are
    /// indexed only while IPv6 is on (off, their frames are dropped as at
    /// creation). Returns the flows ended.
    fn set_ip6(&mut self, new: Option<Ipv6Config>) -> usize {
        let old = self.cfg.ip6;
        let mut ended = 0;
        if old.map(|o| o.uplink_ip) != new.map(|n| n.uplink_ip) {
            ended = self.ct6.len();
            self.ct6 = match new {
                Some(v6) => {
                    Conntrack::new(v6.uplink_ip, self.ct.capacity().min(CONNTRACK_CAPACITY6))
                }
                None => Conntrack::new(Ipv6Addr::UNSPECIFIED, 0),
            };
            self.frags6 = FragmentTable::default();
        }
        if old.map(|o| o.gateway) != new.map(|n| n.gateway) {
            self.gateway6 = None;
            self.gateway6_asked = None;
        }
        self.cfg.ip6 = new;
        self.client_index6 = match new {
            Some(_) => self
                .clients
                .iter()
                .enumerate()
                .filter_map(|(i, c)| match c.ip {
                    IpAddr::V6(a) if c.connected => Some((a, i)),
                    _ => None,
                })
                .collect(),
            None => Default::default(),
        };
        ended
    }

    /// Follows dom0's list of connected clients (`/connected-ips`,
    /// `/connected-ips6`, each address with its rules:
    /// `NetConfig::clients_from_db`), as Qubes's firewall agent does when
    /// client qubes start and stop. A client that left is disconnected: its
    /// flows end, its port binding is undone, and its frames are dropped as
    /// spoofed from then on, like any address that is not a client. A
    /// client that came is connected with its rules, and bound to the port
    /// its address was assigned to, if any (`assign_port`). A client that
    /// stays keeps its flows and its rules (its rule updates come with
    /// their own commit: `replace_rules`). Returns (added, removed).
    pub fn set_clients(&mut self, wanted: Vec<ClientConfig>) -> (Vec<IpAddr>, Vec<IpAddr>) {
        let mut removed = Vec::new();
        for ci in 0..self.clients.len() {
            let ip = self.clients[ci].ip;
            if self.clients[ci].connected && !wanted.iter().any(|w| w.ip == ip) {
                self.disconnect(ci);
                removed.push(ip);
            }
        }
        let mut added = Vec::new();
        for w in wanted {
            if self.clients.iter().any(|c| c.ip == w.ip && c.connected) {
                continue;
            }
            let ci = match self.clients.iter().position(|c| c.ip == w.ip) {
                Some(ci) => ci,
                None => {
                    self.clients.push(Client {
                        ip: w.ip,
                        rules: Err(RuleError::NoPolicy),
                        hits: Vec::new(),
                        port: None,
                        mac: None,
                        connected: false,
                    });
                    self.clients.len() - 1
                }
            };
            match w.ip {
                IpAddr::V4(a) => {
                    self.client_index.insert(a, ci);
                }
                IpAddr::V6(a) if self.cfg.ip6.is_some() => {
                    self.client_index6.insert(a, ci);
                }
                IpAddr::V6(_) => {} // IPv6 off: listed, never indexed, as at creation
            }
            let port = self.assigned.iter().position(|a| a.contains(&w.ip));
            let c = &mut self.clients[ci];
            c.connected = true;
            c.port = port;
            c.mac = None;
            self.set_rules(ci, w.rules);
            added.push(w.ip);
        }
        (added, removed)
    }

    /// Takes client `ci` out: out of the indexes, its flows ended, unbound.
    fn disconnect(&mut self, ci: usize) {
        let Some(c) = self.clients.get_mut(ci) else {
            return;
        };
        c.connected = false;
        c.port = None;
        c.mac = None;
        match c.ip {
            IpAddr::V4(a) => {
                self.client_index.remove(&a);
                self.ct.remove_owned(ci as u32);
            }
            IpAddr::V6(a) => {
                self.client_index6.remove(&a);
                self.ct6.remove_owned(ci as u32);
            }
        }
    }

    /// Turns the firewall off, for measuring what the machine can forward
    /// at all (`cargo xtask bench`'s limit column): IPv4 frames then cross
    /// with their Ethernet addresses rewritten and nothing else — no rules,
    /// no connection tracking, no NAT, no TTL — between connected clients
    /// (by source address from their ports, by destination address from the
    /// uplink) and the uplink's next hop. ARP is answered as usual; every
    /// other frame is dropped. Never for deployment: the kernel says so
    /// loudly when its command line asks for it.
    pub fn set_forward_only(&mut self, on: bool) {
        self.forward_only = on;
    }

    /// Turns the fast path (`firewall/fast.rs`) on (the default) or off.
    /// Off, every frame takes the general path, with the same verdicts,
    /// output and counters except `Stats::fast_path`: for measuring what
    /// the fast path saves (`cargo bench -p netstack`) and for the test
    /// that compares the two.
    pub fn set_fast_path(&mut self, on: bool) {
        self.fast_path = on;
    }

    /// Makes the resolver ask from `port` (below the NAT ports) instead
    /// of `RESOLVER_PORT`: with a firewall per core, each asks from its
    /// own port, so that the answers can be steered to the core that
    /// asked (`steer::resolver_port`).
    pub fn set_resolver_port(&mut self, port: u16) {
        self.resolver_port = port.min(crate::conntrack::NAT_PORT_FIRST - 1);
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Flows tracked, IPv4 and IPv6.
    pub fn flows(&self) -> usize {
        self.ct.len() + self.ct6.len()
    }

    /// Unanswered flows evicted to make room for new ones.
    pub fn conntrack_evictions(&self) -> u64 {
        self.ct.evictions() + self.ct6.evictions()
    }

    /// Heap bytes of the connection tables (fixed at creation).
    pub fn conntrack_memory(&self) -> usize {
        self.ct.memory_bytes() + self.ct6.memory_bytes()
    }

    /// The MAC the upstream gateway answered with, once resolved.
    pub fn gateway_mac(&self) -> Option<Mac> {
        self.arp_lookup(self.cfg.gateway, 0)
    }

    /// Per-rule hit counts of each client (last entry: the policy), or the
    /// rule error that closed it.
    pub fn rule_hits(&self) -> impl Iterator<Item = (IpAddr, Result<&[u64], &RuleError>)> {
        self.clients
            .iter()
            .filter(|c| c.connected)
            .map(|c| (c.ip, c.rules.as_ref().map(|_| c.hits.as_slice())))
    }

    /// What `stats` reports, as one value (see `Summary`).
    pub fn summary(&self) -> Summary {
        Summary {
            stats: self.stats.clone(),
            flows: self.flows(),
            evictions: self.conntrack_evictions(),
            rules: self
                .rule_hits()
                .map(|(ip, h)| {
                    (
                        ip,
                        h.map(<[u64]>::to_vec).map_err(|e| alloc::format!("{e}")),
                    )
                })
                .collect(),
            dsthosts: self
                .dsthosts()
                .map(|(n, v6, a, r)| (n.into(), v6, a.to_vec(), r))
                .collect(),
        }
    }

    fn drop(&mut self, r: DropReason) -> Verdict {
        self.stats.drops[r as usize] += 1;
        Verdict::Drop(r)
    }

    fn mac(&self, port: usize) -> Mac {
        self.macs.get(port).copied().unwrap_or([0; 6])
    }

    fn is_dns_address(&self, ip: Ipv4Addr) -> bool {
        self.cfg
            .virtual_dns
            .iter()
            .chain(self.cfg.upstream_dns.iter())
            .any(|d| *d == Some(ip))
    }

    fn have_dns(&self) -> bool {
        self.cfg
            .virtual_dns
            .iter()
            .chain(self.cfg.upstream_dns.iter())
            .any(Option::is_some)
    }

    /// Handles one received frame: `buf` is the whole buffer (its length is
    /// the room for replies), the frame is its first `len` bytes. For a
    /// NIC's batch of frames, `batch` does the same with less work per
    /// frame.
    pub fn handle(&mut self, now: u64, port: usize, buf: &mut [u8], len: usize) -> Verdict {
        self.batch(now, port).handle(buf, len)
    }

    /// `handle` without the fast path: every frame.
    #[inline(never)]
    fn handle_general(&mut self, now: u64, port: usize, buf: &mut [u8], len: usize) -> Verdict {
        if port >= self.macs.len() {
            return self.drop(DropReason::NotForUs);
        }
        if len < MIN_FRAME || len > buf.len() {
            return self.drop(DropReason::Runt);
        }
        if len > MAX_FRAME {
            return self.drop(DropReason::Giant);
        }
        let dst = get_mac(buf, 0).unwrap_or([0; 6]);
        // IPv6 multicast frames carry neighbour solicitations.
        let multicast6 = is_ipv6_multicast_mac(&dst);
        if dst != self.mac(port) && dst != BROADCAST && !multicast6 {
            return self.drop(DropReason::NotForUs);
        }
        match get_u16(buf, 12) {
            Some(ETHERTYPE_ARP) if !multicast6 => self.handle_arp(now, port, buf, len),
            Some(ETHERTYPE_IPV4) => {
                let info = match parse_ipv4(&buf[..len]) {
                    Ok(i) => i,
                    Err(m) => return self.drop(m.into()),
                };
                if dst == BROADCAST || multicast6 {
                    return self.drop(DropReason::NotForUs);
                }
                if self.forward_only {
                    self.forward_plain(now, port, buf, &info)
                } else if port == UPLINK {
                    self.upstream_packet(now, buf, &info)
                } else {
                    self.client_packet(now, port, buf, &info)
                }
            }
            Some(ETHERTYPE_IPV6) if self.forward_only => self.drop(DropReason::NotForUs),
            Some(ETHERTYPE_IPV6) if dst != BROADCAST => self.handle_ipv6(now, port, buf, len),
            Some(ETHERTYPE_ARP | ETHERTYPE_IPV6) => self.drop(DropReason::NotForUs),
            _ => self.drop(DropReason::UnknownEthertype),
        }
    }

    // ---- ARP -------------------------------------------------------------

    fn arp_lookup(&self, ip: Ipv4Addr, now: u64) -> Option<Mac> {
        arp_find(&self.arp, ip, now)
    }

    fn arp_learn(&mut self, ip: Ipv4Addr, mac: Mac, now: u64) {
        let entry = ArpEntry {
            ip,
            mac,
            expires: now.saturating_add(ARP_LIFETIME_MS),
        };
        if let Some(e) = self.arp.iter_mut().find(|e| e.ip == ip) {
            *e = entry;
        } else if self.arp.len() < ARP_CACHE {
            self.arp.push(entry);
        } else if let Some(oldest) = self.arp.iter_mut().min_by_key(|e| e.expires) {
            *oldest = entry;
        }
        self.wanted
            .retain(|w| w.ip != ip || w.ip == self.cfg.gateway);
    }

    fn arp_want(&mut self, ip: Ipv4Addr) {
        if !self.wanted.iter().any(|w| w.ip == ip) && self.wanted.len() < ARP_CACHE {
            self.wanted.push(ArpWanted {
                ip,
                last_sent: None,
            });
        }
    }

    fn handle_arp(&mut self, now: u64, port: usize, buf: &mut [u8], len: usize) -> Verdict {
        let arp = match Arp::parse(&buf[..len]) {
            Ok(a) => a,
            Err(m) => return self.drop(m.into()),
        };
        let own_mac = self.mac(port);
        if port == UPLINK {
            if !self.cfg.on_uplink_subnet(arp.sender_ip) || arp.sender_ip == self.cfg.uplink_ip {
                return self.drop(DropReason::ArpIgnored);
            }
            let wanted = self.wanted.iter().any(|w| w.ip == arp.sender_ip);
            let for_us = arp.target_ip == self.cfg.uplink_ip;
            if wanted || for_us || self.arp.iter().any(|e| e.ip == arp.sender_ip) {
                self.arp_learn(arp.sender_ip, arp.sender_mac, now);
            }
            if arp.op == ARP_REQUEST && for_us {
                return self.arp_reply(buf, port, &arp, own_mac);
            }
            return if wanted || for_us {
                Verdict::Consumed
            } else {
                self.drop(DropReason::ArpIgnored)
            };
        }
        // Downlink: only connected clients, on their own port, may speak.
        let Some(ci) = self.client_index.get(&arp.sender_ip) else {
            return self.drop(DropReason::Spoofed);
        };
        if !self.bind_client(ci, port, arp.sender_mac) {
            return self.drop(DropReason::Spoofed);
        }
        if arp.op != ARP_REQUEST || arp.target_ip == arp.sender_ip {
            return Verdict::Consumed;
        }
        // Proxy ARP: every address but the client's own is reached through us.
        self.arp_reply(buf, port, &arp, own_mac)
    }

    fn arp_reply(&mut self, buf: &mut [u8], port: usize, req: &Arp, own_mac: Mac) -> Verdict {
        let reply = Arp {
            op: ARP_REPLY,
            sender_mac: own_mac,
            sender_ip: req.target_ip,
            target_mac: req.sender_mac,
            target_ip: req.sender_ip,
        };
        let len = reply.emit(buf, own_mac, req.sender_mac);
        self.stats.arp_replies += 1;
        Verdict::Forward { port, len }
    }

    /// Binds a client to the first port it is seen on and learns its MAC.
    fn bind_client(&mut self, ci: usize, port: usize, mac: Mac) -> bool {
        bind(&mut self.clients, &self.pinned, ci, port, mac)
    }

    /// An ARP request or neighbour solicitation the firewall wants sent,
    /// written into `buf`: the port and length.
    pub fn poll_emit(&mut self, now: u64, buf: &mut [u8]) -> Option<(usize, usize)> {
        self.poll_arp(now, buf)
            .or_else(|| self.poll_nd(now, buf))
            .or_else(|| self.poll_dns(now, buf))
    }

    // ---- dsthost names ---------------------------------------------------

    /// The `dsthost` names: name, IPv6?, addresses, resolved yet.
    pub fn dsthosts(&self) -> impl Iterator<Item = (&str, bool, &[IpAddr], bool)> {
        self.resolver.entries()
    }

    /// What each connected client's `dsthost` names resolved to, for the
    /// names resolved so far: (client, name, addresses) — what Qubes's
    /// firewall agent writes back to `/dns/<ip>/<name>`.
    pub fn dns_info(&self) -> Vec<(IpAddr, &str, &[IpAddr])> {
        let mut out = Vec::new();
        for c in self.clients.iter().filter(|c| c.connected) {
            let Ok(rules) = &c.rules else { continue };
            for name in rules.hosts() {
                let known = self
                    .resolver
                    .entries()
                    .find(|&(n, v6, _, resolved)| n == name && v6 == rules.v6 && resolved);
                if let Some((n, _, addrs, _)) = known {
                    out.push((c.ip, n, addrs));
                }
            }
        }
        out
    }

    /// Replaces the rules of client `ip` (dom0 committed an update): the
    /// new set, or its error (the client's traffic is then dropped); hit
    /// counters start again; `dsthost` names not yet known join the
    /// resolver (the client starts no flow until they resolve), known ones
    /// bring their addresses; and the client's tracked flows are dropped,
    /// so every packet from now on meets the new rules. Other clients keep
    /// theirs. The number of flows dropped, or `None` for an address that
    /// is not a client.
    pub fn replace_rules(
        &mut self,
        ip: IpAddr,
        rules: Result<Ruleset, RuleError>,
    ) -> Option<usize> {
        let ci = self
            .clients
            .iter()
            .position(|c| c.ip == ip && c.connected)?;
        self.set_rules(ci, rules);
        let dropped = match ip {
            IpAddr::V4(_) => self.ct.remove_owned(ci as u32),
            IpAddr::V6(_) => self.ct6.remove_owned(ci as u32),
        };
        Some(dropped)
    }

    /// Gives client `ci` its rules, with the addresses already known for
    /// their `dsthost` names (the others are asked), and fresh counters.
    fn set_rules(&mut self, ci: usize, rules: Result<Ruleset, RuleError>) {
        let mut rules = rules;
        if let Ok(r) = &mut rules {
            let names: Vec<alloc::string::String> =
                r.hosts().map(alloc::string::String::from).collect();
            for name in names {
                self.resolver.add(&name, r.v6);
                let known = self
                    .resolver
                    .entries()
                    .find(|(n, v6, _, resolved)| *n == name && *v6 == r.v6 && *resolved);
                if let Some((_, _, addrs, _)) = known {
                    r.set_host(&name, addrs);
                }
            }
        }
        if let Some(client) = self.clients.get_mut(ci) {
            client.hits = alloc::vec![0; rules.as_ref().map(|r| r.rules.len() + 1).unwrap_or(0)];
            client.rules = rules;
        }
    }

    /// Gives what names resolved to to every rule set using them.
    fn apply_resolved(&mut self, resolved: Vec<Resolved>) {
        for r in resolved {
            for c in &mut self.clients {
                if let Ok(rules) = &mut c.rules {
                    if rules.v6 == r.v6 {
                        rules.set_host(&r.name, &r.addrs);
                    }
                }
            }
        }
    }

    /// The resolver's next query, as a UDP datagram to an upstream DNS
    /// server (from the resolver's port on the uplink address).
    fn poll_dns(&mut self, now: u64, buf: &mut [u8]) -> Option<(usize, usize)> {
        if self.resolver.is_empty() {
            return None;
        }
        let at = ETH_HEADER + IPV4_MIN_HEADER + 8;
        let (query, gave_up) = self.resolver.next_query(now, buf.get_mut(at..)?);
        self.apply_resolved(gave_up);
        let query = query?;
        let server = self.resolver.server(query.server)?;
        // Without the next hop's MAC this try is lost; the resolver tries
        // again in a second.
        let mac = self.uplink_next_hop(server, now)?;
        let udp_len = 8 + query.len;
        let l4 = ETH_HEADER + IPV4_MIN_HEADER;
        put_eth(buf, mac, self.mac(UPLINK), ETHERTYPE_IPV4);
        let uplink = self.cfg.uplink_ip;
        put_ipv4_header(
            buf,
            ETH_HEADER,
            20 + udp_len,
            TTL_OWN,
            PROTO_UDP,
            uplink,
            server,
        );
        put_u16(buf, l4, self.resolver_port);
        put_u16(buf, l4 + 2, DNS_PORT);
        put_u16(buf, l4 + 4, udp_len as u16);
        put_u16(buf, l4 + 6, 0);
        let sum = buf.get(l4..l4 + udp_len).map(|seg| {
            fold(sum16(
                seg,
                pseudo_header_sum(uplink, server, PROTO_UDP, udp_len),
            ))
        })?;
        put_u16(buf, l4 + 6, if sum == 0 { 0xffff } else { sum });
        self.stats.dns_queries_sent += 1;
        Some((UPLINK, l4 + udp_len))
    }

    /// A datagram to the resolver's port: an answer to one of its queries
    /// (taken, `Consumed`) or nothing it asked for (dropped).
    fn dns_answer(&mut self, now: u64, buf: &[u8], info: &Ipv4Info) -> Verdict {
        if info.fragment || !l4_checksum_ok(buf, info) {
            return self.drop(DropReason::UpstreamUnsolicited);
        }
        let msg = buf.get(info.l4 + 8..info.end).unwrap_or(&[]);
        match self.resolver.answer(now, info.src, msg) {
            Some(resolved) => {
                self.stats.dns_answers += 1;
                self.apply_resolved(alloc::vec![resolved]);
                Verdict::Consumed
            }
            None => self.drop(DropReason::UpstreamUnsolicited),
        }
    }

    fn poll_arp(&mut self, now: u64, buf: &mut [u8]) -> Option<(usize, usize)> {
        let uplink_mac = self.mac(UPLINK);
        let uplink_ip = self.cfg.uplink_ip;
        let arp = &self.arp;
        let w = self.wanted.iter_mut().find(|w| {
            let resolved = arp.iter().any(|e| e.ip == w.ip && e.expires > now);
            !resolved
                && w.last_sent
                    .is_none_or(|t| now.saturating_sub(t) >= ARP_RETRY_MS)
        })?;
        w.last_sent = Some(now);
        let req = Arp {
            op: ARP_REQUEST,
            sender_mac: uplink_mac,
            sender_ip: uplink_ip,
            target_mac: [0; 6],
            target_ip: w.ip,
        };
        let len = req.emit(buf, uplink_mac, BROADCAST);
        self.stats.arp_requests_sent += 1;
        (len > 0).then_some((UPLINK, len))
    }

    // ---- ICMP made here ----------------------------------------------------

    /// Turns the frame into an echo reply from `own_ip`, back out of `port`.
    fn echo_reply(&mut self, buf: &mut [u8], port: usize, info: &Ipv4Info) -> Verdict {
        if !l4_checksum_ok(buf, info) {
            return self.drop(DropReason::BadL4Checksum);
        }
        let l3 = info.l3;
        let own = self.mac(port);
        swap_macs(buf, own);
        put_ip(buf, l3 + 12, info.dst);
        put_ip(buf, l3 + 16, info.src);
        // TTL and type change; the address swap leaves both sums unchanged.
        let old_ttl = get_u16(buf, l3 + 8).unwrap_or(0);
        let new_ttl = (u16::from(TTL_OWN) << 8) | (old_ttl & 0xff);
        put_u16(buf, l3 + 8, new_ttl);
        let ipc = update16(get_u16(buf, l3 + 10).unwrap_or(0), old_ttl, new_ttl);
        put_u16(buf, l3 + 10, ipc);
        let old_type = get_u16(buf, info.l4).unwrap_or(0);
        put_u16(buf, info.l4, old_type & 0x00ff);
        let c = update16(
            get_u16(buf, info.l4 + 2).unwrap_or(0),
            old_type,
            old_type & 0x00ff,
        );
        put_u16(buf, info.l4 + 2, c);
        self.stats.echo_replies += 1;
        Verdict::Forward {
            port,
            len: info.end,
        }
    }

    /// Replaces the frame by an ICMP error about it, from `from`, sent back
    /// out of `port` to the frame's sender. `drop` is counted either way.
    fn icmp_error(
        &mut self,
        now: u64,
        buf: &mut [u8],
        port: usize,
        info: &Ipv4Info,
        err: IcmpError,
    ) -> Verdict {
        let IcmpError {
            icmp_type,
            code,
            from,
            drop,
        } = err;
        self.stats.drops[drop as usize] += 1;
        // Never answer an ICMP error with another.
        let is_error = info.proto == PROTO_ICMP && !matches!(info.sport, 0 | 8 | 13 | 15 | 17);
        if is_error || !self.icmp_bucket.take(now) {
            self.stats.icmp_errors_suppressed += 1;
            return Verdict::Drop(drop);
        }
        let quote = (info.l4 + 8).min(info.end) - info.l3;
        let body = ETH_HEADER + IPV4_MIN_HEADER + 8;
        let total = body + quote;
        if buf.len() < total {
            return Verdict::Drop(drop);
        }
        buf.copy_within(info.l3..info.l3 + quote, body);
        let own = self.mac(port);
        swap_macs(buf, own);
        put_u16(buf, 12, ETHERTYPE_IPV4);
        put_ipv4_header(
            buf,
            ETH_HEADER,
            total - ETH_HEADER,
            TTL_OWN,
            PROTO_ICMP,
            from,
            info.src,
        );
        let l4 = ETH_HEADER + IPV4_MIN_HEADER;
        put_bytes(buf, l4, &[icmp_type, code, 0, 0, 0, 0, 0, 0]);
        let c = checksum(&buf[l4..total]);
        put_u16(buf, l4 + 2, c);
        self.stats.icmp_errors_sent += 1;
        Verdict::Forward { port, len: total }
    }

    // ---- From clients --------------------------------------------------------

    /// A client's IPv4 packet: the fast path here, everything else in
    /// `client_packet_slow`.
    #[inline(never)]
    fn client_packet(&mut self, now: u64, port: usize, buf: &mut [u8], info: &Ipv4Info) -> Verdict {
        // Fast path: a packet of a tracked flow. Flows exist only for a
        // connected client's traffic that passed every check below, so
        // what is left to check is the client's port (anti-spoofing) and
        // the TTL.
        let tuple = client_tuple(buf, info);
        let src_mac = get_mac(buf, 6).unwrap_or([0; 6]);
        if let (0, true, Some(t)) = (info.frag_offset, info.ttl > 1, &tuple) {
            let hit = self.ct.by_client(t, now).map(|f| {
                let bound = bind(
                    &mut self.clients,
                    &self.pinned,
                    f.owner as usize,
                    port,
                    src_mac,
                );
                if bound {
                    f.touch(now, true, info.tcp_flags);
                }
                (bound, f.outbound())
            });
            match hit {
                Some((true, flow)) => return self.send_upstream(now, buf, info, &flow),
                Some((false, _)) => return self.drop(DropReason::Spoofed),
                None => {}
            }
        }
        let key = tuple.map(|t| self.ct.key(t));
        self.client_packet_slow_outlined(now, port, buf, info, key, src_mac)
    }

    /// `client_packet_slow`, out of line, for the general path.
    #[inline(never)]
    fn client_packet_slow_outlined(
        &mut self,
        now: u64,
        port: usize,
        buf: &mut [u8],
        info: &Ipv4Info,
        key: Option<Key>,
        src_mac: Mac,
    ) -> Verdict {
        self.client_packet_slow(now, port, buf, info, key, src_mac)
    }

    /// A client's packet that is not of a tracked flow (or is a later
    /// fragment, or has no TTL left): every check, then maybe a new flow.
    /// Compiled into `after_fast` (where the fast path's new flows come
    /// from: 20 fewer instructions and 15 fewer loads and stores per new
    /// flow than a call) and, as `client_packet_slow_outlined`, out of line for
    /// `client_packet`, whose own flow lookup it would crowd (+10
    /// instructions per packet with the fast path off).
    #[inline(always)]
    fn client_packet_slow(
        &mut self,
        now: u64,
        port: usize,
        buf: &mut [u8],
        info: &Ipv4Info,
        key: Option<Key>,
        src_mac: Mac,
    ) -> Verdict {
        let Some(ci) = self.client_index.get(&info.src) else {
            return self.drop(DropReason::Spoofed);
        };
        if !self.bind_client(ci, port, src_mac) {
            return self.drop(DropReason::Spoofed);
        }
        let gw = self.cfg.client_gateway;
        if info.dst == gw || info.dst == self.cfg.uplink_ip {
            if info.fragment {
                return self.drop(DropReason::ToFirewall);
            }
            if info.proto == PROTO_ICMP && info.sport == 8 {
                return self.echo_reply(buf, port, info);
            }
            return self.drop(DropReason::ToFirewall);
        }
        if self.client_index.contains_key(&info.dst) {
            return self.drop(DropReason::ClientToClient);
        }
        if info.frag_offset != 0 {
            return self.later_fragment(now, buf, info);
        }
        if info.ttl <= 1 {
            let err = IcmpError {
                icmp_type: 11,
                code: 0,
                from: gw,
                drop: DropReason::TtlExceeded,
            };
            return self.icmp_error(now, buf, port, info, err);
        }
        let key = match key {
            Some(k) => k,
            None if info.proto == PROTO_ICMP => return self.drop(DropReason::IcmpUnsupported),
            None => return self.drop(DropReason::ProtoUnsupported),
        };
        // The fast path looked this tuple up already (first fragment or
        // whole datagram, TTL above 1): it starts a flow.
        if !l4_checksum_ok(buf, info) {
            return self.drop(DropReason::BadL4Checksum);
        }
        self.new_flow(now, port, ci, key, buf, info)
    }

    /// Runs the client's rules on a packet that starts a flow, creates the
    /// flow when they accept it and sends the packet on, translated. (It
    /// sends the packet itself: handing the translation back through
    /// memory for the caller to send cost a new flow 18 more instructions
    /// and 16 more loads and stores.)
    fn new_flow(
        &mut self,
        now: u64,
        port: usize,
        ci: usize,
        key: Key,
        buf: &mut [u8],
        info: &Ipv4Info,
    ) -> Verdict {
        if let Err(reason) = self.check_rules(ci, info) {
            return self.refuse(now, port, buf, info, reason);
        }
        // DNS to a virtual DNS address goes to the matching upstream server.
        let (mut remote, remote_port) = (info.dst, key.tuple().dport);
        if info.proto != PROTO_ICMP && info.dport == 53 {
            if let Some(i) = self
                .cfg
                .virtual_dns
                .iter()
                .position(|d| *d == Some(info.dst))
            {
                if let Some(real) = self.cfg.upstream_dns[i].or(self.cfg.upstream_dns[0]) {
                    remote = real;
                    self.stats.dns_redirected += 1;
                }
            }
        }
        let flow = match self
            .ct
            .create_owned(key, remote, remote_port, now, ci as u32)
        {
            Ok(f) => f.outbound(),
            Err(e) => return self.drop(e.into()),
        };
        self.stats.flows_created += 1;
        self.send_upstream(now, buf, info, &flow)
    }

    /// A packet the rules did not let start a flow: a rule's drop is
    /// answered with ICMP admin-prohibited, anything else only counted.
    #[cold]
    #[inline(never)]
    fn refuse(
        &mut self,
        now: u64,
        port: usize,
        buf: &mut [u8],
        info: &Ipv4Info,
        reason: DropReason,
    ) -> Verdict {
        if reason != DropReason::RuleReject {
            return self.drop(reason);
        }
        let err = IcmpError {
            icmp_type: 3,
            code: 13,
            from: self.cfg.client_gateway,
            drop: DropReason::RuleReject,
        };
        self.icmp_error(now, buf, port, info, err)
    }

    /// Runs client `ci`'s rules on the first packet of an IPv4 flow (see
    /// `check_probe`). Out of line, with the rule lookup inlined in it:
    /// inlined into `new_flow`, it cost 24 more instructions and 26 more
    /// loads and stores per new flow. It builds the probe itself, from
    /// the parsed header: built by `new_flow`, the probe went through
    /// memory, and the lookup's 8-byte read of its address, written by a
    /// 4-byte store just before, stalled on store forwarding.
    #[inline(never)]
    fn check_rules(&mut self, ci: usize, info: &Ipv4Info) -> Result<(), DropReason> {
        let icmp = info.proto == PROTO_ICMP;
        let probe = Probe {
            proto: info.proto,
            dst: IpAddr::V4(info.dst),
            dport: if icmp { 0 } else { info.dport },
            icmp_type: if icmp { info.sport as u8 } else { 0 },
            to_dns: self.is_dns_address(info.dst),
        };
        let have_dns = self.have_dns();
        self.check_probe(ci, &probe, have_dns, info.tcp_flags)
    }

    /// Runs client `ci`'s rules on the first packet of a flow and counts
    /// the hit; a TCP flow must also start with a bare SYN.
    #[inline(always)]
    fn check_probe(
        &mut self,
        ci: usize,
        probe: &Probe,
        have_dns: bool,
        tcp_flags: u8,
    ) -> Result<(), DropReason> {
        let client = &mut self.clients[ci];
        let rules = client
            .rules
            .as_ref()
            .map_err(|_| DropReason::RulesInvalid)?;
        if rules.pending() {
            // A name of these rules is still being looked up.
            return Err(DropReason::RulesPending);
        }
        let (action, rule) = rules.decide(probe, have_dns);
        let hit = rule.unwrap_or(rules.rules.len());
        if let Some(h) = client.hits.get_mut(hit) {
            *h += 1;
        }
        if action == Action::Drop {
            return Err(DropReason::RuleReject);
        }
        if probe.proto == PROTO_TCP
            && (tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN)) != TCP_SYN
        {
            return Err(DropReason::TcpNotSyn);
        }
        Ok(())
    }

    /// The MAC of the next hop towards `dst` on the uplink (`dst` itself
    /// on the uplink's subnet, else the gateway); ARP is asked when it is
    /// not known. Inlined (a call cost a new flow 18 more instructions).
    #[inline(always)]
    fn uplink_next_hop(&mut self, dst: Ipv4Addr, now: u64) -> Option<Mac> {
        let hop = if self.cfg.on_uplink_subnet(dst) {
            dst
        } else {
            self.cfg.gateway
        };
        let mac = self.arp_lookup(hop, now);
        if mac.is_none() {
            self.arp_want(hop);
        }
        mac
    }

    /// Sends the frame's first `len` bytes out of the uplink to `mac`.
    #[inline]
    fn send_on_uplink(&mut self, buf: &mut [u8], mac: Mac, ethertype: u16, len: usize) -> Verdict {
        put_eth(buf, mac, self.mac(UPLINK), ethertype);
        self.stats.to_upstream += 1;
        Verdict::Forward { port: UPLINK, len }
    }

    #[inline(always)]
    fn send_upstream(
        &mut self,
        now: u64,
        buf: &mut [u8],
        info: &Ipv4Info,
        flow: &Outbound,
    ) -> Verdict {
        let Some(mac) = self.uplink_next_hop(flow.remote, now) else {
            return self.drop(DropReason::ArpUnresolved);
        };
        // (An ICMP echo flow's remote port is 0; `sport` is its identifier.)
        let (sport, dport) = (flow.nat_port, flow.remote_port);
        if info.more_fragments {
            let rewrite_to = (self.cfg.uplink_ip, flow.remote);
            if let Err(reason) = self.frags.start(Piece::of(info), rewrite_to, None, now) {
                return self.drop(reason);
            }
        }
        let (up, remote) = ((self.cfg.uplink_ip, sport), (flow.remote, dport));
        rewrite(buf, info, up, remote, flow.deltas);
        self.send_on_uplink(buf, mac, ETHERTYPE_IPV4, info.end)
    }

    // ---- From upstream ---------------------------------------------------------

    fn upstream_packet(&mut self, now: u64, buf: &mut [u8], info: &Ipv4Info) -> Verdict {
        if info.dst != self.cfg.uplink_ip {
            return self.drop(DropReason::NotForUs);
        }
        if info.frag_offset != 0 {
            return self.later_fragment(now, buf, info);
        }
        if info.proto == PROTO_UDP && info.dport == self.resolver_port && info.sport == DNS_PORT {
            return self.dns_answer(now, buf, info);
        }
        let uplink = self.cfg.uplink_ip;
        let reply = match info.proto {
            PROTO_ICMP if info.fragment && info.sport != 0 => {
                return self.drop(DropReason::Fragment)
            }
            PROTO_ICMP if info.sport == 8 => return self.echo_reply(buf, UPLINK, info),
            PROTO_ICMP if info.sport == 0 => {
                let id = get_u16(buf, info.l4 + 4).unwrap_or(0);
                Tuple {
                    proto: PROTO_ICMP,
                    src: info.src,
                    sport: 0,
                    dst: uplink,
                    dport: id,
                }
            }
            PROTO_ICMP if matches!(info.sport, 3 | 11 | 12) => {
                return self.icmp_error_from_upstream(now, buf, info)
            }
            PROTO_TCP | PROTO_UDP => Tuple {
                proto: info.proto,
                src: info.src,
                sport: info.sport,
                dst: uplink,
                dport: info.dport,
            },
            _ => return self.drop(DropReason::UpstreamUnsolicited),
        };
        let Some(flow) = self.ct.answer(&reply, now, info.tcp_flags) else {
            return self.drop(DropReason::UpstreamUnsolicited);
        };
        if info.ttl <= 1 {
            return self.drop(DropReason::TtlExceeded);
        }
        // For ICMP echo, `rewrite` takes the identifier as the source port.
        let (sport, dport) = flow.ports;
        if info.more_fragments {
            let piece = Piece::of(info);
            if let Err(reason) = self.frags.start(
                piece,
                (flow.client_dst, flow.client_src),
                Some(flow.client_src),
                now,
            ) {
                return self.drop(reason);
            }
        }
        rewrite(
            buf,
            info,
            (flow.client_dst, sport),
            (flow.client_src, dport),
            flow.deltas,
        );
        self.deliver(buf, Some(flow.owner as usize), info.end, ETHERTYPE_IPV4)
    }

    /// A fragment after the first: it follows the first fragment's verdict
    /// and translation, in order, or is dropped.
    fn later_fragment(&mut self, now: u64, buf: &mut [u8], info: &Ipv4Info) -> Verdict {
        let (src, dst, to_client) = match self.frags.next(Piece::of(info), now) {
            Ok(t) => t,
            Err(reason) => return self.drop(reason),
        };
        if info.ttl <= 1 {
            return self.drop(DropReason::TtlExceeded);
        }
        let addresses = ChecksumDelta::default()
            .dword(u32::from(info.src), u32::from(src))
            .dword(u32::from(info.dst), u32::from(dst));
        rewrite_ip(buf, info, src, dst, addresses);
        match to_client {
            Some(client) => self.send_to_client(buf, client, info.end),
            None => match self.uplink_next_hop(dst, now) {
                Some(mac) => self.send_on_uplink(buf, mac, ETHERTYPE_IPV4, info.end),
                None => self.drop(DropReason::ArpUnresolved),
            },
        }
    }

    /// `set_forward_only`'s path for an IPv4 frame.
    fn forward_plain(&mut self, now: u64, port: usize, buf: &mut [u8], info: &Ipv4Info) -> Verdict {
        if port == UPLINK {
            return self.send_to_client(buf, info.dst, info.end);
        }
        let src_mac = get_mac(buf, 6).unwrap_or([0; 6]);
        let bound = match self.client_index.get(&info.src) {
            Some(ci) => self.bind_client(ci, port, src_mac),
            None => false,
        };
        if !bound {
            return self.drop(DropReason::Spoofed);
        }
        match self.uplink_next_hop(info.dst, now) {
            Some(mac) => self.send_on_uplink(buf, mac, ETHERTYPE_IPV4, info.end),
            None => self.drop(DropReason::ArpUnresolved),
        }
    }

    /// Sends a rewritten frame to client `ip` on its port.
    fn send_to_client(&mut self, buf: &mut [u8], ip: Ipv4Addr, len: usize) -> Verdict {
        let ci = self.client_index.get(&ip);
        self.deliver(buf, ci, len, ETHERTYPE_IPV4)
    }

    /// Sends a rewritten frame to client number `ci`, on the port and MAC
    /// it was bound to.
    fn deliver(
        &mut self,
        buf: &mut [u8],
        ci: Option<usize>,
        len: usize,
        ethertype: u16,
    ) -> Verdict {
        let Some(c) = ci.and_then(|i| self.clients.get(i)) else {
            return self.drop(DropReason::ClientUnreachable);
        };
        let (Some(port), Some(mac)) = (c.port, c.mac) else {
            return self.drop(DropReason::ClientUnreachable);
        };
        put_eth(buf, mac, self.mac(port), ethertype);
        self.stats.to_clients += 1;
        Verdict::Forward { port, len }
    }

    /// An ICMP error from upstream quoting a packet we translated: the
    /// quoted packet and the outer destination are translated back.
    fn icmp_error_from_upstream(&mut self, now: u64, buf: &mut [u8], info: &Ipv4Info) -> Verdict {
        if !l4_checksum_ok(buf, info) {
            return self.drop(DropReason::BadL4Checksum);
        }
        let inner = info.l4 + 8;
        let Some(ihl) = get_u8(buf, inner).map(|v| usize::from(v & 0x0f) * 4) else {
            return self.drop(DropReason::BadL4Header);
        };
        let il4 = inner + ihl;
        if ihl < IPV4_MIN_HEADER || il4 + 8 > info.end {
            return self.drop(DropReason::BadL4Header);
        }
        let (Some(proto), Some(isrc), Some(idst)) = (
            get_u8(buf, inner + 9),
            get_ip(buf, inner + 12),
            get_ip(buf, inner + 16),
        ) else {
            return self.drop(DropReason::BadL4Header);
        };
        if isrc != self.cfg.uplink_ip {
            return self.drop(DropReason::UpstreamUnsolicited);
        }
        let [a, b, id] = [0, 2, 4].map(|o| get_u16(buf, il4 + o).unwrap_or(0));
        let reply = quoted_reply(proto, (isrc, idst), [a, b, id]);
        let Some(flow) = reply.and_then(|r| self.ct.by_reply(&r, now).copied()) else {
            return self.drop(DropReason::UpstreamUnsolicited);
        };
        if info.ttl <= 1 {
            return self.drop(DropReason::TtlExceeded);
        }
        let c = flow.client;
        // Inner packet: source back to the client, destination back to what
        // the client addressed.
        put_ip(buf, inner + 12, c.src);
        put_ip(buf, inner + 16, c.dst);
        match proto {
            PROTO_TCP | PROTO_UDP => {
                put_u16(buf, il4, c.sport);
                put_u16(buf, il4 + 2, c.dport);
                if proto == PROTO_UDP {
                    // The UDP checksum is in the quoted 8 bytes: keep it right.
                    let old = get_u16(buf, il4 + 6).unwrap_or(0);
                    if old != 0 {
                        let mut s = update32(old, u32::from(isrc), u32::from(c.src));
                        s = update32(s, u32::from(idst), u32::from(c.dst));
                        s = update16(s, a, c.sport);
                        s = update16(s, b, c.dport);
                        put_u16(buf, il4 + 6, s);
                    }
                }
            }
            _ => {
                put_u16(buf, il4 + 4, c.sport);
            }
        }
        put_u16(buf, inner + 10, 0);
        let ic = checksum(buf.get(inner..il4).unwrap_or(&[]));
        put_u16(buf, inner + 10, ic);
        // Outer: to the client, with TTL decremented; the ICMP checksum is
        // recomputed over the whole message, which is in the frame.
        let old_dst = u32::from(info.dst);
        put_ip(buf, info.l3 + 16, c.src);
        let old_ttl = get_u16(buf, info.l3 + 8).unwrap_or(0);
        let new_ttl = old_ttl.wrapping_sub(0x100);
        put_u16(buf, info.l3 + 8, new_ttl);
        let mut ipc = update32(
            get_u16(buf, info.l3 + 10).unwrap_or(0),
            old_dst,
            u32::from(c.src),
        );
        ipc = update16(ipc, old_ttl, new_ttl);
        put_u16(buf, info.l3 + 10, ipc);
        put_u16(buf, info.l4 + 2, 0);
        let cs = checksum(buf.get(info.l4..info.end).unwrap_or(&[]));
        put_u16(buf, info.l4 + 2, cs);
        self.deliver(buf, Some(flow.owner as usize), info.end, ETHERTYPE_IPV4)
    }

    /// Reclaims expired flows; call now and then with a small budget.
    pub fn expire(&mut self, now: u64, budget: usize) {
        self.ct.expire(now, budget);
        self.ct6.expire(now, budget);
    }
}

/// The reply tuple of a packet the firewall sent, from the copy an ICMP
/// error quotes: `(ours, remote)` its addresses, `words` its first three
/// transport words (ports; for an echo request, type and identifier).
/// `None` for anything the firewall does not send.
fn quoted_reply<A: Addr>(proto: u8, (ours, remote): (A, A), words: [u16; 3]) -> Option<Tuple<A>> {
    let [a, b, id] = words;
    let (sport, dport) = match proto {
        PROTO_TCP | PROTO_UDP => (b, a),
        PROTO_ICMP if a >> 8 == 8 => (0, id),
        PROTO_ICMPV6 if a >> 8 == u16::from(crate::ipv6::ICMPV6_ECHO_REQUEST) => (0, id),
        _ => return None,
    };
    Some(Tuple {
        proto,
        src: remote,
        sport,
        dst: ours,
        dport,
    })
}

/// Rewrites the IPv4 addresses and decrements the TTL, updating the header
/// checksum incrementally by `addresses`, the change of the addresses.
#[inline(always)]
fn rewrite_ip(
    buf: &mut [u8],
    info: &Ipv4Info,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    addresses: ChecksumDelta,
) {
    let Some(h) = buf.get_mut(info.l3..info.l3 + IPV4_MIN_HEADER) else {
        return;
    };
    let ipc = addresses
        .and(TTL_DELTA)
        .apply(u16::from_be_bytes([h[10], h[11]]));
    h[8] = h[8].wrapping_sub(1);
    h[10..12].copy_from_slice(&ipc.to_be_bytes());
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
}

/// The checksum change of a TTL (or hop limit) decrement: the 16-bit word
/// TTL·256 + protocol loses 0x100, and `~old + new` ≡ −0x100.
const TTL_DELTA: ChecksumDelta = ChecksumDelta::folded(0xfeff);

/// Rewrites addresses and ports (for ICMP echo: `sport` is the identifier)
/// of a flow's packet and decrements the TTL, updating the checksums by
/// the flow's `deltas` (addresses, ports) — see `Flow::out_deltas`.
#[inline]
fn rewrite(
    buf: &mut [u8],
    info: &Ipv4Info,
    (src, sport): (Ipv4Addr, u16),
    (dst, dport): (Ipv4Addr, u16),
    (addresses, ports): (ChecksumDelta, ChecksumDelta),
) {
    rewrite_ip(buf, info, src, dst, addresses);
    rewrite_l4(buf, info.l4, info.proto, (addresses, ports), sport, dport);
}

/// Rewrites the transport header at `l4`: the ports, or for an ICMP or
/// ICMPv6 echo the identifier (given as `sport`), updating its checksum
/// incrementally by the port change and by the address change (the
/// pseudo-header, which ICMP over IPv4 does not cover).
#[inline(always)]
fn rewrite_l4(
    buf: &mut [u8],
    l4: usize,
    proto: u8,
    (addresses, ports): (ChecksumDelta, ChecksumDelta),
    sport: u16,
    dport: u16,
) {
    match proto {
        // (A fixed-size header each, so the writes need no bounds checks
        // beyond the one: with the checksum's offset a run-time value, a
        // new flow took 13 more instructions, an established packet 4 to
        // 22 more.)
        PROTO_TCP => {
            if let Some(seg) = buf.get_mut(l4..).and_then(|s| s.first_chunk_mut::<18>()) {
                rewrite_ports(seg, addresses.and(ports), sport, dport, false);
            }
        }
        PROTO_UDP => {
            if let Some(seg) = buf.get_mut(l4..).and_then(|s| s.first_chunk_mut::<8>()) {
                rewrite_ports(seg, addresses.and(ports), sport, dport, true);
            }
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            let Some(seg) = buf.get_mut(l4..l4 + 6) else {
                return;
            };
            let delta = if proto == PROTO_ICMPV6 {
                addresses.and(ports)
            } else {
                ports
            };
            let c = delta.apply(u16::from_be_bytes([seg[2], seg[3]]));
            seg[2..4].copy_from_slice(&c.to_be_bytes());
            seg[4..6].copy_from_slice(&sport.to_be_bytes());
        }
        _ => {}
    }
}

/// Writes the ports at the start of a TCP or UDP header whose checksum
/// is its last two bytes (`N` is 18 for TCP, 8 for UDP), updating the
/// checksum by `delta`. A UDP checksum of zero means none was sent, and
/// none is kept; a computed zero is sent as all ones.
#[inline(always)]
fn rewrite_ports<const N: usize>(
    seg: &mut [u8; N],
    delta: ChecksumDelta,
    sport: u16,
    dport: u16,
    udp: bool,
) {
    // (Always matches: `N` is at least 8.)
    let [p0, p1, p2, p3, .., c0, c1] = &mut seg[..] else {
        return;
    };
    [*p0, *p1] = sport.to_be_bytes();
    [*p2, *p3] = dport.to_be_bytes();
    let old = u16::from_be_bytes([*c0, *c1]);
    if udp && old == 0 {
        return;
    }
    let mut c = delta.apply(old);
    if udp && c == 0 {
        c = 0xffff;
    }
    [*c0, *c1] = c.to_be_bytes();
}

mod clients;
mod fast;
pub use fast::Batch;
#[cfg(test)]
mod tests;
mod v6;
