//! What the latency summaries cost the threads that record into them, and a
//! scrape: `cargo bench --bench metrics`.
//!
//! - `local_record`: one observation into a hot thread's `LocalSummary` (a
//!   push), with a publish (one lock, the batch recorded into the histogram)
//!   every 1 000 — the consumer thread's pattern, per CDR.
//! - `record`: one observation straight into the summary (lock, record): a
//!   request or callback.
//! - `record_consumed`: a 2 s flush's worth of consumed batches (200 entries
//!   of 10 ms) recorded at the flush.
//! - `render`: the four summaries rendered for a scrape (merge of 5 slices,
//!   4 quantiles each), every one with a day's spread of values.
//!
//! Measured on the shared 2-vCPU dev VM (criterion medians, 2026-11-29):
//! `local_record` 10.8 ns per observation (publish included), `record` 102 ns,
//! `record_consumed` 2.5 µs per flush, `render` 63 µs per scrape.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tallyd::metrics::{ConsumedAt, Summary, SUMMARIES};

static BENCH: Summary = Summary::new(
    "tallyd_bench_seconds",
    "bench",
    Duration::from_secs(45 * 24 * 3600),
);

fn summaries(c: &mut Criterion) {
    let mut g = c.benchmark_group("summary");
    g.throughput(Throughput::Elements(1));
    let mut local = BENCH.local();
    let mut i = 0u64;
    g.bench_function("local_record", |b| {
        b.iter(|| {
            i += 1;
            local.record(Duration::from_micros(1 + i % 5_000_000));
            if i % 1000 == 0 {
                local.publish();
            }
        })
    });
    drop(local);
    g.bench_function("record", |b| {
        b.iter(|| {
            i += 1;
            BENCH.record(Duration::from_micros(1 + i % 5_000_000))
        })
    });
    g.finish();

    let mut g = c.benchmark_group("flush");
    let mut consumed = ConsumedAt::default();
    let start = Instant::now();
    for k in 0..200u32 {
        consumed.push(start + Duration::from_millis(10) * k, 500);
    }
    let flushed = start + Duration::from_secs(2);
    g.bench_function("record_consumed", |b| {
        b.iter(|| BENCH.record_consumed(&consumed, flushed))
    });
    g.finish();

    // A scrape: every summary holding values from 1 µs to a day.
    for s in SUMMARIES {
        let mut local = s.local();
        for k in 0..100_000u64 {
            local.record(Duration::from_micros(1 + k * k % 86_400_000_000));
        }
    }
    let exposition = tallyd::metrics::install();
    c.bench_function("render", |b| b.iter(|| exposition.render().len()));
}

criterion_group!(benches, summaries);
criterion_main!(benches);
