//! The netfront/netback wire protocol (`public/io/netif.h`, `io/ring.h`,
//! `io/xenbus.h`) as pure data and logic, for the netfront and netback
//! drivers: ring layouts and entries (both sides' encodings), the
//! notification rule, validation of what the other side writes, and the
//! frontend's side of the xenbus handshake.
//!
//! Everything the backend writes (response indices, ids, offsets, sizes,
//! statuses) is checked here before the driver uses it: a hostile or buggy
//! backend makes a counted error, never an out-of-bounds access or a
//! double free.

/// Shared ring header: `req_prod`, `req_event`, `rsp_prod`, `rsp_event`
/// (u32 each), then private bytes and padding, 64 bytes in all.
pub const RING_HEADER: usize = 64;
pub const REQ_PROD: usize = 0;
pub const REQ_EVENT: usize = 4;
pub const RSP_PROD: usize = 8;
pub const RSP_EVENT: usize = 12;
pub const PAGE: usize = 4096;

/// TX ring entry: the larger of `netif_tx_request` (12 bytes) and
/// `netif_tx_response` (4); RX: both 8 bytes.
pub const TX_ENTRY: usize = 12;
pub const RX_ENTRY: usize = 8;

/// Entries of a one-page ring: the largest power of two that fits.
pub const fn ring_size(entry: usize) -> u32 {
    let n = (PAGE - RING_HEADER) / entry;
    let mut p = 1;
    while p * 2 <= n {
        p *= 2;
    }
    p as u32
}

pub const TX_RING_SIZE: u32 = ring_size(TX_ENTRY);
pub const RX_RING_SIZE: u32 = ring_size(RX_ENTRY);

/// Byte offset of slot `idx` (a free-running index) in a ring page.
pub fn slot_offset(idx: u32, size: u32, entry: usize) -> usize {
    RING_HEADER + (idx % size) as usize * entry
}

pub const NETTXF_CSUM_BLANK: u16 = 1 << 0;
pub const NETTXF_DATA_VALIDATED: u16 = 1 << 1;
pub const NETTXF_MORE_DATA: u16 = 1 << 2;
pub const NETTXF_EXTRA_INFO: u16 = 1 << 3;
pub const NETRXF_DATA_VALIDATED: u16 = 1 << 0;
pub const NETRXF_CSUM_BLANK: u16 = 1 << 1;
pub const NETRXF_MORE_DATA: u16 = 1 << 2;
pub const NETRXF_EXTRA_INFO: u16 = 1 << 3;

pub const NETIF_RSP_NULL: i16 = 1;
pub const NETIF_RSP_OKAY: i16 = 0;
pub const NETIF_RSP_ERROR: i16 = -1;
pub const NETIF_RSP_DROPPED: i16 = -2;

/// After moving a producer index from `old` to `new`, whether the other
/// side asked to be notified (its event index lies in `(old, new]`), in
/// wrapping arithmetic, as `RING_PUSH_*_AND_CHECK_NOTIFY` does.
pub fn need_notify(old: u32, new: u32, event: u32) -> bool {
    new.wrapping_sub(event) < new.wrapping_sub(old)
}

/// Responses ready between our consumer index and the backend's producer
/// index; an index more than a ring ahead is the backend misbehaving.
pub fn responses_ready(rsp_prod: u32, rsp_cons: u32, size: u32) -> Result<u32, Bad> {
    crate::ring_distance(rsp_prod, rsp_cons, size).ok_or(Bad::Indices)
}

/// What the backend wrote that cannot be right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bad {
    /// A producer index more than a ring ahead of what we consumed.
    Indices,
    /// A response for an id with no request outstanding.
    Id,
    /// A received fragment outside its page, or too long.
    Bounds,
    /// Flags we did not negotiate (extra info, more data).
    Flags,
}

/// `netif_tx_request`: a frame (or its first piece) in a granted page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxRequest {
    pub gref: u32,
    pub offset: u16,
    pub flags: u16,
    pub id: u16,
    pub size: u16,
}

impl TxRequest {
    pub fn encode(&self) -> [u8; TX_ENTRY] {
        let mut b = [0u8; TX_ENTRY];
        b[0..4].copy_from_slice(&self.gref.to_le_bytes());
        b[4..6].copy_from_slice(&self.offset.to_le_bytes());
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..10].copy_from_slice(&self.id.to_le_bytes());
        b[10..12].copy_from_slice(&self.size.to_le_bytes());
        b
    }
}

impl TxRequest {
    /// A request as a frontend wrote it (the backend's view).
    pub fn decode(b: &[u8; TX_ENTRY]) -> Self {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Self {
            gref: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            offset: u16_at(4),
            flags: u16_at(6),
            id: u16_at(8),
            size: u16_at(10),
        }
    }
}

