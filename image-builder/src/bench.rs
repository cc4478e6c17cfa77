//! `cargo xtask bench`: measurements that print numbers, never pass/fail.
//!
//! `bench boot` boots the kernel repeatedly and times, from the moment QEMU
//! is started, the kernel's first console line and QEMU's exit. `bench
//! netstack` runs the firewall stage's criterion benchmarks on the host.

use std::time::{Duration, Instant};

use qemu_tests::{Accel, Machine, RunningMachine};

use crate::{parse_options, MachineOptions};

/// The boot-time goal from the foundation issue.
const BOOT_GOAL: Duration = Duration::from_millis(300);

pub fn run(args: &[String]) -> Result<(), String> {
    match args.first().map(String::as_str) {
        Some("boot") => boot(&args[1..]),
        Some("netstack") => netstack(&args[1..]),
        Some("rings") => crate::check(
            crate::cargo().args(["bench", "--package", "drivers", "--bench", "rings", "--"]).args(&args[1..]),
        ),
        _ => Err("usage: cargo xtask bench boot [--runs N] [--accel tcg|kvm] | bench netstack | bench rings [criterion args]".into()),
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
