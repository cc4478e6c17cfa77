//! A firewall lab: Portcullis booted between two unix-socket "wires", one
//! for the upstream network and one for a client network, with a test on
//! the far end of each that crafts Ethernet frames and reads what comes out.
//!
//! Frames are built with `etherparse` and checked with this module's own
//! checksum code, so the tests share no code with the kernel's netstack.

use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use etherparse::{ArpHardwareId, ArpOperation, ArpPacket, EtherType, PacketBuilder};

use crate::{kernel, Machine, NicBackend, RunningMachine, EXIT_SUCCESS};

pub type Mac = [u8; 6];
/// MACs QEMU gives the kernel's NICs (see `Machine::args`).
pub const UPLINK_MAC: Mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
pub const DOWNLINK_MAC: Mac = [0x52, 0x54, 0, 0x12, 0x34, 0x57];
pub const GATEWAY_MAC: Mac = [0x02, 0, 0, 0, 0, 0x02];
pub const DNS_MAC: Mac = [0x02, 0, 0, 0, 0, 0x03];
pub const CLIENT_MAC: Mac = [0x02, 0, 0, 0, 0, 0x10];
pub const UPLINK_IP: [u8; 4] = [10, 0, 2, 15];
pub const GATEWAY_IP: [u8; 4] = [10, 0, 2, 2];
pub const UPSTREAM_DNS: [u8; 4] = [10, 0, 2, 3];
pub const CLIENT_GATEWAY: [u8; 4] = [10, 137, 0, 1];
pub const CLIENT_IP: [u8; 4] = [10, 137, 0, 10];
pub const OTHER_CLIENT_IP: [u8; 4] = [10, 137, 0, 11];
pub const VIRTUAL_DNS: [u8; 4] = [10, 139, 1, 1];
pub const SERVER_IP: [u8; 4] = [192, 0, 2, 80];

/// The lab's QubesDB: client 10.137.0.10 may reach TCP/UDP 5201, DNS and
/// ICMP; everything else is rejected. 10.137.0.11 is a second client.
pub const QUBESDB: &str = "\
/qubes-ip 10.0.2.15
/qubes-netmask 255.255.255.0
/qubes-gateway 10.0.2.2
/qubes-primary-dns 10.0.2.3
/qubes-netvm-gateway 10.137.0.1
/qubes-netvm-netmask 255.255.255.255
/qubes-netvm-primary-dns 10.139.1.1
/qubes-netvm-secondary-dns 10.139.1.2
/connected-ips 10.137.0.10 10.137.0.11
/qubes-firewall/10.137.0.10/policy drop
/qubes-firewall/10.137.0.10/0000 action=accept proto=tcp dstports=5201-5201
/qubes-firewall/10.137.0.10/0001 action=accept proto=udp dstports=5201-5201
/qubes-firewall/10.137.0.10/0002 action=accept specialtarget=dns
/qubes-firewall/10.137.0.10/0003 action=accept proto=icmp
/qubes-firewall/10.137.0.11/policy accept
";

/// `QUBESDB` with IPv6 on: the firewall's addresses, and client
/// fd09:24ef:4179::a89:a with the same rules as 10.137.0.10 (DNS aside:
/// the Qubes DNS addresses are IPv4 only).
pub const QUBESDB6: &str = "\
/qubes-ip 10.0.2.15
/qubes-netmask 255.255.255.0
/qubes-gateway 10.0.2.2
/qubes-primary-dns 10.0.2.3
/qubes-netvm-gateway 10.137.0.1
/qubes-netvm-netmask 255.255.255.255
/qubes-netvm-primary-dns 10.139.1.1
/qubes-netvm-secondary-dns 10.139.1.2
/connected-ips 10.137.0.10
/qubes-firewall/10.137.0.10/policy drop
/qubes-firewall/10.137.0.10/0000 action=accept proto=tcp dstports=5201-5201
/qubes-firewall/10.137.0.10/0001 action=accept proto=icmp
/qubes-ip6 2001:db8:1::15
/qubes-gateway6 2001:db8:1::1
/qubes-netvm-gateway6 fd09:24ef:4179::a89:1
/connected-ips6 fd09:24ef:4179::a89:a
/qubes-firewall/fd09:24ef:4179::a89:a/policy drop
/qubes-firewall/fd09:24ef:4179::a89:a/0000 action=accept proto=tcp dstports=5201-5201
/qubes-firewall/fd09:24ef:4179::a89:a/0001 action=accept proto=udp dstports=5201-5201
/qubes-firewall/fd09:24ef:4179::a89:a/0002 action=accept proto=icmp
";

