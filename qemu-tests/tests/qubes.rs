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
use qemu_tests::xen::{XenImages, CLIENT_IMAGE, CORE_CHECK, NAME_SERVER, QUBESDB_SERVER};

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

/// Restarts of a client in the loop.
const RESTARTS: usize = 8;

const SCRIPT: &str = r#"#!/bin/sh
log=/var/log/xen/console/guest-portcullis.log
for m in xen-gntalloc xen-gntdev xen-evtchn; do modprobe $m 2>/dev/null; done
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
probe() {
    what="ping upstream"; check ping -c 2 -W 5 10.0.2.2
    what="dns"; check sh -c 'nslookup upstream.test 10.139.1.1 | grep -q "10\.0\.2\.2"'
    what="tcp 5001"; check tcp 5001
    what="tcp 5002"; check tcp 5002
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
xl create -p /etc/xen/portcullis.cfg && echo "test: created firewall"
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
r=1
while [ $r -le @RESTARTS@ ]; do
    case "$(xl list | awk '$1 == "portcullis" { print $5 }')" in
        ""|*s*|*c*) echo "test: restart $r: the firewall domain has stopped"; break ;;
    esac
    rlog=/var/log/xen/console/guest-restart.log
    rm -f $rlog
    create /etc/xen/restart.cfg
    i=0
    until grep -qE "^stats: nic0 uplink rx_packets=[1-9]" $rlog 2>/dev/null || [ $i -ge 60 ]; do sleep 0.5; i=$((i + 1)); done
    if grep -qE "^stats: nic0 uplink rx_packets=[1-9]" $rlog; then echo "test: restart $r: network works"; else echo "test: restart $r: no network"; fi
    xl destroy restart
    i=0
    while xl list restart >/dev/null 2>&1 && [ $i -lt 20 ]; do sleep 0.5; i=$((i + 1)); done
    if xl list restart >/dev/null 2>&1; then
        echo "test: restart $r: the domain is still there after its destruction"
        xl list | sed 's/^/test: xl list: /'
    fi
    n=$(grep -c "serves nobody" $log)
    i=0
    until [ "$(grep -c 'serves nobody' $log)" -ge $((n + 1)) ] || [ $i -ge 30 ]; do sleep 0.5; i=$((i + 1)); done
    m=$(grep -c "^stats: pool" $log)
    i=0
    until [ "$(grep -c '^stats: pool' $log)" -ge $((m + 2)) ] || [ $i -ge 30 ]; do sleep 0.5; i=$((i + 1)); done
    grep "^stats: pool" $log | tail -n 1 | sed "s/^/test: memory after restart $r: /"
    r=$((r + 1))
done
xl list | sed 's/^/test: xl list at the end: /'
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

fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|v| v.parse().ok())
}

/// Not in `cargo xtask test` (CI): nested, building a domain corrupts
/// memory now and then — dom0's own shell read `til` for `until` and
/// segfaulted, dom0's domain builder found the client kernel "invalid",
/// and the firewall domain triple-faulted, each right at an `xl create`
/// — so a test that creates ten domains fails most runs for reasons
/// outside Portcullis. With Xen's `pcid=0 invpcid=0` (the nested
/// machine's default now) dom0 stayed sound and every client check
/// passed in two runs, but the firewall domain still stopped after three
/// or four client restarts (the script prints Xen's triple-fault report,
/// `test: xen: `, and `CORE_CHECK`'s view of the stopped domain). In two
/// later runs (one with `PORTCULLIS_XEN_CPU=max,-xsave`) it stopped at
/// a client's creation, right after an emulated `rdtsc` followed by a
/// register-only instruction that cannot fault, or with Xen's own RIP, CR3
/// and stack in its state — while dom0's `xl` segfaulted — and its code
/// and tables were found as built (the one stop checked). Run it with
/// `cargo test -p qemu-tests --test qubes -- --ignored --nocapture`
/// (about 7 minutes); see the Xen issue's notes. On 2026-11-28, with
/// the loop blocking in Xen up to 10 ms when idle, the last two of six
/// runs passed whole (README, the nested machine's defect).
#[test]
#[ignore = "nested Xen corrupts memory at domain creation too often for CI (see the doc comment)"]
fn serves_linux_client_vms_as_a_qubes_firewall_vm() {
    let images =
        XenImages::ensure().unwrap_or_else(|e| panic!("cannot build the nested-Xen images: {e}"));
    let script = SCRIPT
        .replace("@QDB@", QUBESDB_SERVER)
        .replace("@CORE@", CORE_CHECK)
        .replace("@NAMES@", NAME_SERVER)
        .replace("@CLIENT@", CLIENT_IMAGE)
        .replace("@RESTARTS@", &RESTARTS.to_string());
    // PORTCULLIS_XL_EXTRA: lines added to every Portcullis domain's `xl`
    // config (experiments on the nested machine, e.g. `hap = 0`).
    let extra = std::env::var("PORTCULLIS_XL_EXTRA").unwrap_or_default();
    let script = script.replace("@XL_EXTRA@", &extra);
    let firewall_cfg = format!("{FIREWALL_CFG}{extra}\n");
    let run = images
        .run(kernel(), &firewall_cfg, &script, Duration::from_secs(900))
        .unwrap_or_else(|e| panic!("{e}"));
    let test: Vec<&str> = run
        .console
        .lines()
        .filter_map(|l| l.find("test: ").map(|at| &l[at + 6..]))
        .collect();
    for l in &test {
        println!("{l}");
    }
    let all = test.join("\n");
    let says = |line: &str| test.iter().any(|l| l.ends_with(line));
    assert!(!all.contains("timed out waiting"), "{all}");
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
    // Each restart found working network, and the firewall's memory after
    // the last equals that after the first.
    for r in 1..=RESTARTS {
        assert!(
            says(&format!("restart {r}: network works")),
            "restart {r}:\n{all}"
        );
    }
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
    assert_eq!(memory(1), memory(RESTARTS), "memory after the restarts");
}
