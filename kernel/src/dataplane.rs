//! The forwarding loops. No interrupts, no locks, no allocation on the
//! packet path.
//!
//! - `single`: one loop on the boot CPU polls every NIC, runs each received
//!   batch through the firewall and transmits each NIC's batch with one
//!   notification.
//! - `pipeline`: the boot CPU owns the NICs and the buffer pool; a second
//!   CPU owns the firewall. Received packets go to the firewall core over
//!   an SPSC ring; verdicts come back over another (a port to send on, or
//!   "free this buffer"), so buffers are only ever freed by the core that
//!   owns the pool. A third ring keeps the firewall core supplied with a
//!   few spare buffers for the ARP requests it makes.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, Ordering};

use drivers::pool::PacketMemory;
use drivers::spsc::{self, Consumer, Producer};
use drivers::{BufId, Nic, Packet, PacketPool};
use netstack::firewall::{DropReason, Firewall, Summary, Verdict};

use kernel::cmdline::Idle;

use crate::idle::Idler;
use crate::{clock, console, exit};

/// Frames taken from one NIC per poll.
pub(crate) const RX_BATCH: usize = 64;
/// Packets waiting for one NIC's TX ring at most; beyond it they are
/// dropped and counted.
const TX_BACKLOG: usize = 1024;
/// How often queued ARP requests and flow expiry are looked at.
pub(crate) const HOUSEKEEPING_MS: u64 = 10;
/// Slots of each inter-core ring.
const RING_SLOTS: usize = 1024;
/// Spare buffers the firewall core is kept supplied with.
const SPARES: usize = 8;

/// What the NIC side of the dataplane owns, in either layout.
pub struct Nics<N: Nic> {
    pub nics: Vec<N>,
    pub pool: PacketPool,
    /// Packets dropped because a TX backlog was full, per NIC.
    pub tx_backlog_drops: Vec<u64>,
    /// Packets dropped because the ring to the firewall core was full.
    pub ring_full_drops: u64,
    tx: Vec<Vec<Packet>>,
    /// Per port serving assigned clients (Xen netback): the generation of
    /// its addresses the firewall has.
    assigned: Vec<Option<u64>>,
}

impl<N: Nic> Nics<N> {
    pub fn new(nics: Vec<N>, pool: PacketPool) -> Self {
        let tx = nics
            .iter()
            .map(|_| Vec::with_capacity(TX_BACKLOG))
            .collect();
        Self {
            tx_backlog_drops: alloc::vec![0; nics.len()],
            ring_full_drops: 0,
            assigned: alloc::vec![None; nics.len()],
            nics,
            pool,
            tx,
        }
    }

    /// Gives the firewall the addresses of every port that serves
    /// assigned clients, when they changed (before the round's frames, so
    /// a client's port is pinned before its first frame).
    pub(crate) fn assign(&mut self, firewall: &mut Firewall) {
        for (port, nic) in self.nics.iter().enumerate() {
            let Some((generation, addrs)) = nic.assigned() else {
                continue;
            };
            if self.assigned[port] == Some(generation) {
                continue;
            }
            self.assigned[port] = Some(generation);
            let unknown = firewall.assign_port(port, addrs);
            match addrs {
                [] if generation == 0 => {}
                [] => println!("firewall: port {port} serves nobody"),
                _ => {
                    print!("firewall: port {port} serves");
                    for a in addrs {
                        print!(" {a}");
                    }
                    println!();
                }
            }
            for a in unknown {
                println!(
                    "firewall: port {port}: {a} is not a connected client (/connected-ips); its frames are dropped"
                );
            }
        }
    }

    /// Queues a packet for `port`, or frees it if that backlog is full.
    pub(crate) fn queue(&mut self, port: usize, p: Packet) {
        match self.tx.get_mut(port) {
            Some(q) if q.len() < TX_BACKLOG => q.push(p),
            Some(_) => {
                self.tx_backlog_drops[port] += 1;
                self.pool.free(p.buf);
            }
            None => self.pool.free(p.buf),
        }
    }

