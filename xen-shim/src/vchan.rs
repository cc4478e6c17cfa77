//! vchan (`xen/include/public/io/libxenvchan.h`), the client's half as pure
//! data: the shared page's layout, where the two rings lie, and the ring
//! arithmetic, each checked against what the server (dom0) may have
//! written. QubesDB (port 111) and qrexec (port 512) run over it.
//!
//! The server grants a page holding `vchan_interface` and publishes its
//! grant reference and an event channel in XenStore
//! (`/local/domain/<server>/data/vchan/<client>/<port>/{ring-ref,event-channel}`).
//! The left ring carries client → server bytes, the right ring server →
//! client. A ring of order 10 or 11 lies inside the shared page (offset
//! 1024 or 2048); orders 12 and up are `2^(order-12)` more pages whose
//! grant references follow the header (left ring's first). Indices are
//! free-running `u32`s; a ring holds `2^order` bytes.
//!
//! Notifications: a side that wants to hear of the other's writes (or
//! reads) sets that bit in the *other* side's notify byte; the other side,
//! after writing (reading), clears the bit in its own byte and sends an
//! event only if it was set.

/// Offsets in the shared page.
pub const LEFT_CONS: usize = 0;
pub const LEFT_PROD: usize = 4;
pub const RIGHT_CONS: usize = 8;
pub const RIGHT_PROD: usize = 12;
pub const LEFT_ORDER: usize = 16;
pub const RIGHT_ORDER: usize = 18;
pub const CLI_LIVE: usize = 20;
pub const SRV_LIVE: usize = 21;
/// Bits the server asked of the client (the client clears and acts).
pub const CLI_NOTIFY: usize = 22;
/// Bits the client asks of the server.
pub const SRV_NOTIFY: usize = 23;
pub const GRANTS: usize = 24;
pub const PAGE: usize = 4096;

/// Notification bits.
pub const NOTIFY_WRITE: u8 = 1;
pub const NOTIFY_READ: u8 = 2;
/// Largest ring order accepted (a 1 MiB ring: 256 pages).
pub const MAX_ORDER: u16 = 20;

/// Why a shared page or an index was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VchanError {
    /// An order below 10 or above `MAX_ORDER`.
    BadOrder(u16),
    /// Both rings in the same place of the shared page, or grant
    /// references that would not fit the page.
    BadLayout,
    /// Indices more than a ring apart.
    BadIndices,
    /// A live byte other than 0, 1, 2.
    BadLive(u8),
}

/// Where one ring lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// Inside the shared page, at this offset.
    InPage(usize),
    /// In this many pages of their own.
    Pages(usize),
}

/// Both rings of a shared page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Client → server.
    pub left: (Place, u32),
    /// Server → client.
    pub right: (Place, u32),
}

impl Geometry {
    /// The rings the server's `left_order` and `right_order` describe.
    pub fn new(left_order: u16, right_order: u16) -> Result<Self, VchanError> {
        let place = |order: u16| match order {
            10 => Ok(Place::InPage(1024)),
            11 => Ok(Place::InPage(2048)),
            12..=MAX_ORDER => Ok(Place::Pages(1 << (order - 12))),
            _ => Err(VchanError::BadOrder(order)),
        };
        let (l, r) = (place(left_order)?, place(right_order)?);
        if let (Place::InPage(a), Place::InPage(b)) = (l, r) {
            if a == b {
                return Err(VchanError::BadLayout);
            }
        }
        let g = Self {
            left: (l, 1 << left_order),
            right: (r, 1 << right_order),
        };
        // The grant list must end before the first in-page ring (and the
        // page).
        let end = GRANTS + 4 * (g.grants(true).len() + g.grants(false).len());
        let limit = [l, r]
            .iter()
            .filter_map(|p| match p {
                Place::InPage(o) => Some(*o),
                Place::Pages(_) => None,
            })
            .min()
            .unwrap_or(PAGE);
        if end > limit {
            return Err(VchanError::BadLayout);
        }
        Ok(g)
    }

    /// Indices into the grant list of the left (or right) ring's pages.
    pub fn grants(&self, left: bool) -> core::ops::Range<usize> {
        let pages = |p: Place| match p {
            Place::Pages(n) => n,
            Place::InPage(_) => 0,
        };
        let n_left = pages(self.left.0);
        if left {
            0..n_left
        } else {
            n_left..n_left + pages(self.right.0)
        }
    }
}

