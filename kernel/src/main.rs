//! Portcullis kernel: the hardware half and the boot sequence.
//!
//! Entered from the PVH trampoline (`boot.S`) in long mode with the first
//! 4 GiB identity-mapped. The boot sequence is: console, descriptor tables,
//! start info and command line, memory map and heap, ACPI, PCI, boot report.
//! Every `unsafe` block of the kernel lives in this binary's modules, each
//! with a `// SAFETY:` comment; the decisions it acts on come from the
//! host-tested `kernel` library.
#![no_std]
#![no_main]

extern crate alloc;

#[macro_use]
mod console;
mod acpi_tables;
mod clock;
mod cpu;
mod dataplane;
mod exit;
mod fw_cfg;
mod gnttab;
mod heap;
mod idle;
mod lapic;
mod netback;
mod netfront;
mod pci_bus;
mod phys;
mod ports;
mod qrexec;
mod rtc;
mod smp;
mod vchan;
mod virtio_hal;
mod xen;
mod xenstore;

use core::panic::PanicInfo;

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use drivers::virtio_net::VirtioNet;
use drivers::{Nic, PacketPool};
use kernel::cmdline::{self, BootConfig, Layout, TestFault};
use kernel::memmap::{PhysMemory, Range};
use netstack::config::{NetConfig, QubesDb};
use netstack::firewall::Firewall;
use pci_bus::PciFunction;
use xen_shim::pvh::{MemmapEntry, StartInfo, MEMMAP_ENTRY_SIZE, START_INFO_SIZE};

core::arch::global_asm!(include_str!("boot.S"), options(att_syntax));
core::arch::global_asm!(include_str!("exceptions.S"), options(att_syntax));
core::arch::global_asm!(include_str!("ap_boot.S"), options(att_syntax));

/// The fw_cfg file that carries the QubesDB snapshot under QEMU.
const QUBESDB_FW_CFG: &str = "opt/portcullis/qubesdb";
/// Grant references kept for the qrexec agent's control connection (three
/// pages), out of the table netfront grants its buffers from.
const QREXEC_GRANTS: usize = 8;
/// Longest command line read from guest memory.
const MAX_CMDLINE: usize = 2048;