    /// Transmits every backlog (one notification per NIC at most), then
    /// reclaims finished TX buffers and refills the RX rings.
    pub(crate) fn flush(&mut self) {
        for (i, batch) in self.tx.iter_mut().enumerate() {
            if !batch.is_empty() {
                self.nics[i].tx_batch(&mut self.pool, batch);
            }
        }
        for nic in &mut self.nics {
            nic.maintain(&mut self.pool);
        }
    }

    fn print_stats(&self) {
        for (i, nic) in self.nics.iter().enumerate() {
            let s = nic.stats();
            // A client vif that never served anyone has nothing to say.
            if nic.assigned().is_some() && s == drivers::NicStats::default() {
                continue;
            }
            print_nic_stats(i, s, self.tx_backlog_drops[i], &nic.rx_queues());
        }
    }

    pub(crate) fn print_pool(&self) {
        println!(
            "stats: pool free={} of {} core_ring_full_drops={} heap_in_use={} dma_free={}",
            self.pool.available(),
            self.pool.capacity(),
            self.ring_full_drops,
            crate::heap::in_use(),
            crate::phys::free_bytes()
        );
    }
}

/// The `stats: nic<N>` lines of one NIC (over every core, in `rtc`).
pub(crate) fn print_nic_stats(i: usize, s: drivers::NicStats, backlog_drops: u64, queues: &[u64]) {
    let role = if i == 0 { "uplink" } else { "downlink" };
    println!(
        "stats: nic{i} {role} rx_packets={} rx_bytes={} tx_packets={} tx_bytes={} rx_errors={} tx_ring_full={} tx_backlog_drops={} ring_errors={} tx_errors={} notifications={}",
        s.rx_packets,
        s.rx_bytes,
        s.tx_packets,
        s.tx_bytes,
        s.rx_errors,
        s.tx_ring_full,
        backlog_drops,
        s.ring_errors,
        s.tx_errors,
        s.notifications
    );
    if queues.len() > 1 {
        print!("stats: nic{i} rx_queues=");
        for (q, n) in queues.iter().enumerate() {
            print!("{}{n}", if q > 0 { "," } else { "" });
        }
        println!();
    }
}

fn print_firewall_stats(fw: &Firewall) {
    print_summary(&fw.summary());
}

/// The firewall's `stats:` lines (one firewall's, or every core's added).
pub(crate) fn print_summary(sum: &Summary) {
    let f = &sum.stats;
    println!(
        "stats: firewall to_upstream={} to_clients={} fast_path={} flows={} flows_created={} flows_evicted={} dns_redirected={} arp_replies={} echo_replies={} icmp_errors_sent={} icmp_errors_suppressed={} arp_requests_sent={} nd_solicits_sent={} nd_adverts={} dns_queries_sent={} dns_answers={}",
        f.to_upstream,
        f.to_clients,
        f.fast_path,
        sum.flows,
        f.flows_created,
        sum.evictions,
        f.dns_redirected,
        f.arp_replies,
        f.echo_replies,
        f.icmp_errors_sent,
        f.icmp_errors_suppressed,
        f.arp_requests_sent,
        f.nd_solicits_sent,
        f.nd_adverts,
        f.dns_queries_sent,
        f.dns_answers
    );
    for (name, v6, addrs, resolved) in &sum.dsthosts {
        print!(
            "stats: dsthost {name} ipv{} resolved={} addresses={}",
            if *v6 { 6 } else { 4 },
            u8::from(*resolved),
            addrs.len()
        );
        for a in addrs {
            print!(" {a}");
        }
        println!();
    }
    print!("stats: drops");
    for r in DropReason::ALL {
        let n = f.drop_count(*r);
        if n > 0 {
            print!(" {}={n}", r.name());
        }
    }
    println!(" total={}", f.dropped());
    for (ip, hits) in &sum.rules {
        match hits {
            Ok(h) => {
                print!("stats: rules {ip}");
                for (i, n) in h.iter().enumerate() {
                    if i + 1 == h.len() {
                        print!(" policy={n}");
                    } else {
                        print!(" {i:04}={n}");
                    }
                }
                println!();
            }
            Err(e) => println!("stats: rules {ip} invalid ({e}): all traffic dropped"),
        }
    }
}

