//! `ClientIndex`: which client, if any, an address is. Every packet that
//! starts a flow asks it twice (is the source a client, is the destination
//! one), so it is a small open-addressing table built for that question:
//! one multiply for the hash, the address compared in place, at most a
//! quarter full so a probe that finds nothing usually stops at the first
//! bucket. The keys are the connected clients' addresses, which only dom0
//! sets; a packet's address is only looked up, so however the packets
//! choose their addresses they cannot lengthen a probe.

use alloc::vec::Vec;
use core::net::{Ipv4Addr, Ipv6Addr};

/// An address the index can hold.
pub(super) trait IndexKey: Copy + Eq {
    /// The address's bits folded into 64 (the hash multiplies them).
    fn bits(&self) -> u64;
}

impl IndexKey for Ipv4Addr {
    #[inline(always)]
    fn bits(&self) -> u64 {
        u64::from(self.to_bits())
    }
}

impl IndexKey for Ipv6Addr {
    #[inline(always)]
    fn bits(&self) -> u64 {
        let b = self.to_bits();
        (b as u64) ^ ((b >> 64) as u64).rotate_left(29)
    }
}

/// Files `a` as client `ci` in an entry list, in place of what it was.
fn file<A: IndexKey>(entries: &mut Vec<(A, usize)>, a: A, ci: usize) {
    match entries.iter_mut().find(|(k, _)| *k == a) {
        Some(e) => e.1 = ci,
        None => entries.push((a, ci)),
    }
}

/// Client numbers by address.
#[derive(Debug, Clone)]
pub(super) struct ClientIndex<A> {
    /// The entries, in no order: the table is rebuilt from them.
    entries: Vec<(A, usize)>,
    /// A power of two of buckets, at least four times the entries.
    buckets: Vec<Option<(A, usize)>>,
    /// 64 − log2(buckets): the hash is the top bits of the product.
    shift: u32,
}

impl<A: IndexKey> Default for ClientIndex<A> {
    fn default() -> Self {
        Self::build(Vec::new())
    }
}

impl<A: IndexKey> FromIterator<(A, usize)> for ClientIndex<A> {
    fn from_iter<I: IntoIterator<Item = (A, usize)>>(iter: I) -> Self {
        let mut entries = Vec::new();
        for (a, ci) in iter {
            file(&mut entries, a, ci);
        }
        Self::build(entries)
    }
}

impl<A: IndexKey> ClientIndex<A> {
    fn build(entries: Vec<(A, usize)>) -> Self {
        let n = (4 * entries.len()).max(8).next_power_of_two();
        let mut index = Self {
            entries,
            buckets: alloc::vec![None; n],
            shift: 64 - n.trailing_zeros(),
        };
        for &(a, ci) in &index.entries {
            let mask = index.buckets.len() - 1;
            let mut b = index.home(&a);
            while index.buckets[b].is_some() {
                b = (b + 1) & mask;
            }
            index.buckets[b] = Some((a, ci));
        }
        index
    }

    #[inline(always)]
    fn home(&self, a: &A) -> usize {
        (a.bits().wrapping_mul(0x9e37_79b9_7f4a_7c15) >> self.shift) as usize
    }

    /// Client `a`'s number.
    #[inline]
    pub(super) fn get(&self, a: &A) -> Option<usize> {
        let mask = self.buckets.len() - 1;
        let mut b = self.home(a);
        // At most a quarter full: an empty bucket ends every probe; the
        // bound is only a guard.
        for _ in 0..self.buckets.len() {
            match self.buckets.get(b)? {
                Some((k, ci)) if k == a => return Some(*ci),
                Some(_) => b = (b + 1) & mask,
                None => return None,
            }
        }
        None
    }

    #[inline]
    pub(super) fn contains_key(&self, a: &A) -> bool {
        self.get(a).is_some()
    }

    /// Files `a` as client `ci` (in place of what it was).
    pub(super) fn insert(&mut self, a: A, ci: usize) {
        let mut entries = core::mem::take(&mut self.entries);
        file(&mut entries, a, ci);
        *self = Self::build(entries);
    }

    pub(super) fn remove(&mut self, a: &A) {
        let mut entries = core::mem::take(&mut self.entries);
        entries.retain(|(k, _)| k != a);
        *self = Self::build(entries);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::BTreeMap;

    /// Against a map, through inserts, replacements and removals, with
    /// lookups of addresses that are and are not in it — many sharing a
    /// home bucket, as a /24 of clients does.
    #[test]
    fn agrees_with_a_map() {
        let mut index: ClientIndex<Ipv4Addr> = ClientIndex::default();
        let mut model = BTreeMap::new();
        let mut x = 12345u32;
        for step in 0..4000usize {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let a = Ipv4Addr::new(10, 137, (x >> 8) as u8 & 3, x as u8);
            match x % 5 {
                0 | 1 => {
                    index.insert(a, step);
                    model.insert(a, step);
                }
                2 => {
                    index.remove(&a);
                    model.remove(&a);
                }
                _ => {}
            }
            assert_eq!(index.get(&a), model.get(&a).copied(), "{a}");
            let other = Ipv4Addr::from(x.rotate_left(7));
            assert_eq!(index.contains_key(&other), model.contains_key(&other));
        }
        for (a, ci) in &model {
            assert_eq!(index.get(a), Some(*ci));
        }
        assert!(index.buckets.len() >= 4 * model.len());
    }

    #[test]
    fn ipv6_and_duplicates_in_a_collection() {
        let a = Ipv6Addr::new(0xfd09, 0x24ef, 0x4179, 0, 0, 0, 0xa89, 3);
        let b = Ipv6Addr::new(0xfd09, 0x24ef, 0x4179, 0, 0, 0, 0xa89, 4);
        let index: ClientIndex<Ipv6Addr> = [(a, 1), (b, 2), (a, 3)].into_iter().collect();
        assert_eq!(index.get(&a), Some(3));
        assert_eq!(index.get(&b), Some(2));
        assert_eq!(index.get(&Ipv6Addr::UNSPECIFIED), None);
        let empty: ClientIndex<Ipv6Addr> = ClientIndex::default();
        assert_eq!(empty.get(&a), None);
    }
}
