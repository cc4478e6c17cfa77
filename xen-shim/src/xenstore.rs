//! The XenStore wire protocol (`xen/include/public/io/xs_wire.h`): the
//! message header, the requests the kernel sends, and the validation of the
//! replies and ring indices the other side (xenstored, in dom0) writes.
//!
//! Ring page layout: request ring (1024 bytes), response ring (1024 bytes),
//! then `req_cons, req_prod, rsp_cons, rsp_prod` (u32 each). A message is a
//! 16-byte header `{type, req_id, tx_id, len}` followed by `len` bytes of
//! payload, at most 4096.

use alloc::string::String;
use alloc::vec::Vec;

pub const RING_SIZE: u32 = 1024;
pub const REQ: usize = 0;
pub const RSP: usize = 1024;
pub const REQ_CONS: usize = 2048;
pub const REQ_PROD: usize = 2052;
pub const RSP_CONS: usize = 2056;
pub const RSP_PROD: usize = 2060;
pub const HEADER: usize = 16;
pub const PAYLOAD_MAX: u32 = 4096;

pub const XS_DIRECTORY: u32 = 1;
pub const XS_READ: u32 = 2;
pub const XS_WATCH: u32 = 4;
pub const XS_UNWATCH: u32 = 5;
pub const XS_TRANSACTION_START: u32 = 6;
pub const XS_TRANSACTION_END: u32 = 7;
pub const XS_WRITE: u32 = 11;
pub const XS_RM: u32 = 13;
pub const XS_WATCH_EVENT: u32 = 15;
pub const XS_ERROR: u32 = 16;

/// Why a reply or the ring state was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XsError {
    /// xenstored answered with an error string (`ENOENT`, `EACCES`, ...).
    Remote(String),
    /// The ring indices are impossible (more than a ring apart).
    BadIndices,
    /// The reply's header is not for our request or is oversized.
    BadReply,
    /// The request is larger than the protocol allows.
    TooLarge,
    /// No reply came in time.
    Timeout,
    /// The reply is not UTF-8 where text was expected.
    NotText,
}

/// Encodes one request message.
pub fn request(kind: u32, req_id: u32, parts: &[&[u8]]) -> Result<Vec<u8>, XsError> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    if len > PAYLOAD_MAX as usize {
        return Err(XsError::TooLarge);
    }
    let mut m = Vec::with_capacity(HEADER + len);
    for v in [kind, req_id, 0, len as u32] {
        m.extend_from_slice(&v.to_le_bytes());
    }
    for p in parts {
        m.extend_from_slice(p);
    }
    Ok(m)
}

/// Request `msg` made part of transaction `tx` (0: none).
pub fn in_transaction(mut msg: Vec<u8>, tx: u32) -> Vec<u8> {
    if let Some(field) = msg.get_mut(8..12) {
        field.copy_from_slice(&tx.to_le_bytes());
    }
    msg
}

/// A `TRANSACTION_START`; the reply is the transaction's id
/// (`transaction_id`).
pub fn transaction_start(req_id: u32) -> Result<Vec<u8>, XsError> {
    request(XS_TRANSACTION_START, req_id, &[b"\0"])
}

/// A `TRANSACTION_END` of `tx`: commit, or abort.
pub fn transaction_end(req_id: u32, tx: u32, commit: bool) -> Result<Vec<u8>, XsError> {
    let how: &[u8] = if commit { b"T\0" } else { b"F\0" };
    request(XS_TRANSACTION_END, req_id, &[how]).map(|m| in_transaction(m, tx))
}

/// The id in a `TRANSACTION_START` reply: decimal, NUL-terminated, not 0.
pub fn transaction_id(payload: &[u8]) -> Result<u32, XsError> {
    let text = payload.strip_suffix(b"\0").unwrap_or(payload);
    let text = core::str::from_utf8(text).map_err(|_| XsError::NotText)?;
    match text.parse::<u32>() {
        Ok(id) if id != 0 && text.bytes().all(|b| b.is_ascii_digit()) => Ok(id),
        _ => Err(XsError::BadReply),
    }
}

/// Whether a transaction's end failed only because something it read or
/// wrote changed meanwhile: it should be run again from the start.
pub fn must_retry(e: &XsError) -> bool {
    matches!(e, XsError::Remote(s) if s == "EAGAIN")
}

