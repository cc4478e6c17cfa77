//! `cargo xtask bench` (root): Portcullis against a Linux firewall VM, side
//! by side, the way the Qubes community measures firewall VMs — iperf3 and
//! ping between a client namespace and an upstream namespace through the
//! VM — plus the machine's limit: Portcullis with `firewall=off`, which
//! only rewrites Ethernet addresses.
//!
//! The three VMs boot in the same QEMU, with the same NIC model
//! (`virtio-net-pci` on taps, QEMU's user-space backend) and the same
//! topology (`qemu_tests::netns`), interleaved: every round boots each VM
//! once per CPU count and runs every test on it. Results: a table of
//! medians (min-max) and of the ratios to Linux, computed round by round;
//! the raw samples as CSV and JSON and an SVG chart under `target/bench/`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use qemu_tests::linux_fw::LinuxFirewall;
use qemu_tests::netns::{self, Topology, SERVER, UPLINK};
use qemu_tests::{Accel, Machine, RunningMachine};

/// The firewall VMs, in the order every round boots them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Vm {
    Linux,
    Portcullis,
    /// Portcullis with `layout=pipeline` (NICs on one CPU, the firewall on
    /// another): measured with 2 CPUs or more.
    Pipeline,
    /// Portcullis with `layout=rtc` (each CPU owns a queue pair of both
    /// NICs, on multi-queue taps): measured with 2 CPUs or more.
    Rtc,
    Limit,
}

impl Vm {
    const ALL: [Vm; 5] = [Vm::Linux, Vm::Portcullis, Vm::Pipeline, Vm::Rtc, Vm::Limit];
    /// The columns after Linux's, with a ratio to Linux each.
    const OURS: [Vm; 4] = [Vm::Portcullis, Vm::Pipeline, Vm::Rtc, Vm::Limit];

    fn needs_two_cpus(self) -> bool {
        matches!(self, Vm::Pipeline | Vm::Rtc)
    }

    fn name(self) -> &'static str {
        match self {
            Vm::Linux => "linux",
            Vm::Portcullis => "portcullis",
            Vm::Pipeline => "pipeline",
            Vm::Rtc => "rtc",
            Vm::Limit => "limit",
        }
    }
}

/// One metric of the table.
struct Metric {
    key: &'static str,
    label: &'static str,
    unit: &'static str,
}

const METRICS: &[Metric] = &[
    Metric {
        key: "tcp",
        label: "TCP client->server",
        unit: "Mbit/s",
    },
    Metric {
        key: "tcp_reverse",
        label: "TCP server->client (-R)",
        unit: "Mbit/s",
    },
    Metric {
        key: "udp1470_best",
        label: "UDP 1470 B, best rate <1% loss",
        unit: "Mbit/s",
    },
    Metric {
        key: "udp64_best",
        label: "UDP 64 B frames, best rate <1% loss",
        unit: "pps",
    },
    Metric {
        key: "udp64_fixed",
        label: "UDP 64 B frames at the fixed rate",
        unit: "pps",
    },
    Metric {
        key: "udp64_fixed_loss",
        label: "  loss at the fixed rate",
        unit: "%",
    },
    Metric {
        key: "ping_idle_min",
        label: "ping, idle (min)",
        unit: "ms",
    },
    Metric {
        key: "ping_idle_avg",
        label: "ping, idle (avg)",
        unit: "ms",
    },
    Metric {
        key: "ping_idle_p99",
        label: "ping, idle (p99)",
        unit: "ms",
    },
    Metric {
        key: "ping_load_min",
        label: "ping under TCP load (min)",
        unit: "ms",
    },
    Metric {
        key: "ping_load_avg",
        label: "ping under TCP load (avg)",
        unit: "ms",
    },
    Metric {
        key: "ping_load_p99",
        label: "ping under TCP load (p99)",
        unit: "ms",
    },
    Metric {
        key: "boot_ready",
        label: "boot: QEMU start -> ready line",
        unit: "ms",
    },
    Metric {
        key: "boot_forward",
        label: "boot: QEMU start -> first forwarded ping",
        unit: "ms",
    },
    Metric {
        key: "gen64",
        label: "kernel generator, 64 B frames (tap rx)",
        unit: "pps",
    },
    Metric {
        key: "gen1514",
        label: "kernel generator, 1514 B frames (tap rx)",
        unit: "Mbit/s",
    },
    Metric {
        key: "memory",
        label: "memory (see below)",
        unit: "MiB",
    },
];

/// How long each test runs and which rates it offers.
struct Plan {
    rounds: usize,
    cpus: Vec<u32>,
    accel: Accel,
    tcp_s: u32,
    udp_s: u32,
    /// Offered rates for full-size UDP, Mbit/s.
    udp1470_rates: Vec<u32>,
    /// Offered rates for 64-byte frames, packets/s.
    udp64_rates: Vec<u32>,
    /// The fixed offered rate near this machine's limit, packets/s.
    udp64_fixed: u32,
    pings: u32,
    /// Memory sizes tried for Portcullis's smallest, MiB.
    memory_steps: Vec<u32>,
}

