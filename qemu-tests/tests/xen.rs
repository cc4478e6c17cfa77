//! Portcullis as a PVH domU under a real Xen 4.17 with a Linux dom0,
//! nested in QEMU TCG. Needs root and the Debian mirrors the first time
//! (the images are cached under /var/cache/portcullis/xen).

use std::time::Duration;

use qemu_tests::kernel;
use qemu_tests::xen::{XenImages, CORE_CHECK, NAME_SERVER, QREXEC_DAEMON, QUBESDB_SERVER};

const XL_CFG: &str = r#"name = "portcullis"
type = "pvh"
kernel = "/portcullis"
memory = 64
vcpus = 2
vif = ["bridge=br0,mac=00:16:3e:00:00:0f"]
extra = "/qubes-ip=10.0.2.15 /qubes-netmask=255.255.255.0 /qubes-gateway=10.0.2.2 /qubes-netvm-gateway=10.137.0.1 stats-interval=1"
on_poweroff = "destroy"
on_reboot = "preserve"
on_crash = "preserve"
"#;

/// Creates the domain three times: without a vif, so it reports its
/// boot (both vCPUs online) and ends itself; as configured but with one
/// vCPU — waits for its netfront to connect to dom0's netback, pings it
/// from dom0 across the bridge, destroys it; and with a bad command line,
/// reporting how that ended. Each `test: created N` names the domain id.
///
/// The nested machine resets a domain now and then (a triple fault,
/// which Xen turns into a reboot; `on_reboot = "preserve"` keeps it): in a
/// few percent of runs, at boot, mid-run or when dom0 attaches a device,
/// often while dom0's own processes crash; once the reset domain's state
/// held Xen's own RIP, CR3 and stack. Each time the domain's code and
/// tables were found as built (`CORE_CHECK`, run on every stopped domain
/// and once on the running one), so an exception of its own would have
/// reached its reporter: the machine's doing (the Xen issue's notes). So
/// the forwarding domain gets a second attempt when the first ends before
/// it is ready, and the whole run a second one when the domain stopped
/// mid-run, each only when its memory was found sound; the script prints
/// Xen's last log lines, the vCPU's registers and the check
/// (`test: early end ...`, `test: lost ...`), which the test shows;
/// everything is asserted on the attempt that came up.
const SCRIPT: &str = r#"#!/bin/sh
log=/var/log/xen/console/guest-portcullis.log
# dom0's QubesDB for the forwarding domain (`QUBESDB_SERVER`): a few
# entries, the empty write that completes a client's rules and the answer;
# then, when the test asks, a live update: the client's rules replaced.
@QDB@
@QREXEC@
@CORE@
@NAMES@
# The upstream DNS servers the database names (10.0.2.3, later 10.0.2.4)
# are dom0 (`NAME_SERVER`): for the firewall's `dsthost` lookups.
ip addr add 10.0.2.3/24 dev br0
ip addr add 10.0.2.4/24 dev br0
python3 /names.py 10.0.2.3 > /tmp/names.log 2>&1 &
python3 /names.py 10.0.2.4 > /tmp/names2.log 2>&1 &
cat > /qdb-script <<'QDB'
E /qubes-primary-dns 10.0.2.3
E /qubes-netvm-primary-dns 10.139.1.1
E /connected-ips 10.137.0.10
E /qubes-firewall/10.137.0.10/policy drop
E /qubes-firewall/10.137.0.10/0000 action=accept proto=icmp
E /qubes-firewall/10.137.0.10/0001 action=accept proto=tcp dsthost=pin.example
END
W /qubes-firewall/10.137.0.10
A answer
P /tmp/qdb-push
R /qubes-firewall/10.137.0.10/
W /qubes-firewall/10.137.0.10/policy accept
W /qubes-firewall/10.137.0.10/0000 action=drop proto=tcp
W /qubes-firewall/10.137.0.10
A update answer
A update answer
A update answer
A update answer
W /connected-ips 10.137.0.10 10.137.0.20
A clients answer
W /qubes-primary-dns 10.0.2.4
A uplink answer
QDB
cat > /qdb-script2 <<'QDB'
E /qubes-primary-dns 10.0.2.3
E /qubes-netvm-primary-dns 10.139.1.1
E /connected-ips 10.137.0.10
E /qubes-firewall/10.137.0.10/policy drop
E /qubes-firewall/10.137.0.10/0000 action=accept proto=udp
E /qubes-firewall/10.137.0.10/0001 action=accept proto=icmp
END
QDB
for m in xen-gntalloc xen-gntdev xen-evtchn; do modprobe $m 2>/dev/null; done
# Xen's last log lines and the vCPU's registers, as `test: $1: ...` lines.
diagnose() {
    xl dmesg | grep -v "^(d[0-9]*) stats" | tail -n 40 | sed "s/^/test: $1: xen: /"
    /usr/lib/xen-4.17/bin/xenctx -a $(xl domid portcullis) 0 > /tmp/ctx 2>&1
    head -n 30 /tmp/ctx | sed "s/^/test: $1: ctx: /"
    # Whether its memory was overwritten (`CORE_CHECK`).
    python3 /corecheck.py $(xl domid portcullis) /portcullis $(awk '$1 == "rip:" || $1 == "rsp:" { print $2 }' /tmp/ctx) 2>&1 | sed "s/^/test: $1: /"
}
# The forwarding domain must still be there and making progress (a
# statistics report every second): a reset, a crash or a hang mid-run is
# reported with Xen's view of it. (All dashes in `xl list` is a runnable
# vCPU waiting for a physical one, not a stopped domain.)
still_running() {
    state=$(xl list | awk '$1 == "portcullis" { print $5 }')
    case "$state" in
        ""|*s*|*c*|*d*|*p*) echo "test: lost before $1: state '$state'"; diagnose "lost"; return ;;
    esac
    n=$(grep -c "^stats: firewall" $log)
    sleep 3
    if [ "$(grep -c "^stats: firewall" $log)" -le "$n" ]; then
        echo "test: lost before $1: no statistics for 3 s, state '$state'"
        diagnose "lost"
    fi
}
ms() { echo $(( $(date +%s%N) / 1000000 )); }
# A domain's console log (what xenconsoled read from its PV console ring),
# as `test: log <domid>: ` lines.
show_log() { sed "s/^/test: log $1: /" $log; }
run() {
    rm -f $log
    xl create /etc/xen/portcullis.cfg "$@" && id=$(xl domid portcullis) && echo "test: created $id"
    i=0
    while [ $i -lt 60 ]; do
        state=$(xl list | awk '$1 == "portcullis" { print $5 }')
        case "$state" in
            "") echo "test: domain gone"; show_log $id; return ;;
            *c*) echo "test: domain crashed"; xl destroy portcullis; show_log $id; return ;;
        esac
        sleep 1
        i=$((i + 1))
    done
    echo "test: still running after 60 s"
    xl destroy portcullis
    show_log $id
}
run 'vif=[]'
for attempt in 1 2; do
    rm -f $log
    t0=$(ms)
    xl create -p /etc/xen/portcullis.cfg 'vcpus=1' && id=$(xl domid portcullis) && echo "test: created $id"
    pkill -f /qdb.py
    # (An earlier attempt's log says "ready" too: gone before the wait.)
    rm -f /tmp/qdb.log
    python3 /qdb.py $(xl domid portcullis) /qdb-script > /tmp/qdb.log 2>&1 &
    i=0
    until grep -q ready /tmp/qdb.log 2>/dev/null || [ $i -ge 50 ]; do sleep 0.1; i=$((i + 1)); done
    xl unpause portcullis
    first=none
    up=none
    i=0
    while [ $i -lt 900 ]; do
        if [ "$first" = none ] && [ -s $log ]; then first=$(( $(ms) - t0 )); fi
        if [ "$up" = none ] && grep -q "netfront: vif/0 connected" $log 2>/dev/null; then up=$(( $(ms) - t0 )); fi
        grep -q "portcullis: ready" $log 2>/dev/null && break
        grep -q "netfront: vif/0: " $log 2>/dev/null && break
        state=$(xl list | awk '$1 == "portcullis" { print $5 }')
        case "$state" in ""|*s*|*c*) break ;; esac
        sleep 0.1
        i=$((i + 1))
    done
    grep -q "portcullis: ready" $log 2>/dev/null && break
    echo "test: early end of attempt $attempt: state '$state'"
    diagnose "early end"
    xl destroy portcullis 2>/dev/null
