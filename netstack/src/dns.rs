//! A stub resolver for `dsthost` rules: the names are looked up through the
//! upstream DNS servers when the rules load (as the Qubes firewall agent
//! does with `getaddrinfo`) and again when their TTL runs out.
//!
//! Pure logic: `Resolver` says which query to send next (`next_query`) and
//! takes the answers (`answer`); the firewall builds and receives the UDP
//! datagrams. Each (name, family) is one entry: A records for an IPv4
//! client's rules, AAAA for an IPv6 client's. A query is retried every
//! `RETRY_MS`, `TRIES` times per server, over both servers. When every try
//! of a first lookup fails, or the name does not exist, the entry resolves
//! to no addresses (its rules match nothing); when a later lookup gets no
//! answer, the addresses it had stay. Either way it is asked again after
//! `NEGATIVE_TTL_MS`.
//! Answers are checked against the outstanding query (id, server, the
//! question) and parsed with bounds on every field and on compression
//! pointers; anything else is ignored.

use alloc::string::String;
use alloc::vec::Vec;
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::wire::{get_u16, get_u32, get_u8, put_bytes, put_u16, put_u8};

pub const DNS_PORT: u16 = 53;
/// The UDP source port of the firewall's own queries: below the NAT port
/// range, so no client flow ever takes it.
pub const RESOLVER_PORT: u16 = 1023;
const RETRY_MS: u64 = 1000;
const TRIES: u8 = 3;
const MIN_TTL_MS: u64 = 30_000;
const MAX_TTL_MS: u64 = 24 * 3600 * 1000;
const NEGATIVE_TTL_MS: u64 = 60_000;
/// Addresses kept per name.
const MAX_ADDRS: usize = 16;
const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;
/// Longest query written: header, a 255-byte name, type and class.
pub const MAX_QUERY: usize = 12 + 255 + 4;

/// Where an entry stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// A query should go out (first lookup, or the TTL ran out).
    Due,
    /// A query is out: its id, to which server, when, the how-many-th.
    Waiting {
        id: u16,
        server: usize,
        sent: u64,
        tries: u8,
    },
    /// Answered (or given up on) until `expires`.
    Done,
}

#[derive(Debug, Clone)]
struct Entry {
    name: String,
    v6: bool,
    addrs: Vec<IpAddr>,
    /// Resolved at least once (an empty answer counts).
    resolved: bool,
    state: State,
    expires: u64,
}

impl Entry {
    /// What the rules using this name are told: its addresses now.
    fn report(&self) -> Resolved {
        Resolved {
            name: self.name.clone(),
            v6: self.v6,
            addrs: self.addrs.clone(),
        }
    }

    /// Settles a name that was never resolved as resolving to nothing,
    /// once: the report for the rules waiting on it, `None` if they had
    /// one already (whatever addresses are known stay).
    fn settle_unresolved(&mut self) -> Option<Resolved> {
        if self.resolved {
            return None;
        }
        self.resolved = true;
        Some(self.report())
    }
}

/// A query to send: to `servers[server]`, `len` bytes written into the
/// caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query {
    pub server: usize,
    pub len: usize,
}

/// A name whose addresses changed: for the rules of that family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub name: String,
    pub v6: bool,
    pub addrs: Vec<IpAddr>,
}

/// Whether `name` can be asked: dot-separated labels of 1..=63 letters,
/// digits, `-` or `_`, at most 253 bytes (a trailing dot allowed).
pub fn valid_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            (1..=63).contains(&l.len())
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[derive(Debug, Clone)]
pub struct Resolver {
    entries: Vec<Entry>,
    servers: Vec<Ipv4Addr>,
    /// xorshift state for query ids.
    rng: u32,
}