impl Plan {
    fn full() -> Self {
        Self {
            rounds: 3,
            cpus: vec![1, 2],
            accel: Accel::Tcg,
            tcp_s: 5,
            udp_s: 3,
            udp1470_rates: vec![100, 250, 500, 1000, 2000],
            udp64_rates: vec![10_000, 20_000, 35_000, 50_000, 70_000],
            udp64_fixed: 50_000,
            pings: 100,
            memory_steps: vec![9, 10, 12, 16, 24, 32],
        }
    }

    fn quick() -> Self {
        Self {
            rounds: 1,
            cpus: vec![1, 2],
            accel: Accel::Tcg,
            tcp_s: 2,
            udp_s: 1,
            udp1470_rates: vec![100, 500],
            udp64_rates: vec![10_000, 50_000],
            udp64_fixed: 50_000,
            pings: 30,
            memory_steps: vec![9, 12, 16],
        }
    }
}

/// One measured value.
#[derive(Debug, Clone)]
struct Sample {
    round: usize,
    cpus: u32,
    vm: Vm,
    metric: &'static str,
    value: f64,
}

const USAGE: &str =
    "usage: cargo xtask bench [--quick] [--rounds N] [--cpus 1,2] [--accel tcg|kvm]";

fn parse(args: &[String]) -> Result<Plan, String> {
    let quick = args.iter().any(|a| a == "--quick");
    let mut plan = if quick { Plan::quick() } else { Plan::full() };
    let mut it = args.iter().filter(|a| *a != "--quick");
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--rounds" => {
                plan.rounds = value
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("--rounds: '{value}' is not a positive number"))?
            }
            "--cpus" => {
                plan.cpus = value
                    .split(',')
                    .map(|c| c.parse().ok().filter(|n| *n > 0))
                    .collect::<Option<Vec<u32>>>()
                    .ok_or_else(|| format!("--cpus: '{value}' is not a list like 1,2"))?
            }
            "--accel" => plan.accel = value.parse()?,
            other => return Err(format!("unknown option '{other}'\n{USAGE}")),
        }
    }
    Ok(plan)
}

pub fn run(args: &[String]) -> Result<(), String> {
    let plan = parse(args)?;
    if !netns::is_root() {
        return Err("cargo xtask bench needs root: it creates network namespaces and taps".into());
    }
    crate::setup::run()?;
    let kernel = crate::build()?;
    println!("bench: preparing the Linux baseline VM");
    let linux = LinuxFirewall::ensure()?;
    crate::clean_up_on_interrupt("bench", "bench")?;

    let started = Instant::now();
    let mut samples: Vec<Sample> = Vec::new();
    for round in 1..=plan.rounds {
        for &cpus in &plan.cpus {
            for vm in Vm::ALL {
                if vm.needs_two_cpus() && cpus < 2 {
                    continue;
                }
                println!(
                    "bench: round {round}/{}, {cpus} cpu(s), {} ({:.0} s so far)",
                    plan.rounds,
                    vm.name(),
                    started.elapsed().as_secs_f64()
                );
                let session = Session {
                    plan: &plan,
                    kernel: &kernel,
                    linux: &linux,
                    vm,
                    cpus,
                    memory_mib: None,
                };
                match session.measure() {
                    Ok(values) => {
                        for (metric, value) in values {
                            samples.push(Sample {
                                round,
                                cpus,
                                vm,
                                metric,
                                value,
                            });
                        }
                    }
                    Err(e) => println!("bench:   {} failed: {e}", vm.name()),
                }
            }
        }
        // The kernel's traffic generator: what Portcullis's transmit path
        // alone gets into the host's tap.
        let cpus = plan.cpus[0];
        for (len, metric) in [(60u32, "gen64"), (1514, "gen1514")] {
            println!(
                "bench: round {round}/{}, {cpus} cpu(s), generator {len} B",
                plan.rounds
            );
            let session = Session {
                plan: &plan,
                kernel: &kernel,
                linux: &linux,
                vm: Vm::Portcullis,
                cpus,
                memory_mib: None,
            };
            match session.generate(len) {
                Ok(pps) => {
                    let value = if len == 60 {
                        pps
                    } else {
                        pps * f64::from(len) * 8.0 / 1e6
                    };
                    println!("bench:   {metric}={value:.0}");
                    samples.push(Sample {
                        round,
                        cpus,
                        vm: Vm::Portcullis,
                        metric,
                        value,
                    });
                }
                Err(e) => println!("bench:   generator failed: {e}"),
            }
        }
    }
    // Memory: Linux reports what it uses of its 256 MiB; Portcullis's is the
    // smallest -m at which it still forwards at its full rate.
    let memory = smallest_memory(&plan, &kernel, &samples);
    for &cpus in &plan.cpus {
        let linux_used: Vec<f64> = samples
            .iter()
            .filter(|s| s.vm == Vm::Linux && s.cpus == cpus && s.metric == "mem_used")
            .map(|s| s.value)
            .collect();
        for (round, used) in linux_used.iter().enumerate() {
            samples.push(Sample {
                round: round + 1,
                cpus,
                vm: Vm::Linux,
                metric: "memory",
                value: *used,
            });
            if let Some(m) = memory {
                for vm in Vm::OURS {
                    samples.push(Sample {
                        round: round + 1,
                        cpus,
                        vm,
                        metric: "memory",
                        value: f64::from(m),
                    });
                }
            }
        }
    }
    let report = report(&plan, &samples, memory);
    println!("\n{report}");
    let dir = qemu_tests::workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("versus.txt"), &report).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("versus.csv"), csv(&samples)).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("versus.json"), json(&plan, &samples)).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("versus.svg"), svg(&plan, &samples)).map_err(|e| e.to_string())?;
    println!(
        "bench: {:.0} s; table, CSV, JSON and chart in {}/versus.{{txt,csv,json,svg}}",
        started.elapsed().as_secs_f64(),
        dir.display()
    );
    Ok(())
}