done
echo "test: first console line after $first ms, netfront connected after $up ms"
sed 's/^/test: qdb: /' /tmp/qdb.log
# The first answer also settles dom0's ARP entry (a slow nested machine may
# need more than ARP's three probes); then five in a row must be answered,
# printed after `test: $1: `.
pings() {
    i=0
    until busybox ping -c 1 -W 5 10.0.2.15 >/dev/null 2>&1; do
        i=$((i + 1))
        [ $i -ge 5 ] && break
    done
    echo "test: $1: first answered after $i failed tries"
    busybox ping -c 5 -W 5 10.0.2.15 2>&1 | sed "s/^/test: $1: /"
}
pings ping
ip neigh show 10.0.2.15 | sed 's/^/test: neighbour: /'
# The kernel's code and tables are as built while it forwards
# (`CORE_CHECK` reading the paused domain's memory): the check that judges a
# domain that stopped is itself checked here.
xl pause portcullis
python3 /corecheck.py $(xl domid portcullis) /portcullis 2>&1 | sed 's/^/test: running: /'
xl unpause portcullis
xl list portcullis | sed 's/^/test: xl list: /'
# What the idle domain costs: its CPU time over 10 s without traffic
# (`xl list`'s Time(s), to 0.1 s).
cpu() { xl list portcullis | awk '$1 == "portcullis" { print $6 }'; }
c0=$(cpu); sleep 10; c1=$(cpu)
echo "test: idle cpu: $c0 s then $c1 s, 10 s apart"
# Wait for a statistics line printed after the pings (one a second).
stats_after() {
    n=$(grep -c "^stats: firewall" $log)
    i=0
    while [ $i -lt 100 ] && [ "$(grep -c "^stats: firewall" $log)" -le $((n + 1)) ]; do
        sleep 0.1
        i=$((i + 1))
    done
}
stats_after
# dom0 replaces a client's rules through QubesDB: the loop applies them.
rm -f /tmp/qdb-push; touch /tmp/qdb-push
i=0
until grep -q "qubesdb: rules of 10.137.0.10 replaced" $log 2>/dev/null || [ $i -ge 100 ]; do
    sleep 0.1
    i=$((i + 1))
