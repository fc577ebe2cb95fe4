//! The flusher thread: owns a consumer's (or, with SQLite, every consumer's)
//! path to the store.
//!
//! A snapshot's partitions are spread over `flush.parallel_writers` lanes
//! (SQLite: one), written side by side; within a lane each partition's cut is
//! expanded into its pages and written in a transaction of its own, so a
//! partition whose write the store can never take (a permanent error: a page
//! that does not decode, a value over a limit) holds up no other partition. A
//! retryable error (the store down, a serialization failure) is retried with
//! backoff until it lands, is fenced or is cancelled; meanwhile the consumer
//! keeps counting until its bound of unflushed cells, then pauses
//! (backpressure).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::dead_letter::DeadLetters;
use crate::metrics as m;
use crate::rating::Tariff;
use crate::store::{self, ErrorKind, FlushBatch, FlushOutcome, Store};
use crate::triggers::{Trigger, TriggerBook};

use super::expand::{pages, spread};
use super::{FlushHealth, FlushResult, Flushed, Job, PartitionCut, Snapshot};

pub struct Flusher {
    pub store: Store,
    pub tariff: Arc<Tariff>,
    pub dead_letters: Option<Arc<DeadLetters>>,
    pub health: Arc<FlushHealth>,
    /// PostgreSQL connections a flush is written over in parallel
    /// (`flush.parallel_writers`); SQLite has one writer.
    pub writers: usize,
    /// Usage triggers, evaluated in each partition's flush transaction.
    pub triggers: TriggerBook,
    /// The webhook dispatcher: a flush writes the callbacks it fires claimed
    /// for it and hands them over after its commit, so they leave now rather
    /// than at its next read (or, while it paces itself, writes them pending
    /// and wakes it).
    pub dispatcher: Option<crate::webhooks::DispatcherHandle>,
}

const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Unix ms when the first of `consumed` was consumed (`now` if none): the
/// time a usage trigger's crossing in this cut is counted from, at the
/// latest.
fn consumed_at_ms(consumed: &crate::metrics::ConsumedAt, now: Instant) -> i64 {
    unix_ms_at(consumed.first().unwrap_or(now), now)
}

/// The Unix ms of `at`, an instant before `now`.
fn unix_ms_at(at: Instant, now: Instant) -> i64 {
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    wall.saturating_sub(now.saturating_duration_since(at))
        .as_millis() as i64
}

/// One lane's partitions as written.
#[derive(Default)]
struct Written {
    outcome: Option<FlushOutcome>,
    fenced: Option<store::Error>,
    stuck: Vec<(i32, store::Error)>,
    took: Duration,
    pages: usize,
    /// Rows and breakdown entries on those pages.
    rows: usize,
}

impl Flusher {
    /// Runs until the job channel closes.
    pub fn run(self, jobs: Receiver<Job>) {
        for Job {
            snapshot,
            cancel,
            reply,
        } in jobs
        {
            let _ = reply.send(self.flush(*snapshot, &cancel));
        }
    }

    fn lanes(&self) -> usize {
        if self.store.is_sqlite() {
            1
        } else {
            self.writers.max(1)
        }
    }

