//! The flusher: a thread that owns the store connection and turns snapshots taken
//! by the consumer into store transactions, off the hot path.
//!
//! It retries a failed flush with backoff (reconnecting to the store) until it
//! lands, is fenced, or is cancelled; meanwhile the consumer keeps counting until
//! its bound of unflushed cells, then pauses (backpressure). It also serves the
//! consumer's loads (offsets and dedup windows on partition assignment), in order
//! with the flushes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::calendar::{Day, Period};
use crate::counters::{AccountDay, BreakdownDelta, Deltas, Leaves, RowKey};
use crate::dead_letter::DeadLetters;
use crate::rating::Tariff;
use crate::store::checkpoint::Checkpointer;
use crate::store::{self, DedupRows, FlushBatch, FlushOutcome, OffsetAdvance, RowDelta, Store};

/// One partition's share of a flush: the usage counted from its messages, the
/// offsets those messages span and the ids first seen among them. It is always
/// written whole, in one transaction.
pub struct PartitionCut {
    pub deltas: Deltas,
    pub offset: OffsetAdvance,
    pub dedup: Option<DedupRows>,
}

/// What the consumer hands over at a flush: a consistent cut.
pub struct Snapshot {
    pub parts: Vec<PartitionCut>,
    pub prune_dedup_before: Option<Day>,
}

/// The stored rows and by-number/by-agent rows that deltas add to, each in the
/// store's key order (so its B-trees are written page by page, not at random:
/// 20% less SQLite time for a drain's final flush than in hash order). Deltas of
/// several partitions are combined without merging their tables; a row or
/// breakdown that two of them share (an account seen on two partitions) is
/// summed into one. The two kinds are expanded on two threads: after a backlog
/// drain the final flush is all that is left to do, and the second core is idle.
pub fn usage_of(mut parts: Vec<Deltas>, tariff: &Tariff) -> (Vec<RowDelta>, Vec<BreakdownDelta>) {
    let by_entry: Vec<Deltas> = parts.iter_mut().map(Deltas::split_breakdowns).collect();
    std::thread::scope(|s| {
        let breakdowns = s.spawn(|| breakdowns_of(by_entry));
        let rows = rows_of(&parts, tariff);
        (
            rows,
            breakdowns.join().expect("breakdown expansion panicked"),
        )
    })
}

fn rows_of(parts: &[Deltas], tariff: &Tariff) -> Vec<RowDelta> {
    // The account-day cells sorted by account and day (small elements: a key and
    // a reference), then one pass per account yields its rows already in order —
    // days, months, years, all time — each summed as it goes. Adding every cell
    // into a hash map of 400-byte rows and sorting those took 3× as long.
    let mut cells: Vec<(AccountDay, &Leaves)> = parts
        .iter()
        .flat_map(|d| d.cells().iter().map(|(k, l)| (*k, l)))
        .collect();
    cells.sort_unstable_by_key(|(k, _)| (k.account, k.day));
    let mut rows = Vec::with_capacity(cells.len() * 2 + 3 * parts.len());
    let (mut months, mut years): (Vec<RowDelta>, Vec<RowDelta>) = (Vec::new(), Vec::new());
    for account_cells in cells.chunk_by(|a, b| a.0.account == b.0.account) {
        let account = account_cells[0].0.account;
        let price_unit = &tariff.plan_for(account).currency;
        let row = |period, leaves: &Leaves| RowDelta {
            key: RowKey { account, period },
            leaves: *leaves,
            price_unit: price_unit.clone(),
        };
        let mut all = Leaves::default();
        for (k, leaves) in account_cells {
            all.add(leaves);
            let [day, month, year, _] = Period::containing(k.day);
            for (period, out) in [(day, &mut rows), (month, &mut months), (year, &mut years)] {
                match out.last_mut() {
                    Some(last) if last.key.account == account && last.key.period == period => {
                        last.leaves.add(leaves)
                    }
                    _ => out.push(row(period, leaves)),
                }
            }
        }
        rows.append(&mut months);
        rows.append(&mut years);
        rows.push(row(Period::AllTime, &all));
    }
    rows
}

