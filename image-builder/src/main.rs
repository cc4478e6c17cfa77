//! `cargo xtask`: the host-side front door of Portcullis.
//!
//! It installs what a machine lacks (`setup`), builds the kernel ELF
//! (`build`), boots it in QEMU with its console on stdout (`run`), runs every
//! test (`test`) and lint (`lint`), and measures (`bench`). Each command that
//! needs QEMU or the bare-metal Rust target runs `setup` first. The QEMU
//! command line itself lives in the `qemu-tests` crate, so what `run` boots
//! is what the tests boot.

#![forbid(unsafe_code)]

mod bench;
mod demo;
mod fuzz;
mod setup;
mod versus;

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use qemu_tests::{Accel, Machine, NicBackend, EXIT_FAILURE, EXIT_SUCCESS};

const USAGE: &str = "\
usage: cargo xtask <command> [options]

commands:
  setup              install what is missing (QEMU >= 10, the Rust target)
  build              build the kernel ELF (target/x86_64-unknown-none/release/portcullis)
  demo [--cpus N] [--memory MIB] [--accel tcg|kvm] [--append STR]
                     (root) the main job: Portcullis between a client and an upstream
                     network namespace; allowed traffic passes with NAT, blocked is refused
  run [options]      boot the kernel in QEMU, console on stdout (keys: s = counters, q = quit)
      --nics N         virtio-net NICs (default 2; the first is the uplink)
      --cpus N         CPUs (default 1)
      --memory MIB     memory in MiB (default 64)
      --accel tcg|kvm  CPU emulation (default tcg; kvm on hosts with real KVM)
      --append STR     kernel command line
      --qubesdb FILE   QubesDB snapshot (default config/demo.qubesdb; none: no snapshot)
  test               every test: host unit tests, then QEMU boot tests
  lint               rustfmt check and clippy (host crates and the kernel target)
  fuzz [--seconds N] [TARGET...]
                     run the netstack fuzz targets (nightly + cargo-fuzz), N seconds each
                     (default 30), growing the corpus in netstack/fuzz/corpus
  bench [--quick] [--rounds N] [--cpus 1,2] [--accel tcg|kvm]
                     (root) Portcullis vs a Linux firewall VM and the limit (firewall=off),
                     interleaved: iperf3 TCP/UDP, 64-byte packet rate, ping, boot, memory;
                     table with ratios, CSV/JSON/SVG in target/bench/ (--quick: 1 round, short)
  bench boot [--runs N] [--accel tcg|kvm]
                     time from QEMU start to the kernel's first console line
  bench netstack [criterion args]
                     the firewall stage per packet on the host (ns/packet, Mpps)
  bench rings [criterion args]
                     core-to-core handle rings: our SPSC ring vs crossbeam's ArrayQueue
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup::run().map(|()| ExitCode::SUCCESS),
        Some("build") => setup::run().and_then(|()| build()).map(|p| {
            println!("kernel: {}", p.display());
            ExitCode::SUCCESS
        }),
        Some("run") => run(&args[1..]),
        Some("demo") => demo::run(&args[1..]).map(|()| ExitCode::SUCCESS),
        Some("fuzz") => fuzz::run(&args[1..]).map(|()| ExitCode::SUCCESS),
        Some("test") => test(),
        Some("lint") => lint().map(|()| ExitCode::SUCCESS),
        Some("bench") => bench::run(&args[1..]).map(|()| ExitCode::SUCCESS),
        Some("help" | "--help" | "-h") => {
            print!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        _ => Err(format!("unknown or missing command\n\n{USAGE}")),
    };
    result.unwrap_or_else(|e| {
        eprintln!("xtask: {e}");
        ExitCode::FAILURE
    })
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(qemu_tests::workspace_root());
    c
}

fn check(cmd: &mut Command) -> Result<(), String> {
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed: {status}"))
    }
}

fn build() -> Result<PathBuf, String> {
    qemu_tests::build_kernel()
}

