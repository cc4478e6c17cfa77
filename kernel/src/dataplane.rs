//! The forwarding loop on the boot CPU: poll every NIC, run each received
//! batch through the firewall, transmit each NIC's batch with one
//! notification. No interrupts, no locks, no allocation on this path.

use alloc::vec::Vec;

use drivers::{Nic, Packet, PacketPool};
use netstack::firewall::{DropReason, Firewall, Verdict};

use crate::{clock, console, exit};

/// Frames taken from one NIC per poll.
const RX_BATCH: usize = 64;
/// Packets waiting for one NIC's TX ring at most; beyond it they are
/// dropped and counted.
const TX_BACKLOG: usize = 1024;
/// How often queued ARP requests and flow expiry are looked at.
const HOUSEKEEPING_MS: u64 = 10;

pub struct Dataplane<N: Nic> {
    pub nics: Vec<N>,
    pub pool: PacketPool,
    pub firewall: Firewall,
    pub stats_interval_ms: u64,
    /// Packets dropped because a TX backlog was full, per NIC.
    pub tx_backlog_drops: Vec<u64>,
}

impl<N: Nic> Dataplane<N> {
    pub fn run(mut self) -> ! {
        let mut rx: Vec<Packet> = Vec::with_capacity(RX_BATCH);
        let mut tx: Vec<Vec<Packet>> = self
            .nics
            .iter()
            .map(|_| Vec::with_capacity(TX_BACKLOG))
            .collect();
        let mut last_housekeeping = 0;
        let mut last_stats = clock::now_ms();
        for nic in &mut self.nics {
            nic.maintain(&mut self.pool);
        }
        loop {
            let now = clock::now_ms();
            let mut busy = false;
            for i in 0..self.nics.len() {
                self.nics[i].rx_batch(&mut self.pool, &mut rx, RX_BATCH);
                busy |= !rx.is_empty();
                for p in rx.drain(..) {
                    let room = self.pool.frame_room(&p.buf);
                    match self.firewall.handle(now, i, room, p.len) {
                        Verdict::Forward { port, len }
                            if port < tx.len() && tx[port].len() < TX_BACKLOG =>
                        {
                            tx[port].push(Packet { buf: p.buf, len })
                        }
                        Verdict::Forward { port, .. } if port < tx.len() => {
                            self.tx_backlog_drops[port] += 1;
                            self.pool.free(p.buf);
                        }
                        _ => self.pool.free(p.buf),
                    }
                }
            }
            if now.wrapping_sub(last_housekeeping) >= HOUSEKEEPING_MS {
                last_housekeeping = now;
                self.firewall.expire(now, 256);
                if let Some(buf) = self.pool.alloc() {
                    match self.firewall.poll_emit(now, self.pool.frame_room(&buf)) {
                        Some((port, len)) if port < tx.len() => tx[port].push(Packet { buf, len }),
                        _ => self.pool.free(buf),
                    }
                }
                if self.stats_interval_ms > 0
                    && now.wrapping_sub(last_stats) >= self.stats_interval_ms
                {
                    last_stats = now;
                    self.print_stats();
                }
                match console::read_key() {
                    Some(b's') => self.print_stats(),
                    Some(b'q') => {
                        println!("portcullis: shutdown requested");
                        self.print_stats();
                        exit::success();
                    }
                    _ => {}
                }
            }
            for (i, batch) in tx.iter_mut().enumerate() {
                if !batch.is_empty() {
                    self.nics[i].tx_batch(&mut self.pool, batch);
                }
            }
            for nic in &mut self.nics {
                nic.maintain(&mut self.pool);
            }
            if !busy {
                core::hint::spin_loop();
            }
        }
    }

    /// Counters, one `stats:` line each, in a form tests can parse.
    pub fn print_stats(&self) {
        for (i, nic) in self.nics.iter().enumerate() {
            let s = nic.stats();
            let role = if i == 0 { "uplink" } else { "downlink" };
            println!(
                "stats: nic{i} {role} rx_packets={} rx_bytes={} tx_packets={} tx_bytes={} rx_errors={} tx_ring_full={} tx_backlog_drops={} ring_errors={} notifications={}",
                s.rx_packets,
                s.rx_bytes,
                s.tx_packets,
                s.tx_bytes,
                s.rx_errors,
                s.tx_ring_full,
                self.tx_backlog_drops.get(i).copied().unwrap_or(0),
                s.ring_errors,
                s.notifications
            );
        }
        let f = self.firewall.stats();
        println!(
            "stats: firewall to_upstream={} to_clients={} flows={} flows_created={} flows_evicted={} dns_redirected={} arp_replies={} echo_replies={} icmp_errors_sent={} icmp_errors_suppressed={} arp_requests_sent={}",
            f.to_upstream,
            f.to_clients,
            self.firewall.flows(),
            f.flows_created,
            self.firewall.conntrack_evictions(),
            f.dns_redirected,
            f.arp_replies,
            f.echo_replies,
            f.icmp_errors_sent,
            f.icmp_errors_suppressed,
            f.arp_requests_sent
        );
        print!("stats: drops");
        for r in DropReason::ALL {
            let n = f.drop_count(*r);
            if n > 0 {
                print!(" {}={n}", r.name());
            }
        }
        println!(" total={}", f.dropped());
        for (ip, hits) in self.firewall.rule_hits() {
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
        println!(
            "stats: pool free={} of {}",
            self.pool.available(),
            self.pool.capacity()
        );
    }
}
