//! The frontend against a backend played by the test: it reads requests
//! from the shared rings, resolves grant references through the fake grant
//! table, copies frames, and writes responses — including hostile ones.

use alloc::collections::BTreeMap;
use alloc::rc::Rc;
use core::cell::RefCell;

use super::*;
use crate::pool::tests::region;
use crate::pool::BUF_SIZE;

#[derive(Default)]
struct Grants {
    /// gref → (page address, read-only).
    live: BTreeMap<u32, (u64, bool)>,
    next: u32,
    /// Grefs the backend has mapped (ending them fails).
    busy: Vec<u32>,
    notifications: u32,
    /// Grants left, or unlimited.
    limit: Option<usize>,
}

#[derive(Clone, Default)]
struct FakeXen(Rc<RefCell<Grants>>);

impl XenIo for FakeXen {
    fn grant(&mut self, paddr: u64, readonly: bool) -> Option<u32> {
        let mut g = self.0.borrow_mut();
        assert_eq!(paddr % PAGE as u64, 0, "grants are of whole pages");
        if let Some(l) = g.limit.as_mut() {
            if *l == 0 {
                return None;
            }
            *l -= 1;
        }
        let r = 8 + g.next;
        g.next += 1;
        g.live.insert(r, (paddr, readonly));
        Some(r)
    }
    fn end_grant(&mut self, gref: u32) -> bool {
        let mut g = self.0.borrow_mut();
        if g.busy.contains(&gref) {
            return false;
        }
        g.live.remove(&gref).is_some()
    }
    fn notify(&mut self) {
        self.0.borrow_mut().notifications += 1;
    }
}

/// The backend's side of both rings.
struct Backend {
    xen: FakeXen,
    tx: *mut u8,
    rx: *mut u8,
    tx_req_cons: u32,
    tx_rsp_prod: u32,
    rx_req_cons: u32,
    rx_rsp_prod: u32,
}

fn rd32(p: *mut u8, off: usize) -> u32 {
    // SAFETY: test memory inside a ring page.
    unsafe { (p.add(off) as *const u32).read_volatile() }
}
fn wr32(p: *mut u8, off: usize, v: u32) {
    // SAFETY: as above.
    unsafe { (p.add(off) as *mut u32).write_volatile(v) }
}
fn bytes(p: u64, len: usize) -> &'static mut [u8] {
    // SAFETY: test memory: a granted page of the region the test keeps.
    unsafe { core::slice::from_raw_parts_mut(p as *mut u8, len) }
}