/// Requests a frontend published that the backend has not consumed; an
/// index more than a ring ahead is the frontend misbehaving.
pub fn requests_ready(req_prod: u32, req_cons: u32, size: u32) -> Result<u32, Bad> {
    crate::ring_distance(req_prod, req_cons, size).ok_or(Bad::Indices)
}

/// `netif_tx_response`: the backend is done with request `id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxResponse {
    pub id: u16,
    pub status: i16,
}

impl TxResponse {
    pub fn encode(&self) -> [u8; 4] {
        let mut b = [0u8; 4];
        b[0..2].copy_from_slice(&self.id.to_le_bytes());
        b[2..4].copy_from_slice(&self.status.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; 4]) -> Self {
        Self {
            id: u16::from_le_bytes([b[0], b[1]]),
            status: i16::from_le_bytes([b[2], b[3]]),
        }
    }
}

/// `netif_rx_request`: a granted page the backend may copy a frame into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxRequest {
    pub id: u16,
    pub gref: u32,
}

impl RxRequest {
    pub fn decode(b: &[u8; RX_ENTRY]) -> Self {
        Self {
            id: u16::from_le_bytes([b[0], b[1]]),
            gref: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        }
    }

    pub fn encode(&self) -> [u8; RX_ENTRY] {
        let mut b = [0u8; RX_ENTRY];
        b[0..2].copy_from_slice(&self.id.to_le_bytes());
        b[4..8].copy_from_slice(&self.gref.to_le_bytes());
        b
    }
}

/// `netif_rx_response`: a frame of `status` bytes at `offset` in request
/// `id`'s page, or an error (negative status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxResponse {
    pub id: u16,
    pub offset: u16,
    pub flags: u16,
    pub status: i16,
}

impl RxResponse {
    pub fn encode(&self) -> [u8; RX_ENTRY] {
        let mut b = [0u8; RX_ENTRY];
        b[0..2].copy_from_slice(&self.id.to_le_bytes());
        b[2..4].copy_from_slice(&self.offset.to_le_bytes());
        b[4..6].copy_from_slice(&self.flags.to_le_bytes());
        b[6..8].copy_from_slice(&self.status.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; RX_ENTRY]) -> Self {
        Self {
            id: u16::from_le_bytes([b[0], b[1]]),
            offset: u16::from_le_bytes([b[2], b[3]]),
            flags: u16::from_le_bytes([b[4], b[5]]),
            status: i16::from_le_bytes([b[6], b[7]]),
        }
    }

    /// The frame this response describes, checked: `Ok(Some((offset,
    /// len)))` for a frame inside a page of `room` bytes, `Ok(None)` for an
    /// error status (the buffer comes back empty), `Err` for what cannot
    /// be: a frame past the page, or flags for features not negotiated
    /// (`offered`: the flags we accept, e.g. `NETRXF_DATA_VALIDATED`).
    pub fn frame(&self, room: usize, offered: u16) -> Result<Option<(usize, usize)>, Bad> {
        if self.flags & !offered != 0 {
            return Err(Bad::Flags);
        }
        if self.status <= 0 {
            return Ok(None);
        }
        let (off, len) = (usize::from(self.offset), self.status as usize);
        if off + len > room {
            return Err(Bad::Bounds);
        }
        Ok(Some((off, len)))
    }
}

/// A MAC address as the toolstack writes it in XenStore
/// (`00:16:3e:5e:6c:00`).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.trim().split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// The xenbus states (`io/xenbus.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XenbusState {
    Unknown = 0,
    Initialising = 1,
    InitWait = 2,
    Initialised = 3,
    Connected = 4,
    Closing = 5,
    Closed = 6,
    Reconfiguring = 7,
    Reconfigured = 8,
}

impl XenbusState {
    /// The state written as a XenStore value (a decimal number).
    pub fn parse(v: &str) -> Option<Self> {
        Some(match v.trim().parse::<u8>().ok()? {
            0 => Self::Unknown,
            1 => Self::Initialising,
            2 => Self::InitWait,
            3 => Self::Initialised,
            4 => Self::Connected,
            5 => Self::Closing,
            6 => Self::Closed,
            7 => Self::Reconfiguring,
            8 => Self::Reconfigured,
            _ => return None,
        })
    }

    pub fn value(self) -> &'static str {
        ["0", "1", "2", "3", "4", "5", "6", "7", "8"][self as usize]
    }
}

/// What the frontend does next, given the backend's state and its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontendStep {
    /// Wait for the backend to move.
    Wait,
    /// Grant the rings, allocate the event channel, write `tx-ring-ref`,
    /// `rx-ring-ref`, `event-channel`, `request-rx-copy` and the features,
    /// then switch to Connected.
    Connect,
    /// Both connected: forward.
    Running,
    /// The backend is going away: end access to everything, switch to
    /// Closing, then Closed when it is Closed; start again when it comes
    /// back (a detach and re-attach).
    Close,
    /// Reconnect from the start (the backend restarted).
    Restart,
}