/// On Ctrl-C, removes the namespaces and taps of topology `tag` (killing
/// what runs in them) and exits with 130; `what` names the command.
pub fn clean_up_on_interrupt(what: &'static str, tag: &str) -> Result<(), String> {
    let names = qemu_tests::netns::Names::new(tag);
    ctrlc::set_handler(move || {
        eprintln!("\nxtask {what}: interrupted; cleaning up");
        qemu_tests::netns::cleanup(&names);
        std::process::exit(130);
    })
    .map_err(|e| format!("cannot install the Ctrl-C handler: {e}"))
}

/// Options shared by `run` and `bench`.
pub struct MachineOptions {
    pub nics: usize,
    pub cpus: u32,
    pub memory_mib: u32,
    pub accel: Accel,
    pub append: String,
    pub runs: usize,
    pub qubesdb: Option<PathBuf>,
}

pub fn parse_options(args: &[String], defaults: MachineOptions) -> Result<MachineOptions, String> {
    let mut o = defaults;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        let number = |v: String| {
            v.parse::<u32>()
                .map_err(|_| format!("{flag}: '{v}' is not a number"))
        };
        match flag.as_str() {
            "--nics" => o.nics = number(value()?)? as usize,
            "--cpus" => o.cpus = number(value()?)?,
            "--memory" => o.memory_mib = number(value()?)?,
            "--accel" => o.accel = value()?.parse()?,
            "--append" => o.append = value()?,
            "--runs" => o.runs = number(value()?)? as usize,
            "--qubesdb" => {
                let v = value()?;
                o.qubesdb = (v != "none").then(|| PathBuf::from(v));
            }
            other => return Err(format!("unknown option '{other}'\n\n{USAGE}")),
        }
    }
    if o.cpus == 0 || o.memory_mib < 4 || o.runs == 0 {
        return Err("--cpus and --runs must be at least 1, --memory at least 4".into());
    }
    Ok(o)
}

fn run(args: &[String]) -> Result<ExitCode, String> {
    let o = parse_options(
        args,
        MachineOptions {
            nics: 2,
            cpus: 1,
            memory_mib: 64,
            accel: Accel::Tcg,
            append: String::new(),
            runs: 1,
            qubesdb: Some(qemu_tests::workspace_root().join("config/demo.qubesdb")),
        },
    )?;
    setup::run()?;
    let kernel = build()?;
    let mut m = Machine::new(kernel)
        .cpus(o.cpus)
        .memory_mib(o.memory_mib)
        .accel(o.accel)
        .append(&o.append);
    for _ in 0..o.nics {
        m = m.nic(NicBackend::Unconnected);
    }
    if let Some(db) = &o.qubesdb {
        m = m.qubesdb(db);
    }
    eprintln!("xtask: qemu-system-x86_64 {}", m.args().join(" "));
    let status = m
        .command()
        .status()
        .map_err(|e| format!("cannot start QEMU: {e}"))?;
    Ok(match status.code() {
        Some(EXIT_SUCCESS) => ExitCode::SUCCESS,
        Some(EXIT_FAILURE) => {
            eprintln!("xtask: the kernel reported failure");
            ExitCode::FAILURE
        }
        other => {
            eprintln!("xtask: QEMU ended without the kernel's exit ({other:?})");
            ExitCode::from(2)
        }
    })
}

fn test() -> Result<ExitCode, String> {
    setup::run()?;
    let kernel = build()?;
    println!(
        "xtask: host unit tests and QEMU boot tests (kernel {})",
        kernel.display()
    );
    check(cargo().env("PORTCULLIS_KERNEL", &kernel).args([
        "test",
        "--workspace",
        "--exclude",
        "kernel",
    ]))?;
    println!("xtask: kernel library tests (host)");
    check(cargo().args(["test", "--package", "kernel", "--lib"]))?;
    println!("xtask: all tests passed");
    Ok(ExitCode::SUCCESS)
}

fn lint() -> Result<(), String> {
    setup::run()?;
    check(cargo().args(["fmt", "--all", "--check"]))?;
    check(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "kernel",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    check(cargo().args([
        "clippy",
        "--package",
        "kernel",
        "--lib",
        "--tests",
        "--",
        "-D",
        "warnings",
    ]))?;
    check(cargo().args([
        "clippy",
        "--package",
        "kernel",
        "--target",
        qemu_tests::KERNEL_TARGET,
        "--",
        "-D",
        "warnings",
    ]))
}
