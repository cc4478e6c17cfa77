//! The virtio-net driver against a fake transport and a device played by
//! the test through the queue memory.

use alloc::vec::Vec;

use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{Error, PhysAddr};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use super::*;
use crate::pool::tests::region;
use crate::pool::BUF_SIZE;
use crate::virtqueue::tests::FakeDevice;

const MAC: [u8; 6] = [0x52, 0x54, 0, 0xaa, 0xbb, 0xcc];
const FEATURE_CSUM: u64 = 1;
const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;

#[derive(Default)]
struct FakeTransport {
    offered: u64,
    accepted: Option<u64>,
    status: u32,
    refuse_features: bool,
    max_queue: u32,
    queues: Vec<(u16, u32, u64)>,
    notified: Vec<u16>,
    /// `max_virtqueue_pairs` in configuration space.
    max_pairs: u16,
    /// The control queue's index, once set up; the commands it got, and
    /// the answer byte the device gives (`None`: it never answers).
    ctrl: Option<u16>,
    commands: Vec<Vec<u8>>,
    answer: Option<u8>,
}

impl FakeTransport {
    /// Plays the device's control queue: reads each command chain and
    /// writes the answer into its last, writable part.
    fn serve_control(&mut self, queue: u16) {
        let Some(&(_, size, desc)) = self.queues.iter().find(|q| q.0 == queue) else {
            return;
        };
        let Some(answer) = self.answer else { return };
        let mut dev = FakeDevice::at(desc, size as u16);
        for (head, ..) in dev.take() {
            let chain = dev.chain(head);
            let (ack, command) = chain.split_last().unwrap();
            assert_eq!(ack.1, 1, "one answer byte");
            let mut bytes = Vec::new();
            for (addr, len, _) in command {
                // SAFETY: test memory the driver posted for reading.
                bytes.extend_from_slice(unsafe {
                    core::slice::from_raw_parts(*addr as *const u8, *len as usize)
                });
            }
            self.commands.push(bytes);
            // SAFETY: test memory the driver posted for writing.
            unsafe { (ack.0 as *mut u8).write_volatile(answer) };
            dev.complete(u32::from(head), 1);
        }
    }
}

impl Transport for FakeTransport {
    fn device_type(&self) -> DeviceType {
        DeviceType::Network
    }
    fn read_device_features(&mut self) -> u64 {
        self.offered
    }
    fn write_driver_features(&mut self, f: u64) {
        self.accepted = Some(f);
    }
    fn max_queue_size(&mut self, _queue: u16) -> u32 {
        self.max_queue
    }
    fn notify(&mut self, queue: u16) {
        self.notified.push(queue);
        if self.ctrl == Some(queue) {
            self.serve_control(queue);
        }
    }
    fn get_status(&self) -> DeviceStatus {
        DeviceStatus::from_bits_truncate(self.status)
    }
    fn set_status(&mut self, status: DeviceStatus) {
        self.status = status.bits();
        if self.refuse_features {
            self.status &= !DeviceStatus::FEATURES_OK.bits();
        }
    }
    fn set_guest_page_size(&mut self, _size: u32) {}
    fn requires_legacy_layout(&self) -> bool {
        false
    }
    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        desc: PhysAddr,
        _driver: PhysAddr,
        _device: PhysAddr,
    ) {
        self.queues.push((queue, size, desc));
        if self.accepted.is_some_and(|f| f & FEATURE_MQ != 0) && queue == 2 * self.max_pairs {
            self.ctrl = Some(queue);
        }
    }
    fn queue_unset(&mut self, _queue: u16) {}
    fn queue_used(&mut self, queue: u16) -> bool {
        self.queues.iter().any(|q| q.0 == queue)
    }
    fn ack_interrupt(&mut self) -> InterruptStatus {
        InterruptStatus::empty()
    }
    fn read_config_generation(&self) -> u32 {
        0
    }
    fn read_config_space<T: FromBytes + IntoBytes>(&self, offset: usize) -> Result<T, Error> {
        let mut space = [0u8; 64];
        space[..6].copy_from_slice(&MAC);
        space[8..10].copy_from_slice(&self.max_pairs.to_le_bytes());
        let n = core::mem::size_of::<T>();
        T::read_from_bytes(
            space
                .get(offset..offset + n)
                .ok_or(Error::ConfigSpaceTooSmall)?,
        )
        .map_err(|_| Error::ConfigSpaceTooSmall)
    }
    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        _offset: usize,
        _value: T,
    ) -> Result<(), Error> {
        Ok(())
    }
}

struct Rig {
    _mem: Vec<Vec<u64>>,
    nic: VirtioNet<FakeTransport>,
    pool: PacketPool,
}

fn rig(t: FakeTransport) -> Result<Rig, NetError> {
    rig_pairs(t, 1)
}