/// Rust entry, called once by the trampoline on the boot CPU.
#[no_mangle]
pub extern "C" fn kernel_main(start_info_paddr: u32) -> ! {
    let under_xen = xen::init();
    console::init();
    println!("portcullis: booting (start info at {start_info_paddr:#x})");
    if under_xen {
        let (major, minor) = xen::version();
        println!(
            "xen: running under Xen {major}.{minor}; console on {}",
            if xen::has_console_ring() {
                "the PV console ring (the debug port for fatal reports only)"
            } else {
                "the debug port"
            }
        );
    }
    cpu::init();

    let info = read_start_info(u64::from(start_info_paddr));
    let mut cmdline_buf = [0u8; MAX_CMDLINE];
    let raw_cmdline = read_cmdline(&info, &mut cmdline_buf);
    let config = match cmdline::parse_bytes(raw_cmdline) {
        Ok(c) => c,
        Err(e) => {
            println!("config error: {e}");
            println!("portcullis: refusing to start with an invalid configuration");
            exit::failure();
        }
    };
    console::set_level(config.log_level);
    println!(
        "cmdline: \"{}\"",
        core::str::from_utf8(raw_cmdline).unwrap_or("")
    );

    let mut mem = read_memory_map(&info);
    reserve_in_use(&mut mem, &info);
    phys::map_all_ram(&mut mem);
    if under_xen {
        let w = phys::init_foreign(&mut mem);
        log::info!(
            "memory: frames {:#x}-{:#x} for foreign pages",
            w.start,
            w.end
        );
    }
    let heap = heap::init(&mut mem);
    println!(
        "memory: ram {} KiB, free {} KiB, heap {} KiB at {:#x}, highest {:#x}",
        mem.total_ram() / 1024,
        mem.free_bytes() / 1024,
        heap.len() / 1024,
        heap.start,
        mem.highest_ram()
    );

    run_test_fault(&config);

    let acpi = acpi_tables::discover(info.rsdp_paddr);
    match &acpi {
        Some(a) => {
            print!("cpus: {} (apic ids", a.cpus.len());
            for id in &a.cpus {
                print!(" {id}");
            }
            println!(")");
        }
        None => println!("cpus: 1 (no ACPI tables; assuming the boot CPU alone)"),
    }

    let ecam = acpi.as_ref().and_then(|a| a.ecam);
    let (pci_access, functions) = pci_bus::enumerate(ecam, &mut mem);
    let nics: Vec<&PciFunction> = functions
        .iter()
        .filter(|f| kernel::pci_ids::is_virtio_net(f.vendor, f.device))
        .collect();
    print!(
        "pci: {} functions, {} virtio-net",
        functions.len(),
        nics.len()
    );
    for f in &nics {
        print!(
            " {:02x}:{:02x}.{}",
            f.address.bus(),
            f.address.device(),
            f.address.function()
        );
    }
    println!();
    phys::set_free_memory(mem);
    let (tsc_hz, source) = clock::init();
    let source = match source {
        clock::Source::Pit => "calibrated against the PIT",
        clock::Source::Xen => "from Xen",
        clock::Source::Assumed => "no usable PIT; assumed",
    };
    let emulated = if xen::tsc_emulated() {
        "; every read emulated by Xen"
    } else {
        ""
    };
    println!(
        "clock: tsc {} MHz ({source}{emulated}); one read takes {} ns",
        tsc_hz / 1_000_000,
        clock::read_cost_ns()
    );
    // Under Xen: XenStore and the grant table, kept for netfront.
    let mut xen_io = None;
    let mut qubesdb = (Vec::new(), None);
    if xen::present() {
        match xenstore::XenStore::open() {
            Some(mut store) => {
                xenstore_report(&mut store);
                qubesdb = qubesdb_over_vchan(&mut store);
                xen_io = xen_sharing_report().map(|t| (store, t));
            }
            None => {
                println!("xenstore: no ring");
                xen_sharing_report();
            }
        }
    }
    let apic_ids = acpi.as_ref().map(|a| a.cpus.clone()).unwrap_or_default();
    if apic_ids.len() > 1 {
        let smp = smp::start_aps(&apic_ids);
        print!(
            "smp: {} of {} cpus online (apic ids",
            smp::online(),
            apic_ids.len()
        );
        for id in &smp.online {
            print!(" {id}");
        }
        println!(")");
        if !smp.failed.is_empty() {
            println!("smp: {} cpus did not start", smp.failed.len());
        }
    }
    println!("portcullis: boot complete");

    // A netfront needs a vif in XenStore.
    let vif = xen_io
        .as_mut()
        .and_then(|(store, _)| store.directory("device/vif").ok())
        .and_then(|devs| devs.into_iter().next());
    if nics.is_empty() && vif.is_none() {
        println!("portcullis: no network devices; nothing to forward");
        exit::success();
    }
    let cmdline_text = core::str::from_utf8(raw_cmdline).unwrap_or("");
    let netfront = vif.zip(xen_io);
    start_dataplane(cmdline_text, &config, pci_access, &nics, netfront, qubesdb);
}