done
sed 's/^/test: qdb: /' /tmp/qdb.log | grep "update answer"
# dom0's qrexec daemon calls the agent (`QREXEC_DAEMON`).
timeout 120 python3 /qrexec.py $(xl domid portcullis) 2>&1 | sed 's/^/test: qrexec: /'
# dom0's QubesDB daemon restarts with a changed database: the domain
# reconnects, loads it and applies the client's rules from it.
pkill -f /qdb.py
python3 /qdb.py $(xl domid portcullis) /qdb-script2 > /tmp/qdb2.log 2>&1 &
i=0
until grep -q "qubesdb: reloaded" $log 2>/dev/null || [ $i -ge 300 ]; do sleep 0.1; i=$((i + 1)); done
sleep 2
sed 's/^/test: qdb2: /' /tmp/qdb2.log
# dom0 plays the toolstack and ten clients' frontends for vifs in our
# backend area (as libxl writes them for `backend=portcullis`), all at
# once: each must be claimed by a slot of its own (InitWait, the
# features), and let go (Closed) when its frontend closes; the area and
# each frontend's state are watched.
pc=$(xl domid portcullis)
fakes="7 8 9 10 11 12 13 14 15 16"
t=$(ms)
for n in $fakes; do
    be=/local/domain/$pc/backend/vif/0/$n
    fe=/local/domain/0/device/vif/$n
    xenstore-write $fe/state 1
    xenstore-chmod -r $fe n0 r$pc
    xenstore-write $be/frontend $fe $be/frontend-id 0 $be/ip 10.137.0.$((70 + n)) $be/mac 00:16:3e:00:01:$n $be/state 1 $be/online 1
