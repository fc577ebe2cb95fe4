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
//! `flush/<store>-triggers` writes the same batch for accounts with three usage
//! triggers each (a monthly calls count trigger at 1, which every account with
//! calls in a month of the batch crosses, and two that never fire), their
//! firings and callbacks removed between the timed writes: each timed flush
//! evaluates 30 000 triggers and fires thousands, as a drain's flushes do.
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
use tallyd::triggers::{CallbackMethod, Recurring, Trigger, TriggerBy};

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

/// Three triggers for each account of `batch` (see the module documentation).
fn triggers(batch: &FlushBatch) -> Vec<std::sync::Arc<Trigger>> {
    let mut accounts: Vec<String> = batch.pages.iter().map(|p| p.account.to_string()).collect();
    accounts.sort();
    accounts.dedup();
    let kinds = [
        ("calls", TriggerBy::Count, 1, Recurring::Monthly),
        ("sms", TriggerBy::Count, 1_000_000_000, Recurring::Daily),
        (
            "totalprice",
            TriggerBy::Price,
            1_000_000_000,
            Recurring::Monthly,
        ),
    ];
    let mut n = 0u128;
    let mut out = Vec::new();
    for account in accounts {
        for (category, by, value, recurring) in kinds {
            n += 1;
            out.push(std::sync::Arc::new(Trigger {
                sid: format!("UT{n:032x}"),
                account_sid: account.clone(),
                friendly_name: String::new(),
                usage_category: category.into(),
                trigger_by: by,
                trigger_value: value.into(),
                recurring,
                callback_url: format!("https://example.com/usage/{account}"),
                callback_method: CallbackMethod::Post,
                date_created: "2025-01-01T00:00:00Z".into(),
                date_updated: "2025-01-01T00:00:00Z".into(),
                date_fired: None,
                fired_period: None,
                fired_value: None,
            }));
        }
    }
    out
}

/// Rows and breakdown rows of `batch`: the benchmark's elements.
fn rows(batch: &FlushBatch) -> u64 {
    batch.pages.iter().map(|p| p.delta.len() as u64).sum()
}

/// Writes `batch` once per iteration, each time advancing partition 0 by one;
/// with triggers in the batch, they are stored first and their firings and
/// callbacks removed between the timed writes.
fn bench_store(c: &mut Criterion, name: &str, url: &str, batch: &FlushBatch) {
    // As in the daemon, commits do not checkpoint a SQLite WAL (connections
    // are opened so); here a checkpoint runs between the timed writes.
    let mut store = Store::open(url).expect("store").connect().expect("connect");
    for t in &batch.triggers {
        store.insert_trigger(t).expect("trigger");
    }
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
        let (_, report) = store.write_flush_firing(&b).expect("flush");
        let took = t.elapsed();
        if !batch.triggers.is_empty() {
            store
                .batch("DELETE FROM usage_trigger_firings; DELETE FROM webhook_outbox")
                .expect("reset");
        }
        store.checkpoint().expect("checkpoint");
        (took, report.fired.len())
    };
    // The first flush inserts every row; the benchmark measures the updates after.
    let (first, fired) = write(&mut store);
    eprintln!("{name}: first flush (inserts) {first:?}, {fired} triggers fired");
    let mut g = c.benchmark_group("flush");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(20))
        .throughput(Throughput::Elements(rows(batch)));
    g.bench_function(name, |b| {
        b.iter_custom(|iters| (0..iters).map(|_| write(&mut store).0).sum())
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

    let with_triggers = FlushBatch {
        triggers: triggers(&batch),
        ..batch.clone()
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let sqlite = format!("sqlite://{}/flush.db", dir.path().display());
    bench_store(c, "sqlite", &sqlite, &batch);
    let sqlite = format!("sqlite://{}/flush-triggers.db", dir.path().display());
    bench_store(c, "sqlite-triggers", &sqlite, &with_triggers);

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
            admin
                .batch_execute(
                    "DROP SCHEMA tallyd_bench_flush CASCADE; CREATE SCHEMA tallyd_bench_flush",
                )
                .expect("schema");
            bench_store(c, "postgres-triggers", &url, &with_triggers);
        }
        Err(e) => eprintln!("PostgreSQL at {base} not reachable ({e}); its flush is not measured"),
    }
}

criterion_group!(benches, flush);
criterion_main!(benches);
