//! The QubesDB protocol (qubes-core-qubesdb `include/qubesdb.h`), as the
//! VM side speaks it to dom0's daemon over vchan port 111: the message
//! codec and the client's conversation.
//!
//! A message is a 72-byte header — `u8 type`, `char path[64]` (NUL
//! terminated), 3 bytes of padding, `u32 data_len` (little-endian) — then
//! `data_len` bytes, at most 3072. At start the VM sends MULTIREAD with an
//! empty path; dom0 answers one RESP_MULTIREAD per entry and ends with an
//! empty path and no data. Then dom0 pushes WRITE and RM (a path ending in
//! `/` removes everything under it), and the VM answers each with RESP_OK.
//! Dom0 writes a client's firewall rules under `/qubes-firewall/<ip>/` and
//! ends each update with an empty write to `/qubes-firewall/<ip>`
//! (`rules_committed`).
//!
//! Everything dom0 sends is checked: an unknown type, an oversized length,
//! a path that is not NUL-terminated, not UTF-8, not absolute or holds
//! characters QubesDB does not allow is an error, after which the stream
//! is out of step and the connection must be dropped (`Decoder` stays
//! failed).

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

pub const HEADER: usize = 72;
/// Bytes of the path field (the path itself at most one less).
pub const PATH_FIELD: usize = 64;
pub const MAX_DATA: usize = 3072;
/// The vchan port QubesDB uses.
pub const VCHAN_PORT: u32 = 111;

/// Message types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Read = 0,
    Write = 1,
    Multiread = 2,
    List = 3,
    Rm = 4,
    Watch = 5,
    Unwatch = 6,
    RespOk = 7,
    RespErrorNoent = 8,
    RespError = 9,
    RespRead = 10,
    RespMultiread = 11,
    RespList = 12,
    RespWatch = 13,
}

impl Kind {
    fn from_u8(t: u8) -> Option<Self> {
        use Kind::*;
        Some(match t {
            0 => Read,
            1 => Write,
            2 => Multiread,
            3 => List,
            4 => Rm,
            5 => Watch,
            6 => Unwatch,
            7 => RespOk,
            8 => RespErrorNoent,
            9 => RespError,
            10 => RespRead,
            11 => RespMultiread,
            12 => RespList,
            13 => RespWatch,
            _ => return None,
        })
    }
}

/// Why a message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QdbError {
    UnknownType(u8),
    DataTooLong(u32),
    /// The path field has no NUL, or the path is not UTF-8, not absolute
    /// (and not empty where an empty path is allowed), or holds a
    /// character outside `A-Za-z0-9` and `-_./:+@`.
    BadPath,
    /// A request to encode has a path or data beyond the protocol's sizes.
    TooLarge,
    /// An earlier error left the stream out of step.
    Failed,
}

/// One message: its type, path and data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub kind: Kind,
    pub path: String,
    pub data: Vec<u8>,
}

fn path_ok(p: &str) -> bool {
    p.is_empty()
        || (p.starts_with('/')
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_./:+@".contains(&b)))
}

/// Encodes a message.
pub fn encode(kind: Kind, path: &str, data: &[u8]) -> Result<Vec<u8>, QdbError> {
    if path.len() >= PATH_FIELD || data.len() > MAX_DATA || !path_ok(path) {
        return Err(QdbError::TooLarge);
    }
    let mut m = alloc::vec![0u8; HEADER];
    m[0] = kind as u8;
    m[1..1 + path.len()].copy_from_slice(path.as_bytes());
    m[68..72].copy_from_slice(&(data.len() as u32).to_le_bytes());
    m.extend_from_slice(data);
    Ok(m)
}

/// Decodes a header: the type, the path and the data length to follow.
pub fn decode_header(h: &[u8; HEADER]) -> Result<(Kind, String, usize), QdbError> {
    let kind = Kind::from_u8(h[0]).ok_or(QdbError::UnknownType(h[0]))?;
    let field = &h[1..1 + PATH_FIELD];
    let end = field
        .iter()
        .position(|&b| b == 0)
        .ok_or(QdbError::BadPath)?;
    let path = core::str::from_utf8(&field[..end]).map_err(|_| QdbError::BadPath)?;
    if !path_ok(path) {
        return Err(QdbError::BadPath);
    }
    let len = u32::from_le_bytes([h[68], h[69], h[70], h[71]]);
    if len as usize > MAX_DATA {
        return Err(QdbError::DataTooLong(len));
    }
    Ok((kind, path.to_string(), len as usize))
}

/// Splits a byte stream (what vchan delivers, in any pieces) into
/// messages.
#[derive(Debug, Default)]
pub struct Decoder(crate::Framer);

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes received.
    pub fn push(&mut self, bytes: &[u8]) {
        self.0.push(bytes);
    }

    /// The next whole message, if one has arrived.
    pub fn next_message(&mut self) -> Option<Result<Message, QdbError>> {
        let m = self.0.next(
            |h: &[u8; HEADER]| decode_header(h).map(|(kind, path, len)| ((kind, path), len)),
            QdbError::Failed,
        )?;
        Some(m.map(|((kind, path), data)| Message { kind, path, data }))
    }
}