/// One side of a NIC: the test's end of a unix datagram socket pair.
pub struct Wire {
    sock: UnixDatagram,
    qemu: PathBuf,
}

impl Wire {
    pub fn send(&self, frame: &[u8]) {
        self.sock
            .send_to(frame, &self.qemu)
            .expect("send a frame to QEMU");
    }

    /// The next frame out of the kernel on this wire, if one comes in time.
    pub fn recv(&self, timeout: Duration) -> Option<Vec<u8>> {
        self.sock.set_read_timeout(Some(timeout)).ok()?;
        let mut buf = vec![0u8; 65536];
        let n = self.sock.recv(&mut buf).ok()?;
        buf.truncate(n);
        Some(buf)
    }

    /// The next frame that satisfies `pred`, skipping others.
    pub fn recv_matching(&self, timeout: Duration, pred: impl Fn(&Frame) -> bool) -> Option<Frame> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let f = Frame::parse(&self.recv(left)?);
            if pred(&f) {
                return Some(f);
            }
        }
    }
}

/// Portcullis running between an upstream wire and a client wire.
pub struct Lab {
    pub machine: RunningMachine,
    pub uplink: Wire,
    pub downlink: Wire,
    pub ready_line: String,
    /// The `dataplane: layout ...` line.
    pub layout_line: String,
    dir: PathBuf,
}

/// What the kernel printed when asked to stop, and its counters.
pub struct Finished {
    pub console: String,
    pub counters: BTreeMap<String, u64>,
}

impl Finished {
    /// A counter from the `stats:` lines, e.g. `drops.spoofed-source`,
    /// `firewall.to_upstream`, `nic0.rx_packets`, `rules.10.137.0.10.0000`,
    /// `dsthost.example.com.resolved`;
    /// 0 when absent.
    pub fn counter(&self, name: &str) -> u64 {
        self.counters.get(name).copied().unwrap_or(0)
    }
}

/// Parses `stats: <group> [role] k=v k=v ...` lines (the last of each).
pub fn parse_counters(console: &str) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for line in console.lines() {
        let Some(rest) = line.strip_prefix("stats: ") else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let Some(mut group) = words.next().map(str::to_string) else {
            continue;
        };
        if group == "rules" || group == "dsthost" {
            // Per client address or name: `stats: rules <ip> 0000=n ...
            // policy=n`, `stats: dsthost <name> ipv4 resolved=1 ...`.
            let Some(key) = words.next() else { continue };
            group = format!("{group}.{key}");
        }
        for w in words {
            if let Some((k, v)) = w.split_once('=') {
                if let Ok(v) = v.parse() {
                    m.insert(format!("{group}.{k}"), v);
                }
            }
        }
    }
    m
}

impl Lab {
    /// Boots the kernel with `qubesdb` and answers its first ARP request
    /// for the gateway.
    pub fn start(qubesdb: &str) -> Lab {
        Self::start_with(qubesdb, "")
    }

    pub fn start_with(qubesdb: &str, cmdline: &str) -> Lab {
        Self::start_on(qubesdb, cmdline, 1)
    }