    /// Writes a snapshot: its partitions spread over the writer lanes, the lanes
    /// in parallel. A partition's deltas, offsets and dedup ids always land
    /// together; an account's CDRs all come through one partition, so parallel
    /// lanes touch disjoint pages (and take turns on a page they share).
    fn flush(&self, snap: Snapshot, cancel: &AtomicBool) -> FlushResult {
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
            let mut lanes = spread(snap.parts, self.lanes())
                .into_iter()
                .enumerate()
                .map(|(i, lane)| {
                    // Old dedup ids are pruned once, by the first lane.
                    let prune = snap.prune_dedup_before.filter(|_| i == 0);
                    move || self.write_lane(lane, prune, as_of, cancel)
                });
            // The first lane on this thread, any others beside it on their own.
            let first = lanes.next();
            let others: Vec<_> = lanes.map(|w| scope.spawn(w)).collect();
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
        let mut pages = 0;
        let mut rows = 0;
        let mut stuck = Vec::new();
        for w in written {
            if let Some(e) = w.fenced {
                return Err(e);
            }
            if w.outcome == Some(FlushOutcome::Applied) {
                outcome = FlushOutcome::Applied;
            }
            took = took.max(w.took);
            pages += w.pages;
            rows += w.rows;
            stuck.extend(w.stuck);
        }
        tracing::debug!(
            pages,
            rows,
            stuck = stuck.len(),
            ms = started.elapsed().as_millis() as u64,
            "flush landed"
        );
        let now = chrono::Utc::now().timestamp();
        self.health.last_success.store(now, Ordering::Relaxed);
        metrics::gauge!(m::LAST_FLUSH_TIMESTAMP_SECONDS).set(now as f64);
        metrics::histogram!(m::FLUSH_DURATION_SECONDS).record(started.elapsed().as_secs_f64());
        metrics::counter!(m::FLUSH_ROWS_TOTAL).increment(rows as u64);
        metrics::counter!(m::FLUSHES_TOTAL).increment(1);
        Ok(Flushed {
            outcome,
            took,
            stuck,
        })
    }

    /// Writes one lane's partitions, each expanded and written in a
    /// transaction of its own; stops at a fenced one.
    fn write_lane(
        &self,
        lane: Vec<PartitionCut>,
        mut prune_dedup_before: Option<crate::calendar::Day>,
        as_of: &str,
        cancel: &AtomicBool,
    ) -> Written {
        let mut w = Written::default();
        for cut in lane {
            let expanding = Instant::now();
            let partition = cut.offset.partition;
            let pages = pages(vec![cut.deltas], &self.tariff);
            let batch = FlushBatch {
                as_of: as_of.to_owned(),
                triggers: self.triggers_of(&pages),
                consumed_at_ms: consumed_at_ms(&cut.consumed, expanding),
                crossed_at_ms: cut
                    .crossings
                    .iter()
                    .map(|(sid, period, at)| {
                        (
                            sid.to_string(),
                            crate::triggers::period_key(*period),
                            unix_ms_at(*at, expanding),
                        )
                    })
                    .collect(),
                pages,
                offsets: vec![cut.offset],
                dedup: cut.dedup.into_iter().collect(),
                prune_dedup_before: prune_dedup_before.take(),
                wallet: cut.wallet.into(),
                outbox_lease_until: self.dispatcher.as_ref().and_then(|d| d.lease_for_handoff()),
            };
            let expanded = expanding.elapsed();
            let mut attempt = Duration::ZERO;
            let result = self.retry(cancel, "flush", || {
                let t = Instant::now();
                let r = self.store.write_flush_firing(&batch);
                attempt = t.elapsed();
                r
            });
            if result.is_ok() {
                m::CDR_CONSUMED_TO_FLUSHED.record_consumed(&cut.consumed, Instant::now());
            }
            let result = result.map(|(outcome, report)| {
                self.fired(report, batch.outbox_lease_until);
                outcome
            });
            tracing::debug!(
                partition,
                pages = batch.pages.len(),
                expand_ms = expanded.as_millis() as u64,
                write_ms = attempt.as_millis() as u64,
                "partition flushed"
            );
            w.took += expanded + attempt;
            match result {
                Ok(o) => {
                    w.pages += batch.pages.len();
                    w.rows += batch.pages.iter().map(|p| p.delta.len()).sum::<usize>();
                    if w.outcome != Some(FlushOutcome::Applied) {
                        w.outcome = Some(o);
                    }
                }
                Err(e) if e.is_permanent() => {
                    tracing::error!(partition, error = %e,
                        "the store can never take this partition's flush; it is re-read from its stored offset and tried again later");
                    w.stuck.push((partition, e));
                }
                Err(e) => {
                    w.fenced = Some(e);
                    break;
                }
            }
        }
        w
    }

    /// The triggers of the accounts whose pages a cut writes.
    fn triggers_of(&self, pages: &[store::page::PageDelta]) -> Vec<Arc<Trigger>> {
        if self.triggers.is_empty() {
            return Vec::new();
        }
        let mut buf = [0u8; 34];
        let mut last = None;
        let mut out = Vec::new();
        for p in pages {
            if last == Some(p.account) {
                continue;
            }
            last = Some(p.account);
            out.extend(self.triggers.of(p.account.write_text(&mut buf)));
        }
        out
    }