/// What the conversation with dom0 reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The initial MULTIREAD is complete: every entry is in the store.
    Loaded,
    /// Dom0 wrote `path` (the value is in the store).
    Written(String),
    /// Dom0 removed `path` (with a trailing `/`: everything under it).
    Removed(String),
    /// A value that is not UTF-8 was refused (the key is left out).
    NotText(String),
    /// Dom0 stored a write of ours (`Client::write`).
    Acknowledged(String),
    /// Dom0 answered with an error, or sent what the VM side does not
    /// expect (a request other than WRITE and RM, an entry after loading,
    /// an answer to no write of ours).
    Unexpected(Kind, String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Loading,
    Live,
}

/// The VM side of the conversation: the store dom0 fills, the answers it
/// expects, and what changed.
#[derive(Debug)]
pub struct Client {
    phase: Phase,
    store: BTreeMap<String, String>,
    /// Entries the initial load brought.
    initial: usize,
    /// Writes of ours dom0 has not answered yet.
    awaiting: usize,
}

impl Default for Client {
    fn default() -> Self {
        Self::new()
    }
}

impl Client {
    pub fn new() -> Self {
        Self {
            phase: Phase::Loading,
            store: BTreeMap::new(),
            initial: 0,
            awaiting: 0,
        }
    }

    /// The first message to send: MULTIREAD of everything.
    pub fn start() -> Vec<u8> {
        // An empty path and no data always encode.
        encode(Kind::Multiread, "", &[]).unwrap_or_default()
    }

    /// Entries the initial load brought (0 until it is complete).
    pub fn initial_entries(&self) -> usize {
        self.initial
    }

    /// Whether the initial load is complete.
    pub fn loaded(&self) -> bool {
        self.phase == Phase::Live
    }

    pub fn get(&self, path: &str) -> Option<&str> {
        self.store.get(path).map(String::as_str)
    }

    /// Every entry.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &str)> {
        self.store.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// A write of ours, as the VM's QubesDB daemon forwards a local
    /// client's write to dom0: the message to send. The value is in our
    /// store at once; dom0 answers RESP_OK (`Event::Acknowledged`).
    pub fn write(&mut self, path: &str, value: &str) -> Result<Vec<u8>, QdbError> {
        let m = encode(Kind::Write, path, value.as_bytes())?;
        self.store.insert(path.into(), value.into());
        self.awaiting += 1;
        Ok(m)
    }

    /// The client addresses that have rules (`/qubes-firewall/<ip>/...`),
    /// as Qubes's firewall agent lists its targets.
    pub fn rule_targets(&self) -> Vec<&str> {
        let t: alloc::collections::BTreeSet<&str> = self
            .store
            .keys()
            .filter_map(|k| k.strip_prefix("/qubes-firewall/")?.split('/').next())
            .filter(|ip| !ip.is_empty())
            .collect();
        t.into_iter().collect()
    }

