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
//! The writers are OS threads of their own, each with its own connections
//! to the store ([`HoldWriter`]), taking turns at the channel: one gathers
//! a batch (blocking until a write comes, then taking whatever else waits)
//! and lets go of the channel to write it, and the writes that arrive
//! meanwhile are the next writer's batch. A writer answers each request of
//! its batch itself once it is committed. (A batch handed to tokio's
//! blocking pool took a hop there, another back to the writer's task before
//! any request was answered and, on PostgreSQL, a pooled connection checked
//! by a round trip per batch.)
//!
//! PostgreSQL has [`PG_IN_FLIGHT`] writers: while one waits for its commit's
//! WAL flush the next is already being written, and the rate is not one
//! batch per commit latency. Batches written at once may land in either
//! order; the writes are made so that order does not matter (a release
//! written before its grant stores the hold released, and the grant then
//! finds it; see [`crate::store::Conn::release_hold`]). SQLite has one
//! writer per file: one writer, writing into the holds file of the store
//! ([`crate::store::holds`]), so a batch never waits for a flush.
//!
//! A panic while a batch is written (a bug, in tallyd or below it) fails
//! that batch only: each of its requests is answered with a retryable
//! error, as when the store refuses a batch (their grants are revoked), the
//! writer's connections are opened anew, and the writer goes on with the
//! next batch. A panic anywhere else in a writer's loop restarts the loop.
//! Without this, the writer's thread ended, and every hold after it was
//! refused until a restart (SQLite has only the one writer).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

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

type Reply = oneshot::Sender<Inserted>;

type Request = (HoldWrite, Option<Fence>, Reply);

/// The handle requests use; cheap to clone.
#[derive(Clone, Debug)]
pub struct HoldCommits {
    tx: mpsc::Sender<Request>,
    #[cfg(test)]
    faults: Faults,
}

/// Faults the tests inject into the writers (nothing outside tests).
#[derive(Clone, Debug, Default)]
struct Faults {
    /// Batches still to panic in.
    #[cfg(test)]
    panics: Arc<std::sync::atomic::AtomicUsize>,
}

impl Faults {
    /// Panics if a test asked for it.
    fn check(&self) {
        #[cfg(test)]
        if self
            .panics
            .fetch_update(
                std::sync::atomic::Ordering::SeqCst,
                std::sync::atomic::Ordering::SeqCst,
                |n| n.checked_sub(1),
            )
            .is_ok()
        {
            panic!("a panic injected into the hold writer");
        }
    }
}

impl HoldCommits {
    /// Starts the writers' threads.
    pub fn start(store: Store) -> HoldCommits {
        let (tx, rx) = mpsc::channel(MAX_BATCH * 8);
        let writers = if store.is_sqlite() { 1 } else { PG_IN_FLIGHT };
        let rx = Arc::new(Mutex::new(rx));
        let faults = Faults::default();
        for i in 0..writers {
            let (store, rx, faults) = (store.clone(), rx.clone(), faults.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("tallyd-holds-{i}"))
                .spawn(move || supervise(&store, &rx, &faults));
            // With no writer at all, every write is refused as the writer's
            // having stopped.
            if let Err(e) = spawned {
                tracing::error!(error = %e, "a hold writer's thread did not start");
            }
        }
        HoldCommits {
            tx,
            #[cfg(test)]
            faults,
        }
    }

    /// Tests: the writers panic in the next `n` batches they write.
    #[cfg(test)]
    pub(crate) fn panic_in_next_batches(&self, n: usize) {
        self.faults
            .panics
            .store(n, std::sync::atomic::Ordering::SeqCst);
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
        // All handed over before any answer is awaited.
        let mut answers = Vec::with_capacity(holds.len());
        for h in holds {
            answers.push(self.send(HoldWrite::Release(h), None).await?);
        }
        for answer in answers {
            answered(answer).await?;
        }
        Ok(())
    }

    async fn write(&self, w: HoldWrite, fence: Option<Fence>) -> Inserted {
        answered(self.send(w, fence).await?).await
    }

    /// Hands a write to the writers; its answer comes on the receiver.
    async fn send(
        &self,
        w: HoldWrite,
        fence: Option<Fence>,
    ) -> Result<oneshot::Receiver<Inserted>, Error> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((w, fence, reply))
            .await
            .map_err(|_| stopped())?;
        Ok(answer)
    }
}

/// A write's answer (a writer gone before answering: stopped).
async fn answered(answer: oneshot::Receiver<Inserted>) -> Inserted {
    answer.await.unwrap_or_else(|_| Err(stopped()))
}

fn stopped() -> Error {
    Error::Cancelled("the hold writer has stopped".into())
}

/// How often a writer drops from the SQLite holds file what the store has
/// settled ([`HoldWriter::prune`]).
const PRUNE_EVERY: Duration = Duration::from_secs(1);

/// A writer idle this long checks its connections before the next batch (a
/// PostgreSQL server may have closed them meanwhile); a busy one does not.
const CHECK_AFTER_IDLE: Duration = Duration::from_secs(1);

