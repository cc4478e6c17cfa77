//! `cargo xtask demo` (root): Portcullis as a firewall VM between a client
//! network and an upstream network, with real tools on both sides.
//!
//! It creates two network namespaces joined to the kernel's NICs by taps
//! (see `qemu_tests::netns`), boots the kernel with `config/demo.qubesdb`
//! (client 10.137.0.10 may use TCP/UDP 5201, DNS and ICMP; everything else
//! is rejected; the same over IPv6 for fd09:24ef:4179::a89:a), then shows
//! allowed traffic passing with NAT, blocked traffic refused,
//! upstream-initiated traffic dropped, IPv6 passing and blocked, and the
//! counters.
//! Everything it made is removed at the end, on error, and on Ctrl-C.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use qemu_tests::netns::{self, Names, Topology, CLIENT_GATEWAY, SERVER, SERVER6, UPLINK};
use qemu_tests::{RunningMachine, EXIT_SUCCESS};

const QUBESDB: &str = "config/demo.qubesdb";

fn step(title: &str) {
    println!("\n=== {title}");
}

fn show(out: &Output) {
    print!("{}", String::from_utf8_lossy(&out.stdout));
    print!("{}", String::from_utf8_lossy(&out.stderr));
}

/// Prints a command the way a person would type it, runs it, shows it.
fn run_shown(ns: &str, label: &str, mut cmd: Command) -> Output {
    println!("[{label}]$ {}", describe(&cmd, ns));
    let out = Topology::run({
        cmd.stdin(Stdio::null());
        cmd
    });
    show(&out);
    out
}

fn describe(cmd: &Command, ns: &str) -> String {
    let args: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().to_string())
        .collect();
    // Drop the "netns exec <ns>" prefix for readability.
    let args = match args.iter().position(|a| a == ns) {
        Some(i) => &args[i + 1..],
        None => &args[..],
    };
    args.join(" ")
}

