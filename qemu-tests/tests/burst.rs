//! A burst of numbered frames of several flows through every layout: each
//! allowed frame comes out exactly once, every flow in order, what must be
//! dropped is dropped, and the counters add up (frames received = frames
//! forwarded + frames dropped by reason + the one ARP reply consumed), and
//! every frame of a flow after its first takes the fast path.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use qemu_tests::lab::*;
use qemu_tests::netns::{Topology, SERVER};
use qemu_tests::{kernel, RunningMachine};

const FLOWS: u16 = 3;
const PER_FLOW: u16 = 100;

fn burst(cmdline: &str, cpus: u32) {
    let lab = Lab::start_on(QUBESDB, cmdline, cpus);
    let mut blocked = 0u64;
    let mut spoofed = 0u64;
    for seq in 0..PER_FLOW {
        for flow in 0..FLOWS {
            let mut payload = vec![flow as u8];
            payload.extend_from_slice(&seq.to_be_bytes());
            payload.extend_from_slice(b"burst");
            lab.downlink.send(&udp(
                (CLIENT_MAC, DOWNLINK_MAC),
                CLIENT_IP,
                SERVER_IP,
                64,
                (41000 + flow, 5201),
                &payload,
            ));
        }
        if seq % 10 == 0 {
            // A blocked port (rejected) and a spoofed source (dropped).
            lab.downlink.send(&udp(
                (CLIENT_MAC, DOWNLINK_MAC),
                CLIENT_IP,
                SERVER_IP,
                64,
                (42000, 22),
                b"no",
            ));
            lab.downlink.send(&udp(
                (CLIENT_MAC, DOWNLINK_MAC),
                [10, 137, 0, 99],
                SERVER_IP,
                64,
                (42001, 5201),
                b"spoof",
            ));
            blocked += 1;
            spoofed += 1;
        }
    }
    let expected = u64::from(FLOWS) * u64::from(PER_FLOW);
    let mut seen: BTreeMap<u8, Vec<u16>> = BTreeMap::new();
    let mut got = 0u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while got < expected {
        let left = deadline
            .checked_duration_since(Instant::now())
            .unwrap_or_else(|| panic!("only {got} of {expected} frames came out: {seen:?}"));
        let Some(f) = lab.uplink.recv(left) else {
            panic!("only {got} of {expected} frames came out");
        };
        let f = Frame::parse(&f);
        let Some(ip) = f.ipv4.as_ref() else { continue };
        if ip.dport != 5201 {
            continue;
        }
        assert_eq!(ip.src, UPLINK_IP, "translated");
        let data = &ip.l4[8..];
        assert!(data.ends_with(b"burst"), "only allowed frames come out");
        seen.entry(data[0])
            .or_default()
            .push(u16::from_be_bytes([data[1], data[2]]));
        got += 1;
    }
    assert!(
        lab.uplink.recv(Duration::from_millis(300)).is_none(),
        "nothing more comes out"
    );
    for flow in 0..FLOWS as u8 {
        let want: Vec<u16> = (0..PER_FLOW).collect();
        assert_eq!(
            seen.get(&flow),
            Some(&want),
            "flow {flow}: every frame once, in order"
        );
    }
    let done = lab.finish();
    let c = |k: &str| done.counter(k);
    let sent = expected + blocked + spoofed;
    assert_eq!(c("nic1.rx_packets"), sent, "{}", done.console);
    assert_eq!(c("firewall.to_upstream"), expected);
    assert_eq!(c("drops.rule-reject"), blocked);
    assert_eq!(c("drops.spoofed-source"), spoofed);
    assert_eq!(c("firewall.flows_created"), u64::from(FLOWS));
    // Every frame after a flow's first took the fast path (these frames
    // are 50 bytes, unpadded: it takes UDP from 42).
    assert_eq!(
        c("firewall.fast_path"),
        expected - u64::from(FLOWS),
        "{}",
        done.console
    );
    let received = c("nic0.rx_packets") + c("nic1.rx_packets");
    assert_eq!(
        received,
        c("firewall.to_upstream") + c("firewall.to_clients") + c("drops.total") + 2,
        "every frame forwarded or dropped by reason (+2: the gateway's ARP reply and request, consumed)"
    );
    assert_eq!(c("pool.core_ring_full_drops"), 0);
    // Each core counted what it took in.
    assert_eq!(c("core0.packets"), received);
    if cmdline.contains("pipeline") {
        assert_eq!(c("core1.packets"), received, "{}", done.console);
    }
}

#[test]
fn burst_single_on_one_cpu() {
    burst("", 1);
}

#[test]
fn burst_single_on_four_cpus() {
    burst("", 4);
}

#[test]
fn burst_pipeline_on_two_cpus() {
    burst("layout=pipeline", 2);
}

/// Receives UDP on port 5201 upstream until two seconds pass without a
/// datagram (after the first); prints "flow seq" per datagram, in order.
const RECEIVER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 5201))
print("listening", flush=True)
s.settimeout(30)
try:
    while True:
        data, _ = s.recvfrom(2048)
        print(data.decode(), flush=True)
        s.settimeout(2)
except socket.timeout:
    pass
"#;

