//! Portcullis as a Qubes firewall VM under a real Xen 4.17, nested in
//! QEMU TCG: its uplink a netfront on dom0's bridge (dom0 plays sys-net:
//! the gateway 10.0.2.2 with a DNS server and TCP echo servers), its
//! configuration and rules from dom0's QubesDB over vchan, and client VMs
//! whose vifs name it as their backend (`driver_domain=1`): Linux PV
//! domUs (dom0's own kernel and busybox) and, for the restart loop,
//! Portcullis domains. Judged by the clients' traffic and by the
//! firewall's counters. Needs root and (once) the Debian mirrors.

use std::time::Duration;

use qemu_tests::kernel;
use qemu_tests::xen::{
    script_lines, XenImages, CLIENT_IMAGE, CORE_CHECK, NAME_SERVER, QUBESDB_SERVER,
};

const FIREWALL_CFG: &str = r#"name = "portcullis"
type = "pvh"
kernel = "/portcullis"
memory = 64
vcpus = 1
driver_domain = 1
vif = ["bridge=br0,mac=00:16:3e:00:00:0f"]
extra = "/qubes-ip=10.0.2.15 /qubes-netmask=255.255.255.0 /qubes-gateway=10.0.2.2 /qubes-netvm-gateway=10.137.0.1 stats-interval=1"
on_poweroff = "destroy"
on_reboot = "preserve"
on_crash = "preserve"
"#;

/// Restarts of a client in the loop (the issue's fifty), unless
/// `PORTCULLIS_RESTARTS` says otherwise.
const RESTARTS: usize = 50;

fn restarts() -> usize {
    std::env::var("PORTCULLIS_RESTARTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n >= 2)
        .unwrap_or(RESTARTS)
}

const SCRIPT: &str = r#"#!/bin/sh
log=/var/log/xen/console/guest-portcullis.log
for m in xen-gntalloc xen-gntdev xen-evtchn; do modprobe $m 2>/dev/null; done
# A watchdog for the nested machine's defect (dom0's processes crash now
# and then): dom0's XenStore and console daemons gone, the kernel's
# reports of crashed processes, and libc as dom0 reads it (its page
# cache) no longer what it was, as `test: watchdog: ` lines (once each).
(
    seen=0
    gone=""
    libc=/lib/x86_64-linux-gnu/libc.so.6
    sum=$(md5sum < $libc)
    while sleep 20; do
        case "$gone" in *libc*) ;; *)
            [ "$(md5sum < $libc)" = "$sum" ] || { echo "test: watchdog: $libc changed in dom0's memory"; gone="$gone libc"; } ;;
        esac
        for d in xenstored xenconsoled; do
            case " $gone " in *" $d "*) continue ;; esac
            pgrep -x $d > /dev/null || { echo "test: watchdog: $d is gone"; gone="$gone $d"; }
        done
        crashes=$(dmesg | grep -E "segfault|general protection|traps:|invalid opcode")
        n=$(printf '%s' "$crashes" | grep -c .)
        if [ "$n" -gt "$seen" ]; then
            printf '%s\n' "$crashes" | tail -n $((n - seen)) | sed 's/^/test: watchdog: dom0: /'
            seen=$n
        fi
    done
) &
@QDB@
@CORE@
@CLIENT@
# sys-net's services on dom0's bridge: DNS (`NAME_SERVER`: every name is
# 10.0.2.2, but go.test only once /tmp/go exists: the clients' go-ahead)
# and TCP echo servers on ports 5001 and 5002.
@NAMES@
python3 /names.py 10.0.2.2 > /tmp/dns.log 2>&1 &
busybox nc -ll -p 5001 -e /bin/cat > /dev/null 2>&1 &
busybox nc -ll -p 5002 -e /bin/cat > /dev/null 2>&1 &
# And UDP: a TFTP server that answers every read request with one short
# block naming the file, from port 69 itself (so that the answer is the
# reply of the client's flow; a server's new port would be a new flow,
# which no firewall without a TFTP helper lets in).
cat > /tftp.py <<'PY'
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("10.0.2.2", 69))
while True:
    d, peer = s.recvfrom(1500)
    if d[:2] == b"\x00\x01":
        name = d[2:].split(b"\x00")[0]
        s.sendto(b"\x00\x03\x00\x01hello over udp " + name + b"\n", peer)