impl Backend {
    fn connect(xen: &FakeXen, refs: (u32, u32)) -> Self {
        let page = |r: u32| {
            let (p, ro) = xen.0.borrow().live[&r];
            assert!(!ro, "rings are granted writable");
            p as *mut u8
        };
        Self {
            xen: xen.clone(),
            tx: page(refs.0),
            rx: page(refs.1),
            tx_req_cons: 0,
            tx_rsp_prod: 0,
            rx_req_cons: 0,
            rx_rsp_prod: 0,
        }
    }
    fn page(&self, gref: u32, write: bool) -> u64 {
        let (p, ro) = *self.xen.0.borrow().live.get(&gref).expect("a live grant");
        assert!(!(write && ro), "writing a read-only grant");
        p
    }
    fn set_req_event(&self, tx: bool, v: u32) {
        wr32(if tx { self.tx } else { self.rx }, REQ_EVENT, v);
    }
    /// Receive requests posted and not yet used.
    fn rx_available(&self) -> u32 {
        rd32(self.rx, REQ_PROD).wrapping_sub(self.rx_req_cons)
    }
    /// Takes one receive request and answers it with `rsp` (its id and
    /// the frame copied in unless given otherwise).
    fn deliver_with(&mut self, frame: &[u8], edit: impl Fn(&mut RxResponse)) {
        assert!(self.rx_available() > 0, "no receive request posted");
        let req = &bytes(
            self.rx as u64 + slot_offset(self.rx_req_cons, RX_RING_SIZE, RX_ENTRY) as u64,
            8,
        );
        let id = u16::from_le_bytes([req[0], req[1]]);
        let gref = u32::from_le_bytes([req[4], req[5], req[6], req[7]]);
        self.rx_req_cons += 1;
        bytes(self.page(gref, true), frame.len()).copy_from_slice(frame);
        let mut rsp = RxResponse {
            id,
            offset: 0,
            flags: 0,
            status: frame.len() as i16,
        };
        edit(&mut rsp);
        let mut b = [0u8; 8];
        b[0..2].copy_from_slice(&rsp.id.to_le_bytes());
        b[2..4].copy_from_slice(&rsp.offset.to_le_bytes());
        b[4..6].copy_from_slice(&rsp.flags.to_le_bytes());
        b[6..8].copy_from_slice(&rsp.status.to_le_bytes());
        let at = self.rx as u64 + slot_offset(self.rx_rsp_prod, RX_RING_SIZE, RX_ENTRY) as u64;
        bytes(at, 8).copy_from_slice(&b);
        self.rx_rsp_prod += 1;
        wr32(self.rx, RSP_PROD, self.rx_rsp_prod);
    }
    fn deliver(&mut self, frame: &[u8]) {
        self.deliver_with(frame, |_| {});
    }
    /// Takes every transmit request: the frames, answered with `status`.
    fn transmit(&mut self, status: i16) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        while rd32(self.tx, REQ_PROD) != self.tx_req_cons {
            let at = self.tx as u64 + slot_offset(self.tx_req_cons, TX_RING_SIZE, TX_ENTRY) as u64;
            let r = bytes(at, TX_ENTRY);
            let gref = u32::from_le_bytes([r[0], r[1], r[2], r[3]]);
            let offset = usize::from(u16::from_le_bytes([r[4], r[5]]));
            let flags = u16::from_le_bytes([r[6], r[7]]);
            let id = u16::from_le_bytes([r[8], r[9]]);
            let size = usize::from(u16::from_le_bytes([r[10], r[11]]));
            assert_eq!(flags, 0, "one slot, full checksums");
            assert!(offset + size <= PAGE, "a request inside its page");
            let (p, ro) = self.xen.0.borrow().live[&gref];
            assert!(ro, "transmit pages are granted read-only");
            frames.push(bytes(p + offset as u64, size).to_vec());
            self.tx_req_cons += 1;
            self.tx_response(id, status);
        }
        wr32(self.tx, RSP_PROD, self.tx_rsp_prod);
        frames
    }
    fn tx_response(&mut self, id: u16, status: i16) {
        let at = self.tx as u64 + slot_offset(self.tx_rsp_prod, TX_RING_SIZE, TX_ENTRY) as u64;
        let b = bytes(at, 4);
        b[0..2].copy_from_slice(&id.to_le_bytes());
        b[2..4].copy_from_slice(&status.to_le_bytes());
        self.tx_rsp_prod += 1;
    }
}

struct Rig {
    _mem: (Vec<u64>, Vec<u64>),
    xen: FakeXen,
    nf: Netfront<FakeXen>,
    pool: PacketPool,
    be: Backend,
}

fn rig() -> Rig {
    let xen = FakeXen::default();
    let (m1, r1) = region(region_bytes());
    let (m2, r2) = region(64 * BUF_SIZE);
    let mac = [2, 0, 0, 0, 0, 9];
    let mut nf = Netfront::new(xen.clone(), r1, mac).unwrap();
    assert_eq!(nf.mac(), mac);
    let be = Backend::connect(&xen, nf.ring_refs());
    nf.post_rx();
    Rig {
        _mem: (m1, m2),
        xen,
        nf,
        pool: PacketPool::new(r2),
        be,
    }
}

fn frame(tag: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| tag.wrapping_add(i as u8)).collect()
}

