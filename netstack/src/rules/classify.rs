//! First-match rule lookup without a scan of the rules: one bit set per
//! rule set dimension (protocol, destination, port, ICMP type), ANDed,
//! and the lowest bit that survives is the first matching rule.
//!
//! Each rule is a box: a protocol class, a destination prefix, a port
//! range and an ICMP type (each possibly "any"). For the destination, the
//! port and the ICMP type, the rules' bounds cut the value space into
//! elementary intervals, and each interval stores the set of rules whose
//! range covers it: a lookup is a binary search and a set of words. The
//! protocol class (TCP, UDP, the family's ICMP, other) has one set each,
//! which already leaves out rules with ports for what is not TCP or UDP,
//! and rules with an ICMP type for what is not ICMP. Conditions outside
//! the box are checked on the candidate itself: DNS rules are masked out
//! unless the packet goes to a DNS address (and DNS is configured), and
//! a `dsthost` rule's resolved addresses are checked when it is the
//! lowest candidate (its prefix dimension is "any").
//!
//! An IPv4 destination search first narrows to the bounds that share the
//! address's top byte (a 257-entry table, about 1 KiB).
//!
//! A set is a fixed-size array of `ceil(rules / 64)` words rounded up to
//! the next of a few widths (`Width`), each with its own compiled lookup:
//! the words are ANDed in an unrolled loop with no bounds checks and no
//! length read from memory (as slices of a run-time length, a new flow
//! with 100 rules took 43 more instructions in the lookup).
//!
//! Memory is the intervals (at most `2 × rules + 1` a dimension) × the
//! set's words: a rule set whose sets would take more than `MAX_BYTES`,
//! or that is longer than `MAX_RULES`, keeps the linear scan, and so do
//! sets of at most `MIN_RULES`, which the scan (about 2 ns a rule) gets
//! through faster than the classifier's fixed cost (about 10 ns).

use alloc::boxed::Box;
use alloc::vec::Vec;

use super::{Matcher, ANY_PROTO, TCP_OR_UDP};
use crate::ipv6::PROTO_ICMPV6;
use crate::wire::{PROTO_TCP, PROTO_UDP};

/// Longest rule set classified (longer ones are scanned): 64 words, 512
/// bytes, a set.
pub(super) const MAX_RULES: usize = 4096;
/// Most bytes the interval sets of one rule set may take (all three
/// dimensions); a rule set whose bounds cut more intervals is scanned.
/// 512 rules fit however they are written (at most 2,307 intervals of 64
/// bytes), 1,000 rules (sets of 16 words) when they name at most about
/// 2,000 distinct bounds, 1,025 to 1,536 rules (24 words) about 1,350.
pub(super) const MAX_BYTES: usize = 256 << 10;
/// Rule sets of at most this many rules are scanned. Ten rules that all
/// miss took 18 ns scanned and 14 ns classified (criterion
/// `rules_decide/10`, 2026-11-29).
pub(super) const MIN_RULES: usize = 8;

/// A set of rules, one bit a rule (rule `r` is bit `r % 64` of word
/// `r / 64`), in a fixed number of words: a lookup's sets are arrays, ANDed
/// without a bounds check or a loop over a length read from memory.
type Bits<const N: usize> = [u64; N];

/// The starts of the elementary intervals that `ranges` cut (rule `r`'s
/// inclusive range, `None` for any value), from `min`; `next` gives the
/// value after one (`None` past the maximum).
fn starts<T: Ord + Copy>(
    ranges: &[Option<(T, T)>],
    min: T,
    next: impl Fn(T) -> Option<T>,
) -> Vec<T> {
    let mut starts = alloc::vec![min];
    for (lo, hi) in ranges.iter().flatten() {
        starts.push(*lo);
        starts.extend(next(*hi));
    }
    starts.sort_unstable();
    starts.dedup();
    starts
}

/// Elementary intervals of one dimension and the rules covering each.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Partition<T, const N: usize> {
    /// Interval `i` runs from `starts[i]` to `starts[i + 1] - 1`; the first
    /// start is the dimension's minimum.
    starts: Vec<T>,
    /// One set an interval.
    sets: Vec<Bits<N>>,
}

impl<T: Ord + Copy, const N: usize> Partition<T, N> {
    /// The set of rules covering each interval of `starts`.
    fn build(ranges: &[Option<(T, T)>], starts: Vec<T>) -> Self {
        let mut sets = alloc::vec![[0u64; N]; starts.len()];
        for (s, set) in starts.iter().zip(&mut sets) {
            for (r, range) in ranges.iter().enumerate() {
                if range.is_none_or(|(lo, hi)| lo <= *s && *s <= hi) {
                    set[r / 64] |= 1 << (r % 64);
                }
            }
        }
        Self { starts, sets }
    }

    /// The set of the interval holding `x` (`None` only for a value below
    /// the first start, which is the dimension's minimum).
    #[inline(always)]
    fn lookup(&self, x: T) -> Option<&Bits<N>> {
        let i = self.starts.partition_point(|s| *s <= x);
        self.sets.get(i.checked_sub(1)?)
    }
}

