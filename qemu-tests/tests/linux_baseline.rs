//! The Linux firewall VM that `cargo xtask bench` measures Portcullis
//! against (`qemu_tests::linux_fw`): booted between the same namespaces,
//! it must forward and refuse what Portcullis does with
//! `config/demo.qubesdb`, or the comparison would not be like for like.
//! Needs root (namespaces, taps) and, the first time, the Debian mirrors.

use std::time::{Duration, Instant};

use qemu_tests::linux_fw::LinuxFirewall;
use qemu_tests::netns::{Topology, CLIENT, CLIENT_GATEWAY, SERVER, UPLINK};
use qemu_tests::RunningMachine;

#[test]
fn the_linux_baseline_forwards_and_refuses_what_portcullis_does() {
    let fw = LinuxFirewall::ensure().unwrap_or_else(|e| panic!("{e}"));
    let topo =
        Topology::create(&format!("l{}", std::process::id() % 100_000)).expect("network topology");
    let dir = std::env::temp_dir().join(format!("portcullis-linux-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let unused = dir.join("qubesdb");
    std::fs::write(&unused, "").unwrap();
    let machine = fw.machine(topo.machine(&fw.kernel, &unused));
    let started = Instant::now();
    let mut vm = RunningMachine::spawn(&machine).expect("QEMU");
    topo.wait_opened(vm.pid(), Duration::from_secs(10))
        .and_then(|()| topo.attach())
        .expect("taps into namespaces");
    let mut console = Vec::new();
    let ready = vm
        .wait_for(Duration::from_secs(120), |l| {
            console.push(l.to_string());
            l.starts_with("linux-fw: ready")
        })
        .unwrap_or_else(|| panic!("no ready line from the Linux VM: {console:#?}"));
    println!("{ready} after {:?}", started.elapsed());
    let failed: Vec<&String> = console.iter().filter(|l| l.contains("failed")).collect();
    assert!(failed.is_empty(), "{console:#?}");
    let used: u64 = ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix("mem_used_kib="))
        .and_then(|v| v.parse().ok())
        .expect("memory in the ready line");
    assert!(used > 1024, "{ready}");

    let ok = |cmd| Topology::run(cmd).status.success();
    // Allowed: ICMP to the gateway (the VM itself) and through it.
    assert!(ok(
        topo.in_client("ping", &["-c", "1", "-W", "5", CLIENT_GATEWAY])
    ));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok(topo.in_client("ping", &["-c", "1", "-W", "1", SERVER])) {
        assert!(Instant::now() < deadline, "the server is not reachable");
    }
    // Allowed, masqueraded: TCP 5201 reaches the server from the uplink
    // address.
    let (mut server, lines) = topo.iperf_server(SERVER).expect("iperf3 server");
    assert!(ok(
        topo.in_client("iperf3", &["-c", SERVER, "-t", "1", "-C", "cubic"])
    ));
    std::thread::sleep(Duration::from_millis(200));
    let seen: Vec<String> = lines
        .try_iter()
        .filter(|l| l.contains("Accepted connection"))
        .collect();
    assert!(
        !seen.is_empty() && seen.iter().all(|l| l.contains(UPLINK)),
        "{seen:?}"
    );
    let _ = server.kill();
    // Refused: TCP 22 gets admin-prohibited ("No route to host") at once.
    let blocked = Topology::run(topo.in_client(
        "timeout",
        &[
            "5",
            "bash",
            "-c",
            &format!("exec 3<>/dev/tcp/{SERVER}/22 2>&1 || true"),
        ],
    ));
    let text = String::from_utf8_lossy(&blocked.stdout).to_string()
        + &String::from_utf8_lossy(&blocked.stderr);
    assert!(text.contains("No route to host"), "{text}");
    // Dropped: the upstream side cannot reach the client.
    let _ =
        Topology::run(topo.in_upstream("ip", &["route", "add", "10.137.0.0/24", "via", UPLINK]));
    assert!(!ok(
        topo.in_upstream("ping", &["-c", "2", "-W", "1", CLIENT])
    ));
    // Dropped: a spoofed source (the client's tap with another address).
    let n = &topo.names;
    let _ = Topology::run(topo.in_client(
        "ip",
        &["addr", "add", "10.137.0.99/32", "dev", &n.client_tap],
    ));
    assert!(!ok(topo.in_client(
        "ping",
        &["-c", "2", "-W", "1", "-I", "10.137.0.99", SERVER]
    )));
    vm.send_keys(b"c\n");
    let mut counters = Vec::new();
    while let Some(l) = vm.wait_for(Duration::from_secs(5), |l| l.starts_with("linux-fw: ")) {
        if l.contains("counter") {
            counters.push(l);
        }
        if counters.len() == 5 {
            break;
        }
    }
    println!("{counters:#?}");
    // The anti-spoofing rule counted the spoofed pings.
    assert!(
        counters
            .iter()
            .any(|l| l.contains("ip saddr != 10.137.0.10") && !l.contains("packets 0 ")),
        "{counters:#?}"
    );
    vm.send_keys(b"q\n");
    let (status, _) = vm.drain_until_exit(Instant::now() + Duration::from_secs(20));
    assert!(status.is_some(), "the VM did not power off");
    let _ = std::fs::remove_dir_all(&dir);
}
