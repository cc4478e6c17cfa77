//! The kinds of NIC the dataplane drives, behind one `Nic`: virtio-net
//! over PCI (QEMU, HVM) and Xen netfront (PVH under Xen). One match per
//! batch call, not per packet.

use alloc::vec::Vec;

use drivers::virtio_net::VirtioNet;
use drivers::{Nic, NicStats, Packet, PacketPool};
use virtio_drivers::transport::pci::PciTransport;

use crate::netback::ClientVif;
use crate::netfront::Uplink;

// A handful of ports live for the kernel's life in one Vec: their sizes
// do not matter, a box would cost an indirection per batch.
#[allow(clippy::large_enum_variant)]
pub enum Port {
    Virtio(VirtioNet<PciTransport>),
    Netfront(Uplink),
    Client(ClientVif),
}

impl Port {
    /// Receive/transmit queue pairs in use.
    pub fn queue_pairs(&self) -> usize {
        match self {
            Port::Virtio(n) => n.queue_pairs().0,
            Port::Netfront(_) | Port::Client(_) => 1,
        }
    }

    /// Packet buffers the port may hold at once: a full receive ring and
    /// transmit ring per queue pair; a client vif holds buffers only for
    /// a batch of copies, and its frames wait in the client's pages while
    /// buffers are short (`drivers::netback`), so a share of a batch each
    /// and the common spares are enough.
    pub fn buffers(&self) -> usize {
        let ring = usize::from(drivers::virtio_net::QUEUE_SIZE);
        match self {
            Port::Client(_) => 16,
            _ => self.queue_pairs() * 2 * ring,
        }
    }
}

macro_rules! each {
    ($self:ident, $n:ident => $e:expr) => {
        match $self {
            Port::Virtio($n) => $e,
            Port::Netfront($n) => $e,
            Port::Client($n) => $e,
        }
    };
}

impl Nic for Port {
    fn mac(&self) -> [u8; 6] {
        each!(self, n => n.mac())
    }

    fn rx_batch(&mut self, pool: &mut PacketPool, out: &mut Vec<Packet>, max: usize) {
        each!(self, n => n.rx_batch(pool, out, max))
    }

    fn tx_batch(&mut self, pool: &mut PacketPool, batch: &mut Vec<Packet>) {
        each!(self, n => n.tx_batch(pool, batch))
    }

    fn maintain(&mut self, pool: &mut PacketPool) {
        each!(self, n => n.maintain(pool))
    }

    fn stats(&self) -> NicStats {
        each!(self, n => n.stats())
    }

    fn arm(&mut self) -> bool {
        each!(self, n => n.arm())
    }

    fn rx_queues(&self) -> Vec<u64> {
        each!(self, n => n.rx_queues())
    }

    fn assigned(&self) -> Option<(u64, &[core::net::IpAddr])> {
        each!(self, n => n.assigned())
    }
}
