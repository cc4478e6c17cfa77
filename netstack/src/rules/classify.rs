//! First-match rule lookup without a scan of the rules: one bit set per
//! rule set dimension (protocol, destination, port, ICMP type), ANDed,
//! and the lowest bit that survives is the first matching rule.
//!
//! Each rule is a box: a protocol class, a destination prefix, a port
//! range and an ICMP type (each possibly "any"). For the destination, the
//! port and the ICMP type, the rules' bounds cut the value space into
//! elementary intervals, and each interval stores the set of rules whose
//! range covers it: a lookup is a binary search and a slice of
//! `ceil(rules / 64)` words. The protocol class (TCP, UDP, the family's
//! ICMP, other) has one set each, which already leaves out rules with
//! ports for what is not TCP or UDP, and rules with an ICMP type for what
//! is not ICMP. Conditions outside the box are checked on the candidate
//! itself: DNS rules are masked out unless the packet goes to a DNS
//! address (and DNS is configured), and a `dsthost` rule's resolved
//! addresses are checked when it is the lowest candidate (its prefix
//! dimension is "any").
//!
//! An IPv4 destination search first narrows to the bounds that share the
//! address's top byte (a 257-entry table, about 1 KiB).
//!
//! Memory is the intervals (at most `2 × rules + 1` a dimension) ×
//! `rules / 64` words: a rule set whose sets would take more than
//! `MAX_BYTES`, or that is longer than `MAX_RULES`, keeps the linear
//! scan, and so do sets of at most `MIN_RULES`, which the scan (about
//! 2 ns a rule) gets through faster than the classifier's fixed cost
//! (about 25 ns).

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
/// bytes), 1,000 rules when they name at most about 2,000 distinct bounds.
pub(super) const MAX_BYTES: usize = 256 << 10;
/// Shortest rule set classified.
pub(super) const MIN_RULES: usize = 16;

/// Elementary intervals of one dimension and the rules covering each.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Partition<T> {
    /// Interval `i` runs from `starts[i]` to `starts[i + 1] - 1`; the first
    /// start is the dimension's minimum.
    starts: Vec<T>,
    /// `starts.len() × words` words.
    sets: Vec<u64>,
}

impl<T: Ord + Copy> Partition<T> {
    /// The starts of the elementary intervals that `ranges` cut (rule
    /// `r`'s inclusive range, `None` for any value), from `min`; `next`
    /// gives the value after one (`None` past the maximum).
    fn starts(ranges: &[Option<(T, T)>], min: T, next: impl Fn(T) -> Option<T>) -> Vec<T> {
        let mut starts = alloc::vec![min];
        for (lo, hi) in ranges.iter().flatten() {
            starts.push(*lo);
            starts.extend(next(*hi));
        }
        starts.sort_unstable();
        starts.dedup();
        starts
    }

    /// The set of rules covering each interval of `starts`.
    fn build(ranges: &[Option<(T, T)>], starts: Vec<T>, words: usize) -> Self {
        let mut sets = alloc::vec![0u64; starts.len() * words];
        for (i, s) in starts.iter().enumerate() {
            for (r, range) in ranges.iter().enumerate() {
                if range.is_none_or(|(lo, hi)| lo <= *s && *s <= hi) {
                    sets[i * words + r / 64] |= 1 << (r % 64);
                }
            }
        }
        Self { starts, sets }
    }

    fn lookup(&self, x: T, words: usize) -> &[u64] {
        let i = self.starts.partition_point(|s| *s <= x).saturating_sub(1);
        self.set(i, words)
    }

    /// Interval `i`'s set.
    fn set(&self, i: usize, words: usize) -> &[u64] {
        self.sets.get(i * words..(i + 1) * words).unwrap_or(&[])
    }
}

/// An IPv4 destination partition with a first level by the address's top
/// byte: `top[b]` is the number of starts below `b << 24`, so the search
/// for an address runs only over the starts that share its top byte
/// (for the usual rule sets, none to a few instead of all of them).
#[derive(Debug, Clone, PartialEq, Eq)]
struct V4Destinations {
    part: Partition<u32>,
    /// Indexed by a top byte and the one after it: always in bounds.
    top: Box<[u32; 257]>,
}

impl V4Destinations {
    fn new(part: Partition<u32>) -> Self {
        let top = Box::new(core::array::from_fn(|b| {
            part.starts
                .partition_point(|s| u64::from(*s) < (b as u64) << 24) as u32
        }));
        Self { part, top }
    }

    fn lookup(&self, x: u32, words: usize) -> &[u64] {
        let b = (x >> 24) as usize;
        let (lo, hi) = (self.top[b] as usize, self.top[b + 1] as usize);
        // Every start below `lo` is at most `x`, every one from `hi` on
        // above it: the count of starts at most `x` is `lo` plus those in
        // between.
        let within = self
            .part
            .starts
            .get(lo..hi)
            .map_or(0, |s| s.partition_point(|s| *s <= x));
        self.part.set((lo + within).saturating_sub(1), words)
    }
}

