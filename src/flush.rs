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

use crate::calendar::Day;
use crate::counters::Deltas;
use crate::dead_letter::DeadLetters;
use crate::rating::Tariff;
use crate::store::{self, DedupRows, FlushBatch, FlushOutcome, OffsetAdvance, RowDelta, Store};

/// What the consumer hands over at a flush: a consistent cut.
pub struct Snapshot {
    pub deltas: Deltas,
    pub offsets: Vec<OffsetAdvance>,
    pub dedup: Vec<DedupRows>,
    pub prune_dedup_before: Option<Day>,
}

/// The stored rows `deltas` add to, each with its account's currency, in key
/// order (so the store's B-tree is written page by page, not at random).
pub fn rows_of(deltas: &Deltas, tariff: &Tariff) -> Vec<RowDelta> {
    let mut rows: Vec<RowDelta> = deltas
        .rows()
        .into_iter()
        .map(|(key, leaves)| RowDelta {
            key,
            leaves,
            price_unit: tariff.plan_for(key.account).currency.clone(),
        })
        .collect();
    rows.sort_unstable_by_key(|r| r.key);
    rows
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
}

const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl Flusher {
    /// Runs until the job channel closes.
    pub fn run(self, jobs: Receiver<Job>) {
        let mut store: Option<Store> = None;
        for job in jobs {
            match job {
                Job::Flush {
                    snapshot,
                    cancel,
                    reply,
                } => {
                    let result = self.flush(&mut store, *snapshot, &cancel);
                    let _ = reply.send(result);
                }
                Job::Load {
                    topic,
                    partitions,
                    since,
                    cancel,
                    reply,
                } => {
                    let loaded = self.retry(&mut store, &cancel, "load offsets", |s| {
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

    fn flush(&self, store: &mut Option<Store>, snap: Snapshot, cancel: &AtomicBool) -> FlushResult {
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
        let expanding = Instant::now();
        let batch = self.batch(snap);
        let expanded = expanding.elapsed();
        let rows = batch.rows.len() + batch.breakdowns.len();
        let mut attempt = Duration::ZERO;
        let result = self.retry(store, cancel, "flush", |s| {
            let t = Instant::now();
            let r = s.write_flush(&batch);
            attempt = t.elapsed();
            r
        });
        if result.is_ok() {
            tracing::debug!(
                rows = batch.rows.len(),
                breakdowns = batch.breakdowns.len(),
                ms = started.elapsed().as_millis() as u64,
                "flush landed"
            );
            self.health
                .last_success
                .store(chrono::Utc::now().timestamp(), Ordering::Relaxed);
            metrics::histogram!("tallyd_flush_duration_seconds")
                .record(started.elapsed().as_secs_f64());
            metrics::counter!("tallyd_flush_rows_total").increment(rows as u64);
            metrics::counter!("tallyd_flushes_total").increment(1);
        }
        result.map(|outcome| Flushed {
            outcome,
            took: expanded + attempt,
        })
    }

    /// Expands a snapshot into the rows of one store transaction (off the hot path).
    fn batch(&self, snap: Snapshot) -> FlushBatch {
        let rows = rows_of(&snap.deltas, &self.tariff);
        FlushBatch {
            as_of: chrono::Utc::now()
                .format("%Y-%m-%dT%H:%M:%S+00:00")
                .to_string(),
            rows,
            breakdowns: snap.deltas.breakdowns().collect(),
            offsets: snap.offsets,
            dedup: snap.dedup,
            prune_dedup_before: snap.prune_dedup_before,
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