/// The frontend's side of the handshake (as Linux netfront does it): the
/// backend reaches InitWait after reading its own configuration; the
/// frontend then connects; the link is up when both are Connected.
pub fn frontend_step(backend: XenbusState, ours: XenbusState) -> FrontendStep {
    use XenbusState::*;
    match (backend, ours) {
        (Closing | Closed, Connected | Initialised | Closing) => FrontendStep::Close,
        (Closed | Unknown, Closed) => FrontendStep::Wait,
        (InitWait | Initialising | Initialised, Closed) => FrontendStep::Restart,
        (InitWait, Initialising) => FrontendStep::Connect,
        (Connected, Connected) => FrontendStep::Running,
        (InitWait, Connected) => FrontendStep::Wait, // the backend is catching up
        (Initialising, Connected) => FrontendStep::Restart,
        _ => FrontendStep::Wait,
    }
}

/// What a backend does next (`backend_step`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendStep {
    /// Nothing to do.
    Wait,
    /// Write the features offered (`feature-rx-copy` ...) and switch to
    /// InitWait: the frontend may connect.
    Offer,
    /// The frontend published its rings and event channel: map them, bind
    /// the channel, switch to Connected.
    Connect,
    /// Both connected: forward.
    Running,
    /// The frontend is going away (or went): unmap, close the channel,
    /// switch to Closing.
    Disconnect,
    /// Disconnected and the frontend closed: switch to Closed.
    Close,
}

