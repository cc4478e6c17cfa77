//! The `rtc` (run-to-completion) layout: every core owns one receive /
//! transmit queue pair of every NIC, a share of the packet buffers and a
//! firewall of its own, and runs the whole path — receive, firewall,
//! transmit — for the flows it owns.
//!
//! Which core owns a flow is `netstack::steer`'s decision (a hash of the
//! flow's remote address), so both directions of a flow, and every
//! fragment, meet the same connection table. The device spreads flows over
//! its receive queues by its own hash; a frame that lands on a core that
//! does not own it is handed to its owner over a single-producer,
//! single-consumer ring (one per ordered pair of cores), in the order it
//! was received. The owner transmits it on its own queue, which is also
//! what makes the host's tap steer the flow's next frames to that queue.
//! Neighbour answers from the uplink (ARP replies, neighbour
//! advertisements) are copied to every core, since each keeps its own
//! neighbour cache.
//!
//! Buffers go back to the core whose pool owns them: a buffer another core
//! transmitted or dropped is returned over a second ring per pair of
//! cores, sized for every buffer there is, so a buffer is never lost.
//!
//! `stats` on the boot core asks every other core for a copy of its
//! counters (over a third ring) and prints one set of lines, added up over
//! the cores, plus one line per core. Those are snapshots taken one core
//! after another, so a frame in a hand-off ring can be counted handed off
//! and not yet taken over; on `quit`, every core first stops receiving and
//! takes what its rings hold, so the final report's hand-offs and takes
//! are equal.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, Ordering};

use drivers::spsc::{self, Consumer, Producer};
use drivers::virtio_net::VirtioQueue;
use drivers::{BufId, Nic, NicStats, Packet, PacketPool};
use kernel::cmdline::Idle;
use netstack::config::NetConfig;
use netstack::firewall::{Firewall, Summary, Verdict, CONNTRACK_CAPACITY};
use netstack::steer::{Steer, Steering};
use netstack::wire::Mac;

use crate::dataplane::{
    print_nic_stats, print_summary, Console, CoreStats, Nics, Request, HOUSEKEEPING_MS, RX_BATCH,
};
use crate::idle::Idler;
use crate::smp::MAX_CPUS;
use crate::{clock, exit};

/// Slots of each hand-off ring.
const RING_SLOTS: usize = 1024;
/// Buffers taken back from other cores per ring and round, at most.
const RETURN_BATCH: usize = 4 * RX_BATCH;

/// Set by the boot core to ask core `k` for its counters; cleared by
/// core `k` once it has sent them.
static STATS_REQUEST: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];

/// Set by the boot core when it is asked to quit: every core stops
/// receiving, so that the frames handed between cores come to rest and
/// the final counters add up (`quiesce`).
static QUIESCE: AtomicBool = AtomicBool::new(false);
/// Set by core `k` once it receives no more (so hands nothing more over).
static QUIET: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];
/// How long the boot core waits for the other cores to stop receiving.
const QUIESCE_MS: u64 = 1000;

/// What one core reports for `stats`.
struct Report {
    /// Per NIC: its queue's counters, TX backlog drops, frames per queue.
    nics: Vec<(NicStats, u64, Vec<u64>)>,
    summary: Summary,
    core_line: String,
    free: usize,
    share: usize,
    ring_full_drops: u64,
}

/// One core of the layout.
struct RtcCore {
    /// Position in the layout (0: the boot core) and the CPU's MADT
    /// position.
    index: usize,
    cpu: usize,
    nics: Nics<VirtioQueue>,
    firewall: Firewall,
    steering: Steering,
    /// Hand-off rings to and from each other core (`None` for itself).
    to: Vec<Option<Producer<(usize, Packet)>>>,
    from: Vec<Option<Consumer<(usize, Packet)>>>,
    /// Buffer-return rings to and from each other core.
    give_back: Vec<Option<Producer<BufId>>>,
    take_back: Vec<Option<Consumer<BufId>>>,
    /// Frames handed to other cores, and taken over from them.
    handed_off: u64,
    taken_over: u64,
    /// Copies made of frames for every core (`Steer::All`).
    copies: u64,
    /// The firewall's verdicts on this core: forward, drop, consumed.
    verdicts: [u64; 3],
}

