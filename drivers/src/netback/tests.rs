//! The netback driver against a client played by the test: ring pages in
//! heap memory, the client's granted pages in a table the fake hypervisor
//! copies from and to.

use alloc::collections::BTreeMap;
use alloc::rc::Rc;
use core::cell::RefCell;

use super::*;
use crate::pool::tests::region;
use crate::pool::BUF_SIZE;

/// The client's granted pages, and what the fake hypervisor saw.
#[derive(Default)]
struct Client {
    pages: BTreeMap<u32, Vec<u8>>,
    notifications: u32,
    copy_calls: u32,
}

struct FakeXen(Rc<RefCell<Client>>);

impl BackIo for FakeXen {
    fn copy(&mut self, ops: &mut [GrantCopy]) {
        let mut c = self.0.borrow_mut();
        c.copy_calls += 1;
        for op in ops {
            let (off, len) = (usize::from(op.offset), usize::from(op.len));
            let Some(page) = c.pages.get_mut(&op.gref) else {
                op.ok = false;
                continue;
            };
            if off + len > PAGE {
                op.ok = false;
                continue;
            }
            // SAFETY: test memory: `paddr` is the host address of a pool
            // slot's frame room (physical = virtual in tests), `len` at most
            // a frame.
            let ours = unsafe { core::slice::from_raw_parts_mut(op.paddr as *mut u8, len) };
            match op.dir {
                Direction::FromClient => ours.copy_from_slice(&page[off..off + len]),
                Direction::ToClient => page[off..off + len].copy_from_slice(ours),
            }
            op.ok = true;
        }
    }

    fn notify(&mut self) {
        self.0.borrow_mut().notifications += 1;
    }
}

struct Rig {
    _mem: Vec<Vec<u64>>,
    rings: *mut u8,
    client: Rc<RefCell<Client>>,
    nb: Netback<FakeXen>,
    pool: PacketPool,
    /// The client's private producer indices.
    tx_prod: u32,
    rx_prod: u32,
}

fn rd32(p: *mut u8, off: usize) -> u32 {
    // SAFETY: test memory, an index word of a ring page.
    unsafe { (p.add(off) as *const u32).read_volatile() }
}

fn wr32(p: *mut u8, off: usize, v: u32) {
    // SAFETY: as above.
    unsafe { (p.add(off) as *mut u32).write_volatile(v) }
}

fn rig() -> Rig {
    let (m1, rings) = region(RINGS_BYTES);
    let (m2, p) = region(64 * BUF_SIZE);
    let ptr = rings.ptr().as_ptr();
    // SHARED_RING_INIT by the client: producers 0, events 1.
    for ring in [TX_RING, RX_RING] {
        wr32(ptr, ring + REQ_EVENT, 1);
        wr32(ptr, ring + RSP_EVENT, 1);
    }
    let client = Rc::new(RefCell::new(Client::default()));
    let nb = Netback::new(
        FakeXen(client.clone()),
        rings,
        [0xfe, 0xff, 0xff, 0xff, 0xff, 0xff],
    )
    .expect("two pages");
    Rig {
        _mem: alloc::vec![m1, m2],
        rings: ptr,
        client,
        nb,
        pool: PacketPool::new(p),
        tx_prod: 0,
        rx_prod: 0,
    }
}

impl Rig {
    /// The client grants a page holding `frame` at `offset` and asks for
    /// it to be sent (not yet published).
    fn client_sends(
        &mut self,
        gref: u32,
        offset: u16,
        frame: &[u8],
        edit: impl Fn(&mut TxRequest),
    ) {
        let mut page = alloc::vec![0u8; PAGE];
        let start = usize::from(offset).min(PAGE);
        let end = (start + frame.len()).min(PAGE);
        page[start..end].copy_from_slice(&frame[..end - start]);
        self.client.borrow_mut().pages.insert(gref, page);
        let mut req = TxRequest {
            gref,
            offset,
            flags: 0,
            id: gref as u16,
            size: frame.len() as u16,
        };
        edit(&mut req);
        let off = slot_offset(self.tx_prod, TX_RING_SIZE, TX_ENTRY);
        for (i, b) in req.encode().iter().enumerate() {
            // SAFETY: test memory, a TX ring slot.
            unsafe { self.rings.add(TX_RING + off + i).write_volatile(*b) };
        }
        self.tx_prod += 1;
    }