fn breakdowns_of(parts: Vec<Deltas>) -> Vec<BreakdownDelta> {
    let mut breakdowns: Vec<BreakdownDelta> = parts
        .into_iter()
        .flat_map(Deltas::into_breakdowns)
        .collect();
    breakdowns.sort_unstable_by(|a, b| {
        let (a, b) = (&a.key, &b.key);
        (a.account, a.dimension.as_str(), &*a.value, a.day).cmp(&(
            b.account,
            b.dimension.as_str(),
            &*b.value,
            b.day,
        ))
    });
    breakdowns.dedup_by(|later, kept| {
        let same = later.key == kept.key;
        if same {
            kept.calls.add(later.calls);
            kept.messages.add(later.messages);
        }
        same
    });
    breakdowns
}

/// What the consumer loads on partition assignment.
pub struct Loaded {
    pub offsets: HashMap<i32, i64>,
    /// partition → (seen day, packed ids) blobs.
    pub dedup: HashMap<i32, Vec<(Day, Vec<u8>)>>,
}

/// A flush that landed: how, and how long the store took to write it (the batch's
/// expansion and the successful attempt; retries and backoff excluded, so a store
/// outage does not read as a slow store).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flushed {
    pub outcome: FlushOutcome,
    pub took: Duration,
}

pub type FlushResult = Result<Flushed, store::Error>;

pub enum Job {
    Flush {
        snapshot: Box<Snapshot>,
        cancel: Arc<AtomicBool>,
        reply: SyncSender<FlushResult>,
    },
    Load {
        topic: String,
        partitions: Vec<i32>,
        since: Day,
        cancel: Arc<AtomicBool>,
        reply: SyncSender<Option<Loaded>>,
    },
}

/// Shared health of the flusher, read by `/readyz` and the metrics.
#[derive(Default)]
pub struct FlushHealth {
    /// Unix seconds of the last successful flush (0 = never).
    pub last_success: AtomicI64,
    /// Whether the store answered the last attempt.
    pub store_up: AtomicBool,
}

pub struct Flusher {
    pub url: String,
    pub tariff: Arc<Tariff>,
    pub dead_letters: Option<Arc<DeadLetters>>,
    pub health: Arc<FlushHealth>,
    /// PostgreSQL connections a flush is written over in parallel
    /// (`flush.parallel_writers`); SQLite has one writer.
    pub writers: usize,
    /// For a SQLite store: the thread that checkpoints its WAL, so that the
    /// flusher's commits need not.
    pub checkpointer: Option<Checkpointer>,
}

const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// One share of a flush as written.
struct Written {
    result: Result<FlushOutcome, store::Error>,
    took: Duration,
    rows: usize,
}

/// Deals partitions' cuts into at most `lanes` shares of about equal size
/// (largest first, each to the lightest share so far), each in partition order.
fn spread(mut parts: Vec<PartitionCut>, lanes: usize) -> Vec<Vec<PartitionCut>> {
    let lanes = lanes.clamp(1, parts.len().max(1));
    parts.sort_by_key(|p| std::cmp::Reverse(p.deltas.live_cells()));
    let mut shares: Vec<(usize, Vec<PartitionCut>)> = (0..lanes).map(|_| (0, Vec::new())).collect();
    for p in parts {
        let lightest = shares
            .iter_mut()
            .min_by_key(|(cells, _)| *cells)
            .expect("at least one share");
        lightest.0 += p.deltas.live_cells();
        lightest.1.push(p);
    }
    shares
        .into_iter()
        .map(|(_, mut share)| {
            share.sort_by_key(|p| p.offset.partition);
            share
        })
        .filter(|share| !share.is_empty())
        .collect()
}

