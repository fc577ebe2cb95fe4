//! The in-process hot path, piece by piece and whole, on realistic CDRs.
//!
//! Messages are ~300-byte JSON objects (calls, SMS and MMS mixed, `phone_number` and
//! `agent_id` present, a few fields tallyd does not read), pre-generated so only the
//! work under test is timed. Account pools of 10k and 1M set how cache-friendly the
//! counters are. Every group reports `Throughput::Elements` = CDRs, so criterion
//! prints CDR/s next to the time per CDR.
//!
//! The `design` groups justify the counters' shape (see `src/counters.rs`):
//! account×day cells of leaf tallies on the hot path + expand to rows at flush vs
//! every ancestor × 4 periods on the hot path, and mutex shards vs `dashmap`.
//!
//! `cargo bench --bench pipeline` runs it all; add a filter (`-- ingest`) for one group.

use std::hint::black_box;
use std::path::Path;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use crossbeam_utils::CachePadded;
use dashmap::DashMap;
use hashbrown::HashMap;
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rustc_hash::FxBuildHasher;

use tallyd::calendar::Period;
use tallyd::cdr::{decode, AccountSid, Cdr};
use tallyd::config::Config;
use tallyd::counters::{AccountDay, Deltas, LeafDay, Leaves, RecordKey, Tally};
use tallyd::pipeline::{ingest, ingest_batch, NoDedup};
use tallyd::rating::Tariff;

/// Distinct messages per account pool; cycled through by the benches.
const MESSAGES: usize = 200_000;
/// CDRs per simulated flush in the design benches.
const FLUSH_BATCH: usize = 100_000;
/// Messages per batch in `ingest-batch`: what the daemon's consumer polls at most.
const BATCH: usize = 128;
/// Shards the daemon would use; a power of two above the core count.
const SHARDS: usize = 16;

fn tariff() -> Tariff {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tallyd.toml");
    let text = std::fs::read_to_string(&path).expect("config/tallyd.toml");
    Config::from_toml(&text, &path, [])
        .expect("shipped config")
        .1
}

/// A realistic CDR as a switch would send it: ~300 bytes, fields in the switch's
/// order, a few that tallyd ignores.
fn message(rng: &mut SmallRng, accounts: u64, seq: usize) -> Vec<u8> {
    // Account SIDs spread over the 128-bit space like real ones (random hex).
    let a = rng.gen_range(0..accounts);
    let sid = format!(
        "AC{:032x}",
        (a as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)
    );
    let number = format!("+1415555{:04}", a % 10_000);
    let agent = format!("agt_{:08x}", (a * 7) % 50_000);
    let day = 9 + rng.gen_range(0..2);
    let ts = format!(
        "2025-01-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rng.gen_range(0..24),
        rng.gen_range(0..60),
        rng.gen_range(0..60),
        rng.gen_range(0..1000)
    );
    let dir = if rng.gen_bool(0.5) {
        "inbound"
    } else {
        "outbound"
    };
    let s = match rng.gen_range(0..10) {
        0..=5 => {
            let number_type =
                ["local", "local", "mobile", "tollfree", "sip", "client"][rng.gen_range(0..6)];
            let duration: u32 = rng.gen_range(0..1800);
            let answered = rng.gen_bool(0.8);
            let billsec = if answered {
                duration.saturating_sub(rng.gen_range(0..20))
            } else {
                0
            };
            let status = if answered {
                "completed"
            } else {
                ["no-answer", "busy", "failed", "canceled"][rng.gen_range(0..4)]
            };
            let mode = ["webhook", "hosted"][rng.gen_range(0..2)];
            format!(
                r#"{{"id":"CA{seq:032x}","account_sid":"{sid}","kind":"call","timestamp":"{ts}","direction":"{dir}","number_type":"{number_type}","status":"{status}","duration":{duration},"billsec":{billsec},"mode":"{mode}","phone_number":"{number}","agent_id":"{agent}","from":"+12125550123","sip_code":200}}"#
            )
        }
        k => {
            let kind = if k == 9 { "mms" } else { "sms" };
            let number_type =
                ["longcode", "longcode", "shortcode", "tollfree"][rng.gen_range(0..4)];
            let segments = rng.gen_range(1..4);
            format!(
                r#"{{"id":"SM{seq:032x}","account_sid":"{sid}","kind":"{kind}","timestamp":"{ts}","direction":"{dir}","number_type":"{number_type}","segments":{segments},"status":"delivered","phone_number":"{number}","agent_id":"{agent}","from":"+12125550123","carrier":"att"}}"#
            )
        }
    };
    s.into_bytes()
}

fn messages(accounts: u64) -> Vec<Vec<u8>> {
    let mut rng = SmallRng::seed_from_u64(accounts);
    (0..MESSAGES)
        .map(|i| message(&mut rng, accounts, i))
        .collect()
}

const POOLS: [(&str, u64); 2] = [("10k", 10_000), ("1M", 1_000_000)];