/// Under Qubes: the configuration from dom0's QubesDB over vchan, the
/// updates dom0 pushes right after (each acknowledged), and the link,
/// which the loop goes on following. Nothing where dom0 offers no QubesDB
/// (plain Xen: the command line configures).
fn qubesdb_over_vchan(
    store: &mut xenstore::XenStore,
) -> (Vec<(String, String)>, Option<vchan::QubesDbLink>) {
    let Ok(domid) = store.read("domid") else {
        return (Vec::new(), None);
    };
    let mut link = match vchan::QubesDbLink::load(store, domid.trim()) {
        None => return (Vec::new(), None),
        Some(Ok(l)) => l,
        Some(Err(e)) => {
            println!("qubesdb: {e}");
            return (Vec::new(), None);
        }
    };
    println!(
        "qubesdb: {} entries from dom0 over vchan (event channel {})",
        link.client.initial_entries(),
        link.port()
    );
    // Updates dom0 sends at once; the loop follows later ones.
    let mut quiet_since = clock::now_ms();
    while clock::now_ms() - quiet_since < 300 {
        match link.poll() {
            Ok(events) if events.is_empty() => {}
            Ok(events) => {
                quiet_since = clock::now_ms();
                for e in events {
                    match e {
                        xen_shim::qubesdb::Event::Written(p) => {
                            let value = link.client.get(&p).unwrap_or("");
                            match xen_shim::qubesdb::rules_committed(&p, value) {
                                Some(ip) => println!(
                                    "qubesdb: dom0 wrote {p}; acknowledged (the rules of {ip} are complete)"
                                ),
                                None => println!("qubesdb: dom0 wrote {p}; acknowledged"),
                            }
                        }
                        other => println!("qubesdb: {other:?}"),
                    }
                }
            }
            Err(e) => {
                println!("qubesdb: {e}");
                return (Vec::new(), None);
            }
        }
    }
    let entries = link
        .client
        .entries()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    (entries, Some(link))
}

/// Connects the netfront of `device/vif/<dev>`: the port and its event
/// channel. Any failure stops the kernel (a firewall without its uplink
/// has nothing to do).
fn connect_netfront(
    dev: &str,
    store: xenstore::SharedStore,
    table: gnttab::GrantTable,
) -> (ports::Port, u32) {
    match netfront::Uplink::boot(store, table, dev) {
        Ok(up) => {
            let port = up.port().unwrap_or(0);
            (ports::Port::Netfront(up), port)
        }
        Err(e) => {
            println!("netfront: vif/{dev}: {e}");
            exit::failure();
        }
    }
}

