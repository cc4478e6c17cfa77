//! Connection tracking with source NAT and destination rewriting.
//!
//! Each flow is created by a client's first packet (after the rules
//! accepted it) and is found again two ways: by the client-side tuple as the
//! client sends it, and by the uplink-side tuple as replies arrive. A flow
//! remembers what the client addressed (`orig_dst`, which differs from
//! `remote` when DNS is redirected) so that replies are rewritten back.
//!
//! Bounds and expiry: the table holds at most `capacity` flows, in memory
//! allocated at creation. Flows expire by protocol and state (TCP handshake
//! 60 s, established 2 h, closing 10 s; UDP 30 s, 180 s once answered; ICMP
//! echo 30 s). Expired flows are reclaimed lazily when met, by `expire`,
//! which the owner calls with a budget, and, for flows never answered, in
//! creation order as new flows are created (`reclaim_oldest`). A new flow
//! that finds the table full takes the slot of an expired flow, else of
//! the oldest flow never answered (`make_room`); when every flow has been
//! answered and none has expired, the new flow is refused (counted by the
//! caller). So a flood of new flows only ever displaces other unanswered
//! flows, never an established one.
//!
//! The table is generic over the address family: the firewall keeps one
//! for IPv4 and one for IPv6 (`Conntrack<Ipv6Addr>`), with the same rules.

use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::fmt::Debug;
use core::hash::{Hash, Hasher};
use core::net::{Ipv4Addr, Ipv6Addr};

use core::hash::BuildHasher;

use hashbrown::DefaultHashBuilder;

use crate::ipv6::PROTO_ICMPV6;
use crate::wire::{
    ChecksumDelta, PROTO_ICMP, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
};

const SECOND: u64 = 1000;
const TCP_HANDSHAKE: u64 = 60 * SECOND;
const TCP_ESTABLISHED: u64 = 2 * 3600 * SECOND;
const TCP_CLOSING: u64 = 10 * SECOND;
const UDP_NEW: u64 = 30 * SECOND;
const UDP_REPLIED: u64 = 180 * SECOND;
const ICMP_TIMEOUT: u64 = 30 * SECOND;
/// NAT ports (and ICMP ids) are taken from this range.
pub const NAT_PORT_FIRST: u16 = 1024;
/// Attempts to find a free NAT port before giving up.
const PORT_TRIES: u32 = 4096;

/// An address family's address: `Ipv4Addr` or `Ipv6Addr`.
pub trait Addr: Copy + Eq + Hash + Debug {
    /// Feeds a tuple of this family to a hasher in as few writes as fit
    /// (the derived `Hash` would make seven).
    fn hash_tuple<H: Hasher>(t: &Tuple<Self>, h: &mut H);
    /// `d` plus the checksum change of replacing address `old` by `new`.
    fn delta(d: ChecksumDelta, old: Self, new: Self) -> ChecksumDelta;
}

impl Addr for Ipv4Addr {
    #[inline]
    fn hash_tuple<H: Hasher>(t: &Tuple<Self>, h: &mut H) {
        // 32 + 16 + 16 bits, then 32 + 8. Not the two addresses in one
        // word: they lie side by side in a tuple, and the compiler then
        // reads them with one 8-byte load, which stalls for a dozen
        // cycles when the tuple was just written field by field (the load
        // spans two stores, so no store-to-load forwarding).
        h.write_u64(
            u64::from(u32::from(t.src)) << 32 | u64::from(t.sport) << 16 | u64::from(t.dport),
        );
        h.write_u64(u64::from(u32::from(t.dst)) << 8 | u64::from(t.proto));
    }

    #[inline]
    fn delta(d: ChecksumDelta, old: Self, new: Self) -> ChecksumDelta {
        d.dword(u32::from(old), u32::from(new))
    }
}

impl Addr for Ipv6Addr {
    #[inline]
    fn hash_tuple<H: Hasher>(t: &Tuple<Self>, h: &mut H) {
        h.write_u128(u128::from(t.src));
        h.write_u128(u128::from(t.dst));
        h.write_u64(u64::from(t.sport) << 24 | u64::from(t.dport) << 8 | u64::from(t.proto));
    }

    #[inline]
    fn delta(d: ChecksumDelta, old: Self, new: Self) -> ChecksumDelta {
        d.ipv6(old, new)
    }
}

/// A tuple as it appears in one direction on the wire. For ICMP echo the
/// identifier is `sport` and `dport` is 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuple<A = Ipv4Addr> {
    pub proto: u8,
    pub src: A,
    pub sport: u16,
    pub dst: A,
    pub dport: u16,
}