/// Test memory for the rings; doorbells (when given) are words of
/// `bells`, one per queue.
struct TestPlatform<'a> {
    mem: Vec<Vec<u64>>,
    bells: Option<&'a mut [u16; 16]>,
}

impl Platform for TestPlatform<'_> {
    fn dma(&mut self, bytes: usize) -> DmaRegion {
        let (m, r) = region(bytes);
        self.mem.push(m);
        r
    }
    fn doorbell(&mut self, queue: u16) -> Option<Doorbell> {
        let bells = self.bells.as_mut()?;
        let reg = bells.get_mut(usize::from(queue))?;
        // SAFETY: a word of test memory that outlives the device.
        Some(unsafe { Doorbell::new(core::ptr::NonNull::from(reg)) })
    }
}

fn rig_pairs(t: FakeTransport, pairs: u16) -> Result<Rig, NetError> {
    let mut platform = TestPlatform {
        mem: Vec::new(),
        bells: None,
    };
    let nic = VirtioNet::new(t, pairs, &mut platform)?;
    let mut mem = platform.mem;
    let (m, p) = region(1200 * BUF_SIZE);
    mem.push(m);
    Ok(Rig {
        _mem: mem,
        nic,
        pool: PacketPool::new(p),
    })
}

fn modern(max_queue: u32) -> FakeTransport {
    FakeTransport {
        offered: FEATURE_VERSION_1 | FEATURE_MAC | FEATURE_CSUM,
        max_queue,
        ..Default::default()
    }
}

#[test]
fn negotiates_only_what_it_supports() {
    let r = rig(modern(100)).unwrap();
    let t = &r.nic.transport;
    assert_eq!(
        t.accepted,
        Some(FEATURE_VERSION_1 | FEATURE_MAC),
        "no offloads accepted yet"
    );
    assert!(t.get_status().contains(DeviceStatus::DRIVER_OK));
    assert_eq!(
        t.queues.iter().map(|q| (q.0, q.1)).collect::<Vec<_>>(),
        [(0, 64), (1, 64)]
    );
    assert_eq!(r.nic.mac(), MAC);
}

#[test]
fn refuses_legacy_devices_and_refused_features() {
    let legacy = FakeTransport {
        offered: FEATURE_MAC,
        max_queue: 256,
        ..Default::default()
    };
    assert_eq!(rig(legacy).err(), Some(NetError::NotModern));
    let stubborn = FakeTransport {
        refuse_features: true,
        ..modern(256)
    };
    assert_eq!(rig(stubborn).err(), Some(NetError::FeaturesRefused));
    assert_eq!(rig(modern(0)).err(), Some(NetError::Queue(0, None)));
}

#[test]
fn receives_and_transmits_batches() {
    let mut r = rig(modern(256)).unwrap();
    r.nic.maintain(&mut r.pool);
    assert_eq!(r.nic.rx_posted(), 256);
    assert_eq!(
        r.nic.transport.notified,
        [RX_QUEUE],
        "one notification for the whole refill"
    );
    let (rx_desc, tx_desc) = (r.nic.transport.queues[0].2, r.nic.transport.queues[1].2);
    let mut rx_dev = FakeDevice::at(rx_desc, 256);
    let posted = rx_dev.take();
    assert_eq!(posted.len(), 256);
    // The device writes a header and a 60-byte frame into two buffers, and
    // an impossible 4-byte completion into a third.
    for (i, (id, addr, len, flags)) in posted.iter().take(3).enumerate() {
        assert_eq!((*len as usize, *flags), (NET_HDR + MAX_FRAME, 2));
        // SAFETY: the address is host memory of the pool, posted for writing.
        unsafe {
            core::ptr::write_bytes(*addr as *mut u8, 0, NET_HDR);
            core::ptr::write_bytes((*addr as *mut u8).add(NET_HDR), 0xa0 + i as u8, 60);
        }
        rx_dev.complete(
            u32::from(*id),
            if i == 2 { 4 } else { (NET_HDR + 60) as u32 },
        );
    }
    let mut got = Vec::new();
    r.nic.rx_batch(&mut r.pool, &mut got, 64);
    assert_eq!(got.iter().map(|p| p.len).collect::<Vec<_>>(), [60, 60]);
    assert!(r.pool.frame(&mut got[1]).iter().all(|&b| b == 0xa1));
    assert_eq!(r.nic.stats().rx_errors, 1);

    // Transmit both: one publish, one notification, header zeroed in front.
    r.pool.slot(&mut got[0].buf)[HEADROOM - NET_HDR..HEADROOM].fill(0xee);
    r.nic.tx_batch(&mut r.pool, &mut got);
    assert!(got.is_empty());
    assert_eq!(r.nic.transport.notified, [RX_QUEUE, TX_QUEUE]);
    let mut tx_dev = FakeDevice::at(tx_desc, 256);
    let sent = tx_dev.take();
    assert_eq!(sent.len(), 2);
    for (id, addr, len, flags) in &sent {
        assert_eq!((*len as usize, *flags), (NET_HDR + 60, 0));
        // SAFETY: the address is host memory of the pool, posted for reading.
        let hdr = unsafe { core::slice::from_raw_parts(*addr as *const u8, NET_HDR) };
        assert!(hdr.iter().all(|&b| b == 0));
        tx_dev.complete(u32::from(*id), 0);
    }
    let before = r.pool.available();
    r.nic.maintain(&mut r.pool);
    // The two transmitted buffers came back (the refused one already had,
    // in `rx_batch`), and three fresh buffers refilled the RX ring.
    assert_eq!(r.pool.available(), before + 2 - 3);
    assert_eq!(r.nic.rx_posted(), 256);
    assert_eq!(r.nic.stats().tx_packets, 2);
}

