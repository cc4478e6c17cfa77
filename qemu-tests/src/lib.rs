//! Boots the Portcullis kernel under QEMU and judges it by what comes out.
//!
//! This crate owns the QEMU command line (machine, accelerator, memory,
//! CPUs, NICs, exit device) and a runner that captures the serial console,
//! enforces a wall-clock timeout and always kills its QEMU. The integration
//! tests in `tests/` assert on the exit status and on facts parsed from the
//! console (`BootReport`); `image-builder` reuses the same command line for
//! `cargo xtask run` and `cargo xtask bench`. It must not assert on log
//! wording alone where an outside fact (exit code, packets, counters) exists.
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Target triple the kernel is built for.
pub const KERNEL_TARGET: &str = "x86_64-unknown-none";
/// QEMU status for the kernel's success exit (`isa-debug-exit`, 0x10).
pub const EXIT_SUCCESS: i32 = 33;
/// QEMU status for the kernel's failure exit (`isa-debug-exit`, 0x11).
pub const EXIT_FAILURE: i32 = 35;
/// PCI slot of the first NIC; NIC `i` sits at slot `FIRST_NIC_SLOT + i`.
pub const FIRST_NIC_SLOT: u8 = 2;

/// The workspace root (this crate's parent directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("crate sits in the workspace")
        .to_path_buf()
}

/// Where `cargo xtask build` leaves the kernel ELF.
pub fn default_kernel_path() -> PathBuf {
    workspace_root()
        .join("target")
        .join(KERNEL_TARGET)
        .join("release")
        .join("portcullis")
}

/// Builds the kernel ELF (release, bare-metal target).
pub fn build_kernel() -> Result<PathBuf, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(workspace_root())
        .args([
            "build",
            "--release",
            "--package",
            "kernel",
            "--bin",
            "portcullis",
            "--target",
            KERNEL_TARGET,
        ])
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err(format!("kernel build failed: {status}"));
    }
    Ok(default_kernel_path())
}

/// The kernel under test: `$PORTCULLIS_KERNEL` if set, else built once per
/// test process.
pub fn kernel() -> &'static Path {
    static KERNEL: OnceLock<PathBuf> = OnceLock::new();
    KERNEL.get_or_init(|| match std::env::var_os("PORTCULLIS_KERNEL") {
        Some(p) => PathBuf::from(p),
        None => build_kernel().unwrap_or_else(|e| panic!("{e}")),
    })
}

/// What `RunningMachine::drain_until_exit_with` does next.
pub enum Watch {
    Go,
    /// Types these keys on the console.
    Type(&'static [u8]),
    /// Stops the machine now.
    Stop,
}

/// CPU emulation: TCG (software, works everywhere) or KVM on real hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Tcg,
    Kvm,
}

impl std::str::FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tcg" => Ok(Self::Tcg),
            "kvm" => Ok(Self::Kvm),
            _ => Err(format!("unknown accelerator '{s}' (tcg or kvm)")),
        }
    }
}

/// Where a NIC's frames go on the host side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NicBackend {
    /// A hub of its own with nothing else on it: the device exists, no
    /// frame enters or leaves.
    Unconnected,
    /// A unix datagram socket pair: QEMU binds `qemu` and sends each frame
    /// as one datagram to `peer`, where the test listens.
    Dgram { qemu: PathBuf, peer: PathBuf },
    /// A tap device (root only), created beforehand.
    Tap { ifname: String },
}

/// One QEMU machine to boot the kernel in.
#[derive(Debug, Clone)]
pub struct Machine {
    pub kernel: PathBuf,
    /// QEMU machine type: `q35` (PCIe, ECAM via MCFG) or `pc` (i440fx,
    /// legacy configuration ports only).
    pub machine_type: String,
    pub memory_mib: u32,
    pub cpus: u32,
    pub nics: Vec<NicBackend>,
    pub append: String,
    pub accel: Accel,
    /// A QubesDB snapshot handed to the kernel through fw_cfg.
    pub qubesdb: Option<PathBuf>,
    /// Extra QEMU arguments, appended last.
    pub extra: Vec<String>,
    /// Queues of each tap backend; above 1 the tap must be multi-queue
    /// and the virtio-net device offers as many queue pairs.
    pub tap_queues: u16,
}

