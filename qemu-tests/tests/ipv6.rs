//! IPv6 through Portcullis with real Linux on both sides (root: namespaces
//! and taps): neighbour discovery with the client and the upstream
//! gateway, ping6 of the firewall and through it, TCP and UDP to an
//! allowed port with the client masqueraded behind the uplink address,
//! fragmented ping6 both ways, and a blocked port rejected with ICMPv6
//! admin-prohibited. Checks that traffic flows and what is blocked is
//! blocked; speed is for `bench`.

use std::time::{Duration, Instant};

use qemu_tests::lab::{quit, QUBESDB6};
use qemu_tests::netns::{Topology, CLIENT_GATEWAY6, SERVER6, UPLINK6};
use qemu_tests::{kernel, RunningMachine};

#[test]
fn ipv6_crosses_the_firewall_masqueraded_and_blocked_ports_are_rejected() {
    let topo =
        Topology::create(&format!("6{}", std::process::id() % 100_000)).expect("network topology");
    let dir = std::env::temp_dir().join(format!("portcullis-ipv6-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("qubesdb");
    std::fs::write(&db, QUBESDB6).unwrap();
    let mut vm = RunningMachine::spawn(&topo.machine(kernel(), &db)).expect("QEMU");
    let ready = vm
        .wait_for(Duration::from_secs(30), |l| {
            l.starts_with("portcullis: ready")
        })
        .expect("ready line");
    assert!(
        ready.contains("ipv6 2001:db8:1::15 gateway6 2001:db8:1::1"),
        "{ready}"
    );
    topo.attach().expect("taps into namespaces");

    let (mut server, server_lines) = topo.iperf_server(SERVER6).expect("iperf3 server");

    let deadline = Instant::now() + Duration::from_secs(20);
    let reachable = |target: &str| {
        while Instant::now() < deadline {
            let ping = topo.in_client("ping", &["-6", "-c", "1", "-W", "1", target]);
            if Topology::run(ping).status.success() {
                return true;
            }
        }
        false
    };
    assert!(
        reachable(CLIENT_GATEWAY6),
        "client cannot ping6 its gateway"
    );
    assert!(
        reachable(SERVER6),
        "client cannot ping6 the server through the firewall"
    );

    // A ping larger than the MTU: fragmented both ways, every fragment
    // following its first.
    let big =
        Topology::run(topo.in_client("ping", &["-6", "-c", "2", "-s", "4000", "-W", "2", SERVER6]));
    assert!(
        big.status.success(),
        "fragmented ping6 failed: {}",
        String::from_utf8_lossy(&big.stdout)
    );

    let tcp = Topology::run(topo.in_client("iperf3", &["-c", SERVER6, "-t", "2", "-J"]));
    assert!(
        tcp.status.success(),
        "iperf3 TCP over IPv6 failed: {}",
        String::from_utf8_lossy(&tcp.stdout)
    );
    let udp = Topology::run(topo.in_client(
        "iperf3",
        &["-c", SERVER6, "-u", "-b", "5M", "-t", "1", "-J"],
    ));
    assert!(
        udp.status.success(),
        "iperf3 UDP over IPv6 failed: {}",
        String::from_utf8_lossy(&udp.stdout)
    );

    // The server saw the firewall's uplink address: masquerade.
    let seen: Vec<String> = server_lines
        .try_iter()
        .filter(|l| l.contains("Accepted connection from"))
        .collect();
    assert!(
        !seen.is_empty() && seen.iter().all(|l| l.contains(UPLINK6)),
        "server saw: {seen:?}"
    );

    // A port the rules do not open: ICMPv6 admin-prohibited, which Linux
    // reports as "Permission denied".
    let blocked = Topology::run(topo.in_client(
        "timeout",
        &[
            "10",
            "bash",
            "-c",
            &format!("exec 3<>/dev/tcp/{SERVER6}/22"),
        ],
    ));
    assert!(!blocked.status.success(), "port 22 must be blocked");
    let err = String::from_utf8_lossy(&blocked.stderr);
    assert!(
        err.contains("Permission denied"),
        "expected a reject, got: {err}"
    );

    let _ = server.kill();
    let _ = server.wait();
    let done = quit(&mut vm);
    let (n, console) = (|k: &str| done.counter(k), &done.console);
    assert!(n("drops.rule-reject") >= 1, "{console}");
    assert!(n("firewall.nd_adverts") >= 1, "{console}");
    assert!(n("firewall.nd_solicits_sent") >= 1, "{console}");
    assert!(n("firewall.to_upstream") > 100, "{console}");
    // The iperf3 transfers' packets after each flow's first take the fast
    // path (this test sends only IPv6 through the firewall).
    assert!(
        n("firewall.fast_path") > 100,
        "IPv6 flows took the fast path: {console}"
    );
    assert!(
        n("rules.fd09:24ef:4179::a89:a.0000") >= 1,
        "the TCP rule counted its flows: {console}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