    fn publish_tx(&self) {
        wr32(self.rings, TX_RING + REQ_PROD, self.tx_prod);
    }

    /// The client posts an empty page for a frame to come.
    fn client_posts(&mut self, gref: u32) {
        self.client
            .borrow_mut()
            .pages
            .insert(gref, alloc::vec![0u8; PAGE]);
        let req = RxRequest {
            id: gref as u16 + 1000,
            gref,
        };
        let off = slot_offset(self.rx_prod, RX_RING_SIZE, RX_ENTRY);
        for (i, b) in req.encode().iter().enumerate() {
            // SAFETY: test memory, an RX ring slot.
            unsafe { self.rings.add(RX_RING + off + i).write_volatile(*b) };
        }
        self.rx_prod += 1;
        wr32(self.rings, RX_RING + REQ_PROD, self.rx_prod);
    }

    fn tx_responses(&self) -> Vec<TxResponse> {
        let n = rd32(self.rings, TX_RING + RSP_PROD);
        (0..n)
            .map(|i| {
                let off = TX_RING + slot_offset(i, TX_RING_SIZE, TX_ENTRY);
                let mut b = [0u8; 4];
                for (k, x) in b.iter_mut().enumerate() {
                    // SAFETY: test memory, a TX ring slot.
                    *x = unsafe { self.rings.add(off + k).read_volatile() };
                }
                TxResponse::decode(&b)
            })
            .collect()
    }

    fn rx_responses(&self) -> Vec<RxResponse> {
        let n = rd32(self.rings, RX_RING + RSP_PROD);
        (0..n)
            .map(|i| {
                let off = RX_RING + slot_offset(i, RX_RING_SIZE, RX_ENTRY);
                let mut b = [0u8; RX_ENTRY];
                for (k, x) in b.iter_mut().enumerate() {
                    // SAFETY: test memory, an RX ring slot.
                    *x = unsafe { self.rings.add(off + k).read_volatile() };
                }
                RxResponse::decode(&b)
            })
            .collect()
    }

    fn packet(&mut self, f: &[u8]) -> Packet {
        let mut buf = self.pool.alloc().unwrap();
        self.pool.frame_room(&mut buf)[..f.len()].copy_from_slice(f);
        Packet { buf, len: f.len() }
    }
}

fn frame(tag: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| tag.wrapping_add(i as u8)).collect()
}

#[test]
fn receives_what_the_client_sends_by_copy_and_answers_each_request() {
    let mut r = rig();
    let capacity = r.pool.available();
    r.client_sends(7, 0, &frame(1, 60), |_| {});
    r.client_sends(8, 100, &frame(2, 1514), |_| {});
    r.client_sends(9, 4036, &frame(3, 60), |_| {});
    r.publish_tx();
    let mut got = Vec::new();
    r.nb.rx_batch(&mut r.pool, &mut got, 64);
    assert_eq!(got.len(), 3);
    for (p, (tag, len)) in got.iter_mut().zip([(1, 60), (2, 1514), (3, 60)]) {
        assert_eq!(r.pool.frame(p), &frame(tag, len)[..]);
    }
    let rsp = r.tx_responses();
    assert_eq!(
        rsp,
        [7, 8, 9].map(|id| TxResponse {
            id,
            status: NETIF_RSP_OKAY
        })
    );
    let c = r.client.borrow();
    assert_eq!(c.copy_calls, 1, "one copy hypercall for the batch");
    assert_eq!(c.notifications, 1, "the client's rsp_event (1) was passed");
    drop(c);
    assert_eq!(r.nb.stats().rx_packets, 3);
    for p in got {
        r.pool.free(p.buf);
    }
    assert_eq!(r.pool.available(), capacity);
    // Nothing new: nothing read, nothing answered.
    let mut none = Vec::new();
    r.nb.rx_batch(&mut r.pool, &mut none, 64);
    assert!(none.is_empty());
    assert_eq!(r.tx_responses().len(), 3);
}