#[test]
fn a_full_tx_ring_keeps_the_rest_of_the_batch() {
    let mut r = rig(modern(4)).unwrap();
    let mut batch: Vec<Packet> = (0..6)
        .map(|_| Packet {
            buf: r.pool.alloc().unwrap(),
            len: 60,
        })
        .collect();
    r.nic.tx_batch(&mut r.pool, &mut batch);
    assert_eq!(batch.len(), 2, "two wait for room");
    assert_eq!(r.nic.stats().tx_ring_full, 1);
}

fn multiqueue(max_pairs: u16) -> FakeTransport {
    FakeTransport {
        offered: FEATURE_VERSION_1 | FEATURE_MAC | FEATURE_CTRL_VQ | FEATURE_MQ,
        max_pairs,
        answer: Some(CTRL_OK),
        ..modern(256)
    }
}

#[test]
fn sets_up_the_queue_pairs_asked_for_and_tells_the_device() {
    let r = rig_pairs(multiqueue(4), 2).unwrap();
    let t = &r.nic.transport;
    assert_eq!(
        t.accepted,
        Some(FEATURE_VERSION_1 | FEATURE_MAC | FEATURE_CTRL_VQ | FEATURE_MQ)
    );
    // Pairs 0 and 1, then the control queue after all four offered pairs.
    assert_eq!(
        t.queues.iter().map(|q| (q.0, q.1)).collect::<Vec<_>>(),
        [(0, 256), (1, 256), (2, 256), (3, 256), (8, 8)]
    );
    assert_eq!(
        t.commands,
        [alloc::vec![CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, 2, 0]]
    );
    assert!(t.get_status().contains(DeviceStatus::DRIVER_OK));
    assert_eq!(r.nic.queue_pairs(), (2, 4));
    // Never more than offered; one pair asked for needs no MQ at all.
    let r = rig_pairs(multiqueue(2), 8).unwrap();
    assert_eq!(r.nic.queue_pairs(), (2, 2));
    assert_eq!(r.nic.transport.commands[0][2..], [2, 0]);
    let r = rig_pairs(multiqueue(4), 1).unwrap();
    assert_eq!(
        r.nic.transport.accepted,
        Some(FEATURE_VERSION_1 | FEATURE_MAC)
    );
    assert!(r.nic.transport.commands.is_empty());
    assert_eq!(r.nic.queue_pairs(), (1, 1));
    // A device without MQ gives one pair whatever is asked.
    let r = rig_pairs(modern(256), 4).unwrap();
    assert_eq!(r.nic.queue_pairs(), (1, 1));
}

#[test]
fn a_refused_or_unanswered_command_or_bad_pair_count_fails_the_device() {
    let refused = FakeTransport {
        answer: Some(1),
        ..multiqueue(4)
    };
    assert_eq!(
        rig_pairs(refused, 2).err(),
        Some(NetError::Control(Some(1)))
    );
    let silent = FakeTransport {
        answer: None,
        ..multiqueue(4)
    };
    let r = rig_pairs(silent, 2);
    assert_eq!(r.as_ref().err(), Some(&NetError::Control(None)));
    for bad in [0, 0x8001] {
        assert_eq!(
            rig_pairs(multiqueue(bad), 2).err(),
            Some(NetError::Config),
            "{bad}"
        );
    }
}