/// What the console asks of the loop.
pub(crate) enum Request {
    None,
    Stats,
    Quit,
}

/// Console keys and the stats interval; checked every `HOUSEKEEPING_MS`.
pub(crate) struct Console {
    interval_ms: u64,
    last: u64,
}

impl Console {
    pub(crate) fn new(interval_ms: u64) -> Self {
        Self {
            interval_ms,
            last: clock::now_ms(),
        }
    }

    /// Prints the counters when asked (NICs, then `firewall_stats`, then
    /// the pool), and shuts down on `q`.
    fn serve<N: Nic>(&mut self, now: u64, nics: &Nics<N>, firewall_stats: impl FnOnce()) {
        let request = self.poll(now);
        if matches!(request, Request::None) {
            return;
        }
        nics.print_stats();
        firewall_stats();
        nics.print_pool();
        if let Request::Quit = request {
            println!("portcullis: shutdown requested");
            exit::success();
        }
    }

    pub(crate) fn poll(&mut self, now: u64) -> Request {
        if self.interval_ms > 0 && now.wrapping_sub(self.last) >= self.interval_ms {
            self.last = now;
            return Request::Stats;
        }
        match console::read_key() {
            Some(b's') => Request::Stats,
            Some(b'q') => Request::Quit,
            _ => Request::None,
        }
    }
}

/// One core's loop counters (`stats: core<N> <role> ...`).
pub(crate) struct CoreStats {
    cpu: usize,
    role: &'static str,
    /// Frames this core took in (from NICs, or from the ring).
    packets: u64,
    /// Non-empty batches they came in.
    batches: u64,
    /// TSC cycles spent in rounds that had work.
    busy_cycles: u64,
    /// The current round's start, and whether the last round had work.
    round_start: u64,
    last_busy: bool,
}

impl CoreStats {
    pub(crate) fn new(cpu: usize, role: &'static str) -> Self {
        Self {
            cpu,
            role,
            packets: 0,
            batches: 0,
            busy_cycles: 0,
            round_start: 0,
            last_busy: false,
        }
    }

    /// A round begins at TSC `tsc`: the last one counts as busy if it had
    /// work (measured start to start, so a round reads the TSC once).
    pub(crate) fn begin_round(&mut self, tsc: u64) {
        if self.last_busy {
            self.busy_cycles += tsc.wrapping_sub(self.round_start);
        }
        self.round_start = tsc;
    }

    /// Whether the round now ending had work.
    pub(crate) fn end_round(&mut self, busy: bool) {
        self.last_busy = busy;
    }

    pub(crate) fn batch(&mut self, n: usize) {
        if n > 0 {
            self.packets += n as u64;
            self.batches += 1;
        }
    }

    fn print(&self, idler: &Idler) {
        println!("{}", self.line(idler));
    }

    /// The `stats: core<N>` line.
    pub(crate) fn line(&self, idler: &Idler) -> alloc::string::String {
        let per = |a: u64, b: u64| a.checked_div(b).unwrap_or(0);
        let tenths = per(self.packets * 10, self.batches);
        alloc::format!(
            "stats: core{} {} packets={} batches={} avg_batch={}.{} idle_rounds={} halts={} cycles_per_packet={}",
            self.cpu,
            self.role,
            self.packets,
            self.batches,
            tenths / 10,
            tenths % 10,
            idler.idle_rounds,
            idler.halts,
            per(self.busy_cycles, self.packets)
        )
    }
}

