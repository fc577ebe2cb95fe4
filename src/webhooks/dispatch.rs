//! The dispatcher: sends the outbox's callbacks ([`crate::store::outbox`]) at
//! least once, each with its stable idempotency token.
//!
//! Rows are written by the transaction that caused them (a flush that fired
//! a trigger or crossed a low balance), so ingestion never waits for a
//! receiver: it only inserts rows. The dispatcher, a task of its own, reads
//! due rows (`pending`, `next_attempt_at <= now`) when woken after such a
//! commit ([`DispatcherHandle::wake`]) and every second, claims each with a
//! compare-and-set on `next_attempt_at` — the claim moves it to the end of a
//! lease (one attempt's timeout plus a margin), so two instances never send one
//! row at once, and a row whose sender died is taken over when its lease ends —
//! sends it, and then marks it `delivered` (a 2xx answer) or due again after an
//! exponential backoff with full jitter (1 s doubling up to 10 min), until
//! `created_at + retry_for_secs`, when it is marked `failed` with the last
//! error. A refused callback (an address the policy forbids, an account or
//! webhook that is gone) fails at once: retrying cannot mend it.
//!
//! At most `max_in_flight` callbacks are in flight, and at most
//! `per_account_in_flight` of one account: the batch query leaves out the
//! accounts at their limit, so a receiver that hangs delays only its own
//! account's callbacks. Host names are resolved at every send and only the
//! addresses the policy allows are connected to (the check and the connection
//! use the same addresses: a name that re-resolves to an internal address
//! between the two cannot slip through). No proxy, no redirects.
//!
//! A flush that fires usage triggers while the consumers keep up writes their
//! rows already claimed by this instance ([`DispatcherHandle::lease_for_handoff`],
//! the same lease a claim takes, a few seconds longer) and hands them over
//! after its commit ([`DispatcherHandle::hand_over`]): they are sent at once,
//! with no read and no claim (on SQLite a claim is a write, and it waited for
//! the flush being written). A handed row whose lease no longer covers an
//! attempt when its turn comes (a flush that took long to commit) is claimed
//! again from that lease first.
//!
//! Rows that finished (delivered or failed) more than `keep_finished_secs`
//! ago are removed, their counts added to the per-day delivery counts the
//! statistics read ([`crate::store::Conn::prune_outbox`]), so the outbox does
//! not grow without end.
//!
//! While the consumers are far behind ([`Behind`]: draining a backlog, until
//! the flush of its last CDRs has landed) the dispatcher paces itself:
//! flushes hand nothing over, wake-ups are ignored, and it reads one batch a
//! second. Callbacks of a backlog are late anyway,
//! and sending them at full speed took the CPU the drain needed; once the
//! consumers catch up, what waits goes out at full speed. The dispatcher runs
//! on a runtime of its own at a lower CPU priority than the consumers
//! ([`runtime`]).
//!
//! A send's slot (its place among `max_in_flight` and its account's) is given
//! back when the receiver has answered; writing the result to the store
//! follows, batched with others ([`report`]), without holding the slot.
//!
//! While the store is down the dispatcher logs (throttled) and tries again at
//! the next poll; rows it could not report stay claimed until their lease
//! ends and are then retried.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rand::Rng;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::sign;
use super::url::{check_callback_url, refused_ip, UrlPolicy};
use super::WebhooksConfig;
use crate::log_throttle::LogThrottle;
use crate::metrics as m;
use crate::store::outbox::{DueRow, OutboxRow, KIND_USAGE_TRIGGER};
use crate::store::Store;

/// How often due rows are looked for without a wake-up.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Rows read per query.
const BATCH: i64 = 256;
/// Finished rows removed per store transaction.
const PRUNE_BATCH: i64 = 10_000;
/// Queries per round (a round ends early when no more rows are due).
const MAX_QUERIES: usize = 16;
/// The first retry's backoff ceiling; it doubles per attempt.
pub const FIRST_BACKOFF_MS: i64 = 1_000;
/// The backoff ceiling's cap.
pub const MAX_BACKOFF_MS: i64 = 600_000;
/// A claim's lease beyond the attempt's timeout: time to report the result.
const LEASE_MARGIN_MS: i64 = 2_000;
/// Tries at reporting an attempt's result to the store before leaving the
/// row to its lease.
const REPORT_TRIES: u32 = 5;
/// How much longer than a claim's lease a row handed over by a flush is
/// leased: the flush's commit and the wait for a free slot.
const HANDOFF_MS: i64 = 5_000;
/// Rows waiting for a slot beyond which flushes hand no more over (they
/// write them pending, for the poll).
const MAX_HANDED: usize = 4_096;
/// The CPU priority (nice) of the dispatcher's threads.
const NICE: i32 = 10;

/// Whether the consumers are far behind (see the module documentation).
pub type Behind = Arc<dyn Fn() -> bool + Send + Sync>;