impl Resolver {
    /// A resolver for `names` ((name, IPv6?) pairs; invalid names resolve
    /// at once to nothing), asking `servers` in turn. `seed` varies the
    /// query ids.
    pub fn new<'a>(
        names: impl IntoIterator<Item = (&'a str, bool)>,
        servers: Vec<Ipv4Addr>,
        seed: u32,
    ) -> Self {
        let mut r = Self {
            entries: Vec::new(),
            servers,
            rng: seed | 1,
        };
        for (name, v6) in names {
            r.add(name, v6);
        }
        r
    }

    /// Adds (`name`, family) unless it is there already (a rule set that
    /// dom0 replaced may bring new names); it is asked at the next query.
    pub fn add(&mut self, name: &str, v6: bool) {
        if self.entries.iter().any(|e| e.v6 == v6 && e.name == name) {
            return;
        }
        let askable = valid_name(name) && !self.servers.is_empty();
        self.entries.push(Entry {
            name: name.into(),
            v6,
            addrs: Vec::new(),
            resolved: !askable,
            state: if askable { State::Due } else { State::Done },
            expires: if askable { 0 } else { u64::MAX },
        });
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// New servers (the uplink's DNS changed): every name is asked again,
    /// from them (a query out to an old server is forgotten: its answer
    /// matches nothing). Addresses already known stay until the new
    /// answers. With no server, nothing is asked and what is known stays;
    /// a name never resolved is then settled, resolving to nothing, as at
    /// creation: returned, for the rules waiting on it.
    pub fn set_servers(&mut self, servers: Vec<Ipv4Addr>) -> Vec<Resolved> {
        self.servers = servers;
        let askable = !self.servers.is_empty();
        let mut settled = Vec::new();
        for e in &mut self.entries {
            if askable && valid_name(&e.name) {
                e.state = State::Due;
                continue;
            }
            e.state = State::Done;
            e.expires = u64::MAX;
            settled.extend(e.settle_unresolved());
        }
        settled
    }

    /// Server number `i` (as in `Query::server`).
    pub fn server(&self, i: usize) -> Option<Ipv4Addr> {
        self.servers.get(i).copied()
    }

    /// Whether (`name`, family) has been resolved at least once.
    pub fn resolved(&self, name: &str, v6: bool) -> bool {
        self.entries
            .iter()
            .any(|e| e.v6 == v6 && e.name == name && e.resolved)
    }

    /// Every entry: name, family, addresses, resolved yet.
    pub fn entries(&self) -> impl Iterator<Item = (&str, bool, &[IpAddr], bool)> {
        self.entries
            .iter()
            .map(|e| (e.name.as_str(), e.v6, e.addrs.as_slice(), e.resolved))
    }

    fn next_id(&mut self) -> u16 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.rng = x;
        x as u16
    }

    /// The next query due at `now`, written into `buf` (the DNS message
    /// only), and the entries given up on since the last call (resolved
    /// to nothing). `None` when nothing is due.
    pub fn next_query(&mut self, now: u64, buf: &mut [u8]) -> (Option<Query>, Vec<Resolved>) {
        let mut gave_up = Vec::new();
        let servers = self.servers.len();
        let mut pick = None;
        for (i, e) in self.entries.iter_mut().enumerate() {
            match e.state {
                State::Done if e.expires <= now => e.state = State::Due,
                State::Waiting {
                    server,
                    sent,
                    tries,
                    ..
                } if now.saturating_sub(sent) >= RETRY_MS => {
                    // The next try: same server up to TRIES, then the next.
                    let (server, tries) = if tries < TRIES {
                        (server, tries + 1)
                    } else {
                        (server + 1, 1)
                    };
                    if server >= servers {
                        e.state = State::Done;
                        e.expires = now.saturating_add(NEGATIVE_TTL_MS);
                        // Never answered: the name resolves to nothing.
                        // Answered before: the addresses stay (dropping them
                        // would lift a `drop` rule on the name whenever the
                        // servers are unreachable); asked again later.
                        gave_up.extend(e.settle_unresolved());
                        continue;
                    }
                    if pick.is_none() {
                        pick = Some((i, server, tries));
                    }
                    continue;
                }
                _ => {}
            }
            if e.state == State::Due && pick.is_none() {
                pick = Some((i, 0, 1));
            }
        }
        let Some((i, server, tries)) = pick else {
            return (None, gave_up);
        };
        let id = self.next_id();
        let e = &mut self.entries[i];
        let qtype = if e.v6 { TYPE_AAAA } else { TYPE_A };
        let len = encode_query(buf, id, &e.name, qtype);
        if len == 0 {
            return (None, gave_up);
        }
        e.state = State::Waiting {
            id,
            server,
            sent: now,
            tries,
        };
        (Some(Query { server, len }), gave_up)
    }