impl RtcCore {
    /// The firewall on frames this core owns, received on `port`: one
    /// `Firewall::batch` for them all.
    fn process(&mut self, now: u64, port: usize, frames: impl Iterator<Item = Packet>) {
        let mut batch = self.firewall.batch(now, port);
        for mut p in frames {
            let room = self.nics.pool.frame_room(&mut p.buf);
            match batch.handle(room, p.len) {
                Verdict::Forward { port, len } => {
                    self.verdicts[0] += 1;
                    self.nics.queue(port, Packet { buf: p.buf, len })
                }
                v => {
                    self.verdicts[if matches!(v, Verdict::Drop(_)) { 1 } else { 2 }] += 1;
                    self.nics.pool.free(p.buf)
                }
            }
        }
    }

    /// Takes over and processes the frames other cores received for flows
    /// this core owns: whether there were any.
    fn take_handed(&mut self, now: u64, handed: &mut Vec<(usize, Packet)>) -> bool {
        let mut busy = false;
        for j in 0..self.from.len() {
            if let Some(ring) = self.from[j].as_mut() {
                ring.pop_batch(handed, RX_BATCH);
            }
            busy |= !handed.is_empty();
            self.taken_over += handed.len() as u64;
            // Runs of frames from one port go through one batch.
            let mut frames = handed.drain(..).peekable();
            while let Some(&(port, _)) = frames.peek() {
                let run = core::iter::from_fn(|| frames.next_if(|(q, _)| *q == port));
                self.process(now, port, run.map(|(_, p)| p));
            }
        }
        busy
    }

    /// The boot core, asked to quit: has every other core stop receiving
    /// (they hand nothing over after that), then takes what is left in
    /// its own hand-off rings. The other cores take theirs before they
    /// report (`run`), so the final report's hand-offs and takes match.
    fn quiesce(&mut self, now: u64, handed: &mut Vec<(usize, Packet)>) {
        QUIESCE.store(true, Ordering::Release);
        let cores = self.steering.cores();
        let deadline = clock::now_ms() + QUIESCE_MS;
        for (k, quiet) in QUIET.iter().enumerate().take(cores).skip(1) {
            while !quiet.load(Ordering::Acquire) && clock::now_ms() < deadline {
                core::hint::spin_loop();
            }
            if !quiet.load(Ordering::Acquire) {
                println!(
                    "stats: core index {k} did not stop receiving; its counters may be in motion"
                );
            }
        }
        while self.take_handed(now, handed) {}
        self.nics.flush();
    }

    /// A copy of `p` in a buffer of this core's pool (`None` when the pool
    /// is empty).
    fn copy(&mut self, p: &mut Packet) -> Option<Packet> {
        let mut buf = self.nics.pool.alloc()?;
        let memory = self.nics.pool.memory();
        // A frame (at most `MAX_FRAME`) always fits a slot's frame room.
        let from = memory.frame(p);
        let len = from.len();
        memory.frame_room(&mut buf)[..len].copy_from_slice(from);
        Some(Packet { buf, len })
    }

    fn report(&self, counters: &CoreStats, idler: &Idler) -> Report {
        Report {
            nics: self
                .nics
                .nics
                .iter()
                .enumerate()
                .map(|(i, n)| (n.stats(), self.nics.tx_backlog_drops[i], n.rx_queues()))
                .collect(),
            summary: self.firewall.summary(),
            core_line: alloc::format!(
                "{} forward={} drop={} consumed={} flows={} handed_off={} taken_over={} copies={} ring_full_drops={}",
                counters.line(idler),
                self.verdicts[0],
                self.verdicts[1],
                self.verdicts[2],
                self.firewall.flows(),
                self.handed_off,
                self.taken_over,
                self.copies,
                self.nics.ring_full_drops
            ),
            free: self.nics.pool.available(),
            share: self.nics.pool.owned_slots(),
            ring_full_drops: self.nics.ring_full_drops,
        }
    }

