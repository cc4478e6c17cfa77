//! Real traffic from real tools: a Linux client namespace reaches an iperf3
//! server upstream through Portcullis (TCP and UDP), and a blocked port is
//! refused. Checks only that data flows and what is blocked is blocked —
//! speed is for `cargo xtask bench`. Needs root (namespaces, taps).

use std::time::{Duration, Instant};

use qemu_tests::lab::{quit, QUBESDB};
use qemu_tests::netns::{Topology, CLIENT_GATEWAY, SERVER, UPLINK};
use qemu_tests::{kernel, RunningMachine};

fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("iperf3 JSON: {e}\n{}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn iperf3_tcp_and_udp_cross_the_firewall_and_blocked_ports_are_refused() {
    run_through_firewall("s", 1, "", 1);
}

#[test]
fn iperf3_crosses_the_pipeline_layout_on_two_cpus() {
    run_through_firewall("p", 2, "layout=pipeline", 1);
}

/// Multi-queue taps and `queues=2`: both NICs get two queue pairs (the
/// control queue's VQ_PAIRS_SET accepted by QEMU), the host spreads new
/// flows over both receive queues, and frames from either are forwarded
/// (the parallel streams below would stall otherwise).
#[test]
fn iperf3_crosses_two_queue_pairs() {
    run_through_firewall("q", 1, "queues=2", 2);
}

/// The `rtc` layout on two CPUs: each owns one queue pair of both NICs and
/// a firewall of its own; frames that arrive on the core that does not own
/// their flow are handed over, and everything above still holds.
#[test]
fn iperf3_crosses_the_rtc_layout_on_two_cpus() {
    run_through_firewall("r", 2, "layout=rtc", 2);
}