/// The runtime the daemon runs the dispatcher on: one worker thread, and the
/// blocking threads its store calls run on, all at a lower CPU priority
/// (nice [`NICE`]) than the consumers. When the two compete for the CPU
/// (draining a backlog), ingestion goes first; at a steady rate the CPU has
/// room for both and callbacks are not held back.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("tallyd-webhooks")
        .on_thread_start(lower_priority)
        .enable_all()
        .build()
}

/// Lowers the calling thread's CPU priority to [`NICE`] (Linux; elsewhere
/// the whole process's would change, so nothing is done).
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: plain system calls on the calling thread's id.
        let r = unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::setpriority(libc::PRIO_PROCESS, tid, NICE)
        };
        if r != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "cannot lower the webhook thread's priority");
        }
    }
}

/// Why the dispatcher could not start.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error("cannot build the webhook HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// The dispatcher's shared state; see the module documentation.
pub struct Dispatcher {
    store: Store,
    cfg: WebhooksConfig,
    client: reqwest::Client,
    /// `max_in_flight` permits; a send holds one.
    permits: Arc<Semaphore>,
    /// Callbacks in flight (or about to be) per account.
    per_account: Mutex<HashMap<String, usize>>,
    wake: Notify,
    log: LogThrottle,
    /// Attempts' results, written to the store in batches ([`report`]).
    reports: tokio::sync::mpsc::UnboundedSender<(Report, tokio::sync::oneshot::Sender<bool>)>,
    /// Results of finished sends not written yet (their slots are free).
    reporting: std::sync::atomic::AtomicUsize,
    /// Rows flushes wrote claimed by this instance, waiting for a slot.
    handed: Mutex<std::collections::VecDeque<DueRow>>,
    /// Whether the consumers are far behind (`None`: never).
    behind: Option<Behind>,
}

/// Signing keys by (usage trigger or not, account SID); `None` for an
/// account (or webhook) that is gone.
type SigningKeys = HashMap<(bool, String), Option<String>>;

/// An attempt's result for the store.
struct Report {
    id: String,
    delivered: bool,
    lease: i64,
    next: Option<i64>,
    at: i64,
    error: Option<String>,
}

/// Writes attempts' results, every one waiting in one transaction (many
/// callbacks finish together under load; one transaction each made the
/// results queue behind the flushes on SQLite's single writer). Each is
/// answered whether it was written.
async fn report(
    store: Store,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<(Report, tokio::sync::oneshot::Sender<bool>)>,
) {
    let mut batch = Vec::with_capacity(256);
    while rx.recv_many(&mut batch, 256).await > 0 {
        let reports: Vec<Report> = batch
            .iter()
            .map(|(r, _): &(Report, _)| Report {
                id: r.id.clone(),
                delivered: r.delivered,
                lease: r.lease,
                next: r.next,
                at: r.at,
                error: r.error.clone(),
            })
            .collect();
        let written = store
            .run(move |c| {
                // In id order, as every change of several rows locks them.
                let mut reports = reports;
                reports.sort_unstable_by(|a, b| a.id.cmp(&b.id));
                c.transaction(|c| {
                    for r in &reports {
                        if r.delivered {
                            c.outbox_delivered(&r.id, r.at)?;
                        } else {
                            let e = r.error.as_deref().unwrap_or("");
                            c.outbox_attempt_failed(&r.id, r.lease, r.next, r.at, e)?;
                        }
                    }
                    Ok(())
                })
            })
            .await;
        if let Err(e) = &written {
            tracing::debug!(error = %e, reports = batch.len(), "callback results not written; each is tried again");
        }
        for (_, reply) in batch.drain(..) {
            let _ = reply.send(written.is_ok());
        }
    }
}

/// The running dispatcher: wake it, wait for it to stop. Cheap to clone.
#[derive(Clone)]
pub struct DispatcherHandle {
    inner: Arc<Dispatcher>,
    task: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl DispatcherHandle {
    /// Looks for due rows now instead of at the next poll: call it after a
    /// commit that wrote outbox rows. Cheap, never blocks, callable from any
    /// thread (async or not); wake-ups while a round runs make one more round.
    pub fn wake(&self) {
        self.inner.wake.notify_one();
    }

    /// Callbacks being sent now.
    pub fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }

    /// The time until which a flush committing now should write the
    /// callbacks it fires claimed by this instance, to hand them over after
    /// its commit ([`Self::hand_over`]); `None` while the dispatcher paces
    /// itself (the consumers are far behind) or has many rows waiting
    /// already: then they are written pending, for its reads.
    pub fn lease_for_handoff(&self) -> Option<i64> {
        let d = &self.inner;
        if d.is_behind() || d.handed.lock().len() >= MAX_HANDED {
            return None;
        }
        Some(now_ms() + HANDOFF_MS + d.lease_ms())
    }