    /// What Qubes's firewall agent writes once it has handled a client's
    /// rules (applied them, or blocked the client for rules it could not
    /// use): `/qubes-firewall_handled/<ip>`, a count one higher each time,
    /// which tools in dom0 watch to know the rules are in force.
    pub fn firewall_handled(&mut self, ip: &str) -> Result<Vec<u8>, QdbError> {
        let path = format!("{HANDLED}{ip}");
        let n: u64 = self.get(&path).and_then(|v| v.parse().ok()).unwrap_or(0);
        self.write(&path, &(n + 1).to_string())
    }

    /// A removal of ours (a path ending in `/`: everything under it): the
    /// message to send; gone from our store at once, answered as a write.
    pub fn remove(&mut self, path: &str) -> Result<Vec<u8>, QdbError> {
        let m = encode(Kind::Rm, path, &[])?;
        if path.ends_with('/') {
            self.store.retain(|k, _| !k.starts_with(path));
        } else {
            self.store.remove(path);
        }
        self.awaiting += 1;
        Ok(m)
    }

    /// What Qubes's firewall agent writes for the user once a `dsthost`
    /// name of a client's rules is resolved: `/dns/<ip>/<name>`, the
    /// addresses in the form the agent's Python writes them (a set's
    /// text: `{'192.0.2.1', '192.0.2.2'}`, `set()` for none). A path over
    /// QubesDB's 64 bytes is refused (`TooLarge`), as dom0 refuses the
    /// agent's.
    pub fn dns_info(
        &mut self,
        ip: &str,
        name: &str,
        addrs: &[core::net::IpAddr],
    ) -> Result<Vec<u8>, QdbError> {
        self.write(&format!("{DNS_INFO}{ip}/{name}"), &dns_value(addrs))
    }

    /// Handles one message from dom0: what changed, and the answer to
    /// send back (if any).
    pub fn handle(&mut self, m: Message) -> (Option<Event>, Option<Vec<u8>>) {
        let text = String::from_utf8(m.data);
        match (self.phase, m.kind) {
            (Phase::Loading, Kind::RespMultiread) if m.path.is_empty() => {
                self.phase = Phase::Live;
                self.initial = self.store.len();
                (Some(Event::Loaded), None)
            }
            (Phase::Loading, Kind::RespMultiread) => match text {
                Ok(v) => {
                    self.store.insert(m.path, v);
                    (None, None)
                }
                Err(_) => (Some(Event::NotText(m.path)), None),
            },
            (Phase::Live, Kind::Write) if !m.path.is_empty() => {
                let ok = encode(Kind::RespOk, &m.path, &[]).ok();
                match text {
                    Ok(v) => {
                        self.store.insert(m.path.clone(), v);
                        (Some(Event::Written(m.path)), ok)
                    }
                    Err(_) => {
                        self.store.remove(&m.path);
                        (Some(Event::NotText(m.path)), ok)
                    }
                }
            }
            (Phase::Live, Kind::Rm) if !m.path.is_empty() => {
                if m.path.ends_with('/') {
                    self.store.retain(|k, _| !k.starts_with(&m.path));
                } else {
                    self.store.remove(&m.path);
                }
                let ok = encode(Kind::RespOk, &m.path, &[]).ok();
                (Some(Event::Removed(m.path)), ok)
            }
            (Phase::Live, Kind::RespOk) if self.awaiting > 0 => {
                self.awaiting -= 1;
                (Some(Event::Acknowledged(m.path)), None)
            }
            (Phase::Live, kind @ (Kind::RespError | Kind::RespErrorNoent)) if self.awaiting > 0 => {
                self.awaiting -= 1;
                (Some(Event::Unexpected(kind, m.path)), None)
            }
            (_, kind) => (Some(Event::Unexpected(kind, m.path)), None),
        }
    }
}

/// Where the firewall agent counts handled rule updates, per client.
pub const HANDLED: &str = "/qubes-firewall_handled/";
/// Where the firewall agent writes what each client's `dsthost` names
/// resolved to: `/dns/<ip>/<name>`.
pub const DNS_INFO: &str = "/dns/";