/// A `READ` of `path` (relative paths are under the domain's own node).
pub fn read(req_id: u32, path: &str) -> Result<Vec<u8>, XsError> {
    request(XS_READ, req_id, &[path.as_bytes(), b"\0"])
}

/// A `WRITE` of `value` to `path`: the path NUL-terminated, the value not.
pub fn write(req_id: u32, path: &str, value: &str) -> Result<Vec<u8>, XsError> {
    request(
        XS_WRITE,
        req_id,
        &[path.as_bytes(), b"\0", value.as_bytes()],
    )
}

/// An `RM` of `path` and everything under it (xenstored answers `OK`
/// when it is already gone too).
pub fn remove(req_id: u32, path: &str) -> Result<Vec<u8>, XsError> {
    request(XS_RM, req_id, &[path.as_bytes(), b"\0"])
}

/// A `DIRECTORY` of `path`: the names of its children.
pub fn directory(req_id: u32, path: &str) -> Result<Vec<u8>, XsError> {
    request(XS_DIRECTORY, req_id, &[path.as_bytes(), b"\0"])
}

/// The names in a `DIRECTORY` reply: NUL-terminated strings, each a
/// non-empty UTF-8 name without `/`.
pub fn directory_entries(payload: &[u8]) -> Result<Vec<String>, XsError> {
    let mut out = Vec::new();
    if payload.is_empty() {
        return Ok(out);
    }
    let body = payload.strip_suffix(b"\0").ok_or(XsError::BadReply)?;
    for name in body.split(|&b| b == 0) {
        let name = core::str::from_utf8(name).map_err(|_| XsError::NotText)?;
        if name.is_empty() || name.contains('/') {
            return Err(XsError::BadReply);
        }
        out.push(name.into());
    }
    Ok(out)
}

/// A `WATCH` of `path` (and everything below it), events tagged `token`.
pub fn watch(req_id: u32, path: &str, token: &str) -> Result<Vec<u8>, XsError> {
    request(
        XS_WATCH,
        req_id,
        &[path.as_bytes(), b"\0", token.as_bytes(), b"\0"],
    )
}

/// An `UNWATCH` of a watch made with the same `path` and `token`.
pub fn unwatch(req_id: u32, path: &str, token: &str) -> Result<Vec<u8>, XsError> {
    request(
        XS_UNWATCH,
        req_id,
        &[path.as_bytes(), b"\0", token.as_bytes(), b"\0"],
    )
}

/// A watch event's (path that changed, token).
pub fn watch_event(h: &Header, payload: &[u8]) -> Result<(String, String), XsError> {
    if h.kind != XS_WATCH_EVENT || payload.len() != h.len as usize {
        return Err(XsError::BadReply);
    }
    let mut parts = payload.split(|&b| b == 0);
    let (Some(path), Some(token)) = (parts.next(), parts.next()) else {
        return Err(XsError::BadReply);
    };
    let text = |b: &[u8]| {
        core::str::from_utf8(b)
            .map(String::from)
            .map_err(|_| XsError::NotText)
    };
    Ok((text(path)?, text(token)?))
}

/// A decoded reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: u32,
    pub req_id: u32,
    pub tx_id: u32,
    pub len: u32,
}

impl Header {
    pub fn parse(raw: &[u8; HEADER]) -> Result<Self, XsError> {
        let w = |i: usize| u32::from_le_bytes([raw[i], raw[i + 1], raw[i + 2], raw[i + 3]]);
        let h = Header {
            kind: w(0),
            req_id: w(4),
            tx_id: w(8),
            len: w(12),
        };
        if h.len > PAYLOAD_MAX {
            return Err(XsError::BadReply);
        }
        Ok(h)
    }
}

/// Checks a reply to request `req_id` of type `kind` and returns its
/// payload; an `XS_ERROR` reply becomes `XsError::Remote`.
pub fn check_reply(h: &Header, payload: &[u8], kind: u32, req_id: u32) -> Result<Vec<u8>, XsError> {
    if h.req_id != req_id || payload.len() != h.len as usize {
        return Err(XsError::BadReply);
    }
    if h.kind == XS_ERROR {
        let text = payload.split(|&b| b == 0).next().unwrap_or(&[]);
        return Err(XsError::Remote(String::from_utf8_lossy(text).into()));
    }
    if h.kind != kind {
        return Err(XsError::BadReply);
    }
    Ok(payload.to_vec())
}