    /// Sends `rows` now: a committed transaction wrote them claimed by this
    /// instance until `lease_until` (from [`Self::lease_for_handoff`]).
    pub fn hand_over(&self, rows: Vec<OutboxRow>, lease_until: i64) {
        if rows.is_empty() {
            return;
        }
        self.inner
            .handed
            .lock()
            .extend(rows.into_iter().map(|row| DueRow {
                row,
                attempts: 0,
                next_attempt_at: lease_until,
            }));
        self.wake();
    }

    /// Waits until the dispatcher has stopped (after `shutdown` was set):
    /// it claims nothing more and waits for the sends in flight, at most
    /// one attempt's timeout.
    pub async fn join(&self) {
        let task = self.task.lock().take();
        if let Some(t) = task {
            let _ = t.await;
        }
    }
}

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Attempt {
    /// The receiver answered 2xx.
    Delivered,
    /// It may work later (the receiver is down, slow or answered an error).
    Retry(String),
    /// It can never work (a refused address, a gone account).
    Refused(String),
}

impl Dispatcher {
    /// Starts the dispatcher on the current tokio runtime (call it from within
    /// one); it runs until `shutdown` is set.
    pub fn start(
        store: Store,
        cfg: WebhooksConfig,
        shutdown: Arc<AtomicBool>,
    ) -> Result<DispatcherHandle, DispatchError> {
        Self::start_paced(store, cfg, shutdown, None)
    }

    /// [`Self::start`], pacing itself while `behind` says the consumers are
    /// far behind.
    pub fn start_paced(
        store: Store,
        cfg: WebhooksConfig,
        shutdown: Arc<AtomicBool>,
        behind: Option<Behind>,
    ) -> Result<DispatcherHandle, DispatchError> {
        let timeout = Duration::from_millis(cfg.timeout_ms.max(1));
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .user_agent(concat!("tallyd/", env!("CARGO_PKG_VERSION")))
            .dns_resolver(Arc::new(CheckedResolver {
                policy: cfg.url_policy(),
            }))
            .build()?;
        let (reports, reported) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(report(store.clone(), reported));
        let inner = Arc::new(Dispatcher {
            reports,
            store,
            permits: Arc::new(Semaphore::new(cfg.max_in_flight.max(1))),
            per_account: Mutex::new(HashMap::new()),
            cfg,
            client,
            wake: Notify::new(),
            log: LogThrottle::default(),
            reporting: Default::default(),
            handed: Default::default(),
            behind,
        });
        metrics::gauge!(m::WEBHOOKS_IN_FLIGHT).set(0.0);
        let task = tokio::spawn(inner.clone().run(shutdown));
        Ok(DispatcherHandle {
            inner,
            task: Arc::new(Mutex::new(Some(task))),
        })
    }

    fn max_in_flight(&self) -> usize {
        self.cfg.max_in_flight.max(1)
    }

    fn in_flight(&self) -> usize {
        self.max_in_flight() - self.permits.available_permits()
    }

    /// How long a claim lasts: one attempt and the report of its result.
    fn lease_ms(&self) -> i64 {
        self.cfg.timeout_ms as i64 + LEASE_MARGIN_MS
    }

    fn is_behind(&self) -> bool {
        self.behind.as_ref().is_some_and(|b| b())
    }