/// Frames the traffic generator queues per loop round, at most.
const GENERATOR_BATCH: usize = 64;

/// The traffic generator (`generate=LEN`): synthetic UDP frames from the
/// uplink's address to its gateway's, once the gateway's MAC is known.
pub struct Generator {
    pub len: usize,
    /// Frames handed to the uplink.
    pub sent: u64,
    /// The frame, built once the gateway's MAC is known; each one sent is
    /// a copy.
    frame: Vec<u8>,
}

impl Generator {
    pub fn new(len: usize) -> Self {
        Self {
            len,
            sent: 0,
            frame: Vec::new(),
        }
    }

    /// Tops the uplink's empty backlog up with `GENERATOR_BATCH` frames.
    fn fill<N: Nic>(&mut self, nics: &mut Nics<N>, firewall: &Firewall) {
        if self.frame.is_empty() {
            let Some(gateway_mac) = firewall.gateway_mac() else {
                return;
            };
            let cfg = firewall.config();
            let mut frame = alloc::vec![0u8; self.len];
            let macs = (nics.nics[0].mac(), gateway_mac);
            if !netstack::wire::synthetic_udp(
                &mut frame,
                self.len,
                macs,
                (cfg.uplink_ip, cfg.gateway),
            ) {
                return;
            }
            self.frame = frame;
        }
        if !nics.tx[0].is_empty() {
            return;
        }
        for _ in 0..GENERATOR_BATCH {
            let Some(mut buf) = nics.pool.alloc() else {
                break;
            };
            let room = nics.pool.frame_room(&mut buf);
            match room.get_mut(..self.len) {
                Some(dst) => dst.copy_from_slice(&self.frame),
                None => {
                    nics.pool.free(buf);
                    break;
                }
            }
            nics.tx[0].push(Packet { buf, len: self.len });
            self.sent += 1;
        }
    }
}

/// Asks every NIC to signal its next received frame before the core
/// blocks; whether frames are already waiting on any.
fn arm_all<N: Nic>(nics: &mut Nics<N>) -> bool {
    nics.nics
        .iter_mut()
        .fold(false, |waiting, n| n.arm() | waiting)
}

/// Everything on the boot CPU; with `generator`, the uplink also sends
/// synthetic frames as fast as it can.
pub fn run_single<N: Nic>(
    mut nics: Nics<N>,
    mut firewall: Firewall,
    stats_interval_ms: u64,
    idle: Idle,
    mut generator: Option<Generator>,
    (mut qubesdb, mut qrexec): (
        Option<crate::vchan::QubesDbLink>,
        Option<crate::qrexec::Agent>,
    ),
) -> ! {
    let mut rx: Vec<Packet> = Vec::with_capacity(RX_BATCH);
    let mut last_housekeeping = 0;
    let mut console = Console::new(stats_interval_ms);
    let mut idler = Idler::new(idle);
    let mut counters = CoreStats::new(0, "all");
    let assigns = nics.nics.iter().any(|n| n.assigned().is_some());
    if qubesdb.as_mut().is_some_and(|q| !q.report_handled()) {
        qubesdb = None;
    }
    nics.flush();
    loop {
        let (start, now) = clock::now();
        counters.begin_round(start);
        if assigns {
            nics.assign(&mut firewall);
        }
        let mut busy = false;
        for i in 0..nics.nics.len() {
            nics.nics[i].rx_batch(&mut nics.pool, &mut rx, RX_BATCH);
            busy |= !rx.is_empty();
            counters.batch(rx.len());
            let mut batch = firewall.batch(now, i);
            for mut p in rx.drain(..) {
                let room = nics.pool.frame_room(&mut p.buf);
                match batch.handle(room, p.len) {
                    Verdict::Forward { port, len } => nics.queue(port, Packet { buf: p.buf, len }),
                    _ => nics.pool.free(p.buf),
                }
            }
        }
        if let Some(g) = generator.as_mut() {
            g.fill(&mut nics, &firewall);
            busy = true;
        }
        if now.wrapping_sub(last_housekeeping) >= HOUSEKEEPING_MS {
            last_housekeeping = now;
            firewall.expire(now, 256);
            if let Some(q) = qubesdb.as_mut() {
                if !q.follow(&mut firewall) {
                    qubesdb = None;
                }
            }
            if let Some(a) = qrexec.as_mut() {
                if !a.poll() {
                    qrexec = None;
                }
            }
            if let Some(mut buf) = nics.pool.alloc() {
                match firewall.poll_emit(now, nics.pool.frame_room(&mut buf)) {
                    Some((port, len)) => nics.queue(port, Packet { buf, len }),
                    None => nics.pool.free(buf),
                }
            }
            console.serve(now, &nics, || {
                print_firewall_stats(&firewall);
                counters.print(&idler);
                if let Some(g) = &generator {
                    println!("stats: generator len={} sent={}", g.len, g.sent);
                }
            });
        }
        nics.flush();
        counters.end_round(busy);
        idler.round(busy, || arm_all(&mut nics));
    }
}

