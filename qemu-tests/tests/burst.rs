//! A burst of numbered frames of several flows through every layout: each
//! allowed frame comes out exactly once, every flow in order, what must be
//! dropped is dropped, and the counters add up (frames received = frames
//! forwarded + frames dropped by reason + the one ARP reply consumed).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use qemu_tests::lab::*;

const FLOWS: u16 = 3;
const PER_FLOW: u16 = 100;

fn burst(cmdline: &str, cpus: u32) {
    let lab = Lab::start_on(QUBESDB, cmdline, cpus);
    let mut blocked = 0u64;
    let mut spoofed = 0u64;
    for seq in 0..PER_FLOW {
        for flow in 0..FLOWS {
            let mut payload = vec![flow as u8];
            payload.extend_from_slice(&seq.to_be_bytes());
            payload.extend_from_slice(b"burst");
            lab.downlink.send(&udp(
                (CLIENT_MAC, DOWNLINK_MAC),
                CLIENT_IP,
                SERVER_IP,
                64,
                (41000 + flow, 5201),
                &payload,
            ));
        }
        if seq % 10 == 0 {
            // A blocked port (rejected) and a spoofed source (dropped).
            lab.downlink.send(&udp(
                (CLIENT_MAC, DOWNLINK_MAC),
                CLIENT_IP,
                SERVER_IP,
                64,
                (42000, 22),
                b"no",
            ));
            lab.downlink.send(&udp(
                (CLIENT_MAC, DOWNLINK_MAC),
                [10, 137, 0, 99],
                SERVER_IP,
                64,
                (42001, 5201),
                b"spoof",
            ));
            blocked += 1;
            spoofed += 1;
        }
    }
    let expected = u64::from(FLOWS) * u64::from(PER_FLOW);
    let mut seen: BTreeMap<u8, Vec<u16>> = BTreeMap::new();
    let mut got = 0u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while got < expected {
        let left = deadline
            .checked_duration_since(Instant::now())
            .unwrap_or_else(|| panic!("only {got} of {expected} frames came out: {seen:?}"));
        let Some(f) = lab.uplink.recv(left) else {
            panic!("only {got} of {expected} frames came out");
        };
        let f = Frame::parse(&f);
        let Some(ip) = f.ipv4.as_ref() else { continue };
        if ip.dport != 5201 {
            continue;
        }
        assert_eq!(ip.src, UPLINK_IP, "translated");
        let data = &ip.l4[8..];
        assert!(data.ends_with(b"burst"), "only allowed frames come out");
        seen.entry(data[0])
            .or_default()
            .push(u16::from_be_bytes([data[1], data[2]]));
        got += 1;
    }
    assert!(
        lab.uplink.recv(Duration::from_millis(300)).is_none(),
        "nothing more comes out"
    );
    for flow in 0..FLOWS as u8 {
        let want: Vec<u16> = (0..PER_FLOW).collect();
        assert_eq!(
            seen.get(&flow),
            Some(&want),
            "flow {flow}: every frame once, in order"
        );
    }
    let done = lab.finish();
    let c = |k: &str| done.counter(k);
    let sent = expected + blocked + spoofed;
    assert_eq!(c("nic1.rx_packets"), sent, "{}", done.console);
    assert_eq!(c("firewall.to_upstream"), expected);
    assert_eq!(c("drops.rule-reject"), blocked);
    assert_eq!(c("drops.spoofed-source"), spoofed);
    assert_eq!(c("firewall.flows_created"), u64::from(FLOWS));
    let received = c("nic0.rx_packets") + c("nic1.rx_packets");
    assert_eq!(
        received,
        c("firewall.to_upstream") + c("firewall.to_clients") + c("drops.total") + 1,
        "every frame forwarded or dropped by reason (+1: the gateway's ARP reply)"
    );
    assert_eq!(c("pool.core_ring_full_drops"), 0);
    // Each core counted what it took in.
    assert_eq!(c("core0.packets"), received);
    if cmdline.contains("pipeline") {
        assert_eq!(c("core1.packets"), received, "{}", done.console);
    }
}

#[test]
fn burst_single_on_one_cpu() {
    burst("", 1);
}

#[test]
fn burst_single_on_four_cpus() {
    burst("", 4);
}

#[test]
fn burst_pipeline_on_two_cpus() {
    burst("layout=pipeline", 2);
}