/// Runs a writer's loop on its thread until every [`HoldCommits`] is
/// dropped, starting it again after a panic outside a batch's write (the
/// requests the loop held are then answered by their senders' being dropped:
/// refused as if the writer had stopped).
fn supervise(store: &Store, rx: &Mutex<mpsc::Receiver<Request>>, faults: &Faults) {
    while std::panic::catch_unwind(AssertUnwindSafe(|| write_batches(store, rx, faults))).is_err() {
        tracing::error!("a hold writer panicked; starting it again");
        // Not a busy loop if the panic comes back at once.
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A writer's loop, on its own thread; ends once every [`HoldCommits`] is
/// dropped.
fn write_batches(store: &Store, rx: &Mutex<mpsc::Receiver<Request>>, faults: &Faults) {
    // Opened at the first batch, and again after a batch failed.
    let mut writer: Option<HoldWriter> = None;
    let (mut pruned, mut used) = (Instant::now(), Instant::now());
    let mut batch: Vec<Request> = Vec::with_capacity(MAX_BATCH);
    loop {
        {
            let mut rx = rx.lock();
            let Some(first) = rx.blocking_recv() else {
                return;
            };
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
        }
        let (writes, replies) = split(&mut batch);
        let idle = std::mem::replace(&mut used, Instant::now()).elapsed();
        if idle >= CHECK_AFTER_IDLE && writer.as_mut().is_some_and(|w| !w.is_alive()) {
            tracing::info!("the hold writer's store connection was closed; replacing it");
            writer = None;
        }
        let mut w = match writer.take().map_or_else(|| store.hold_writer(), Ok) {
            Ok(w) => w,
            Err(e) => {
                answer(replies, Err(e));
                continue;
            }
        };
        // A panic fails the batch as a store error does.
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            faults.check();
            store.write_holds(&mut w, &writes)
        }))
        .unwrap_or_else(|panic| {
            let e = Err(panicked(&*panic));
            store.health().record(&e);
            e
        });
        // A writer whose batch failed may be mid-transaction: closed (rolled
        // back, its locks let go) before the retries its answers invite, and
        // opened anew for the next batch.
        if result.is_err() {
            drop(w);
            answer(replies, result);
            continue;
        }
        answer(replies, result);
        if pruned.elapsed() >= PRUNE_EVERY {
            pruned = Instant::now();
            if let Err(e) = w.prune(chrono::Utc::now().timestamp()) {
                tracing::warn!(error = %e, "settled holds not pruned from the holds file");
            }
        }
        writer = Some(w);
    }
}

/// The error a batch's requests get when its write panicked: retryable, as
/// the write may well succeed on the next try.
fn panicked(panic: &(dyn std::any::Any + Send)) -> Error {
    let what = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("no message");
    tracing::error!(panic = what, "the hold writer panicked writing a batch");
    Error::Cancelled(format!("the hold writer failed writing the batch ({what})"))
}

/// Takes a batch apart: its writes (for the store) and who waits for each.
fn split(batch: &mut Vec<Request>) -> (Vec<(HoldWrite, Option<Fence>)>, Vec<Reply>) {
    metrics::counter!(crate::metrics::HOLD_COMMITS_TOTAL).increment(1);
    metrics::counter!(crate::metrics::HOLD_WRITES_TOTAL).increment(batch.len() as u64);
    batch.drain(..).map(|(w, f, r)| ((w, f), r)).unzip()
}

/// Answers each request of a batch with what the store did.
fn answer(replies: Vec<Reply>, result: Result<Vec<Option<Option<StoredHold>>>, Error>) {
    match result {
        Ok(found) => {
            for (reply, found) in replies.into_iter().zip(found) {
                let _ = reply.send(Ok(found));
            }
        }
        Err(e) => {
            let why = e.to_string();
            tracing::warn!(error = %why, "a batch of hold writes was not stored; each is refused");
            for reply in replies {
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

    /// A writer keeps its connection between batches; one the server closed
    /// while the writer was idle is replaced before the next batch instead
    /// of failing it. Needs the server the test command starts
    /// (`TALLYD_TEST_POSTGRES_URL`, default the local one).
    #[test]
    fn a_connection_closed_while_the_writer_was_idle_is_replaced() {
        let (mut admin, schema, url) = crate::store::tests::pg_schema("hold_writer");
        // Its connections named, to close them from outside.
        let store = Store::open(&format!("{url}&application_name={schema}")).unwrap();
        let commits = HoldCommits::start(store.clone());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // One at a time, so the writers take them in turn: each has opened
        // its connection.
        let writes = 2 * PG_IN_FLIGHT;
        for i in 0..writes {
            let stored = rt.block_on(commits.insert(hold(i), None)).unwrap();
            assert_eq!(stored, Some(None));
        }
        let kill = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                    WHERE application_name = $1";
        let killed = admin.execute(kill, &[&schema]).unwrap();
        assert!(killed >= 1, "no connection of the writer to close");
        std::thread::sleep(CHECK_AFTER_IDLE + Duration::from_millis(200));
        for i in writes..2 * writes {
            let stored = rt.block_on(commits.insert(hold(i), None));
            assert_eq!(stored.unwrap(), Some(None), "a batch after the close");
        }
        let stored = store.with_conn(|c| c.reserved_holds()).unwrap();
        assert_eq!(stored.len(), 2 * writes);
        crate::store::tests::drop_schema(&mut admin, &schema);
    }
}