/// A verdict travelling back to the NIC core: the port to send on, or
/// `None` to free the buffer.
type Back = (Option<usize>, Packet);

/// Set by the NIC core to ask the firewall core for its counters; cleared
/// by the firewall core when it has printed them.
static STATS_REQUEST: AtomicBool = AtomicBool::new(false);

/// The firewall core's half of the pipeline.
struct FirewallCore {
    firewall: Firewall,
    idle: Idle,
    /// The CPU (MADT position) it runs on.
    cpu: usize,
    memory: &'static PacketMemory,
    from_nics: Consumer<(usize, Packet)>,
    to_nics: Producer<Back>,
    spares: Consumer<BufId>,
}

impl FirewallCore {
    fn run(mut self) -> ! {
        // This core's own APIC timer, for `idle=halt`.
        let (idle, _) = crate::idle::start(self.idle);
        let mut idler = Idler::new(idle);
        let mut counters = CoreStats::new(self.cpu, "firewall");
        let mut batch: Vec<(usize, Packet)> = Vec::with_capacity(RX_BATCH);
        let mut out: Vec<Back> = Vec::with_capacity(2 * RX_BATCH);
        let mut spare: Vec<BufId> = Vec::with_capacity(SPARES);
        let mut last_housekeeping = 0;
        loop {
            let (start, now) = clock::now();
            counters.begin_round(start);
            self.from_nics.pop_batch(&mut batch, RX_BATCH);
            let busy = !batch.is_empty();
            counters.batch(batch.len());
            // Runs of frames from one port go through one firewall batch.
            let mut frames = batch.drain(..).peekable();
            while let Some(&(port, _)) = frames.peek() {
                let mut run = self.firewall.batch(now, port);
                while let Some((_, mut p)) = frames.next_if(|(q, _)| *q == port) {
                    let room = self.memory.frame_room(&mut p.buf);
                    match run.handle(room, p.len) {
                        Verdict::Forward { port, len } => {
                            out.push((Some(port), Packet { buf: p.buf, len }))
                        }
                        _ => out.push((None, p)),
                    }
                }
            }
            if now.wrapping_sub(last_housekeeping) >= HOUSEKEEPING_MS {
                last_housekeeping = now;
                self.firewall.expire(now, 256);
                if spare.is_empty() {
                    self.spares.pop_batch(&mut spare, SPARES);
                }
                if let Some(mut buf) = spare.pop() {
                    match self
                        .firewall
                        .poll_emit(now, self.memory.frame_room(&mut buf))
                    {
                        Some((port, len)) => out.push((Some(port), Packet { buf, len })),
                        None => spare.push(buf),
                    }
                }
                if STATS_REQUEST.load(Ordering::Acquire) {
                    print_firewall_stats(&self.firewall);
                    counters.print(&idler);
                    STATS_REQUEST.store(false, Ordering::Release);
                }
            }
            // The NIC core always drains this ring, so waiting for room
            // ends; the packets are never dropped here.
            while !out.is_empty() {
                if self.to_nics.push_batch(&mut out) == 0 {
                    core::hint::spin_loop();
                }
            }
            counters.end_round(busy);
            idler.round(busy, || false);
        }
    }
}