    /// Takes a DNS message that arrived from `from` (port 53 to
    /// `RESOLVER_PORT`): if it answers an outstanding query, the entry is
    /// updated and returned; anything else is `None`.
    pub fn answer(&mut self, now: u64, from: Ipv4Addr, msg: &[u8]) -> Option<Resolved> {
        let id = get_u16(msg, 0)?;
        let server = self.servers.iter().position(|s| *s == from)?;
        let e = self.entries.iter_mut().find(|e| {
            matches!(e.state, State::Waiting { id: i, server: s, .. } if i == id && s == server)
        })?;
        let qtype = if e.v6 { TYPE_AAAA } else { TYPE_A };
        let parsed = parse_response(msg, &e.name, qtype)?;
        let (addrs, ttl) = match parsed {
            Response::Addresses(addrs, ttl) => (addrs, ttl),
            Response::NoSuchName => (Vec::new(), 0),
            Response::Failure => return None,
        };
        let ttl_ms = (u64::from(ttl) * 1000).clamp(MIN_TTL_MS, MAX_TTL_MS);
        e.state = State::Done;
        e.expires = now.saturating_add(if addrs.is_empty() {
            NEGATIVE_TTL_MS
        } else {
            ttl_ms
        });
        e.resolved = true;
        e.addrs = addrs;
        Some(e.report())
    }
}

