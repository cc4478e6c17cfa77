//! Handing packet handles from one core to another: our SPSC ring against
//! `crossbeam_queue::ArrayQueue`, two threads, 1,000,000 16-byte items per
//! iteration through a 1024-slot ring (`cargo bench -p drivers --bench
//! rings`). Criterion prints the time per million items.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use crossbeam_queue::ArrayQueue;
use drivers::spsc;

const ITEMS: u64 = 1_000_000;
const SLOTS: usize = 1024;
const BATCH: usize = 32;

/// The size of a `Packet` (buffer id + length) with a port number.
#[derive(Clone, Copy)]
struct Handle {
    id: u64,
    _len_port: u64,
}

fn ours(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring_1M_handles");
    g.throughput(Throughput::Elements(ITEMS));
    g.bench_function("spsc_batch32", |b| {
        b.iter(|| {
            let (mut p, mut cons) = spsc::ring::<Handle>(SLOTS);
            let t = std::thread::spawn(move || {
                let mut batch = Vec::with_capacity(BATCH);
                let mut next = 0;
                while next < ITEMS {
                    while batch.len() < BATCH && next < ITEMS {
                        batch.push(Handle {
                            id: next,
                            _len_port: 0,
                        });
                        next += 1;
                    }
                    while !batch.is_empty() {
                        if p.push_batch(&mut batch) == 0 {
                            std::hint::spin_loop();
                        }
                    }
                }
            });
            let mut got = 0;
            let mut out = Vec::with_capacity(BATCH);
            while got < ITEMS {
                out.clear();
                got += cons.pop_batch(&mut out, BATCH) as u64;
                black_box(&out);
            }
            t.join().unwrap();
        })
    });
    g.bench_function("crossbeam_array_queue", |b| {
        b.iter(|| {
            let q = Arc::new(ArrayQueue::<Handle>::new(SLOTS));
            let qp = q.clone();
            let t = std::thread::spawn(move || {
                for i in 0..ITEMS {
                    let mut h = Handle {
                        id: i,
                        _len_port: 0,
                    };
                    while let Err(back) = qp.push(h) {
                        h = back;
                        std::hint::spin_loop();
                    }
                }
            });
            let mut got = 0;
            while got < ITEMS {
                if let Some(h) = q.pop() {
                    black_box(h.id);
                    got += 1;
                }
            }
            t.join().unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, ours);
criterion_main!(benches);
