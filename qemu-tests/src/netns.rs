//! A real-network topology for Portcullis (root only): an upstream network
//! namespace and a client namespace, each joined to one of the kernel's
//! NICs by a tap device, set up the way a Qubes firewall VM sees them.
//!
//! QEMU opens the taps in the root namespace; `attach` then moves each tap
//! into its namespace (the open file keeps working) and configures it:
//!
//! - upstream `…-up`: the gateway 10.0.2.2/24 on the tap, and a "server"
//!   192.0.2.80 on its loopback — a host beyond the gateway;
//! - client `…-cl`: 10.137.0.10/32 on the tap, a route to the gateway
//!   10.137.0.1 on the link and the default route through it, as a Qubes
//!   client VM has.
//!
//! And the same for IPv6: the gateway 2001:db8:1::1/64 and a server
//! 2001:db8:80::5 upstream; the client fd09:24ef:4179::a89:a with its
//! gateway fd09:24ef:4179::a89:1 (addresses without duplicate address
//! detection, as they are fixed). Whether IPv6 crosses depends on the
//! QubesDB the kernel is given (`lab::QUBESDB6`).
//!
//! Everything is removed when the `Topology` is dropped, and `cleanup` can
//! be called from a signal handler with the same names.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;

use crate::{Machine, NicBackend};

pub const GATEWAY: &str = "10.0.2.2";
pub const SERVER: &str = "192.0.2.80";
pub const CLIENT: &str = "10.137.0.10";
pub const CLIENT_GATEWAY: &str = "10.137.0.1";
pub const UPLINK: &str = "10.0.2.15";
pub const GATEWAY6: &str = "2001:db8:1::1";
pub const SERVER6: &str = "2001:db8:80::5";
pub const CLIENT6: &str = "fd09:24ef:4179::a89:a";
pub const CLIENT_GATEWAY6: &str = "fd09:24ef:4179::a89:1";
pub const UPLINK6: &str = "2001:db8:1::15";

/// The names one topology uses.
#[derive(Debug, Clone)]
pub struct Names {
    pub upstream_ns: String,
    pub client_ns: String,
    pub upstream_tap: String,
    pub client_tap: String,
}

impl Names {
    /// Names from a short tag (at most 8 characters).
    pub fn new(tag: &str) -> Self {
        Self {
            upstream_ns: format!("pcl-{tag}-up"),
            client_ns: format!("pcl-{tag}-cl"),
            upstream_tap: format!("pcl{tag}u"),
            client_tap: format!("pcl{tag}c"),
        }
    }
}

/// Whether this process runs as root (namespaces and taps need it).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

pub struct Topology {
    pub names: Names,
    /// Queues of each tap (multi-queue taps when above 1).
    pub queues: u16,
}

impl Topology {
    /// Creates both namespaces and both taps (in the root namespace).
    pub fn create(tag: &str) -> Result<Self, String> {
        Self::create_with_queues(tag, 1)
    }

    /// As `create`, with multi-queue taps of `queues` queues each (the
    /// machine's NICs then get as many queue pairs).
    pub fn create_with_queues(tag: &str, queues: u16) -> Result<Self, String> {
        if !is_root() {
            return Err("needs root: it creates network namespaces and tap devices".into());
        }
        let names = Names::new(tag);
        cleanup(&names);
        let t = Topology { names, queues };
        let n = &t.names;
        ip(&["netns", "add", &n.upstream_ns])?;
        ip(&["netns", "add", &n.client_ns])?;
        for tap in [&n.upstream_tap, &n.client_tap] {
            let mut args = vec!["tuntap", "add", "dev", tap.as_str(), "mode", "tap"];
            if queues > 1 {
                args.push("multi_queue");
            }
            ip(&args)?;
        }
        Ok(t)
    }

    /// The kernel's machine: uplink on the upstream tap, downlink on the
    /// client tap.
    pub fn machine(&self, kernel: &Path, qubesdb: &Path) -> Machine {
        Machine::new(kernel)
            .tap_queues(self.queues)
            .qubesdb(qubesdb)
            .nic(NicBackend::Tap {
                ifname: self.names.upstream_tap.clone(),
            })
            .nic(NicBackend::Tap {
                ifname: self.names.client_tap.clone(),
            })
    }

