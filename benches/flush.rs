//! One flush as the daemon writes it, into SQLite and PostgreSQL.
//!
//! The batch is what draining `scripts/bench-e2e.sh`'s topic leaves at a flush:
//! 200 000 generated CDRs (the generator's defaults: 2% late over 30 days, 1–3
//! numbers and up to six agents per account) over 10 000 accounts, run through the
//! hot path into [`Deltas`], expanded to rows as the flusher does. Every iteration
//! writes that batch again with the offsets moved on, so after the first one it
//! measures the steady state: every row already exists and is added to.
//!
//! PostgreSQL: `TALLYD_BENCH_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`), schema `tallyd_bench_flush`, dropped
//! and recreated at each run; skipped with a message if the server is not there.
//!
//! `cargo bench --bench flush` prints the time per flush and rows per second.

use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use tallyd::calendar::Day;
use tallyd::config::Config;
use tallyd::counters::Deltas;
use tallyd::flush::expand::pages;
use tallyd::generate::{Generator, GeneratorSettings};
use tallyd::pipeline::{ingest, NoDedup};
use tallyd::rating::Tariff;
use tallyd::store::{Conn, FlushBatch, OffsetAdvance, Store};

const ACCOUNTS: usize = 10_000;
const CDRS: usize = 200_000;

fn tariff() -> Tariff {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tallyd.toml");
    let text = std::fs::read_to_string(&path).expect("config/tallyd.toml");
    Config::from_toml(&text, &path, [])
        .expect("shipped config")
        .1
}

/// The deltas of [`CDRS`] generated CDRs, as the consumer holds them at a flush.
fn deltas(tariff: &Tariff) -> Deltas {
    let generator = Generator::new(GeneratorSettings {
        seed: 7,
        accounts: ACCOUNTS,
        duplicate_rate: 0.0,
        malformed_rate: 0.0,
        last_day: Day::parse("2025-06-30").expect("day"),
        ..GeneratorSettings::default()
    });
    let mut deltas = Deltas::default();
    for g in generator.take(CDRS) {
        ingest(&g.payload, tariff, &mut deltas, &mut NoDedup).expect("valid CDR");
    }
    deltas
}

fn flush_batch(tariff: &Tariff) -> FlushBatch {
    FlushBatch {
        as_of: "2025-06-30T12:00:00+00:00".into(),
        pages: pages(vec![deltas(tariff)], tariff),
        offsets: Vec::new(),
        dedup: Vec::new(),
        prune_dedup_before: None,
        wallet: Default::default(),
        triggers: Vec::new(),
        consumed_at_ms: 0,
        crossed_at_ms: Vec::new(),
        outbox_lease_until: None,
    }
}

/// Rows and breakdown rows of `batch`: the benchmark's elements.
fn rows(batch: &FlushBatch) -> u64 {
    batch.pages.iter().map(|p| p.delta.len() as u64).sum()
}

/// Writes `batch` once per iteration, each time advancing partition 0 by one.
fn bench_store(c: &mut Criterion, name: &str, url: &str, batch: &FlushBatch) {
    // As in the daemon, commits do not checkpoint a SQLite WAL (connections
    // are opened so); here a checkpoint runs between the timed writes.
    let mut store = Store::open(url).expect("store").connect().expect("connect");
    let mut next = 0i64;
    let mut write = |store: &mut Conn| {
        let mut b = batch.clone();
        b.offsets = vec![OffsetAdvance {
            topic: "cdrs".into(),
            partition: 0,
            from: (next > 0).then_some(next),
            to: next + 1,
        }];
        next += 1;
        let t = Instant::now();
        store.write_flush(&b).expect("flush");
        let took = t.elapsed();
        store.checkpoint().expect("checkpoint");
        took
    };
    // The first flush inserts every row; the benchmark measures the updates after.
    let first = write(&mut store);
    eprintln!("{name}: first flush (inserts) {first:?}");
    let mut g = c.benchmark_group("flush");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(20))
        .throughput(Throughput::Elements(rows(batch)));
    g.bench_function(name, |b| {
        b.iter_custom(|iters| (0..iters).map(|_| write(&mut store)).sum())
    });
    g.finish();
}

fn flush(c: &mut Criterion) {
    let tariff = tariff();
    let batch = flush_batch(&tariff);
    eprintln!(
        "one flush of {CDRS} CDRs over {ACCOUNTS} accounts: {} rows and breakdown rows on {} pages",
        rows(&batch),
        batch.pages.len()
    );
    // Turning the deltas into pages, off the hot path but before every write.
    let d = deltas(&tariff);
    let mut g = c.benchmark_group("flush");
    g.sample_size(20)
        .throughput(Throughput::Elements(rows(&batch)));
    g.bench_function("expand", |b| {
        b.iter_batched(
            || d.clone(),
            |d| pages(vec![d], &tariff),
            criterion::BatchSize::LargeInput,
        )
    });
    g.finish();

    let dir = tempfile::tempdir().expect("tempdir");
    let sqlite = format!("sqlite://{}/flush.db", dir.path().display());
    bench_store(c, "sqlite", &sqlite, &batch);

    let base = std::env::var("TALLYD_BENCH_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    match postgres::Client::connect(&base, postgres::NoTls) {
        Ok(mut admin) => {
            admin
                .batch_execute(
                    "DROP SCHEMA IF EXISTS tallyd_bench_flush CASCADE; CREATE SCHEMA tallyd_bench_flush",
                )
                .expect("schema");
            let sep = if base.contains('?') { '&' } else { '?' };
            let url = format!("{base}{sep}options=-csearch_path%3Dtallyd_bench_flush");
            bench_store(c, "postgres", &url, &batch);
        }
        Err(e) => eprintln!("PostgreSQL at {base} not reachable ({e}); its flush is not measured"),
    }
}

criterion_group!(benches, flush);
criterion_main!(benches);