/// Loads the configuration, brings the NICs up and runs the forwarding
/// loop; any configuration or device error stops the kernel with failure.
fn start_dataplane(
    cmdline_text: &str,
    config: &BootConfig,
    access: pci_bus::ConfigAccess,
    nics: &[&PciFunction],
    netfront: Option<(String, (xenstore::XenStore, gnttab::GrantTable))>,
    (qubesdb, mut qubesdb_link): (Vec<(String, String)>, Option<vchan::QubesDbLink>),
) -> ! {
    let net = match load_config(cmdline_text, &qubesdb) {
        Ok(n) => n,
        Err(e) => {
            println!("config error: {e}");
            println!("portcullis: refusing to forward without a valid configuration");
            exit::failure();
        }
    };
    // The uplink: the netfront under Xen, else the first virtio NIC.
    let mut devices = Vec::new();
    let mut netfront_port = None;
    let mut agent = None;
    if let Some((dev, (store, mut table))) = netfront {
        let mut store = xenstore::SharedStore::install(store);
        if let Some(l) = qubesdb_link.as_mut() {
            l.set_store(store);
            l.set_overrides(
                cmdline::qubesdb_overrides(cmdline_text)
                    .map(|(k, v)| (k.into(), v.into()))
                    .collect(),
            );
        }
        // Under Qubes (QubesDB came over vchan), dom0's qrexec daemon
        // expects an agent: grants of its own from the same table.
        if qubesdb_link.is_some() {
            let grants = table.split_off(QREXEC_GRANTS);
            let domid = store.read("domid").unwrap_or_default();
            match qrexec::Agent::start(store, grants, domid.trim()) {
                Ok(a) => agent = Some(a),
                Err(e) => println!("qrexec: {e}; no agent"),
            }
        }
        let (port, evtchn) = connect_netfront(&dev, store, table);
        devices.push(port);
        netfront_port = Some(evtchn);
        // Client VMs whose vif names this domain as its backend (Qubes's
        // firewall VM): one port per client, ports 1..
        if config.layout.unwrap_or(Layout::Single) == Layout::Single {
            devices.extend(
                (0..config.clients)
                    .map(|slot| ports::Port::Client(netback::ClientVif::new(slot, store))),
            );
            println!(
                "netback: serving up to {} client vifs (ports 1-{}; our XenStore area backend/vif)",
                config.clients, config.clients
            );
        } else {
            println!("netback: client vifs are served in layout single only");
        }
    }
    // A netfront uplink may run alone; virtio NICs need a downlink too.
    if devices.is_empty() && nics.len() < 2 {
        println!(
            "config error: need an uplink and at least one downlink NIC, found {}",
            nics.len()
        );
        exit::failure();
    }
    for c in &net.clients {
        if let Err(e) = &c.rules {
            println!("rules: client {}: {e}; dropping all its traffic", c.ip);
        }
    }
    // `rtc` gives each CPU a queue pair of every NIC: as many pairs as
    // CPUs unless `queues=` says fewer.
    let cpus = 1 + smp::online_aps().len();
    let want_pairs = match config.layout {
        Some(Layout::Rtc) if config.queues == 1 => cpus.min(16) as u16,
        Some(Layout::Rtc) => config.queues.min(cpus as u16),
        _ => config.queues,
    };
    for f in nics {
        let a = f.address;
        let nic = virtio_hal::transport(access, a.bus(), a.device(), a.function())
            .map_err(String::from)
            .and_then(|t| {
                // The data queues' doorbells (the control queue, used
                // once at set-up, notifies through the transport).
                let queues = 2 * want_pairs;
                let mut platform =
                    virtio_hal::NetPlatform::new(access, a.bus(), a.device(), a.function(), queues);
                VirtioNet::new(t, want_pairs, &mut platform)
                    .map_err(|e| format!("device refused set-up: {e:?}"))
            });
        match nic {
            Ok(n) => {
                let (pairs, offered) = n.queue_pairs();
                println!(
                    "nic {:02x}:{:02x}.{}: virtio-net, {pairs} queue pairs (asked {}, the device offers {offered}); {} of {} queues rung through their own doorbell",
                    a.bus(),
                    a.device(),
                    a.function(),
                    want_pairs,
                    n.doorbells(),
                    2 * pairs
                );
                devices.push(ports::Port::Virtio(n))
            }
            Err(e) => {
                println!(
                    "nic {:02x}:{:02x}.{}: {e}",
                    a.bus(),
                    a.device(),
                    a.function()
                );
                exit::failure();
            }
        }
    }
    // Enough to fill every receive ring and as many transmit rings, plus
    // room for what is in flight between them.
    let buffers = devices.iter().map(ports::Port::buffers).sum::<usize>() + 512;
    if devices.len() == 1 {
        println!("dataplane: uplink only (no client NICs): answering ARP and ping on the uplink");
    }
    let pool = PacketPool::new(phys::dma_region(buffers * drivers::pool::BUF_SIZE));
    println!(
        "memory: {} packet buffers, {} KiB free after rings and buffers",
        pool.capacity(),
        phys::free_bytes() / 1024
    );
    let macs: Vec<[u8; 6]> = devices.iter().map(|d| d.mac()).collect();
    print_ready(&net, &macs);
    if config.firewall_off {
        println!(
            "WARNING: firewall=off: forwarding without rules, connection tracking or NAT \
             (a benchmark's limit mode; never deploy this)"
        );
    }
    let stats_interval_ms = u64::from(config.stats_interval_s) * 1000;
    let aps = smp::online_aps();
    // `single` unless asked: on the 2-core development host the pipeline's
    // second polling vCPU costs QEMU's I/O threads more than it gains
    // (docs/benchmarks.md).
    let layout = config.layout.unwrap_or(Layout::Single);
    let (idle, ticks) = idle::start(config.idle);
    let idle = match (config.idle, netfront_port) {
        (cmdline::Idle::Halt { .. }, Some(port))
            if xen::present() && idle::start_xen(port, config.xen_wake_us) =>
        {
            println!(
                "idle: block in Xen (SCHEDOP_poll on event channel {port}, at most {} us)",
                config.xen_wake_us
            );
            config.idle
        }
        _ => idle,
    };
    match (config.idle, idle) {
        (_, cmdline::Idle::Halt { .. }) if xen::present() => {}
        (_, cmdline::Idle::Halt { wake_us }) => {
            println!("idle: halt, woken every {wake_us} us (local APIC timer, {ticks} ticks)")
        }
        (cmdline::Idle::Halt { .. }, cmdline::Idle::Poll) if xen::present() => {
            println!("idle: poll (blocking in Xen needs a netfront and Xen's time record)")
        }
        (cmdline::Idle::Halt { .. }, cmdline::Idle::Poll) => {
            println!("idle: poll (halt asked, but there is no usable local APIC timer)")
        }
        _ => println!("idle: poll"),
    }
    let generator = config.generate.map(|len| {
        println!(
            "generator: sending {len}-byte UDP frames to the gateway out of the uplink, as fast \
             as it can (stats: generator ...)"
        );
        dataplane::Generator::new(usize::from(len))
    });
    // One firewall for `single` and `pipeline`; `rtc` makes one per core.
    let firewall = |net: NetConfig, macs: Vec<[u8; 6]>| {
        let mut f = Firewall::new(net, macs);
        f.set_forward_only(config.firewall_off);
        f
    };
    match (layout, aps.first()) {
        (Layout::Rtc | Layout::Pipeline, _) if generator.is_some() => {
            println!("config error: generate= runs in layout=single only");
            exit::failure();
        }
        (Layout::Rtc, _) => {
            if qubesdb_link.is_some() {
                println!("qubesdb: dom0's later updates are followed in layout single only");
            }
            if agent.is_some() {
                println!("qrexec: the agent answers in layout single only");
            }
            let (queues, cores) = rtc_queues(devices);
            let cpus: Vec<usize> = core::iter::once(0).chain(aps).take(cores).collect();
            println!(
                "dataplane: layout rtc ({cores} cores, each with one queue pair of every NIC: cpus {cpus:?})"
            );
            rtc::run_rtc(
                queues,
                pool,
                net,
                macs,
                config.firewall_off,
                stats_interval_ms,
                &cpus,
                (idle, config.idle),
            )
        }
        (Layout::Pipeline, Some(&ap)) => {
            println!("dataplane: layout pipeline (nics on cpu 0, firewall on cpu {ap})");
            if qubesdb_link.is_some() {
                println!("qubesdb: dom0's later updates are followed in layout single only");
            }
            if agent.is_some() {
                println!("qrexec: the agent answers in layout single only");
            }
            let nics = dataplane::Nics::new(devices, pool);
            dataplane::run_pipeline(nics, firewall(net, macs), stats_interval_ms, ap, idle)
        }
        (Layout::Pipeline, None) => {
            println!("config error: layout=pipeline needs a second CPU, and only one is online");
            exit::failure();
        }
        (Layout::Single, _) => {
            smp::park_idle();
            println!("dataplane: layout single (everything on cpu 0)");
            dataplane::run_single(
                dataplane::Nics::new(devices, pool),
                firewall(net, macs),
                stats_interval_ms,
                idle,
                generator,
                (qubesdb_link, agent),
            )
        }
    }
}