/// The destination dimension, in the family's own width: an IPv4 rule
/// set's bounds are 32-bit, and a search over them compares one word.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Destinations {
    V4(V4Destinations),
    V6(Partition<u128>),
}

/// Protocol classes.
const TCP: usize = 0;
const UDP: usize = 1;
const ICMP: usize = 2;
const OTHER: usize = 3;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Classifier {
    words: usize,
    proto: [Vec<u64>; 4],
    dst: Destinations,
    port: Partition<u16>,
    icmp_type: Partition<u8>,
    /// Every rule but those that match only traffic to the DNS addresses.
    not_dns: Vec<u64>,
    /// Every rule.
    all: Vec<u64>,
    /// The `dsthost` rules, whose addresses `first`'s `check` tests.
    hosted: Vec<u64>,
    /// The family's ICMP protocol number.
    icmp: u8,
}

impl Classifier {
    pub(super) fn build(matchers: &[Matcher], icmp: u8) -> Option<Self> {
        if matchers.len() <= MIN_RULES || matchers.len() > MAX_RULES {
            return None;
        }
        let words = matchers.len().div_ceil(64).max(1);
        let mut proto: [Vec<u64>; 4] = core::array::from_fn(|_| alloc::vec![0u64; words]);
        let mut all = alloc::vec![0u64; words];
        let mut not_dns = alloc::vec![0u64; words];
        let mut hosted = alloc::vec![0u64; words];
        for (r, m) in matchers.iter().enumerate() {
            let bit = 1u64 << (r % 64);
            all[r / 64] |= bit;
            if !m.dns {
                not_dns[r / 64] |= bit;
            }
            if m.host.is_some() {
                hosted[r / 64] |= bit;
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
                    set[r / 64] |= bit;
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
        let port_starts = Partition::starts(&ports, 0, |x: u16| x.checked_add(1));
        let type_starts = Partition::starts(&types, 0, |x: u8| x.checked_add(1));
        // The sets' size is known from the interval counts before any is
        // allocated: over the budget, the rules are scanned instead.
        let within = |dst_intervals: usize| {
            let intervals = dst_intervals + port_starts.len() + type_starts.len();
            intervals.saturating_mul(words * 8) <= MAX_BYTES
        };
        let dst = match v4 {
            Some(v4) => {
                let starts = Partition::starts(&v4, 0, |x: u32| x.checked_add(1));
                if !within(starts.len()) {
                    return None;
                }
                Destinations::V4(V4Destinations::new(Partition::build(&v4, starts, words)))
            }
            None => {
                let starts = Partition::starts(&dst, 0, |x: u128| x.checked_add(1));
                if !within(starts.len()) {
                    return None;
                }
                Destinations::V6(Partition::build(&dst, starts, words))
            }
        };
        Some(Self {
            words,
            proto,
            dst,
            port: Partition::build(&ports, port_starts, words),
            icmp_type: Partition::build(&types, type_starts, words),
            not_dns,
            all,
            hosted,
            icmp,
        })
    }

    /// The first rule that may match (`proto`, `dst`, `dport`, `icmp_type`)
    /// and for which `check` (the conditions outside the box) holds.
    /// `dns_ok`: the packet goes to a DNS address and DNS is configured.
    pub(super) fn first(
        &self,
        proto: u8,
        dst: u128,
        dport: u16,
        icmp_type: u8,
        dns_ok: bool,
        check: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let w = self.words;
        // Rules with ports are in the TCP and UDP classes' sets only, rules
        // with an ICMP type in the ICMP class's only: one transport
        // dimension per class.
        let (by_proto, by_l4) = match proto {
            PROTO_TCP => (&self.proto[TCP], self.port.lookup(dport, w)),
            PROTO_UDP => (&self.proto[UDP], self.port.lookup(dport, w)),
            p if p == self.icmp => (&self.proto[ICMP], self.icmp_type.lookup(icmp_type, w)),
            _ => (&self.proto[OTHER], &self.all[..]),
        };
        let by_dst = match &self.dst {
            // (An IPv4 packet's address is the low 32 bits.)
            Destinations::V4(p) => p.lookup(dst as u32, w),
            Destinations::V6(p) => p.lookup(dst, w),
        };
        let mask = if dns_ok { &self.all } else { &self.not_dns };
        // (Every slice is `w` words long.)
        let words = by_proto
            .iter()
            .zip(by_dst)
            .zip(by_l4)
            .zip(mask.iter().zip(&self.hosted));
        for (i, (((p, d), l), (m, hosted))) in words.enumerate() {
            let mut set = p & d & l & m;
            while set != 0 {
                let bit = set & set.wrapping_neg();
                let r = i * 64 + bit.trailing_zeros() as usize;
                if hosted & bit == 0 || check(r) {
                    return Some(r);
                }
                set ^= bit;
            }
        }
        None
    }
}
