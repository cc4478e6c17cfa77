//! Boot tests: the kernel boots through its PVH entry under QEMU TCG and
//! reports the machine it was given — memory, CPUs, PCI functions — and
//! stops with the exit status that matches what happened.

use std::time::Duration;

use qemu_tests::{kernel, Machine, NicBackend, Outcome};

const TIMEOUT: Duration = Duration::from_secs(60);

fn machine() -> Machine {
    Machine::new(kernel())
}

#[test]
fn boots_and_exits_cleanly() {
    let boot = machine().run(TIMEOUT);
    boot.expect(Outcome::Success);
    assert!(
        boot.console.starts_with("portcullis: booting"),
        "first line: {}",
        boot.console
    );
    assert!(boot.report().fatal.is_none());
}

#[test]
fn reports_the_memory_it_was_given() {
    for mib in [16u64, 64, 512, 4608] {
        let boot = machine().memory_mib(mib as u32).run(TIMEOUT);
        boot.expect(Outcome::Success);
        let kib = boot
            .report()
            .ram_kib
            .unwrap_or_else(|| panic!("no memory line:\n{}", boot.console));
        let given = mib * 1024;
        assert!(
            kib <= given && given - kib <= 1024,
            "-m {mib}: reported {kib} KiB of {given} KiB"
        );
    }
}

#[test]
fn counts_cpus_from_the_madt_and_starts_them_all() {
    for n in [1u32, 2, 4] {
        let boot = machine().cpus(n).run(TIMEOUT);
        boot.expect(Outcome::Success);
        let r = boot.report();
        assert_eq!(r.cpus, Some(n), "-smp {n}:\n{}", boot.console);
        let online = if n == 1 { None } else { Some(n) };
        assert_eq!(r.cpus_online, online, "-smp {n}:\n{}", boot.console);
    }
    // CPUs the MADT lists as possible but not enabled are not started.
    let mut m = machine();
    m.extra
        .extend(["-smp".to_string(), "2,maxcpus=4".to_string()]);
    let boot = m.run(TIMEOUT);
    boot.expect(Outcome::Success);
    assert_eq!(
        (boot.report().cpus, boot.report().cpus_online),
        (Some(2), Some(2)),
        "{}",
        boot.console
    );
}

#[test]
fn lists_exactly_the_pci_functions_attached() {
    let boot = machine()
        .nic(NicBackend::Unconnected)
        .nic(NicBackend::Unconnected)
        .run(TIMEOUT);
    // With NICs but no configuration the kernel reports the machine, then
    // refuses to forward: a firewall never guesses its addresses.
    boot.expect(Outcome::Failure);
    assert!(
        boot.console.contains("config error: /qubes-ip: missing"),
        "{}",
        boot.console
    );
    let pci = boot.report().pci;
    let found: Vec<(&str, u16, u16, u8)> = pci
        .iter()
        .map(|f| (f.address.as_str(), f.vendor, f.device, f.class))
        .collect();
    assert_eq!(
        found,
        [
            ("0000:00:00.0", 0x8086, 0x29c0, 0x06), // q35 host bridge
            ("0000:00:02.0", 0x1af4, 0x1000, 0x02), // first virtio-net
            ("0000:00:03.0", 0x1af4, 0x1000, 0x02), // second virtio-net
            ("0000:00:1f.0", 0x8086, 0x2918, 0x06), // ich9 lpc
            ("0000:00:1f.2", 0x8086, 0x2922, 0x01), // ich9 ahci
            ("0000:00:1f.3", 0x8086, 0x2930, 0x0c), // ich9 smbus
        ],
        "\n{}",
        boot.console
    );
    // Each virtio-net function shows its notification/config BARs.
    assert!(boot.console.contains("    bar4 mem64"), "{}", boot.console);

    let bare = machine().run(TIMEOUT);
    assert!(
        bare.report().pci.iter().all(|f| f.vendor != 0x1af4),
        "{}",
        bare.console
    );
}

#[test]
fn refuses_a_malformed_command_line() {
    for (cmdline, token) in [
        ("loglevel=info bogus", "'bogus'"),
        ("loglevel=loud", "'loglevel=loud'"),
        ("frobnicate=1", "'frobnicate=1'"),
    ] {
        let boot = machine().append(cmdline).run(TIMEOUT);
        boot.expect(Outcome::Failure);
        let line = format!("config error: bad command-line token {token}");
        assert!(
            boot.console.contains(&line),
            "{cmdline}: no '{line}' in\n{}",
            boot.console
        );
        assert!(!boot.console.contains("boot complete"), "{}", boot.console);
    }
}