/// The NICs split into their queue pairs for `rtc`, `[nic][pair]`, and
/// the number of cores: every NIC a virtio NIC with the same number of
/// pairs, at least two, each with its own doorbells (stops with a
/// configuration error otherwise).
fn rtc_queues(devices: Vec<ports::Port>) -> (Vec<Vec<drivers::virtio_net::VirtioQueue>>, usize) {
    let cpus = 1 + smp::online_aps().len();
    let pairs: Vec<usize> = devices.iter().map(ports::Port::queue_pairs).collect();
    let cores = pairs.iter().copied().min().unwrap_or(0);
    let fail = |why: String| -> ! {
        println!("config error: layout=rtc {why}");
        exit::failure();
    };
    if cpus < 2 {
        fail(alloc::format!(
            "needs a second CPU, and only {cpus} is online"
        ));
    }
    if cores < 2 || pairs.iter().any(|&p| p != cores) {
        fail(alloc::format!(
            "needs the same number (at least two) of queue pairs on every NIC (multi-queue \
             virtio-net, queues=N); they have {pairs:?}"
        ));
    }
    let mut queues = Vec::new();
    for d in devices {
        match d {
            ports::Port::Virtio(n) => match n.into_queues() {
                Ok(q) => queues.push(q),
                Err(_) => fail("needs every queue's own doorbell".into()),
            },
            ports::Port::Netfront(_) | ports::Port::Client(_) => {
                fail("runs on virtio-net NICs only".into())
            }
        }
    }
    (queues, cores)
}

