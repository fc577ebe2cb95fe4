//! Wallets on the hot path and holds, per operation (issue targets: a CDR's
//! debit adds under 20 ns to the hot path; a hold grant under 1 µs).
//!
//! - `hot-path/ingest-batch` vs `hot-path/ingest-batch+wallet`: the daemon's
//!   batch path over the same generated CDRs (10k accounts) without and with
//!   the partition's wallet [`Ledger`]; the difference per CDR is what the
//!   debit adds.
//! - `ledger/debit`: one CDR's debit alone (pre-decoded, pre-rated).
//! - `holds/grant+release` and `holds/grant+settle`: a hold granted on a
//!   shared registry, then released, or settled by its call's CDR.
//!
//! `cargo bench --bench wallet`.

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use tallyd::cdr::decode;
use tallyd::config::Config;
use tallyd::counters::Deltas;
use tallyd::generate::{Generator, GeneratorSettings};
use tallyd::pipeline::{ingest_batch, NoDedup};
use tallyd::rating::Tariff;
use tallyd::wallet::{Grant, Ledger, Wallets, CENT};

const MESSAGES: usize = 100_000;
const BATCH: usize = 128;

fn tariff() -> Tariff {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tallyd.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    Config::from_toml(&text, &path, []).unwrap().1
}

fn wallets() -> Arc<Wallets> {
    Arc::new(Wallets::new(Box::new(|_| 500 * CENT)))
}

fn messages() -> Vec<Vec<u8>> {
    Generator::new(GeneratorSettings {
        accounts: 10_000,
        duplicate_rate: 0.0,
        malformed_rate: 0.0,
        ..GeneratorSettings::default()
    })
    .take(MESSAGES)
    .map(|g| g.payload)
    .collect()
}

fn hot_path(c: &mut Criterion) {
    let tariff = tariff();
    let msgs = messages();
    let refs: Vec<&[u8]> = msgs.iter().map(Vec::as_slice).collect();
    let mut g = c.benchmark_group("hot-path");
    g.throughput(Throughput::Elements(BATCH as u64));
    let mut deltas = Deltas::default();
    let mut i = 0;
    g.bench_function("ingest-batch", |b| {
        b.iter(|| {
            let start = i;
            i = (i + BATCH) % (refs.len() - BATCH);
            let mut n = 0;
            ingest_batch(
                &refs[start..start + BATCH],
                &tariff,
                &mut deltas,
                &mut NoDedup,
                &mut (),
                |_, r| n += r.is_ok() as usize,
            );
            black_box(n)
        })
    });
    let mut deltas = Deltas::default();
    let mut ledger = Ledger::new(wallets());
    let mut i = 0;
    g.bench_function("ingest-batch+wallet", |b| {
        b.iter(|| {
            let start = i;
            i = (i + BATCH) % (refs.len() - BATCH);
            let mut n = 0;
            ingest_batch(
                &refs[start..start + BATCH],
                &tariff,
                &mut deltas,
                &mut NoDedup,
                &mut ledger,
                |_, r| n += r.is_ok() as usize,
            );
            black_box(n)
        })
    });
    g.finish();

    let mut g = c.benchmark_group("ledger");
    g.throughput(Throughput::Elements(1));
    let rated: Vec<_> = msgs
        .iter()
        .map(|m| {
            let cdr = decode(m).unwrap();
            let charge = tariff.rate(&cdr, cdr.leaf());
            (cdr, charge)
        })
        .collect();
    let mut ledger = Ledger::new(wallets());
    let mut i = 0;
    g.bench_function("debit", |b| {
        b.iter(|| {
            i = (i + 1) % rated.len();
            let (cdr, charge) = &rated[i];
            ledger.debit(black_box(cdr), *charge);
        })
    });
    g.finish();
}

fn holds(c: &mut Criterion) {
    let tariff = tariff();
    let mut g = c.benchmark_group("holds");
    g.throughput(Throughput::Elements(1));
    let w = wallets();
    let account = tallyd::cdr::AccountSid(42);
    // Enough money for every hold the bench grants and settles.
    w.wallet(account).credit(i64::MAX / 4);
    let ids: Vec<String> = (0..MESSAGES).map(|i| format!("CA{i:030}")).collect();
    let mut i = 0;
    g.bench_function("grant+release", |b| {
        b.iter(|| {
            i = (i + 1) % ids.len();
            match w.grant(account, &ids[i], 300 * CENT, 100, 0, 3660) {
                Grant::Granted(h) => w.revoke(&h),
                other => panic!("{other:?}"),
            }
        })
    });
    // Settled by the call's CDR through the ledger, as the consumer does.
    let sid = account.to_string();
    let cdrs: Vec<Vec<u8>> = ids
        .iter()
        .map(|id| {
            format!(
                r#"{{"id":"{id}","account_sid":"{sid}","kind":"call","timestamp":"2026-11-29T10:00:00Z","direction":"outbound","status":"completed","duration":65,"billsec":60}}"#
            )
            .into_bytes()
        })
        .collect();
    let rated: Vec<_> = cdrs
        .iter()
        .map(|m| {
            let cdr = decode(m).unwrap();
            let charge = tariff.rate(&cdr, cdr.leaf());
            (cdr, charge)
        })
        .collect();
    let mut ledger = Ledger::new(w.clone());
    let mut i = 0;
    g.bench_function("grant+settle", |b| {
        b.iter(|| {
            i = (i + 1) % ids.len();
            let Grant::Granted(h) = w.grant(account, &ids[i], 300 * CENT, 100, 0, 3660) else {
                panic!("not granted")
            };
            let (cdr, charge) = &rated[i];
            ledger.debit(cdr, *charge);
            // Forget it, as the expiry sweep does with finished holds, so the
            // call id can be granted again next lap.
            w.revoke(&h);
            if i % 1024 == 0 {
                ledger.take();
                ledger.flushed();
            }
        })
    });
    g.finish();
}

criterion_group!(benches, hot_path, holds);
criterion_main!(benches);