/// An IPv4 destination partition with a first level by the address's top
/// byte: `top[b]` is the number of starts below `b << 24`, so the search
/// for an address runs only over the starts that share its top byte
/// (for the usual rule sets, none to a few instead of all of them).
#[derive(Debug, Clone, PartialEq, Eq)]
struct V4Destinations<const N: usize> {
    part: Partition<u32, N>,
    /// Indexed by a top byte and the one after it: always in bounds.
    top: Box<[u32; 257]>,
}

impl<const N: usize> V4Destinations<N> {
    fn new(part: Partition<u32, N>) -> Self {
        let top = Box::new(core::array::from_fn(|b| {
            part.starts
                .partition_point(|s| u64::from(*s) < (b as u64) << 24) as u32
        }));
        Self { part, top }
    }

    #[inline(always)]
    fn lookup(&self, x: u32) -> Option<&Bits<N>> {
        let b = (x >> 24) as usize;
        let (lo, hi) = (self.top[b] as usize, self.top[b + 1] as usize);
        // Every start below `lo` is at most `x`, every one from `hi` on
        // above it: the count of starts at most `x` is `lo` plus those in
        // between.
        let within = match self.part.starts.get(lo..hi) {
            Some(s) => s.partition_point(|s| *s <= x),
            None => 0,
        };
        self.part.sets.get((lo + within).checked_sub(1)?)
    }
}

/// The destination dimension, in the family's own width: an IPv4 rule
/// set's bounds are 32-bit, and a search over them compares one word.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Destinations<const N: usize> {
    V4(V4Destinations<N>),
    V6(Partition<u128, N>),
}

/// Protocol classes.
const TCP: usize = 0;
const UDP: usize = 1;
const ICMP: usize = 2;
const OTHER: usize = 3;

/// The rule sets of a classifier whose sets are `N` words.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sets<const N: usize> {
    proto: [Bits<N>; 4],
    dst: Destinations<N>,
    port: Partition<u16, N>,
    icmp_type: Partition<u8, N>,
    /// Every rule but those that match only traffic to the DNS addresses.
    not_dns: Bits<N>,
    /// Every rule.
    all: Bits<N>,
    /// The `dsthost` rules, whose addresses `first`'s `check` tests.
    hosted: Bits<N>,
    /// The family's ICMP protocol number.
    icmp: u8,
}

/// The classifier of one rule set, its sets in as many words as the rules
/// need rounded up to the next compiled width (1, 2, 3, 4, 6, 8, 12, ...,
/// 64 for `MAX_RULES`: at most a third more than needed): each width is
/// compiled on its own, so a lookup's loop over the words is unrolled and
/// unchecked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Classifier(Width);

/// Declares `Width`, one variant a compiled width, and the two
/// dispatches over it from one list, so that no width can be declared and
/// then missed by `build` or by `first`.
macro_rules! widths {
    ($($variant:ident = $words:literal),* $(,)?) => {
        #[derive(Debug, Clone, PartialEq, Eq)]
        enum Width {
            $($variant(Box<Sets<$words>>),)*
        }

        impl Width {
            /// The sets of `matchers` in the narrowest width of at least
            /// `need` words (`None`: too wide, or over `MAX_BYTES`).
            fn build(need: usize, matchers: &[Matcher], icmp: u8) -> Option<Self> {
                $(if need <= $words {
                    return Some(Self::$variant(Box::new(Sets::build(matchers, icmp)?)));
                })*
                None
            }

            #[inline(always)]
            fn first(&self, q: Query, check: impl Fn(usize) -> bool) -> Option<usize> {
                match self {
                    $(Self::$variant(s) => s.first(q, check),)*
                }
            }
        }
    };
}

widths!(
    W1 = 1,
    W2 = 2,
    W3 = 3,
    W4 = 4,
    W6 = 6,
    W8 = 8,
    W12 = 12,
    W16 = 16,
    W24 = 24,
    W32 = 32,
    W48 = 48,
    W64 = 64,
);

/// A lookup's question: protocol, destination, destination port, ICMP
/// type, and whether DNS rules may match (see `Classifier::first`).
type Query = (u8, u128, u16, u8, bool);

impl Classifier {
    pub(super) fn build(matchers: &[Matcher], icmp: u8) -> Option<Self> {
        if matchers.len() <= MIN_RULES || matchers.len() > MAX_RULES {
            return None;
        }
        Width::build(matchers.len().div_ceil(64), matchers, icmp).map(Self)
    }

    /// The first rule that may match (`proto`, `dst`, `dport`, `icmp_type`)
    /// and for which `check` (the conditions outside the box) holds.
    /// `dns_ok`: the packet goes to a DNS address and DNS is configured.
    #[inline(always)]
    pub(super) fn first(
        &self,
        proto: u8,
        dst: u128,
        dport: u16,
        icmp_type: u8,
        dns_ok: bool,
        check: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        self.0.first((proto, dst, dport, icmp_type, dns_ok), check)
    }
}