    async fn run(self: Arc<Self>, shutdown: Arc<AtomicBool>) {
        let mut depth_at: Option<Instant> = None;
        let mut pruned_at: Option<Instant> = None;
        while !shutdown.load(Ordering::Relaxed) {
            // Far behind: one batch a second, wake-ups ignored.
            let paced = self.is_behind();
            self.send_handed().await;
            self.dispatch_due(if paced { 1 } else { MAX_QUERIES }).await;
            metrics::gauge!(m::WEBHOOKS_IN_FLIGHT).set(self.in_flight() as f64);
            if depth_at.map_or(true, |t| t.elapsed() >= POLL_INTERVAL) {
                self.report_depth().await;
                depth_at = Some(Instant::now());
            }
            if let Some(every) = self.prune_every() {
                if !paced && pruned_at.map_or(true, |t| t.elapsed() >= every) {
                    self.prune().await;
                    pruned_at = Some(Instant::now());
                }
            }
            let until = Instant::now() + POLL_INTERVAL;
            while !shutdown.load(Ordering::Relaxed) && Instant::now() < until {
                tokio::select! {
                    _ = self.wake.notified(), if !paced => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
                if paced && !self.is_behind() {
                    break;
                }
            }
        }
        // Let the sends in flight finish and their results be written.
        let all = self.max_in_flight() as u32;
        let wait = Duration::from_millis(self.lease_ms() as u64);
        let _ = tokio::time::timeout(wait, async {
            let _all = self.permits.acquire_many(all).await;
            while self.reporting.load(Ordering::Acquire) > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        tracing::info!("webhook dispatcher stopped");
    }

    /// Starts sending the rows flushes handed over, as many as there are
    /// slots for. A row whose lease no longer covers an attempt (its flush
    /// took long to commit) is claimed again first, from that lease; if the
    /// lease had ended and the row was claimed meanwhile (by this instance's
    /// poll or another instance), that claim sends it.
    async fn send_handed(self: &Arc<Self>) {
        let per_account = self.cfg.per_account_in_flight.max(1);
        let mut chosen: Vec<DueRow> = Vec::new();
        {
            let mut handed = self.handed.lock();
            if handed.is_empty() {
                return;
            }
            let mut accounts = self.per_account.lock();
            let free = self.permits.available_permits();
            let mut waiting = std::collections::VecDeque::with_capacity(handed.len());
            for due in handed.drain(..) {
                let n = accounts.entry(due.row.account_sid.clone()).or_default();
                if chosen.len() >= free || *n >= per_account {
                    waiting.push_back(due);
                    continue;
                }
                *n += 1;
                chosen.push(due);
            }
            accounts.retain(|_, n| *n > 0);
            *handed = waiting;
        }
        let now = now_ms();
        let (short, mut chosen): (Vec<DueRow>, Vec<DueRow>) = chosen
            .into_iter()
            .partition(|d| d.next_attempt_at - now < self.lease_ms());
        if !short.is_empty() {
            let lease = now + self.lease_ms();
            let claimed = self.claim(&short, lease).await.unwrap_or_else(|e| {
                self.store_failed("claiming callbacks again", &e);
                vec![false; short.len()]
            });
            for (mut due, mine) in short.into_iter().zip(claimed) {
                if mine {
                    due.next_attempt_at = lease;
                    chosen.push(due);
                } else {
                    self.release_account(&due.row.account_sid);
                }
            }
        }
        if chosen.is_empty() {
            return;
        }
        let keys = match self.signing_keys(chosen.iter().map(|d| &d.row)).await {
            Ok(k) => k,
            Err(e) => {
                // Not sent: the rows are due again when their lease ends.
                for d in &chosen {
                    self.release_account(&d.row.account_sid);
                }
                return self.store_failed("reading callbacks' signing keys", &e);
            }
        };
        for due in chosen {
            let lease = due.next_attempt_at;
            self.send(due, lease, &keys);
        }
    }

    /// Claims `rows` until `lease`, each from the `next_attempt_at` it was
    /// read (or handed over) with ([`crate::store::Conn::claim_outbox`]).
    async fn claim(&self, rows: &[DueRow], lease: i64) -> crate::store::Result<Vec<bool>> {
        let claims: Vec<(String, i64)> = rows
            .iter()
            .map(|r| (r.row.id.clone(), r.next_attempt_at))
            .collect();
        self.store
            .run(move |c| {
                let refs: Vec<(&str, i64)> =
                    claims.iter().map(|(id, at)| (id.as_str(), *at)).collect();
                c.claim_outbox(&refs, lease)
            })
            .await
    }

    /// The signing keys of `rows`' accounts, read in one query per kind
    /// (not per callback).
    async fn signing_keys<'r>(
        &self,
        rows: impl Iterator<Item = &'r OutboxRow>,
    ) -> crate::store::Result<Arc<SigningKeys>> {
        let mut wanted: HashMap<bool, (String, Vec<String>)> = HashMap::new();
        for r in rows {
            let class = r.kind == KIND_USAGE_TRIGGER;
            let (_, accounts) = wanted
                .entry(class)
                .or_insert_with(|| (r.kind.clone(), Vec::new()));
            accounts.push(r.account_sid.clone());
        }
        let keys = self
            .store
            .run(move |c| {
                let mut keys = SigningKeys::new();
                for (class, (kind, accounts)) in wanted {
                    let refs: Vec<&str> = accounts.iter().map(String::as_str).collect();
                    let mut found = c.signing_keys(&kind, &refs)?;
                    for a in accounts {
                        let key = found.remove(&a);
                        keys.entry((class, a)).or_insert(key);
                    }
                }
                Ok(keys)
            })
            .await?;
        Ok(Arc::new(keys))
    }

    /// Starts sending `due`, claimed until `lease`, with its account's slot
    /// reserved already (given back here if no send starts).
    fn send(self: &Arc<Self>, due: DueRow, lease: i64, keys: &SigningKeys) {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            // Never (slots were counted under the lock): the row is retried
            // when its lease ends.
            self.release_account(&due.row.account_sid);
            return;
        };
        let slot = Slot {
            dispatcher: self.clone(),
            account: due.row.account_sid.clone(),
            permit: Some(permit),
        };
        metrics::gauge!(m::WEBHOOKS_IN_FLIGHT).set(self.in_flight() as f64);
        let key = keys
            .get(&(
                due.row.kind == KIND_USAGE_TRIGGER,
                due.row.account_sid.clone(),
            ))
            .cloned()
            .flatten();
        tokio::spawn(self.clone().deliver(due, lease, slot, key));
    }

    /// Claims and starts sending every due row there is room for, reading
    /// at most `queries` batches.
    async fn dispatch_due(self: &Arc<Self>, queries: usize) {
        let per_account = self.cfg.per_account_in_flight.max(1);
        for _ in 0..queries {
            let free = self.permits.available_permits();
            // With sends in flight, wait until a quarter of the slots are
            // free: each round costs a read, a claim and a key read, which
            // one finished send at a time would pay per callback.
            if free == 0 || (free < self.max_in_flight().div_ceil(4) && self.in_flight() > 0) {
                return;
            }
            let skip: Vec<String> = self
                .per_account
                .lock()
                .iter()
                .filter(|(_, n)| **n >= per_account)
                .map(|(a, _)| a.clone())
                .collect();
            let now = now_ms();
            let rows = match self
                .store
                .run(move |c| c.due_outbox(now, BATCH, &skip))
                .await
            {
                Ok(rows) => rows,
                Err(e) => return self.store_failed("reading due callbacks", &e),
            };
            let more = rows.len() as i64 == BATCH;
            // Reserve account slots for the rows taken (released when sent).
            let mut chosen: Vec<DueRow> = Vec::new();
            let mut left = false;
            {
                let mut accounts = self.per_account.lock();
                for r in rows {
                    if chosen.len() >= free {
                        left = true;
                        break;
                    }
                    let n = accounts.entry(r.row.account_sid.clone()).or_default();
                    if *n >= per_account {
                        left = true;
                        continue;
                    }
                    *n += 1;
                    chosen.push(r);
                }
            }
            if chosen.is_empty() {
                return;
            }
            let lease = now_ms() + self.lease_ms();
            let claimed = match self.claim(&chosen, lease).await {
                Ok(v) => v,
                Err(e) => {
                    for r in &chosen {
                        self.release_account(&r.row.account_sid);
                    }
                    return self.store_failed("claiming callbacks", &e);
                }
            };
            let mine: Vec<&OutboxRow> = chosen
                .iter()
                .zip(&claimed)
                .filter(|(_, mine)| **mine)
                .map(|(d, _)| &d.row)
                .collect();
            let keys = match self.signing_keys(mine.into_iter()).await {
                Ok(k) => k,
                Err(e) => {
                    // Claimed but not sent: the rows are due again when
                    // their lease ends.
                    for r in &chosen {
                        self.release_account(&r.row.account_sid);
                    }
                    return self.store_failed("reading callbacks' signing keys", &e);
                }
            };
            for (due, mine) in chosen.into_iter().zip(claimed) {
                if mine {
                    self.send(due, lease, &keys);
                } else {
                    // Claimed by another instance meanwhile.
                    self.release_account(&due.row.account_sid);
                }
            }
            if !more && !left {
                return;
            }
        }
    }

    fn release_account(&self, account: &str) {
        let mut accounts = self.per_account.lock();
        if let Some(n) = accounts.get_mut(account) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                accounts.remove(account);
            }
        }
    }

    /// Sends one claimed row and reports the result.
    async fn deliver(self: Arc<Self>, due: DueRow, lease: i64, slot: Slot, key: Option<String>) {
        // The lease must outlast the attempt, or the row may be claimed and
        // sent elsewhere while this one is in flight (a stall between the
        // claim and here: the key read, a loaded machine). Not sent: it is
        // due again when its lease ends.
        if lease - now_ms() < self.cfg.timeout_ms as i64 {
            drop(slot);
            return;
        }
        let outcome = self.attempt(&due, key).await;
        // The receiver is done: its slot is free while the result is written.
        self.reporting.fetch_add(1, Ordering::AcqRel);
        drop(slot);
        let row = &due.row;
        let now = now_ms();
        let (label, next, error) = match &outcome {
            Attempt::Delivered => ("delivered", None, None),
            // Stored failed (it never will work), counted apart from
            // receivers that stayed down for the retry period: a tenant's
            // bad URL is not an outage of theirs for the operator.
            Attempt::Refused(e) => ("refused", None, Some(e.clone())),
            Attempt::Retry(e) => {
                let deadline = row
                    .created_at
                    .saturating_add(self.cfg.retry_for_secs.saturating_mul(1000) as i64);
                if now >= deadline {
                    (
                        "failed",
                        None,
                        Some(format!(
                            "{e} (gave up after retrying for {} s)",
                            self.cfg.retry_for_secs
                        )),
                    )
                } else {
                    let next =
                        (now + backoff_ms(due.attempts + 1, &mut rand::thread_rng())).min(deadline);
                    ("retried", Some(next), Some(e.clone()))
                }
            }
        };
        metrics::counter!(m::WEBHOOK_DELIVERIES_TOTAL, "outcome" => label).increment(1);
        match (&outcome, &error) {
            (Attempt::Delivered, _) => {
                tracing::debug!(id = %row.id, kind = %row.kind, "callback delivered")
            }
            (_, Some(e)) if next.is_none() => {
                tracing::warn!(id = %row.id, kind = %row.kind, account = %row.account_sid,
                    error = %e, "callback failed for good")
            }
            (_, e) => tracing::debug!(id = %row.id, error = ?e, "callback will be retried"),
        }
        for i in 0..REPORT_TRIES {
            let (done, written) = tokio::sync::oneshot::channel();
            let report = Report {
                id: row.id.clone(),
                delivered: outcome == Attempt::Delivered,
                lease,
                next,
                at: now,
                error: error.clone(),
            };
            if self.reports.send((report, done)).is_err() || written.await != Ok(true) {
                if let Some(repeats) = self
                    .log
                    .admit("reporting a callback's result", Instant::now())
                {
                    tracing::warn!(id = %row.id, repeats, "webhook dispatcher: the store did not take a callback's result; trying again");
                }
                tokio::time::sleep(Duration::from_millis(200 << i)).await;
                continue;
            }
            break;
        }
        self.reporting.fetch_sub(1, Ordering::AcqRel);
    }

    /// One attempt at `due`.
    async fn attempt(&self, due: &DueRow, key: Option<String>) -> Attempt {
        let row = &due.row;
        let trigger = row.kind == KIND_USAGE_TRIGGER;
        let url = match check_callback_url(&row.url, self.cfg.url_policy()) {
            Ok(u) => u,
            Err(why) => return Attempt::Refused(format!("the callback URL {why}")),
        };
        let key = match key {
            Some(k) => k,
            None if trigger => {
                return Attempt::Refused(format!("account {} no longer exists", row.account_sid))
            }
            None => {
                return Attempt::Refused(format!(
                    "account {} no longer has a webhook",
                    row.account_sid
                ))
            }
        };
        let request = match build_request(&self.client, row, url, &key) {
            Ok(r) => r,
            Err(why) => return Attempt::Refused(why),
        };
        if trigger && due.attempts == 0 {
            let ms = (now_ms() - row.created_at).max(0) as u64;
            m::TRIGGER_CROSSING_TO_CALLBACK.record(Duration::from_millis(ms));
        }
        let timeout = Duration::from_millis(self.cfg.timeout_ms.max(1));
        match tokio::time::timeout(timeout, request.send()).await {
            Err(_) => Attempt::Retry(format!("timed out after {} ms", self.cfg.timeout_ms)),
            Ok(Ok(res)) if res.status().is_success() => Attempt::Delivered,
            Ok(Ok(res)) => Attempt::Retry(format!("HTTP {}", res.status().as_u16())),
            Ok(Err(e)) => classify(&e, self.cfg.timeout_ms),
        }
    }

    /// How often finished rows are looked for: a tenth of the time they are
    /// kept, between a second and an hour; `None` if they are all kept.
    fn prune_every(&self) -> Option<Duration> {
        (self.cfg.keep_finished_secs > 0)
            .then(|| Duration::from_secs((self.cfg.keep_finished_secs / 10).clamp(1, 3_600)))
    }

    /// Removes the rows finished longer than `keep_finished_secs` ago (their
    /// counts kept for the delivery stats), a batch per transaction.
    async fn prune(&self) {
        let keep_ms =
            i64::try_from(self.cfg.keep_finished_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        let before = now_ms().saturating_sub(keep_ms);
        let pruned = self
            .store
            .run(move |c| {
                let mut pruned = 0;
                loop {
                    let n = c.prune_outbox(before, PRUNE_BATCH)?;
                    pruned += n;
                    if n < PRUNE_BATCH as u64 {
                        return Ok(pruned);
                    }
                }
            })
            .await;
        match pruned {
            Ok(n) => metrics::counter!(m::WEBHOOK_OUTBOX_PRUNED_TOTAL).increment(n),
            Err(e) => self.store_failed("removing finished callbacks", &e),
        }
    }

    /// Sets the outbox depth gauge.
    async fn report_depth(&self) {
        match self.store.run(|c| c.outbox_pending()).await {
            Ok(n) => metrics::gauge!(m::WEBHOOK_OUTBOX_PENDING).set(n as f64),
            Err(e) => self.store_failed("counting pending callbacks", &e),
        }
    }

    fn store_failed(&self, doing: &str, e: &crate::store::Error) {
        if let Some(repeats) = self.log.admit(&format!("{doing}: {e}"), Instant::now()) {
            tracing::warn!(error = %e, repeats, "webhook dispatcher: {doing} failed; trying again later");
        }
    }
}