impl Flusher {
    /// Runs until the job channel closes.
    pub fn run(self, jobs: Receiver<Job>) {
        let lanes = if store::is_sqlite_url(&self.url) {
            1
        } else {
            self.writers.max(1)
        };
        let mut stores: Vec<Option<Store>> = (0..lanes).map(|_| None).collect();
        for job in jobs {
            match job {
                Job::Flush {
                    snapshot,
                    cancel,
                    reply,
                } => {
                    let result = self.flush(&mut stores, *snapshot, &cancel);
                    if let (Ok(_), Some(c)) = (&result, &self.checkpointer) {
                        c.request();
                    }
                    let _ = reply.send(result);
                }
                Job::Load {
                    topic,
                    partitions,
                    since,
                    cancel,
                    reply,
                } => {
                    let loaded = self.retry(&mut stores[0], &cancel, "load offsets", |s| {
                        let offsets = s.load_offsets(&topic)?;
                        let mut dedup = HashMap::new();
                        for p in &partitions {
                            dedup.insert(*p, s.load_dedup(&topic, *p, since)?);
                        }
                        Ok(Loaded { offsets, dedup })
                    });
                    let _ = reply.send(loaded.ok());
                }
            }
        }
    }

    /// Writes a snapshot: its partitions spread over the writer connections, each
    /// share in one transaction of its own, the shares in parallel. A partition's
    /// deltas, offsets and dedup ids always land together; an account's CDRs all
    /// come through one partition, so parallel shares touch disjoint rows.
    fn flush(
        &self,
        stores: &mut [Option<Store>],
        snap: Snapshot,
        cancel: &AtomicBool,
    ) -> FlushResult {
        let started = Instant::now();
        // Dead letters for the offsets about to be stored must be safe first.
        if let Some(dl) = &self.dead_letters {
            let mut backoff = Duration::from_millis(100);
            while let Err(e) = dl.flush(Duration::from_secs(5)) {
                if cancel.load(Ordering::Relaxed) {
                    return Err(store::Error::Cancelled(format!(
                        "dead letters still pending: {e}"
                    )));
                }
                tracing::warn!(error = %e, pending = dl.in_flight(), "dead-letter topic not accepting messages; retrying");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
        let as_of = chrono::Utc::now()
            .format("%Y-%m-%dT%H:%M:%S+00:00")
            .to_string();
        let as_of = &as_of;
        let written: Vec<Written> = std::thread::scope(|scope| {
            let mut shares = spread(snap.parts, stores.len())
                .into_iter()
                .zip(stores.iter_mut())
                .enumerate()
                .map(|(i, (share, store))| {
                    // Old dedup ids are pruned once, by the first share.
                    let prune = snap.prune_dedup_before.filter(|_| i == 0);
                    move || self.write_share(store, share, prune, as_of, cancel)
                });
            // The first share on this thread, any others beside it on their own.
            let first = shares.next();
            let others: Vec<_> = shares.map(|w| scope.spawn(w)).collect();
            first
                .map(|w| w())
                .into_iter()
                .chain(
                    others
                        .into_iter()
                        .map(|h| h.join().expect("flush writer panicked")),
                )
                .collect()
        });
        let mut outcome = FlushOutcome::AlreadyApplied;
        let mut took = Duration::ZERO;
        let mut rows = 0;
        for w in written {
            match w.result? {
                FlushOutcome::Applied => outcome = FlushOutcome::Applied,
                FlushOutcome::AlreadyApplied => {}
            }
            took = took.max(w.took);
            rows += w.rows;
        }
        tracing::debug!(
            rows,
            ms = started.elapsed().as_millis() as u64,
            "flush landed"
        );
        let now = chrono::Utc::now().timestamp();
        self.health.last_success.store(now, Ordering::Relaxed);
        metrics::gauge!("tallyd_last_flush_timestamp_seconds").set(now as f64);
        metrics::histogram!("tallyd_flush_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::counter!("tallyd_flush_rows_total").increment(rows as u64);
        metrics::counter!("tallyd_flushes_total").increment(1);
        Ok(Flushed { outcome, took })
    }

    /// Expands one share of a snapshot and writes it in one transaction, retrying
    /// until it lands, is fenced or is cancelled.
    fn write_share(
        &self,
        store: &mut Option<Store>,
        parts: Vec<PartitionCut>,
        prune_dedup_before: Option<Day>,
        as_of: &str,
        cancel: &AtomicBool,
    ) -> Written {
        let expanding = Instant::now();
        let batch = self.batch(parts, prune_dedup_before, as_of);
        let expanded = expanding.elapsed();
        let mut attempt = Duration::ZERO;
        let result = self.retry(store, cancel, "flush", |s| {
            let t = Instant::now();
            let r = s.write_flush(&batch);
            attempt = t.elapsed();
            r
        });
        tracing::debug!(
            rows = batch.rows.len(),
            breakdowns = batch.breakdowns.len(),
            expand_ms = expanded.as_millis() as u64,
            write_ms = attempt.as_millis() as u64,
            "flush share written"
        );
        Written {
            result,
            took: expanded + attempt,
            rows: batch.rows.len() + batch.breakdowns.len(),
        }
    }

    /// Expands partitions' cuts into the rows of one store transaction (off the
    /// hot path).
    fn batch(
        &self,
        parts: Vec<PartitionCut>,
        prune_dedup_before: Option<Day>,
        as_of: &str,
    ) -> FlushBatch {
        let mut deltas = Vec::with_capacity(parts.len());
        let mut offsets = Vec::with_capacity(parts.len());
        let mut dedup = Vec::new();
        for p in parts {
            deltas.push(p.deltas);
            offsets.push(p.offset);
            dedup.extend(p.dedup);
        }
        let (rows, breakdowns) = usage_of(deltas, &self.tariff);
        FlushBatch {
            as_of: as_of.to_owned(),
            rows,
            breakdowns,
            offsets,
            dedup,
            prune_dedup_before,
        }
    }

    /// Runs `op` against the store until it succeeds, is fenced or is cancelled,
    /// reconnecting after errors.
    fn retry<T>(
        &self,
        store: &mut Option<Store>,
        cancel: &AtomicBool,
        what: &str,
        mut op: impl FnMut(&mut Store) -> store::Result<T>,
    ) -> store::Result<T> {
        let mut backoff = Duration::from_millis(100);
        loop {
            let attempt = match store {
                Some(s) => op(s),
                None => Store::open(&self.url).and_then(|mut s| {
                    if self.checkpointer.is_some() {
                        s.defer_checkpoints()?;
                    }
                    let r = op(&mut s);
                    *store = Some(s);
                    r
                }),
            };
            match attempt {
                Ok(v) => {
                    self.set_store_up(true);
                    return Ok(v);
                }
                Err(e) if e.is_fenced() => return Err(e),
                Err(e) => {
                    self.set_store_up(false);
                    metrics::counter!("tallyd_store_errors_total").increment(1);
                    *store = None;
                    if cancel.load(Ordering::Relaxed) {
                        return Err(e);
                    }
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "store {what} failed; retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    fn set_store_up(&self, up: bool) {
        self.health.store_up.store(up, Ordering::Relaxed);
        metrics::gauge!("tallyd_store_up").set(if up { 1.0 } else { 0.0 });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::category::Category;
    use crate::cdr::AccountSid;
    use crate::counters::{Dimension, LeafDay, Tally};

    fn tariff() -> Tariff {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tallyd.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        crate::config::Config::from_toml(&text, &path, [])
            .unwrap()
            .1
    }

    fn call(d: &mut Deltas, account: u128, day: i32, number: &str, agent: &str) {
        d.record(
            LeafDay {
                account: AccountSid(account),
                day: Day(day),
                leaf: Category::CallsOutbound,
            },
            Tally {
                count: 1,
                usage: 60,
                price: 5_000,
            },
            Some(number),
            Some(agent),
        );
    }

    fn cut(partition: i32, deltas: Deltas) -> PartitionCut {
        PartitionCut {
            deltas,
            offset: OffsetAdvance {
                topic: "cdrs".into(),
                partition,
                from: None,
                to: 1,
            },
            dedup: None,
        }
    }

    #[test]
    fn usage_is_in_store_order_and_an_account_on_two_partitions_is_summed() {
        let (mut a, mut b) = (Deltas::default(), Deltas::default());
        for acc in [9u128, 3, 7] {
            call(&mut a, acc, 20_000, "+1555", "agt_b");
            call(&mut a, acc, 20_001, "+1444", "agt_a");
        }
        // Account 3 also came through the other partition.
        call(&mut b, 3, 20_000, "+1555", "agt_b");
        let (rows, breakdowns) = usage_of(vec![a, b], &tariff());

        let keys: Vec<RowKey> = rows.iter().map(|r| r.key).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(keys, sorted, "rows sorted, each key once");
        // 3 accounts x (2 days + month + year + all).
        assert_eq!(rows.len(), 15);
        let all3 = rows
            .iter()
            .find(|r| r.key.account == AccountSid(3) && r.key.period == Period::AllTime)
            .unwrap();
        assert_eq!(all3.leaves.get(Category::Calls).count, 3);
        assert_eq!(all3.price_unit, "usd");

        let order: Vec<(u128, &str, &str, i32)> = breakdowns
            .iter()
            .map(|d| {
                let k = &d.key;
                (k.account.0, k.dimension.as_str(), &*k.value, k.day.0)
            })
            .collect();
        let mut expected = order.clone();
        expected.sort();
        expected.dedup();
        assert_eq!(order, expected, "breakdowns in store order, each key once");
        assert_eq!(breakdowns.len(), 3 * 4);
        let shared = breakdowns
            .iter()
            .find(|d| {
                d.key.account == AccountSid(3)
                    && d.key.dimension == Dimension::Number
                    && &*d.key.value == "+1555"
                    && d.key.day == Day(0)
            })
            .unwrap();
        assert_eq!(shared.calls.count, 2);
    }

    proptest::proptest! {
        /// The sort-and-walk expansion adds up exactly what adding every cell into
        /// its four periods' rows does, across month and year ends and with
        /// accounts on several partitions.
        #[test]
        fn rows_are_every_cell_added_into_its_four_periods(
            cells in proptest::collection::vec(
                (0usize..3, 0u128..6, 20_080i32..20_100, 0usize..Category::LEAVES, 1u64..1000),
                1..200,
            )
        ) {
            let mut parts: Vec<Deltas> = (0..3).map(|_| Deltas::default()).collect();
            for (p, account, day, leaf, usage) in cells {
                let leaf_day = LeafDay {
                    account: AccountSid(account),
                    day: Day(day),
                    leaf: Category::ALL[leaf],
                };
                let tally = Tally { count: 1, usage, price: usage as i64 * 7 };
                parts[p].record(leaf_day, tally, None, None);
            }
            let mut expected = hashbrown::HashMap::default();
            for d in &parts {
                d.add_rows_to(&mut expected);
            }
            let (rows, _) = usage_of(parts, &tariff());
            let keys: Vec<RowKey> = rows.iter().map(|r| r.key).collect();
            proptest::prop_assert!(keys.windows(2).all(|w| w[0] < w[1]), "sorted, each key once");
            let got: hashbrown::HashMap<RowKey, Leaves, _> =
                rows.into_iter().map(|r| (r.key, r.leaves)).collect();
            proptest::prop_assert_eq!(got, expected);
        }
    }

    #[test]
    fn partitions_are_spread_evenly_and_whole() {
        let sizes = [5usize, 1, 4, 2, 3];
        let parts: Vec<PartitionCut> = sizes
            .iter()
            .enumerate()
            .map(|(p, &n)| {
                let mut d = Deltas::default();
                for acc in 0..n {
                    call(&mut d, acc as u128 + 100 * p as u128, 20_000, "+1", "a");
                }
                cut(p as i32, d)
            })
            .collect();
        let shares = spread(parts, 2);
        assert_eq!(shares.len(), 2);
        let cells: Vec<usize> = shares
            .iter()
            .map(|s| s.iter().map(|p| p.deltas.account_days()).sum())
            .collect();
        assert_eq!(cells.iter().sum::<usize>(), 15);
        assert!(cells.iter().all(|&c| c == 7 || c == 8), "{cells:?}");
        for share in &shares {
            let ps: Vec<i32> = share.iter().map(|p| p.offset.partition).collect();
            assert!(ps.windows(2).all(|w| w[0] < w[1]), "{ps:?}");
        }
        // More writers than partitions: one share per partition, none empty.
        let one = vec![cut(0, Deltas::default())];
        assert_eq!(spread(one, 4).len(), 1);
    }
}