/// Bytes of ring readable or writable now, from a producer and consumer
/// index written (in part) by the other side; indices more than a ring
/// apart are refused.
pub fn used(prod: u32, cons: u32) -> Result<u32, XsError> {
    crate::ring_distance(prod, cons, RING_SIZE).ok_or(XsError::BadIndices)
}

/// Recent watch events, numbered, for several parties that each ask what
/// happened since they last looked (the netback's slots: each reads its
/// device's states only when an event is about it). Bounded in number
/// and in age: the oldest are dropped, and a party that missed some is
/// told so (it must then look whatever the events were). Parties look
/// every loop round, so events are kept only `WATCH_LOG_MS`: once things
/// are quiet the log is empty again, and the memory it holds is what it
/// was (its room is reserved once, for `WATCH_LOG_LEN`).
#[derive(Debug, Default)]
pub struct WatchLog {
    next: u64,
    /// (number, when it arrived in ms, path).
    recent: alloc::collections::VecDeque<(u64, u64, String)>,
}

/// Events a `WatchLog` keeps at most.
pub const WATCH_LOG_LEN: usize = 256;
/// How long a `WatchLog` keeps an event, in ms.
pub const WATCH_LOG_MS: u64 = 1000;

impl WatchLog {
    pub const fn new() -> Self {
        Self {
            next: 0,
            recent: alloc::collections::VecDeque::new(),
        }
    }

    /// Records one event's path, arrived at `now_ms`; forgets events
    /// older than `WATCH_LOG_MS`.
    pub fn push(&mut self, path: String, now_ms: u64) {
        if self.recent.capacity() < WATCH_LOG_LEN {
            self.recent.reserve_exact(WATCH_LOG_LEN - self.recent.len());
        }
        self.prune(now_ms);
        if self.recent.len() == WATCH_LOG_LEN {
            self.recent.pop_front();
        }
        self.recent.push_back((self.next, now_ms, path));
        self.next += 1;
    }

    /// Forgets the events older than `WATCH_LOG_MS` at `now_ms`.
    pub fn prune(&mut self, now_ms: u64) {
        while self
            .recent
            .front()
            .is_some_and(|(_, at, _)| now_ms.saturating_sub(*at) > WATCH_LOG_MS)
        {
            self.recent.pop_front();
        }
    }

    /// Events kept now.
    pub fn len(&self) -> usize {
        self.recent.len()
    }

    pub fn is_empty(&self) -> bool {
        self.recent.is_empty()
    }

    /// The number the next event will get: what a party remembers as
    /// "seen up to here".
    pub fn next(&self) -> u64 {
        self.next
    }

    /// Whether an event since `seen` (a past `next()`) is about one of
    /// `nodes` (`concerns`), or some were dropped before the party saw
    /// them.
    pub fn any_since(&self, seen: u64, nodes: &[&str]) -> bool {
        self.since(seen, |p| nodes.iter().any(|n| concerns(p, n)))
    }

    /// Whether an event since `seen` satisfies `is`, or some were dropped
    /// before the party saw them.
    pub fn since(&self, seen: u64, is: impl Fn(&str) -> bool) -> bool {
        if seen >= self.next {
            return false;
        }
        match self.recent.front() {
            Some((first, ..)) if *first > seen => true,
            None => true,
            Some(_) => self
                .recent
                .iter()
                .filter(|(n, ..)| *n >= seen)
                .any(|(_, _, p)| is(p)),
        }
    }
}

/// Whether a watch event for `event` may have changed `node`: the node
/// itself, something below it, or an ancestor (removing a directory
/// fires the watches below it with their own paths, but a watch on the
/// directory itself reports the directory).
pub fn concerns(event: &str, node: &str) -> bool {
    within(event, node) || within(node, event)
}

