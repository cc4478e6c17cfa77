//! `cargo xtask fuzz`: runs the `netstack` fuzz targets with libFuzzer
//! (`cargo fuzz`, which needs the nightly toolchain) for a bounded time
//! each. The corpus lives in `netstack/fuzz/corpus/<target>` and is kept in
//! the repository; a crash leaves its input in `netstack/fuzz/artifacts`
//! and fails the command.

use std::process::Command;

pub const TARGETS: &[&str] = &["frame_parser", "rule_parser", "pipeline"];

fn cargo_fuzz_installed() -> bool {
    Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn nightly_installed() -> bool {
    Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.starts_with("nightly"))
        })
}

pub fn run(args: &[String]) -> Result<(), String> {
    let mut seconds = 30u32;
    let mut targets: Vec<String> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => {
                let v = it.next().ok_or("--seconds needs a value")?;
                seconds = v
                    .parse()
                    .map_err(|_| format!("--seconds: '{v}' is not a number"))?;
            }
            t if TARGETS.contains(&t) => targets.push(t.to_string()),
            other => {
                return Err(format!(
                    "unknown fuzz argument '{other}' (targets: {})",
                    TARGETS.join(", ")
                ))
            }
        }
    }
    if targets.is_empty() {
        targets = TARGETS.iter().map(|t| t.to_string()).collect();
    }
    if !nightly_installed() {
        return Err(
            "fuzzing needs the nightly toolchain (rustup toolchain install nightly)".into(),
        );
    }
    if !cargo_fuzz_installed() {
        println!("setup: installing cargo-fuzz (cargo install cargo-fuzz --locked)");
        crate::check(Command::new("cargo").args([
            "+nightly",
            "install",
            "cargo-fuzz",
            "--locked",
        ]))?;
    }
    let dir = qemu_tests::workspace_root().join("netstack");
    for t in &targets {
        println!("xtask: fuzzing {t} for {seconds} s");
        std::fs::create_dir_all(dir.join("fuzz/corpus").join(t)).map_err(|e| e.to_string())?;
        crate::check(
            Command::new("cargo")
                .current_dir(&dir)
                .args(["+nightly", "fuzz", "run", t, "--"])
                .arg(format!("-max_total_time={seconds}")),
        )?;
    }
    println!(
        "xtask: fuzzing found no crash in {} target(s)",
        targets.len()
    );
    Ok(())
}