    /// Logs and counts firings that committed, hands their callbacks,
    /// written claimed until `lease_until`, to the dispatcher (or wakes it
    /// to read them), and gives the book what the flush did.
    fn fired(&self, report: store::firing::TriggerReport, lease_until: Option<i64>) {
        if !report.fired.is_empty() {
            for f in &report.fired {
                tracing::info!(account = %f.account_sid, trigger = %f.sid, period = %f.period,
                    value = %f.value, "usage trigger fired");
            }
            metrics::counter!(m::TRIGGERS_FIRED_TOTAL).increment(report.fired.len() as u64);
            if let Some(d) = &self.dispatcher {
                match lease_until {
                    Some(until) => d.hand_over(report.leased, until),
                    None => d.wake(),
                }
            }
        }
        self.triggers
            .record_flush_soon(report.observed, report.fired);
    }

    /// Runs `op` until it succeeds, fails for good (fenced, permanent) or is
    /// cancelled, backing off after retryable errors. (The store handle
    /// replaces dead connections and keeps its health.)
    fn retry<T>(
        &self,
        cancel: &AtomicBool,
        what: &str,
        mut op: impl FnMut() -> store::Result<T>,
    ) -> store::Result<T> {
        let mut backoff = Duration::from_millis(100);
        loop {
            match op() {
                Ok(v) => return Ok(v),
                Err(e) if e.kind() != ErrorKind::Retryable => return Err(e),
                Err(e) => {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cdr::AccountSid;
    use crate::counters::Deltas;
    use crate::flush::expand::tests::{call, cut, tariff};
    use crate::store::Param;

    #[test]
    fn a_partition_the_store_can_never_take_holds_up_no_other() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("sqlite://{}/t.db", dir.path().display())).unwrap();
        // Account 1's all-time page does not decode.
        let sid = AccountSid(1).to_string();
        store
            .with_conn(|c| {
                c.execute(
                    "INSERT INTO usage_pages (account_sid, page, data) VALUES ($1, 'all', $2)",
                    &[Param::Text(&sid), Param::Bytes(&[9, 9, 9])],
                )
            })
            .unwrap();
        let flusher = Flusher {
            store: store.clone(),
            tariff: Arc::new(tariff()),
            dead_letters: None,
            health: Arc::default(),
            writers: 1,
            triggers: Default::default(),
            dispatcher: None,
        };
        let snapshot = Snapshot {
            parts: [(0, 1, 5), (1, 2, 7)]
                .into_iter()
                .map(|(partition, account, to)| {
                    let mut d = Deltas::default();
                    call(&mut d, account, 20_000, "+1555", "agt");
                    let mut c = cut(partition, d);
                    c.offset.to = to;
                    c
                })
                .collect(),
            prune_dedup_before: None,
        };
        let flushed = flusher.flush(snapshot, &AtomicBool::new(false)).unwrap();
        let stuck: Vec<(i32, bool)> = flushed
            .stuck
            .iter()
            .map(|(p, e)| (*p, e.is_permanent()))
            .collect();
        assert_eq!(stuck, [(0, true)]);
        // Partition 1 landed; partition 0 keeps no offset, so it is re-read.
        let offsets = store.load_offsets("cdrs").unwrap();
        assert_eq!(offsets.into_iter().collect::<Vec<_>>(), [(1, 7)]);
        let pages: Vec<String> = store
            .with_conn(|c| {
                c.query(
                    "SELECT account_sid FROM usage_pages WHERE page = 'all'",
                    &[],
                )
            })
            .unwrap()
            .iter()
            .map(|r| r[0].text().to_owned())
            .collect();
        assert_eq!(pages, [sid, AccountSid(2).to_string()]);
        // The store answered all along: it is not reported down.
        assert!(store.health().is_up());
        assert!(flusher.health.last_success.load(Ordering::Relaxed) > 0);
    }
}
