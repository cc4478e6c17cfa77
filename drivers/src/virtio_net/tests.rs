//! The virtio-net driver against a fake transport and a device played by
//! the test through the queue memory.

use alloc::vec::Vec;

use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{Error, PhysAddr};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use super::*;
use crate::pool::tests::region;
use crate::pool::BUF_SIZE;
use crate::virtqueue::ring_bytes;
use crate::virtqueue::tests::FakeDevice;

const MAC: [u8; 6] = [0x52, 0x54, 0, 0xaa, 0xbb, 0xcc];
const FEATURE_CSUM: u64 = 1;

#[derive(Default)]
struct FakeTransport {
    offered: u64,
    accepted: Option<u64>,
    status: u32,
    refuse_features: bool,
    max_queue: u32,
    queues: Vec<(u16, u32, u64)>,
    notified: Vec<u16>,
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
    let (m1, rx) = region(ring_bytes(QUEUE_SIZE));
    let (m2, tx) = region(ring_bytes(QUEUE_SIZE));
    let (m3, p) = region(600 * BUF_SIZE);
    let nic = VirtioNet::new(t, rx, tx)?;
    Ok(Rig {
        _mem: alloc::vec![m1, m2, m3],
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