/// One VM booted once, and every test run on it.
struct Session<'a> {
    plan: &'a Plan,
    kernel: &'a Path,
    linux: &'a LinuxFirewall,
    vm: Vm,
    cpus: u32,
    /// For Portcullis: `-m` (64 when `None`).
    memory_mib: Option<u32>,
}

/// Kills a process when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn iperf(topo: &Topology, args: &[&str], seconds: u32) -> Result<serde_json::Value, String> {
    let t = seconds.to_string();
    let mut all = vec!["--connect-timeout", "3000", "-c", SERVER, "-J", "-t", &t];
    all.extend_from_slice(args);
    let mut cmd = topo.in_client("timeout", &[&(seconds + 20).to_string(), "iperf3"]);
    cmd.args(&all);
    let out = Topology::run(cmd);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("iperf3 {}: no JSON ({e})", args.join(" ")))?;
    if let Some(err) = v["error"].as_str() {
        return Err(format!("iperf3 {}: {err}", args.join(" ")));
    }
    Ok(v)
}

/// Received packets per second and loss in % of an iperf3 UDP run.
fn udp_result(v: &serde_json::Value) -> Option<(f64, f64)> {
    let sum = &v["end"]["sum"];
    let packets = sum["packets"].as_f64()?;
    let lost = sum["lost_packets"].as_f64()?;
    let seconds = sum["seconds"].as_f64().filter(|s| *s > 0.0)?;
    let loss = if packets > 0.0 {
        100.0 * lost / packets
    } else {
        100.0
    };
    Some(((packets - lost).max(0.0) / seconds, loss))
}

/// Round-trip times in ms of `count` pings 20 ms apart to `target`.
fn ping_times(topo: &Topology, target: &str, count: u32) -> Vec<f64> {
    let out = Topology::run(topo.in_client(
        "ping",
        &["-c", &count.to_string(), "-i", "0.02", "-W", "1", target],
    ));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse().ok())
        .collect()
}

/// Minimum, average and 99th percentile.
fn min_avg_p99(mut t: Vec<f64>) -> Option<(f64, f64, f64)> {
    if t.is_empty() {
        return None;
    }
    t.sort_by(f64::total_cmp);
    let avg = t.iter().sum::<f64>() / t.len() as f64;
    let i = ((t.len() as f64 * 0.99).ceil() as usize).clamp(1, t.len()) - 1;
    Some((t[0], avg, t[i]))
}