fn bench_stages(c: &mut Criterion) {
    let tariff = tariff();
    for (pool, accounts) in POOLS {
        let msgs = messages(accounts);
        let avg = msgs.iter().map(Vec::len).sum::<usize>() / msgs.len();
        eprintln!(
            "{pool} accounts: {} messages, {avg} bytes on average",
            msgs.len()
        );
        let cdrs: Vec<Cdr<'_>> = msgs.iter().map(|m| decode(m).unwrap()).collect();

        let mut g = c.benchmark_group(format!("stages/{pool}"));
        g.throughput(Throughput::Elements(1));

        let mut i = 0;
        g.bench_function("decode", |b| {
            b.iter(|| {
                i = (i + 1) % msgs.len();
                black_box(decode(black_box(&msgs[i])).is_ok())
            })
        });

        let mut i = 0;
        g.bench_function("rate", |b| {
            b.iter(|| {
                i = (i + 1) % cdrs.len();
                let cdr = black_box(&cdrs[i]);
                black_box(tariff.rate(cdr, cdr.leaf()))
            })
        });

        let rated: Vec<_> = cdrs
            .iter()
            .map(|cdr| {
                let leaf = cdr.leaf();
                let key = LeafDay {
                    account: cdr.account,
                    day: cdr.day(),
                    leaf,
                    hour: 0,
                };
                (key, Tally::one(tariff.rate(cdr, leaf)), cdr)
            })
            .collect();
        let mut counters = Deltas::default();
        let mut i = 0;
        g.bench_function("counters", |b| {
            b.iter(|| {
                i = (i + 1) % rated.len();
                let (key, tally, cdr) = black_box(&rated[i]);
                counters.record(
                    *key,
                    *tally,
                    cdr.phone_number.as_deref(),
                    cdr.agent_id.as_deref(),
                );
            })
        });

        let mut counters = Deltas::default();
        let mut i = 0;
        g.bench_function("ingest", |b| {
            b.iter(|| {
                i = (i + 1) % msgs.len();
                black_box(ingest(black_box(&msgs[i]), &tariff, &mut counters, &mut NoDedup).is_ok())
            })
        });

        // The daemon's way: a polled batch at a time, its memory prefetched in waves.
        g.throughput(Throughput::Elements(BATCH as u64));
        let refs: Vec<&[u8]> = msgs.iter().map(Vec::as_slice).collect();
        let mut deltas = Deltas::default();
        let mut i = 0;
        g.bench_function("ingest-batch", |b| {
            b.iter(|| {
                let start = i;
                i = (i + BATCH) % (refs.len() - BATCH);
                let mut counted = 0;
                ingest_batch(
                    black_box(&refs[start..start + BATCH]),
                    &tariff,
                    &mut deltas,
                    &mut NoDedup,
                    &mut (),
                    |_, r| counted += r.is_ok() as usize,
                );
                black_box(counted)
            })
        });
        g.finish();
    }
}

/// The alternative design: every ancestor category × (day, month, year, all-time)
/// updated on the hot path, so a flush only drains.
struct EagerCounters {
    shards: Vec<Mutex<HashMap<RecordKey, Tally, FxBuildHasher>>>,
}

impl EagerCounters {
    fn new(n: usize) -> EagerCounters {
        EagerCounters {
            shards: (0..n).map(|_| Mutex::default()).collect(),
        }
    }
    fn record(&self, key: LeafDay, t: Tally) {
        let mut shard = self.shards[key.account.0 as usize % self.shards.len()].lock();
        let periods = Period::containing(key.day);
        for category in key.leaf.with_ancestors() {
            for period in periods {
                shard
                    .entry(RecordKey {
                        account: key.account,
                        category,
                        period,
                    })
                    .or_default()
                    .add(t);
            }
        }
    }
    fn take(&self) -> usize {
        self.shards
            .iter()
            .map(|s| std::mem::take(&mut *s.lock()).len())
            .sum()
    }
}

/// Account×day cells in a `DashMap` instead of mutex-guarded hashbrown shards.
struct DashCounters {
    map: DashMap<AccountDay, Leaves, FxBuildHasher>,
}

impl DashCounters {
    fn record(&self, key: LeafDay, t: Tally) {
        self.map
            .entry(AccountDay {
                account: key.account,
                day: key.day,
            })
            .or_default()
            .add_leaf(key.leaf, t);
    }
}

fn rated_cells(tariff: &Tariff, accounts: u64) -> Vec<(LeafDay, Tally)> {
    messages(accounts)
        .iter()
        .map(|m| {
            let cdr = decode(m).unwrap();
            let leaf = cdr.leaf();
            let key = LeafDay {
                account: cdr.account,
                day: cdr.day(),
                leaf,
                hour: 0,
            };
            (key, Tally::one(tariff.rate(&cdr, leaf)))
        })
        .collect()
}

