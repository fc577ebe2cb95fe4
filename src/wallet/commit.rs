//! Group commit of hold writes: a granted hold is durable in the store before
//! its `201` leaves, and so is a release (explicit or at expiry) before its
//! answer, but writes made at the same time share one transaction.
//!
//! Requests hand their write to the hold writer and wait for its answer. The
//! writer takes every write waiting (up to [`MAX_BATCH`]), grants and releases
//! mixed, writes them in one transaction ([`crate::store::Conn::write_holds`])
//! and answers each; writes made while it writes wait for the next round. A
//! write carries the fence of its instance's ownership of the partition (none
//! for a lone API); one whose fence no longer holds is not stored (see
//! [`crate::store::wallet`]). Under load a transaction carries many writes, so
//! the store's per-commit cost (a WAL append and, for PostgreSQL, a round trip
//! and a flush) is paid once per batch instead of once per hold; alone, a
//! write waits for no one.
//!
//! PostgreSQL commits on several connections at once: up to
//! [`PG_IN_FLIGHT`] batches are written together, so while one waits for its
//! commit's WAL flush the next is already being written, and the rate is not
//! one batch per commit latency. Batches written at once may land in either
//! order; the writes are made so that order does not matter (a release
//! written before its grant stores the hold released, and the grant then
//! finds it; see [`crate::store::Conn::release_hold`]). SQLite has one writer
//! per file: one batch at a time, into the holds file of the store
//! ([`crate::store::holds`]) over connections the writer keeps, so a batch
//! never waits for a flush.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::store::holds::HoldWriter;
use crate::store::wallet::{Fence, HoldWrite, StoredHold};
use crate::store::{Error, Store};

/// Most writes in one transaction.
pub const MAX_BATCH: usize = 512;

/// Batches a PostgreSQL store commits at once.
pub const PG_IN_FLIGHT: usize = 4;

/// What a write found: `None` if its fence no longer holds (nothing stored);
/// for a grant `Some(None)` if stored, `Some(Some(h))` with the hold its call
/// id already had; for a release `Some(None)`.
pub type Inserted = Result<Option<Option<StoredHold>>, Error>;

type Request = (HoldWrite, Option<Fence>, oneshot::Sender<Inserted>);

/// The handle requests use; cheap to clone.
#[derive(Clone, Debug)]
pub struct HoldCommits {
    tx: mpsc::Sender<Request>,
}

impl HoldCommits {
    /// Starts the writer on the current tokio runtime.
    pub fn start(store: Store) -> HoldCommits {
        let (tx, rx) = mpsc::channel(MAX_BATCH * 8);
        if store.is_sqlite() {
            tokio::spawn(write_sqlite(store, rx));
        } else {
            tokio::spawn(write_pooled(store, rx, PG_IN_FLIGHT));
        }
        HoldCommits { tx }
    }

    /// Stores a granted `hold` with whatever else is waiting; returns once it
    /// is committed (or the store refused the batch).
    pub async fn insert(&self, hold: StoredHold, fence: Option<Fence>) -> Inserted {
        self.write(HoldWrite::Grant(hold), fence).await
    }

    /// Stores `hold` released with whatever else is waiting; `Ok(None)` if
    /// its fence no longer holds.
    pub async fn release(
        &self,
        hold: StoredHold,
        fence: Option<Fence>,
    ) -> Result<Option<()>, Error> {
        Ok(self
            .write(HoldWrite::Release(hold), fence)
            .await?
            .map(|_| ()))
    }

    /// Stores `holds` released (unfenced: expiry), in the batches the
    /// writer makes of them and of what else is waiting; returns once all are
    /// committed, or the first error.
    pub async fn release_all(&self, holds: Vec<StoredHold>) -> Result<(), Error> {
        let mut answers = Vec::with_capacity(holds.len());
        for h in holds {
            let (reply, answer) = oneshot::channel();
            if self
                .tx
                .send((HoldWrite::Release(h), None, reply))
                .await
                .is_err()
            {
                return Err(stopped());
            }
            answers.push(answer);
        }
        for answer in answers {
            answer.await.unwrap_or_else(|_| Err(stopped()))?;
        }
        Ok(())
    }

    async fn write(&self, w: HoldWrite, fence: Option<Fence>) -> Inserted {
        let (reply, answer) = oneshot::channel();
        if self.tx.send((w, fence, reply)).await.is_err() {
            return Err(stopped());
        }
        answer.await.unwrap_or_else(|_| Err(stopped()))
    }
}