/// Writes a recursive query for (`name`, `qtype`) into `buf`; its length,
/// or 0 when the name is not valid or `buf` too small.
pub fn encode_query(buf: &mut [u8], id: u16, name: &str, qtype: u16) -> usize {
    if !valid_name(name) {
        return 0;
    }
    let name = name.strip_suffix('.').unwrap_or(name);
    let len = 12 + name.len() + 2 + 4;
    if buf.len() < len {
        return 0;
    }
    put_u16(buf, 0, id);
    put_bytes(buf, 2, &[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD; one question
    let mut off = 12;
    for label in name.split('.') {
        put_u8(buf, off, label.len() as u8);
        put_bytes(buf, off + 1, label.as_bytes());
        off += 1 + label.len();
    }
    put_u8(buf, off, 0);
    put_u16(buf, off + 1, qtype);
    put_u16(buf, off + 3, CLASS_IN);
    len
}

/// What a response said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// The addresses of the asked type, and the smallest TTL among them
    /// (seconds); empty when the name has none of that type.
    Addresses(Vec<IpAddr>, u32),
    /// NXDOMAIN.
    NoSuchName,
    /// A server failure or refusal: worth asking again.
    Failure,
}

/// Reads a name at `off` (following compression pointers, at most 32 of
/// them, never forwards past the message) into `out` as lowercase
/// dot-separated text; returns the offset after the name where it was
/// written (not where a pointer led).
fn read_name(msg: &[u8], mut off: usize, out: &mut String) -> Option<usize> {
    let mut end = None;
    let mut jumps = 0;
    loop {
        let len = get_u8(msg, off)?;
        match len & 0xc0 {
            0xc0 => {
                let ptr = usize::from(get_u16(msg, off)? & 0x3fff);
                end.get_or_insert(off + 2);
                jumps += 1;
                if jumps > 32 || ptr >= msg.len() {
                    return None;
                }
                off = ptr;
            }
            0 if len == 0 => return Some(end.unwrap_or(off + 1)),
            0 => {
                let label = msg.get(off + 1..off + 1 + usize::from(len))?;
                if !out.is_empty() {
                    out.push('.');
                }
                if out.len() + label.len() > 255 {
                    return None;
                }
                out.extend(label.iter().map(|b| char::from(b.to_ascii_lowercase())));
                off += 1 + usize::from(len);
            }
            _ => return None,
        }
    }
}

/// Parses a response to the query (`name`, `qtype`): the header must be a
/// response to a standard query with exactly that one question; every A
/// or AAAA record of class IN in the answer section counts (CNAME chains
/// included), up to `MAX_ADDRS`. `None` for what is not such a response.
pub fn parse_response(msg: &[u8], name: &str, qtype: u16) -> Option<Response> {
    let flags = get_u16(msg, 2)?;
    let (qd, an) = (get_u16(msg, 4)?, get_u16(msg, 6)?);
    if flags & 0x8000 == 0 || (flags >> 11) & 0xf != 0 || qd != 1 {
        return None;
    }
    let mut asked = String::new();
    let mut off = read_name(msg, 12, &mut asked)?;
    let want = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    if asked != want || get_u16(msg, off)? != qtype || get_u16(msg, off + 2)? != CLASS_IN {
        return None;
    }
    off += 4;
    match flags & 0xf {
        0 => {}
        3 => return Some(Response::NoSuchName),
        _ => return Some(Response::Failure),
    }
    if flags & 0x0200 != 0 {
        // Truncated: the answer may be missing records; ask again (TCP is
        // not spoken here).
        return Some(Response::Failure);
    }
    let mut addrs = Vec::new();
    let mut ttl = u32::MAX;
    for _ in 0..an {
        let mut owner = String::new();
        off = read_name(msg, off, &mut owner)?;
        let (ty, class) = (get_u16(msg, off)?, get_u16(msg, off + 2)?);
        let rttl = get_u32(msg, off + 4)?;
        let rdlen = usize::from(get_u16(msg, off + 8)?);
        let rdata = msg.get(off + 10..off + 10 + rdlen)?;
        off += 10 + rdlen;
        if class != CLASS_IN || ty != qtype || addrs.len() >= MAX_ADDRS {
            continue;
        }
        let addr = match (ty, rdata.len()) {
            (TYPE_A, 4) => IpAddr::V4(Ipv4Addr::new(rdata[0], rdata[1], rdata[2], rdata[3])),
            (TYPE_AAAA, 16) => {
                let a: [u8; 16] = rdata.try_into().ok()?;
                IpAddr::V6(Ipv6Addr::from(a))
            }
            _ => return None,
        };
        if !addrs.contains(&addr) {
            addrs.push(addr);
        }
        ttl = ttl.min(rttl);
    }
    Some(Response::Addresses(
        addrs,
        if ttl == u32::MAX { 0 } else { ttl },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);

    /// A response to `query` with `answers` (type, ttl, rdata), the owner
    /// of each a pointer to the question's name.
    fn response(query: &[u8], rcode: u16, answers: &[(u16, u32, &[u8])]) -> Vec<u8> {
        let mut m = query.to_vec();
        put_u16(&mut m, 2, 0x8180 | rcode);
        put_u16(&mut m, 6, answers.len() as u16);
        for (ty, ttl, rdata) in answers {
            m.extend_from_slice(&[0xc0, 12]);
            m.extend_from_slice(&ty.to_be_bytes());
            m.extend_from_slice(&CLASS_IN.to_be_bytes());
            m.extend_from_slice(&ttl.to_be_bytes());
            m.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
            m.extend_from_slice(rdata);
        }
        m
    }

    #[test]
    fn names_and_queries() {
        assert!(valid_name("example.com") && valid_name("a-b.example.com."));
        for bad in ["", ".", "a..b", "exa mple.com", &"x".repeat(64), "ex/ample"] {
            assert!(!valid_name(bad), "{bad}");
        }
        let mut buf = [0u8; MAX_QUERY];
        let n = encode_query(&mut buf, 0x1234, "www.Example.com", TYPE_A);
        assert_eq!(
            &buf[..n],
            b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03www\x07Example\x03com\x00\x00\x01\x00\x01"
        );
        assert_eq!(encode_query(&mut buf[..10], 1, "example.com", TYPE_A), 0);
    }

    #[test]
    fn resolves_follows_cnames_and_expires() {
        let mut r = Resolver::new([("example.com", false)], vec![SERVER], 7);
        let mut buf = [0u8; MAX_QUERY];
        let (q, _) = r.next_query(0, &mut buf);
        let q = q.expect("a query is due at once");
        assert_eq!(q.server, 0);
        let query = buf[..q.len].to_vec();
        assert!(r.next_query(10, &mut buf).0.is_none(), "one query out");
        // A CNAME (not asked for: skipped), then two A records.
        let ans = response(
            &query,
            0,
            &[
                (5, 300, b"\x03cdn\x00"),
                (TYPE_A, 300, &[192, 0, 2, 1]),
                (TYPE_A, 100, &[192, 0, 2, 2]),
            ],
        );
        // From another address, or with another id: ignored.
        assert_eq!(r.answer(20, Ipv4Addr::new(10, 0, 2, 99), &ans), None);
        let mut wrong = ans.clone();
        wrong[1] ^= 1;
        assert_eq!(r.answer(20, SERVER, &wrong), None);
        assert!(!r.resolved("example.com", false));
        let got = r.answer(20, SERVER, &ans).expect("answer taken");
        assert_eq!(
            got.addrs,
            vec![IpAddr::from([192, 0, 2, 1]), IpAddr::from([192, 0, 2, 2])]
        );
        assert!(r.resolved("example.com", false));
        assert_eq!(r.answer(20, SERVER, &ans), None, "only once");
        // Asked again when the smallest TTL (100 s) runs out.
        assert!(r.next_query(20 + 99_000, &mut buf).0.is_none());
        assert!(r.next_query(20 + 100_000, &mut buf).0.is_some());
    }

    #[test]
    fn new_servers_are_asked_everything_again() {
        let mut r = Resolver::new([("example.com", false)], vec![SERVER], 7);
        let mut buf = [0u8; MAX_QUERY];
        let q = r.next_query(0, &mut buf).0.expect("due");
        let query = buf[..q.len].to_vec();
        let ans = response(&query, 0, &[(TYPE_A, 300, &[192, 0, 2, 1])]);
        assert!(r.answer(10, SERVER, &ans).is_some());
        assert!(r.next_query(20, &mut buf).0.is_none(), "answered for 300 s");
        // The uplink's DNS changed: the name is asked again, of the new
        // server; what the old one said stays meanwhile.
        let new = Ipv4Addr::new(192, 0, 2, 53);
        assert!(r.set_servers(vec![new]).is_empty());
        let q = r.next_query(30, &mut buf).0.expect("asked again");
        assert_eq!(r.server(q.server), Some(new));
        assert_eq!(
            r.entries().next().unwrap().2,
            &[IpAddr::from([192, 0, 2, 1])]
        );
        // The old server's late answer to the old query matches nothing.
        assert_eq!(r.answer(40, SERVER, &ans), None);
        // No server at all: nothing is asked, what is known stays.
        assert!(r.set_servers(Vec::new()).is_empty(), "resolved before");
        assert!(r.next_query(50, &mut buf).0.is_none());
        assert!(r.resolved("example.com", false));
        // A name still waiting when the servers go is settled to nothing
        // (and said so), as one is at creation without servers.
        let mut r = Resolver::new([("example.org", true)], vec![SERVER], 7);
        assert!(r.next_query(0, &mut buf).0.is_some());
        let settled = r.set_servers(Vec::new());
        assert_eq!(
            settled,
            [Resolved {
                name: "example.org".into(),
                v6: true,
                addrs: Vec::new()
            }]
        );
        assert!(r.resolved("example.org", true));
        assert!(r.next_query(60, &mut buf).0.is_none());
    }

    #[test]
    fn retries_then_the_other_server_then_gives_up() {
        let other = Ipv4Addr::new(10, 0, 2, 4);
        let mut r = Resolver::new([("example.com", true)], vec![SERVER, other], 7);
        let mut buf = [0u8; MAX_QUERY];
        let mut servers = Vec::new();
        let mut now = 0;
        loop {
            let (q, gave_up) = r.next_query(now, &mut buf);
            if let Some(q) = q {
                servers.push(q.server);
                assert_eq!(get_u16(&buf, q.len - 4), Some(TYPE_AAAA));
            }
            if !gave_up.is_empty() {
                assert!(gave_up[0].addrs.is_empty());
                break;
            }
            now += RETRY_MS;
            assert!(now < 60_000, "never gave up");
        }
        assert_eq!(servers, vec![0, 0, 0, 1, 1, 1]);
        assert!(r.resolved("example.com", true), "resolved to nothing");
    }

    #[test]
    fn a_failed_refresh_keeps_the_addresses() {
        let mut r = Resolver::new([("example.com", false)], vec![SERVER], 7);
        let mut buf = [0u8; MAX_QUERY];
        let q = r.next_query(0, &mut buf).0.unwrap();
        let ans = response(&buf[..q.len], 0, &[(TYPE_A, 60, &[192, 0, 2, 1])]);
        assert!(r.answer(1, SERVER, &ans).is_some());
        // The TTL runs out; no server answers any more.
        let mut now = 61_000;
        for _ in 0..10 {
            let (_, gave_up) = r.next_query(now, &mut buf);
            assert!(gave_up.is_empty(), "nothing is given up on");
            now += RETRY_MS;
        }
        let (_, _, addrs, resolved) = r.entries().next().unwrap();
        assert!(resolved);
        assert_eq!(addrs, &[IpAddr::from([192, 0, 2, 1])]);
    }

    #[test]
    fn nxdomain_and_failures() {
        let mut r = Resolver::new([("nope.example", false)], vec![SERVER], 3);
        let mut buf = [0u8; MAX_QUERY];
        let q = r.next_query(0, &mut buf).0.unwrap();
        let query = buf[..q.len].to_vec();
        // SERVFAIL: not an answer, the query stays out.
        assert_eq!(r.answer(1, SERVER, &response(&query, 2, &[])), None);
        let got = r.answer(2, SERVER, &response(&query, 3, &[])).unwrap();
        assert!(got.addrs.is_empty() && r.resolved("nope.example", false));
        // No servers, or an invalid name: resolved to nothing at once.
        let r = Resolver::new([("example.com", false), ("bad name", false)], vec![], 3);
        assert!(r.resolved("example.com", false) && r.resolved("bad name", false));
    }

    #[test]
    fn hostile_responses_are_refused_without_panic() {
        let mut buf = [0u8; MAX_QUERY];
        let n = encode_query(&mut buf, 9, "example.com", TYPE_A);
        let good = response(&buf[..n], 0, &[(TYPE_A, 60, &[1, 2, 3, 4])]);
        assert!(matches!(
            parse_response(&good, "example.com", TYPE_A),
            Some(Response::Addresses(..))
        ));
        // Another question, a pointer loop, a wrong-size A record.
        assert_eq!(parse_response(&good, "example.org", TYPE_A), None);
        let mut looped = good.clone();
        let at = n; // the answer's owner pointer
        looped[at + 1] = at as u8;
        assert_eq!(parse_response(&looped, "example.com", TYPE_A), None);
        let bad_len = response(&buf[..n], 0, &[(TYPE_A, 60, &[1, 2, 3])]);
        assert_eq!(parse_response(&bad_len, "example.com", TYPE_A), None);
        for cut in 0..good.len() {
            let _ = parse_response(&good[..cut], "example.com", TYPE_A);
        }
        for i in 0..good.len() {
            let mut g = good.clone();
            g[i] ^= 0xff;
            let _ = parse_response(&g, "example.com", TYPE_A);
        }
    }
}