/// With the buffers short (other ports hold them), frames wait in the
/// client's ring, unanswered, and arrive once buffers are back: none is
/// refused for want of a buffer.
#[test]
fn frames_wait_in_the_ring_while_buffers_are_short() {
    let mut r = rig();
    let mut held = Vec::new();
    while r.pool.available() > 2 {
        held.push(r.pool.alloc().unwrap());
    }
    for gref in 1..=5 {
        r.client_sends(gref, 0, &frame(gref as u8, 60), |_| {});
    }
    r.publish_tx();
    let mut got = Vec::new();
    r.nb.rx_batch(&mut r.pool, &mut got, 64);
    assert_eq!(got.len(), 2, "as many frames as free buffers");
    assert_eq!(r.tx_responses().len(), 2, "the others are not answered yet");
    let mut none = Vec::new();
    r.nb.rx_batch(&mut r.pool, &mut none, 64);
    assert!(none.is_empty(), "no buffer, nothing taken");
    for b in held.drain(..) {
        r.pool.free(b);
    }
    r.nb.rx_batch(&mut r.pool, &mut got, 64);
    assert_eq!(got.len(), 5);
    for (p, tag) in got.iter_mut().zip(1u8..) {
        assert_eq!(r.pool.frame(p), &frame(tag, 60)[..]);
    }
    let rsp = r.tx_responses();
    assert_eq!(rsp.len(), 5);
    assert!(rsp.iter().all(|x| x.status == NETIF_RSP_OKAY));
    assert_eq!(r.nb.stats().rx_errors, 0);
}

/// Requests a backend without scatter-gather or GSO must refuse, and a
/// grant the hypervisor will not copy: each answered with an error and
/// counted, no buffer kept; the good request among them still arrives.
#[test]
fn hostile_requests_are_answered_with_errors_and_counted() {
    let mut r = rig();
    let capacity = r.pool.available();
    r.client_sends(1, 0, &frame(1, 10), |_| {});
    r.client_sends(2, 4090, &frame(2, 60), |_| {});
    // A chain (3 continues in 4) whose second piece asks for extra info.
    r.client_sends(3, 0, &frame(3, 60), |q| q.flags = NETTXF_MORE_DATA);
    r.client_sends(4, 0, &frame(4, 60), |q| q.flags = NETTXF_EXTRA_INFO);
    r.client_sends(5, 0, &frame(5, 60), |q| q.size = 2000);
    r.client_sends(6, 0, &frame(6, 60), |q| q.gref = 4242);
    r.client_sends(7, 0, &frame(7, 64), |_| {});
    r.publish_tx();
    let mut got = Vec::new();
    r.nb.rx_batch(&mut r.pool, &mut got, 64);
    assert_eq!(got.len(), 1);
    assert_eq!(r.pool.frame(&mut got[0]), &frame(7, 64)[..]);
    let statuses: Vec<(u16, i16)> = r.tx_responses().iter().map(|t| (t.id, t.status)).collect();
    assert_eq!(
        statuses,
        [
            (1, NETIF_RSP_ERROR),
            (2, NETIF_RSP_ERROR),
            (3, NETIF_RSP_ERROR),
            (4, NETIF_RSP_ERROR),
            (5, NETIF_RSP_ERROR),
            (6, NETIF_RSP_ERROR),
            (7, NETIF_RSP_OKAY)
        ]
    );
    assert_eq!(r.nb.stats().rx_errors, 5, "five frames refused");
    assert!(!r.nb.is_dead());
    r.pool.free(got.pop().unwrap().buf);
    assert_eq!(
        r.pool.available(),
        capacity,
        "no buffer kept for a refused request"
    );
}

#[test]
fn a_runaway_request_index_kills_the_connection() {
    let mut r = rig();
    r.client_sends(1, 0, &frame(1, 60), |_| {});
    wr32(r.rings, TX_RING + REQ_PROD, 1000);
    let mut got = Vec::new();
    r.nb.rx_batch(&mut r.pool, &mut got, 64);
    assert!(got.is_empty() && r.nb.is_dead());
    assert_eq!(r.nb.stats().ring_errors, 1);
    assert!(r.tx_responses().is_empty(), "nothing answered");
    // Frames for a dead client are dropped and counted, buffers kept.
    let capacity = r.pool.available();
    let p = r.packet(&frame(9, 60));
    let mut batch = alloc::vec![p];
    r.nb.tx_batch(&mut r.pool, &mut batch);
    assert!(batch.is_empty());
    assert_eq!(r.nb.stats().tx_errors, 1);
    assert_eq!(r.pool.available(), capacity);
    // The same for the receive ring's index.
    let mut r = rig();
    wr32(r.rings, RX_RING + REQ_PROD, u32::MAX - 5);
    let p = r.packet(&frame(9, 60));
    let mut batch = alloc::vec![p];
    r.nb.tx_batch(&mut r.pool, &mut batch);
    assert!(r.nb.is_dead());
}