pub fn run(args: &[String]) -> Result<(), String> {
    let o = crate::parse_options(
        args,
        crate::MachineOptions {
            nics: 2,
            cpus: 1,
            memory_mib: 64,
            accel: qemu_tests::Accel::Tcg,
            append: String::new(),
            runs: 1,
            qubesdb: None,
        },
    )?;
    if !netns::is_root() {
        return Err("the demo needs root: it creates network namespaces and tap devices".into());
    }
    crate::setup::run()?;
    let kernel = crate::build()?;
    let names = Names::new("demo");
    crate::clean_up_on_interrupt("demo", "demo")?;

    let topo = Topology::create("demo")?;
    let db = qemu_tests::workspace_root().join(QUBESDB);
    println!(
        "Portcullis demo: upstream namespace {} (gateway {}, server {SERVER}),",
        names.upstream_ns,
        netns::GATEWAY
    );
    println!(
        "client namespace {} (client {}, gateway {CLIENT_GATEWAY}); rules from {QUBESDB}.",
        names.client_ns,
        netns::CLIENT
    );

    step("boot Portcullis between them");
    let machine = topo
        .machine(&kernel, &db)
        .cpus(o.cpus)
        .memory_mib(o.memory_mib)
        .accel(o.accel)
        .append(&o.append);
    let mut vm = RunningMachine::spawn(&machine)?;
    let ready = vm
        .wait_for(Duration::from_secs(30), |l| {
            l.starts_with("portcullis: ready")
                || l.starts_with("FATAL")
                || l.starts_with("config error")
        })
        .ok_or("the kernel did not become ready")?;
    println!("{ready}");
    if !ready.starts_with("portcullis: ready") {
        return Err("the kernel refused to start".into());
    }
    topo.attach()?;

    let (up, cl) = (names.upstream_ns.as_str(), names.client_ns.as_str());
    let (mut server, server_lines) = topo.iperf_server(SERVER)?;
    // Let the firewall resolve the upstream gateway (it asks every second).
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if Topology::run(topo.in_client("ping", &["-c", "1", "-W", "1", SERVER]))
            .status
            .success()
        {
            break;
        }
    }

    let mut ok = true;
    step("allowed: the client pings its gateway (answered by Portcullis) and the server (ICMP is allowed)");
    ok &= run_shown(
        cl,
        "client",
        topo.in_client("ping", &["-c", "2", CLIENT_GATEWAY]),
    )
    .status
    .success();
    ok &= run_shown(cl, "client", topo.in_client("ping", &["-c", "2", SERVER]))
        .status
        .success();

    step("allowed: iperf3 TCP to the server's port 5201");
    ok &= run_shown(
        cl,
        "client",
        topo.in_client("iperf3", &["-c", SERVER, "-t", "3"]),
    )
    .status
    .success();
    step("allowed: iperf3 UDP to port 5201");
    ok &= run_shown(
        cl,
        "client",
        topo.in_client("iperf3", &["-c", SERVER, "-u", "-b", "20M", "-t", "2"]),
    )
    .status
    .success();

    step("NAT: the server saw the firewall's uplink address, not the client's");
    std::thread::sleep(Duration::from_millis(200));
    let seen: Vec<String> = server_lines
        .try_iter()
        .filter(|l| l.contains("Accepted connection"))
        .collect();
    for l in &seen {
        println!("[server] {l}");
    }
    ok &= !seen.is_empty() && seen.iter().all(|l| l.contains(UPLINK));

    step("blocked: TCP to port 22 is rejected (ICMP admin-prohibited: \"No route to host\")");
    let blocked = run_shown(
        cl,
        "client",
        topo.in_client(
            "timeout",
            &[
                "5",
                "bash",
                "-c",
                &format!("exec 3<>/dev/tcp/{SERVER}/22 && echo connected"),
            ],
        ),
    );
    ok &= !blocked.status.success();

    step("blocked: the upstream network cannot reach the client");
    let _ =
        Topology::run(topo.in_upstream("ip", &["route", "add", "10.137.0.0/24", "via", UPLINK]));
    let inbound = run_shown(
        up,
        "upstream",
        topo.in_upstream("ping", &["-c", "2", "-W", "1", netns::CLIENT]),
    );
    ok &= !inbound.status.success();

    step("IPv6 allowed: the client pings the server over IPv6 (masqueraded to the uplink's IPv6 address)");
    ok &= run_shown(
        cl,
        "client",
        topo.in_client("ping", &["-6", "-c", "2", "-W", "2", SERVER6]),
    )
    .status
    .success();
    step(
        "IPv6 blocked: TCP to port 22 is rejected (ICMPv6 admin-prohibited: \"Permission denied\")",
    );
    let blocked6 = run_shown(
        cl,
        "client",
        topo.in_client(
            "timeout",
            &[
                "5",
                "bash",
                "-c",
                &format!("exec 3<>/dev/tcp/{SERVER6}/22 && echo connected"),
            ],
        ),
    );
    ok &= !blocked6.status.success();

    step("Portcullis counters (console key 's')");
    vm.send_keys(b"s");
    while let Some(line) = vm.wait_for(Duration::from_secs(5), |l| l.starts_with("stats:")) {
        println!("{line}");
        if line.starts_with("stats: pool") {
            break;
        }
    }

    let _ = server.kill();
    let _ = server.wait();
    vm.send_keys(b"q");
    let (status, _) = vm.drain_until_exit(Instant::now() + Duration::from_secs(20));
    drop(topo);
    if status.and_then(|s| s.code()) != Some(EXIT_SUCCESS) {
        return Err("the kernel did not shut down cleanly".into());
    }
    if ok {
        println!("\ndemo: allowed traffic passed with NAT, blocked traffic was refused; everything cleaned up");
        Ok(())
    } else {
        Err("demo: some expectation failed (see above)".into())
    }
}