    /// As `start_with`, on `cpus` CPUs.
    pub fn start_on(qubesdb: &str, cmdline: &str, cpus: u32) -> Lab {
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("portcullis-lab-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("lab dir");
        let db = dir.join("qubesdb");
        std::fs::write(&db, qubesdb).expect("write qubesdb");
        let wire = |name: &str| {
            let peer = dir.join(format!("{name}-test.sock"));
            let qemu = dir.join(format!("{name}-qemu.sock"));
            let sock = UnixDatagram::bind(&peer).expect("bind test socket");
            (
                Wire {
                    sock,
                    qemu: qemu.clone(),
                },
                NicBackend::Dgram { qemu, peer },
            )
        };
        let (uplink, up_backend) = wire("uplink");
        let (downlink, down_backend) = wire("downlink");
        let machine = Machine::new(kernel())
            .qubesdb(&db)
            .append(cmdline)
            .cpus(cpus)
            .nic(up_backend)
            .nic(down_backend);
        let machine = RunningMachine::spawn(&machine).unwrap_or_else(|e| panic!("{e}"));
        let ready_line = machine
            .wait_for(Duration::from_secs(30), |l| {
                l.starts_with("portcullis: ready") || l.starts_with("FATAL")
            })
            .expect("kernel printed its ready line");
        assert!(ready_line.starts_with("portcullis: ready"), "{ready_line}");
        let layout_line = machine
            .wait_for(Duration::from_secs(10), |l| {
                l.starts_with("dataplane: layout")
            })
            .expect("kernel printed its layout");
        let lab = Lab {
            machine,
            uplink,
            downlink,
            ready_line,
            layout_line,
            dir,
        };
        let req = lab
            .uplink
            .recv_matching(Duration::from_secs(10), |f| {
                f.arp.as_ref().is_some_and(|a| a.target_ip == GATEWAY_IP)
            })
            .expect("ARP request for the gateway");
        let a = req.arp.unwrap();
        assert_eq!(
            (a.op, a.sender_ip, a.sender_mac, req.src),
            (1, UPLINK_IP, UPLINK_MAC, UPLINK_MAC)
        );
        lab.uplink.send(&arp(
            2,
            GATEWAY_MAC,
            GATEWAY_IP,
            UPLINK_MAC,
            UPLINK_IP,
            UPLINK_MAC,
        ));
        // A test's first frame usually comes from a client, on the other
        // NIC, and nothing orders it after the reply above: under load it
        // could reach the firewall first and be dropped for want of the
        // gateway's MAC. So the gateway asks for the firewall's address
        // too, on the same wire: once the answer is back, the reply before
        // it has been handled.
        lab.gateway_asks_for_uplink()
            .expect("the firewall's ARP reply to the gateway");
        lab
    }

    /// The gateway asks, by ARP, for the firewall's uplink address: the
    /// firewall's ARP reply, if it comes in time.
    pub fn gateway_asks_for_uplink(&self) -> Option<Frame> {
        self.uplink.send(&arp(
            1,
            GATEWAY_MAC,
            GATEWAY_IP,
            [0; 6],
            UPLINK_IP,
            [0xff; 6],
        ));
        self.uplink.recv_matching(Duration::from_secs(10), |f| {
            f.arp
                .as_ref()
                .is_some_and(|a| a.op == 2 && a.target_ip == GATEWAY_IP)
        })
    }

    /// Asks the kernel to print its counters and stop; checks it exits
    /// with success.
    pub fn finish(mut self) -> Finished {
        let done = quit(&mut self.machine);
        let _ = std::fs::remove_dir_all(&self.dir);
        done
    }
}

/// Asks a running kernel to print its counters and stop (console key
/// `q`), checks that it exits with success, and returns what it printed.
pub fn quit(machine: &mut RunningMachine) -> Finished {
    machine.send_keys(b"q");
    let (status, console) = machine.drain_until_exit(Instant::now() + Duration::from_secs(30));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(EXIT_SUCCESS),
        "{console}"
    );
    Finished {
        counters: parse_counters(&console),
        console,
    }
}

// ---- Frames --------------------------------------------------------------

/// An ARP packet for IPv4 over Ethernet, in an Ethernet frame.
pub fn arp(
    op: u16,
    sender_mac: Mac,
    sender_ip: [u8; 4],
    target_mac: Mac,
    target_ip: [u8; 4],
    eth_dst: Mac,
) -> Vec<u8> {
    let op = if op == 1 {
        ArpOperation::REQUEST
    } else {
        ArpOperation::REPLY
    };
    let p = ArpPacket::new(
        ArpHardwareId::ETHERNET,
        EtherType::IPV4,
        op,
        &sender_mac,
        &sender_ip,
        &target_mac,
        &target_ip,
    )
    .expect("valid ARP");
    let b = PacketBuilder::ethernet2(sender_mac, eth_dst).arp(p);
    let mut out = Vec::new();
    b.write(&mut out).expect("serialize ARP");
    out
}

/// A UDP frame; `macs` is (source, destination).
pub fn udp(
    macs: (Mac, Mac),
    src: [u8; 4],
    dst: [u8; 4],
    ttl: u8,
    ports: (u16, u16),
    payload: &[u8],
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv4(src, dst, ttl)
        .udp(ports.0, ports.1);
    let mut out = Vec::new();
    b.write(&mut out, payload).expect("serialize UDP");
    out
}