/// Frames for the client go into the pages it posted, one each, with one
/// copy hypercall; without a posted page a frame waits in the batch.
#[test]
fn transmits_into_the_pages_the_client_posted() {
    let mut r = rig();
    let capacity = r.pool.available();
    r.client_posts(20);
    r.client_posts(21);
    let mut batch: Vec<Packet> = [(1, 60), (2, 1514), (3, 80)]
        .iter()
        .map(|&(t, n)| r.packet(&frame(t, n)))
        .collect();
    r.nb.tx_batch(&mut r.pool, &mut batch);
    assert_eq!(batch.len(), 1, "the third waits for a page");
    assert_eq!(r.nb.stats().tx_ring_full, 1);
    let rsp = r.rx_responses();
    assert_eq!(
        rsp.iter()
            .map(|x| (x.id, x.offset, x.status))
            .collect::<Vec<_>>(),
        [(1020, 0, 60), (1021, 0, 1514)]
    );
    {
        let c = r.client.borrow();
        assert_eq!(&c.pages[&20][..60], &frame(1, 60)[..]);
        assert_eq!(&c.pages[&21][..1514], &frame(2, 1514)[..]);
        assert_eq!(c.notifications, 1);
    }
    r.client_posts(22);
    r.nb.tx_batch(&mut r.pool, &mut batch);
    assert!(batch.is_empty());
    assert_eq!(&r.client.borrow().pages[&22][..80], &frame(3, 80)[..]);
    assert_eq!(r.nb.stats().tx_packets, 3);
    assert_eq!(
        r.pool.available(),
        capacity,
        "every buffer back after its copy"
    );
    // A posted page the hypervisor refuses: an error response, counted.
    r.client_posts(23);
    r.client.borrow_mut().pages.remove(&23);
    let mut batch = alloc::vec![r.packet(&frame(4, 60))];
    r.nb.tx_batch(&mut r.pool, &mut batch);
    assert_eq!(
        r.rx_responses().last().map(|x| x.status),
        Some(NETIF_RSP_ERROR)
    );
    assert_eq!(r.nb.stats().tx_errors, 1);
    assert_eq!(r.pool.available(), capacity);
}

#[test]
fn notifies_only_when_the_client_asked() {
    let mut r = rig();
    // The client asks to hear of the response after the fifth only.
    wr32(r.rings, TX_RING + RSP_EVENT, 5);
    for g in 1..=3 {
        r.client_sends(g, 0, &frame(g as u8, 60), |_| {});
    }
    r.publish_tx();
    let mut got = Vec::new();
    r.nb.rx_batch(&mut r.pool, &mut got, 64);
    assert_eq!(r.client.borrow().notifications, 0);
    for g in 4..=6 {
        r.client_sends(g, 0, &frame(g as u8, 60), |_| {});
    }
    r.publish_tx();
    r.nb.rx_batch(&mut r.pool, &mut got, 64);
    assert_eq!(r.client.borrow().notifications, 1);
    assert_eq!(got.len(), 6);
    // Arming: nothing waiting, and the client is asked to notify the next
    // request; then one waiting.
    assert!(!r.nb.arm());
    assert_eq!(rd32(r.rings, TX_RING + REQ_EVENT), 7);
    r.client_sends(7, 0, &frame(7, 60), |_| {});
    r.publish_tx();
    assert!(r.nb.arm());
}

/// Random request entries and indices from a hostile client: never a
/// panic, every buffer accounted for.
#[test]
fn random_requests_never_break_the_backend() {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..200 {
        let mut r = rig();
        let capacity = r.pool.available();
        let mut held = Vec::new();
        for _ in 0..20 {
            let n = next() % 8;
            for _ in 0..n {
                let v = next();
                r.client_sends((v % 6) as u32, (v >> 8) as u16 % 4200, &frame(1, 60), |q| {
                    q.size = (v >> 24) as u16 % 1700;
                    q.flags = (v >> 40) as u16 & 0xf;
                });
            }
            if next() % 10 == 0 {
                wr32(r.rings, TX_RING + REQ_PROD, next() as u32);
            } else {
                r.publish_tx();
            }
            r.nb.rx_batch(&mut r.pool, &mut held, 64);
            if next() % 3 == 0 {
                r.client_posts((next() % 6) as u32);
            }
            let mut batch: Vec<Packet> = core::mem::take(&mut held);
            r.nb.tx_batch(&mut r.pool, &mut batch);
            held.extend(batch);
        }
        for p in held {
            r.pool.free(p.buf);
        }
        assert_eq!(r.pool.available(), capacity);
    }
}