/// QubesDB keys: the fw_cfg snapshot, then QubesDB's own entries (under
/// Qubes), then command-line overrides.
fn load_config(cmdline_text: &str, qubesdb: &[(String, String)]) -> Result<NetConfig, String> {
    let mut db = match fw_cfg::read_file(QUBESDB_FW_CFG) {
        Ok(Some(bytes)) => {
            let text =
                core::str::from_utf8(&bytes).map_err(|_| format!("{QUBESDB_FW_CFG}: not UTF-8"))?;
            QubesDb::parse_snapshot(text).map_err(|e| format!("{QUBESDB_FW_CFG}: {e}"))?
        }
        Ok(None) => QubesDb::new(),
        Err(e) => return Err(format!("{QUBESDB_FW_CFG}: {e}")),
    };
    for (path, value) in qubesdb {
        db.set(path, value).map_err(|e| format!("qubesdb: {e}"))?;
    }
    for (path, value) in cmdline::qubesdb_overrides(cmdline_text) {
        db.set(path, value).map_err(|e| e.to_string())?;
    }
    NetConfig::from_db(&db).map_err(|e| e.to_string())
}

/// The boot report's part on what netfront will need: the shared-info
/// page, the grant table, an event channel — each set up against Xen and
/// checked: a page granted to dom0 and taken back.
fn xen_sharing_report() -> Option<gnttab::GrantTable> {
    let shared = gnttab::SharedInfo::get();
    match shared {
        Ok(si) => println!(
            "xen: shared info at {:#x}; console event channel {}",
            si.address(),
            if si.masked(xen::console_port()) {
                "masked"
            } else {
                "unmasked"
            }
        ),
        Err(e) => println!("xen: {e}"),
    }
    let table = match gnttab::GrantTable::setup(1) {
        Ok(mut t) => {
            println!(
                "xen: grant table v1, {} of {} frames at {:#x} ({} refs free)",
                t.frames(),
                t.max_frames,
                t.base(),
                t.free_refs()
            );
            let (page, _) = phys::alloc_dma(4096);
            match t.grant(0, page >> 12, true) {
                Some(r) if t.end(r) => {
                    println!("xen: grant ref {} given to dom0 and taken back", r.0)
                }
                Some(r) => println!("xen: grant ref {} could not be taken back", r.0),
                None => println!("xen: no grant reference free"),
            }
            Some(t)
        }
        Err(e) => {
            println!("xen: {e}");
            None
        }
    };
    match gnttab::alloc_unbound(0) {
        Some(port) => println!("xen: event channel {port} allocated for dom0"),
        None => println!("xen: EVTCHNOP_alloc_unbound failed"),
    }
    // A channel looped back to ourselves: an event sent on one end must be
    // pending on the other, as netback's will be.
    let (Ok(si), Some(a)) = (
        shared,
        gnttab::alloc_unbound(xen_shim::hypercall::DOMID_SELF),
    ) else {
        return table;
    };
    let Some(b) = xen::bind_interdomain(xen_shim::hypercall::DOMID_SELF, a) else {
        println!("xen: EVTCHNOP_bind_interdomain failed");
        return table;
    };
    let before = si.take_pending(a);
    xen::notify(b);
    let after = si.take_pending(a);
    if !before && after {
        println!("xen: event channels {a} <-> {b}: an event sent on one is pending on the other");
    } else {
        println!("xen: event channels {a} <-> {b}: pending {before} before, {after} after a send");
    }
    table
}

