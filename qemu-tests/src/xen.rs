//! A real Xen 4.17 with a Linux dom0, nested in QEMU TCG, to run Portcullis
//! as a PVH domU (see `shared/xen-in-qemu.md` in the steering notes).
//!
//! `XenImages::ensure` builds, once, under `/var/cache/portcullis/xen`: the
//! Xen hypervisor (from Debian's package, decompressed for QEMU's multiboot
//! loader), the dom0 kernel (also uncompressed, for Linux client VMs) and
//! the few modules dom0 and its clients need, and a dom0 root filesystem
//! (debootstrap + Xen tools from the security suite, matching the
//! hypervisor) packed as an initramfs. `run` appends a small archive
//! with the kernel under test, an `xl` config and a test script, boots the
//! whole thing and returns what came out of the serial port: Xen's console,
//! with the script's lines (the guests' console logs among them). Needs
//! root and the Debian package mirrors.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::debian::{self, cpio, run};
use crate::{RunningMachine, Watch};

/// Bumped when the recipe changes, so old caches are rebuilt.
const RECIPE: &str = "portcullis-xen-v3";
pub const CACHE: &str = "/var/cache/portcullis/xen";

/// The built images.
pub struct XenImages {
    pub dir: PathBuf,
}

/// The machine's Debian mirror for the main and the security suites, read
/// from its own apt sources.
fn mirrors() -> Result<(String, String), String> {
    let mut main = None;
    let mut security = None;
    let mut texts = Vec::new();
    if let Ok(d) = std::fs::read_dir("/etc/apt/sources.list.d") {
        for e in d.flatten() {
            if e.path()
                .extension()
                .is_some_and(|x| x == "sources" || x == "list")
            {
                texts.push(std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
    }
    texts.push(std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default());
    for text in &texts {
        for stanza in text.split("\n\n") {
            let field = |k: &str| {
                stanza
                    .lines()
                    .find_map(|l| l.strip_prefix(k))
                    .map(|v| v.trim().to_string())
            };
            if let (Some(uri), Some(suites)) = (field("URIs:"), field("Suites:")) {
                let uri = uri.split_whitespace().next().unwrap_or("").to_string();
                if suites.split_whitespace().any(|s| s == "bookworm") {
                    main.get_or_insert(uri.clone());
                }
                if suites.split_whitespace().any(|s| s == "bookworm-security") {
                    security.get_or_insert(uri);
                }
            }
        }
        for l in text.lines() {
            let w: Vec<&str> = l
                .split_whitespace()
                .filter(|w| !w.starts_with('['))
                .collect();
            match w.as_slice() {
                ["deb", uri, "bookworm", ..] => {
                    main.get_or_insert(uri.to_string());
                }
                ["deb", uri, "bookworm-security", ..] => {
                    security.get_or_insert(uri.to_string());
                }
                _ => {}
            }
        }
    }
    match (main, security) {
        (Some(m), Some(s)) => Ok((m, s)),
        _ => {
            Err("no bookworm and bookworm-security apt sources to build the dom0 image from".into())
        }
    }
}

const INIT: &str = r#"#!/bin/sh
# dom0 init for Portcullis's nested-Xen tests: start the Xen tools, make a
# bridge, run /test.sh, power off.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:/usr/lib/xen-4.17/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /run /tmp
mount -t devpts devpts /dev/pts
mount -t tmpfs tmp /run
mount -t tmpfs tmp /tmp
mkdir -p /run/xen /run/xenstored /var/lib/xen /var/log/xen/console
for m in xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xenfs xen-netback bridge; do modprobe $m; done
mount -t xenfs xenfs /proc/xen
xenstored --pid-file /run/xenstored.pid
xen-init-dom0
xenconsoled --log=guest --log-dir=/var/log/xen/console
ip link set lo up
ip link add br0 type bridge
ip addr add 10.0.2.2/24 dev br0
ip link set br0 up
echo "dom0: ready"
if [ -x /test.sh ]; then /test.sh; echo "dom0: test exit $?"; fi
echo o > /proc/sysrq-trigger
sleep 10
"#;

impl XenImages {
    /// The images, built first if the cache lacks them.
    pub fn ensure() -> Result<Self, String> {
        let dir = PathBuf::from(CACHE);
        let stamp = dir.join("stamp");
        if std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == RECIPE)
            && ["xen", "vmlinuz", "vmlinux", "base.cpio"]
                .iter()
                .all(|f| dir.join(f).is_file())
        {
            return Ok(Self { dir });
        }
        if !crate::netns::is_root() {
            return Err("building the Xen images needs root (debootstrap, chroot)".into());
        }
        eprintln!("xen: building the nested-Xen images in {CACHE} (once; a few minutes)");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("debs")).map_err(|e| e.to_string())?;
        let (main, security) = mirrors()?;
        let (kernel_pkg, kver) = debian::kernel_package()?;
        debian::fetch(
            &dir.join("debs"),
            &[
                ("xen-hypervisor-4.17-amd64", &dir.join("x")),
                (&kernel_pkg, &dir.join("k")),
            ],
        )?;
        // QEMU's multiboot loader needs the plain ELF.
        let out = std::fs::File::create(dir.join("xen")).map_err(|e| e.to_string())?;
        let status = Command::new("zcat")
            .arg(dir.join("x/boot/xen-4.17-amd64.gz"))
            .stdout(out)
            .status();
        if !status.is_ok_and(|s| s.success()) {
            return Err("decompressing Xen failed".into());
        }
        std::fs::copy(
            dir.join(format!("k/boot/vmlinuz-{kver}")),
            dir.join("vmlinuz"),
        )
        .map_err(|e| e.to_string())?;
        extract_vmlinux(&dir.join("vmlinuz"), &dir.join("vmlinux"))?;
        let root = dir.join("rootfs");
        run(Command::new("debootstrap")
            .args([
                "--variant=minbase",
                "--include=xen-utils-4.17,xenstore-utils,iproute2,bridge-utils,kmod,busybox,procps",
                "bookworm",
            ])
            .arg(&root)
            .arg(&main))?;
        // The tools must match the hypervisor, which comes from the
        // security suite.
        std::fs::write(
            root.join("etc/apt/sources.list.d/security.list"),
            format!("deb {security} bookworm-security main\n"),
        )
        .map_err(|e| e.to_string())?;
        let _ = std::fs::copy("/etc/resolv.conf", root.join("etc/resolv.conf"));
        run(Command::new("chroot")
            .arg(&root)
            .args(["apt-get", "update", "-q"]))?;
        run(Command::new("chroot")
            .arg(&root)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args([
                "apt-get",
                "install",
                "-y",
                "-q",
                "--only-upgrade",
                "xen-utils-4.17",
                "xen-utils-common",
                "libxenmisc4.17",
                "xenstore-utils",
            ]))?;
        let modules = dir.join(format!("k/lib/modules/{kver}/kernel"));
        let target = root.join(format!("lib/modules/{kver}/kernel"));
        for sub in [
            "drivers/xen",
            "drivers/net/xen-netback",
            // For the client VMs' initramfs (`client.cpio`, made by the
            // test scripts from dom0's own busybox).
            "drivers/net/xen-netfront.ko",
            "net/bridge",
            "net/802",
            "net/llc",
        ] {
            let to = target.join(sub);
            std::fs::create_dir_all(to.parent().unwrap_or(&target)).map_err(|e| e.to_string())?;
            run(Command::new("cp").arg("-r").arg(modules.join(sub)).arg(&to))?;
        }
        run(Command::new("chroot").arg(&root).args(["depmod", &kver]))?;
        std::fs::write(root.join("init"), INIT).map_err(|e| e.to_string())?;
        run(Command::new("chmod").arg("+x").arg(root.join("init")))?;
        std::fs::write(root.join("etc/xen/xl.conf"), "autoballoon=\"off\"\n")
            .map_err(|e| e.to_string())?;
        for junk in [
            "usr/share/doc",
            "usr/share/locale",
            "usr/share/man",
            "var/cache/apt",
            "var/lib/apt/lists",
        ] {
            let _ = std::fs::remove_dir_all(root.join(junk));
        }
        cpio(&root, &dir.join("base.cpio"))?;
        for scratch in ["x", "k", "debs", "rootfs"] {
            let _ = std::fs::remove_dir_all(dir.join(scratch));
        }
        std::fs::write(&stamp, RECIPE).map_err(|e| e.to_string())?;
        Ok(Self { dir })
    }
}

/// What a nested-Xen run printed.
pub struct XenRun {
    /// The serial console: Xen's log and dom0's, with the script's `test: `
    /// lines.
    pub console: String,
    pub elapsed: Duration,
    /// The script printed nothing for `STALL` and the run was ended.
    pub stalled: bool,
}

impl XenRun {
    /// The script's own lines (`test: ...`, found anywhere in a console
    /// line, which Xen's output may share), without the prefix.
    pub fn script_lines(&self) -> impl Iterator<Item = &str> {
        script_lines(&self.console)
    }

    /// The lines domain `domid` printed on its PV console (its xenconsoled
    /// log, which the script shows as `test: log <domid>: ` lines; found
    /// anywhere in a line, which Xen's own output may share).
    pub fn guest_lines(&self, domid: u32) -> Vec<String> {
        let prefix = format!("test: log {domid}: ");
        self.console
            .lines()
            .filter_map(|l| l.find(&prefix).map(|at| &l[at + prefix.len()..]))
            .map(|l| l.trim_end().to_string())
            .collect()
    }
}

impl XenImages {
    /// Boots Xen and dom0 with the kernel under test at `/portcullis`, the
    /// `xl` config at `/etc/xen/portcullis.cfg`, and `script` as
    /// `/test.sh`; returns the console once dom0 has powered off.
    pub fn run(
        &self,
        kernel: &Path,
        xl_cfg: &str,
        script: &str,
        timeout: Duration,
    ) -> Result<XenRun, String> {
        let work = std::env::temp_dir().join(format!("portcullis-xen-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&work);
        let overlay = work.join("overlay");
        std::fs::create_dir_all(overlay.join("etc/xen")).map_err(|e| e.to_string())?;
        std::fs::copy(kernel, overlay.join("portcullis")).map_err(|e| e.to_string())?;
        // dom0's kernel uncompressed, for Linux client VMs (PV domUs), when
        // the script boots them.
        if script.contains("/vmlinux") {
            std::fs::copy(self.dir.join("vmlinux"), overlay.join("vmlinux"))
                .map_err(|e| e.to_string())?;
        }
        std::fs::write(overlay.join("etc/xen/portcullis.cfg"), xl_cfg)
            .map_err(|e| e.to_string())?;
        std::fs::write(overlay.join("test.sh"), script).map_err(|e| e.to_string())?;
        run(Command::new("chmod").arg("+x").arg(overlay.join("test.sh")))?;
        // Two cpio archives back to back are one initramfs to Linux.
        cpio(&overlay, &work.join("overlay.cpio"))?;
        let dom0 = work.join("dom0.cpio");
        let mut out = std::fs::File::create(&dom0).map_err(|e| e.to_string())?;
        for part in [self.dir.join("base.cpio"), work.join("overlay.cpio")] {
            let mut f = std::fs::File::open(part).map_err(|e| e.to_string())?;
            std::io::copy(&mut f, &mut out).map_err(|e| e.to_string())?;
        }
        drop(out);
        let mut m = crate::Machine::new(self.dir.join("xen"));
        m.memory_mib = 3072;
        // Physical CPUs of the nested machine (Xen's pCPUs): 2 unless
        // PORTCULLIS_XEN_CPUS says otherwise (a knob for the Xen issue's
        // experiments on the nested machine's memory corruption).
        m.cpus = std::env::var("PORTCULLIS_XEN_CPUS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2);
        // `pcid=0 invpcid=0`: Xen flushes TLBs without PCIDs and INVPCID.
        // With them (Xen's default when the CPU has them, as `-cpu max`
        // does under TCG) the nested machine corrupted memory while dom0
        // built domains — dom0's processes read wrong bytes and crashed,
        // other domains triple-faulted (the Xen issue's notes); without
        // them the Qubes topology ran clean. PORTCULLIS_XEN_OPTS replaces
        // them, for experiments.
        m.append = format!(
            "console=com1 com1=115200,8n1 dom0_mem=1536M,max:1536M dom0_max_vcpus=1 loglvl=all \
             guest_loglvl=all noreboot {}",
            std::env::var("PORTCULLIS_XEN_OPTS").unwrap_or_else(|_| "pcid=0 invpcid=0".into())
        );
        m.extra = vec![
            "-cpu".into(),
            // PORTCULLIS_XEN_CPU: another CPU model for the nested machine,
            // for the Xen issue's experiments.
            std::env::var("PORTCULLIS_XEN_CPU").unwrap_or_else(|_| "max".into()),
            "-initrd".into(),
            format!(
                "{} console=hvc0 earlyprintk=xen loglevel=4,{}",
                self.dir.join("vmlinuz").display(),
                dom0.display()
            ),
        ];
        let start = Instant::now();
        let mut vm = RunningMachine::spawn(&m)?;
        // The script's lines as they come (shown with `--nocapture`, and
        // in a failed test's output): where a long run is. When the
        // script has printed nothing for `STALL` (dom0 stuck: seen in the
        // Qubes-topology test: dom0's vCPU running at 100 % and nothing
        // else), Xen is asked for its run queues, each physical CPU's
        // registers and call trace (in a hypercall or in the guest), and
        // dom0's registers (debug keys `r`, `d` and `0` after the three
        // Ctrl-A that give Xen the serial input), every line is shown from
        // then on, and the run ends `STALL_DUMP` later.
        let mut last = Instant::now();
        let mut asked: Option<Instant> = None;
        let (status, console) = vm.drain_until_exit_with(start + timeout, |line| {
            let at = start.elapsed().as_secs();
            match (line, asked) {
                (Some(l), None) => {
                    if let Some(t) = script_lines(l).next() {
                        println!("[{at:>4} s] test: {t}");
                        last = Instant::now();
                    }
                }
                (Some(l), Some(_)) => println!("[{at:>4} s] {l}"),
                (None, None) if last.elapsed() > STALL => {
                    asked = Some(Instant::now());
                    println!(
                        "[{at:>4} s] xen: nothing from the script for {} s: Xen's state follows",
                        STALL.as_secs()
                    );
                    return Watch::Type(b"\x01\x01\x01rd0");
                }
                (None, Some(when)) if when.elapsed() > STALL_DUMP => return Watch::Stop,
                (None, _) => {}
            }
            Watch::Go
        });
        let stalled = asked.is_some();
        let _ = std::fs::remove_dir_all(&work);
        if status.is_none() && !stalled {
            return Err(format!(
                "nested Xen did not power off within {timeout:?}:\n{console}"
            ));
        }
        Ok(XenRun {
            console,
            elapsed: start.elapsed(),
            stalled,
        })
    }
}

/// `XenRun::script_lines` of a console.
pub fn script_lines(console: &str) -> impl Iterator<Item = &str> {
    console
        .lines()
        .filter_map(|l| l.find("test: ").map(|at| &l[at + 6..]))
}

/// How long a script may print nothing before Xen is asked for its state,
/// and how long the run goes on after that.
const STALL: Duration = Duration::from_secs(300);
const STALL_DUMP: Duration = Duration::from_secs(30);

/// The ELF kernel inside a bzImage compressed with XZ (Debian's), so that
/// dom0's domain builder need not decompress it for every client VM
/// (nested, ~19 s each, and it failed now and then).
fn extract_vmlinux(bzimage: &Path, out: &Path) -> Result<(), String> {
    let image = std::fs::read(bzimage).map_err(|e| e.to_string())?;
    let magic = b"\xfd7zXZ\x00";
    let at = image
        .windows(magic.len())
        .position(|w| w == magic)
        .ok_or("the kernel image holds no XZ stream")?;
    let mut xz = Command::new("xz")
        .args(["-dc", "--single-stream"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("xz: {e}"))?;
    let mut stdin = xz.stdin.take().ok_or("xz: no stdin")?;
    let tail = image[at..].to_vec();
    let feeder = std::thread::spawn(move || {
        use std::io::Write;
        // xz stops reading after the stream: the rest is not wanted.
        let _ = stdin.write_all(&tail);
    });
    let output = xz.wait_with_output().map_err(|e| format!("xz: {e}"))?;
    let _ = feeder.join();
    if !output.status.success() || !output.stdout.starts_with(b"\x7fELF") {
        return Err("decompressing the kernel image gave no ELF".into());
    }
    std::fs::write(out, &output.stdout).map_err(|e| e.to_string())
}

/// dom0's QubesDB for a Portcullis domain, as a shell snippet that writes
/// `/qdb.py`: a vchan server (libxenvchan through ctypes) at the path
/// Qubes uses (`/local/domain/0/data/vchan/<domid>/111`, 4096-byte rings
/// as dom0's qubesdb-daemon asks), printing `ready` once it listens, then
/// `request ...` for the domain's first message. It then runs the script
/// at its second argument, one step a line:
/// - `E path value`: an entry of the answer to MULTIREAD; `END` ends it;
/// - `W path value`: a write dom0 pushes; `R path`: a removal;
/// - `A what`: prints the next message from the domain (`what type T path
///   'P' length N`: the acknowledgements);
/// - `P file`: waits until `file` exists (the test's go-ahead).
///
/// Writes of the domain's own (`/qubes-firewall_handled/<ip>`) are
/// answered RESP_OK whenever they arrive and printed as `vm write 'PATH'
/// 'VALUE'`; after the script it goes on answering them.
///
/// Run as `python3 /qdb.py <domid> <script>`.
pub const QUBESDB_SERVER: &str = r#"cat > /qdb.py <<'PY'
import ctypes, os, struct, sys, time
lib = ctypes.CDLL("libxenvchan.so.4.17")
P = ctypes.c_void_p
lib.libxenvchan_server_init.restype = P
lib.libxenvchan_server_init.argtypes = [P, ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t]
for f in ("libxenvchan_is_open", "libxenvchan_wait", "libxenvchan_data_ready"):
    getattr(lib, f).argtypes = [P]
lib.libxenvchan_recv.argtypes = [P, P, ctypes.c_size_t]
lib.libxenvchan_send.argtypes = [P, ctypes.c_char_p, ctypes.c_size_t]
dom = int(sys.argv[1])
ctrl = lib.libxenvchan_server_init(None, dom, ("/local/domain/0/data/vchan/%d/111" % dom).encode(), 4096, 4096)
print("ready" if ctrl else "server_init failed", flush=True)
if not ctrl:
    sys.exit(1)
def recv(n):
    while lib.libxenvchan_data_ready(ctrl) < n:
        if lib.libxenvchan_is_open(ctrl) == 0:
            sys.exit("closed")
        lib.libxenvchan_wait(ctrl)
    buf = ctypes.create_string_buffer(n)
    lib.libxenvchan_recv(ctrl, buf, n)
    return buf.raw
def send(b):
    while lib.libxenvchan_send(ctrl, b, len(b)) == 0:
        lib.libxenvchan_wait(ctrl)
def msg(t, path, data=b""):
    return struct.pack("<B64s3xI", t, path.encode(), len(data)) + data
def show(what):
    while True:
        t, path, n = struct.unpack("<B64s3xI", recv(72))
        path = path.rstrip(b"\0").decode()
        data = recv(n) if n else b""
        if t == 1:
            # A write of the domain's own: stored and answered, as dom0's
            # qubesdb-daemon does.
            print("vm write '%s' '%s'" % (path, data.decode()), flush=True)
            send(msg(7, path))
            continue
        if t == 4:
            # A removal of the domain's own: answered the same way.
            print("vm rm '%s'" % path, flush=True)
            send(msg(7, path))
            continue
        print("%s type %d path '%s' length %d" % (what, t, path, n), flush=True)
        return
show("request")
for line in open(sys.argv[2]).read().splitlines():
    op, _, rest = line.partition(" ")
    path, _, value = rest.partition(" ")
    if op == "E":
        send(msg(11, path, value.encode()))
    elif op == "END":
        send(msg(11, ""))
    elif op == "W":
        send(msg(1, path, value.encode()))
    elif op == "R":
        send(msg(4, path))
    elif op == "A":
        show(rest)
    elif op == "P":
        while not os.path.exists(path):
            time.sleep(0.2)
while True:
    show("later")
PY
"#;

/// A shell snippet that writes `/qrexec.py DOMID`: dom0's qrexec daemon,
/// as far as a firewall VM meets it, over `libxenvchan` (qubes-core-qrexec
/// is not packaged for Debian; the messages are its `qrexec.h`). It
/// connects to the agent's control vchan (port 512, the VM serves it),
/// exchanges HELLO, and runs four service calls the way the daemon and
/// `qrexec-client` do — a data vchan served by dom0 on a new port (64 KiB
/// rings, as qrexec-client asks), EXEC_CMDLINE with that port, HELLO there,
/// stdin, then stdout/stderr until the exit status, and the agent's
/// CONNECTION_TERMINATED on the control connection. Then it closes the
/// control connection and connects again (a restarted daemon). Each
/// result is a line `call <command>: exit <status> stderr '<text>'` or
/// `hello version N` or `terminated port N`.
pub const QREXEC_DAEMON: &str = r#"cat > /qrexec.py <<'PY'
import ctypes, struct, sys, time
lib = ctypes.CDLL("libxenvchan.so.4.17")
P = ctypes.c_void_p
lib.libxenvchan_client_init.restype = P
lib.libxenvchan_client_init.argtypes = [P, ctypes.c_int, ctypes.c_char_p]
lib.libxenvchan_server_init.restype = P
lib.libxenvchan_server_init.argtypes = [P, ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t]
for f in ("libxenvchan_is_open", "libxenvchan_wait", "libxenvchan_data_ready", "libxenvchan_close"):
    getattr(lib, f).argtypes = [P]
lib.libxenvchan_recv.argtypes = [P, P, ctypes.c_size_t]
lib.libxenvchan_send.argtypes = [P, ctypes.c_char_p, ctypes.c_size_t]
dom = int(sys.argv[1])
def out(line):
    print(line, flush=True)
def recv(ch, n):
    deadline = time.time() + 20
    while lib.libxenvchan_data_ready(ch) < n:
        if time.time() > deadline:
            sys.exit("timed out waiting for %d bytes" % n)
        time.sleep(0.01)
    buf = ctypes.create_string_buffer(n)
    lib.libxenvchan_recv(ch, buf, n)
    return buf.raw
def send(ch, b):
    while lib.libxenvchan_send(ch, b, len(b)) == 0:
        time.sleep(0.01)
def msg(t, body=b""):
    return struct.pack("<II", t, len(body)) + body
def read_msg(ch):
    t, n = struct.unpack("<II", recv(ch, 8))
    return t, (recv(ch, n) if n else b"")
def connect_control():
    path = ("/local/domain/%d/data/vchan/0/512" % dom).encode()
    deadline = time.time() + 30
    while True:
        ctrl = lib.libxenvchan_client_init(None, dom, path)
        if ctrl:
            break
        if time.time() > deadline:
            sys.exit("no control vchan from the agent")
        time.sleep(0.2)
    send(ctrl, msg(0x300, struct.pack("<I", 3)))
    t, body = read_msg(ctrl)
    out("hello type %#x version %d" % (t, struct.unpack("<I", body)[0]))
    return ctrl
ctrl = connect_control()
calls = [
    (b"DEFAULT:QUBESRPC qubes.WaitForSession dom0", b""),
    (b"DEFAULT:QUBESRPC qubes.SetDateTime dom0", b"2026-11-27T12:00:00+00:00" + bytes([10])),
    (b"user:QUBESRPC qubes.Filecopy dom0", b"data"),
    (b"root:id", b""),
]
for i, (cmd, stdin) in enumerate(calls):
    port = 513 + i
    data = lib.libxenvchan_server_init(None, dom, ("/local/domain/0/data/vchan/%d/%d" % (dom, port)).encode(), 65536, 65536)
    if not data:
        sys.exit("server_init for port %d failed" % port)
    send(ctrl, msg(0x200, struct.pack("<II", 0, port) + cmd + bytes([0])))
    t, body = read_msg(data)
    if t != 0x300:
        sys.exit("data connection opened with type %#x" % t)
    send(data, msg(0x300, struct.pack("<I", 3)))
    if stdin:
        send(data, msg(0x190, stdin))
    send(data, msg(0x190))
    stdout, stderr, code = b"", b"", None
    while code is None:
        t, body = read_msg(data)
        if t == 0x191:
            stdout += body
        elif t == 0x192:
            stderr += body
        elif t == 0x193:
            code = struct.unpack("<I", body)[0]
        else:
            sys.exit("unexpected type %#x on the data connection" % t)
    out("call %s: exit %d stdout '%s' stderr '%s'" % (cmd.decode(), code, stdout.decode(), stderr.decode().strip()))
    t, body = read_msg(ctrl)
    d, p = struct.unpack("<II", body)
    out("terminated type %#x domain %d port %d" % (t, d, p))
    lib.libxenvchan_close(data)
# A restarted daemon: the agent serves the control connection again.
lib.libxenvchan_close(ctrl)
time.sleep(2)
ctrl = connect_control()
out("done")
PY
"#;

/// A shell snippet that writes `/names.py ADDRESS`: dom0's DNS server for
/// the nested test, at ADDRESS port 53 (so that its answers come from the
/// address asked: the firewall takes no other), answering every A
/// question with 10.0.2.2 (the bridge's own address) for a minute —
/// except `go.test`, unknown until `/tmp/go` exists (the Qubes test's
/// go-ahead to its clients) — and each question as a line `asked <name>`.
pub const NAME_SERVER: &str = r#"cat > /names.py <<'PY'
import os, socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
while True:
    q, peer = s.recvfrom(512)
    if len(q) < 17:
        continue
    end = 12
    while end < len(q) and q[end] != 0:
        end += 1 + q[end]
    qtype = struct.unpack("!H", q[end + 1:end + 3])[0]
    labels, i = [], 12
    while i < end:
        labels.append(q[i + 1:i + 1 + q[i]].decode(errors="replace"))
        i += 1 + q[i]
    name = ".".join(labels)
    print("asked %s" % name, flush=True)
    known = name != "go.test" or os.path.exists("/tmp/go")
    answer = b""
    if known and qtype == 1:
        answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + bytes([10, 0, 2, 2])
    flags = 0x8180 if known else 0x8183
    s.sendto(q[:2] + struct.pack("!HHHHH", flags, 1, 1 if answer else 0, 0, 0) + q[12:end + 5] + answer, peer)
PY
"#;

/// A shell snippet that writes `/corecheck.py DOMID ELF [ADDRESS...]`:
/// reads a stopped (or paused) Portcullis domain's memory and says, as
/// `core: ` lines, whether what should not change did: every read-only
/// segment of the kernel ELF (code, read-only data) byte for byte, the
/// boot page tables' translations of the addresses an exception needs
/// (identity), and the IDT's 32 exception gates (each at its stub, IST 1),
/// the GDT's descriptors and the TSS's IST stack. Its last line is
/// `core: verdict: sound ...` when all of that is as built, `core:
/// verdict: damaged ...` otherwise: with sound tables and code, an
/// exception reaches the kernel's reporter, so a domain that stopped with
/// a triple fault and a sound verdict was stopped by the (nested) CPU, not
/// by what it ran. Python 3 only (dom0).
pub const CORE_CHECK: &str = r#"cat > /corecheck.py <<'PY'
import ctypes, struct, sys
elf = open(sys.argv[2], "rb").read()
def out(s): print("core: " + s, flush=True)
def sections(b):
    shoff, = struct.unpack_from("<Q", b, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", b, 0x3a)
    hdrs = [struct.unpack_from("<IIQQQQIIQQ", b, shoff + i * shentsize) for i in range(shnum)]
    names = hdrs[shstrndx][4]
    def name(h):
        end = b.index(b"\0", names + h[0])
        return b[names + h[0]:end].decode()
    return {name(h): h for h in hdrs}
damage = []
# The domain's memory, a page at a time: read through libxenforeignmemory
# when the first argument is a domain id (what dom0 does: only the pages
# looked at are mapped, where `xl dump-core` maps all of them, minutes in
# the nested machine), or from a file in `xl dump-core`'s format.
frames = {}
if sys.argv[1].isdigit():
    fm = ctypes.CDLL("libxenforeignmemory.so.1")
    fm.xenforeignmemory_open.restype = ctypes.c_void_p
    fm.xenforeignmemory_open.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    fm.xenforeignmemory_map.restype = ctypes.c_void_p
    fm.xenforeignmemory_map.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_size_t, ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_int)]
    fm.xenforeignmemory_unmap.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    handle, dom = fm.xenforeignmemory_open(None, 0), int(sys.argv[1])
    def page(pfn):
        if pfn not in frames:
            arr, err = (ctypes.c_uint64 * 1)(pfn), (ctypes.c_int * 1)()
            at = fm.xenforeignmemory_map(handle, dom, 1, 1, arr, err)
            frames[pfn] = None
            if at and err[0] == 0:
                frames[pfn] = ctypes.string_at(at, 4096)
            if at:
                fm.xenforeignmemory_unmap(handle, at, 1)
        return frames[pfn]
else:
    core = open(sys.argv[1], "rb").read()
    cs = sections(core)
    pages = cs[".xen_pages"][4]
    index = {}
    if ".xen_pfn" in cs:
        h = cs[".xen_pfn"]
        for i in range(h[5] // 8):
            index[struct.unpack_from("<Q", core, h[4] + 8 * i)[0]] = i
    elif ".xen_p2m" in cs:
        h = cs[".xen_p2m"]
        for i in range(h[5] // 16):
            index[struct.unpack_from("<Q", core, h[4] + 16 * i)[0]] = i
    def page(pfn):
        i = index.get(pfn)
        return None if i is None else core[pages + i * 4096:pages + (i + 1) * 4096]
def phys(a, n):
    r = b""
    while n > 0:
        p = page(a >> 12)
        if p is None:
            return None
        k = min(n, 4096 - (a & 4095))
        r += p[a & 4095:(a & 4095) + k]
        a += k
        n -= k
    return r
# The kernel's symbols.
es = sections(elf)
sym = {}
st, strtab = es[".symtab"], es[".strtab"][4]
for i in range(st[5] // 24):
    nm, info, other, shn, value, size = struct.unpack_from("<IBBHQQ", elf, st[4] + 24 * i)
    end = elf.index(b"\0", strtab + nm)
    sym[elf[strtab + nm:end].decode(errors="replace")] = value
def find(part):
    return next((v for k, v in sym.items() if part in k), None)
# Read-only segments, byte for byte.
phoff, = struct.unpack_from("<Q", elf, 0x20)
phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
for i in range(phnum):
    t, flags, off, va, pa, filesz, memsz, align = struct.unpack_from("<IIQQQQQQ", elf, phoff + i * phentsize)
    if t != 1 or flags & 2:
        continue
    mem = phys(pa, filesz)
    if mem is None:
        out("segment at %#x: not all readable" % pa)
        damage.append("segment %#x missing" % pa)
        continue
    want = elf[off:off + filesz]
    bad = [] if mem == want else [j for j in range(filesz) if mem[j] != want[j]]
    if not bad:
        out("segment at %#x (%d bytes, flags %d): intact" % (pa, filesz, flags))
        continue
    out("segment at %#x (%d bytes, flags %d): %d bytes differ, first at %#x, last at %#x" % (pa, filesz, flags, len(bad), pa + bad[0], pa + bad[-1]))
    damage.append("segment %#x" % pa)
    for j in bad[:4]:
        s = j & ~15
        out("  %#x: now %s" % (pa + s, mem[s:s + 16].hex()))
        out("  %#x: elf %s" % (pa + s, want[s:s + 16].hex()))
# Translations through the boot page tables.
pml4 = find("boot_pml4")
def walk(va):
    table = pml4
    for level, shift in ((4, 39), (3, 30), (2, 21), (1, 12)):
        e = phys(table + 8 * ((va >> shift) & 511), 8)
        if e is None:
            return "table %#x not readable" % table
        e, = struct.unpack("<Q", e)
        if not e & 1:
            return "not present at level %d (entry %#x)" % (level, e)
        base = e & 0x000ffffffffff000
        if level == 1 or (level in (2, 3) and e & 0x80):
            return base + (va & ((1 << shift) - 1))
        table = base
for name in ("IDT", "GDT", "TSS", "EXCEPTION_STACK"):
    a = find("3cpu%d%s" % (len(name), name))
    if a is None:
        out("no symbol %s" % name)
        continue
    pa = walk(a)
    out("%s at %#x maps to %s" % (name, a, ("%#x" % pa) if isinstance(pa, int) else pa))
    if pa != a:
        damage.append("%s mapping" % name)
for a in [int(x, 16) for x in sys.argv[3:]]:
    pa = walk(a)
    out("%#x maps to %s" % (a, ("%#x" % pa) if isinstance(pa, int) else pa))
# The IDT's exception gates (a Once: its data 16 bytes after the symbol).
idt, stubs = find("3cpu3IDT"), find("exception_stubs")
if idt is None or stubs is None:
    damage.append("no IDT symbols")
else:
    want = [struct.unpack_from("<Q", phys(stubs, 256), 8 * i)[0] for i in range(32)]
    raw = phys(idt, 16 + 32 * 16)
    for skip in (0, 8, 16):
        gates = [struct.unpack_from("<HHBBHII", raw, skip + 16 * i) for i in range(32)]
        got = [g[0] | (g[4] << 16) | (g[5] << 32) for g in gates]
        if got[0] == want[0]:
            break
    good = sum(1 for i in range(32) if got[i] == want[i] and gates[i][2] == 1 and gates[i][3] == 0x8e)
    out("IDT exception gates right: %d of 32" % good)
    if good != 32:
        damage.append("IDT")
    for i in [i for i in range(32) if got[i] != want[i] or gates[i][2] != 1 or gates[i][3] != 0x8e][:6]:
        out("  gate %d: %s" % (i, raw[skip + 16 * i:skip + 16 * i + 16].hex()))
# The GDT: null, flat code and data (accessed bits aside), the TSS's
# descriptor (available or busy, limit 0x67) at the TSS, whose first IST
# entry is the top of the exception stack.
gdt, tss, stack = find("3cpu3GDT"), find("3cpu3TSS"), find("3cpu15EXCEPTION_STACK")
g = None if gdt is None else phys(gdt, 40)
t = None if tss is None else phys(tss, 0x68)
if None in (g, t, stack):
    damage.append("GDT or TSS missing")
else:
    out("GDT area: %s" % g.hex())
    null, code, data, lo, hi = struct.unpack_from("<QQQQQ", g, 0)
    base = ((lo >> 16) & 0xffffff) | (((lo >> 56) & 0xff) << 24) | ((hi & 0xffffffff) << 32)
    if null != 0 or code | (1 << 40) != 0x00af9b000000ffff or data | (1 << 40) != 0x00cf93000000ffff:
        damage.append("GDT")
    if lo & 0xffff != 0x67 or (lo >> 40) & 0xfd != 0x89 or base != tss:
        damage.append("TSS descriptor")
    out("TSS area: %s" % t[:64].hex())
    if struct.unpack_from("<Q", t, 0x24)[0] != stack + 16 * 1024:
        damage.append("TSS")
if damage:
    out("verdict: damaged (%s)" % ", ".join(damage))
else:
    out("verdict: sound (code, read-only data, page tables, IDT, GDT and TSS as built)")
PY
"#;

/// A shell snippet that defines `make_client INIT OUT`: packs an
/// initramfs for a Linux client VM (a PV domU booting dom0's own kernel,
/// `/vmlinuz`) from dom0's busybox and its libraries and the netfront
/// module, with `INIT` as its `/init`.
pub const CLIENT_IMAGE: &str = r#"make_client() {
    rm -rf /c && mkdir -p /c/bin /c/lib/x86_64-linux-gnu /c/lib64 /c/proc /c/sys /c/dev /c/tmp
    cp /usr/bin/busybox /c/bin/
    cp /lib/x86_64-linux-gnu/libc.so.6 /lib/x86_64-linux-gnu/libresolv.so.2 /c/lib/x86_64-linux-gnu/
    cp /lib64/ld-linux-x86-64.so.2 /c/lib64/
    cp $(find /lib/modules -name 'xen-netfront.ko*' | head -n 1) /c/xen-netfront.ko
    cp "$1" /c/init
    chmod +x /c/init
    (cd /c && find . | busybox cpio -o -H newc 2>/dev/null) > "$2"
}
"#;