PY
python3 /tftp.py > /tmp/tftp.log 2>&1 &
# The firewall's QubesDB: three clients; 10.137.0.10 may ping, ask DNS
# and reach TCP port 5001 only; the others anything. Later (when the test
# touches /tmp/qdb-push) 10.137.0.10 loses port 5001.
cat > /qdb-script <<'QDB'
E /qubes-primary-dns 10.0.2.2
E /qubes-netvm-primary-dns 10.139.1.1
E /connected-ips 10.137.0.10 10.137.0.11 10.137.0.12
E /qubes-firewall/10.137.0.10/policy drop
E /qubes-firewall/10.137.0.10/0000 action=accept proto=icmp
E /qubes-firewall/10.137.0.10/0001 action=accept specialtarget=dns
E /qubes-firewall/10.137.0.10/0002 action=accept proto=tcp dstports=5001-5001
E /qubes-firewall/10.137.0.11/policy accept
E /qubes-firewall/10.137.0.12/policy accept
END
P /tmp/qdb-push
R /qubes-firewall/10.137.0.10/
W /qubes-firewall/10.137.0.10/policy drop
W /qubes-firewall/10.137.0.10/0000 action=accept proto=icmp
W /qubes-firewall/10.137.0.10/0001 action=accept specialtarget=dns
W /qubes-firewall/10.137.0.10
A update answer
A update answer
A update answer
A update answer
A update answer
QDB
# A Linux client VM: its address from the kernel command line; probes
# upstream through the firewall, printed as `client: ...` lines.
cat > /client-init <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
ip=$(sed 's/.*client_ip=\([0-9.]*\).*/\1/' /proc/cmdline)
insmod /xen-netfront.ko
i=0; until [ -e /sys/class/net/eth0 ] || [ $i -ge 100 ]; do sleep 0.2; i=$((i+1)); done
ip link set lo up
ip link set eth0 up
ip addr add $ip/32 dev eth0
ip route add 10.137.0.1 dev eth0
ip route add default via 10.137.0.1 dev eth0
echo "client: $ip network up"
check() {
    if "$@" >/dev/null 2>&1; then echo "client: $ip $round $what ok"; else echo "client: $ip $round $what failed"; fi
}
tcp() {
    r=$(echo "hello $1" | nc -w 5 10.0.2.2 $1 2>&1)
    [ "$r" = "hello $1" ]
}
udp() {
    rm -f /tmp/udp
    timeout 10 tftp -g -r "$ip-$round" -l /tmp/udp 10.0.2.2 && grep -q "hello over udp $ip-$round" /tmp/udp
}
probe() {
    what="ping upstream"; check ping -c 2 -W 5 10.0.2.2
    what="dns"; check sh -c 'nslookup upstream.test 10.139.1.1 | grep -q "10\.0\.2\.2"'
    what="tcp 5001"; check tcp 5001
    what="tcp 5002"; check tcp 5002
    what="udp"; check udp
}
round=first
# The first ping may wait for the firewall's ARP for dom0.
ping -c 1 -W 10 10.0.2.2 >/dev/null 2>&1
probe
case $ip in
10.137.0.10)
    echo "client: $ip first round done"
    i=0
    until nslookup go.test 10.139.1.1 >/dev/null 2>&1 || [ $i -ge 120 ]; do sleep 1; i=$((i+1)); done
    round=second
    probe
    ;;
*)
    what="ping other client"; check ping -c 2 -W 3 10.137.0.10
    ip addr add 10.137.0.99/32 dev eth0
    what="spoofed ping"; check ping -I 10.137.0.99 -c 2 -W 3 10.0.2.2
    ;;
esac
echo "client: $ip done"
poweroff -f
INIT
make_client /client-init /client.cpio
client_cfg() {
    cat <<CFG
name = "$1"
type = "pv"
kernel = "/vmlinux"
ramdisk = "/client.cpio"
extra = "console=hvc0 quiet client_ip=$2"
memory = 128
vcpus = 1
vif = ["backend=portcullis,ip=$2,mac=00:16:3e:00:00:$3"]
on_poweroff = "destroy"
on_crash = "destroy"
CFG
}
client_cfg client-a 10.137.0.10 10 > /etc/xen/client-a.cfg
client_cfg client-b 10.137.0.11 11 > /etc/xen/client-b.cfg
cat > /etc/xen/restart.cfg <<'CFG'
name = "restart"
type = "pvh"
kernel = "/portcullis"
memory = 64
vcpus = 1
vif = ["backend=portcullis,ip=10.137.0.12,mac=00:16:3e:00:00:12"]
extra = "/qubes-ip=10.137.0.12 /qubes-netmask=255.255.255.255 /qubes-gateway=10.137.0.1 /qubes-netvm-gateway=10.139.0.1 stats-interval=1"
on_poweroff = "destroy"
on_crash = "destroy"
@XL_EXTRA@
CFG
# `xl create`, with its errors and Xen's memory shown when it fails.
create() {
    if out=$(xl create "$1" 2>&1); then
        echo "test: created $1"
    else
        echo "test: xl create $1 failed: $(echo $out | tail -c 800)"
        xl list | sed 's/^/test: xl list: /'
        xl info | grep -E "total_memory|free_memory" | sed 's/^/test: xl info: /'
    fi
}
waitfor() {
    i=0
    until grep -q "$2" "$1" 2>/dev/null || [ $i -ge $3 ]; do sleep 1; i=$((i + 1)); done
    grep -q "$2" "$1" 2>/dev/null || echo "test: timed out waiting for '$2' in $1"
}
# What Xen chose for the nested CPU (vendor, mitigations, HAP), for the
# record of the nested machine's defect (docs/nested-machine.md).
xl dmesg | grep -iE "vendor|xpti|pv-l1tf|speculative mitigation|support for (hvm|pv)|hap|pcid|xsave" | head -n 20 | sed 's/^/test: xen boot: /'
if out=$(xl create -p /etc/xen/portcullis.cfg 2>&1); then
    echo "test: created firewall"