/// A send's hold on the global and per-account limits, given back when the
/// send is over (even if its task ends early).
struct Slot {
    dispatcher: Arc<Dispatcher>,
    account: String,
    permit: Option<OwnedSemaphorePermit>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.dispatcher.release_account(&self.account);
        // The permit first, then the wake-up: a round woken before the
        // permit is back would not see the slot free.
        drop(self.permit.take());
        metrics::gauge!(m::WEBHOOKS_IN_FLIGHT).set(self.dispatcher.in_flight() as f64);
        // A slot is free: take the next due rows now, not at the next poll.
        self.dispatcher.wake.notify_one();
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The wait before attempt `attempts + 1`, after `attempts` failed ones: full
/// jitter, uniform in `[0, ceiling]`, the ceiling 1 s doubling per attempt up
/// to 10 min (so receivers that come back are not hit by every sender at once).
pub fn backoff_ms(attempts: i64, rng: &mut impl Rng) -> i64 {
    let doublings = (attempts - 1).clamp(0, 20) as u32;
    let ceiling = (FIRST_BACKOFF_MS << doublings).min(MAX_BACKOFF_MS);
    rng.gen_range(0..=ceiling)
}

/// The request for `row`, signed with `key`; an error says why it cannot be
/// made.
fn build_request(
    client: &reqwest::Client,
    row: &crate::store::outbox::OutboxRow,
    mut url: ::url::Url,
    key: &str,
) -> Result<reqwest::RequestBuilder, String> {
    url.set_fragment(None);
    if row.kind != KIND_USAGE_TRIGGER {
        // A wallet event: the JSON body, signed with the webhook's secret.
        return Ok(client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(sign::TALLYD_EVENT_ID, &row.id)
            .header(
                sign::TALLYD_SIGNATURE,
                sign::tallyd_signature(key, row.body.as_bytes()),
            )
            .body(row.body.clone()));
    }
    // A firing's outbox row keeps what its parameters are rendered from.
    let params =
        crate::triggers::callback::form_body(&row.body, &row.account_sid, &row.source_sid, &row.id);
    let builder = match row.method.as_str() {
        "GET" => {
            // The parameters go in the query; the signature covers the full URL.
            let sep = if url.query().is_some() { '&' } else { '?' };
            let full = format!("{url}{sep}{params}");
            let full = ::url::Url::parse(&full)
                .map_err(|e| format!("the callback URL with its parameters is not valid ({e})"))?;
            let signature = sign::twilio_signature(key, full.as_str(), &[]);
            client.get(full).header(sign::TWILIO_SIGNATURE, signature)
        }
        "POST" => {
            let pairs: Vec<(String, String)> = serde_urlencoded::from_str(&params)
                .map_err(|e| format!("the callback's parameters do not decode ({e})"))?;
            let signature = sign::twilio_signature(key, url.as_str(), &pairs);
            client
                .post(url)
                .header(
                    reqwest::header::CONTENT_TYPE,
                    "application/x-www-form-urlencoded",
                )
                .header(sign::TWILIO_SIGNATURE, signature)
                .body(params)
        }
        other => return Err(format!("method {other:?} is neither GET nor POST")),
    };
    Ok(builder.header(sign::TWILIO_IDEMPOTENCY_TOKEN, &row.id))
}

/// What a failed request means: refused (an address the policy forbids) or
/// worth retrying, with a short reason ("connection refused", "timed out").
fn classify(e: &reqwest::Error, timeout_ms: u64) -> Attempt {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut innermost = e.to_string();
    while let Some(s) = source {
        if let Some(r) = s.downcast_ref::<RefusedAddress>() {
            return Attempt::Refused(r.to_string());
        }
        let text = s.to_string();
        if text.contains(REFUSED_MARK) {
            return Attempt::Refused(text);
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as K;
            let short = match io.kind() {
                K::ConnectionRefused => Some("connection refused"),
                K::ConnectionReset => Some("connection reset"),
                K::ConnectionAborted => Some("connection aborted"),
                K::TimedOut => Some("timed out"),
                _ => None,
            };
            if let Some(short) = short {
                return Attempt::Retry(short.to_owned());
            }
        }
        innermost = text;
        source = s.source();
    }
    if e.is_timeout() {
        return Attempt::Retry(format!("timed out after {timeout_ms} ms"));
    }
    Attempt::Retry(innermost)
}

/// Words every [`RefusedAddress`] message has, to recognise one whose type
/// was lost on its way through the HTTP client's error chain.
const REFUSED_MARK: &str = "which callbacks may not reach";

/// A host whose every address the policy forbids.
#[derive(Debug)]
struct RefusedAddress {
    host: String,
    ip: IpAddr,
    why: &'static str,
}

impl std::fmt::Display for RefusedAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} resolves to {} ({}), {REFUSED_MARK} unless [webhooks] allows it",
            self.host, self.why, self.ip
        )
    }
}