impl<const N: usize> Sets<N> {
    fn build(matchers: &[Matcher], icmp: u8) -> Option<Self> {
        let mut proto = [[0u64; N]; 4];
        let mut all = [0u64; N];
        let mut not_dns = [0u64; N];
        let mut hosted = [0u64; N];
        for (r, m) in matchers.iter().enumerate() {
            let (word, bit) = (r / 64, 1u64 << (r % 64));
            all[word] |= bit;
            if !m.dns {
                not_dns[word] |= bit;
            }
            if m.host.is_some() {
                hosted[word] |= bit;
            }
            for (class, set) in proto.iter_mut().enumerate() {
                let number = match class {
                    TCP => PROTO_TCP,
                    UDP => PROTO_UDP,
                    ICMP => icmp,
                    _ => 0,
                };
                let tcp_udp = class == TCP || class == UDP;
                let proto_ok = match m.proto {
                    ANY_PROTO => true,
                    TCP_OR_UDP => tcp_udp,
                    n => class != OTHER && n == number,
                };
                let ok = !m.never
                    && proto_ok
                    && (m.ports.is_none() || tcp_udp)
                    && (m.icmp_type.is_none() || class == ICMP);
                if ok {
                    set[word] |= bit;
                }
            }
        }
        let dst: Vec<Option<(u128, u128)>> = matchers
            .iter()
            .map(|m| (m.mask != 0 && m.host.is_none()).then_some((m.net, m.net | !m.mask)))
            .collect();
        // An IPv4 rule's prefix has every bit above the low 32 set in its
        // mask (`Matcher::compile`), so its bounds fit 32 bits.
        let v4: Option<Vec<Option<(u32, u32)>>> = (icmp != PROTO_ICMPV6)
            .then(|| {
                dst.iter()
                    .map(|r| match *r {
                        None => Some(None),
                        Some((lo, hi)) => {
                            Some(Some((u32::try_from(lo).ok()?, u32::try_from(hi).ok()?)))
                        }
                    })
                    .collect()
            })
            .flatten();
        let ports: Vec<_> = matchers.iter().map(|m| m.ports).collect();
        let types: Vec<_> = matchers
            .iter()
            .map(|m| m.icmp_type.map(|t| (t, t)))
            .collect();
        let port_starts = starts(&ports, 0, |x: u16| x.checked_add(1));
        let type_starts = starts(&types, 0, |x: u8| x.checked_add(1));
        // The sets' size is known from the interval counts before any is
        // allocated: over the budget, the rules are scanned instead.
        let within = |dst_intervals: usize| {
            let intervals = dst_intervals + port_starts.len() + type_starts.len();
            intervals.saturating_mul(core::mem::size_of::<Bits<N>>()) <= MAX_BYTES
        };
        let dst = match v4 {
            Some(v4) => {
                let starts = starts(&v4, 0, |x: u32| x.checked_add(1));
                if !within(starts.len()) {
                    return None;
                }
                Destinations::V4(V4Destinations::new(Partition::build(&v4, starts)))
            }
            None => {
                let starts = starts(&dst, 0, |x: u128| x.checked_add(1));
                if !within(starts.len()) {
                    return None;
                }
                Destinations::V6(Partition::build(&dst, starts))
            }
        };
        Some(Self {
            proto,
            dst,
            port: Partition::build(&ports, port_starts),
            icmp_type: Partition::build(&types, type_starts),
            not_dns,
            all,
            hosted,
            icmp,
        })
    }

    /// `Classifier::first` for sets of `N` words.
    #[inline(always)]
    fn first(
        &self,
        (proto, dst, dport, icmp_type, dns_ok): Query,
        check: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        // Rules with ports are in the TCP and UDP classes' sets only, rules
        // with an ICMP type in the ICMP class's only: one transport
        // dimension per class.
        let (by_proto, by_l4) = match proto {
            PROTO_TCP => (&self.proto[TCP], self.port.lookup(dport)?),
            PROTO_UDP => (&self.proto[UDP], self.port.lookup(dport)?),
            p if p == self.icmp => (&self.proto[ICMP], self.icmp_type.lookup(icmp_type)?),
            _ => (&self.proto[OTHER], &self.all),
        };
        let by_dst = match &self.dst {
            // (An IPv4 packet's address is the low 32 bits.)
            Destinations::V4(p) => p.lookup(dst as u32)?,
            Destinations::V6(p) => p.lookup(dst)?,
        };
        let mask = if dns_ok { &self.all } else { &self.not_dns };
        for i in 0..N {
            let mut set = by_proto[i] & by_dst[i] & by_l4[i] & mask[i];
            while set != 0 {
                let bit = set & set.wrapping_neg();
                let r = i * 64 + bit.trailing_zeros() as usize;
                if self.hosted[i] & bit == 0 || check(r) {
                    return Some(r);
                }
                set ^= bit;
            }
        }
        None
    }
}