    /// The core's loop. The boot core also serves the console, with the
    /// other cores' report rings.
    fn run(
        mut self,
        idle: Idle,
        mut console: Option<(Console, Vec<Consumer<Box<Report>>>)>,
        mut report_to: Option<Producer<Box<Report>>>,
    ) -> ! {
        let idle = if self.index == 0 {
            idle
        } else {
            // This core's own APIC timer, for `idle=halt`.
            crate::idle::start(idle).0
        };
        let mut idler = Idler::new(idle);
        let mut counters = CoreStats::new(self.cpu, "rtc");
        let cores = self.steering.cores();
        let total = self.nics.pool.capacity();
        let mut rx: Vec<Packet> = Vec::with_capacity(RX_BATCH);
        let mut handed: Vec<(usize, Packet)> = Vec::with_capacity(RX_BATCH);
        // This core's own frames of a receive batch, after steering.
        let mut mine: Vec<Packet> = Vec::with_capacity(RX_BATCH);
        // Room for everything one round can receive: no allocation later.
        let per_round = self.nics.nics.len() * RX_BATCH;
        let mut outgoing: Vec<Vec<(usize, Packet)>> =
            (0..cores).map(|_| Vec::with_capacity(per_round)).collect();
        let mut returned: Vec<BufId> = Vec::with_capacity(RETURN_BATCH);
        let mut foreign: Vec<BufId> = Vec::with_capacity(total);
        let mut by_owner: Vec<Vec<BufId>> = (0..cores).map(|_| Vec::with_capacity(total)).collect();
        let mut last_housekeeping = 0;
        self.nics.flush();
        loop {
            let (start, now) = clock::now();
            counters.begin_round(start);
            let mut busy = false;
            // Buffers of this core's pool that other cores are done with.
            for ring in self.take_back.iter_mut().flatten() {
                ring.pop_batch(&mut returned, RETURN_BATCH);
                for b in returned.drain(..) {
                    self.nics.pool.free(b);
                }
            }
            // Frames other cores received for flows this core owns.
            busy |= self.take_handed(now, &mut handed);
            // This core's own receive queues, until the boot core quits
            // (the last round's hand-offs were pushed before `QUIET`).
            let receiving = self.index == 0 || !QUIESCE.load(Ordering::Acquire);
            if !receiving && !QUIET[self.index].load(Ordering::Relaxed) {
                QUIET[self.index].store(true, Ordering::Release);
            }
            for i in 0..self.nics.nics.len() {
                if !receiving {
                    break;
                }
                self.nics.nics[i].rx_batch(&mut self.nics.pool, &mut rx, RX_BATCH);
                busy |= !rx.is_empty();
                counters.batch(rx.len());
                for mut p in rx.drain(..) {
                    let frame = self.nics.pool.frame(&mut p);
                    match self.steering.steer(i, frame) {
                        Steer::Core(j) if j != self.index => outgoing[j].push((i, p)),
                        Steer::All => {
                            for (j, out) in outgoing.iter_mut().enumerate() {
                                if j == self.index {
                                    continue;
                                }
                                match self.copy(&mut p) {
                                    Some(c) => {
                                        self.copies += 1;
                                        out.push((i, c))
                                    }
                                    // No buffer for that core's copy:
                                    // counted with the frames no ring took.
                                    None => self.nics.ring_full_drops += 1,
                                }
                            }
                            mine.push(p);
                        }
                        _ => mine.push(p),
                    }
                }
                self.process(now, i, mine.drain(..));
            }
            for (j, out) in outgoing.iter_mut().enumerate() {
                if out.is_empty() {
                    continue;
                }
                if let Some(ring) = self.to[j].as_mut() {
                    self.handed_off += ring.push_batch(out) as u64;
                }
                for (_, p) in out.drain(..) {
                    self.nics.ring_full_drops += 1;
                    self.nics.pool.free(p.buf);
                }
            }
            if now.wrapping_sub(last_housekeeping) >= HOUSEKEEPING_MS {
                last_housekeeping = now;
                self.firewall.expire(now, 256);
                if let Some(mut buf) = self.nics.pool.alloc() {
                    match self
                        .firewall
                        .poll_emit(now, self.nics.pool.frame_room(&mut buf))
                    {
                        Some((port, len)) => self.nics.queue(port, Packet { buf, len }),
                        None => self.nics.pool.free(buf),
                    }
                }
                if let Some(ring) = report_to.as_mut() {
                    if STATS_REQUEST[self.index].load(Ordering::Acquire) {
                        // Once the others are quiet, what they handed
                        // over is all in the rings now: take it first.
                        if QUIET[self.index].load(Ordering::Relaxed) {
                            while self.take_handed(now, &mut handed) {}
                            self.nics.flush();
                        }
                        let r = Box::new(self.report(&counters, &idler));
                        // The boot core takes every report it asks for
                        // before asking again: the ring has room.
                        let _ = ring.push(r);
                        STATS_REQUEST[self.index].store(false, Ordering::Release);
                    }
                }
                if let Some((console, reports)) = console.as_mut() {
                    let request = console.poll(now);
                    if !matches!(request, Request::None) {
                        if let Request::Quit = request {
                            self.quiesce(now, &mut handed);
                        }
                        let mine = self.report(&counters, &idler);
                        print_reports(mine, reports, now);
                        if let Request::Quit = request {
                            println!("portcullis: shutdown requested");
                            exit::success();
                        }
                    }
                }
            }
            self.nics.flush();
            // Other cores' buffers this core transmitted or dropped: back
            // to their owners (the rings hold every buffer there is, so
            // what does not fit now only waits a round).
            self.nics.pool.take_foreign(&mut foreign);
            for b in foreign.drain(..) {
                let owner = self.nics.pool.owner(&b);
                by_owner[owner].push(b);
            }
            for (j, bufs) in by_owner.iter_mut().enumerate() {
                if let Some(ring) = self.give_back[j].as_mut() {
                    ring.push_batch(bufs);
                }
            }
            counters.end_round(busy);
            idler.round(busy, || false);
        }
    }
}