else
    echo "test: xl create of the firewall failed: $(echo $out | tail -c 800)"
fi
python3 /qdb.py $(xl domid portcullis) /qdb-script > /tmp/qdb.log 2>&1 &
waitfor /tmp/qdb.log ready 10
xl unpause portcullis
waitfor $log "portcullis: ready" 60
t=$(date +%s)
alog=/var/log/xen/console/guest-client-a.log
blog=/var/log/xen/console/guest-client-b.log
create /etc/xen/client-a.cfg
waitfor $alog "client: 10.137.0.10 first round done" 180
echo "test: client-a's first round after $(( $(date +%s) - t )) s"
# A rule update pushed live: client-a loses TCP port 5001.
touch /tmp/qdb-push
waitfor $log "qubesdb: rules of 10.137.0.10 replaced" 30
touch /tmp/go
waitfor $alog "client: 10.137.0.10 done" 120
echo "test: client-a done after $(( $(date +%s) - t )) s"
# Another client, after the update (its rules were not touched by it).
create /etc/xen/client-b.cfg
waitfor $blog "client: 10.137.0.11 done" 180
echo "test: client-b done after $(( $(date +%s) - t )) s"
sed 's/^/test: client-a: /' $alog
sed 's/^/test: client-b: /' $blog
sed 's/^/test: qdb: /' /tmp/qdb.log
grep "^stats: drops" $log | tail -n 1 | sed 's/^/test: firewall: /'
# A client destroyed and created again, each time with working network
# (its gateway answered its ARP through our netback: a frame received);
# the firewall's memory after each restart.
ms() { echo $(( $(date +%s%N) / 1000000 )); }
r=1
while [ $r -le @RESTARTS@ ]; do
    case "$(xl list | awk '$1 == "portcullis" { print $5 }')" in
        ""|*s*|*c*) echo "test: restart $r: the firewall domain has stopped"; break ;;
    esac
    rlog=/var/log/xen/console/guest-restart.log
    rm -f $rlog
    # The firewall's removals of a client's vif so far: one more is this
    # client's.
    n=$(grep -c "netback: vif[0-9]*: removed " $log)
    t0=$(ms)
    create /etc/xen/restart.cfg
    t1=$(ms)
    i=0
    until grep -qE "^stats: nic0 uplink rx_packets=[1-9]" $rlog 2>/dev/null || [ $i -ge 300 ]; do sleep 0.1; i=$((i + 1)); done
    t2=$(ms)
    if grep -qE "^stats: nic0 uplink rx_packets=[1-9]" $rlog; then echo "test: restart $r: network works"; else echo "test: restart $r: no network"; fi
    xl destroy restart
    i=0
    while xl list restart >/dev/null 2>&1 && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    if xl list restart >/dev/null 2>&1; then
        echo "test: restart $r: the domain is still there after its destruction"
        xl list | sed 's/^/test: xl list: /'
    fi
    t3=$(ms)
    i=0
    until [ "$(grep -c 'netback: vif[0-9]*: removed ' $log)" -gt $n ] || [ $i -ge 150 ]; do sleep 0.1; i=$((i + 1)); done
    [ "$(grep -c 'netback: vif[0-9]*: removed ' $log)" -gt $n ] || echo "test: restart $r: the firewall did not release the client's vif"
    t4=$(ms)
    # The firewall's memory once it has counted after the release.
    m=$(grep -c "^stats: pool" $log)
    i=0
    until [ "$(grep -c '^stats: pool' $log)" -ge $((m + 2)) ] || [ $i -ge 50 ]; do sleep 0.1; i=$((i + 1)); done
    grep "^stats: pool" $log | tail -n 1 | sed "s/^/test: memory after restart $r: /"
    echo "test: restart $r: ms: create $((t1 - t0)) network $((t2 - t1)) destroy $((t3 - t2)) release $((t4 - t3)) memory $(( $(ms) - t4 ))"
    r=$((r + 1))