/// An Ethernet frame with IPv4 (or IPv6) and a TCP or UDP segment of
/// `payload`, its transport checksum field holding `junk`.
fn l4_frame(v6: bool, proto: u8, payload: &[u8], junk: u16) -> Vec<u8> {
    let hdr = if proto == 6 { 20 } else { 8 };
    let l4_len = hdr + payload.len();
    let mut f = alloc::vec![0u8; 12];
    if v6 {
        f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
        f.extend_from_slice(&(l4_len as u16).to_be_bytes());
        f.extend_from_slice(&[proto, 64]);
        f.extend((0..32).map(|i| 0x20 + i as u8));
    } else {
        f.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
        f.extend_from_slice(&((20 + l4_len) as u16).to_be_bytes());
        f.extend_from_slice(&[
            0, 1, 0x40, 0, 64, proto, 0, 0, 10, 137, 0, 10, 192, 0, 2, 80,
        ]);
    }
    let mut seg = alloc::vec![0u8; hdr];
    seg[0..4].copy_from_slice(&[0x9c, 0x40, 0x14, 0x51]);
    if proto == 6 {
        seg[12] = 5 << 4;
        seg[13] = 0x18;
    } else {
        seg[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
    }
    let field = if proto == 6 { 16 } else { 6 };
    seg[field..field + 2].copy_from_slice(&junk.to_be_bytes());
    f.extend_from_slice(&seg);
    f.extend_from_slice(payload);
    f
}

/// Whether the frame's transport checksum verifies (pseudo-header and
/// segment sum to all ones).
fn verifies(f: &[u8]) -> bool {
    let v6 = f[12] == 0x86;
    let (l4, proto, addrs) = if v6 {
        (54, f[20], &f[22..54])
    } else {
        (34, f[23], &f[26..34])
    };
    let seg = &f[l4..];
    let mut sum: u64 = u64::from(proto) + seg.len() as u64;
    for c in addrs.chunks(2).chain(seg.chunks(2)) {
        sum += u64::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum == 0xffff
}

#[test]
fn blank_checksums_are_completed_whatever_the_field_held() {
    for v6 in [false, true] {
        for proto in [6u8, 17] {
            for payload in [&b""[..], b"odd", b"hello, firewall", &[0xff; 1400][..]] {
                for junk in [0u16, 0x1234, 0xffff] {
                    let mut f = l4_frame(v6, proto, payload, junk);
                    assert!(complete_checksum(&mut f), "v6={v6} proto={proto}");
                    assert!(verifies(&f), "v6={v6} proto={proto} len={}", payload.len());
                }
            }
        }
    }
    // Nothing else is touched: ICMP, ARP, fragments, runts, lengths
    // beyond the frame.
    let mut icmp = l4_frame(false, 6, b"x", 7);
    icmp[23] = 1;
    let mut frag = l4_frame(false, 17, b"x", 7);
    frag[20] = 0x20;
    let mut long = l4_frame(false, 17, b"x", 7);
    long[16] = 0x40;
    let mut arp = l4_frame(false, 17, b"x", 7);
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    for (what, mut f) in [
        ("icmp", icmp),
        ("fragment", frag),
        ("long", long),
        ("arp", arp),
    ] {
        let before = f.clone();
        assert!(!complete_checksum(&mut f), "{what}");
        assert_eq!(f, before, "{what}");
    }
    let whole = l4_frame(true, 6, b"abc", 0);
    for n in 0..whole.len() {
        let mut cut = whole[..n].to_vec();
        assert!(!complete_checksum(&mut cut), "cut at {n}");
    }
}

#[test]
fn a_frame_sent_with_its_checksum_blank_arrives_complete() {
    let mut r = rig();
    let blank = l4_frame(false, 17, b"from a linux client", 0xabcd);
    r.client_sends(7, 0, &blank, |q| {
        q.flags = NETTXF_CSUM_BLANK | NETTXF_DATA_VALIDATED
    });
    // Without the flag the frame is taken as it is.
    r.client_sends(8, 0, &blank, |_| {});
    r.publish_tx();
    let mut got = Vec::new();
    r.nb.rx_batch(&mut r.pool, &mut got, 64);
    assert_eq!(got.len(), 2);
    let first = r.pool.frame(&mut got[0]).to_vec();
    assert!(verifies(&first));
    assert_eq!(first[..40], blank[..40], "only the checksum changed");
    assert_eq!(r.pool.frame(&mut got[1]), &blank[..]);
    for p in got {
        r.pool.free(p.buf);
    }
}

/// A frame over several requests (`NETTXF_more_data`): the first names
/// the whole length, each later one its own piece; the pieces are copied
/// one after another into one buffer and every request is answered.
#[test]
fn frames_spanning_several_requests_arrive_whole() {
    let mut r = rig();
    let whole = frame(9, 1514);
    // 1000 bytes at the end of one page, 514 at the start of another.
    r.client_sends(1, 4096 - 1000, &whole[..1000], |q| {
        q.flags = NETTXF_MORE_DATA | NETTXF_CSUM_BLANK;
        q.size = 1514;
    });
    r.client_sends(2, 0, &whole[1000..], |_| {});
    // Three pieces, the middle one empty.
    r.client_sends(3, 10, &whole[..60], |q| {
        q.flags = NETTXF_MORE_DATA;
        q.size = 100;
    });
    r.client_sends(4, 0, &[], |q| q.flags = NETTXF_MORE_DATA);
    r.client_sends(5, 0, &whole[60..100], |_| {});
    // A chain whose later pieces are longer than the frame: refused.
    r.client_sends(6, 0, &whole[..60], |q| {
        q.flags = NETTXF_MORE_DATA;
        q.size = 60;
    });
    r.client_sends(7, 0, &whole[..100], |_| {});
    // A chain whose first piece would cross its page: refused.
    r.client_sends(8, 4000, &whole[..60], |q| {
        q.flags = NETTXF_MORE_DATA;
        q.size = 200;
    });
    r.client_sends(9, 0, &whole[..60], |_| {});
    r.publish_tx();
    let mut got = Vec::new();
    r.nb.rx_batch(&mut r.pool, &mut got, 64);
    assert_eq!(got.len(), 2);
    assert_eq!(r.pool.frame(&mut got[0]), &whole[..]);
    assert_eq!(r.pool.frame(&mut got[1]), &whole[..100]);
    let statuses: Vec<(u16, i16)> = r.tx_responses().iter().map(|t| (t.id, t.status)).collect();
    let ok = NETIF_RSP_OKAY;
    let err = NETIF_RSP_ERROR;
    assert_eq!(
        statuses,
        [
            (1, ok),
            (2, ok),
            (3, ok),
            (4, ok),
            (5, ok),
            (6, err),
            (7, err),
            (8, err),
            (9, err)
        ]
    );
    assert_eq!(r.nb.stats().rx_errors, 2);
    for p in got {
        r.pool.free(p.buf);
    }
}

/// A chain not yet wholly published waits (nothing consumed, nothing
/// answered); one longer than Linux's limit kills the connection.
#[test]
fn unfinished_chains_wait_and_endless_ones_are_fatal() {
    let mut r = rig();
    let whole = frame(5, 120);
    r.client_sends(1, 0, &whole[..60], |q| {
        q.flags = NETTXF_MORE_DATA;
        q.size = 120;
    });
    r.publish_tx();
    let mut got = Vec::new();
    r.nb.rx_batch(&mut r.pool, &mut got, 64);
    assert!(got.is_empty());
    assert!(r.tx_responses().is_empty());
    r.client_sends(2, 0, &whole[60..], |_| {});
    r.publish_tx();
    r.nb.rx_batch(&mut r.pool, &mut got, 64);
    assert_eq!(got.len(), 1);
    assert_eq!(r.pool.frame(&mut got[0]), &whole[..]);
    r.pool.free(got.pop().unwrap().buf);
    for id in 10..(10 + MAX_SLOTS as u32 + 1) {
        r.client_sends(id, 0, &whole[..60], |q| q.flags = NETTXF_MORE_DATA);
    }
    r.publish_tx();
    r.nb.rx_batch(&mut r.pool, &mut got, 64);
    assert!(got.is_empty());
    assert!(r.nb.is_dead(), "a chain of more than {MAX_SLOTS} requests");
}