/// Asks every other core for its report, waits for each at most a second,
/// and prints the counters added up over the cores, then each core's line.
fn print_reports(mine: Report, rings: &mut [Consumer<Box<Report>>], now: u64) {
    for request in STATS_REQUEST.iter().skip(1).take(rings.len()) {
        request.store(true, Ordering::Release);
    }
    let mut reports = alloc::vec![mine];
    let mut got: Vec<Box<Report>> = Vec::with_capacity(1);
    for (k, ring) in rings.iter_mut().enumerate() {
        let deadline = now + 1000;
        while got.is_empty() && clock::now_ms() < deadline {
            ring.pop_batch(&mut got, 1);
            core::hint::spin_loop();
        }
        match got.pop() {
            Some(r) => reports.push(*r),
            None => println!("stats: core index {} did not report", k + 1),
        }
    }
    for i in 0..reports[0].nics.len() {
        let mut sum = NicStats::default();
        let mut backlog = 0;
        let mut queues = Vec::new();
        for r in &reports {
            if let Some((s, b, q)) = r.nics.get(i) {
                sum += *s;
                backlog += b;
                queues.extend_from_slice(q);
            }
        }
        print_nic_stats(i, sum, backlog, &queues);
    }
    let mut total = reports[0].summary.clone();
    for r in &reports[1..] {
        total.add(&r.summary);
    }
    print_summary(&total);
    for r in &reports {
        println!("{}", r.core_line);
    }
    let free: usize = reports.iter().map(|r| r.free).sum();
    let share: usize = reports.iter().map(|r| r.share).sum();
    let drops: u64 = reports.iter().map(|r| r.ring_full_drops).sum();
    println!("stats: pool free={free} of {share} core_ring_full_drops={drops}");
}

