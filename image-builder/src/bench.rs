//! `cargo xtask bench`: measurements that print numbers, never pass/fail.
//!
//! `bench` alone (root) is Portcullis against a Linux firewall VM (see
//! `versus`).
//! `bench boot` boots the kernel repeatedly and times, from the moment QEMU
//! is started, the kernel's first console line and QEMU's exit. `bench
//! netstack` runs the firewall stage's criterion benchmarks on the host.
//! `bench idle` (root) compares the polling loop's idle modes between two
//! namespaces: QEMU's CPU use while no packet flows, ping latency, and
//! iperf3 TCP throughput.

use std::time::{Duration, Instant};

use qemu_tests::{Accel, Machine, RunningMachine};

use crate::{parse_options, MachineOptions};

/// The boot-time goal from the foundation issue.
const BOOT_GOAL: Duration = Duration::from_millis(300);

pub fn run(args: &[String]) -> Result<(), String> {
    match args.first().map(String::as_str) {
        None => crate::versus::run(args),
        Some(a) if a.starts_with("--") => crate::versus::run(args),
        Some("boot") => boot(&args[1..]),
        Some("netstack") => netstack(&args[1..]),
        Some("idle") => idle(&args[1..]),
        Some("rings") => crate::check(
            crate::cargo().args(["bench", "--package", "drivers", "--bench", "rings", "--"]).args(&args[1..]),
        ),
        _ => Err("usage: cargo xtask bench [--quick] [--rounds N] [--cpus 1,2] | bench boot [--runs N] [--accel tcg|kvm] | bench netstack | bench rings [criterion args] | bench idle [--runs N]".into()),
    }
}

/// The firewall stage on the host: criterion benchmarks of `netstack`.
fn netstack(args: &[String]) -> Result<(), String> {
    crate::check(
        crate::cargo()
            .args([
                "bench",
                "--package",
                "netstack",
                "--bench",
                "firewall",
                "--",
            ])
            .args(args),
    )
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2
    }
}

fn boot(args: &[String]) -> Result<(), String> {
    let o = parse_options(
        args,
        MachineOptions {
            nics: 0,
            cpus: 1,
            memory_mib: 64,
            accel: Accel::Tcg,
            append: String::new(),
            runs: 10,
            qubesdb: None,
        },
    )?;
    crate::setup::run()?;
    let kernel = crate::build()?;
    let machine = Machine::new(kernel)
        .cpus(o.cpus)
        .memory_mib(o.memory_mib)
        .accel(o.accel);
    let mut first_line = Vec::new();
    let mut exit = Vec::new();
    for i in 0..o.runs {
        let start = Instant::now();
        let mut m = RunningMachine::spawn(&machine)?;
        m.wait_for(Duration::from_secs(30), |_| true)
            .ok_or(format!("run {i}: no console line in 30 s"))?;
        first_line.push(start.elapsed());
        let status = m.wait_until(start + Duration::from_secs(30));
        if status.and_then(|s| s.code()) != Some(qemu_tests::EXIT_SUCCESS) {
            return Err(format!(
                "run {i}: the kernel did not exit with success ({status:?})"
            ));
        }
        exit.push(start.elapsed());
    }
    let accel = format!("{:?}", o.accel).to_lowercase();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let report = |name: &str, v: &mut Vec<Duration>| {
        let med = median(v);
        println!(
            "{name:<28} median {:7.1} ms   min {:7.1} ms   max {:7.1} ms",
            ms(med),
            ms(v[0]),
            ms(v[v.len() - 1])
        );
        med
    };
    println!(
        "bench boot: {} runs, {accel}, q35, {} MiB, {} CPU(s)",
        o.runs, o.memory_mib, o.cpus
    );
    let med = report("start -> first console line", &mut first_line);
    report("start -> kernel exit", &mut exit);
    println!(
        "goal: first line under {:.0} ms -> median is {:.2}x the goal ({})",
        ms(BOOT_GOAL),
        med.as_secs_f64() / BOOT_GOAL.as_secs_f64(),
        if med < BOOT_GOAL { "met" } else { "not met" }
    );
    Ok(())
}

/// CPU time (user + system) QEMU process `pid` has used, in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which is in parentheses).
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// One idle mode's measurements.
struct IdleRun {
    idle_cpu: f64,
    ping_ms: f64,
    tcp_mbits: f64,
}