/// The boot report's XenStore part: who we are, the paravirtual devices
/// the toolstack gave us (and their backends), and a write of our own
/// status read back.
fn xenstore_report(store: &mut xenstore::XenStore) {
    match (store.read("name"), store.read("domid")) {
        (Ok(name), Ok(domid)) => println!("xenstore: domain \"{name}\", domid {domid}"),
        (Err(e), _) | (_, Err(e)) => println!("xenstore: read failed: {e:?}"),
    }
    // `device` may not exist when the domain has no devices.
    for class in store.directory("device").unwrap_or_default() {
        for dev in store
            .directory(&format!("device/{class}"))
            .unwrap_or_default()
        {
            let node = format!("device/{class}/{dev}");
            // Entries without a backend (`device/suspend/event-channel`)
            // are not devices.
            let Ok(backend) = store.read(&format!("{node}/backend")) else {
                continue;
            };
            match store.read(&format!("{node}/state")) {
                Ok(st) => println!("xenstore: device {class}/{dev} backend {backend} state {st}"),
                Err(e) => println!("xenstore: device {class}/{dev} state unreadable: {e:?}"),
            }
        }
    }
    let status = concat!("booted ", env!("CARGO_PKG_VERSION"));
    match store
        .write("data/portcullis", status)
        .and_then(|()| store.read("data/portcullis"))
    {
        Ok(v) if v == status => println!("xenstore: wrote data/portcullis and read it back"),
        Ok(v) => println!("xenstore: data/portcullis reads back '{v}'"),
        Err(e) => println!("xenstore: write failed: {e:?}"),
    }
    // A watch on that key: the event xenstored sends when it is set, then
    // one for a write of ours (how netfront will follow netback's state).
    let watched = store
        .watch("data/portcullis", "status")
        .and_then(|()| store.next_event(2000))
        .and_then(|_| store.write("data/portcullis", "watched"))
        .and_then(|()| store.next_event(2000));
    match watched {
        // (The event names the path as the watch gave it.)
        Ok((path, token)) if path.ends_with("data/portcullis") && token == "status" => {
            println!("xenstore: watch on data/portcullis fired on a write")
        }
        Ok((path, token)) => println!("xenstore: unexpected watch event {path} {token}"),
        Err(e) => println!("xenstore: watch failed: {e:?}"),
    }
    // Nobody follows it later: its events would wait in the queue forever.
    if let Err(e) = store.unwatch("data/portcullis", "status") {
        println!("xenstore: unwatch failed: {e:?}");
    }
    // A transaction that reads and writes the key while, the first time,
    // the key changes outside it: xenstored refuses that commit (EAGAIN)
    // and the second run commits.
    let mut runs = 0;
    let done = store.transaction(|t| {
        runs += 1;
        let before = t.read("data/portcullis")?;
        if runs == 1 {
            t.outside().write("data/portcullis", "changed outside")?;
        }
        t.write("data/portcullis", &format!("{before} + transaction"))
    });
    match (done, store.read("data/portcullis")) {
        (Ok(()), Ok(v)) if runs == 2 && v == "changed outside + transaction" => println!(
            "xenstore: a transaction met a conflicting write, was refused (EAGAIN), ran again and committed"
        ),
        (Ok(()), Ok(v)) => println!("xenstore: transaction committed after {runs} runs: '{v}'"),
        (Err(e), _) | (_, Err(e)) => println!("xenstore: transaction failed: {e:?}"),
    }
}