/// Starts the layout: `queues[nic][pair]`, every NIC with one pair per core
/// (`cpus[k]` is core `k`'s MADT position; `cpus[0]` the boot CPU, this
/// one). Does not return.
#[allow(clippy::too_many_arguments)]
pub fn run_rtc(
    queues: Vec<Vec<VirtioQueue>>,
    pool: PacketPool,
    net: NetConfig,
    macs: Vec<Mac>,
    forward_only: bool,
    stats_interval_ms: u64,
    cpus: &[usize],
    idle: (Idle, Idle),
) -> ! {
    let cores = cpus.len();
    let steering = Steering::new(&net, cores);
    let buffers = pool.capacity();
    let back_slots = buffers.next_power_of_two().max(2);
    let pools = pool.split(cores);
    type Rings<T> = Vec<Vec<Option<T>>>;
    let mut to: Rings<Producer<(usize, Packet)>> = (0..cores)
        .map(|_| (0..cores).map(|_| None).collect())
        .collect();
    let mut from: Rings<Consumer<(usize, Packet)>> = (0..cores)
        .map(|_| (0..cores).map(|_| None).collect())
        .collect();
    let mut give_back: Rings<Producer<BufId>> = (0..cores)
        .map(|_| (0..cores).map(|_| None).collect())
        .collect();
    let mut take_back: Rings<Consumer<BufId>> = (0..cores)
        .map(|_| (0..cores).map(|_| None).collect())
        .collect();
    for i in 0..cores {
        for j in (0..cores).filter(|&j| j != i) {
            let (p, c) = spsc::ring(RING_SLOTS);
            to[i][j] = Some(p);
            from[j][i] = Some(c);
            let (p, c) = spsc::ring(back_slots);
            give_back[i][j] = Some(p);
            take_back[j][i] = Some(c);
        }
    }
    let mut per_core: Vec<Vec<VirtioQueue>> = (0..cores).map(|_| Vec::new()).collect();
    for nic in queues {
        for (k, q) in nic.into_iter().enumerate() {
            if let Some(c) = per_core.get_mut(k) {
                c.push(q);
            }
        }
    }
    let mut report_rings = Vec::new();
    let mut boot_core = None;
    let links = to
        .into_iter()
        .zip(from)
        .zip(give_back.into_iter().zip(take_back));
    for (k, ((nics, pool), ((to, from), (give_back, take_back)))) in
        per_core.into_iter().zip(pools).zip(links).enumerate()
    {
        let mut firewall =
            Firewall::with_capacity(net.clone(), macs.clone(), CONNTRACK_CAPACITY / cores);
        firewall.set_forward_only(forward_only);
        firewall.set_resolver_port(netstack::steer::resolver_port(k));
        let core = RtcCore {
            index: k,
            cpu: cpus[k],
            nics: Nics::new(nics, pool),
            firewall,
            steering: steering.clone(),
            to,
            from,
            give_back,
            take_back,
            handed_off: 0,
            taken_over: 0,
            copies: 0,
            verdicts: [0; 3],
        };
        if k == 0 {
            boot_core = Some(core);
            continue;
        }
        let (report_to, reports) = spsc::ring::<Box<Report>>(2);
        report_rings.push(reports);
        let ap_idle = idle.1;
        let task = Box::new(move || core.run(ap_idle, None, Some(report_to)));
        if !crate::smp::run_on(cpus[k], task) {
            println!(
                "dataplane: cpu {} did not take its rtc core; stopping",
                cpus[k]
            );
            exit::failure();
        }
    }
    crate::smp::park_idle();
    let Some(core) = boot_core else {
        println!("dataplane: rtc without cores; stopping");
        exit::failure();
    };
    let console = Console::new(stats_interval_ms);
    core.run(idle.0, Some((console, report_rings)), None)
}