impl<A: Addr> Hash for Tuple<A> {
    #[inline]
    fn hash<H: Hasher>(&self, h: &mut H) {
        A::hash_tuple(self, h);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowState {
    /// Only the client has spoken.
    New,
    /// Both sides have spoken.
    Established,
    /// TCP FIN or RST seen.
    Closing,
}

/// One tracked flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow<A = Ipv4Addr> {
    /// The client-side tuple, as the client sends it.
    pub client: Tuple<A>,
    /// The real destination (after DNS redirection).
    pub remote: A,
    pub remote_port: u16,
    /// Source port (or ICMP id) on the uplink.
    pub nat_port: u16,
    /// The caller's number for the client that owns the flow.
    pub owner: u32,
    /// The checksum changes of the translation on the way out (client →
    /// uplink), folded: of the addresses (the pseudo-header) and of the
    /// ports or ICMP identifier. Fixed for the flow's life, so a packet's
    /// checksums are updated by adding them (RFC 1624) without looking at
    /// the old fields; replies add their negations.
    addr_delta: u16,
    port_delta: u16,
    pub state: FlowState,
    pub expires: u64,
    /// Creation sequence number: tells a reused slot from the flow that
    /// was queued for eviction.
    seq: u64,
    /// The index hashes of the client tuple and of the reply tuple
    /// (`SlotIndex` uses 32 bits), kept so that removal hashes nothing.
    hashes: (u32, u32),
}

/// What a client's packet of a flow needs on its way out: the
/// destination, the ports, and the checksum changes (`Flow::out_deltas`).
/// Small, so the fast path copies it instead of the whole flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outbound<A = Ipv4Addr> {
    pub remote: A,
    pub remote_port: u16,
    pub nat_port: u16,
    pub deltas: (ChecksumDelta, ChecksumDelta),
}

/// What a reply of a flow needs on its way back to the client: the
/// client's addresses (as it sent them: `src` is the client), the ports
/// back (`Flow::ports_back`), the checksum changes and the owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inbound<A = Ipv4Addr> {
    pub client_src: A,
    pub client_dst: A,
    pub ports: (u16, u16),
    pub deltas: (ChecksumDelta, ChecksumDelta),
    pub owner: u32,
}

impl<A: Addr> Flow<A> {
    /// The translation of this flow's replies.
    #[inline]
    pub fn inbound(&self) -> Inbound<A> {
        Inbound {
            client_src: self.client.src,
            client_dst: self.client.dst,
            ports: self.ports_back(),
            deltas: self.back_deltas(),
            owner: self.owner,
        }
    }

    /// The translation of this flow's packets from the client.
    #[inline]
    pub fn outbound(&self) -> Outbound<A> {
        Outbound {
            remote: self.remote,
            remote_port: self.remote_port,
            nat_port: self.nat_port,
            deltas: self.out_deltas(),
        }
    }

    /// The tuple replies carry on the uplink (remote → us).
    pub fn reply_tuple(&self, uplink: A) -> Tuple<A> {
        Tuple {
            proto: self.client.proto,
            src: self.remote,
            sport: self.remote_port,
            dst: uplink,
            dport: self.nat_port,
        }
    }

    /// The (source, destination) ports a reply gets on its way back to
    /// the client; for ICMP echo, (identifier, 0).
    pub fn ports_back(&self) -> (u16, u16) {
        let c = &self.client;
        if c.proto == PROTO_ICMP || c.proto == PROTO_ICMPV6 {
            (c.sport, 0)
        } else {
            (c.dport, c.sport)
        }
    }

    /// The checksum changes (addresses, ports) of a packet from the client.
    #[inline]
    pub fn out_deltas(&self) -> (ChecksumDelta, ChecksumDelta) {
        (
            ChecksumDelta::folded(self.addr_delta),
            ChecksumDelta::folded(self.port_delta),
        )
    }

    /// The checksum changes (addresses, ports) of a reply: the way out
    /// undone.
    #[inline]
    pub fn back_deltas(&self) -> (ChecksumDelta, ChecksumDelta) {
        (
            ChecksumDelta::folded(!self.addr_delta),
            ChecksumDelta::folded(!self.port_delta),
        )
    }

    #[inline]
    fn timeout(&self) -> u64 {
        match (self.client.proto, self.state) {
            (PROTO_TCP, FlowState::New) => TCP_HANDSHAKE,
            (PROTO_TCP, FlowState::Established) => TCP_ESTABLISHED,
            (PROTO_TCP, FlowState::Closing) => TCP_CLOSING,
            (PROTO_UDP, FlowState::New) => UDP_NEW,
            (PROTO_UDP, _) => UDP_REPLIED,
            _ => ICMP_TIMEOUT, // ICMP and ICMPv6 echo
        }
    }