pub fn tcp_syn(
    src_mac: Mac,
    dst_mac: Mac,
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 1000, 64240)
        .syn();
    let mut out = Vec::new();
    b.write(&mut out, &[]).expect("serialize TCP");
    out
}

pub fn ping(src_mac: Mac, dst_mac: Mac, src: [u8; 4], dst: [u8; 4], id: u16, seq: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src, dst, 64)
        .icmpv4_echo_request(id, seq);
    let mut out = Vec::new();
    b.write(&mut out, b"portcullis").expect("serialize ICMP");
    out
}

/// Decoded ARP fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArpFields {
    pub op: u16,
    pub sender_mac: Mac,
    pub sender_ip: [u8; 4],
    pub target_ip: [u8; 4],
}

/// Decoded IPv4 fields, with checksums verified independently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipv4Fields {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub ttl: u8,
    pub proto: u8,
    /// TCP/UDP ports; ICMP type and code.
    pub sport: u16,
    pub dport: u16,
    /// The transport header and payload.
    pub l4: Vec<u8>,
    pub checksums_ok: bool,
}

/// A frame that came out of the kernel.
#[derive(Debug, Clone)]
pub struct Frame {
    pub dst: Mac,
    pub src: Mac,
    pub ethertype: u16,
    pub arp: Option<ArpFields>,
    pub ipv4: Option<Ipv4Fields>,
    pub raw: Vec<u8>,
}

fn sum(data: &[u8], mut acc: u32) -> u32 {
    for c in data.chunks(2) {
        acc += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    acc
}

fn folded(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

impl Frame {
    pub fn parse(raw: &[u8]) -> Frame {
        let mac = |o: usize| -> Mac {
            raw.get(o..o + 6)
                .and_then(|s| s.try_into().ok())
                .unwrap_or([0; 6])
        };
        let ethertype = raw
            .get(12..14)
            .map(|s| u16::from_be_bytes([s[0], s[1]]))
            .unwrap_or(0);
        let mut f = Frame {
            dst: mac(0),
            src: mac(6),
            ethertype,
            arp: None,
            ipv4: None,
            raw: raw.to_vec(),
        };
        let p = &raw[raw.len().min(14)..];
        if ethertype == 0x0806 && p.len() >= 28 {
            f.arp = Some(ArpFields {
                op: u16::from_be_bytes([p[6], p[7]]),
                sender_mac: p[8..14].try_into().unwrap(),
                sender_ip: p[14..18].try_into().unwrap(),
                target_ip: p[24..28].try_into().unwrap(),
            });
        }
        if ethertype == 0x0800 && p.len() >= 20 {
            let ihl = usize::from(p[0] & 0xf) * 4;
            let total = usize::from(u16::from_be_bytes([p[2], p[3]])).min(p.len());
            if ihl >= 20 && total >= ihl {
                let (src, dst): ([u8; 4], [u8; 4]) =
                    (p[12..16].try_into().unwrap(), p[16..20].try_into().unwrap());
                let l4 = p[ihl..total].to_vec();
                let proto = p[9];
                let mut ok = folded(sum(&p[..ihl], 0)) == 0xffff;
                let (sport, dport) = match proto {
                    1 if l4.len() >= 4 => {
                        ok &= folded(sum(&l4, 0)) == 0xffff;
                        (u16::from(l4[0]), u16::from(l4[1]))
                    }
                    6 | 17 if l4.len() >= 8 => {
                        let mut ph = sum(&src, 0);
                        ph = sum(&dst, ph) + u32::from(proto) + l4.len() as u32;
                        let udp_unchecked = proto == 17 && l4[6] == 0 && l4[7] == 0;
                        ok &= udp_unchecked || folded(sum(&l4, ph)) == 0xffff;
                        (
                            u16::from_be_bytes([l4[0], l4[1]]),
                            u16::from_be_bytes([l4[2], l4[3]]),
                        )
                    }
                    _ => (0, 0),
                };
                f.ipv4 = Some(Ipv4Fields {
                    src,
                    dst,
                    ttl: p[8],
                    proto,
                    sport,
                    dport,
                    l4,
                    checksums_ok: ok,
                });
            }
        }
        f
    }

    pub fn ip(&self) -> &Ipv4Fields {
        self.ipv4
            .as_ref()
            .unwrap_or_else(|| panic!("not IPv4: {:02x?}", self.raw))
    }
}
