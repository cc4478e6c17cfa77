//! Portcullis as a PVH domU under a real Xen 4.17 with a Linux dom0,
//! nested in QEMU TCG. Needs root and the Debian mirrors the first time
//! (the images are cached under /var/cache/portcullis/xen).

use std::time::Duration;

use qemu_tests::kernel;
use qemu_tests::xen::XenImages;

const XL_CFG: &str = r#"name = "portcullis"
type = "pvh"
kernel = "/portcullis"
memory = 64
vcpus = 2
vif = ["bridge=br0"]
on_poweroff = "destroy"
on_crash = "preserve"
"#;

/// Creates the domain twice — as configured (domain 1), then with a bad
/// command line (domain 2) — and reports how each ended.
const SCRIPT: &str = r#"#!/bin/sh
run() {
    xl create /etc/xen/portcullis.cfg "$@" && echo "test: created"
    i=0
    while [ $i -lt 60 ]; do
        state=$(xl list | awk '$1 == "portcullis" { print $5 }')
        case "$state" in
            "") echo "test: domain gone"; return ;;
            *c*) echo "test: domain crashed"; xl destroy portcullis; return ;;
        esac
        sleep 1
        i=$((i + 1))
    done
    echo "test: still running after 60 s"
    xl destroy portcullis
}
run
echo "test: console log begins"
cat /var/log/xen/console/guest-portcullis.log
echo "test: console log ends"
run 'extra="bogus"'
"#;

fn images() -> XenImages {
    XenImages::ensure().unwrap_or_else(|e| panic!("cannot build the nested-Xen images: {e}"))
}

#[test]
fn boots_as_a_pvh_domu_under_real_xen_and_shuts_itself_down() {
    let images = images();
    let run = images
        .run(kernel(), XL_CFG, SCRIPT, Duration::from_secs(400))
        .unwrap_or_else(|e| panic!("{e}"));
    let guest = run.guest_lines(1);
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
        has("xen: running under Xen 4.17; console on the debug port and the PV console ring"),
        "{guest:#?}"
    );
    // The same lines reached xenconsoled through the PV console ring: what
    // `xl console` and Qubes's console logs show.
    let log: Vec<&str> = run
        .console
        .lines()
        .skip_while(|l| !l.starts_with("test: console log begins"))
        .take_while(|l| !l.starts_with("test: console log ends"))
        .collect();
    assert!(
        log.iter().any(|l| l.contains("portcullis: booting")),
        "console log: {log:#?}"
    );
    assert!(
        log.iter()
            .any(|l| l.contains("portcullis: no network devices")),
        "console log: {log:#?}"
    );
    assert!(
        has("clock: tsc") && guest.iter().any(|l| l.contains("(from Xen)")),
        "{guest:#?}"
    );
    assert!(has("memory: ram 65536 KiB"), "{guest:#?}");
    // Both vCPUs: the second started with INIT-SIPI-SIPI through Xen's
    // emulated local APIC, as on bare metal.
    assert!(has("smp: 2 of 2 cpus online"), "{guest:#?}");
    // XenStore, read over the shared ring: the domain's own name and id.
    assert!(
        has("xenstore: domain \"portcullis\", domid 1"),
        "{guest:#?}"
    );
    // The vif the toolstack created, found in XenStore with its backend in
    // dom0 (netback), still initialising (netfront is not written yet)...
    assert!(
        has("xenstore: device vif/0 backend /local/domain/0/backend/vif/1/0 state 1"),
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
    // ...and a XenStore write of our own, read back.
    assert!(
        has("xenstore: wrote data/portcullis and read it back"),
        "{guest:#?}"
    );
    assert!(
        has("portcullis: no network devices; nothing to forward"),
        "{guest:#?}"
    );
    // The domain ended itself with SCHEDOP_shutdown(poweroff)...
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
    // ...and, given a bad command line, refused to start and reported a
    // crash (SCHEDOP_shutdown(crash)), which `on_crash` kept for us to see.
    let second = run.guest_lines(2);
    assert!(
        second
            .iter()
            .any(|l| l.starts_with("config error: bad command-line token 'bogus'")),
        "{second:#?}"
    );
}