/// The two runs take the machine's CPUs (QEMU, polling vCPUs, iperf3):
/// one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn run_through_firewall(tag: &str, cpus: u32, cmdline: &str, queues: u16) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let topo =
        Topology::create_with_queues(&format!("{tag}{}", std::process::id() % 100_000), queues)
            .expect("network topology");
    let dir = std::env::temp_dir().join(format!("portcullis-iperf-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("qubesdb");
    std::fs::write(&db, QUBESDB).unwrap();
    let machine = topo.machine(kernel(), &db).cpus(cpus).append(cmdline);
    let mut vm = RunningMachine::spawn(&machine).expect("QEMU");
    let mut nic_lines = Vec::new();
    vm.wait_for(Duration::from_secs(30), |l| {
        if l.starts_with("nic ") {
            nic_lines.push(l.to_string());
        }
        l.starts_with("portcullis: ready")
    })
    .expect("ready line");
    // Both NICs, every queue notified through its own doorbell (found from
    // the device's notification capability), none through the transport.
    let bells = format!(
        "{0} of {0} queues rung through their own doorbell",
        2 * queues
    );
    assert_eq!(
        nic_lines.iter().filter(|l| l.ends_with(&bells)).count(),
        2,
        "{nic_lines:?}"
    );
    topo.attach().expect("taps into namespaces");

    let (mut server, server_lines) = topo.iperf_server(SERVER).expect("iperf3 server");

    // The client reaches its gateway, then (once the firewall has resolved
    // the upstream gateway) the server.
    let deadline = Instant::now() + Duration::from_secs(20);
    let reachable = |target: &str| {
        while Instant::now() < deadline {
            let out = Topology::run(topo.in_client("ping", &["-c", "1", "-W", "1", target]));
            if out.status.success() {
                return true;
            }
        }
        false
    };
    assert!(reachable(CLIENT_GATEWAY), "client cannot ping its gateway");
    assert!(
        reachable(SERVER),
        "client cannot ping the server through the firewall"
    );

    // A ping larger than the MTU: fragmented both ways, every fragment
    // following its first.
    let big = Topology::run(topo.in_client("ping", &["-c", "2", "-s", "4000", "-W", "2", SERVER]));
    assert!(
        big.status.success(),
        "fragmented ping failed: {}",
        String::from_utf8_lossy(&big.stdout)
    );

    // Parallel streams: with several queue pairs, distinct flows.
    let streams = (queues * 4).to_string();
    let tcp =
        Topology::run(topo.in_client("iperf3", &["-c", SERVER, "-t", "2", "-P", &streams, "-J"]));
    assert!(
        tcp.status.success(),
        "iperf3 TCP failed: {}",
        String::from_utf8_lossy(&tcp.stdout)
    );
    let received = json(&tcp)["end"]["sum_received"]["bytes"]
        .as_u64()
        .unwrap_or(0);
    assert!(received > 0, "no TCP data arrived");

    let udp = Topology::run(topo.in_client(
        "iperf3",
        &[
            "-c", SERVER, "-u", "-b", "10M", "-t", "2", "-P", &streams, "-J",
        ],
    ));
    assert!(
        udp.status.success(),
        "iperf3 UDP failed: {}",
        String::from_utf8_lossy(&udp.stdout)
    );
    let sum = &json(&udp)["end"]["sum"];
    let (packets, lost) = (
        sum["packets"].as_u64().unwrap_or(0),
        sum["lost_packets"].as_u64().unwrap_or(u64::MAX),
    );
    assert!(
        packets > 0 && lost < packets,
        "UDP: {packets} sent, {lost} lost"
    );

    // The server saw the firewall's address, not the client's: NAT.
    let seen: Vec<String> = server_lines
        .try_iter()
        .filter(|l| l.contains("Accepted connection from"))
        .collect();
    assert!(
        !seen.is_empty() && seen.iter().all(|l| l.contains(UPLINK)),
        "server saw: {seen:?}"
    );

    // A port the rules do not allow: refused at once with ICMP
    // admin-prohibited, which Linux reports as "No route to host".
    let blocked = Topology::run(topo.in_client(
        "timeout",
        &["10", "bash", "-c", &format!("exec 3<>/dev/tcp/{SERVER}/22")],
    ));
    assert!(!blocked.status.success(), "port 22 must be blocked");
    let err = String::from_utf8_lossy(&blocked.stderr);
    assert!(
        err.contains("No route to host"),
        "expected a reject, got: {err}"
    );

    let _ = server.kill();
    let _ = server.wait();
    let done = quit(&mut vm);
    assert!(done.counter("drops.rule-reject") >= 1, "{}", done.console);
    assert!(
        done.counter("firewall.to_upstream") > 100,
        "{}",
        done.console
    );
    if queues > 1 {
        // Both NICs: the pairs asked for, which QEMU's device offers.
        let pairs = format!("{queues} queue pairs (asked {queues}, the device offers {queues});");
        assert_eq!(
            nic_lines.iter().filter(|l| l.contains(&pairs)).count(),
            2,
            "{nic_lines:?}"
        );
        // The client's new flows reached the firewall on both receive
        // queues of the downlink.
        let per_queue: Vec<u64> = done
            .console
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("stats: nic1 rx_queues="))
            .unwrap_or_else(|| panic!("no rx_queues line: {}", done.console))
            .split(',')
            .map(|n| n.trim().parse().unwrap())
            .collect();
        assert_eq!(per_queue.len(), usize::from(queues), "{per_queue:?}");
        assert!(per_queue.iter().all(|n| *n > 0), "{per_queue:?}");
        println!("downlink frames per receive queue: {per_queue:?}");
    }
    if cmdline.contains("layout=rtc") {
        // Every core took frames from its own queues; what one handed
        // over, another took (at least the gateway's ARP reply, copied to
        // every core); no hand-off ring overflowed.
        let core = |cpu: usize, k: &str| done.counter(&format!("core{cpu}.{k}"));
        let sum = |k: &str| core(0, k) + core(1, k);
        let lines: Vec<&str> = done
            .console
            .lines()
            .filter(|l| l.starts_with("stats: core"))
            .collect();
        println!("{}", lines.join("\n"));
        assert!(
            core(0, "packets") > 0 && core(1, "packets") > 0,
            "{lines:?}"
        );
        let handed = sum("handed_off");
        assert!(handed > 0 && handed == sum("taken_over"), "{lines:?}");
        assert!(sum("flows") > 0, "{lines:?}");
        assert_eq!(done.counter("pool.core_ring_full_drops"), 0);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