    /// Updates state and expiry for a packet in either direction.
    #[inline(always)]
    pub fn touch(&mut self, now: u64, from_client: bool, tcp_flags: u8) {
        if self.client.proto == PROTO_TCP {
            if tcp_flags & (TCP_FIN | TCP_RST) != 0 {
                self.state = FlowState::Closing;
            } else if !from_client && self.state == FlowState::New && tcp_flags & TCP_ACK != 0 {
                self.state = FlowState::Established;
            } else if from_client
                && self.state == FlowState::New
                && tcp_flags & TCP_SYN == 0
                && tcp_flags & TCP_ACK != 0
            {
                // The client acknowledged the server's SYN-ACK.
                self.state = FlowState::Established;
            }
        } else if !from_client && self.state == FlowState::New {
            self.state = FlowState::Established;
        }
        self.expires = now.saturating_add(self.timeout());
    }
}

/// What `Conntrack::peek_client` found.
#[derive(Debug)]
pub enum Peek<'a, A> {
    /// A live flow.
    Live(&'a mut Flow<A>),
    /// A flow that has expired (`by_client` would remove it).
    Expired,
    /// No flow at all: the tuple with the hash the lookup used, for
    /// `create_owned`.
    Absent(Key<A>),
}

/// A client tuple and its index hash, from `Conntrack::key` or
/// `Conntrack::peek_client`: a flow created for it is filed without
/// hashing the tuple again. Only a table makes one, with its own hasher,
/// and neither part can be changed apart from the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key<A = Ipv4Addr> {
    tuple: Tuple<A>,
    hash: u32,
}

impl<A: Copy> Key<A> {
    pub fn tuple(&self) -> &Tuple<A> {
        &self.tuple
    }

    /// Made out of line: built inline, it made the fast path's hit case
    /// (a batch's loop) spill registers.
    #[cold]
    #[inline(never)]
    fn cold(t: &Tuple<A>, hash: u32) -> Self {
        Self { tuple: *t, hash }
    }
}

/// Why a flow could not be created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateError {
    TableFull,
    NoFreePort,
}

/// The flow table.
#[derive(Debug)]
pub struct Conntrack<A = Ipv4Addr> {
    uplink: A,
    slots: Vec<Option<Flow<A>>>,
    free: Vec<u32>,
    /// Slot numbers by the client-side tuple and by the reply tuple: the
    /// keys live in the slots, the indexes hold 4 bytes a bucket.
    by_client: SlotIndex,
    by_reply: SlotIndex,
    hasher: DefaultHashBuilder,
    next_port: u16,
    sweep: usize,
    /// Flows in creation order, to find the oldest one not yet answered
    /// (slot, sequence number); entries whose flow has since been answered
    /// or removed are skipped and discarded.
    unreplied: VecDeque<(u32, u64)>,
    next_seq: u64,
    evictions: u64,
}