/// Addresses as the firewall agent writes them to `/dns/<ip>/<name>`: the
/// text of a Python set of strings (`set()` when empty).
pub fn dns_value(addrs: &[core::net::IpAddr]) -> String {
    if addrs.is_empty() {
        return String::from("set()");
    }
    let quoted: Vec<String> = addrs.iter().map(|a| format!("'{a}'")).collect();
    format!("{{{}}}", quoted.join(", "))
}

/// The client address whose rule update a write of `path` completes:
/// dom0 ends each update with an empty write to `/qubes-firewall/<ip>`.
pub fn rules_committed<'a>(path: &'a str, value: &str) -> Option<&'a str> {
    let ip = path.strip_prefix("/qubes-firewall/")?;
    (value.is_empty() && !ip.is_empty() && !ip.contains('/')).then_some(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: Kind, path: &str, data: &[u8]) -> Vec<u8> {
        encode(kind, path, data).unwrap()
    }

    #[test]
    fn encodes_the_72_byte_header() {
        let m = msg(Kind::Write, "/qubes-ip", b"10.0.2.15");
        assert_eq!(m.len(), HEADER + 9);
        assert_eq!(m[0], 1);
        assert_eq!(&m[1..10], b"/qubes-ip");
        assert!(m[10..68].iter().all(|&b| b == 0));
        assert_eq!(&m[68..72], &9u32.to_le_bytes());
        assert_eq!(&m[72..], b"10.0.2.15");
        assert_eq!(Client::start(), msg(Kind::Multiread, "", &[]));
        // Limits: a 63-byte path fits, 64 does not; 3072 bytes of data fit.
        let long = format!("/{}", "a".repeat(62));
        assert!(encode(Kind::Write, &long, &[0; MAX_DATA]).is_ok());
        assert_eq!(
            encode(Kind::Write, &format!("{long}a"), &[]),
            Err(QdbError::TooLarge)
        );
        assert_eq!(
            encode(Kind::Write, "/x", &[0; MAX_DATA + 1]),
            Err(QdbError::TooLarge)
        );
        assert_eq!(encode(Kind::Write, "/a b", &[]), Err(QdbError::TooLarge));
    }

    #[test]
    fn decodes_in_any_pieces_and_refuses_hostile_headers() {
        let mut stream = msg(Kind::RespMultiread, "/qubes-ip", b"10.0.2.15");
        stream.extend(msg(Kind::RespMultiread, "", &[]));
        let mut d = Decoder::new();
        let mut got = Vec::new();
        for b in &stream {
            d.push(&[*b]);
            while let Some(m) = d.next_message() {
                got.push(m.unwrap());
            }
        }
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].path, "/qubes-ip");
        assert_eq!(got[0].data, b"10.0.2.15");
        assert_eq!(
            (got[1].kind, got[1].path.as_str()),
            (Kind::RespMultiread, "")
        );

        let good = msg(Kind::Write, "/x", b"1");
        let mut cases: Vec<(Vec<u8>, QdbError)> = Vec::new();
        let mut bad = good.clone();
        bad[0] = 14;
        cases.push((bad, QdbError::UnknownType(14)));
        let mut bad = good.clone();
        bad[68..72].copy_from_slice(&3073u32.to_le_bytes());
        cases.push((bad, QdbError::DataTooLong(3073)));
        let mut bad = good.clone();
        bad[1..65].fill(b'a'); // no NUL in the path field
        cases.push((bad, QdbError::BadPath));
        let mut bad = good.clone();
        bad[1..4].copy_from_slice(b"rel");
        cases.push((bad, QdbError::BadPath));
        let mut bad = good.clone();
        bad[2] = 0xff;
        cases.push((bad, QdbError::BadPath));
        let mut bad = good;
        bad[2] = b' ';
        cases.push((bad, QdbError::BadPath));
        for (bytes, want) in cases {
            let mut d = Decoder::new();
            d.push(&bytes);
            assert_eq!(d.next_message(), Some(Err(want)));
            // Out of step for good: nothing more is decoded.
            d.push(&msg(Kind::Write, "/y", b"2"));
            assert_eq!(d.next_message(), Some(Err(QdbError::Failed)));
        }
    }

    fn feed(c: &mut Client, bytes: Vec<u8>) -> (Option<Event>, Option<Vec<u8>>) {
        let mut d = Decoder::new();
        d.push(&bytes);
        c.handle(d.next_message().unwrap().unwrap())
    }

    #[test]
    fn writes_of_ours_count_handled_rules_and_take_dom0s_answers() {
        let mut c = Client::new();
        for (p, v) in [
            ("/qubes-firewall/10.137.0.10/policy", "drop"),
            ("/qubes-firewall/10.137.0.10/0000", "action=accept"),
            ("/qubes-firewall/10.137.0.11/policy", "accept"),
            ("/qubes-firewall_handled/10.137.0.11", "4"),
            ("/qubes-ip", "10.0.2.15"),
        ] {
            feed(&mut c, msg(Kind::RespMultiread, p, v.as_bytes()));
        }
        // An answer before the load, or to no write of ours: unexpected.
        let stray = feed(&mut c, msg(Kind::RespOk, "/x", &[]));
        assert_eq!(stray.0, Some(Event::Unexpected(Kind::RespOk, "/x".into())));
        feed(&mut c, msg(Kind::RespMultiread, "", &[]));
        assert_eq!(c.rule_targets(), ["10.137.0.10", "10.137.0.11"]);
        let w = c.firewall_handled("10.137.0.10").unwrap();
        assert_eq!(
            w,
            msg(Kind::Write, "/qubes-firewall_handled/10.137.0.10", b"1")
        );
        let w = c.firewall_handled("10.137.0.11").unwrap();
        assert_eq!(
            w,
            msg(Kind::Write, "/qubes-firewall_handled/10.137.0.11", b"5")
        );
        assert_eq!(c.get("/qubes-firewall_handled/10.137.0.10"), Some("1"));
        let w = c.firewall_handled("10.137.0.10").unwrap();
        assert_eq!(&w[72..], b"2");
        // Three writes: two answered OK, one refused; a fourth answer is
        // unexpected.
        let p = "/qubes-firewall_handled/10.137.0.10";
        let ok = feed(&mut c, msg(Kind::RespOk, p, &[]));
        assert_eq!(ok, (Some(Event::Acknowledged(p.into())), None));
        feed(&mut c, msg(Kind::RespOk, p, &[]));
        let refused = feed(&mut c, msg(Kind::RespError, p, &[]));
        assert_eq!(
            refused.0,
            Some(Event::Unexpected(Kind::RespError, p.into()))
        );
        let extra = feed(&mut c, msg(Kind::RespOk, p, &[]));
        assert_eq!(extra.0, Some(Event::Unexpected(Kind::RespOk, p.into())));
        // A write of ours must encode.
        assert_eq!(c.write("/a b", "x"), Err(QdbError::TooLarge));
    }

    #[test]
    fn dns_info_is_written_as_the_agent_writes_it() {
        let mut c = Client::new();
        feed(&mut c, msg(Kind::RespMultiread, "", &[]));
        let two = [
            core::net::IpAddr::from([192, 0, 2, 1]),
            core::net::IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1]),
        ];
        let w = c.dns_info("10.137.0.10", "example.com", &two).unwrap();
        assert_eq!(
            w,
            msg(
                Kind::Write,
                "/dns/10.137.0.10/example.com",
                b"{'192.0.2.1', '2001:db8::1'}"
            )
        );
        let w = c.dns_info("10.137.0.10", "nothing.test", &[]).unwrap();
        assert_eq!(&w[72..], b"set()");
        // Clearing a client's old information, as the agent does first.
        let rm = c.remove("/dns/10.137.0.10/").unwrap();
        assert_eq!(rm, msg(Kind::Rm, "/dns/10.137.0.10/", &[]));
        assert_eq!(c.get("/dns/10.137.0.10/example.com"), None);
        for _ in 0..3 {
            let p = "/dns/10.137.0.10/";
            assert_eq!(
                feed(&mut c, msg(Kind::RespOk, p, &[])).0,
                Some(Event::Acknowledged(p.into()))
            );
        }
        // A path beyond QubesDB's 64 bytes is refused, not cut.
        let long = "a".repeat(60);
        assert_eq!(
            c.dns_info("10.137.0.10", &long, &two),
            Err(QdbError::TooLarge)
        );
    }

    #[test]
    fn loads_then_follows_writes_and_removals() {
        let mut c = Client::new();
        assert!(!c.loaded());
        for (p, v) in [
            ("/qubes-ip", "10.0.2.15"),
            ("/qubes-firewall/10.137.0.10/policy", "drop"),
            (
                "/qubes-firewall/10.137.0.10/0000",
                "action=accept proto=tcp",
            ),
        ] {
            assert_eq!(
                feed(&mut c, msg(Kind::RespMultiread, p, v.as_bytes())),
                (None, None)
            );
        }
        // A write before the load completed is not expected.
        let early = feed(&mut c, msg(Kind::Write, "/x", b"1"));
        assert_eq!(
            early,
            (Some(Event::Unexpected(Kind::Write, "/x".into())), None)
        );
        assert_eq!(
            feed(&mut c, msg(Kind::RespMultiread, "", &[])),
            (Some(Event::Loaded), None)
        );
        assert!(c.loaded());
        assert_eq!(c.initial_entries(), 3);
        assert_eq!(c.get("/qubes-ip"), Some("10.0.2.15"));

        // A rule update: the old rules removed, new ones written, then the
        // empty write that commits it. Each is acknowledged.
        let (ev, ok) = feed(&mut c, msg(Kind::Rm, "/qubes-firewall/10.137.0.10/", &[]));
        assert_eq!(
            ev,
            Some(Event::Removed("/qubes-firewall/10.137.0.10/".into()))
        );
        assert_eq!(
            ok,
            Some(msg(Kind::RespOk, "/qubes-firewall/10.137.0.10/", &[]))
        );
        assert_eq!(c.get("/qubes-firewall/10.137.0.10/policy"), None);
        assert_eq!(c.get("/qubes-ip"), Some("10.0.2.15"), "only the subtree");
        let (ev, ok) = feed(
            &mut c,
            msg(Kind::Write, "/qubes-firewall/10.137.0.10/policy", b"accept"),
        );
        assert_eq!(
            ev,
            Some(Event::Written("/qubes-firewall/10.137.0.10/policy".into()))
        );
        assert!(ok.is_some());
        let (ev, _) = feed(&mut c, msg(Kind::Write, "/qubes-firewall/10.137.0.10", b""));
        let Some(Event::Written(p)) = ev else {
            panic!()
        };
        assert_eq!(rules_committed(&p, c.get(&p).unwrap()), Some("10.137.0.10"));
        assert_eq!(
            rules_committed("/qubes-firewall/10.137.0.10/policy", ""),
            None
        );
        assert_eq!(rules_committed("/qubes-firewall/10.137.0.10", "x"), None);
        assert_eq!(rules_committed("/qubes-firewall/", ""), None);

        // A single key removed; a value that is not text refused (and the
        // old value dropped, so nothing stale stays); errors reported.
        let (ev, _) = feed(&mut c, msg(Kind::Rm, "/qubes-ip", &[]));
        assert_eq!(ev, Some(Event::Removed("/qubes-ip".into())));
        assert_eq!(c.get("/qubes-ip"), None);
        feed(&mut c, msg(Kind::Write, "/qubes-gateway", b"10.0.2.2"));
        let (ev, ok) = feed(&mut c, msg(Kind::Write, "/qubes-gateway", b"\xff"));
        assert_eq!(ev, Some(Event::NotText("/qubes-gateway".into())));
        assert!(ok.is_some());
        assert_eq!(c.get("/qubes-gateway"), None);
        let (ev, ok) = feed(&mut c, msg(Kind::RespError, "/x", &[]));
        assert_eq!(ev, Some(Event::Unexpected(Kind::RespError, "/x".into())));
        assert_eq!(ok, None);
        assert_eq!(c.entries().count(), 2);
    }
}