/// NICs and the pool on the boot CPU, the firewall on the AP at MADT
/// position `ap`. Falls back to `single` if the AP does not take the work.
pub fn run_pipeline<N: Nic>(
    mut nics: Nics<N>,
    firewall: Firewall,
    stats_interval_ms: u64,
    ap: usize,
    idle: Idle,
) -> ! {
    let (mut to_fw, from_nics) = spsc::ring::<(usize, Packet)>(RING_SLOTS);
    let (to_nics, mut from_fw) = spsc::ring::<Back>(RING_SLOTS);
    let (mut spares_tx, spares) = spsc::ring::<BufId>(2 * SPARES);
    let core = FirewallCore {
        firewall,
        idle,
        cpu: ap,
        memory: nics.pool.memory(),
        from_nics,
        to_nics,
        spares,
    };
    if !crate::smp::run_on(ap, alloc::boxed::Box::new(move || core.run())) {
        println!("dataplane: cpu {ap} did not take the firewall stage; stopping");
        exit::failure();
    }
    crate::smp::park_idle();
    let mut rx: Vec<Packet> = Vec::with_capacity(RX_BATCH);
    let mut to_ring: Vec<(usize, Packet)> = Vec::with_capacity(RX_BATCH);
    let mut back: Vec<Back> = Vec::with_capacity(2 * RX_BATCH);
    let mut refill: Vec<BufId> = Vec::with_capacity(SPARES);
    let mut last_housekeeping = 0;
    let mut console = Console::new(stats_interval_ms);
    let mut idler = Idler::new(idle);
    let mut counters = CoreStats::new(0, "nics");
    nics.flush();
    loop {
        let (start, now) = clock::now();
        counters.begin_round(start);
        let mut busy = false;
        for i in 0..nics.nics.len() {
            nics.nics[i].rx_batch(&mut nics.pool, &mut rx, RX_BATCH);
            busy |= !rx.is_empty();
            counters.batch(rx.len());
            to_ring.extend(rx.drain(..).map(|p| (i, p)));
            to_fw.push_batch(&mut to_ring);
            for (_, p) in to_ring.drain(..) {
                nics.ring_full_drops += 1;
                nics.pool.free(p.buf);
            }
        }
        from_fw.pop_batch(&mut back, 4 * RX_BATCH);
        busy |= !back.is_empty();
        for (port, p) in back.drain(..) {
            match port {
                Some(port) => nics.queue(port, p),
                None => nics.pool.free(p.buf),
            }
        }
        if now.wrapping_sub(last_housekeeping) >= HOUSEKEEPING_MS {
            last_housekeeping = now;
            while refill.len() < SPARES {
                match nics.pool.alloc() {
                    Some(b) => refill.push(b),
                    None => break,
                }
            }
            spares_tx.push_batch(&mut refill);
            // The firewall core prints its own counters when asked; a
            // firewall core that does not answer within a second is skipped.
            console.serve(now, &nics, || {
                counters.print(&idler);
                STATS_REQUEST.store(true, Ordering::Release);
                let deadline = now + 1000;
                while STATS_REQUEST.load(Ordering::Acquire) && clock::now_ms() < deadline {
                    core::hint::spin_loop();
                }
            });
        }
        nics.flush();
        counters.end_round(busy);
        idler.round(busy, || arm_all(&mut nics));
    }
}