fn packet(pool: &mut PacketPool, f: &[u8]) -> Packet {
    let mut buf = pool.alloc().unwrap();
    pool.frame_room(&mut buf)[..f.len()].copy_from_slice(f);
    Packet { buf, len: f.len() }
}

#[test]
fn grants_every_page_once_with_the_right_access() {
    let r = rig();
    let g = r.xen.0.borrow();
    let pages = RX_BUFFERS + TX_SLOTS / 2 + 2;
    assert_eq!(g.live.len(), pages);
    let writable = g.live.values().filter(|(_, ro)| !ro).count();
    assert_eq!(writable, 2 + RX_BUFFERS, "rings and receive pages");
    let mut addrs: Vec<u64> = g.live.values().map(|(p, _)| *p).collect();
    addrs.sort_unstable();
    addrs.dedup();
    assert_eq!(addrs.len(), pages, "no page granted twice");
    // All receive requests posted, with one notification (the backend's
    // initial request event is 1).
    assert_eq!(r.be.rx_available(), RX_BUFFERS as u32);
    assert_eq!(r.nf.rx_posted(), RX_BUFFERS);
    assert_eq!(g.notifications, 1);
}

#[test]
fn receives_frames_by_copy_and_posts_the_pages_again() {
    let mut r = rig();
    let frames: Vec<Vec<u8>> = (0..5)
        .map(|i| frame(i, 60 + 300 * usize::from(i)))
        .collect();
    for f in &frames {
        r.be.deliver(f);
    }
    let mut out = Vec::new();
    r.nf.rx_batch(&mut r.pool, &mut out, 3);
    assert_eq!(out.len(), 3, "at most `max`");
    r.nf.rx_batch(&mut r.pool, &mut out, 64);
    assert_eq!(out.len(), 5);
    for (p, f) in out.iter_mut().zip(&frames) {
        assert_eq!(r.pool.frame(p), &f[..]);
    }
    assert_eq!(r.nf.stats().rx_packets, 5);
    // The pages go back to the backend; it asked to be told when it has
    // used up to request 6.
    r.be.set_req_event(false, RX_BUFFERS as u32 + 1);
    let before = r.xen.0.borrow().notifications;
    r.nf.maintain(&mut r.pool);
    assert_eq!(r.be.rx_available(), RX_BUFFERS as u32);
    assert_eq!(r.xen.0.borrow().notifications, before + 1);
    // With the event index elsewhere, no notification.
    r.be.deliver(&frames[0]);
    r.nf.rx_batch(&mut r.pool, &mut out, 64);
    r.be.set_req_event(false, 1);
    r.nf.maintain(&mut r.pool);
    assert_eq!(r.xen.0.borrow().notifications, before + 1);
    // A received buffer stays valid after the backend rewrites its page.
    r.be.deliver(&frames[1]);
    let mut more = Vec::new();
    r.nf.rx_batch(&mut r.pool, &mut more, 64);
    r.nf.maintain(&mut r.pool);
    for _ in 0..RX_BUFFERS {
        r.be.deliver(&[0xee; 100]);
    }
    assert_eq!(r.pool.frame(&mut more[0]), &frames[1][..]);
}

#[test]
fn transmits_batches_by_copy_with_one_notification() {
    let mut r = rig();
    let base = r.xen.0.borrow().notifications;
    let frames: Vec<Vec<u8>> = (0..4)
        .map(|i| frame(0x40 + i, 64 + 500 * usize::from(i)))
        .collect();
    let mut batch: Vec<Packet> = frames.iter().map(|f| packet(&mut r.pool, f)).collect();
    let free = r.pool.available();
    r.nf.tx_batch(&mut r.pool, &mut batch);
    assert!(batch.is_empty());
    assert_eq!(
        r.pool.available(),
        free + 4,
        "pool buffers free once copied"
    );
    assert_eq!(r.xen.0.borrow().notifications, base + 1, "one per batch");
    assert_eq!(r.be.transmit(NETIF_RSP_OKAY), frames);
    r.nf.maintain(&mut r.pool);
    assert_eq!(r.nf.stats().tx_packets, 4);
    assert_eq!(r.nf.stats().tx_errors, 0);
    // The backend wants no notification for the next batch.
    r.be.set_req_event(true, 1000);
    let mut batch = vec![packet(&mut r.pool, &frames[0])];
    r.nf.tx_batch(&mut r.pool, &mut batch);
    assert_eq!(r.xen.0.borrow().notifications, base + 1);
    assert_eq!(r.be.transmit(NETIF_RSP_ERROR).len(), 1);
    r.nf.maintain(&mut r.pool);
    assert_eq!(r.nf.stats().tx_errors, 1, "an error status is counted");
}