impl Machine {
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            machine_type: "q35".into(),
            memory_mib: 64,
            cpus: 1,
            nics: Vec::new(),
            append: String::new(),
            accel: Accel::Tcg,
            qubesdb: None,
            extra: Vec::new(),
            tap_queues: 1,
        }
    }

    pub fn memory_mib(mut self, m: u32) -> Self {
        self.memory_mib = m;
        self
    }
    pub fn cpus(mut self, n: u32) -> Self {
        self.cpus = n;
        self
    }
    pub fn tap_queues(mut self, n: u16) -> Self {
        self.tap_queues = n.max(1);
        self
    }
    pub fn nic(mut self, backend: NicBackend) -> Self {
        self.nics.push(backend);
        self
    }
    pub fn append(mut self, cmdline: &str) -> Self {
        self.append = cmdline.to_string();
        self
    }
    pub fn qubesdb(mut self, snapshot: impl Into<PathBuf>) -> Self {
        self.qubesdb = Some(snapshot.into());
        self
    }
    pub fn machine_type(mut self, t: &str) -> Self {
        self.machine_type = t.to_string();
        self
    }
    pub fn accel(mut self, accel: Accel) -> Self {
        self.accel = accel;
        self
    }

    /// The QEMU arguments (without the program name).
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec!["-M".into(), self.machine_type.clone()];
        a.extend(
            [
                "-nodefaults",
                "-no-reboot",
                "-display",
                "none",
                "-monitor",
                "none",
                "-serial",
                "stdio",
                "-device",
                "isa-debug-exit,iobase=0xf4,iosize=0x04",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        let accel = match self.accel {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        };
        a.extend(["-accel".into(), accel.into()]);
        if self.accel == Accel::Kvm {
            a.extend(["-cpu".into(), "host".into()]);
        }
        a.extend([
            "-m".into(),
            self.memory_mib.to_string(),
            "-smp".into(),
            self.cpus.to_string(),
        ]);
        a.extend(["-kernel".into(), self.kernel.display().to_string()]);
        a.extend(["-append".into(), self.append.clone()]);
        for (i, nic) in self.nics.iter().enumerate() {
            let id = format!("net{i}");
            let netdev = match nic {
                NicBackend::Unconnected => format!("hubport,id={id},hubid={i}"),
                NicBackend::Dgram { qemu, peer } => format!(
                    "dgram,id={id},local.type=unix,local.path={},remote.type=unix,remote.path={}",
                    qemu.display(),
                    peer.display()
                ),
                NicBackend::Tap { ifname } if self.tap_queues > 1 => format!(
                    "tap,id={id},ifname={ifname},script=no,downscript=no,queues={}",
                    self.tap_queues
                ),
                NicBackend::Tap { ifname } => {
                    format!("tap,id={id},ifname={ifname},script=no,downscript=no")
                }
            };
            // Queue pairs need MSI-X vectors: one per queue, the control
            // queue and the configuration.
            let mq = match nic {
                NicBackend::Tap { .. } if self.tap_queues > 1 => {
                    format!(",mq=on,vectors={}", 2 * self.tap_queues + 2)
                }
                _ => String::new(),
            };
            let slot = usize::from(FIRST_NIC_SLOT) + i;
            a.extend([
                "-netdev".into(),
                netdev,
                "-device".into(),
                format!(
                    "virtio-net-pci,netdev={id},addr={slot:#x},mac=52:54:00:12:34:{:02x}{mq}",
                    0x56 + i
                ),
            ]);
        }
        if let Some(db) = &self.qubesdb {
            a.extend([
                "-fw_cfg".into(),
                format!("name=opt/portcullis/qubesdb,file={}", db.display()),
            ]);
        }
        a.extend(self.extra.iter().cloned());
        a
    }

    pub fn command(&self) -> Command {
        let mut c = Command::new("qemu-system-x86_64");
        c.args(self.args());
        c
    }

    /// Boots, waits for QEMU to exit (or kills it at `timeout`), and returns
    /// the console and the outcome.
    pub fn run(&self, timeout: Duration) -> Boot {
        let mut running = RunningMachine::spawn(self).unwrap_or_else(|e| panic!("{e}"));
        let deadline = Instant::now() + timeout;
        let mut console = String::new();
        loop {
            match running.lines.recv_timeout(Duration::from_millis(20)) {
                Ok(line) => {
                    console.push_str(&line);
                    console.push('\n');
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            if Instant::now() >= deadline {
                running.kill();
                break;
            }
        }
        let status = running.wait_until(deadline);
        let stderr = running.stderr();
        let outcome = match status {
            None => Outcome::TimedOut,
            Some(s) => match s.code() {
                Some(EXIT_SUCCESS) => Outcome::Success,
                Some(EXIT_FAILURE) => Outcome::Failure,
                _ => Outcome::Other(s),
            },
        };
        Boot {
            outcome,
            console,
            stderr,
        }
    }
}

/// How a boot ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The kernel exited through `isa-debug-exit` with success.
    Success,
    /// The kernel exited through `isa-debug-exit` with failure.
    Failure,
    /// QEMU ended some other way (crash, triple fault with -no-reboot, error).
    Other(ExitStatus),
    /// The wall-clock timeout passed and QEMU was killed.
    TimedOut,
}

/// A QEMU process with its console being read line by line. Dropping it
/// kills QEMU, so a failing test never leaves one behind.
pub struct RunningMachine {
    child: Child,
    pub lines: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
}

impl RunningMachine {
    /// The QEMU process's id (for CPU accounting in benchmarks).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn spawn(machine: &Machine) -> Result<Self, String> {
        let mut child = machine
            .command()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                format!("cannot start qemu-system-x86_64 (run `cargo xtask setup`): {e}")
            })?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut stderr = child.stderr.take().expect("stderr is piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n') {
                let Ok(line) = line else { break };
                let text = String::from_utf8_lossy(&line)
                    .trim_end_matches('\r')
                    .to_string();
                if tx.send(text).is_err() {
                    break;
                }
            }
        });
        let (etx, erx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            let _ = etx.send(s);
        });
        Ok(Self {
            child,
            lines,
            stderr: erx,
        })
    }

    /// Waits for the first console line that satisfies `pred`.
    pub fn wait_for(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&str) -> bool,
    ) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.lines.recv_timeout(left) {
                Ok(l) if pred(&l) => return Some(l),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
    }

    /// Types on the kernel's serial console (`s`: print counters, `q`:
    /// print counters and shut down).
    pub fn send_keys(&mut self, keys: &[u8]) {
        use std::io::Write;
        if let Some(stdin) = self.child.stdin.as_mut() {
            let _ = stdin.write_all(keys);
            let _ = stdin.flush();
        }
    }

    /// Collects console lines until QEMU exits or `deadline` passes.
    pub fn drain_until_exit(&mut self, deadline: Instant) -> (Option<ExitStatus>, String) {
        self.drain_until_exit_with(deadline, |_| Watch::Go)
    }

    /// `drain_until_exit`, calling `watch` with each console line as it
    /// comes (progress of a long run) and with `None` whenever 20 ms pass
    /// without one; it may type keys on the console or stop the machine.
    pub fn drain_until_exit_with(
        &mut self,
        mut deadline: Instant,
        mut watch: impl FnMut(Option<&str>) -> Watch,
    ) -> (Option<ExitStatus>, String) {
        let mut console = String::new();
        loop {
            let next = match self.lines.recv_timeout(Duration::from_millis(20)) {
                Ok(l) => {
                    let next = watch(Some(&l));
                    console.push_str(&l);
                    console.push('\n');
                    next
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => watch(None),
            };
            match next {
                Watch::Go => {}
                Watch::Type(keys) => self.send_keys(keys),
                Watch::Stop => deadline = Instant::now(),
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        (self.wait_until(deadline), console)
    }

    /// The exit status, or `None` if QEMU was still running at `deadline`
    /// (it is then killed).
    pub fn wait_until(&mut self, deadline: Instant) -> Option<ExitStatus> {
        loop {
            match self.child.try_wait() {
                Ok(Some(s)) if s.code().is_some() => return Some(s),
                Ok(Some(_)) => return None, // killed by a signal: ours
                Ok(None) if Instant::now() >= deadline => {
                    self.kill();
                    let _ = self.child.wait();
                    return None;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(_) => return None,
            }
        }
    }

    fn stderr(&self) -> String {
        self.stderr
            .recv_timeout(Duration::from_secs(2))
            .unwrap_or_default()
    }
}

impl Drop for RunningMachine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one boot produced.
#[derive(Debug, Clone)]
pub struct Boot {
    pub outcome: Outcome,
    pub console: String,
    pub stderr: String,
}

impl Boot {
    /// Panics with the console when the outcome is not `expected`.
    pub fn expect(&self, expected: Outcome) -> &Self {
        assert_eq!(
            self.outcome, expected,
            "unexpected outcome\n--- console ---\n{}\n--- qemu stderr ---\n{}",
            self.console, self.stderr
        );
        self
    }

    pub fn report(&self) -> BootReport {
        BootReport::parse(&self.console)
    }
}

/// One PCI function as the boot report lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciFunctionLine {
    /// `segment:bus:device.function`, e.g. `0000:00:02.0`.
    pub address: String,
    pub vendor: u16,
    pub device: u16,
    pub class: u8,
}

/// Facts parsed from the console's boot report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootReport {
    pub ram_kib: Option<u64>,
    pub cpus: Option<u32>,
    /// CPUs running after the APs were started (`smp:` line; absent with
    /// one CPU).
    pub cpus_online: Option<u32>,
    pub pci: Vec<PciFunctionLine>,
    pub fatal: Option<String>,
}

impl BootReport {
    pub fn parse(console: &str) -> Self {
        let mut r = Self::default();
        for line in console.lines() {
            if let Some(rest) = line.strip_prefix("memory: ram ") {
                r.ram_kib = rest.split_whitespace().next().and_then(|n| n.parse().ok());
            } else if let Some(rest) = line.strip_prefix("smp: ") {
                if rest.contains(" cpus online") {
                    r.cpus_online = rest.split_whitespace().next().and_then(|n| n.parse().ok());
                }
            } else if let Some(rest) = line.strip_prefix("cpus: ") {
                r.cpus = rest.split_whitespace().next().and_then(|n| n.parse().ok());
            } else if let Some(rest) = line.strip_prefix("pci ") {
                if let Some(f) = Self::parse_pci(rest) {
                    r.pci.push(f);
                }
            } else if line.starts_with("FATAL:") && r.fatal.is_none() {
                r.fatal = Some(line.to_string());
            }
        }
        r
    }

    /// `0000:00:02.0 1af4:1000 class 02.00.00 name...`
    fn parse_pci(rest: &str) -> Option<PciFunctionLine> {
        let mut words = rest.split_whitespace();
        let address = words.next()?.to_string();
        let (v, d) = words.next()?.split_once(':')?;
        if words.next()? != "class" {
            return None;
        }
        let class = u8::from_str_radix(words.next()?.split('.').next()?, 16).ok()?;
        Some(PciFunctionLine {
            address,
            vendor: u16::from_str_radix(v, 16).ok()?,
            device: u16::from_str_radix(d, 16).ok()?,
            class,
        })
    }
}

mod debian;
pub mod lab;
pub mod linux_fw;
pub mod netns;
pub mod xen;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_boot_report() {
        let console =
            "portcullis: booting\nmemory: ram 65023 KiB, free 1 KiB\ncpus: 2 (apic ids 0 1)\n\
                       pci 0000:00:02.0 1af4:1000 class 02.00.00 virtio-net\n    bar0 io 0xc040\n\
                       pci bogus\nFATAL: exception 14 (#PF page fault) rip=0x1\n";
        let r = BootReport::parse(console);
        assert_eq!(r.ram_kib, Some(65023));
        assert_eq!(r.cpus, Some(2));
        assert_eq!(
            r.pci,
            vec![PciFunctionLine {
                address: "0000:00:02.0".into(),
                vendor: 0x1af4,
                device: 0x1000,
                class: 2
            }]
        );
        assert!(r.fatal.unwrap().contains("exception 14"));
    }

    #[test]
    fn machine_args_place_nics_at_known_slots() {
        let m = Machine::new("/k")
            .memory_mib(16)
            .cpus(2)
            .nic(NicBackend::Unconnected)
            .nic(NicBackend::Unconnected);
        let a = m.args().join(" ");
        assert!(a.contains("-m 16 -smp 2"));
        assert!(a.contains("virtio-net-pci,netdev=net0,addr=0x2,"));
        assert!(a.contains("virtio-net-pci,netdev=net1,addr=0x3,"));
        assert!(a.contains("-accel tcg"));
        assert!(!a.contains("-cpu host"));
        assert!(Machine::new("/k")
            .accel(Accel::Kvm)
            .args()
            .join(" ")
            .contains("-accel kvm -cpu host"));
    }
}
