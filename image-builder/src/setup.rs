//! `cargo xtask setup`: installs what a fresh Debian machine lacks for
//! building, running and testing Portcullis (QEMU, the bare-metal Rust
//! target, iproute2, iperf3, ping and nftables for the network tests and
//! the demo, debootstrap and cpio for the nested-Xen images), and says what
//! it installs.
//!
//! QEMU must be version 10 or later; on Debian bookworm that comes from
//! bookworm-backports, whose apt source is derived from the machine's own
//! Debian source (same mirror, same signing key) when it is missing.

use std::path::Path;
use std::process::Command;

/// Oldest QEMU the tests are written against.
const MIN_QEMU_MAJOR: u32 = 10;
const BACKPORTS_FILE: &str = "/etc/apt/sources.list.d/portcullis-backports.sources";

/// Tools the tests and the demo run, and the Debian packages that bring
/// them.
const TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("iperf3", "iperf3"),
    ("ping", "iputils-ping"),
    // The Linux baseline VM of `cargo xtask bench` (and the nftables
    // differential test) carry the machine's `nft`; its initramfs is cpio.
    ("nft", "nftables"),
    ("cpio", "cpio"),
    // The rtc burst test's senders and receiver in the namespaces.
    ("python3", "python3-minimal"),
    // The nested-Xen images' root file system (`qemu_tests::xen`).
    ("debootstrap", "debootstrap"),
];

/// Runs every check and installs what is missing.
pub fn run() -> Result<(), String> {
    ensure_rust_target()?;
    ensure_qemu()?;
    ensure_tools()?;
    Ok(())
}

fn have(command: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(command).is_file()))
        || ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .any(|d| Path::new(d).join(command).is_file())
}

fn ensure_tools() -> Result<(), String> {
    let missing: Vec<&str> = TOOLS
        .iter()
        .filter(|(cmd, _)| !have(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("setup: installing {} (apt-get)", missing.join(" "));
    run_cmd(Command::new("apt-get").args(["update", "-q"]))?;
    run_cmd(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q"])
            .args(&missing),
    )
}

fn ensure_rust_target() -> Result<(), String> {
    let target = qemu_tests::KERNEL_TARGET;
    let out = Command::new("rustc")
        .args(["--print", "target-libdir", "--target", target])
        .current_dir(qemu_tests::workspace_root())
        .output()
        .map_err(|e| format!("cannot run rustc: {e}"))?;
    let libdir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if out.status.success() && has_core(&libdir) {
        return Ok(());
    }
    println!("setup: installing the Rust target {target} (rustup target add)");
    run_cmd(
        Command::new("rustup")
            .args(["target", "add", target])
            .current_dir(qemu_tests::workspace_root()),
    )
}

fn has_core(libdir: &str) -> bool {
    std::fs::read_dir(libdir)
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("libcore-"))
        })
        .unwrap_or(false)
}

/// The major version `qemu-system-x86_64 --version` prints, if it runs.
pub fn qemu_major() -> Option<u32> {
    let out = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()?;
    parse_qemu_major(&String::from_utf8_lossy(&out.stdout))
}

fn parse_qemu_major(version: &str) -> Option<u32> {
    let rest = version.split("version ").nth(1)?;
    rest.split('.').next()?.trim().parse().ok()
}

fn ensure_qemu() -> Result<(), String> {
    match qemu_major() {
        Some(m) if m >= MIN_QEMU_MAJOR => return Ok(()),
        Some(m) => println!("setup: QEMU {m} found, {MIN_QEMU_MAJOR} or later needed"),
        None => println!("setup: qemu-system-x86_64 not found"),
    }
    let codename = os_codename().unwrap_or_default();
    let mut install = Command::new("apt-get");
    install
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-q"]);
    if codename == "bookworm" {
        ensure_backports_source(&codename)?;
        install.args(["-t", "bookworm-backports"]);
    }
    println!("setup: apt-get update");
    run_cmd(Command::new("apt-get").args(["update", "-q"]))?;
    println!(
        "setup: installing qemu-system-x86 {}",
        if codename == "bookworm" {
            "from bookworm-backports"
        } else {
            ""
        }
    );
    run_cmd(install.arg("qemu-system-x86"))?;
    match qemu_major() {
        Some(m) if m >= MIN_QEMU_MAJOR => {
            println!("setup: QEMU {m} installed");
            Ok(())
        }
        other => Err(format!(
            "after installing, QEMU is {other:?}; {MIN_QEMU_MAJOR} or later is needed"
        )),
    }
}

fn os_codename() -> Option<String> {
    let text = std::fs::read_to_string("/etc/os-release").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_string())
}