impl<A: Addr> Conntrack<A> {
    pub fn new(uplink: A, capacity: usize) -> Self {
        Self {
            uplink,
            slots: alloc::vec![None; capacity],
            free: (0..capacity as u32).rev().collect(),
            // Twice as many buckets as flows, never grown: the memory stays
            // what it was at start.
            by_client: SlotIndex::new(capacity),
            by_reply: SlotIndex::new(capacity),
            hasher: DefaultHashBuilder::default(),
            next_port: NAT_PORT_FIRST,
            sweep: 0,
            unreplied: VecDeque::with_capacity(2 * capacity + 1),
            next_seq: 0,
            evictions: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Bytes the table holds on the heap (slots, free list, both indexes).
    /// Fixed at creation: a flood of new flows cannot grow it.
    pub fn memory_bytes(&self) -> usize {
        self.slots.capacity() * core::mem::size_of::<Option<Flow<A>>>()
            + self.free.capacity() * core::mem::size_of::<u32>()
            + self.by_client.memory_bytes()
            + self.by_reply.memory_bytes()
            + self.unreplied.capacity() * core::mem::size_of::<(u32, u64)>()
    }

    #[inline(always)]
    fn remove(&mut self, idx: u32) {
        if let Some(f) = self.slots.get_mut(idx as usize).and_then(Option::take) {
            let (hc, hr) = f.hashes;
            self.by_client.remove(hc, idx);
            self.by_reply.remove(hr, idx);
            self.free.push(idx);
        }
    }

    fn live(&mut self, idx: Option<u32>, now: u64) -> Option<u32> {
        let idx = idx?;
        match self.slots.get(idx as usize) {
            Some(Some(f)) if f.expires > now => Some(idx),
            Some(Some(_)) => {
                self.remove(idx);
                None
            }
            _ => None,
        }
    }

    /// A tuple's hash, as the indexes use it.
    #[inline]
    fn hash(&self, t: &Tuple<A>) -> u32 {
        self.hasher.hash_one(t) as u32
    }

    #[inline]
    fn find_client(&self, t: &Tuple<A>, hash: u32) -> Option<u32> {
        let slots = &self.slots;
        self.by_client.find(
            hash,
            |i| matches!(slots.get(i as usize), Some(Some(f)) if f.client == *t),
        )
    }

    #[inline]
    fn find_reply(&self, t: &Tuple<A>, hash: u32) -> Option<u32> {
        let (slots, uplink) = (&self.slots, self.uplink);
        self.by_reply.find(
            hash,
            |i| matches!(slots.get(i as usize), Some(Some(f)) if f.reply_tuple(uplink) == *t),
        )
    }

    /// What client tuple `t` has, changing nothing (`by_client` removes an
    /// expired flow): for the fast path, which must leave everything as it
    /// was when it declines a packet, and which starts a flow without a
    /// second lookup when there is none at all.
    #[inline(always)]
    pub fn peek_client(&mut self, t: &Tuple<A>, now: u64) -> Peek<'_, A> {
        let hash = self.hash(t);
        let Some(idx) = self.find_client(t, hash) else {
            return Peek::Absent(Key::cold(t, hash));
        };
        match self.slots.get_mut(idx as usize) {
            Some(Some(f)) if f.expires > now => Peek::Live(f),
            Some(Some(_)) => Peek::Expired,
            _ => Peek::Absent(Key::cold(t, hash)),
        }
    }

    /// Client tuple `t` with its hash, for `create_owned`.
    pub fn key(&self, t: Tuple<A>) -> Key<A> {
        Key {
            tuple: t,
            hash: self.hash(&t),
        }
    }

    /// The live flow of reply tuple `t`, changing nothing (`by_reply`
    /// removes an expired one): for the fast path.
    #[inline(always)]
    pub fn peek_reply(&mut self, t: &Tuple<A>, now: u64) -> Option<&mut Flow<A>> {
        let idx = self.find_reply(t, self.hash(t))?;
        self.slots
            .get_mut(idx as usize)?
            .as_mut()
            .filter(|f| f.expires > now)
    }

    /// The flow a client packet belongs to.
    pub fn by_client(&mut self, t: &Tuple<A>, now: u64) -> Option<&mut Flow<A>> {
        let idx = self.live(self.find_client(t, self.hash(t)), now)?;
        self.slots.get_mut(idx as usize)?.as_mut()
    }

    /// The flow a reply arriving on the uplink belongs to.
    pub fn by_reply(&mut self, t: &Tuple<A>, now: u64) -> Option<&mut Flow<A>> {
        let found = self.find_reply(t, self.hash(t));
        let idx = self.live(found, now)?;
        self.slots.get_mut(idx as usize)?.as_mut()
    }

    /// The flow a reply belongs to, updated for it (answered, TCP state,
    /// expiry): the reply's translation.
    #[inline]
    pub fn answer(&mut self, t: &Tuple<A>, now: u64, tcp_flags: u8) -> Option<Inbound<A>> {
        let flow = self.by_reply(t, now)?;
        flow.touch(now, false, tcp_flags);
        Some(flow.inbound())
    }

    /// Creates a flow for `client`, going to `remote:remote_port`.
    pub fn create(
        &mut self,
        client: Tuple<A>,
        remote: A,
        remote_port: u16,
        now: u64,
    ) -> Result<Flow<A>, CreateError> {
        self.create_owned(self.key(client), remote, remote_port, now, 0)
    }

    /// As `create`, for a client tuple with its hash, recording `owner` in
    /// the flow.
    pub fn create_owned(
        &mut self,
        key: Key<A>,
        remote: A,
        remote_port: u16,
        now: u64,
        owner: u32,
    ) -> Result<Flow<A>, CreateError> {
        self.reclaim_oldest(now);
        if self.free.is_empty() {
            self.make_room(now);
        }
        let idx = *self.free.last().ok_or(CreateError::TableFull)?;
        let (client, hc) = (key.tuple, key.hash);
        let (nat_port, hr) = self.allocate_port(client, remote, remote_port, now)?;
        self.free.pop();
        let seq = self.next_seq;
        self.next_seq += 1;
        let addresses = A::delta(ChecksumDelta::default(), client.src, self.uplink);
        // (ICMP echo: the identifier is the source port, both other ports 0.)
        let ports = ChecksumDelta::default()
            .word(client.sport, nat_port)
            .word(client.dport, remote_port);
        let mut flow = Flow {
            client,
            remote,
            remote_port,
            nat_port,
            owner,
            addr_delta: A::delta(addresses, client.dst, remote).fold(),
            port_delta: ports.fold(),
            state: FlowState::New,
            expires: 0,
            seq,
            hashes: (hc, hr),
        };
        flow.touch(now, true, 0);
        self.by_client.insert(hc, idx);
        self.by_reply.insert(hr, idx);
        self.slots[idx as usize] = Some(flow);
        if self.unreplied.len() >= 2 * self.slots.len() {
            let slots = &self.slots;
            self.unreplied
                .retain(|&(i, q)| matches!(slots[i as usize], Some(f) if f.seq == q && f.state == FlowState::New));
        }
        self.unreplied.push_back((idx, seq));
        Ok(flow)
    }

    /// Removes the oldest flow never answered if it has expired, after
    /// dropping queue entries of flows answered or gone since (a few per
    /// call). Unanswered flows of one protocol expire in creation order, so
    /// under a flood of new flows each new one frees the one that timed out
    /// before it, while that flow's index buckets are still in the caches:
    /// the table holds the flows that are live instead of filling with
    /// expired ones until a sweep finds them, cold.
    #[inline]
    fn reclaim_oldest(&mut self, now: u64) {
        for _ in 0..4 {
            let Some(&(idx, seq)) = self.unreplied.front() else {
                return;
            };
            match self.slots.get(idx as usize) {
                Some(Some(f)) if f.seq == seq && f.state == FlowState::New => {
                    if f.expires <= now {
                        self.unreplied.pop_front();
                        self.remove(idx);
                    }
                    return;
                }
                _ => {
                    self.unreplied.pop_front();
                }
            }
        }
    }

    /// Frees a slot in a full table: expired flows first (a bounded look),
    /// then the oldest flow that was never answered (a half-open TCP
    /// handshake, an unanswered UDP or ICMP flow), then — only if neither
    /// exists — a full sweep for expired flows. Answered flows are never
    /// evicted to make room: a flood of new flows cannot push them out.
    fn make_room(&mut self, now: u64) {
        self.expire(now, 64);
        if !self.free.is_empty() {
            return;
        }
        while let Some((idx, seq)) = self.unreplied.pop_front() {
            if matches!(self.slots[idx as usize], Some(f) if f.seq == seq && f.state == FlowState::New)
            {
                self.remove(idx);
                self.evictions += 1;
                return;
            }
        }
        self.expire(now, self.slots.len());
    }

    /// Unanswered flows evicted to make room for new ones.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Keeps the client's own port when no other flow to the same remote
    /// endpoint uses it, else the next free one from a rotating cursor;
    /// with the hash of the reply tuple it gives.
    fn allocate_port(
        &mut self,
        client: Tuple<A>,
        remote: A,
        remote_port: u16,
        now: u64,
    ) -> Result<(u16, u32), CreateError> {
        let mut reply = Tuple {
            proto: client.proto,
            src: remote,
            sport: remote_port,
            dst: self.uplink,
            dport: client.sport,
        };
        if client.sport >= NAT_PORT_FIRST {
            let hash = self.hash(&reply);
            if self.reply_free(&reply, hash, now) {
                return Ok((client.sport, hash));
            }
        }
        for _ in 0..PORT_TRIES {
            let port = self.next_port;
            self.next_port = if port == u16::MAX {
                NAT_PORT_FIRST
            } else {
                port + 1
            };
            reply.dport = port;
            let hash = self.hash(&reply);
            if self.reply_free(&reply, hash, now) {
                return Ok((port, hash));
            }
        }
        Err(CreateError::NoFreePort)
    }

    /// Whether no live flow has reply tuple `t` (of hash `hash`); an
    /// expired one is removed.
    #[inline(always)]
    fn reply_free(&mut self, t: &Tuple<A>, hash: u32, now: u64) -> bool {
        let idx = self.find_reply(t, hash);
        self.live(idx, now).is_none()
    }

    /// Removes every flow of `owner`; how many there were.
    pub fn remove_owned(&mut self, owner: u32) -> usize {
        let owned: Vec<u32> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, f)| matches!(f, Some(f) if f.owner == owner))
            .map(|(i, _)| i as u32)
            .collect();
        for &i in &owned {
            self.remove(i);
        }
        owned.len()
    }

    /// Reclaims expired flows among the next `budget` slots.
    pub fn expire(&mut self, now: u64, budget: usize) {
        let n = self.slots.len();
        if n == 0 {
            return;
        }
        for _ in 0..budget.min(n) {
            self.sweep = if self.sweep + 1 >= n {
                0
            } else {
                self.sweep + 1
            };
            if matches!(self.slots[self.sweep], Some(f) if f.expires <= now) {
                self.remove(self.sweep as u32);
            }
        }
    }
}