#[test]
fn a_full_transmit_side_keeps_the_rest_of_the_batch() {
    let mut r = rig();
    let (m, reg) = region((TX_SLOTS + 40) * BUF_SIZE);
    let mut pool = PacketPool::new(reg);
    let mut batch: Vec<Packet> = (0..TX_SLOTS + 10)
        .map(|i| packet(&mut pool, &frame(i as u8, 80)))
        .collect();
    r.nf.tx_batch(&mut pool, &mut batch);
    assert_eq!(batch.len(), 10, "slots all in use");
    assert_eq!(r.nf.stats().tx_ring_full, 1);
    assert_eq!(r.be.transmit(NETIF_RSP_OKAY).len(), TX_SLOTS);
    r.nf.maintain(&mut pool);
    r.nf.tx_batch(&mut pool, &mut batch);
    assert!(batch.is_empty());
    assert_eq!(r.be.transmit(NETIF_RSP_OKAY).len(), 10);
    drop(m);
}

#[test]
fn hostile_responses_are_counted_and_skipped() {
    let mut r = rig();
    let mut out = Vec::new();
    // A frame past the end of its page; an unknown id; a repeated id; flags
    // not negotiated; an error status; a runt.
    r.be.deliver_with(&frame(1, 100), |rsp| rsp.offset = 4090);
    r.be.deliver_with(&frame(2, 100), |rsp| rsp.id = 5000);
    r.be.deliver_with(&frame(3, 100), |rsp| rsp.flags = NETRXF_MORE_DATA);
    r.be.deliver_with(&frame(4, 100), |rsp| rsp.status = NETIF_RSP_ERROR);
    r.be.deliver_with(&frame(5, 100), |rsp| rsp.status = 3);
    r.be.deliver(&frame(6, 100));
    r.nf.rx_batch(&mut r.pool, &mut out, 64);
    assert_eq!(out.len(), 1, "only the good frame");
    assert_eq!(r.pool.frame(&mut out[0]), &frame(6, 100)[..]);
    let s = r.nf.stats();
    assert_eq!((s.ring_errors, s.rx_errors), (3, 2));
    // Every page comes back but the one whose response named an unknown
    // id: the backend keeps it (we cannot tell which it was).
    r.nf.maintain(&mut r.pool);
    assert_eq!(r.be.rx_available(), RX_BUFFERS as u32 - 1);
    // A response for a transmit id never sent.
    r.be.tx_response(77, NETIF_RSP_OKAY);
    wr32(r.be.tx, RSP_PROD, r.be.tx_rsp_prod);
    assert!(!r.nf.is_dead());
    r.nf.maintain(&mut r.pool);
    // ...is a runaway index too: more responses than requests made.
    assert!(r.nf.is_dead());
}