done
xl list | sed 's/^/test: xl list at the end: /'
# The firewall removed each client's vif directory once the toolstack
# closed it (libxl waits for that, and nobody else removes it; the client
# domains' directories above them are dom0's).
area=/local/domain/$(xl domid portcullis)/backend/vif
left=$(for d in $(xenstore-list $area 2>/dev/null); do xenstore-list $area/$d; done | wc -l)
echo "test: client vifs left in the firewall's backend area: $left"
# Xen's report of a domain that stopped (a triple fault), if any.
xl dmesg | grep -A 22 "Triple fault" | head -n 50 | sed 's/^/test: xen: /'
# And whether its memory was overwritten (`CORE_CHECK`).
case "$(xl list | awk '$1 == "portcullis" { print $5 }')" in
    *s*|*c*)
        /usr/lib/xen-4.17/bin/xenctx -a $(xl domid portcullis) 0 > /tmp/ctx 2>&1
        python3 /corecheck.py $(xl domid portcullis) /portcullis $(awk '$1 == "rip:" || $1 == "rsp:" { print $2 }' /tmp/ctx) 2>&1 | sed 's/^/test: /' ;;
esac
xl destroy portcullis
grep -v "^stats: \(nic\|core\|dns\|rules\|firewall\|drops\)" $log | sed 's/^/test: log: /'
"#;

/// Whether the nested machine, not what it ran, stopped the firewall
/// domain: it stopped (the script then checks its memory, `CORE_CHECK`)
/// and every check found its code, page tables, IDT, GDT and TSS as built
/// — with those sound, an exception of its own reaches the kernel's
/// reporter instead of resetting the domain.
fn stopped_by_the_machine(console: &str) -> bool {
    let verdicts: Vec<&str> = script_lines(console)
        .filter_map(|l| l.strip_prefix("core: verdict: "))
        .collect();
    !verdicts.is_empty() && verdicts.iter().all(|v| v.starts_with("sound"))
}

/// Whether the script's watchdog saw dom0's XenStore or console daemon
/// gone, dom0's kernel report a crashed process, or libc change in dom0's
/// memory.
fn dom0_crashed(console: &str) -> bool {
    script_lines(console).any(|l| l.starts_with("watchdog: "))
}

fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|v| v.parse().ok())
}