/// Whether `path` is `node` or below it. A path relative to our home
/// (`backend/...`) and its absolute form (`/local/domain/<n>/backend/...`)
/// are the same node; two absolute paths are compared as given (a
/// frontend in another domain is not ours however its tail reads).
pub fn within(path: &str, node: &str) -> bool {
    fn relative(p: &str) -> &str {
        let Some(rest) = p.strip_prefix("/local/domain/") else {
            return p;
        };
        match rest.split_once('/') {
            Some((id, tail)) if !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) => tail,
            _ => p,
        }
    }
    let below = |a: &str, b: &str| {
        a.strip_prefix(b)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    };
    if path.starts_with('/') && node.starts_with('/') {
        below(path, node)
    } else {
        below(relative(path), relative(node))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_a_read() {
        let m = read(7, "name").unwrap();
        assert_eq!(&m[..16], &[2, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0]);
        assert_eq!(&m[16..], b"name\0");
        assert_eq!(
            request(XS_WRITE, 1, &[&[0u8; 5000]]),
            Err(XsError::TooLarge)
        );
    }

    #[test]
    fn encodes_write_and_directory_and_parses_listings() {
        let m = write(3, "data/x", "v 1").unwrap();
        assert_eq!(&m[..4], &XS_WRITE.to_le_bytes());
        assert_eq!(&m[12..16], &10u32.to_le_bytes());
        assert_eq!(&m[16..], b"data/x\0v 1");
        let m = remove(5, "backend/vif/7/0").unwrap();
        assert_eq!(&m[..8], &[13, 0, 0, 0, 5, 0, 0, 0]);
        assert_eq!(&m[16..], b"backend/vif/7/0\0");
        let m = directory(4, "device").unwrap();
        assert_eq!(
            (&m[..4], &m[16..]),
            (&XS_DIRECTORY.to_le_bytes()[..], &b"device\0"[..])
        );
        assert_eq!(directory_entries(b"vif\0vbd\0").unwrap(), ["vif", "vbd"]);
        assert_eq!(directory_entries(b"").unwrap(), Vec::<String>::new());
        for bad in [&b"vif"[..], b"a/b\0", b"\0\0", b"\xff\0"] {
            assert!(directory_entries(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn transactions() {
        let m = transaction_start(3).unwrap();
        assert_eq!(&m[..4], &XS_TRANSACTION_START.to_le_bytes());
        assert_eq!(&m[16..], b"\0");
        let m = transaction_end(4, 77, true).unwrap();
        assert_eq!(&m[..4], &XS_TRANSACTION_END.to_le_bytes());
        assert_eq!(&m[8..12], &77u32.to_le_bytes());
        assert_eq!(&m[16..], b"T\0");
        assert_eq!(&transaction_end(4, 77, false).unwrap()[16..], b"F\0");
        let w = in_transaction(write(5, "a", "b").unwrap(), 9);
        assert_eq!(&w[8..12], &9u32.to_le_bytes());
        assert_eq!(&w[16..], b"a\0b");
        assert_eq!(transaction_id(b"42\0"), Ok(42));
        assert_eq!(transaction_id(b"42"), Ok(42));
        for bad in [
            &b"0\0"[..],
            b"\0",
            b"-1\0",
            b"+4\0",
            b"4x\0",
            b"99999999999\0",
            b"\xff\0",
        ] {
            assert!(transaction_id(bad).is_err(), "{bad:?}");
        }
        assert!(must_retry(&XsError::Remote("EAGAIN".into())));
        assert!(!must_retry(&XsError::Remote("EACCES".into())));
        assert!(!must_retry(&XsError::Timeout));
    }

    #[test]
    fn watches_and_their_events() {
        let m = watch(5, "data/x", "tok").unwrap();
        assert_eq!(&m[..4], &XS_WATCH.to_le_bytes());
        assert_eq!(&m[16..], b"data/x\0tok\0");
        let m = unwatch(6, "data/x", "tok").unwrap();
        assert_eq!(&m[..4], &XS_UNWATCH.to_le_bytes());
        assert_eq!(&m[16..], b"data/x\0tok\0");
        let payload = b"/local/domain/1/data/x\0tok\0";
        let h = Header {
            kind: XS_WATCH_EVENT,
            req_id: 0,
            tx_id: 0,
            len: payload.len() as u32,
        };
        assert_eq!(
            watch_event(&h, payload).unwrap(),
            ("/local/domain/1/data/x".to_string(), "tok".to_string())
        );
        assert!(watch_event(&h, b"no-nul").is_err());
        let read = Header { kind: XS_READ, ..h };
        assert!(watch_event(&read, payload).is_err());
    }

    #[test]
    fn checks_replies() {
        let h = Header {
            kind: XS_READ,
            req_id: 7,
            tx_id: 0,
            len: 10,
        };
        assert_eq!(
            check_reply(&h, b"portcullis", XS_READ, 7).unwrap(),
            b"portcullis"
        );
        assert_eq!(
            check_reply(&h, b"portcullis", XS_READ, 8),
            Err(XsError::BadReply),
            "someone else's reply"
        );
        assert_eq!(
            check_reply(&h, b"short", XS_READ, 7),
            Err(XsError::BadReply),
            "length mismatch"
        );
        let e = Header {
            kind: XS_ERROR,
            req_id: 7,
            tx_id: 0,
            len: 7,
        };
        assert_eq!(
            check_reply(&e, b"ENOENT\0", XS_READ, 7),
            Err(XsError::Remote("ENOENT".into()))
        );
        let odd = Header {
            kind: XS_WRITE,
            ..h
        };
        assert_eq!(
            check_reply(&odd, b"portcullis", XS_READ, 7),
            Err(XsError::BadReply)
        );
        let mut raw = [0u8; HEADER];
        raw[12..16].copy_from_slice(&100_000u32.to_le_bytes());
        assert_eq!(Header::parse(&raw), Err(XsError::BadReply), "oversized");
    }

    #[test]
    fn ring_indices_are_validated() {
        assert_eq!(used(10, 4), Ok(6));
        assert_eq!(used(3, u32::MAX - 2), Ok(6), "wraps");
        assert_eq!(used(2000, 0), Err(XsError::BadIndices));
        assert_eq!(used(0, 1), Err(XsError::BadIndices), "consumer ahead");
    }

    #[test]
    fn which_events_concern_which_nodes() {
        let dev = "backend/vif/12/0";
        for e in [
            "backend/vif/12/0",
            "backend/vif/12/0/state",
            "backend/vif/12",
            "backend/vif",
            "/local/domain/7/backend/vif/12/0/online",
        ] {
            assert!(concerns(e, dev), "{e}");
        }
        for e in [
            "backend/vif/12/00",
            "backend/vif/120/0/state",
            "backend/vif/1",
            "device/vif/0/state",
            "/local/domain/12/device/vif/0/state",
        ] {
            assert!(!concerns(e, dev), "{e}");
        }
        let fe = "/local/domain/12/device/vif/0";
        assert!(concerns("/local/domain/12/device/vif/0/state", fe));
        assert!(concerns("/local/domain/12", fe), "the domain went");
        assert!(!concerns("/local/domain/13/device/vif/0/state", fe));
        assert!(!concerns("/local/domain/1/device/vif/0/state", fe));
        assert!(!concerns("backend/vif/12/0/state", fe));
        assert!(within("backend/vif/12/0/state", "backend/vif"));
        assert!(!within("backend/vif", "backend/vif/12/0"));
        assert!(!within("backend/vifs/1", "backend/vif"));
    }

    #[test]
    fn a_watch_log_tells_each_party_what_is_new() {
        let mut log = WatchLog::default();
        let start = log.next();
        assert!(!log.any_since(start, &["backend/vif/1/0"]), "nothing yet");
        log.push("backend/vif/1/0/state".into(), 0);
        log.push("/local/domain/2/device/vif/0/state".into(), 0);
        assert!(log.any_since(start, &["backend/vif/1/0"]));
        assert!(log.any_since(start, &["/local/domain/2/device/vif/0"]));
        assert!(!log.any_since(start, &["backend/vif/3/0"]));
        let seen = log.next();
        assert!(!log.any_since(seen, &["backend/vif/1/0"]), "already seen");
        log.push("backend/vif/3/0/online".into(), 1);
        assert!(log.any_since(seen, &["backend/vif/3/0"]));
        assert!(!log.any_since(seen, &["backend/vif/1/0"]));
        // A party that fell behind the kept events must look anyway.
        for _ in 0..WATCH_LOG_LEN {
            log.push("elsewhere".into(), 2);
        }
        assert_eq!(log.len(), WATCH_LOG_LEN);
        assert!(log.any_since(seen, &["backend/vif/1/0"]));
        assert!(!log.any_since(log.next(), &["backend/vif/1/0"]));
        assert!(log.since(log.next() - 1, |p| p == "elsewhere"));
        // Old events go: quiet, the log is empty again, and whoever had
        // not looked since them is told to look once.
        let last = log.next();
        log.prune(2 + WATCH_LOG_MS);
        assert_eq!(log.len(), WATCH_LOG_LEN, "not older than the limit yet");
        log.prune(3 + WATCH_LOG_MS);
        assert!(log.is_empty());
        assert!(log.any_since(last - 1, &["backend/vif/1/0"]));
        assert!(!log.any_since(last, &["backend/vif/1/0"]));
    }
}