#[test]
fn reports_a_page_fault_with_vector_rip_and_address() {
    let boot = machine().append("test-fault=page-fault").run(TIMEOUT);
    boot.expect(Outcome::Failure);
    let fatal = boot
        .report()
        .fatal
        .unwrap_or_else(|| panic!("no FATAL line:\n{}", boot.console));
    assert!(fatal.contains("exception 14 (#PF page fault)"), "{fatal}");
    assert!(fatal.contains("cr2=0x700000000000"), "{fatal}");
    let rip = fatal
        .split("rip=0x")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("rip");
    let rip = u64::from_str_radix(rip, 16).expect("hex rip");
    // RIP is inside the kernel image, which is linked at 1 MiB.
    assert!((0x10_0000..0x100_0000).contains(&rip), "{fatal}");
}

#[test]
fn reports_an_invalid_opcode_and_a_panic() {
    let boot = machine().append("test-fault=invalid-opcode").run(TIMEOUT);
    boot.expect(Outcome::Failure);
    assert!(boot
        .report()
        .fatal
        .is_some_and(|f| f.contains("exception 6 (#UD invalid opcode) rip=0x")));

    let boot = machine().append("test-fault=panic").run(TIMEOUT);
    boot.expect(Outcome::Failure);
    let fatal = boot.report().fatal.unwrap_or_default();
    assert!(
        fatal.starts_with("FATAL: panic at kernel/src/main.rs:"),
        "{}",
        boot.console
    );
    assert!(fatal.contains("test-fault=panic requested"), "{fatal}");
}

#[test]
fn a_hung_machine_is_killed_at_the_timeout() {
    // -S keeps the CPU stopped: nothing runs, so only the timeout ends it.
    let mut m = machine();
    m.extra.push("-S".into());
    let started = std::time::Instant::now();
    let boot = m.run(Duration::from_secs(2));
    assert_eq!(boot.outcome, Outcome::TimedOut);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(boot.console.is_empty());
}

/// A machine without a PIT (QEMU's `microvm`): the TSC cannot be
/// calibrated, and the boot report says the rate is assumed instead of
/// printing whatever a PIT that never counts would give.
#[test]
fn without_a_pit_the_tsc_rate_is_assumed_and_said_so() {
    let boot = Machine::new(kernel())
        .machine_type("microvm,pit=off")
        .run(TIMEOUT);
    boot.expect(Outcome::Success); // nothing to forward
    let clock = boot
        .console
        .lines()
        .find(|l| l.starts_with("clock: "))
        .unwrap_or_else(|| panic!("{}", boot.console));
    assert!(
        clock.contains(" MHz (no usable PIT; assumed); one read takes "),
        "{}",
        boot.console
    );
}

#[test]
fn enumerates_pci_through_legacy_ports_without_mcfg() {
    // i440fx has no MCFG, so configuration space is read through 0xcf8/0xcfc.
    let boot = machine()
        .machine_type("pc")
        .nic(NicBackend::Unconnected)
        .run(TIMEOUT);
    boot.expect(Outcome::Failure); // no configuration: see above
    assert!(
        boot.console.contains("pci: legacy configuration ports"),
        "{}",
        boot.console
    );
    let pci = boot.report().pci;
    assert_eq!(
        pci.first().map(|f| (f.vendor, f.device)),
        Some((0x8086, 0x1237)),
        "{}",
        boot.console
    );
    let nics: Vec<&str> = pci
        .iter()
        .filter(|f| f.vendor == 0x1af4)
        .map(|f| f.address.as_str())
        .collect();
    assert_eq!(nics, ["0000:00:02.0"], "{}", boot.console);
}

#[test]
fn writes_the_console_to_the_debug_port_too() {
    let dir = std::env::temp_dir().join(format!("portcullis-debugcon-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("debugcon.log");
    let mut m = machine();
    m.extra
        .extend(["-debugcon".to_string(), format!("file:{}", log.display())]);
    let boot = m.run(TIMEOUT);
    boot.expect(Outcome::Success);
    let debugcon = std::fs::read_to_string(&log).unwrap().replace('\r', "");
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(debugcon, boot.console);
}