impl Session<'_> {
    fn machine(&self, topo: &Topology, db: &Path) -> Machine {
        let m = topo
            .machine(self.kernel, db)
            .cpus(self.cpus)
            .accel(self.plan.accel);
        match self.vm {
            Vm::Linux => self.linux.machine(m),
            Vm::Portcullis => m.memory_mib(self.memory_mib.unwrap_or(64)),
            Vm::Pipeline => m
                .memory_mib(self.memory_mib.unwrap_or(64))
                .append("layout=pipeline"),
            Vm::Rtc => m
                .memory_mib(self.memory_mib.unwrap_or(64))
                .append("layout=rtc"),
            Vm::Limit => m
                .memory_mib(self.memory_mib.unwrap_or(64))
                .append("firewall=off"),
        }
    }

    /// Boots the VM and runs every test: (metric, value) pairs.
    fn measure(&self) -> Result<Vec<(&'static str, f64)>, String> {
        // `rtc` needs a queue pair per CPU: multi-queue taps.
        let queues = if self.vm == Vm::Rtc {
            self.cpus as u16
        } else {
            1
        };
        let topo = Topology::create_with_queues("bench", queues)?;
        let db = qemu_tests::workspace_root().join("config/demo.qubesdb");
        let machine = self.machine(&topo, &db);
        let t0 = Instant::now();
        let mut vm = RunningMachine::spawn(&machine)?;
        let ready_prefix = match self.vm {
            Vm::Linux => "linux-fw: ready",
            _ => "portcullis: ready",
        };
        // The taps are attached while the console is watched, so that the
        // ready line is timed when it comes.
        let pid = vm.pid();
        let (ready, attached) = std::thread::scope(|scope| {
            let attach = scope.spawn(|| {
                topo.wait_opened(pid, Duration::from_secs(10))?;
                topo.attach()?;
                // Without NAT (the limit), replies need a route to the
                // clients.
                let _ = Topology::run(
                    topo.in_upstream("ip", &["route", "add", "10.137.0.0/24", "via", UPLINK]),
                );
                Ok::<(), String>(())
            });
            let ready = vm
                .wait_for(Duration::from_secs(120), |l| {
                    l.starts_with(ready_prefix) || l.starts_with("FATAL") || l.contains("failed")
                })
                .map(|l| (l, t0.elapsed()));
            let attached = attach
                .join()
                .unwrap_or_else(|_| Err("attaching the taps panicked".into()));
            (ready, attached)
        });
        attached?;
        let (ready, boot_ready) = ready.ok_or("no ready line")?;
        if !ready.starts_with(ready_prefix) {
            return Err(ready);
        }
        // The first ping through the firewall, tried every 10 ms.
        let first = Topology::run(
            topo.in_client("ping", &["-c", "1", "-i", "0.01", "-w", "30", "-q", SERVER]),
        );
        let boot_forward = t0.elapsed();
        if !first.status.success() {
            return Err("no ping crossed the firewall in 30 s".into());
        }
        let mut out = vec![
            ("boot_ready", boot_ready.as_secs_f64() * 1000.0),
            ("boot_forward", boot_forward.as_secs_f64() * 1000.0),
        ];
        if let Some(used) = ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix("mem_used_kib="))
            .and_then(|v| v.parse::<f64>().ok())
        {
            out.push(("mem_used", used / 1024.0));
        }
        let _server = Reaped(topo.iperf_server(SERVER)?.0);
        std::thread::sleep(Duration::from_millis(300));
        let p = self.plan;
        if let Some((min, avg, p99)) = min_avg_p99(ping_times(&topo, SERVER, p.pings)) {
            out.push(("ping_idle_min", min));
            out.push(("ping_idle_avg", avg));
            out.push(("ping_idle_p99", p99));
        }
        let tcp = |extra: &[&str]| -> Result<f64, String> {
            let mut args = vec!["-C", "cubic"];
            args.extend_from_slice(extra);
            let v = iperf(&topo, &args, p.tcp_s)?;
            v["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .map(|b| b / 1e6)
                .ok_or_else(|| "iperf3 TCP: no result".into())
        };
        out.push(("tcp", tcp(&[])?));
        out.push(("tcp_reverse", tcp(&["-R"])?));
        // Ping under load: while a TCP transfer runs.
        let load = {
            let mut cmd = topo.in_client(
                "iperf3",
                &[
                    "-c",
                    SERVER,
                    "-t",
                    &(p.tcp_s + 2).to_string(),
                    "-C",
                    "cubic",
                ],
            );
            Reaped(
                cmd.stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .map_err(|e| e.to_string())?,
            )
        };
        std::thread::sleep(Duration::from_millis(500));
        let loaded = ping_times(&topo, SERVER, p.pings.min(p.tcp_s * 40));
        drop(load);
        if let Some((min, avg, p99)) = min_avg_p99(loaded) {
            out.push(("ping_load_min", min));
            out.push(("ping_load_avg", avg));
            out.push(("ping_load_p99", p99));
        }
        std::thread::sleep(Duration::from_millis(500));
        // UDP: the best offered rate forwarded with < 1 % loss.
        let mut best1470 = 0.0f64;
        for &rate in &p.udp1470_rates {
            let v = iperf(
                &topo,
                &["-u", "-l", "1470", "-b", &format!("{rate}M")],
                p.udp_s,
            )?;
            if let Some((pps, loss)) = udp_result(&v) {
                println!("bench:   UDP 1470 B offered {rate} Mbit/s: {:.0} Mbit/s received, {loss:.2} % lost", pps * 1470.0 * 8.0 / 1e6);
                if loss < 1.0 {
                    best1470 = best1470.max(pps * 1470.0 * 8.0 / 1e6);
                }
            }
        }
        out.push(("udp1470_best", best1470));
        // 64-byte frames: 18 bytes of UDP payload (+8 UDP, 20 IP, 14
        // Ethernet, 4 FCS); iperf3 counts payload bits.
        let udp64 = |pps: u32| -> Result<(f64, f64), String> {
            let v = iperf(
                &topo,
                &[
                    "-u",
                    "-l",
                    "18",
                    "-b",
                    &format!("{}", u64::from(pps) * 18 * 8),
                ],
                p.udp_s,
            )?;
            udp_result(&v).ok_or_else(|| "iperf3 UDP: no result".into())
        };
        let mut best64 = 0.0f64;
        for &rate in &p.udp64_rates {
            let (pps, loss) = udp64(rate)?;
            println!(
                "bench:   UDP 64 B offered {rate} pps: {pps:.0} pps received, {loss:.2} % lost"
            );
            if loss < 1.0 {
                best64 = best64.max(pps);
            }
        }
        out.push(("udp64_best", best64));
        let (pps, loss) = udp64(p.udp64_fixed)?;
        println!(
            "bench:   UDP 64 B at the fixed {} pps: {pps:.0} pps received, {loss:.2} % lost",
            p.udp64_fixed
        );
        out.push(("udp64_fixed", pps));
        out.push(("udp64_fixed_loss", loss));
        // Portcullis's own view: cycles per packet on each core.
        match self.vm {
            Vm::Linux => vm.send_keys(b"q\n"),
            _ => {
                vm.send_keys(b"q");
                let (_, console) = vm.drain_until_exit(Instant::now() + Duration::from_secs(20));
                for l in console.lines().filter(|l| l.starts_with("stats: core")) {
                    println!("bench:   {l}");
                    // The boot CPU's (in the pipeline, the NICs' core).
                    if let Some(c) = l
                        .strip_prefix("stats: core0 ")
                        .unwrap_or("")
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix("cycles_per_packet="))
                        .and_then(|v| v.parse::<f64>().ok())
                    {
                        out.push(("cycles_per_packet", c));
                    }
                }
            }
        }
        let brief: Vec<String> = out.iter().map(|(k, v)| format!("{k}={v:.1}")).collect();
        println!("bench:   {}", brief.join(" "));
        Ok(out)
    }

    /// Boots Portcullis with `generate=len` and counts, over `udp_s`
    /// seconds, the frames its uplink's tap receives: packets/s.
    fn generate(&self, len: u32) -> Result<f64, String> {
        let topo = Topology::create("bench")?;
        let db = qemu_tests::workspace_root().join("config/demo.qubesdb");
        let m = self.machine(&topo, &db).append(&format!("generate={len}"));
        let mut vm = RunningMachine::spawn(&m)?;
        topo.wait_opened(vm.pid(), Duration::from_secs(10))?;
        topo.attach()?;
        vm.wait_for(Duration::from_secs(30), |l| {
            l.starts_with("portcullis: ready") || l.starts_with("FATAL")
        })
        .filter(|l| l.starts_with("portcullis: ready"))
        .ok_or("no ready line")?;
        let n = &topo.names;
        let counter = || -> Option<u64> {
            let out = Topology::run(topo.in_upstream(
                "cat",
                &[&format!(
                    "/sys/class/net/{}/statistics/rx_packets",
                    n.upstream_tap
                )],
            ));
            String::from_utf8_lossy(&out.stdout).trim().parse().ok()
        };
        // Running once the gateway (the upstream namespace) answered ARP.
        let deadline = Instant::now() + Duration::from_secs(10);
        while counter().unwrap_or(0) < 1000 {
            if Instant::now() > deadline {
                return Err("the generator did not start".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let (c0, t0) = (counter().ok_or("tap counter")?, Instant::now());
        std::thread::sleep(Duration::from_secs(u64::from(self.plan.udp_s)));
        let (c1, t1) = (counter().ok_or("tap counter")?, Instant::now());
        vm.send_keys(b"q");
        let (_, console) = vm.drain_until_exit(Instant::now() + Duration::from_secs(20));
        for l in console
            .lines()
            .filter(|l| l.starts_with("stats: generator") || l.starts_with("stats: nic0"))
        {
            println!("bench:   {l}");
        }
        Ok(c1.saturating_sub(c0) as f64 / (t1 - t0).as_secs_f64())
    }

    /// A short TCP run only, for the memory search: Mbit/s, or `None` if
    /// the VM did not come up and forward.
    fn tcp_only(&self) -> Option<f64> {
        let topo = Topology::create("bench").ok()?;
        let db = qemu_tests::workspace_root().join("config/demo.qubesdb");
        let vm = RunningMachine::spawn(&self.machine(&topo, &db)).ok()?;
        topo.wait_opened(vm.pid(), Duration::from_secs(10)).ok()?;
        topo.attach().ok()?;
        vm.wait_for(Duration::from_secs(30), |l| {
            l.starts_with("portcullis: ready") || l.starts_with("FATAL")
        })
        .filter(|l| l.starts_with("portcullis: ready"))?;
        let up = Topology::run(
            topo.in_client("ping", &["-c", "1", "-i", "0.01", "-w", "10", "-q", SERVER]),
        );
        if !up.status.success() {
            return None;
        }
        let _server = Reaped(topo.iperf_server(SERVER).ok()?.0);
        std::thread::sleep(Duration::from_millis(300));
        let v = iperf(&topo, &["-C", "cubic"], self.plan.tcp_s).ok()?;
        v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .map(|b| b / 1e6)
    }
}

/// Portcullis's smallest memory (MiB) at which it forwards TCP at >= 90 %
/// of its median rate at 64 MiB in this run (1 CPU).
fn smallest_memory(plan: &Plan, kernel: &Path, samples: &[Sample]) -> Option<u32> {
    let mut full: Vec<f64> = samples
        .iter()
        .filter(|s| s.vm == Vm::Portcullis && s.metric == "tcp" && s.cpus == plan.cpus[0])
        .map(|s| s.value)
        .collect();
    let full = median(&mut full)?;
    println!(
        "bench: memory: the smallest -m at which Portcullis forwards >= 90 % of {full:.0} Mbit/s"
    );
    let linux = LinuxFirewall {
        kernel: PathBuf::new(),
        initrd: PathBuf::new(),
    };
    for &m in &plan.memory_steps {
        let s = Session {
            plan,
            kernel,
            linux: &linux,
            vm: Vm::Portcullis,
            cpus: plan.cpus[0],
            memory_mib: Some(m),
        };
        let got = s.tcp_only();
        println!(
            "bench:   -m {m}: {}",
            got.map_or("does not forward".to_string(), |g| format!("{g:.0} Mbit/s"))
        );
        if got.is_some_and(|g| g >= 0.9 * full) {
            return Some(m);
        }
    }
    None
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Values of one metric for one VM and CPU count, by round.
fn values(samples: &[Sample], vm: Vm, cpus: u32, metric: &str) -> BTreeMap<usize, f64> {
    samples
        .iter()
        .filter(|s| s.vm == vm && s.cpus == cpus && s.metric == metric)
        .map(|s| (s.round, s.value))
        .collect()
}

/// Median, min and max.
fn spread(v: &BTreeMap<usize, f64>) -> Option<(f64, f64, f64)> {
    let mut all: Vec<f64> = v.values().copied().collect();
    let med = median(&mut all)?;
    Some((med, all[0], all[all.len() - 1]))
}

/// The median over rounds of `vm / linux`, from the rounds that have both.
fn ratio(samples: &[Sample], vm: Vm, cpus: u32, metric: &str) -> Option<f64> {
    let ours = values(samples, vm, cpus, metric);
    let base = values(samples, Vm::Linux, cpus, metric);
    let mut r: Vec<f64> = ours
        .iter()
        .filter_map(|(round, v)| {
            let b = base.get(round)?;
            (*b > 0.0).then(|| v / b)
        })
        .collect();
    median(&mut r)
}

fn fmt_value(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn report(plan: &Plan, samples: &[Sample], memory: Option<u32>) -> String {
    let mut r = String::new();
    let _ = writeln!(
        r,
        "bench: Portcullis vs a Linux firewall VM (Debian kernel + nftables, 256 MiB) and the \
         limit (Portcullis, firewall=off)"
    );
    let _ = writeln!(
        r,
        "QEMU {:?}, virtio-net-pci on taps, {} round(s), median (min-max); ratios are the median \
         of each round's VM / Linux",
        plan.accel, plan.rounds
    );
    for &cpus in &plan.cpus {
        let _ = writeln!(r, "\n{cpus} CPU(s):");
        // The pipeline layout needs a second CPU.
        let shown: Vec<Vm> = Vm::ALL
            .into_iter()
            .filter(|vm| !vm.needs_two_cpus() || cpus >= 2)
            .collect();
        let mut head = format!("{:<42} {:>24}", "metric", "Linux");
        for vm in shown.iter().skip(1) {
            let _ = write!(head, " {:>24}", vm.name());
        }
        for vm in shown.iter().skip(1) {
            let _ = write!(
                head,
                " {:>9}",
                format!("{}/L", vm.name().get(..4).unwrap_or(vm.name()))
            );
        }
        let _ = writeln!(r, "{head}");
        for m in METRICS {
            let cell = |vm: Vm| {
                spread(&values(samples, vm, cpus, m.key)).map_or(
                    "-".to_string(),
                    |(med, lo, hi)| {
                        if (hi - lo).abs() < f64::EPSILON {
                            format!("{} {}", fmt_value(med), m.unit)
                        } else {
                            format!(
                                "{} ({}-{}) {}",
                                fmt_value(med),
                                fmt_value(lo),
                                fmt_value(hi),
                                m.unit
                            )
                        }
                    },
                )
            };
            let rat = |vm: Vm| {
                ratio(samples, vm, cpus, m.key).map_or("-".to_string(), |x| format!("{x:.2}x"))
            };
            let mut line = format!("{:<42} {:>24}", m.label, cell(Vm::Linux));
            for vm in shown.iter().skip(1) {
                let _ = write!(line, " {:>24}", cell(*vm));
            }
            for vm in shown.iter().skip(1) {
                let _ = write!(line, " {:>9}", rat(*vm));
            }
            let _ = writeln!(r, "{}", line.trim_end());
        }
        for vm in Vm::OURS {
            if let Some((med, lo, hi)) = spread(&values(samples, vm, cpus, "cycles_per_packet")) {
                let _ = writeln!(
                    r,
                    "{} cycles per packet on cpu 0 (kernel counters, busy cycles / packets): \
                     {med:.0} ({lo:.0}-{hi:.0})",
                    vm.name()
                );
            }
        }
    }
    let _ = writeln!(
        r,
        "\nmemory: Linux = MemTotal - MemAvailable of its 256 MiB after boot; Portcullis = the \
         smallest -m (of {:?} MiB) forwarding TCP at >= 90 % of its 64 MiB rate: {}",
        plan.memory_steps,
        memory.map_or("none of them".to_string(), |m| format!("{m} MiB"))
    );
    let _ = writeln!(r, "\ngoals (issue 7), from the ratios above:");
    for &cpus in &plan.cpus {
        let goal = |metric: &str, want: f64, higher: bool| {
            let got = ratio(samples, Vm::Portcullis, cpus, metric);
            let met = got.is_some_and(|g| if higher { g >= want } else { g <= want });
            format!(
                "{} (want {}{want}x, got {}) -> {}",
                metric,
                if higher { ">=" } else { "<=" },
                got.map_or("-".into(), |g| format!("{g:.2}x")),
                if met { "met" } else { "NOT met" }
            )
        };
        let _ = writeln!(r, "  {cpus} CPU(s): {}", goal("tcp", 4.0, true));
        let _ = writeln!(r, "  {cpus} CPU(s): {}", goal("udp64_fixed", 4.3, true));
        let _ = writeln!(r, "  {cpus} CPU(s): {}", goal("boot_ready", 0.01, false));
    }
    let _ = writeln!(
        r,
        "  memory <= 16 MiB: {}",
        match memory {
            Some(m) if m <= 16 => format!("{m} MiB -> met"),
            Some(m) => format!("{m} MiB -> NOT met"),
            None => "not measured -> NOT met".into(),
        }
    );
    r
}

fn csv(samples: &[Sample]) -> String {
    let mut s = String::from("round,cpus,vm,metric,value\n");
    for x in samples {
        let _ = writeln!(
            s,
            "{},{},{},{},{}",
            x.round,
            x.cpus,
            x.vm.name(),
            x.metric,
            x.value
        );
    }
    s
}

fn json(plan: &Plan, samples: &[Sample]) -> String {
    let rows: Vec<serde_json::Value> = samples
        .iter()
        .map(|x| {
            serde_json::json!({
                "round": x.round, "cpus": x.cpus, "vm": x.vm.name(),
                "metric": x.metric, "value": x.value
            })
        })
        .collect();
    let v = serde_json::json!({
        "rounds": plan.rounds,
        "cpus": plan.cpus,
        "accel": format!("{:?}", plan.accel),
        "samples": rows,
    });
    serde_json::to_string_pretty(&v).unwrap_or_default()
}

/// Bar charts of TCP throughput and 64-byte packet rate per VM and CPU
/// count (medians).
fn svg(plan: &Plan, samples: &[Sample]) -> String {
    let panels = [
        ("tcp", "TCP client->server, Mbit/s"),
        ("tcp_reverse", "TCP server->client, Mbit/s"),
        ("udp64_fixed", "64-byte frames at the fixed rate, packets/s"),
    ];
    let colors = [
        (Vm::Linux, "#888888"),
        (Vm::Portcullis, "#2a6fdb"),
        (Vm::Pipeline, "#6a4fc0"),
        (Vm::Rtc, "#2ab0a0"),
        (Vm::Limit, "#b0c8f0"),
    ];
    let (pw, ph) = (360.0, 260.0);
    let width = pw * panels.len() as f64 + 20.0;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n",
        ph + 60.0
    );
    let _ = writeln!(
        s,
        "<text x=\"10\" y=\"20\" font-size=\"14\">Portcullis vs Linux firewall VM (and the \
         limit), medians of {} round(s)</text>",
        plan.rounds
    );
    for (i, (metric, title)) in panels.iter().enumerate() {
        let x0 = 10.0 + pw * i as f64;
        let y0 = 40.0;
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\">{title}</text>",
            x0 + 10.0,
            y0 + 12.0
        );
        let meds: Vec<(u32, Vm, f64)> = plan
            .cpus
            .iter()
            .flat_map(|&c| {
                Vm::ALL.iter().map(move |&vm| {
                    let v = spread(&values(samples, vm, c, metric)).map_or(0.0, |x| x.0);
                    (c, vm, v)
                })
            })
            .collect();
        let max = meds.iter().map(|m| m.2).fold(0.0, f64::max).max(1.0);
        let base = y0 + ph - 20.0;
        let bar = (pw - 40.0) / meds.len() as f64;
        for (j, (cpus, vm, v)) in meds.iter().enumerate() {
            let h = (ph - 60.0) * v / max;
            let x = x0 + 20.0 + bar * j as f64 + (j / Vm::ALL.len()) as f64 * 6.0;
            let color = colors.iter().find(|c| c.0 == *vm).map_or("#000", |c| c.1);
            let _ = writeln!(
                s,
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{color}\"/>",
                base - h,
                bar - 4.0
            );
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"9\" text-anchor=\"middle\">{}</text>",
                x + (bar - 4.0) / 2.0,
                base - h - 3.0,
                fmt_value(*v)
            );
            if j % Vm::ALL.len() == 1 {
                let _ = writeln!(
                    s,
                    "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{cpus} CPU</text>",
                    x + (bar - 4.0) / 2.0,
                    base + 15.0
                );
            }
        }
    }
    for (k, (vm, color)) in colors.iter().enumerate() {
        let x = 20.0 + 130.0 * k as f64;
        let y = ph + 45.0;
        let _ = writeln!(
            s,
            "<rect x=\"{x}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{color}\"/>\
             <text x=\"{}\" y=\"{y}\">{}</text>",
            y - 10.0,
            x + 16.0,
            vm.name()
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(round: usize, vm: Vm, metric: &'static str, value: f64) -> Sample {
        Sample {
            round,
            cpus: 1,
            vm,
            metric,
            value,
        }
    }

    #[test]
    fn ratios_pair_the_same_rounds_and_take_the_median() {
        let s = vec![
            sample(1, Vm::Linux, "tcp", 100.0),
            sample(1, Vm::Portcullis, "tcp", 400.0),
            sample(2, Vm::Linux, "tcp", 200.0),
            sample(2, Vm::Portcullis, "tcp", 300.0),
            sample(3, Vm::Linux, "tcp", 100.0),
            sample(3, Vm::Portcullis, "tcp", 250.0),
            // A round without its Linux sample is left out.
            sample(4, Vm::Portcullis, "tcp", 10_000.0),
        ];
        assert_eq!(ratio(&s, Vm::Portcullis, 1, "tcp"), Some(2.5));
        assert_eq!(ratio(&s, Vm::Limit, 1, "tcp"), None);
        assert_eq!(
            spread(&values(&s, Vm::Linux, 1, "tcp")),
            Some((100.0, 100.0, 200.0))
        );
    }

    #[test]
    fn udp_results_and_percentiles() {
        let v = serde_json::json!({"end": {"sum": {"packets": 1000.0, "lost_packets": 10.0, "seconds": 2.0}}});
        assert_eq!(udp_result(&v), Some((495.0, 1.0)));
        assert_eq!(udp_result(&serde_json::json!({})), None);
        let t: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(min_avg_p99(t), Some((1.0, 50.5, 99.0)));
        assert_eq!(min_avg_p99(vec![]), None);
    }

    #[test]
    fn options() {
        assert_eq!(parse(&[]).unwrap().rounds, 3);
        let q = parse(&["--quick".into(), "--cpus".into(), "1".into()]).unwrap();
        assert_eq!((q.rounds, q.cpus.clone()), (1, vec![1]));
        assert!(parse(&["--rounds".into(), "0".into()]).is_err());
        assert!(parse(&["--bogus".into(), "1".into()]).is_err());
    }

    #[test]
    fn the_report_says_where_goals_are_not_met() {
        let mut plan = Plan::quick();
        plan.cpus = vec![1];
        let s = vec![
            sample(1, Vm::Linux, "tcp", 1000.0),
            sample(1, Vm::Portcullis, "tcp", 2000.0),
            sample(1, Vm::Linux, "boot_ready", 10_000.0),
            sample(1, Vm::Portcullis, "boot_ready", 50.0),
        ];
        let r = report(&plan, &s, Some(12));
        assert!(r.contains("tcp (want >=4x, got 2.00x) -> NOT met"), "{r}");
        assert!(
            r.contains("boot_ready (want <=0.01x, got 0.01x) -> met"),
            "{r}"
        );
        assert!(r.contains("12 MiB -> met"), "{r}");
        assert!(svg(&plan, &s).starts_with("<svg"));
        assert!(csv(&s).lines().count() == 5);
    }
}