#[test]
fn a_runaway_index_kills_the_device() {
    let mut r = rig();
    wr32(r.be.rx, RSP_PROD, 1000);
    let mut out = Vec::new();
    r.nf.rx_batch(&mut r.pool, &mut out, 64);
    assert!(out.is_empty());
    assert!(r.nf.is_dead());
    assert_eq!(r.nf.stats().ring_errors, 1);
    // Dead: nothing read or posted again, transmit batches dropped.
    let mut batch = vec![packet(&mut r.pool, &frame(1, 60))];
    let free = r.pool.available();
    r.nf.tx_batch(&mut r.pool, &mut batch);
    assert!(batch.is_empty());
    assert_eq!(r.pool.available(), free + 1);
    assert_eq!(r.nf.stats().tx_errors, 1, "the dropped frame is counted");
    assert_eq!(rd32(r.be.tx, REQ_PROD), 0);
}

#[test]
fn release_ends_every_grant_unless_one_is_in_use() {
    let mut r = rig();
    let some = *r.xen.0.borrow().live.keys().nth(5).unwrap();
    r.xen.0.borrow_mut().busy.push(some);
    assert!(!r.nf.release(), "a page still mapped");
    assert_eq!(r.xen.0.borrow().live.len(), 1);
    r.xen.0.borrow_mut().busy.clear();
    assert!(r.nf.release(), "the rest, once it is unmapped");
    assert!(r.xen.0.borrow().live.is_empty());
    assert!(r.nf.is_dead());
}

#[test]
fn a_released_device_gives_its_parts_to_the_next_connection() {
    let mut r = rig();
    r.be.deliver(&frame(1, 100));
    let some = *r.xen.0.borrow().live.keys().nth(3).unwrap();
    r.xen.0.borrow_mut().busy.push(some);
    let nf = *r.nf.into_parts().err().expect("not released: kept");
    let mut nf = *nf.into_parts().err().expect("still not released");
    assert!(!nf.release());
    let mut nf = *nf.into_parts().err().expect("a page is still mapped");
    r.xen.0.borrow_mut().busy.clear();
    assert!(nf.release());
    let (xen, mem) = nf.into_parts().ok().expect("every grant ended");
    assert!(r.xen.0.borrow().live.is_empty());
    // The same memory and grant access make a working device again, with
    // nothing left over from the first (the frame it never read).
    let mut nf = Netfront::new(xen, mem, [2, 0, 0, 0, 0, 7]).unwrap();
    let mut be = Backend::connect(&r.xen, nf.ring_refs());
    nf.post_rx();
    assert_eq!(be.rx_available(), RX_BUFFERS as u32);
    be.deliver(&frame(2, 80));
    let mut out = Vec::new();
    nf.rx_batch(&mut r.pool, &mut out, 64);
    assert_eq!(out.len(), 1);
    assert_eq!(r.pool.frame(&mut out[0]), &frame(2, 80)[..]);
}

#[test]
fn too_few_grants_undoes_what_was_granted() {
    let xen = FakeXen::default();
    xen.0.borrow_mut().limit = Some(40);
    let (_m, reg) = region(region_bytes());
    assert_eq!(
        Netfront::new(xen.clone(), reg, [0; 6])
            .err()
            .map(|e| e.error),
        Some(NetfrontError::NoGrants)
    );
    assert!(xen.0.borrow().live.is_empty());
    let (_m, small) = region(PAGE);
    assert_eq!(
        Netfront::new(xen, small, [0; 6]).err().map(|e| e.error),
        Some(NetfrontError::RegionTooSmall)
    );
}

#[test]
fn arming_asks_for_the_next_response_and_says_when_one_waits() {
    let mut r = rig();
    // Nothing received: the backend is asked to notify at response 1.
    assert!(!r.nf.arm_rx());
    assert_eq!(rd32(r.be.rx, RSP_EVENT), 1);
    // A response that came before the core could block: not armed away.
    r.be.deliver(&frame(1, 60));
    assert!(r.nf.arm_rx());
    let mut out = Vec::new();
    r.nf.rx_batch(&mut r.pool, &mut out, 64);
    assert_eq!(out.len(), 1);
    // Consumed: the next notification is for response 2.
    assert!(!r.nf.arm_rx());
    assert_eq!(rd32(r.be.rx, RSP_EVENT), 2);
}