/// Run by hand, about ten minutes with fifty restarts
/// (`cargo test -p qemu-tests --test qubes -- --ignored --nocapture`;
/// `PORTCULLIS_RESTARTS=N` for fewer). Not in `cargo xtask test` (CI): the
/// nested machine (QEMU's TCG running Xen) crashes dom0's processes or
/// stops a domain in most runs — its symptoms, runs and the options tried
/// are in `docs/nested-machine.md`.
///
/// As in the uplink test (`tests/xen.rs`), a run in which the firewall
/// domain stopped with its memory as built (`CORE_CHECK`, run by the
/// script on a stopped firewall) gets one more run, and so does a run
/// that stalled after the script's watchdog reported a dom0 crash. A
/// second stop, or one with the firewall's memory changed, fails.
#[test]
#[ignore = "the nested machine stops dom0 or a domain in most runs (see the doc comment)"]
fn serves_linux_client_vms_as_a_qubes_firewall_vm() {
    let restarts = restarts();
    let images =
        XenImages::ensure().unwrap_or_else(|e| panic!("cannot build the nested-Xen images: {e}"));
    let script = SCRIPT
        .replace("@QDB@", QUBESDB_SERVER)
        .replace("@CORE@", CORE_CHECK)
        .replace("@NAMES@", NAME_SERVER)
        .replace("@CLIENT@", CLIENT_IMAGE)
        .replace("@RESTARTS@", &restarts.to_string());
    // PORTCULLIS_XL_EXTRA: lines added to every Portcullis domain's `xl`
    // config (experiments on the nested machine, e.g. `hap = 0`).
    let extra = std::env::var("PORTCULLIS_XL_EXTRA").unwrap_or_default();
    let script = script.replace("@XL_EXTRA@", &extra);
    let firewall_cfg = format!("{FIREWALL_CFG}{extra}\n");
    let nested = || {
        images
            .run(
                kernel(),
                &firewall_cfg,
                &script,
                Duration::from_secs(600 + 30 * restarts as u64),
            )
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let mut run = nested();
    // One more run when the nested machine stopped the firewall domain
    // with its memory as built, or stopped dom0 after crashing one of its
    // processes (see the doc comment); a second such stop fails below
    // like any other.
    if stopped_by_the_machine(&run.console) || (run.stalled && dom0_crashed(&run.console)) {
        println!("the nested machine stopped a domain (its report above); a second run:");
        run = nested();
    }
    assert!(!run.stalled, "the script stalled (Xen's state above)");
    // (Its lines were shown as they came: `XenImages::run`.)
    let test: Vec<&str> = run.script_lines().collect();
    let all = test.join("\n");
    let says = |line: &str| test.iter().any(|l| l.ends_with(line));
    assert!(!all.contains("timed out waiting"), "{all}");
    // The firewall domain ran to the end (the script checks the memory of
    // a stopped one: `core: ` lines).
    assert!(
        !test.iter().any(|l| l.starts_with("core: verdict: ")),
        "the firewall domain stopped:\n{all}"
    );
    // client-a: upstream by ping (NAT), DNS through the virtual server
    // 10.139.1.1 (redirected to dom0's), TCP to the one allowed port; the
    // other port refused by its rules.
    for (line, why) in [
        (
            "client: 10.137.0.10 first ping upstream ok",
            "ping through NAT",
        ),
        ("client: 10.137.0.10 first dns ok", "DNS redirection"),
        (
            "client: 10.137.0.10 first tcp 5001 ok",
            "an allowed TCP port",
        ),
        (
            "client: 10.137.0.10 first tcp 5002 failed",
            "a port its rules drop",
        ),
        ("client: 10.137.0.10 first udp failed", "UDP its rules drop"),
        // After the live update: port 5001 is gone, the rest still works.
        (
            "client: 10.137.0.10 second ping upstream ok",
            "ping after the update",
        ),
        ("client: 10.137.0.10 second dns ok", "DNS after the update"),
        (
            "client: 10.137.0.10 second tcp 5001 failed",
            "the rule pushed live",
        ),
        (
            "client: 10.137.0.10 second tcp 5002 failed",
            "still dropped",
        ),
        // client-b (policy accept), after the update: its rules untouched.
        (
            "client: 10.137.0.11 first ping upstream ok",
            "client-b's ping",
        ),
        ("client: 10.137.0.11 first tcp 5001 ok", "client-b's TCP"),
        (
            "client: 10.137.0.11 first tcp 5002 ok",
            "client-b's other port",
        ),
        ("client: 10.137.0.11 first udp ok", "client-b's UDP (TFTP)"),
        // Isolation and anti-spoofing.
        (
            "client: 10.137.0.11 first ping other client failed",
            "client to client",
        ),
        (
            "client: 10.137.0.11 first spoofed ping failed",
            "a spoofed source",
        ),
    ] {
        assert!(says(line), "{why}: no '{line}' in\n{all}");
    }
    assert!(
        test.iter()
            .any(|l| l.contains("qubesdb: rules of 10.137.0.10 replaced: 2 rules, policy Drop")),
        "{all}"
    );
    // The firewall counted what it refused.
    let drops = test
        .iter()
        .find(|l| l.starts_with("firewall: stats: drops"))
        .unwrap_or_else(|| panic!("no drop counters in\n{all}"));
    assert!(field(drops, "spoofed-source=").unwrap_or(0) >= 2, "{drops}");
    assert!(
        field(drops, "client-to-client=").unwrap_or(0) >= 2,
        "{drops}"
    );
    // Each restart found working network, the firewall released each
    // client's vif once the client was gone, and its memory after the last
    // restart equals that after the first.
    for r in 1..=restarts {
        assert!(
            says(&format!("restart {r}: network works")),
            "restart {r}:\n{all}"
        );
    }
    assert!(!all.contains("did not release"), "{all}");
    assert!(
        says("client vifs left in the firewall's backend area: 0"),
        "{all}"
    );
    let memory = |r: usize| -> (u64, u64) {
        let prefix = format!("memory after restart {r}: ");
        let line = test
            .iter()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no memory line after restart {r}:\n{all}"));
        (
            field(line, "heap_in_use=").expect("heap_in_use"),
            field(line, "dma_free=").expect("dma_free"),
        )
    };
    assert_eq!(memory(1), memory(restarts), "memory after the restarts");
}