fn stopped() -> Error {
    Error::Cancelled("the hold writer has stopped".into())
}

/// How often the SQLite writer drops from the holds file what the store has
/// settled ([`HoldWriter::prune`]).
const PRUNE_EVERY: Duration = Duration::from_secs(1);

async fn write_sqlite(store: Store, mut rx: mpsc::Receiver<Request>) {
    // Opened at the first batch, and again after a batch failed.
    let mut writer: Option<HoldWriter> = None;
    let mut pruned = Instant::now();
    let mut batch: Vec<Request> = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let writes = writes_of(&batch);
        let prune = pruned.elapsed() >= PRUNE_EVERY;
        if prune {
            pruned = Instant::now();
        }
        let (w, s) = (writer.take(), store.clone());
        let (w, result) = tokio::task::spawn_blocking(move || {
            let mut w = match w.map_or_else(|| s.hold_writer(), Ok) {
                Ok(w) => w,
                Err(e) => return (None, Err(e)),
            };
            let result = s.write_holds(&mut w, &writes);
            if result.is_err() {
                return (None, result);
            }
            if prune {
                let now = chrono::Utc::now().timestamp();
                if let Err(e) = w.prune(now) {
                    tracing::warn!(error = %e, "settled holds not pruned from the holds file");
                }
            }
            (Some(w), result)
        })
        .await
        .unwrap_or_else(|e| (None, Err(Error::Task(e.to_string()))));
        writer = w;
        answer(batch.drain(..), result);
    }
}

async fn write_pooled(store: Store, mut rx: mpsc::Receiver<Request>, in_flight: usize) {
    let slots = Arc::new(Semaphore::new(in_flight));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch: Vec<Request> = Vec::with_capacity(MAX_BATCH);
        if rx.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        let store = store.clone();
        tokio::spawn(async move {
            commit(&store, batch).await;
            drop(slot);
        });
    }
}

fn writes_of(batch: &[Request]) -> Vec<(HoldWrite, Option<Fence>)> {
    let writes: Vec<_> = batch
        .iter()
        .map(|(w, f, _)| (w.clone(), f.clone()))
        .collect();
    metrics::counter!(crate::metrics::HOLD_COMMITS_TOTAL).increment(1);
    metrics::counter!(crate::metrics::HOLD_WRITES_TOTAL).increment(writes.len() as u64);
    writes
}

async fn commit(store: &Store, batch: Vec<Request>) {
    let writes = writes_of(&batch);
    let result = store.run(move |c| c.write_holds(&writes)).await;
    answer(batch.into_iter(), result);
}

/// Answers each request of a batch with what the store did.
fn answer(
    batch: impl Iterator<Item = Request>,
    result: Result<Vec<Option<Option<StoredHold>>>, Error>,
) {
    match result {
        Ok(found) => {
            for ((_, _, reply), found) in batch.zip(found) {
                let _ = reply.send(Ok(found));
            }
        }
        Err(e) => {
            let why = e.to_string();
            tracing::warn!(error = %why, "a batch of hold writes was not stored; each is refused");
            for (_, _, reply) in batch {
                let _ = reply.send(Err(Error::Cancelled(format!(
                    "the batch of hold writes was not stored: {why}"
                ))));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wallet::HoldStatus;

    fn hold(i: usize) -> StoredHold {
        StoredHold {
            account_sid: "AC00000000000000000000000000000c11".into(),
            call_id: format!("CA{i}"),
            amount: 300_000,
            status: HoldStatus::Reserved,
            created_at: 0,
            expires_at: 3_600,
            billing: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_holds_are_each_stored_once_and_repeats_find_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("sqlite://{}/t.db", dir.path().display())).unwrap();
        let commits = HoldCommits::start(store.clone());
        let tasks: Vec<_> = (0..2_000)
            .map(|i| {
                let c = commits.clone();
                // Every hundredth call id is sent twice.
                let id = if i % 100 == 99 { i - 1 } else { i };
                tokio::spawn(async move { c.insert(hold(id), None).await.unwrap().unwrap() })
            })
            .collect();
        let mut repeats = 0;
        for t in tasks {
            if let Some(first) = t.await.unwrap() {
                assert_eq!(first.status, HoldStatus::Reserved);
                repeats += 1;
            }
        }
        assert_eq!(repeats, 20);
        let stored = store.with_conn(|c| c.reserved_holds()).unwrap();
        assert_eq!(stored.len(), 1_980);
    }
}