fn idle_run(kernel: &std::path::Path, append: &str) -> Result<IdleRun, String> {
    use qemu_tests::netns::{Topology, CLIENT_GATEWAY, SERVER};
    let topo = Topology::create("idle")?;
    let db = qemu_tests::workspace_root().join("config/demo.qubesdb");
    let mut vm = RunningMachine::spawn(&topo.machine(kernel, &db).append(append))?;
    vm.wait_for(Duration::from_secs(30), |l| {
        l.starts_with("portcullis: ready")
    })
    .ok_or("the kernel did not become ready")?;
    topo.attach()?;
    let (mut server, _) = topo.iperf_server(SERVER)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !Topology::run(topo.in_client("ping", &["-c", "1", "-W", "1", SERVER]))
        .status
        .success()
    {
        if Instant::now() > deadline {
            return Err("the server is not reachable through the firewall".into());
        }
    }
    // Idle: nothing flows for 3 s.
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_seconds(vm.pid()).ok_or("QEMU's CPU time")?;
    std::thread::sleep(Duration::from_secs(3));
    let idle_cpu = (cpu_seconds(vm.pid()).ok_or("QEMU's CPU time")? - before) / 3.0;
    // Latency: 20 pings of the client's gateway (answered by Portcullis).
    let ping =
        Topology::run(topo.in_client("ping", &["-c", "20", "-i", "0.05", "-q", CLIENT_GATEWAY]));
    let text = String::from_utf8_lossy(&ping.stdout);
    let ping_ms = text
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .and_then(|l| l.split('=').nth(1))
        .and_then(|v| v.trim().split('/').nth(1))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("ping output: {text}"))?;
    let tcp =
        Topology::run(topo.in_client("iperf3", &["-c", SERVER, "-t", "3", "-C", "cubic", "-J"]));
    let json: serde_json::Value =
        serde_json::from_slice(&tcp.stdout).map_err(|e| format!("iperf3 JSON: {e}"))?;
    let tcp_mbits = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e6;
    let _ = server.kill();
    let _ = server.wait();
    vm.send_keys(b"q");
    let _ = vm.drain_until_exit(Instant::now() + Duration::from_secs(20));
    Ok(IdleRun {
        idle_cpu,
        ping_ms,
        tcp_mbits,
    })
}

/// `idle=poll` against `idle=halt` (woken every 100 µs and every 1 ms),
/// interleaved, `runs` rounds.
fn idle(args: &[String]) -> Result<(), String> {
    let o = parse_options(
        args,
        MachineOptions {
            nics: 2,
            cpus: 1,
            memory_mib: 64,
            accel: Accel::Tcg,
            append: String::new(),
            runs: 3,
            qubesdb: None,
        },
    )?;
    if !qemu_tests::netns::is_root() {
        return Err("bench idle needs root: it creates network namespaces and tap devices".into());
    }
    crate::setup::run()?;
    let kernel = crate::build()?;
    crate::clean_up_on_interrupt("bench idle", "idle")?;
    let modes = ["idle=poll", "idle=halt", "idle=halt idle-wake-us=1000"];
    let mut results: Vec<Vec<IdleRun>> = modes.iter().map(|_| Vec::new()).collect();
    for round in 0..o.runs {
        for (i, mode) in modes.iter().enumerate() {
            println!("bench idle: round {} of {}, {mode}", round + 1, o.runs);
            results[i].push(idle_run(&kernel, mode)?);
        }
    }
    let mid = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    println!(
        "\nbench idle: TCG, 1 vCPU, {} round(s) each, median (min-max)",
        o.runs
    );
    println!(
        "{:<30} {:>22} {:>22} {:>24}",
        "mode", "QEMU CPU while idle", "ping gateway (avg)", "iperf3 TCP"
    );
    for (mode, runs) in modes.iter().zip(results) {
        let cpu = mid(runs.iter().map(|r| r.idle_cpu * 100.0).collect());
        let ping = mid(runs.iter().map(|r| r.ping_ms).collect());
        let tcp = mid(runs.iter().map(|r| r.tcp_mbits).collect());
        println!(
            "{mode:<30} {:>6.0} % ({:>3.0}-{:>3.0})   {:>6.3} ms ({:.3}-{:.3})   {:>6.0} Mbit/s ({:.0}-{:.0})",
            cpu.0, cpu.1, cpu.2, ping.0, ping.1, ping.2, tcp.0, tcp.1, tcp.2
        );
    }
    Ok(())
}