done
xenstore-chmod -r /local/domain/$pc/backend n$pc r0
# Until every fake vif's backend state is $1 (15 s at most).
wait_states() {
    while :; do
        n=$(xenstore-ls -f /local/domain/$pc/backend/vif/0 2>/dev/null | grep -c "^/local/domain/$pc/backend/vif/0/[0-9]*/state = \"$1\"")
        [ "$n" -ge 10 ] || [ $(( $(ms) - t )) -ge 15000 ] && break
        sleep 0.1
    done
    echo "test: fake vifs: $2: $((10 - n)) of 10 not in state $1 after $(( $(ms) - t )) ms"
}
wait_states 2 offered
for n in $fakes; do xenstore-read /local/domain/$pc/backend/vif/0/$n/feature-rx-copy; done | sort | uniq -c | sed 's/^ */test: fake vifs: feature-rx-copy /'
t=$(ms)
for n in $fakes; do xenstore-write /local/domain/0/device/vif/$n/state 6; done
wait_states 6 released
for n in $fakes; do xenstore-rm /local/domain/$pc/backend/vif/0/$n; xenstore-rm /local/domain/0/device/vif/$n; done
still_running "the detach"
# The backend goes away and comes back: traffic must resume without a
# reboot.
t=$(ms)
xl network-detach portcullis 0 && echo "test: detached in $(( $(ms) - t )) ms"
i=0
until grep -q "netfront: vif/0 disconnected" $log 2>/dev/null || [ $i -ge 150 ]; do
    sleep 0.1
    i=$((i + 1))
done
xenstore-ls -f /local/domain/$(xl domid portcullis)/device 2>&1 | sed 's/^/test: devices after detach: /'
t=$(ms)
xl network-attach portcullis bridge=br0 mac=00:16:3e:00:00:0f && echo "test: attached"
i=0
until [ "$(grep -c "netfront: vif/[0-9]* connected" $log)" -ge 2 ] || [ $i -ge 300 ]; do
    sleep 0.1
    i=$((i + 1))
done
echo "test: connected again after $(( $(ms) - t )) ms"
pings "ping again"
stats_after
still_running "the end"
grep -E "vm write|vm rm|clients answer|uplink answer" /tmp/qdb.log | sed 's/^/test: qdb: /'
xl destroy portcullis && echo "test: destroyed"
show_log $id
run 'extra="bogus"'
"#;

fn images() -> XenImages {
    XenImages::ensure().unwrap_or_else(|e| panic!("cannot build the nested-Xen images: {e}"))
}

/// Whether the forwarding domain was stopped mid-run by the nested
/// machine rather than by what it ran: it stopped (`test: lost`), and the
/// check of its memory then found its code, page tables, IDT, GDT and TSS as built
/// (`CORE_CHECK`'s sound verdict) — with those sound, any exception of
/// its own reaches the kernel's reporter instead of resetting it. Seen
/// in the nested machine now and then, together with dom0's processes
/// crashing and once with Xen's own RIP and CR3 as the domain's (the Xen
/// issue's notes).
fn stopped_by_the_machine(console: &str) -> bool {
    let lost = console.lines().any(|l| l.starts_with("test: lost"));
    let verdicts: Vec<&str> = console
        .lines()
        .filter_map(|l| l.strip_prefix("test: lost: core: verdict: "))
        .collect();
    lost && !verdicts.is_empty() && verdicts.iter().all(|v| v.starts_with("sound"))
}