#[test]
fn receives_on_every_pair_and_refills_each() {
    let mut r = rig_pairs(multiqueue(2), 2).unwrap();
    r.nic.maintain(&mut r.pool);
    assert_eq!(r.nic.rx_posted(), 512);
    let queues = r.nic.transport.queues.clone();
    let mut devs: Vec<FakeDevice> = [0, 2]
        .iter()
        .map(|&q| FakeDevice::at(queues[q].2, 256))
        .collect();
    for (k, dev) in devs.iter_mut().enumerate() {
        let posted = dev.take();
        for (id, addr, ..) in posted.iter().take(3 - k) {
            // SAFETY: host memory of the pool, posted for writing.
            unsafe {
                core::ptr::write_bytes(*addr as *mut u8, 0, NET_HDR);
                core::ptr::write_bytes((*addr as *mut u8).add(NET_HDR), 0x10 + k as u8, 60);
            }
            dev.complete(u32::from(*id), (NET_HDR + 60) as u32);
        }
    }
    let mut got = Vec::new();
    r.nic.rx_batch(&mut r.pool, &mut got, 64);
    assert_eq!(got.len(), 5, "three from pair 0, two from pair 1");
    assert_eq!(r.nic.rx_queues(), [3, 2]);
    let from_second = got
        .iter_mut()
        .filter_map(|p| r.pool.frame(p).iter().all(|&b| b == 0x11).then_some(()))
        .count();
    assert_eq!(from_second, 2);
    for p in got {
        r.pool.free(p.buf);
    }
    r.nic.transport.notified.clear();
    r.nic.maintain(&mut r.pool);
    assert_eq!(r.nic.rx_posted(), 512);
    assert_eq!(r.nic.transport.notified, [0, 2], "each refilled queue once");
}

#[test]
fn doorbells_are_rung_directly_when_the_platform_gives_them() {
    let mut bells = [0xffffu16; 16];
    let mut platform = TestPlatform {
        mem: Vec::new(),
        bells: Some(&mut bells),
    };
    let mut nic = VirtioNet::new(multiqueue(2), 2, &mut platform).unwrap();
    let (m, p) = region(1200 * BUF_SIZE);
    let mut pool = PacketPool::new(p);
    nic.maintain(&mut pool);
    let mut batch = alloc::vec![Packet {
        buf: pool.alloc().unwrap(),
        len: 60
    }];
    nic.tx_batch(&mut pool, &mut batch);
    // Only the control command (once, at set-up) went through the
    // transport; each data queue's register holds its index.
    assert_eq!(nic.transport.notified, [4]);
    assert_eq!(nic.doorbells(), 4);
    assert_eq!(nic.stats().notifications, 3);
    drop(nic);
    drop(m);
    assert_eq!(&bells[..5], &[0, 1, 2, 0xffff, 0xffff]);
}

/// `into_queues`: one handle per pair, each receiving only from its own
/// receive queue, transmitting on its own transmit queue and refilling its
/// own receive queue from its own pool, every notification through the
/// queue's doorbell; a device without doorbells is given back whole.
#[test]
fn splits_into_one_handle_per_pair() {
    let r = rig_pairs(multiqueue(2), 2).unwrap();
    let nic = r.nic.into_queues().err().expect("no doorbells: refused");
    assert_eq!(nic.queue_pairs(), (2, 2), "and given back intact");
    let mut bells = [0xffffu16; 16];
    let mut platform = TestPlatform {
        mem: Vec::new(),
        bells: Some(&mut bells),
    };
    let nic = VirtioNet::new(multiqueue(2), 2, &mut platform).unwrap();
    let queues_at = nic.transport.queues.clone();
    let Ok(mut queues) = nic.into_queues() else {
        panic!("every queue has its doorbell")
    };
    assert_eq!(
        queues.iter().map(VirtioQueue::index).collect::<Vec<_>>(),
        [0, 1]
    );
    let (m, p) = region(1200 * BUF_SIZE);
    let mut pools = PacketPool::new(p).split(2);
    for (q, pool) in queues.iter_mut().zip(pools.iter_mut()) {
        q.maintain(pool);
        assert_eq!(pool.available(), 600 - 256, "each filled from its own pool");
    }
    let mut dev = FakeDevice::at(queues_at[2].2, 256);
    let posted = dev.take();
    for (id, addr, ..) in posted.iter().take(2) {
        // SAFETY: host memory of the pool, posted for writing.
        unsafe { core::ptr::write_bytes(*addr as *mut u8, 0, NET_HDR + 60) };
        dev.complete(u32::from(*id), (NET_HDR + 60) as u32);
    }
    let mut got = Vec::new();
    queues[0].rx_batch(&mut pools[0], &mut got, 64);
    assert!(got.is_empty(), "pair 0 sees nothing of pair 1's frames");
    queues[1].rx_batch(&mut pools[1], &mut got, 64);
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|p| pools[1].owns(&p.buf)));
    assert_eq!(queues[1].rx_queues(), [2]);
    queues[1].tx_batch(&mut pools[1], &mut got);
    assert!(got.is_empty());
    assert_eq!(queues[1].stats().tx_packets, 2);
    drop(queues);
    drop(m);
    // Pair 1's queues (2: receive, 3: transmit) rung through their own
    // registers; pair 0's receive queue too.
    assert_eq!(&bells[..4], &[0, 0xffff, 2, 3]);
}