pub(crate) fn fmt_mac(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

fn print_ready(net: &NetConfig, macs: &[[u8; 6]]) {
    print!(
        "portcullis: ready uplink {}/{} gateway {} mac {} client-gateway {} downlinks {}",
        net.uplink_ip,
        net.uplink_prefix,
        net.gateway,
        fmt_mac(&macs[0]),
        net.client_gateway,
        macs.len() - 1
    );
    for (v, u) in net.virtual_dns.iter().zip(net.upstream_dns.iter()) {
        if let (Some(v), Some(u)) = (v, u) {
            print!(" dns {v}->{u}");
        }
    }
    if let Some(v6) = &net.ip6 {
        print!(
            " ipv6 {} gateway6 {} client-gateway6 {}",
            v6.uplink_ip, v6.gateway, v6.client_gateway
        );
    }
    print!(" clients");
    for c in &net.clients {
        print!(" {}", c.ip);
    }
    println!();
}

fn read_start_info(paddr: u64) -> StartInfo {
    let mut raw = [0u8; START_INFO_SIZE];
    if !phys::read(paddr, &mut raw) {
        fatal_boot(format_args!(
            "start info at {paddr:#x} is not in mapped memory"
        ));
    }
    match StartInfo::parse(&raw) {
        Ok(i) => i,
        Err(e) => fatal_boot(format_args!("{e}")),
    }
}

/// The command line without its NUL; empty when absent or unreadable.
fn read_cmdline<'a>(info: &StartInfo, buf: &'a mut [u8; MAX_CMDLINE]) -> &'a [u8] {
    if info.cmdline_paddr == 0 {
        return &[];
    }
    // Read up to the end of the page-limited window that is mapped.
    let mut len = 0;
    while len < buf.len() {
        let mut b = [0u8; 1];
        if !phys::read(info.cmdline_paddr + len as u64, &mut b) || b[0] == 0 {
            break;
        }
        buf[len] = b[0];
        len += 1;
    }
    if len == buf.len() {
        fatal_boot(format_args!("command line longer than {MAX_CMDLINE} bytes"));
    }
    &buf[..len]
}

fn read_memory_map(info: &StartInfo) -> PhysMemory {
    let entry = |i: u32| {
        let mut raw = [0u8; MEMMAP_ENTRY_SIZE];
        let at = info.memmap_paddr + u64::from(i) * MEMMAP_ENTRY_SIZE as u64;
        if !phys::read(at, &mut raw) {
            fatal_boot(format_args!(
                "memory map entry at {at:#x} is not in mapped memory"
            ));
        }
        MemmapEntry::parse(&raw)
    };
    for i in 0..info.memmap_entries {
        let e = entry(i);
        log::debug!("memmap: [{:#x}, {:#x}) {}", e.addr, e.end(), e.kind.name());
    }
    let mem = PhysMemory::from_entries((0..info.memmap_entries).map(entry));
    if mem.lost_ranges() > 0 {
        log::warn!(
            "memmap: {} fragments beyond the table size ignored",
            mem.lost_ranges()
        );
    }
    mem
}

/// Takes out of the free list what is already in use: the low megabyte
/// (firmware, the start info), the kernel image, and the start-of-day data.
fn reserve_in_use(mem: &mut PhysMemory, info: &StartInfo) {
    mem.reserve(Range::new(0, 0x10_0000));
    mem.reserve(phys::kernel_image());
    mem.reserve(Range::new(
        info.cmdline_paddr,
        info.cmdline_paddr.saturating_add(MAX_CMDLINE as u64),
    ));
    let map_len = u64::from(info.memmap_entries) * MEMMAP_ENTRY_SIZE as u64;
    mem.reserve(Range::new(
        info.memmap_paddr,
        info.memmap_paddr.saturating_add(map_len),
    ));
}

fn run_test_fault(config: &BootConfig) {
    match config.test_fault {
        None => {}
        Some(TestFault::PageFault) => {
            println!(
                "test-fault: reading unmapped address {:#x}",
                phys::UNMAPPED_PROBE
            );
            phys::touch_unmapped();
        }
        Some(TestFault::InvalidOpcode) => {
            println!("test-fault: executing ud2");
            cpu::invalid_opcode();
        }
        Some(TestFault::Panic) => panic!("test-fault=panic requested on the command line"),
    }
}

/// A start-of-day structure is unusable: report it and stop.
fn fatal_boot(msg: core::fmt::Arguments) -> ! {
    println!("FATAL: boot: {msg}");
    exit::failure();
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    console::emergency();
    match info.location() {
        Some(l) => println!(
            "FATAL: panic at {}:{}:{}: {}",
            l.file(),
            l.line(),
            l.column(),
            info.message()
        ),
        None => println!("FATAL: panic: {}", info.message()),
    }
    exit::failure();
}