/// An open-addressing index of slot numbers (linear probing, at most half
/// full). A bucket is 8 bytes: the low 32 bits of the key's hash and the
/// slot number. The key itself lives in the slot, which is read only when
/// the stored hash bits agree, so a miss rarely touches the slots. Removal
/// shifts the entries after the hole back towards their home buckets
/// (the home is the stored hash bits under the mask), so there are no
/// tombstones: probe sequences stay as short as the load allows however
/// much the table churns, and nothing ever needs rebuilding.
#[derive(Debug)]
struct SlotIndex {
    buckets: Vec<u64>,
}

/// An empty bucket: slot `u32::MAX` is never a slot (a table holds fewer).
const EMPTY: u64 = u64::MAX;

impl SlotIndex {
    fn new(capacity: usize) -> Self {
        // Slot numbers are u32 and homes come from 32 hash bits.
        let n = (2 * capacity.clamp(1, 1 << 30)).next_power_of_two();
        Self {
            buckets: alloc::vec![EMPTY; n],
        }
    }

    fn memory_bytes(&self) -> usize {
        self.buckets.capacity() * core::mem::size_of::<u64>()
    }

    fn mask(&self) -> usize {
        self.buckets.len() - 1
    }

    #[inline]
    fn entry(hash: u32, slot: u32) -> u64 {
        (u64::from(hash) << 32) | u64::from(slot)
    }