/// Sends `per_flow` numbered datagrams on each flow (one socket per
/// source port and destination), interleaved round by round.
const SENDER: &str = r#"
import socket, sys, time
dsts, ports, per_flow = sys.argv[1].split(","), [int(p) for p in sys.argv[2].split(",")], int(sys.argv[3])
flows = []
for d in dsts:
    for p in ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", p))
        s.connect((d, 5201))
        flows.append((f"{d}:{p}", s))
for seq in range(per_flow):
    for name, s in flows:
        s.send(f"{name} {seq}".encode())
    time.sleep(0.008)
"#;

/// The `rtc` layout on two CPUs with two-queue taps: numbered datagrams
/// of 16 flows (8 server addresses, 2 client ports each) from a real
/// client namespace. The host spreads them over both receive queues and
/// the cores own them by server address, so frames are handed between
/// cores; still every datagram arrives exactly once and every flow in
/// order, both cores forward, and what one core hands over another takes.
#[test]
fn burst_rtc_on_two_cpus_over_multi_queue_taps() {
    burst_rtc(2);
}

/// The same with four CPUs, four queue pairs per NIC.
#[test]
fn burst_rtc_on_four_cpus_over_multi_queue_taps() {
    burst_rtc(4);
}

/// The rtc runs take the machine's CPUs (QEMU's vCPUs, the senders): one
/// at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn burst_rtc(cpus: u32) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let topo = Topology::create_with_queues(
        &format!("b{cpus}{}", std::process::id() % 100_000),
        cpus as u16,
    )
    .expect("network topology");
    let dir = std::env::temp_dir().join(format!("portcullis-burst{cpus}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("qubesdb");
    std::fs::write(&db, QUBESDB).unwrap();
    let machine = topo.machine(kernel(), &db).cpus(cpus).append("layout=rtc");
    let mut vm = RunningMachine::spawn(&machine).expect("QEMU");
    topo.wait_opened(vm.pid(), Duration::from_secs(10)).unwrap();
    topo.attach().expect("taps into namespaces");
    vm.wait_for(Duration::from_secs(30), |l| {
        l.starts_with("portcullis: ready")
    })
    .expect("ready line");
    let servers: Vec<String> = (81..=88).map(|i| format!("192.0.2.{i}")).collect();
    for s in &servers {
        let out = Topology::run(
            topo.in_upstream("ip", &["addr", "add", &format!("{s}/32"), "dev", "lo"]),
        );
        assert!(out.status.success(), "{out:?}");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while !Topology::run(topo.in_client("ping", &["-c", "1", "-W", "1", SERVER]))
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "the server is not reachable");
    }
    let mut receiver = topo
        .in_upstream("python3", &["-c", RECEIVER])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("receiver");
    let mut out = std::io::BufReader::new(receiver.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "listening");
    let per_flow: u32 = 100;
    let sent = Topology::run(topo.in_client(
        "python3",
        &[
            "-c",
            SENDER,
            &servers.join(","),
            "41000,41001",
            &per_flow.to_string(),
        ],
    ));
    assert!(sent.status.success(), "{sent:?}");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let _ = receiver.wait();
    let mut seen: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for l in rest.lines() {
        let (flow, seq) = l.split_once(' ').expect("flow seq");
        seen.entry(flow.to_string())
            .or_default()
            .push(seq.parse().unwrap());
    }
    let done = quit(&mut vm);
    let want: Vec<u32> = (0..per_flow).collect();
    assert_eq!(seen.len(), 16, "{:?}", seen.keys().collect::<Vec<_>>());
    for (flow, seqs) in &seen {
        assert_eq!(seqs, &want, "flow {flow}: every datagram once, in order");
    }
    // Each core's last `stats: core<N> rtc ...` line, as `core<N>.<key>`.
    let core = |cpu: u32, k: &str| done.counter(&format!("core{cpu}.{k}"));
    let sum = |k: &str| -> u64 { (0..cpus).map(|c| core(c, k)).sum() };
    let lines: Vec<&str> = done
        .console
        .lines()
        .filter(|l| l.starts_with("stats: core"))
        .collect();
    println!("{}", lines.join("\n"));
    assert!((0..cpus).all(|c| core(c, "forward") > 0), "{lines:?}");
    assert!(
        sum("handed_off") > 0 && sum("handed_off") == sum("taken_over"),
        "{lines:?}"
    );
    assert_eq!(done.counter("pool.core_ring_full_drops"), 0);
    // Counters add up: every frame received (and every copy made for all
    // cores) got exactly one verdict on exactly one core, and the drops
    // are the firewall's drops by reason.
    let received = done.counter("nic0.rx_packets") + done.counter("nic1.rx_packets");
    assert_eq!(
        received + sum("copies"),
        sum("forward") + sum("drop") + sum("consumed"),
        "{lines:?}"
    );
    assert_eq!(sum("drop"), done.counter("drops.total"), "{lines:?}");
    assert!(
        done.counter("firewall.to_upstream") >= u64::from(per_flow) * 16,
        "{}",
        done.console
    );
    assert!(done.counter("firewall.flows_created") >= 16);
    let _ = std::fs::remove_dir_all(&dir);
}