    /// Waits until process `pid` (QEMU) has opened both taps, so that they
    /// can be attached while the guest boots; tun file descriptors name
    /// their device in `/proc/<pid>/fdinfo` (`iff:`).
    pub fn wait_opened(&self, pid: u32, timeout: std::time::Duration) -> Result<(), String> {
        let deadline = std::time::Instant::now() + timeout;
        let n = &self.names;
        loop {
            let mut opened = Vec::new();
            if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) {
                for e in dir.flatten() {
                    let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                    opened.extend(
                        text.lines()
                            .filter_map(|l| l.strip_prefix("iff:"))
                            .map(|v| v.trim().to_string()),
                    );
                }
            }
            if [&n.upstream_tap, &n.client_tap]
                .iter()
                .all(|t| opened.iter().any(|o| o == *t))
            {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(format!("QEMU did not open the taps in {timeout:?}"));
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    /// Moves the taps (already opened by QEMU) into their namespaces and
    /// configures addresses and routes.
    pub fn attach(&self) -> Result<(), String> {
        let n = &self.names;
        let (up, cl) = (n.upstream_ns.as_str(), n.client_ns.as_str());
        let (utap, ctap) = (n.upstream_tap.as_str(), n.client_tap.as_str());
        ip(&["link", "set", utap, "netns", up])?;
        ip(&["link", "set", ctap, "netns", cl])?;
        ip(&["-n", up, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            up,
            "addr",
            "add",
            &format!("{GATEWAY}/24"),
            "dev",
            utap,
        ])?;
        ip(&[
            "-n",
            up,
            "addr",
            "add",
            &format!("{SERVER}/32"),
            "dev",
            "lo",
        ])?;
        ip(&["-n", up, "link", "set", utap, "up"])?;
        ip(&["-n", cl, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            cl,
            "addr",
            "add",
            &format!("{CLIENT}/32"),
            "dev",
            ctap,
        ])?;
        ip(&["-n", cl, "link", "set", ctap, "up"])?;
        ip(&["-n", cl, "route", "add", CLIENT_GATEWAY, "dev", ctap])?;
        ip(&["-n", cl, "route", "add", "default", "via", CLIENT_GATEWAY])?;
        let gw6 = format!("{GATEWAY6}/64");
        ip(&["-n", up, "addr", "add", &gw6, "dev", utap, "nodad"])?;
        ip(&[
            "-n",
            up,
            "addr",
            "add",
            &format!("{SERVER6}/128"),
            "dev",
            "lo",
        ])?;
        let cl6 = format!("{CLIENT6}/128");
        ip(&["-n", cl, "addr", "add", &cl6, "dev", ctap, "nodad"])?;
        ip(&["-n", cl, "route", "add", CLIENT_GATEWAY6, "dev", ctap])?;
        ip(&[
            "-n",
            cl,
            "-6",
            "route",
            "add",
            "default",
            "via",
            CLIENT_GATEWAY6,
        ])?;
        Ok(())
    }

    /// A command run inside namespace `ns`.
    pub fn exec(ns: &str, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]).args(args);
        c
    }

    pub fn in_upstream(&self, program: &str, args: &[&str]) -> Command {
        Self::exec(&self.names.upstream_ns, program, args)
    }

    pub fn in_client(&self, program: &str, args: &[&str]) -> Command {
        Self::exec(&self.names.client_ns, program, args)
    }

    /// Starts an iperf3 server upstream, bound to `addr`; its output
    /// lines (`Accepted connection from ...`) arrive on the receiver.
    pub fn iperf_server(&self, addr: &str) -> Result<(Child, mpsc::Receiver<String>), String> {
        let mut server = self
            .in_upstream("iperf3", &["-s", "-B", addr, "--forceflush"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("iperf3 server: {e}"))?;
        let (tx, lines) = mpsc::channel();
        let stdout = server.stdout.take().ok_or("iperf3 server output")?;
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Ok((server, lines))
    }

    /// Runs a command inside a namespace and returns its output.
    pub fn run(mut cmd: Command) -> Output {
        cmd.stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        cleanup(&self.names);
    }
}

/// Kills every process in the namespaces and removes them and the taps.
/// Idempotent; safe to call from a signal handler's thread.
pub fn cleanup(n: &Names) {
    for ns in [&n.upstream_ns, &n.client_ns] {
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", ns])
            .stderr(Stdio::null())
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", ns])
            .stderr(Stdio::null())
            .status();
    }
    for tap in [&n.upstream_tap, &n.client_tap] {
        let _ = Command::new("ip")
            .args(["link", "del", tap])
            .stderr(Stdio::null())
            .status();
    }
}