fn bench_design(c: &mut Criterion) {
    let tariff = tariff();
    for (pool, accounts) in POOLS {
        let cells = rated_cells(&tariff, accounts);
        let batch = &cells[..FLUSH_BATCH.min(cells.len())];

        // One flush interval's worth of CDRs, recorded then flushed; time per CDR
        // includes the flush-time work of each design.
        let mut g = c.benchmark_group(format!("design-rollups/{pool}"));
        g.throughput(Throughput::Elements(batch.len() as u64));
        g.sample_size(10);
        g.bench_function("account-day+rows-at-flush", |b| {
            b.iter_batched(
                || MutexShards::new(SHARDS),
                |counters| {
                    for (k, t) in batch {
                        counters.record(*k, *t, None, None);
                    }
                    black_box(counters.take().rows().len())
                },
                BatchSize::LargeInput,
            )
        });
        g.bench_function("every-ancestor-x4-periods-on-hot-path", |b| {
            b.iter_batched(
                || EagerCounters::new(SHARDS),
                |counters| {
                    for (k, t) in batch {
                        counters.record(*k, *t);
                    }
                    black_box(counters.take())
                },
                BatchSize::LargeInput,
            )
        });
        g.finish();

        // Hot-path update alone, one thread, counters warmed to steady state.
        let mut g = c.benchmark_group(format!("design-shards/{pool}"));
        g.throughput(Throughput::Elements(1));
        let counters = MutexShards::new(SHARDS);
        let mut i = 0;
        g.bench_function("mutex-shards", |b| {
            b.iter(|| {
                i = (i + 1) % cells.len();
                let (k, t) = black_box(cells[i]);
                counters.record(k, t, None, None)
            })
        });
        let dash = DashCounters {
            map: DashMap::with_hasher_and_shard_amount(FxBuildHasher, SHARDS),
        };
        let mut i = 0;
        g.bench_function("dashmap", |b| {
            b.iter(|| {
                i = (i + 1) % cells.len();
                let (k, t) = black_box(cells[i]);
                dash.record(k, t)
            })
        });

        // Two writers at once (the consumer's worker threads), per CDR overall.
        g.throughput(Throughput::Elements(2));
        g.bench_function("mutex-shards-2-threads", |b| {
            let counters = MutexShards::new(SHARDS);
            b.iter_custom(|iters| {
                two_threads(iters, &cells, |k, t| counters.record(k, t, None, None))
            })
        });
        g.bench_function("dashmap-2-threads", |b| {
            let dash = DashCounters {
                map: DashMap::with_hasher_and_shard_amount(FxBuildHasher, SHARDS),
            };
            b.iter_custom(|iters| two_threads(iters, &cells, |k, t| dash.record(k, t)))
        });
        g.finish();
    }
}

/// The design the consumer's single-writer [`Deltas`] replaced, kept as the
/// baseline of `design-shards`: deltas sharded by account behind mutexes, so
/// concurrent writers rarely meet on a lock.
struct MutexShards {
    shards: Box<[CachePadded<Mutex<Deltas>>]>,
    mask: usize,
}

impl MutexShards {
    /// `shards` is rounded up to a power of two.
    fn new(shards: usize) -> MutexShards {
        let n = shards.max(1).next_power_of_two();
        MutexShards {
            shards: (0..n)
                .map(|_| CachePadded::new(Mutex::new(Deltas::default())))
                .collect(),
            mask: n - 1,
        }
    }

    #[inline]
    fn shard(&self, account: AccountSid) -> &Mutex<Deltas> {
        // The SID's low bits are uniformly random hex.
        &self.shards[(account.0 as usize) & self.mask]
    }

    /// Adds one rated CDR.
    #[inline]
    fn record(&self, key: LeafDay, t: Tally, phone_number: Option<&str>, agent_id: Option<&str>) {
        self.shard(key.account)
            .lock()
            .record(key, t, phone_number, agent_id);
    }

    /// Takes every delta recorded since the last take, leaving the counters empty.
    fn take(&self) -> Deltas {
        let mut all = Deltas::default();
        for shard in self.shards.iter() {
            let taken = shard.lock().take();
            all.merge(taken);
        }
        all
    }
}

/// Runs `iters` updates on each of two threads; returns the wall time.
fn two_threads(
    iters: u64,
    cells: &[(LeafDay, Tally)],
    record: impl Fn(LeafDay, Tally) + Sync,
) -> Duration {
    let barrier = Barrier::new(2);
    let start = std::thread::scope(|s| {
        let worker = |offset: usize| {
            let (barrier, record) = (&barrier, &record);
            move || {
                barrier.wait();
                let start = Instant::now();
                for n in 0..iters as usize {
                    let (k, t) = cells[(offset + n) % cells.len()];
                    record(k, t);
                }
                start
            }
        };
        let a = s.spawn(worker(0));
        let b = s.spawn(worker(cells.len() / 2));
        let (a, b) = (a.join().unwrap(), b.join().unwrap());
        a.min(b)
    });
    start.elapsed()
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = bench_stages, bench_design
}
criterion_main!(benches);