    /// The slot whose key `is` says matches, among those filed under `hash`.
    #[inline(always)]
    fn find(&self, hash: u32, is: impl Fn(u32) -> bool) -> Option<u32> {
        let mask = self.mask();
        let mut b = hash as usize & mask;
        // At most half full, so an empty bucket ends every probe; the
        // bound is only a guard.
        for _ in 0..self.buckets.len() {
            let e = *self.buckets.get(b)?;
            if e == EMPTY {
                return None;
            }
            if (e >> 32) as u32 == hash && is(e as u32) {
                return Some(e as u32);
            }
            b = (b + 1) & mask;
        }
        None
    }

    fn insert(&mut self, hash: u32, slot: u32) {
        let mask = self.mask();
        let mut b = hash as usize & mask;
        for _ in 0..self.buckets.len() {
            match self.buckets.get_mut(b) {
                Some(e) if *e == EMPTY => {
                    *e = Self::entry(hash, slot);
                    return;
                }
                _ => b = (b + 1) & mask,
            }
        }
    }

    fn remove(&mut self, hash: u32, slot: u32) {
        let mask = self.mask();
        let want = Self::entry(hash, slot);
        let mut hole = hash as usize & mask;
        let mut found = false;
        for _ in 0..self.buckets.len() {
            match self.buckets.get(hole) {
                Some(&e) if e == want => {
                    found = true;
                    break;
                }
                Some(&EMPTY) | None => return,
                Some(_) => hole = (hole + 1) & mask,
            }
        }
        if !found {
            return;
        }
        // Backward shift: each following entry of the run moves into the
        // hole unless its home lies cyclically after the hole (moving it
        // would put it before its home, where no probe looks).
        let mut next = hole;
        for _ in 0..self.buckets.len() {
            next = (next + 1) & mask;
            let e = self.buckets.get(next).copied().unwrap_or(EMPTY);
            if e == EMPTY {
                break;
            }
            let home = (e >> 32) as usize & mask;
            if (next.wrapping_sub(home) & mask) >= (next.wrapping_sub(hole) & mask) {
                if let Some(h) = self.buckets.get_mut(hole) {
                    *h = e;
                }
                hole = next;
            }
        }
        if let Some(h) = self.buckets.get_mut(hole) {
            *h = EMPTY;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);

    fn t(proto: u8, src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Tuple {
        Tuple {
            proto,
            src: src.into(),
            sport,
            dst: dst.into(),
            dport,
        }
    }

    #[test]
    fn create_and_find_both_ways() {
        let mut ct = Conntrack::new(UP, 8);
        let c = t(PROTO_UDP, [10, 137, 0, 10], 40000, [10, 139, 1, 1], 53);
        let f = ct.create(c, Ipv4Addr::new(10, 0, 2, 3), 53, 0).unwrap();
        assert_eq!(f.nat_port, 40000, "client port kept when free");
        assert!(ct.by_client(&c, 1).is_some());
        let reply = t(PROTO_UDP, [10, 0, 2, 3], 53, [10, 0, 2, 15], 40000);
        let flow = ct.by_reply(&reply, 1).unwrap();
        assert_eq!(flow.client.dst, Ipv4Addr::new(10, 139, 1, 1));
        flow.touch(1, false, 0);
        assert_eq!(flow.state, FlowState::Established);
    }

    #[test]
    fn colliding_ports_are_reallocated() {
        let mut ct = Conntrack::new(UP, 8);
        let a = t(PROTO_TCP, [10, 137, 0, 10], 5000, [1, 1, 1, 1], 80);
        let b = t(PROTO_TCP, [10, 137, 0, 11], 5000, [1, 1, 1, 1], 80);
        let fa = ct.create(a, a.dst, 80, 0).unwrap();
        let fb = ct.create(b, b.dst, 80, 0).unwrap();
        assert_eq!(fa.nat_port, 5000);
        assert_ne!(fb.nat_port, 5000);
        assert_eq!(ct.by_reply(&fb.reply_tuple(UP), 0).unwrap().client, b);
        // Low source ports are never kept.
        let c = t(PROTO_TCP, [10, 137, 0, 11], 80, [1, 1, 1, 1], 80);
        assert!(ct.create(c, c.dst, 80, 0).unwrap().nat_port >= NAT_PORT_FIRST);
    }

    #[test]
    fn a_flood_evicts_unanswered_flows_never_answered_ones() {
        let mut ct = Conntrack::new(UP, 4);
        let tuple = |p: u16| t(PROTO_TCP, [10, 137, 0, 10], p, [1, 1, 1, 1], 443);
        // Two answered flows, two half-open ones.
        for p in [2000, 2001] {
            ct.create(tuple(p), Ipv4Addr::new(1, 1, 1, 1), 443, 0)
                .unwrap();
            ct.by_client(&tuple(p), 0)
                .unwrap()
                .touch(0, false, TCP_SYN | TCP_ACK);
        }
        for p in [3000, 3001] {
            ct.create(tuple(p), Ipv4Addr::new(1, 1, 1, 1), 443, 0)
                .unwrap();
        }
        // A flood: each new flow displaces the oldest unanswered one.
        for p in 4000..4100 {
            ct.create(tuple(p), Ipv4Addr::new(1, 1, 1, 1), 443, 1)
                .unwrap();
        }
        assert_eq!(ct.len(), 4);
        assert!(ct.by_client(&tuple(2000), 1).is_some() && ct.by_client(&tuple(2001), 1).is_some());
        assert!(ct.by_client(&tuple(3000), 1).is_none());
        assert!(ct.by_client(&tuple(4099), 1).is_some());
        assert_eq!(ct.evictions(), 100);
        // A table of answered flows only: new flows are refused.
        let mut ct = Conntrack::new(UP, 2);
        for p in [2000, 2001] {
            ct.create(tuple(p), Ipv4Addr::new(1, 1, 1, 1), 443, 0)
                .unwrap();
            ct.by_client(&tuple(p), 0)
                .unwrap()
                .touch(0, false, TCP_SYN | TCP_ACK);
        }
        assert_eq!(
            ct.create(tuple(5000), Ipv4Addr::new(1, 1, 1, 1), 443, 1),
            Err(CreateError::TableFull)
        );
    }

    #[test]
    fn memory_is_fixed_under_churn() {
        let mut ct = Conntrack::new(UP, 256);
        let before = ct.memory_bytes();
        for n in 0..200_000u32 {
            let c = t(
                PROTO_UDP,
                [10, 137, 0, 10],
                1024 + (n % 60_000) as u16,
                [1, 1, (n >> 8) as u8, n as u8],
                53,
            );
            ct.create(c, c.dst, 53, u64::from(n)).unwrap();
        }
        assert_eq!(ct.len(), 256);
        assert_eq!(ct.memory_bytes(), before);
    }

    #[test]
    fn full_table_refuses_new_flows_until_old_ones_expire() {
        let mut ct = Conntrack::new(UP, 2);
        for p in 0..2 {
            let c = t(PROTO_UDP, [10, 137, 0, 10], 2000 + p, [1, 1, 1, 1], 53);
            ct.create(c, c.dst, 53, 0).unwrap();
            ct.by_client(&c, 0).unwrap().touch(0, false, 0); // answered
        }
        let c = t(PROTO_UDP, [10, 137, 0, 10], 3000, [1, 1, 1, 1], 53);
        assert_eq!(ct.create(c, c.dst, 53, 1000), Err(CreateError::TableFull));
        assert!(
            ct.create(c, c.dst, 53, UDP_REPLIED + 1).is_ok(),
            "expired flows make room"
        );
        assert_eq!(ct.len(), 1);
        assert_eq!(ct.evictions(), 0);
    }

    /// New flows that time out unanswered, one a second: each new flow
    /// frees the one that expired before it, so the table holds the live
    /// flows (a minute's worth), not every flow since the last sweep; an
    /// answered flow among them stays, and nothing counts as evicted.
    #[test]
    fn expired_unanswered_flows_are_reclaimed_in_creation_order() {
        let mut ct = Conntrack::new(UP, 1024);
        let answered = t(PROTO_TCP, [10, 137, 0, 10], 999, [1, 1, 1, 1], 443);
        ct.create(answered, answered.dst, 443, 0).unwrap();
        ct.by_client(&answered, 0).unwrap().touch(0, false, TCP_ACK);
        for n in 1..=600u16 {
            let c = t(PROTO_TCP, [10, 137, 0, 10], 1000 + n, [1, 1, 1, 1], 80);
            ct.create(c, c.dst, 80, u64::from(n) * SECOND).unwrap();
        }
        let live = (TCP_HANDSHAKE / SECOND) as usize;
        assert!(ct.len() <= live + 2, "{} flows held, {live} live", ct.len());
        assert!(ct.by_client(&answered, 600 * SECOND).is_some());
        let last = t(PROTO_TCP, [10, 137, 0, 10], 1600, [1, 1, 1, 1], 80);
        assert!(ct.by_client(&last, 600 * SECOND).is_some());
        assert_eq!(ct.evictions(), 0);
    }

    #[test]
    fn ipv6_flows() {
        let up: Ipv6Addr = "2001:db8:1::15".parse().unwrap();
        let mut ct = Conntrack::new(up, 4);
        let c = Tuple {
            proto: PROTO_TCP,
            src: "fd09::a".parse().unwrap(),
            sport: 5000,
            dst: "2001:db8:80::5".parse().unwrap(),
            dport: 443,
        };
        let f = ct.create(c, c.dst, 443, 0).unwrap();
        let reply = f.reply_tuple(up);
        assert_eq!((reply.dst, reply.dport), (up, 5000));
        assert_eq!(ct.by_reply(&reply, 1).unwrap().client, c);
    }

    /// The slot index against a model, with colliding hashes (long runs
    /// that wrap around the end) and churn: every filed slot is found,
    /// nothing else, and no probe ever meets a leftover of a removal.
    #[test]
    fn slot_index_matches_a_model_under_churn() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut rnd = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let mut idx = SlotIndex::new(64);
        let n = idx.buckets.len() as u64;
        let mut model: std::collections::HashMap<u32, u32> = Default::default();
        for step in 0..60_000 {
            // Few hashes (long collision chains, some homed in the last
            // buckets so that runs wrap), then many; the bits above the
            // mask vary and must not matter.
            let hashes = match step {
                0..20_000 => 16,
                20_000..40_000 => n - 4 + rnd(8),
                _ => 1 << 16,
            };
            let slot = rnd(64) as u32;
            match model.remove(&slot) {
                Some(h) => idx.remove(h, slot),
                None => {
                    let h = ((rnd(1 << 12) << 20) | rnd(hashes)) as u32;
                    idx.insert(h, slot);
                    model.insert(slot, h);
                }
            }
            for (s, h) in &model {
                assert_eq!(idx.find(*h, |c| c == *s), Some(*s));
            }
            let filed = idx.buckets.iter().filter(|&&e| e != EMPTY).count();
            assert_eq!(filed, model.len(), "one bucket per filed slot");
            let absent = 64 + rnd(64) as u32;
            assert_eq!(idx.find(rnd(hashes) as u32, |c| c == absent), None);
        }
    }

    #[test]
    fn tcp_states_and_timeouts() {
        let mut ct = Conntrack::new(UP, 4);
        let c = t(PROTO_TCP, [10, 137, 0, 10], 4000, [1, 1, 1, 1], 443);
        ct.create(c, c.dst, 443, 0).unwrap();
        assert!(
            ct.by_client(&c, TCP_HANDSHAKE + 1).is_none(),
            "half-open flow expires"
        );
        ct.create(c, c.dst, 443, 0).unwrap();
        let f = ct.by_client(&c, 1).unwrap();
        f.touch(1, false, TCP_SYN | TCP_ACK);
        assert_eq!(f.state, FlowState::Established);
        f.touch(2, true, TCP_FIN | TCP_ACK);
        assert_eq!(f.state, FlowState::Closing);
        assert!(ct.by_client(&c, 2 + TCP_CLOSING + 1).is_none());
        assert!(ct.is_empty());
    }
}