impl std::error::Error for RefusedAddress {}

/// Resolves host names for the client and keeps only the addresses the
/// policy allows: the client connects to exactly what was checked.
struct CheckedResolver {
    policy: UrlPolicy,
}

impl reqwest::dns::Resolve for CheckedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refused = None;
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| match refused_ip(a.ip(), policy) {
                    None => true,
                    Some(why) => {
                        refused.get_or_insert((a.ip(), why));
                        false
                    }
                })
                .collect();
            if allowed.is_empty() {
                return Err(match refused {
                    Some((ip, why)) => Box::new(RefusedAddress { host, ip, why }) as _,
                    None => format!("{host} has no address").into(),
                });
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn backoff_doubles_to_the_cap_with_full_jitter() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        for (attempts, ceiling) in [
            (1, 1_000),
            (2, 2_000),
            (5, 16_000),
            (11, 600_000),
            (60, 600_000),
        ] {
            let waits: Vec<i64> = (0..2000).map(|_| backoff_ms(attempts, &mut rng)).collect();
            assert!(
                waits.iter().all(|w| (0..=ceiling).contains(w)),
                "{attempts}"
            );
            // Spread over the whole range, not bunched at the ceiling.
            assert!(waits.iter().any(|w| *w < ceiling / 4), "{attempts}");
            assert!(waits.iter().any(|w| *w > ceiling * 3 / 4), "{attempts}");
        }
    }

    /// The resolver keeps only allowed addresses and names the refused one.
    #[tokio::test]
    async fn resolution_to_a_refused_address_fails_by_name() {
        use reqwest::dns::Resolve;
        use std::str::FromStr;
        let name = || reqwest::dns::Name::from_str("localhost").unwrap();
        let strict = CheckedResolver {
            policy: UrlPolicy::default(),
        };
        let e = match strict.resolve(name()).await {
            Ok(_) => panic!("localhost resolved under a policy refusing loopback"),
            Err(e) => e,
        };
        let text = e.to_string();
        assert!(
            text.starts_with("localhost resolves to a loopback address"),
            "{text}"
        );
        assert!(text.contains(REFUSED_MARK));
        let lenient = CheckedResolver {
            policy: UrlPolicy {
                allow_loopback: true,
                allow_private: false,
            },
        };
        let addrs: Vec<SocketAddr> = match lenient.resolve(name()).await {
            Ok(a) => a.collect(),
            Err(e) => panic!("{e}"),
        };
        assert!(!addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback()));
    }

    fn row(kind: &str, method: &str, url: &str, body: &str) -> crate::store::outbox::OutboxRow {
        crate::store::outbox::OutboxRow {
            id: "tok1".into(),
            account_sid: "AC1".into(),
            kind: kind.into(),
            source_sid: "UT1".into(),
            url: url.into(),
            method: method.into(),
            body: body.into(),
            created_at: 0,
        }
    }

    #[test]
    fn requests_are_signed_as_their_receivers_check() {
        let client = reqwest::Client::new();
        let body = "AccountSid=AC1&CurrentValue=10&UsageCategory=calls";
        let url = "https://example.com/cb?x=1#frag";
        let get = build_request(
            &client,
            &row(KIND_USAGE_TRIGGER, "GET", url, body),
            ::url::Url::parse(url).unwrap(),
            "tok",
        )
        .unwrap()
        .build()
        .unwrap();
        let full = "https://example.com/cb?x=1&AccountSid=AC1&CurrentValue=10&UsageCategory=calls";
        assert_eq!(get.url().as_str(), full);
        assert_eq!(
            get.headers()[sign::TWILIO_SIGNATURE],
            sign::twilio_signature("tok", full, &[]).as_str()
        );
        assert_eq!(get.headers()[sign::TWILIO_IDEMPOTENCY_TOKEN], "tok1");
        assert!(get.body().is_none());

        let post = build_request(
            &client,
            &row(KIND_USAGE_TRIGGER, "POST", url, body),
            ::url::Url::parse(url).unwrap(),
            "tok",
        )
        .unwrap()
        .build()
        .unwrap();
        let params = vec![
            ("AccountSid".to_owned(), "AC1".to_owned()),
            ("CurrentValue".to_owned(), "10".to_owned()),
            ("UsageCategory".to_owned(), "calls".to_owned()),
        ];
        assert_eq!(post.url().as_str(), "https://example.com/cb?x=1");
        assert_eq!(
            post.headers()[sign::TWILIO_SIGNATURE],
            sign::twilio_signature("tok", "https://example.com/cb?x=1", &params).as_str()
        );

        let event = r#"{"id":"evt_1"}"#;
        let wallet = build_request(
            &client,
            &row("wallet.low_balance", "POST", url, event),
            ::url::Url::parse(url).unwrap(),
            "secret",
        )
        .unwrap()
        .build()
        .unwrap();
        assert_eq!(
            wallet.headers()[sign::TALLYD_SIGNATURE],
            sign::tallyd_signature("secret", event.as_bytes()).as_str()
        );
        assert_eq!(wallet.headers()[sign::TALLYD_EVENT_ID], "tok1");
        assert_eq!(wallet.headers()["content-type"], "application/json");

        let bad = build_request(
            &client,
            &row(KIND_USAGE_TRIGGER, "PUT", url, body),
            ::url::Url::parse(url).unwrap(),
            "tok",
        );
        assert!(bad.unwrap_err().contains("PUT"));
    }
}
