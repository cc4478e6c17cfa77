//! The `pipeline` layout: NICs on the boot CPU, the firewall stage on a
//! second CPU, joined by SPSC rings. The same frames-in, frames-out checks
//! as in `dataplane.rs`, on two CPUs.

use std::time::Duration;

use qemu_tests::lab::*;

const WAIT: Duration = Duration::from_secs(10);

fn client_udp(dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    udp(
        (CLIENT_MAC, DOWNLINK_MAC),
        CLIENT_IP,
        dst,
        64,
        (sport, dport),
        payload,
    )
}

#[test]
fn the_pipeline_forwards_filters_and_returns_every_buffer() {
    let lab = Lab::start_on(QUBESDB, "layout=pipeline", 2);
    assert_eq!(
        lab.layout_line,
        "dataplane: layout pipeline (nics on cpu 0, firewall on cpu 1)"
    );

    // NAT out and back.
    lab.downlink
        .send(&client_udp(SERVER_IP, 40000, 5201, b"hello"));
    let out = lab
        .uplink
        .recv(WAIT)
        .map(|f| Frame::parse(&f))
        .expect("forwarded upstream");
    let ip = out.ip();
    assert_eq!(
        (ip.src, ip.dst, ip.sport, ip.ttl),
        (UPLINK_IP, SERVER_IP, 40000, 63)
    );
    assert!(ip.checksums_ok);
    lab.uplink.send(&udp(
        (GATEWAY_MAC, UPLINK_MAC),
        SERVER_IP,
        UPLINK_IP,
        60,
        (5201, ip.sport),
        b"world",
    ));
    let back = lab
        .downlink
        .recv(WAIT)
        .map(|f| Frame::parse(&f))
        .expect("reply delivered");
    assert_eq!(
        (back.ip().dst, back.ip().dport, back.dst),
        (CLIENT_IP, 40000, CLIENT_MAC)
    );

    // A rejected flow, a spoofed frame, a malformed one, then a marker that
    // must come out first on the uplink.
    lab.downlink.send(&tcp_syn(
        CLIENT_MAC,
        DOWNLINK_MAC,
        CLIENT_IP,
        SERVER_IP,
        41001,
        22,
    ));
    let r = lab
        .downlink
        .recv(WAIT)
        .map(|f| Frame::parse(&f))
        .expect("ICMP reject");
    assert_eq!((r.ip().proto, r.ip().sport, r.ip().dport), (1, 3, 13));
    lab.downlink.send(&udp(
        (CLIENT_MAC, DOWNLINK_MAC),
        [10, 137, 0, 99],
        SERVER_IP,
        64,
        (1, 5201),
        b"spoof",
    ));
    let mut bad = client_udp(SERVER_IP, 6000, 5201, b"x");
    bad[24] ^= 0x55;
    lab.downlink.send(&bad);
    lab.downlink
        .send(&client_udp(SERVER_IP, 7, 5201, b"marker"));
    let m = lab
        .uplink
        .recv(WAIT)
        .map(|f| Frame::parse(&f))
        .expect("marker");
    assert_eq!(&m.ip().l4[8..], b"marker");

    let done = lab.finish();
    assert_eq!(done.counter("firewall.to_upstream"), 2, "{}", done.console);
    assert_eq!(done.counter("firewall.to_clients"), 1);
    assert_eq!(done.counter("drops.rule-reject"), 1);
    assert_eq!(done.counter("drops.spoofed-source"), 1);
    assert_eq!(done.counter("drops.bad-ipv4-checksum"), 1);
    assert_eq!(done.counter("pool.core_ring_full_drops"), 0);
    // Every buffer the firewall core dropped came back to the pool's owner.
    assert!(done.counter("pool.free") > 0);
}

#[test]
fn single_is_the_default_and_a_pipeline_needs_two_cpus() {
    let lab = Lab::start_on(QUBESDB, "", 2);
    assert_eq!(
        lab.layout_line,
        "dataplane: layout single (everything on cpu 0)"
    );
    lab.finish();

    // One CPU cannot run a pipeline: a clear error, not a guess.
    let boot = qemu_tests::Machine::new(qemu_tests::kernel())
        .append("layout=pipeline /qubes-ip=10.0.2.15 /qubes-gateway=10.0.2.2 /qubes-netvm-gateway=10.137.0.1")
        .nic(qemu_tests::NicBackend::Unconnected)
        .nic(qemu_tests::NicBackend::Unconnected)
        .run(Duration::from_secs(60));
    boot.expect(qemu_tests::Outcome::Failure);
    assert!(
        boot.console
            .contains("config error: layout=pipeline needs a second CPU"),
        "{}",
        boot.console
    );
}

/// `rtc` needs a queue pair of every NIC per core: with one CPU, or with
/// single-queue NICs (the lab's socket backends), a clear error.
#[test]
fn rtc_needs_two_cpus_and_multi_queue_nics() {
    for (cpus, want) in [
        (1, "config error: layout=rtc needs a second CPU"),
        (
            2,
            "config error: layout=rtc needs the same number (at least two) of queue pairs on every NIC",
        ),
    ] {
        let boot = qemu_tests::Machine::new(qemu_tests::kernel())
            .cpus(cpus)
            .append("layout=rtc /qubes-ip=10.0.2.15 /qubes-gateway=10.0.2.2 /qubes-netvm-gateway=10.137.0.1")
            .nic(qemu_tests::NicBackend::Unconnected)
            .nic(qemu_tests::NicBackend::Unconnected)
            .run(Duration::from_secs(60));
        boot.expect(qemu_tests::Outcome::Failure);
        assert!(boot.console.contains(want), "{}", boot.console);
    }
}
