//! Group commit of granted holds: a hold is durable in the store before its
//! `201` leaves, but holds granted at the same time share one transaction.
//!
//! Requests hand their hold to one writer task and wait for its answer. The
//! writer takes every hold waiting (up to [`MAX_BATCH`]), writes them in one
//! transaction ([`crate::store::Conn::insert_holds`]) and answers each; holds
//! granted while it writes wait for the next round. A hold carries the fence
//! of its instance's ownership of the partition (none for a lone API); one
//! whose fence no longer holds is not stored (see [`crate::store::wallet`]). Under load a transaction
//! carries many holds, so the store's per-commit cost (a WAL append and, for
//! PostgreSQL, a round trip and a flush) is paid once per batch instead of
//! once per hold; alone, a hold waits for no one.

use tokio::sync::{mpsc, oneshot};

use crate::store::wallet::{Fence, StoredHold};
use crate::store::{Error, Store};

/// Most holds written in one transaction.
pub const MAX_BATCH: usize = 512;

/// What a hold's insert found: `Some(None)` if stored, `Some(Some(h))` with
/// the hold its call id already had, `None` if its fence no longer holds
/// (nothing stored).
pub type Inserted = Result<Option<Option<StoredHold>>, Error>;

type Request = (StoredHold, Option<Fence>, oneshot::Sender<Inserted>);

/// The handle requests use; cheap to clone.
#[derive(Clone, Debug)]
pub struct HoldCommits {
    tx: mpsc::Sender<Request>,
}

impl HoldCommits {
    /// Starts the writer on the current tokio runtime.
    pub fn start(store: Store) -> HoldCommits {
        let (tx, rx) = mpsc::channel(MAX_BATCH * 8);
        tokio::spawn(write(store, rx));
        HoldCommits { tx }
    }

    /// Stores `hold` with whatever else is waiting; returns once it is
    /// committed (or the store refused the batch).
    pub async fn insert(&self, hold: StoredHold, fence: Option<Fence>) -> Inserted {
        let (reply, answer) = oneshot::channel();
        if self.tx.send((hold, fence, reply)).await.is_err() {
            return Err(Error::Cancelled("the hold writer has stopped".into()));
        }
        answer
            .await
            .unwrap_or_else(|_| Err(Error::Cancelled("the hold writer has stopped".into())))
    }
}

async fn write(store: Store, mut rx: mpsc::Receiver<Request>) {
    let mut batch: Vec<Request> = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let holds: Vec<(StoredHold, Option<Fence>)> = batch
            .iter()
            .map(|(h, f, _)| (h.clone(), f.clone()))
            .collect();
        metrics::counter!(crate::metrics::HOLD_COMMITS_TOTAL).increment(1);
        match store.run(move |c| c.insert_holds(&holds)).await {
            Ok(found) => {
                for ((_, _, reply), found) in batch.drain(..).zip(found) {
                    let _ = reply.send(Ok(found));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, holds = batch.len(), "a batch of holds was not stored; each is refused");
                let why = e.to_string();
                for (_, _, reply) in batch.drain(..) {
                    let _ = reply.send(Err(Error::Cancelled(format!(
                        "the batch of holds was not stored: {why}"
                    ))));
                }
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