/// The backend's side of the handshake, as Linux netback does it, from
/// the frontend's state and ours.
pub fn backend_step(frontend: XenbusState, ours: XenbusState) -> BackendStep {
    use XenbusState::*;
    match (frontend, ours) {
        (Connected, Connected) => BackendStep::Running,
        (Initialised | Connected, InitWait) => BackendStep::Connect,
        (Closing | Closed | Unknown, Connected | InitWait | Initialised) => BackendStep::Disconnect,
        (Closed | Unknown, Closing) => BackendStep::Close,
        (Initialising | InitWait, Initialising | Closed | Unknown) => BackendStep::Offer,
        // A frontend that starts again while we still hold its rings.
        (Initialising, Connected) => BackendStep::Disconnect,
        _ => BackendStep::Wait,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_as_xenstore_writes_them() {
        assert_eq!(
            parse_mac("00:16:3e:5e:6c:0a\n"),
            Some([0, 0x16, 0x3e, 0x5e, 0x6c, 0x0a])
        );
        for bad in [
            "",
            "00:16:3e:5e:6c",
            "00:16:3e:5e:6c:0a:01",
            "00:16:3e:5e:6c:zz",
            "000:16:3e:5e:6c:0a",
            "+0:16:3e:5e:6c:0a",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    /// Entries round-trip (a frontend's transmit requests are checked by
    /// `drivers::netback`, chains included), and request indices are
    /// bounded.
    #[test]
    fn backend_side_entries_and_hostile_requests() {
        let r = TxRequest {
            gref: 0xdead_beef,
            offset: 100,
            flags: NETTXF_CSUM_BLANK,
            id: 7,
            size: 60,
        };
        assert_eq!(TxRequest::decode(&r.encode()), r);
        let rx = RxRequest { id: 3, gref: 99 };
        assert_eq!(RxRequest::decode(&rx.encode()), rx);
        let rsp = RxResponse {
            id: 3,
            offset: 0,
            flags: 0,
            status: 60,
        };
        assert_eq!(RxResponse::decode(&rsp.encode()), rsp);
        let t = TxResponse { id: 9, status: -1 };
        assert_eq!(TxResponse::decode(&t.encode()), t);
        assert_eq!(requests_ready(5, 3, 256), Ok(2));
        assert_eq!(
            requests_ready(3u32.wrapping_sub(1), 3, 256),
            Err(Bad::Indices)
        );
        assert_eq!(requests_ready(300, 3, 256), Err(Bad::Indices));
    }

    /// The backend's handshake through a client's life: created, connected,
    /// shut down, started again; and a frontend that restarts while
    /// connected.
    #[test]
    fn backend_handshake_through_a_clients_life() {
        use BackendStep as S;
        use XenbusState::*;
        let life = [
            (Initialising, Initialising, S::Offer),
            (Initialising, InitWait, S::Wait),
            (Connected, InitWait, S::Connect),
            (Initialised, InitWait, S::Connect),
            (Connected, Connected, S::Running),
            (Closing, Connected, S::Disconnect),
            (Closing, Closing, S::Wait),
            (Closed, Closing, S::Close),
            (Closed, Closed, S::Wait),
            (Initialising, Closed, S::Offer),
            (Unknown, Connected, S::Disconnect),
            (Unknown, Closing, S::Close),
            (Initialising, Connected, S::Disconnect),
        ];
        for (front, ours, want) in life {
            assert_eq!(backend_step(front, ours), want, "{front:?} {ours:?}");
        }
    }

    #[test]
    fn ring_geometry() {
        // As Linux's __CONST_RING_SIZE(netif_tx, 4096) and (netif_rx, 4096).
        assert_eq!((TX_RING_SIZE, RX_RING_SIZE), (256, 256));
        assert_eq!(slot_offset(0, 256, TX_ENTRY), 64);
        assert_eq!(slot_offset(257, 256, TX_ENTRY), 76);
        assert!(slot_offset(u32::MAX, 256, TX_ENTRY) + TX_ENTRY <= PAGE);
        assert!(slot_offset(u32::MAX, 256, RX_ENTRY) + RX_ENTRY <= PAGE);
    }

    #[test]
    fn notification_rule_across_wraparound() {
        assert!(need_notify(0, 3, 1), "event inside (old, new]");
        assert!(need_notify(0, 3, 3));
        assert!(!need_notify(0, 3, 4), "not yet");
        assert!(!need_notify(3, 5, 3), "already passed");
        assert!(need_notify(u32::MAX - 1, 2, 0), "across the wrap");
        assert!(!need_notify(u32::MAX - 1, 2, 5));
    }

    #[test]
    fn hostile_indices_and_responses_are_refused() {
        assert_eq!(responses_ready(10, 4, 256), Ok(6));
        assert_eq!(responses_ready(3, u32::MAX - 2, 256), Ok(6));
        assert_eq!(responses_ready(300, 4, 256), Err(Bad::Indices));
        assert_eq!(responses_ready(3, 4, 256), Err(Bad::Indices), "behind us");
        let ok = RxResponse {
            id: 1,
            offset: 64,
            flags: NETRXF_DATA_VALIDATED,
            status: 60,
        };
        assert_eq!(ok.frame(2048, NETRXF_DATA_VALIDATED), Ok(Some((64, 60))));
        let past = RxResponse { status: 2000, ..ok };
        assert_eq!(past.frame(2048, NETRXF_DATA_VALIDATED), Err(Bad::Bounds));
        let more = RxResponse {
            flags: NETRXF_MORE_DATA,
            ..ok
        };
        assert_eq!(more.frame(2048, NETRXF_DATA_VALIDATED), Err(Bad::Flags));
        let dropped = RxResponse {
            status: NETIF_RSP_DROPPED,
            ..ok
        };
        assert_eq!(dropped.frame(2048, NETRXF_DATA_VALIDATED), Ok(None));
    }

    #[test]
    fn entries_round_trip() {
        let t = TxRequest {
            gref: 0x0102_0304,
            offset: 64,
            flags: NETTXF_DATA_VALIDATED,
            id: 7,
            size: 1514,
        };
        let b = t.encode();
        assert_eq!(&b[..4], &[4, 3, 2, 1]);
        assert_eq!(u16::from_le_bytes([b[10], b[11]]), 1514);
        assert_eq!(
            TxResponse::decode(&[7, 0, 0xff, 0xff]),
            TxResponse { id: 7, status: -1 }
        );
        let r = RxRequest { id: 9, gref: 77 }.encode();
        assert_eq!(r, [9, 0, 0, 0, 77, 0, 0, 0]);
        assert_eq!(
            RxResponse::decode(&[9, 0, 64, 0, 1, 0, 60, 0]),
            RxResponse {
                id: 9,
                offset: 64,
                flags: 1,
                status: 60
            }
        );
    }

    #[test]
    fn the_handshake_and_a_reattach() {
        use XenbusState::*;
        assert_eq!(XenbusState::parse("2"), Some(InitWait));
        assert_eq!(XenbusState::parse("9"), None);
        assert_eq!(XenbusState::parse("x"), None);
        assert_eq!(Connected.value(), "4");
        // Boot: the backend initialises, waits for us; we connect.
        assert_eq!(
            frontend_step(Initialising, Initialising),
            FrontendStep::Wait
        );
        assert_eq!(frontend_step(InitWait, Initialising), FrontendStep::Connect);
        assert_eq!(frontend_step(InitWait, Connected), FrontendStep::Wait);
        assert_eq!(frontend_step(Connected, Connected), FrontendStep::Running);
        // Detach: the backend closes; we close; it comes back; we restart.
        assert_eq!(frontend_step(Closing, Connected), FrontendStep::Close);
        assert_eq!(frontend_step(Closed, Closing), FrontendStep::Close);
        assert_eq!(frontend_step(Closed, Closed), FrontendStep::Wait);
        assert_eq!(frontend_step(InitWait, Closed), FrontendStep::Restart);
    }
}