/// Every apt source on the machine, as (file name, contents).
fn apt_sources() -> Vec<(String, String)> {
    let mut files = Vec::new();
    if let Ok(t) = std::fs::read_to_string("/etc/apt/sources.list") {
        files.push(("sources.list".to_string(), t));
    }
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.ends_with(".list") || name.ends_with(".sources") {
                if let Ok(t) = std::fs::read_to_string(e.path()) {
                    files.push((name, t));
                }
            }
        }
    }
    files
}

fn ensure_backports_source(codename: &str) -> Result<(), String> {
    let sources = apt_sources();
    let suite = format!("{codename}-backports");
    if sources
        .iter()
        .any(|(_, text)| text.split_whitespace().any(|w| w == suite))
    {
        return Ok(());
    }
    let (uri, signed_by) = sources
        .iter()
        .find_map(|(name, text)| main_archive(name, text, codename))
        .ok_or_else(|| format!("no apt source for '{codename}' to derive {suite} from"))?;
    let stanza = backports_stanza(&uri, signed_by.as_deref(), &suite);
    println!("setup: adding apt source {suite} ({uri}) in {BACKPORTS_FILE}");
    std::fs::write(BACKPORTS_FILE, stanza)
        .map_err(|e| format!("cannot write {BACKPORTS_FILE} (run as root): {e}"))
}

/// The archive URI (and signing key, for deb822 sources) that serves
/// `codename` itself, from one sources file.
fn main_archive(name: &str, text: &str, codename: &str) -> Option<(String, Option<String>)> {
    if name.ends_with(".sources") {
        for stanza in text.split("\n\n") {
            let field = |key: &str| {
                stanza
                    .lines()
                    .find_map(|l| l.strip_prefix(key))
                    .map(|v| v.trim().to_string())
            };
            let has_suite =
                field("Suites:").is_some_and(|s| s.split_whitespace().any(|w| w == codename));
            let is_deb = field("Types:").is_some_and(|t| t.split_whitespace().any(|w| w == "deb"));
            if has_suite && is_deb {
                let uri = field("URIs:")?.split_whitespace().next()?.to_string();
                return Some((uri, field("Signed-By:")));
            }
        }
        None
    } else {
        text.lines().find_map(|l| {
            let words: Vec<&str> = l
                .split_whitespace()
                .filter(|w| !w.starts_with('['))
                .collect();
            match words.as_slice() {
                ["deb", uri, suite, ..] if *suite == codename => Some((uri.to_string(), None)),
                _ => None,
            }
        })
    }
}

fn backports_stanza(uri: &str, signed_by: Option<&str>, suite: &str) -> String {
    let mut s = format!("Types: deb\nURIs: {uri}\nSuites: {suite}\nComponents: main\n");
    if let Some(key) = signed_by {
        s.push_str(&format!("Signed-By: {key}\n"));
    }
    s
}

fn run_cmd(cmd: &mut Command) -> Result<(), String> {
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed: {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_version_parses() {
        assert_eq!(
            parse_qemu_major("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)\n"),
            Some(10)
        );
        assert_eq!(
            parse_qemu_major("QEMU emulator version 7.2.15 (Debian)"),
            Some(7)
        );
        assert_eq!(parse_qemu_major("nonsense"), None);
    }

    #[test]
    fn derives_backports_from_deb822_source() {
        let text = "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n\
                    Components: main\nSigned-By: /usr/share/keyrings/k.gpg\n\n\
                    Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n";
        let (uri, key) = main_archive("debian.sources", text, "bookworm").unwrap();
        assert_eq!(uri, "http://mirror.example/debian");
        assert_eq!(key.as_deref(), Some("/usr/share/keyrings/k.gpg"));
        let stanza = backports_stanza(&uri, key.as_deref(), "bookworm-backports");
        assert_eq!(
            stanza,
            "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm-backports\nComponents: main\n\
             Signed-By: /usr/share/keyrings/k.gpg\n"
        );
        assert_eq!(
            main_archive(
                "x.sources",
                "Types: deb\nURIs: u\nSuites: trixie\n",
                "bookworm"
            ),
            None
        );
    }

    #[test]
    fn derives_backports_from_one_line_source() {
        let text = "# comment\ndeb [arch=amd64] http://mirror.example/debian bookworm main\n";
        assert_eq!(
            main_archive("sources.list", text, "bookworm"),
            Some(("http://mirror.example/debian".to_string(), None))
        );
        assert_eq!(
            main_archive("sources.list", "deb-src http://m bookworm main", "bookworm"),
            None
        );
    }
}