#[test]
fn boots_as_a_pvh_domu_under_real_xen_and_shuts_itself_down() {
    let images = images();
    let script = SCRIPT
        .replace("@QDB@", QUBESDB_SERVER)
        .replace("@QREXEC@", QREXEC_DAEMON)
        .replace("@CORE@", CORE_CHECK)
        .replace("@NAMES@", NAME_SERVER);
    let nested = || {
        images
            .run(kernel(), XL_CFG, &script, Duration::from_secs(400))
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let mut run = nested();
    // One more run when the nested machine stopped the domain (its memory
    // sound); a second such stop fails below like any other.
    if stopped_by_the_machine(&run.console) {
        println!(
            "the nested machine stopped the forwarding domain; its report, then a second run:"
        );
        for l in run.console.lines().filter(|l| l.starts_with("test: lost")) {
            println!("{l}");
        }
        run = nested();
    }
    assert!(
        !run.stalled,
        "the script stalled (Xen's state above):\n{}",
        run.console
    );
    // The domains' ids: the first, the forwarding one's attempts, the one
    // with a bad command line.
    let ids: Vec<u32> = run
        .console
        .lines()
        .filter_map(|l| l.strip_prefix("test: created "))
        .filter_map(|id| id.trim().parse().ok())
        .collect();
    // (The script's own lines were shown as they came: `XenImages::run`.)
    assert!((3..=4).contains(&ids.len()), "{}", run.console);
    // The domain kept running through the pings and the QubesDB update (a
    // reset mid-run is reported by the script with Xen's log and the
    // vCPU's registers, `test: lost ...`, printed above).
    let lost: Vec<&str> = run
        .console
        .lines()
        .filter(|l| l.starts_with("test: lost") || l.starts_with("test: early end"))
        .collect();
    assert!(
        lost.iter().all(|l| !l.starts_with("test: lost")),
        "the forwarding domain stopped while it forwarded: {lost:#?}"
    );
    // An attempt that ended early gets a second one (the script), but only
    // when its memory was found as built.
    assert!(
        lost.iter()
            .filter_map(|l| l.split_once("core: verdict: "))
            .all(|(_, v)| v.starts_with("sound")),
        "{lost:#?}"
    );
    // The check itself, on the running domain.
    assert!(
        run.console.lines().any(|l| l
            .starts_with("test: running: core: verdict: sound (code, read-only data, page tables, IDT, GDT and TSS as built)")),
        "{}",
        run.console
    );
    let guest = run.guest_lines(ids[0]);
    let net = run.guest_lines(ids[ids.len() - 2]);
    println!(
        "nested Xen run: {:.1} s, {} guest lines",
        run.elapsed.as_secs_f64(),
        guest.len()
    );
    let has = |prefix: &str| guest.iter().any(|l| l.starts_with(prefix));
    assert!(
        has("portcullis: booting"),
        "no boot line from the domU:\n{}",
        run.console
    );
    assert!(
        has("xen: running under Xen 4.17; console on the PV console ring (the debug port for fatal reports only)"),
        "{guest:#?}"
    );
    // Every line reached xenconsoled through the PV console ring (what
    // `xl console` and Qubes's console logs show), the last ones before the
    // domain powered itself off included.
    assert!(
        has("portcullis: no network devices; nothing to forward"),
        "{guest:#?}"
    );
    assert!(
        has("clock: tsc") && guest.iter().any(|l| l.contains("(from Xen")),
        "{guest:#?}"
    );
    assert!(has("memory: ram 65536 KiB"), "{guest:#?}");
    // Both vCPUs: the second started with INIT-SIPI-SIPI through Xen's
    // emulated local APIC, as on bare metal.
    assert!(has("smp: 2 of 2 cpus online"), "{guest:#?}");
    // XenStore, read over the shared ring: the domain's own name and id.
    assert!(
        has(&format!(
            "xenstore: domain \"portcullis\", domid {}",
            ids[0]
        )),
        "{guest:#?}"
    );
    // What netfront will need, set up against Xen and checked: shared
    // info, the grant table (a page granted and taken back), event
    // channels (one for dom0; a pair looped back to ourselves).
    assert!(has("xen: shared info at 0x"), "{guest:#?}");
    assert!(has("xen: grant table v1, 1 of "), "{guest:#?}");
    assert!(
        has("xen: grant ref 8 given to dom0 and taken back"),
        "{guest:#?}"
    );
    assert!(
        guest
            .iter()
            .any(|l| l.starts_with("xen: event channel") && l.ends_with("allocated for dom0")),
        "{guest:#?}"
    );
    assert!(
        guest.iter().any(|l| l.starts_with("xen: event channels")
            && l.ends_with("an event sent on one is pending on the other")),
        "{guest:#?}"
    );
    // A XenStore watch: its event for a write of ours.
    assert!(
        has("xenstore: watch on data/portcullis fired on a write"),
        "{guest:#?}"
    );
    // A transaction refused for a conflicting write (EAGAIN) runs again
    // and commits.
    assert!(
        has("xenstore: a transaction met a conflicting write, was refused (EAGAIN), ran again and committed"),
        "{guest:#?}"
    );
    // ...and a XenStore write of our own, read back.
    assert!(
        has("xenstore: wrote data/portcullis and read it back"),
        "{guest:#?}"
    );
    assert!(
        has("portcullis: no network devices; nothing to forward"),
        "{guest:#?}"
    );
    // The forwarding domain: the vif the toolstack created, found in
    // XenStore with its backend in dom0 (netback), before netfront
    // connects it...
    let id = ids[ids.len() - 2];
    let guest = net;
    let has = |prefix: &str| guest.iter().any(|l| l.starts_with(prefix));
    // Every one of `prefixes` begins a line of the guest's.
    let has_all = |prefixes: &[&str]| {
        let missing: Vec<&&str> = prefixes.iter().filter(|p| !has(p)).collect();
        assert!(missing.is_empty(), "missing {missing:#?} in {guest:#?}");
    };
    let vif = format!("xenstore: device vif/0 backend /local/domain/0/backend/vif/{id}/0 state 1");
    assert!(has(&vif), "{guest:#?}");
    // QubesDB from dom0 over vchan (libxenvchan's server, mapped by grant):
    // the entries became the configuration (the DNS pair and the client
    // come only from there), and the update dom0 pushed after them was
    // acknowledged, as dom0's script saw.
    // A live update while forwarding: dom0 removed the client's rules,
    // wrote new ones and completed the update; every message acknowledged,
    // the new rule set in force.
    has_all(&[
        "qubesdb: 6 entries from dom0 over vchan (event channel ",
        "qubesdb: dom0 wrote /qubes-firewall/10.137.0.10; acknowledged (the rules of 10.137.0.10 are complete)",
        "qubesdb: rules of 10.137.0.10 replaced: 1 rules, policy Accept; 0 flows dropped",
    ]);
    assert!(
        guest.iter().any(|l| l.starts_with("portcullis: ready")
            && l.contains(" dns 10.139.1.1->10.0.2.3 clients 10.137.0.10")),
        "{guest:#?}"
    );
    assert!(
        run.console
            .contains("test: qdb: answer type 7 path '/qubes-firewall/10.137.0.10' length 0"),
        "{}",
        run.console
    );
    let acks: Vec<&str> = run
        .console
        .lines()
        .filter(|l| l.contains("test: qdb: update answer type 7 "))
        .collect();
    assert_eq!(acks.len(), 4, "{}", run.console);
    // What Qubes's firewall agent writes back: the client's rules handled
    // once when forwarding started, and again after the live update.
    assert!(
        has("qubesdb: rules in force for 10.137.0.10; told dom0 (/qubes-firewall_handled/<ip>)"),
        "{guest:#?}"
    );
    let writes: Vec<&str> = run
        .console
        .lines()
        .filter(|l| l.starts_with("test: qdb: vm write "))
        .collect();
    assert_eq!(
        writes,
        [
            "test: qdb: vm write '/qubes-firewall_handled/10.137.0.10' '1'",
            "test: qdb: vm write '/dns/10.137.0.10/pin.example' '{'10.0.2.2'}'",
            "test: qdb: vm write '/qubes-firewall_handled/10.137.0.10' '2'"
        ],
        "{}",
        run.console
    );
    // The `dsthost` name of the first rules resolved through dom0's DNS
    // server and was written back, as Qubes's firewall agent does; the
    // update, whose rules have no name, cleared it.
    assert!(
        run.console.contains("test: qdb: vm rm '/dns/10.137.0.10/'"),
        "{}",
        run.console
    );
    // ...netfront: the xenbus handshake with Linux netback completed...
    // (Xen's console lines for the guest may share a line with dom0's
    // output, before or after it: the prefix is looked for anywhere.)
    let test = |prefix: &str| -> Vec<&str> {
        run.console
            .lines()
            .filter_map(|l| l.find(prefix).map(|at| &l[at + prefix.len()..]))
            .collect()
    };
    // dom0's qrexec daemon reached the agent: both HELLOs (version 3),
    // the two services Qubes calls on a net VM at start answered with
    // status 0, anything else refused with 127 and a reason on stderr,
    // each call's end reported on the control connection with its port;
    // and a restarted daemon was served again.
    let qrexec = test("test: qrexec: ");
    let expected = [
        "hello type 0x300 version 3",
        "call DEFAULT:QUBESRPC qubes.WaitForSession dom0: exit 0 stdout '' stderr ''",
        "terminated type 0x211 domain 0 port 513",
        "call DEFAULT:QUBESRPC qubes.SetDateTime dom0: exit 0 stdout '' stderr ''",
        "terminated type 0x211 domain 0 port 514",
        "call user:QUBESRPC qubes.Filecopy dom0: exit 127 stdout '' stderr 'Portcullis (firewall VM): service qubes.Filecopy is not offered here'",
        "terminated type 0x211 domain 0 port 515",
        "call root:id: exit 127 stdout '' stderr 'Portcullis (firewall VM): running commands is not offered here'",
        "terminated type 0x211 domain 0 port 516",
        "hello type 0x300 version 3",
        "done",
    ];
    assert_eq!(qrexec, expected, "{}", run.console);
    has_all(&[
        "qrexec: agent serving dom0 on vchan port 512 (event channel ",
        "qrexec: dom0's daemon connected (protocol version 3)",
        "qrexec: qubes.WaitForSession from domain 0: no session to wait for; exit 0",
        "qrexec: qubes.SetDateTime from domain 0: dom0's date is '2026-11-27T12:00:00+00:00'; exit 0",
        "qrexec: qubes.Filecopy from domain 0: refused (exit 127)",
        "qrexec: command 'id' from domain 0: refused (exit 127)",
        "qrexec: dom0's daemon closed the control connection",
    ]);
    // dom0's QubesDB daemon restarted with other rules: the domain saw its
    // end go, connected to the new one, loaded the whole database (the
    // MULTIREAD dom0 saw) and applied the client's rules from it, counted
    // handled anew in the new database.
    // A client qube started: dom0 added it to /connected-ips; and the
    // database after dom0's restart no longer lists it.
    assert!(
        run.console
            .contains("test: qdb: clients answer type 7 path '/connected-ips' length 0"),
        "{}",
        run.console
    );
    // The uplink's DNS server moved (the command line sets the address
    // and gateway, which stay): followed, and after dom0's restart the
    // database's first one again.
    assert!(
        run.console
            .contains("test: qdb: uplink answer type 7 path '/qubes-primary-dns' length 0"),
        "{}",
        run.console
    );
    has_all(&[
        "qubesdb: upstream DNS now 10.0.2.4",
        "qubesdb: upstream DNS now 10.0.2.3",
    ]);
    has_all(&[
        "qubesdb: client 10.137.0.20 connected",
        "qubesdb: client 10.137.0.20 disconnected (its flows ended)",
        "qubesdb: dom0's QubesDB daemon went away; the rules in force stay; reconnecting",
        "qubesdb: reconnected to dom0 (event channel ",
        "qubesdb: reloaded 6 entries from dom0",
        "qubesdb: rules of 10.137.0.10 replaced: 2 rules, policy Drop; ",
    ]);
    let qdb2 = test("test: qdb2: ");
    assert_eq!(
        qdb2,
        [
            "ready",
            "request type 2 path '' length 0",
            "vm rm '/dns/10.137.0.10/'",
            "vm write '/qubes-firewall_handled/10.137.0.10' '1'"
        ],
        "{}",
        run.console
    );
    // The guest's last counters, shown when an assertion below fails
    // (the script's lines were shown as they came: `XenImages::run`).
    for l in guest.iter().filter(|l| {
        l.starts_with("netfront: ")
            || l.starts_with("qubesdb: ")
            || l.starts_with("portcullis: ready")
    }) {
        println!("{l}");
    }
    for prefix in ["stats: firewall ", "stats: nic0 ", "stats: core0 "] {
        if let Some(l) = guest.iter().rev().find(|l| l.starts_with(prefix)) {
            println!("{l}");
        }
    }
    let connected: Vec<&String> = guest
        .iter()
        .filter(|l| {
            l.starts_with("netfront: vif/") && l.contains(" connected to backend domain 0 in ")
        })
        .collect();
    assert!(connected[0].starts_with("netfront: vif/0 "), "{guest:#?}");
    assert!(
        connected[0].ends_with("128 receive pages)"),
        "{connected:?}"
    );
    assert!(
        has("netback: serving up to 32 client vifs (ports 1-32; our XenStore area backend/vif)"),
        "{guest:#?}"
    );
    // Ten vifs appearing in our backend area at once are claimed by ten
    // slots and offered our features; their frontends closing lets them
    // go.
    let fake = test("test: fake vifs: ");
    assert!(
        fake.iter()
            .any(|l| l.starts_with("offered: 0 of 10 not in state 2 after ")),
        "{fake:?}\n{guest:#?}"
    );
    assert!(fake.contains(&"feature-rx-copy 10 1"), "{fake:?}");
    assert!(
        fake.iter()
            .any(|l| l.starts_with("released: 0 of 10 not in state 6 after ")),
        "{fake:?}\n{guest:#?}"
    );
    for slot in 1..=10 {
        let found = format!("netback: vif{slot}: domain 0 (backend/vif/0/");
        let gone = format!("netback: vif{slot}: domain 0: its frontend closed; disconnected");
        assert!(has(&found) && has(&gone), "slot {slot}: {guest:#?}");
    }
    // Idle, the loop blocks in Xen on the netfront's event channel.
    assert!(
        has("idle: block in Xen (SCHEDOP_poll on event channel "),
        "{guest:#?}"
    );
    // ...and frames cross it both ways: dom0 resolves our address with ARP
    // and every ping is answered, through our netfront and its netback.
    let ping = test("test: ping: ");
    assert!(
        ping.iter()
            .any(|l| l.starts_with("5 packets transmitted, 5 packets received")),
        "ping from dom0 through netback and our netfront:\n{}",
        run.console
    );
    let neighbour = test("test: neighbour: ");
    assert!(
        neighbour
            .iter()
            .any(|l| l.contains("lladdr 00:16:3e:00:00:0f")),
        "{neighbour:?}"
    );
    // The counters agree: the netfront received and sent frames, the
    // firewall asked for the gateway and answered the five pings.
    let last = |prefix: &str| -> String {
        guest
            .iter()
            .rev()
            .find(|l| l.starts_with(prefix))
            .cloned()
            .unwrap_or_else(|| panic!("no '{prefix}' line: {guest:#?}"))
    };
    let fw = last("stats: firewall ");
    let field = |line: &str, key: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {line}"))
    };
    assert!(field(&fw, "echo_replies=") >= 5, "{fw}");
    // (dom0 learns our MAC from our ARP request for the gateway, so it
    // may never need to ask us.)
    assert!(field(&fw, "arp_requests_sent=") >= 1, "{fw}");
    let nic = last("stats: nic0 uplink ");
    assert!(field(&nic, "rx_packets=") >= 6, "{nic}");
    assert!(field(&nic, "tx_packets=") >= 6, "{nic}");
    assert_eq!(field(&nic, "ring_errors="), 0, "{nic}");
    // Between the pings the loop blocked in Xen, and every ping still
    // woke it (all five answered, above).
    let core = last("stats: core0 ");
    assert!(field(&core, "halts=") > 0, "{core}");
    // `xl network-detach`: the backend closed, so the frontend stopped,
    // switched to Closed and ended every grant once netback had unmapped
    // its pages...
    assert_eq!(test("test: detached in ").len(), 1, "{}", run.console);
    assert!(
        guest
            .iter()
            .any(|l| l.starts_with("netfront: vif/0: backend state ")
                && l.ends_with("; disconnecting")),
        "{guest:#?}"
    );
    assert!(
        has("netfront: vif/0 disconnected: every grant ended; waiting for a backend"),
        "{guest:#?}"
    );
    // ...then `xl network-attach` made a new vif, which it connected
    // without a reboot, and pings crossed it again.
    assert_eq!(connected.len(), 2, "{guest:#?}");
    let again = test("test: ping again: ");
    assert!(
        again
            .iter()
            .any(|l| l.starts_with("5 packets transmitted, 5 packets received")),
        "ping after the vif was detached and attached again:\n{}",
        run.console
    );
    let fw = last("stats: firewall ");
    assert!(field(&fw, "echo_replies=") >= 10, "{fw}");
    // The first domain ended itself with SCHEDOP_shutdown(poweroff), the
    // forwarding one ran until destroyed...
    let ends: Vec<&str> = run
        .console
        .lines()
        .filter(|l| l.starts_with("test: domain"))
        .collect();
    assert_eq!(
        ends,
        ["test: domain gone", "test: domain crashed"],
        "{}",
        run.console
    );
    assert_eq!(test("test: destroyed").len(), 1, "{}", run.console);
    // ...and, given a bad command line, refused to start and reported a
    // crash (SCHEDOP_shutdown(crash)), which `on_crash` kept for us to see.
    let second = run.guest_lines(ids[ids.len() - 1]);
    assert!(
        second
            .iter()
            .any(|l| l.starts_with("config error: bad command-line token 'bogus'")),
        "{second:#?}"
    );
}