/// A live byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Live {
    Exited,
    Connected,
    NotYet,
}

impl Live {
    pub fn parse(b: u8) -> Result<Self, VchanError> {
        match b {
            0 => Ok(Self::Exited),
            1 => Ok(Self::Connected),
            2 => Ok(Self::NotYet),
            _ => Err(VchanError::BadLive(b)),
        }
    }
}

/// Bytes waiting in a ring of `size` bytes.
pub fn readable(prod: u32, cons: u32, size: u32) -> Result<u32, VchanError> {
    crate::ring_distance(prod, cons, size).ok_or(VchanError::BadIndices)
}

/// Room left in a ring of `size` bytes.
pub fn writable(prod: u32, cons: u32, size: u32) -> Result<u32, VchanError> {
    readable(prod, cons, size).map(|used| size - used)
}

/// The (offset, length) pieces of ring memory that `len` bytes starting at
/// free-running index `idx` occupy in a ring of `size` bytes (a power of
/// two): one piece, or two when they wrap.
pub fn pieces(idx: u32, len: u32, size: u32) -> [(usize, usize); 2] {
    let at = (idx & (size - 1)) as usize;
    let first = (len as usize).min(size as usize - at);
    [(at, first), (0, len as usize - first)]
}

/// Whether to send an event after acting, given the notify byte's value
/// before the action's bit was cleared from it.
pub fn should_notify(before: u8, bit: u8) -> bool {
    before & bit != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_the_rings() {
        let g = Geometry::new(10, 11).unwrap();
        assert_eq!(g.left, (Place::InPage(1024), 1024));
        assert_eq!(g.right, (Place::InPage(2048), 2048));
        assert_eq!((g.grants(true), g.grants(false)), (0..0, 0..0));
        let g = Geometry::new(13, 11).unwrap();
        assert_eq!(g.left, (Place::Pages(2), 8192));
        assert_eq!((g.grants(true), g.grants(false)), (0..2, 2..2));
        let g = Geometry::new(12, 14).unwrap();
        assert_eq!((g.grants(true), g.grants(false)), (0..1, 1..5));
        // The largest rings: 256 + 256 grants still end inside the page.
        assert!(Geometry::new(MAX_ORDER, MAX_ORDER).is_ok());
        for (l, r) in [(9, 11), (10, 21), (0, 0), (u16::MAX, 10)] {
            assert!(matches!(Geometry::new(l, r), Err(VchanError::BadOrder(_))));
        }
        assert_eq!(Geometry::new(10, 10), Err(VchanError::BadLayout));
        assert_eq!(Geometry::new(11, 11), Err(VchanError::BadLayout));
        // 256 grants (1 KiB) do not fit before an in-page ring at 1024.
        assert_eq!(Geometry::new(10, MAX_ORDER), Err(VchanError::BadLayout));
        assert!(Geometry::new(11, 19).is_ok(), "128 grants end before 2048");
    }

    #[test]
    fn ring_arithmetic_across_wraparound_and_hostile_indices() {
        assert_eq!(readable(10, 4, 1024), Ok(6));
        assert_eq!(writable(10, 4, 1024), Ok(1018));
        assert_eq!(readable(3, u32::MAX - 2, 1024), Ok(6), "indices wrap");
        assert_eq!(readable(1024, 0, 1024), Ok(1024));
        assert_eq!(readable(1025, 0, 1024), Err(VchanError::BadIndices));
        assert_eq!(readable(0, 1, 1024), Err(VchanError::BadIndices));
        assert_eq!(writable(2000, 0, 1024), Err(VchanError::BadIndices));
        assert_eq!(pieces(1020, 3, 1024), [(1020, 3), (0, 0)]);
        assert_eq!(pieces(1020, 10, 1024), [(1020, 4), (0, 6)]);
        assert_eq!(pieces(u32::MAX, 2, 1024), [(1023, 1), (0, 1)]);
        assert_eq!(pieces(2048, 1024, 1024), [(0, 1024), (0, 0)]);
        assert!(should_notify(NOTIFY_WRITE | NOTIFY_READ, NOTIFY_READ));
        assert!(!should_notify(NOTIFY_WRITE, NOTIFY_READ));
        assert_eq!(Live::parse(2), Ok(Live::NotYet));
        assert_eq!(Live::parse(3), Err(VchanError::BadLive(3)));
    }
}
