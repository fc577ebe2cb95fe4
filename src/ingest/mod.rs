//! Kafka ingestion: a consumer thread that runs the hot path.
//!
//! The daemon runs `kafka.consumers` of these, each with its own partitions,
//! connection and thread, handing its flushes to a flusher (with SQLite one for
//! all consumers, with PostgreSQL one of its own; see `daemon`). Only the first is
//! a member of the consumer group; it shares what the group assigns it with the
//! others (see [`share`]). Each thread polls an rdkafka `BaseConsumer` in batches of up to 128
//! messages and runs each batch through [`pipeline::ingest_batch`] inline (decode →
//! dedup → rate → counters); rejected messages go to the dead-letter producer.
//! Because this thread is the only writer of its partitions' state, it takes the
//! flush snapshot itself — counter deltas, the offsets they came from and the newly
//! seen dedup ids — which makes the cut consistent without a lock on
//! the hot path. The flusher writes it in one transaction while consumption goes on.
//!
//! Offsets are never taken from Kafka: on assignment the consumer loads the stored
//! offsets and dedup windows and assigns at exactly those positions; on revocation
//! it flushes what it has and drops all local state (docs/design.md, invariant 1). The
//! load runs off the rebalance callback, which only starts it (see [`assign`]). Offsets are
//! also committed to Kafka after each flush, but only so that lag tools work.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::ClientContext;

use crate::calendar::Day;
use crate::cdr::RejectReason;
use crate::counters::Deltas;
use crate::dead_letter::{DeadLetters, Source};
use crate::dedup::{unpack, DedupWindow};
use crate::fetch_queue::{BatchConsumer, Fetched, Record};
use crate::flush::{FlushResult, Flushed, Job, PartitionCut, Snapshot};
use crate::log_throttle::LogThrottle;
use crate::metrics::LocalSummary;
use crate::pipeline::Debit;
use crate::pipeline::{ingest_batch, Outcome};
use crate::rating::Tariff;
use crate::store::{DedupRows, FlushOutcome, OffsetAdvance};
use crate::triggers::watch::{Gains, Watches};

mod assign;
mod share;
use assign::{LoadSettings, Loading, Stored};
use share::Control;
pub use share::{Crew, Seat};

/// Settings of the consumer loop.
#[derive(Debug, Clone)]
pub struct IngestSettings {
    pub topic: String,
    /// Where stored offsets and dedup windows are loaded from on assignment.
    pub store: crate::store::Store,
    /// The group member's static membership id (`group.instance.id`); see
    /// [`instance_id`].
    pub instance_id: Option<String>,
    pub flush_interval: Duration,
    /// The longest share of time the flusher may spend writing: after a flush
    /// that took D, the next one waits at least D / share (see [`FlushPacer`]).
    pub max_busy_share: f64,
    pub max_pending_cells: usize,
    pub dedup_window_days: u32,
    /// How long a revocation waits for the last flush before dropping local
    /// state (at most half of `max.poll.interval.ms`: the revocation runs inside
    /// librdkafka's poll).
    pub revoke_timeout: Duration,
    /// The instance's wallets, debited by every counted CDR.
    pub wallets: Arc<crate::wallet::Wallets>,
    /// Usage triggers: a CDR that may cross one asks for an early flush.
    pub triggers: crate::triggers::TriggerBook,
    /// The partitions whose wallets this instance owns, told to the API once
    /// their wallets are loaded; also the partitioner CDR keys are checked
    /// against.
    pub ownership: Arc<crate::wallet::owners::Ownership>,
}

/// Live state shared with `/readyz` and the metrics: sums over the instance's
/// consumers (`kafka.consumers`), each of which moves them by its own changes.
#[derive(Default)]
pub struct IngestHealth {
    assigned_partitions: AtomicUsize,
    paused_consumers: AtomicUsize,
    pending_cells: AtomicUsize,
}

impl IngestHealth {
    pub fn assigned_partitions(&self) -> usize {
        self.assigned_partitions.load(Ordering::Relaxed)
    }

    /// Whether any consumer is paused (backpressure).
    pub fn paused(&self) -> bool {
        self.paused_consumers.load(Ordering::Relaxed) > 0
    }

    /// Sets one consumer's assigned partitions (`mine` holds its share) and
    /// publishes the instance's sum.
    fn set_assigned(&self, mine: &IngestHealth, n: usize) {
        let sum = move_sum(&self.assigned_partitions, &mine.assigned_partitions, n);
        metrics::gauge!(crate::metrics::PARTITIONS_ASSIGNED).set(sum as f64);
    }

    fn set_paused(&self, mine: &IngestHealth, paused: bool) {
        let sum = move_sum(
            &self.paused_consumers,
            &mine.paused_consumers,
            paused as usize,
        );
        metrics::gauge!(crate::metrics::CONSUMER_PAUSED).set(if sum > 0 { 1.0 } else { 0.0 });
    }

    fn set_pending(&self, mine: &IngestHealth, cells: usize) {
        let sum = move_sum(&self.pending_cells, &mine.pending_cells, cells);
        metrics::gauge!(crate::metrics::PENDING_CELLS).set(sum as f64);
    }
}

/// Sets `mine` to `now` and moves `sum` by the difference; returns the new sum.
fn move_sum(sum: &AtomicUsize, mine: &AtomicUsize, now: usize) -> usize {
    let before = mine.swap(now, Ordering::Relaxed);
    if now >= before {
        sum.fetch_add(now - before, Ordering::Relaxed) + (now - before)
    } else {
        sum.fetch_sub(before - now, Ordering::Relaxed) - (before - now)
    }
}

struct PartitionState {
    /// Offset the store holds for this partition (the next batch's `from`).
    stored: Option<i64>,
    /// Next offset to read: one past the last message processed.
    next: i64,
    window: DedupWindow,
    /// Usage counted from this partition's messages since the last flush.
    deltas: Deltas,
    /// Wallet debits and hold settlements since the last flush.
    ledger: crate::wallet::Ledger,
    /// When the messages since the last flush were consumed.
    consumed: crate::metrics::ConsumedAt,
    /// What watched triggers gained since the last cut.
    gains: Gains,
}

/// Per-message tallies, published to `metrics` at every tick (not per message).
#[derive(Default)]
struct Tallies {
    counted: u64,
    duplicates: u64,
    rejected: [u64; RejectReason::ALL.len()],
}

/// State owned by the consumer thread; in a mutex only because the rebalance
/// callback (run by rdkafka inside `poll`, on this same thread) needs it too.
struct State {
    partitions: HashMap<i32, PartitionState>,
    /// Partitions being taken: their stored state is being loaded (see [`assign`]).
    loading: Option<Loading>,
    in_flight: Option<Receiver<FlushResult>>,
    in_flight_cancel: Arc<AtomicBool>,
    tallies: Tallies,
    today: Day,
    /// The triggers' watches as of the book's version `watch_version`.
    watches: Arc<Watches>,
    watch_version: u64,
    /// CDR event time → counted, buffered for `tallyd_cdr_event_to_counted_seconds`.
    event_ages: LocalSummary<'static>,
}

pub struct IngestContext {
    settings: IngestSettings,
    load: LoadSettings,
    /// Set at shutdown; also cancels a store load that is being retried.
    shutdown: Arc<AtomicBool>,
    state: Mutex<State>,
    jobs: SyncSender<Job>,
    /// The instance's sums, and this consumer's share of them.
    health: Arc<IngestHealth>,
    my_health: IngestHealth,
    log_throttle: LogThrottle,
    /// The helpers this consumer hands shares of its partitions to (the group
    /// member's; empty for a helper).
    helpers: Vec<Sender<Control>>,
    crew: Arc<Crew>,
}

impl ClientContext for IngestContext {
    fn error(&self, error: KafkaError, reason: &str) {
        // With `enable.partition.eof` librdkafka also reports every end of
        // partition here; the consumer loop handles it, and it is no error.
        if let KafkaError::Global(RDKafkaErrorCode::PartitionEOF) = error {
            tracing::debug!(reason, "end of partition");
            return;
        }
        if let Some(repeats) = self.log_throttle.admit_error(&error) {
            tracing::error!(error = %error, reason, repeats_not_logged = repeats, "librdkafka error");
        }
    }
}

impl ConsumerContext for IngestContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                let mut shares = share::split(&partitions, 1 + self.helpers.len()).into_iter();
                let mine = shares.next().unwrap_or_default();
                for (helper, share) in self.helpers.iter().zip(shares) {
                    let _ = helper.send(Control::Assign(share));
                }
                if mine.is_empty() {
                    // Nothing to load: complete the rebalance now.
                    if let Err(e) = consumer.assign(&TopicPartitionList::new()) {
                        tracing::error!(error = %e, "assign failed");
                    }
                } else {
                    // Only starts loading the stored offsets: the consumer thread
                    // assigns once they are there (see `assign`).
                    self.begin_assign(mine);
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                // A load still under way is called off: nothing was assigned.
                self.state.lock().loading = None;
                self.revoke_with_helpers();
                if let Err(e) = consumer.unassign() {
                    tracing::error!(error = %e, "unassign failed");
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance error; dropping assignment");
                self.state.lock().loading = None;
                self.revoke_with_helpers();
                let _ = consumer.unassign();
            }
        }
    }
}

impl IngestContext {
    /// Starts loading `partitions`' stored offsets and dedup windows; the
    /// consumer thread assigns them once loaded ([`Ingest::take_loaded`]). Never
    /// waits: called from the rebalance callback.
    fn begin_assign(&self, partitions: Vec<i32>) {
        tracing::info!(partitions = ?partitions, "partitions given; loading their stored offsets");
        self.state.lock().loading = Some(Loading::start(&self.load, partitions));
    }

    /// Builds the state of partitions whose stored state was loaded; returns the
    /// list to assign them at their stored offsets.
    fn take_partitions(
        &self,
        st: &mut State,
        loading: &Loading,
        stored: Stored,
    ) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        let today = loading.today;
        // The consumer's thread is named after the consumer.
        let thread = std::thread::current();
        let thread_name = thread.name().unwrap_or("?");
        st.today = today;
        for p in &loading.partitions {
            // Not expected (a revocation comes first); a ledger dropped after
            // the reload below would give back debits the reload already left out.
            st.partitions.remove(p);
        }
        if let Some(w) = stored.wallets {
            // Before any of their CDRs is consumed: the wallets of the
            // partitions' accounts as the store has them (the previous owner's
            // holds and top-ups included); the replay from the stored offsets
            // then re-debits what it had not flushed.
            let ownership = &self.settings.ownership;
            let n = w.partition_count;
            let mine = |a: crate::cdr::AccountSid| {
                ownership
                    .partitioner
                    .partition(a.to_string().as_bytes(), n)
                    .is_some_and(|p| loading.partitions.contains(&p))
            };
            let loaded =
                crate::wallet::owners::reload(&self.settings.wallets, w.balances, w.holds, mine);
            ownership.own(&w.epochs);
            tracing::info!(epochs = ?w.epochs, wallets = loaded, consumer = thread_name, "partitions' wallets loaded and owned");
        }
        for &p in &loading.partitions {
            let stored_offset = stored.offsets.get(&p).copied();
            let mut window = DedupWindow::new(today);
            let mut ids = 0;
            for (day, blob) in stored.dedup.get(&p).map(Vec::as_slice).unwrap_or_default() {
                window.load(*day, unpack(blob));
                ids += blob.len() / 16;
            }
            let offset = match stored_offset {
                Some(o) => Offset::Offset(o),
                None => Offset::Beginning,
            };
            if let Err(e) = tpl.add_partition_offset(&self.settings.topic, p, offset) {
                tracing::error!(error = %e, partition = p, "cannot set start offset");
            }
            tracing::info!(partition = p, offset = ?stored_offset, dedup_ids = ids, consumer = thread_name, "partition assigned");
            st.partitions.insert(
                p,
                PartitionState {
                    stored: stored_offset,
                    next: stored_offset.unwrap_or(-1),
                    window,
                    deltas: Deltas::default(),
                    ledger: crate::wallet::Ledger::new(self.settings.wallets.clone()),
                    consumed: Default::default(),
                    gains: Default::default(),
                },
            );
        }
        tpl
    }

    /// The group revoked the member's partitions: every helper flushes and drops
    /// its share while the member does its own, and the member waits for them
    /// (bounded by the revoke timeout). At shutdown the helpers do their own
    /// final flush and are not waited for.
    fn revoke_with_helpers(&self) {
        let acks: Vec<Receiver<()>> = if self.shutdown.load(Ordering::Relaxed) {
            Vec::new()
        } else {
            self.helpers
                .iter()
                .filter_map(|h| {
                    let (tx, rx) = mpsc::sync_channel(1);
                    h.send(Control::Revoke(tx)).ok().map(|_| rx)
                })
                .collect()
        };
        self.on_revoke();
        let deadline = Instant::now() + self.settings.revoke_timeout;
        for ack in acks {
            if let Err(RecvTimeoutError::Timeout) =
                ack.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                tracing::warn!("a consumer did not drop its partitions within the revoke timeout");
            }
        }
    }

    /// Flushes what was consumed (best effort, bounded in time), then drops every
    /// bit of local state: the next owner — maybe this instance again — starts from
    /// what the store holds, so whatever the flush's fate, nothing counts twice.
    fn on_revoke(&self) {
        let deadline = Instant::now() + self.settings.revoke_timeout;
        let mut st = self.state.lock();
        // The API stops answering for these wallets before the last flush:
        // whatever it would grant now, the next owner might not load.
        self.settings
            .ownership
            .disown(st.partitions.keys().copied());
        let landed = self.wait_in_flight(&mut st, deadline) && {
            let snapshot = take_snapshot(&mut st, &self.settings);
            match snapshot {
                None => true,
                Some(s) => {
                    self.submit(&mut st, s);
                    self.wait_in_flight(&mut st, deadline)
                }
            }
        };
        if !landed {
            tracing::warn!("partitions revoked before the last flush landed; their unflushed work will be re-read by the next owner");
        }
        for p in st.partitions.keys() {
            // Another member reports it from now on.
            metrics::gauge!(crate::metrics::CONSUMER_LAG, "partition" => p.to_string()).set(0.0);
        }
        st.partitions.clear();
        self.health.set_assigned(&self.my_health, 0);
    }

    /// Waits for the in-flight flush until `deadline`; then calls it off and
    /// gives it [`CANCEL_GRACE`] more to say so, and after that stops waiting
    /// (a stalled store may hold a statement for good). Returns whether
    /// everything handed over has landed. A flush abandoned here may still land
    /// later: its offset compare-and-set fences the next owner's first flush,
    /// which then reloads, so nothing counts twice.
    fn wait_in_flight(&self, st: &mut State, deadline: Instant) -> bool {
        let Some(rx) = st.in_flight.take() else {
            return true;
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let res = rx.recv_timeout(left).or_else(|_| {
            st.in_flight_cancel.store(true, Ordering::Relaxed);
            rx.recv_timeout(CANCEL_GRACE)
        });
        if let Ok(Ok(f)) = &res {
            wallets_flushed(st, &f.stuck);
        }
        matches!(res, Ok(Ok(_)))
    }

    fn submit(&self, st: &mut State, snapshot: Snapshot) {
        let (tx, rx) = mpsc::sync_channel(1);
        let cancel = Arc::new(AtomicBool::new(false));
        let job = Job {
            snapshot: Box::new(snapshot),
            cancel: cancel.clone(),
            reply: tx,
        };
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(job)) => {
                // A shared (SQLite) flusher is writing another consumer's
                // flush; this consumer has none out, so it waits for one.
                if self.jobs.send(job).is_err() {
                    return;
                }
            }
            Err(TrySendError::Disconnected(_)) => return,
        }
        st.in_flight = Some(rx);
        st.in_flight_cancel = cancel;
    }
}

/// Consumer properties tallyd sets unless `[kafka.properties]` does: large
/// prefetches; a short pause (librdkafka's default is 1 s) before fetching
/// again once the prefetch queue was full — the ingest thread empties a full
/// queue in well under a second, and then sat idle waiting for the next fetch;
/// and a broker-side fetch wait of 100 ms instead of 500: a caught-up consumer
/// learns it is at the end (and flushes) when an empty fetch returns, which
/// after a backlog drain took 0.2–0.6 s with the default (ten fetches a second
/// per idle broker connection instead of two is no load).
///
/// And a short group session (librdkafka's default is 45 s) with a heartbeat
/// every second: a dead instance's partitions move to the survivors about 10 s
/// after its death instead of a minute, and a restarted one is back in about
/// 11 s (6 s as a static member, `kafka.instance_id`); 6 s is the least a
/// Kafka broker accepts by default (`group.min.session.timeout.ms`). Heartbeats
/// come from librdkafka's own thread, so a busy consumer does not miss them; a
/// broker or network stall longer than 6 s does cost a rebalance.
const CONSUMER_DEFAULTS: [(&str, &str); 7] = [
    ("session.timeout.ms", "6000"),
    ("heartbeat.interval.ms", "1000"),
    ("max.partition.fetch.bytes", "16777216"),
    ("queued.min.messages", "1000000"),
    ("queued.max.messages.kbytes", "131072"),
    ("fetch.queue.backoff.ms", "20"),
    ("fetch.wait.max.ms", "100"),
];

/// How long a revocation waits for a flush it called off to end.
const CANCEL_GRACE: Duration = Duration::from_secs(1);

/// The group member's static membership id (`kafka.instance_id`): none when
/// unset or empty; for `auto`, the host name and the port of the HTTP listen
/// address — unique on a host (two instances cannot listen on one port) and the
/// same after a restart (none when the port is 0: chosen by the system, two
/// instances would share the id and fence each other); else the id as given.
pub fn instance_id(configured: Option<&str>, listen: &str) -> Option<String> {
    match configured {
        None | Some("") => None,
        Some("auto") => {
            let port: u16 = listen.rsplit(':').next()?.parse().ok()?;
            if port == 0 {
                return None;
            }
            Some(format!("{}:{port}", hostname()?))
        }
        Some(id) => Some(id.to_string()),
    }
}

fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is writable for its length; the name is NUL-terminated
    // unless truncated, which the search for NUL below tolerates.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return None;
    }
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..len]).into_owned();
    (!name.is_empty()).then_some(name)
}

/// Consumer settings tallyd does not let `[kafka.properties]` change.
fn fixed_settings(cfg: &mut ClientConfig) {
    // Offsets come from the store, never from Kafka (commits are for lag tools
    // only). No end-of-partition events: librdkafka's batch consume counts one
    // as consumed up to one past the end, and a pause (backpressure) then
    // resumes from there, skipping the next message (see the test
    // `a_pause_after_the_partition_end_skips_no_message`). The loop tells it
    // has caught up from the partitions' high watermarks instead.
    cfg.set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "range,roundrobin");
}

/// Messages between looks at the clock, the flusher and the pending bound.
const CHECK_EVERY: usize = 256;

/// Most messages polled before they are run through the hot path under one lock.
const BATCH: usize = 128;

/// The longest a consumer with nothing to do waits for messages or events.
const IDLE_WAIT: Duration = Duration::from_millis(50);

/// How long a consumer waits before re-reading partitions whose flush the
/// store can never take.
const STUCK_PAUSE: Duration = Duration::from_secs(1);

/// The least time between two flushes when a CDR may have crossed a usage
/// trigger (its callback should leave within a second of the CDR).
const EARLY_FLUSH_GAP: Duration = Duration::from_millis(100);

/// The least time between two flushes when the consumer has caught up.
const IDLE_FLUSH_GAP: Duration = Duration::from_millis(200);

/// When the next flush is due.
///
/// - Every `flush.interval_ms` under load, but never sooner than the flush's
///   expected duration divided by `flush.max_busy_share` after the last one
///   started: when the store is slow (many live accounts per flush), flushes get
///   rarer instead of taking the CPU the consumer needs. Each flush writes one row
///   per live account and period whatever the CDR rate, so rarer flushes are what
///   keeps the writes per CDR small. The expected duration is the pending cells
///   times what a cell cost in the last flush: a small flush at start-up does not
///   invite a big one an interval later (draining a backlog, that second flush
///   took as long as the final one and slowed the drain by half).
/// - As soon as the consumer is idle (every assigned partition at its end), at most every
///   [`IDLE_FLUSH_GAP`], so a quiet or drained topic is stored at once rather than
///   an interval later.
#[derive(Debug)]
pub struct FlushPacer {
    interval: Duration,
    busy_share: f64,
    last_start: Instant,
    /// Cells handed to the flush in flight or last landed.
    last_cells: usize,
    /// Store time per cell of the last flush that landed.
    cost_per_cell: Duration,
}

impl FlushPacer {
    pub fn new(settings: &IngestSettings, now: Instant) -> FlushPacer {
        FlushPacer {
            interval: settings.flush_interval,
            busy_share: settings.max_busy_share.clamp(0.01, 1.0),
            last_start: now,
            last_cells: 0,
            cost_per_cell: Duration::ZERO,
        }
    }

    /// The least time between the starts of two flushes under load, with
    /// `pending` cells to write.
    pub fn gap(&self, pending: usize) -> Duration {
        let expected = self
            .cost_per_cell
            .saturating_mul(pending.min(u32::MAX as usize) as u32);
        self.interval.max(expected.div_f64(self.busy_share))
    }

    pub fn due(&self, now: Instant, idle: bool, pending: usize) -> bool {
        let since = now.saturating_duration_since(self.last_start);
        since >= self.gap(pending) || (idle && since >= IDLE_FLUSH_GAP.min(self.interval))
    }

    /// Whether a flush may start early for a likely trigger crossing: as
    /// soon as the busy share allows, and at least [`EARLY_FLUSH_GAP`] after
    /// the last.
    pub fn due_early(&self, now: Instant, pending: usize) -> bool {
        let expected = self
            .cost_per_cell
            .saturating_mul(pending.min(u32::MAX as usize) as u32);
        let gap = EARLY_FLUSH_GAP.max(expected.div_f64(self.busy_share));
        now.saturating_duration_since(self.last_start) >= gap
    }

    /// A flush of `cells` cells was handed over at `now`.
    pub fn started(&mut self, now: Instant, cells: usize) {
        self.last_start = now;
        self.last_cells = cells;
    }

    /// The flush handed over last landed; the store took `took` to write it.
    pub fn finished(&mut self, took: Duration) {
        self.cost_per_cell = took / self.last_cells.clamp(1, u32::MAX as usize) as u32;
        metrics::gauge!(crate::metrics::FLUSH_GAP_SECONDS)
            .set(self.gap(self.last_cells).as_secs_f64());
    }
}

/// Tells the wallet ledgers of the partitions whose cut landed (all but
/// `stuck`) that it did.
fn wallets_flushed(st: &mut State, stuck: &[(i32, crate::store::Error)]) {
    for (p, ps) in st.partitions.iter_mut() {
        if !stuck.iter().any(|(s, _)| s == p) {
            ps.ledger.flushed();
        }
    }
}

/// Takes a consistent cut of the consumer state. `None` if nothing was consumed.
fn take_snapshot(st: &mut State, settings: &IngestSettings) -> Option<Snapshot> {
    let mut parts = Vec::new();
    for (p, ps) in st.partitions.iter_mut() {
        if ps.next < 0 || Some(ps.next) == ps.stored {
            continue;
        }
        let fresh = ps.window.take_fresh();
        let dedup = (!fresh.is_empty()).then(|| DedupRows {
            topic: settings.topic.clone(),
            partition: *p,
            seen_day: st.today,
            first_offset: ps.stored.unwrap_or(-1),
            ids: fresh,
        });
        parts.push(PartitionCut {
            deltas: ps.deltas.take(),
            wallet: ps.ledger.take(),
            consumed: std::mem::take(&mut ps.consumed),
            offset: OffsetAdvance {
                topic: settings.topic.clone(),
                partition: *p,
                from: ps.stored,
                to: ps.next,
            },
            dedup,
        });
        ps.stored = Some(ps.next);
        ps.gains.cut();
    }
    if parts.is_empty() {
        return None;
    }
    parts.sort_by_key(|c| c.offset.partition);
    if tracing::enabled!(tracing::Level::DEBUG) {
        let cuts: Vec<(i32, Option<i64>, i64)> = parts
            .iter()
            .map(|c| (c.offset.partition, c.offset.from, c.offset.to))
            .collect();
        tracing::debug!(?cuts, "flush handed over (partition, from, to)");
    }
    let oldest_kept = Day(st.today.0 - settings.dedup_window_days as i32);
    Some(Snapshot {
        parts,
        prune_dedup_before: Some(oldest_kept),
    })
}

/// The consumer thread.
pub struct Ingest {
    /// The consumer and the queue its partitions' messages are taken from.
    consumer: BatchConsumer<IngestContext>,
    tariff: Arc<Tariff>,
    dead_letters: Arc<DeadLetters>,
    shutdown: Arc<AtomicBool>,
    /// A helper's orders from the group member; `None` for the member.
    control: Option<Receiver<Control>>,
}

impl Ingest {
    /// A consumer in `seat` (see [`share`]): the group member subscribes to
    /// the topic, a helper waits for its share.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: &ClientConfig,
        settings: IngestSettings,
        tariff: Arc<Tariff>,
        dead_letters: Arc<DeadLetters>,
        jobs: SyncSender<Job>,
        health: Arc<IngestHealth>,
        shutdown: Arc<AtomicBool>,
        crew: Arc<Crew>,
        seat: Seat,
    ) -> KafkaResult<Ingest> {
        let topic = settings.topic.clone();
        let (helpers, control) = match seat {
            Seat::Member(helpers) => (helpers, None),
            Seat::Helper(control) => (Vec::new(), Some(control)),
        };
        let mut cfg = client.clone();
        // Prefetch deeply: librdkafka's defaults (1 MiB per partition and fetch,
        // 64 MiB queued) leave the consumer waiting on fetch round trips once it
        // does real work per message (measured: 15.6 s → 7.8 s draining 2M CDRs
        // from tansu). Memory stays bounded by the queue size. Settings under
        // [kafka.properties] win.
        for (key, value) in CONSUMER_DEFAULTS {
            if cfg.get(key).is_none() {
                cfg.set(key, value);
            }
        }
        let millis = |key: &str, default: u64| {
            Duration::from_millis(cfg.get(key).and_then(|v| v.parse().ok()).unwrap_or(default))
        };
        // librdkafka's defaults.
        let session_timeout = millis("session.timeout.ms", 45_000);
        let max_poll_interval = millis("max.poll.interval.ms", 300_000);
        let mut settings = settings;
        let instance_id = settings.instance_id.clone();
        settings.revoke_timeout = settings.revoke_timeout.min(max_poll_interval / 2);
        let load = LoadSettings {
            store: settings.store.clone(),
            topic: settings.topic.clone(),
            dedup_window_days: settings.dedup_window_days,
            deadline: assign::load_deadline(session_timeout, max_poll_interval),
            ownership: settings.ownership.clone(),
        };
        let ctx = IngestContext {
            helpers,
            crew,
            load,
            settings,
            shutdown: shutdown.clone(),
            state: Mutex::new(State {
                partitions: HashMap::new(),
                loading: None,
                in_flight: None,
                in_flight_cancel: Arc::new(AtomicBool::new(false)),
                tallies: Tallies::default(),
                today: Day::today(),
                watches: Default::default(),
                watch_version: u64::MAX,
                event_ages: crate::metrics::CDR_EVENT_TO_COUNTED.local(),
            }),
            jobs,
            health,
            my_health: IngestHealth::default(),
            log_throttle: LogThrottle::default(),
        };
        fixed_settings(&mut cfg);
        if let (Some(id), None) = (&instance_id, &control) {
            // Only the member joins the group; helpers must not claim its id.
            if cfg.get("group.instance.id").is_none() {
                cfg.set("group.instance.id", id);
            }
        }
        let consumer: BaseConsumer<IngestContext> = cfg.create_with_context(ctx)?;
        if control.is_none() {
            consumer.subscribe(&[&topic])?;
        }
        Ok(Ingest {
            consumer: BatchConsumer::new(consumer, &topic),
            tariff,
            dead_letters,
            shutdown,
            control,
        })
    }

    fn kafka(&self) -> &BaseConsumer<IngestContext> {
        self.consumer.consumer()
    }

    /// Assigns the partitions whose stored state has loaded since the last
    /// turn, at their stored offsets. Never waits for the load.
    fn take_loaded(&self, ctx: &IngestContext) {
        let mut st = ctx.state.lock();
        let Some(loading) = st.loading.as_mut() else {
            return;
        };
        let stored = match loading.poll() {
            Ok(Some(stored)) => stored,
            Ok(None) => return,
            Err(()) => {
                // The load's thread is gone without a result: start another.
                let partitions = loading.partitions.clone();
                st.loading = Some(Loading::start(&ctx.load, partitions));
                return;
            }
        };
        let Some(loading) = st.loading.take() else {
            return;
        };
        let tpl = ctx.take_partitions(&mut st, &loading, stored);
        let assigned = st.partitions.len();
        drop(st);
        self.consumer.route(&loading.partitions);
        if let Err(e) = self.kafka().assign(&tpl) {
            tracing::error!(error = %e, "assign failed");
        }
        ctx.health.set_assigned(&ctx.my_health, assigned);
    }

    /// Consumes until shutdown is requested, then flushes and returns.
    pub fn run(self) {
        let ctx = self.kafka().context();
        let settings = ctx.settings.clone();
        let mut pacer = FlushPacer::new(&settings, Instant::now());
        let mut paused = false;
        let mut since_check = 0usize;
        let mut batch: Vec<Fetched> = Vec::with_capacity(BATCH);
        let mut got_nothing = false;
        while !self.shutdown.load(Ordering::Relaxed) {
            // Events first (a rebalance callback runs inside this poll, so never
            // in the middle of a batch), then a batch of messages from the
            // assigned partitions; only when the last turn found nothing does
            // it wait: for messages when partitions are assigned, else for
            // events. The group's rebalance and every librdkafka log line reach
            // the consumer as events served by this poll, one per call; waiting
            // on the still empty fetch queue between them held each up to 50 ms,
            // and an instance's two consumers got their partitions ~1 s apart
            // (now 50-65 ms). A helper with nothing assigned waits for the
            // member's orders instead.
            let idle_unassigned = got_nothing && ctx.my_health.assigned_partitions() == 0;
            self.obey_member(idle_unassigned);
            self.take_loaded(ctx);
            let mut event = self.kafka().poll(Duration::ZERO);
            let mut wait = Duration::ZERO;
            if got_nothing && event.is_none() {
                if !idle_unassigned {
                    wait = IDLE_WAIT;
                } else if self.control.is_none() {
                    event = self.kafka().poll(IDLE_WAIT);
                }
            }
            self.consumer.consume(wait, &mut batch);
            got_nothing = batch.is_empty() && event.is_none();
            let polled = batch.len();
            let mut st = ctx.state.lock();
            match event {
                None => {}
                // A partition whose messages were not routed to the fetch queue
                // (not expected): counted all the same.
                Some(Ok(msg)) => {
                    self.handle_run(&mut st, std::slice::from_ref(&msg), &settings.topic)
                }
                Some(Err(e)) => on_error(ctx, e),
            }
            for run in batch.chunk_by(|a, b| {
                a.partition() == b.partition() && a.error().is_none() && b.error().is_none()
            }) {
                match run[0].error() {
                    None => self.handle_run(&mut st, run, &settings.topic),
                    Some(code) => on_error(ctx, KafkaError::MessageConsumption(code)),
                }
            }
            batch.clear();
            // Caught up: every assigned partition is read to its end.
            let idle = got_nothing && all_at_end(&st, &self.consumer);
            // Clocks, flush results and the pending bound are looked at every few
            // hundred messages, and whenever the consumer is idle or paused.
            since_check += polled.max(1);
            if since_check < CHECK_EVERY && !idle && !paused && !got_nothing {
                continue;
            }
            since_check = 0;
            if let Some(took) = self.collect_flush(ctx, &mut st) {
                pacer.finished(took);
            }
            if self.control.is_none() {
                self.serve_helpers(ctx);
            }
            publish_lag(&st, &self.consumer);
            let now = Instant::now();
            let pending: usize = st
                .partitions
                .values()
                .map(|ps| ps.deltas.live_cells())
                .sum();
            ctx.health.set_pending(&ctx.my_health, pending);
            let over = pending >= settings.max_pending_cells;
            let crossed = st.partitions.values().any(|ps| ps.gains.crossed);
            st.event_ages.publish();
            if st.in_flight.is_none()
                && (over
                    || pacer.due(now, idle, pending)
                    || (crossed && pacer.due_early(now, pending)))
            {
                let today = Day::today();
                st.today = today;
                for ps in st.partitions.values_mut() {
                    ps.window.set_today(today);
                }
                if let Some(s) = take_snapshot(&mut st, &settings) {
                    ctx.submit(&mut st, s);
                    pacer.started(now, pending);
                }
                publish(&mut st.tallies);
            }
            // Backpressure: stop fetching while over the bound and a flush is still out.
            let should_pause = over && st.in_flight.is_some();
            drop(st);
            if should_pause != paused {
                self.set_paused(should_pause);
                paused = should_pause;
            }
        }
        if paused {
            self.set_paused(false);
        }
        tracing::info!("shutting down: final flush");
        ctx.on_revoke();
        let mut st = ctx.state.lock();
        publish(&mut st.tallies);
    }

    /// A helper's turn at its orders: takes one if there is one, waiting up to
    /// [`IDLE_WAIT`] if `wait`. Nothing for the member.
    fn obey_member(&self, wait: bool) {
        let Some(control) = &self.control else {
            return;
        };
        let order = if wait {
            match control.recv_timeout(IDLE_WAIT) {
                Ok(order) => order,
                Err(RecvTimeoutError::Timeout) => return,
                // The member is gone: the daemon is stopping.
                Err(RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(IDLE_WAIT);
                    return;
                }
            }
        } else {
            match control.try_recv() {
                Ok(order) => order,
                Err(_) => return,
            }
        };
        let ctx = self.kafka().context();
        match order {
            Control::Assign(partitions) => {
                // Not expected (a revocation comes first), but a share held
                // now is flushed and dropped before the new one is taken.
                if ctx.my_health.assigned_partitions() > 0 {
                    ctx.on_revoke();
                }
                if !partitions.is_empty() {
                    ctx.begin_assign(partitions);
                }
            }
            Control::Revoke(ack) => {
                ctx.state.lock().loading = None;
                ctx.on_revoke();
                if let Err(e) = self.kafka().unassign() {
                    tracing::error!(error = %e, "unassign failed");
                }
                let _ = ack.send(());
            }
        }
    }

    /// The member's turn for its helpers: rejoins the group if a helper's flush
    /// was fenced, and commits the offsets they stored to Kafka.
    fn serve_helpers(&self, ctx: &IngestContext) {
        if ctx.crew.take_rejoin() {
            tracing::warn!("a consumer's flush was fenced; rejoining the group");
            self.rejoin(ctx);
        }
        self.commit(ctx.crew.take_commits());
    }

    /// Commits offsets to Kafka (for lag tools only), the last one given per
    /// partition.
    fn commit(&self, offsets: Vec<(i32, i64)>) {
        if offsets.is_empty() {
            return;
        }
        let topic = &self.kafka().context().settings.topic;
        let last: HashMap<i32, i64> = offsets.into_iter().collect();
        let mut tpl = TopicPartitionList::new();
        for (p, o) in last {
            let _ = tpl.add_partition_offset(topic, p, Offset::Offset(o));
        }
        let _ = self.kafka().commit(&tpl, CommitMode::Async);
    }

    /// Leaves the group and joins it again: the rebalance reloads every
    /// partition of the instance from the store.
    fn rejoin(&self, ctx: &IngestContext) {
        self.kafka().unsubscribe();
        if let Err(e) = self.kafka().subscribe(&[&ctx.settings.topic]) {
            tracing::error!(error = %e, "cannot subscribe again");
        }
    }

    fn set_paused(&self, pause: bool) {
        let Ok(assignment) = self.kafka().assignment() else {
            return;
        };
        let r = if pause {
            self.kafka().pause(&assignment)
        } else {
            self.kafka().resume(&assignment)
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, pause, "cannot change consumption state");
        }
        if pause {
            tracing::warn!("unflushed usage is over flush.max_pending_cells; consumption paused until the store catches up");
        } else {
            tracing::info!("consumption resumed");
        }
        let ctx = self.kafka().context();
        ctx.health.set_paused(&ctx.my_health, pause);
    }

    /// Picks up a finished flush: on success commits offsets to Kafka (for lag
    /// tools only) and returns the store's time for it; if fenced, drops local
    /// state and rejoins.
    fn collect_flush(&self, ctx: &IngestContext, st: &mut State) -> Option<Duration> {
        let rx = st.in_flight.as_ref()?;
        let res = match rx.try_recv() {
            Ok(r) => r,
            Err(mpsc::TryRecvError::Empty) => return None,
            Err(mpsc::TryRecvError::Disconnected) => {
                Err(crate::store::Error::Cancelled("flusher stopped".into()))
            }
        };
        st.in_flight = None;
        match res {
            Ok(Flushed {
                outcome,
                took,
                stuck,
            }) => {
                wallets_flushed(st, &stuck);
                if outcome == FlushOutcome::AlreadyApplied {
                    tracing::info!("flush had already landed on an earlier attempt");
                }
                if !stuck.is_empty() {
                    // Their cuts were not written and the store still holds
                    // their earlier offsets: every partition is re-read from
                    // the store (the others' cuts landed), after a pause so a
                    // page that can never be written does not spin.
                    for (partition, e) in &stuck {
                        tracing::error!(partition, error = %e, "partition's flush failed permanently; re-reading it from the store in a while");
                    }
                    std::thread::sleep(STUCK_PAUSE);
                    self.reload_from_store(ctx, st);
                    return Some(took);
                }
                let stored = st
                    .partitions
                    .iter()
                    .filter_map(|(p, ps)| Some((*p, ps.stored?)));
                if self.control.is_some() {
                    // Not a group member: the member commits them.
                    ctx.crew.leave_commits(stored);
                } else {
                    self.commit(stored.collect());
                }
                Some(took)
            }
            Err(e) => {
                tracing::error!(error = %e, "flush failed for good; dropping local state and rejoining the group");
                metrics::counter!(crate::metrics::FLUSH_FENCED_TOTAL).increment(1);
                self.reload_from_store(ctx, st);
                None
            }
        }
    }

    /// Drops all local state and has the group member rejoin: the rebalance
    /// reloads every partition from what the store holds.
    fn reload_from_store(&self, ctx: &IngestContext, st: &mut State) {
        ctx.settings.ownership.disown(st.partitions.keys().copied());
        st.partitions.clear();
        if self.control.is_some() {
            if let Err(e) = self.kafka().unassign() {
                tracing::error!(error = %e, "unassign failed");
            }
            ctx.crew.ask_rejoin();
        } else {
            self.rejoin(ctx);
        }
    }

    /// Runs consecutive messages of one partition through the hot path.
    fn handle_run<R: Record>(&self, st: &mut State, run: &[R], topic: &str) {
        let Some(first) = run.first() else {
            return;
        };
        let partition = first.partition();
        let State {
            partitions,
            tallies,
            watches,
            watch_version,
            event_ages,
            ..
        } = st;
        if let Some(w) = self
            .kafka()
            .context()
            .settings
            .triggers
            .watches_since(watch_version)
        {
            *watches = w;
        }
        let Some(ps) = partitions.get_mut(&partition) else {
            // Messages of a partition revoked while they were in flight.
            return;
        };
        let run = continue_from(ps.next, run, partition);
        let Some(last) = run.last() else {
            return;
        };
        check_partitions(self.kafka().context(), run, partition);
        let payloads: Vec<&[u8]> = run
            .iter()
            .map(|m| m.payload().unwrap_or_default())
            .collect();
        ingest_batch(
            &payloads,
            &self.tariff,
            &mut ps.deltas,
            &mut ps.window,
            &mut Tap {
                ledger: &mut ps.ledger,
                gains: &mut ps.gains,
                watches,
                ages: event_ages,
                now: std::time::SystemTime::now(),
            },
            |i, result| match result {
                Ok(Outcome::Counted(_)) => tallies.counted += 1,
                Ok(Outcome::Duplicate) => tallies.duplicates += 1,
                Err(rejection) => {
                    tallies.rejected[rejection.reason as usize] += 1;
                    let msg = &run[i];
                    self.dead_letters.send(
                        msg.key(),
                        msg.payload(),
                        &rejection,
                        &Source {
                            topic,
                            partition,
                            offset: msg.offset(),
                        },
                    );
                }
            },
        );
        ps.next = last.offset() + 1;
        ps.consumed.push(Instant::now(), run.len() as u64);
    }
}

/// What each counted CDR also goes to besides the counters: the partition's
/// wallet ledger, the trigger watch ([`Gains`]) and the event-age summary.
struct Tap<'a> {
    ledger: &'a mut crate::wallet::Ledger,
    gains: &'a mut Gains,
    watches: &'a Watches,
    ages: &'a mut LocalSummary<'static>,
    now: std::time::SystemTime,
}

impl Debit for Tap<'_> {
    #[inline]
    fn debit(&mut self, cdr: &crate::cdr::Cdr<'_>, charge: crate::rating::Charge) {
        self.ledger.debit(cdr, charge);
        self.ages
            .record(crate::metrics::unix_age(cdr.timestamp, self.now));
        if !self.watches.is_empty() {
            self.gains.add(self.watches, cdr, charge);
        }
    }
}

/// Sets `tallyd_consumer_lag{partition}`: messages between where each assigned
/// partition is read to and its end as of the last fetch (librdkafka's cached
/// high watermark, so no broker request; while paused, the end as of the last
/// fetch before the pause).
fn publish_lag(st: &State, consumer: &BatchConsumer<IngestContext>) {
    for (p, ps) in &st.partitions {
        let Some((low, high)) = consumer.watermarks(*p) else {
            continue;
        };
        metrics::gauge!(crate::metrics::CONSUMER_LAG, "partition" => p.to_string())
            .set((high - ps.position(low)).max(0) as f64);
    }
}

/// Caught up: every assigned partition is read to its end as of its last
/// fetch (librdkafka's cached high watermark, so no broker request).
fn all_at_end(st: &State, consumer: &BatchConsumer<IngestContext>) -> bool {
    !st.partitions.is_empty()
        && st.partitions.iter().all(|(p, ps)| {
            consumer
                .watermarks(*p)
                .is_some_and(|(low, high)| ps.position(low) >= high)
        })
}

impl PartitionState {
    /// Where the partition is read to: the next offset to read, or before
    /// anything was read since the assignment, the stored offset or the
    /// start of the partition (`low`).
    fn position(&self, low: i64) -> i64 {
        if self.next >= 0 {
            self.next
        } else {
            self.stored.unwrap_or(low)
        }
    }
}

/// How many messages of `run`, read from `partition`, have a key
/// `partitioner` maps elsewhere among `n` partitions, and the offset and
/// computed partition of the first (none while `n` is not known; messages
/// without key go anywhere).
fn misplaced<R: Record>(
    partitioner: crate::partitioner::Partitioner,
    n: u32,
    run: &[R],
    partition: i32,
) -> (u64, Option<(i64, Option<i32>)>) {
    let mut misplaced = 0u64;
    let mut example = None;
    if n == 0 {
        return (0, None);
    }
    // Runs often repeat a key: its verdict is kept.
    let (mut last_key, mut last_bad): (Option<&[u8]>, bool) = (None, false);
    for m in run {
        let Some(key) = m.key() else { continue };
        if last_key != Some(key) {
            last_key = Some(key);
            let computed = partitioner.partition(key, n);
            last_bad = computed.is_some_and(|c| c != partition);
            if last_bad {
                example.get_or_insert((m.offset(), computed));
            }
        }
        misplaced += u64::from(last_bad);
    }
    (misplaced, example)
}

/// Counts and logs (throttled) the CDRs of `run` whose key maps to another
/// partition than `partition` under `kafka.partitioner`: their account's
/// wallet is owned by whoever holds the computed partition, which does not see
/// these debits. They are counted normally all the same.
fn check_partitions<R: Record>(ctx: &IngestContext, run: &[R], partition: i32) {
    let ownership = &ctx.settings.ownership;
    let n = ownership.partitions();
    let (count, example) = misplaced(ownership.partitioner, n, run, partition);
    if count == 0 {
        return;
    }
    metrics::counter!(crate::metrics::CDR_PARTITION_MISMATCH_TOTAL).increment(count);
    if let (Some(repeats), Some((offset, computed))) = (
        ctx.log_throttle
            .admit("cdr on another partition than its key's", Instant::now()),
        example,
    ) {
        tracing::warn!(
            partition,
            offset,
            computed = ?computed,
            partitioner = ownership.partitioner.as_str(),
            partitions = n,
            in_this_run = count,
            repeats_not_logged = repeats,
            "CDR read from another partition than kafka.partitioner computes for its key: is kafka.partitioner the switch's? (its account's wallet owner does not see it)"
        );
    }
}

/// A consumer error: counted, and logged unless it keeps recurring.
fn on_error(ctx: &IngestContext, e: KafkaError) {
    metrics::counter!(crate::metrics::KAFKA_ERRORS_TOTAL).increment(1);
    if let Some(repeats) = ctx.log_throttle.admit_error(&e) {
        tracing::warn!(error = %e, repeats_not_logged = repeats, "kafka consumer error");
    }
}

/// The part of `run` at or after `next`, the partition's next offset to read.
///
/// Offsets only move forward: messages before `next` were counted already (they
/// come back only if librdkafka reset the position, say after an out-of-range
/// answer) and are dropped here, so `next` — what the flush stores — never goes
/// back. A gap after `next` is legal in Kafka (compaction, transaction markers)
/// and is read past, but counted and logged: on a plain CDR topic it means the
/// broker skipped messages.
fn continue_from<M: Record>(next: i64, run: &[M], partition: i32) -> &[M] {
    let (Some(first), Some(last)) = (run.first(), run.last()) else {
        return run;
    };
    if next < 0 || first.offset() == next {
        return run;
    }
    if first.offset() > next {
        metrics::counter!(crate::metrics::OFFSET_GAPS_TOTAL).increment(1);
        tracing::warn!(
            partition,
            expected = next,
            got = first.offset(),
            "offset gap: the broker returned messages past the expected offset"
        );
        return run;
    }
    let skip = run.partition_point(|m| m.offset() < next);
    metrics::counter!(crate::metrics::REPLAYED_MESSAGES_TOTAL).increment(skip as u64);
    tracing::warn!(
        partition,
        expected = next,
        got = first.offset(),
        until = last.offset(),
        skipped = skip,
        "messages before the partition's position came again; skipped"
    );
    &run[skip..]
}

fn publish(t: &mut Tallies) {
    metrics::counter!(crate::metrics::CDRS_TOTAL, "outcome" => "counted")
        .increment(std::mem::take(&mut t.counted));
    metrics::counter!(crate::metrics::CDRS_TOTAL, "outcome" => "duplicate")
        .increment(std::mem::take(&mut t.duplicates));
    for r in RejectReason::ALL {
        let n = std::mem::take(&mut t.rejected[r as usize]);
        if n > 0 {
            metrics::counter!(crate::metrics::CDRS_TOTAL, "outcome" => "rejected").increment(n);
            metrics::counter!(crate::metrics::CDRS_REJECTED_TOTAL, "reason" => r.as_str())
                .increment(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pacer(interval_ms: u64, share: f64, t0: Instant) -> FlushPacer {
        FlushPacer::new(
            &IngestSettings {
                topic: "cdrs".into(),
                store: crate::store::Store::new("sqlite://unused.db", 1).unwrap(),
                instance_id: None,
                flush_interval: Duration::from_millis(interval_ms),
                max_busy_share: share,
                max_pending_cells: 1,
                dedup_window_days: 7,
                revoke_timeout: Duration::from_secs(1),
                wallets: Arc::new(crate::wallet::Wallets::new(Box::new(|_| 0))),
                triggers: Default::default(),
                ownership: Arc::new(crate::wallet::owners::Ownership::lone()),
            },
            t0,
        )
    }

    #[test]
    fn the_static_member_id_is_off_given_or_host_and_port() {
        assert_eq!(instance_id(None, "0.0.0.0:8080"), None);
        assert_eq!(instance_id(Some(""), "0.0.0.0:8080"), None);
        assert_eq!(
            instance_id(Some("a-1"), "0.0.0.0:8080").as_deref(),
            Some("a-1")
        );
        assert_eq!(instance_id(Some("auto"), "127.0.0.1:0"), None);
        assert_eq!(instance_id(Some("auto"), "nonsense"), None);
        let id = instance_id(Some("auto"), "[::]:8081").expect("this host has a name");
        assert!(id.ends_with(":8081") && id.len() > 5, "{id}");
        assert_eq!(instance_id(Some("auto"), "[::]:8081"), Some(id), "stable");
    }

    #[test]
    fn slow_flushes_stretch_the_gap_and_idle_flushes_come_early() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut p = pacer(1000, 0.25, t0);
        assert!(!p.due(ms(999), false, 10));
        assert!(p.due(ms(1000), false, 10));
        // Caught up: flush after 200 ms, not a whole interval.
        assert!(!p.due(ms(150), true, 10));
        assert!(p.due(ms(200), true, 10));

        // 1000 cells took 800 ms at 25 % busy share: with as many pending, the
        // next waits 3.2 s; with ten times as many, 32 s.
        p.started(ms(1000), 1000);
        p.finished(Duration::from_millis(800));
        assert_eq!(p.gap(1000), Duration::from_millis(3200));
        assert!(!p.due(ms(4100), false, 1000));
        assert!(p.due(ms(4200), false, 1000));
        assert_eq!(p.gap(10_000), Duration::from_millis(32_000));
        // A small flush needs no more than the interval.
        assert_eq!(p.gap(100), Duration::from_millis(1000));
        // A fast flush brings the interval back.
        p.started(ms(4200), 1000);
        p.finished(Duration::from_millis(10));
        assert_eq!(p.gap(1000), Duration::from_millis(1000));
        // An idle consumer still flushes early whatever the gap.
        p.started(ms(5000), 1000);
        p.finished(Duration::from_millis(2000));
        assert!(p.due(ms(5200), true, 1_000_000));
    }

    fn messages(offsets: &[i64]) -> Vec<rdkafka::message::OwnedMessage> {
        offsets
            .iter()
            .map(|&o| {
                rdkafka::message::OwnedMessage::new(
                    Some(format!("m{o}").into_bytes()),
                    None,
                    "cdrs".into(),
                    rdkafka::Timestamp::NotAvailable,
                    3,
                    o,
                    None,
                )
            })
            .collect()
    }

    fn offsets(run: &[rdkafka::message::OwnedMessage]) -> Vec<i64> {
        run.iter().map(rdkafka::Message::offset).collect()
    }

    #[test]
    fn cdrs_on_another_partition_than_their_keys_are_found() {
        use crate::partitioner::Partitioner;
        let p = Partitioner::ConsistentRandom;
        let key_of = |want: i32| {
            (0..)
                .map(|i| format!("AC{i:032x}"))
                .find(|k| p.partition(k.as_bytes(), 4) == Some(want))
                .unwrap()
        };
        let (home, away) = (key_of(3), key_of(1));
        let msg = |key: Option<&str>, o: i64| {
            rdkafka::message::OwnedMessage::new(
                Some(b"{}".to_vec()),
                key.map(|k| k.as_bytes().to_vec()),
                "cdrs".into(),
                rdkafka::Timestamp::NotAvailable,
                3,
                o,
                None,
            )
        };
        let run = [
            msg(Some(&home), 10),
            msg(Some(&away), 11),
            msg(Some(&away), 12),
            msg(None, 13),
            msg(Some(&home), 14),
            msg(Some(&away), 15),
        ];
        assert_eq!(misplaced(p, 4, &run, 3), (3, Some((11, Some(1)))));
        assert_eq!(misplaced(p, 0, &run, 3), (0, None), "count not known yet");
        assert_eq!(misplaced(p, 4, &run[..1], 3), (0, None));
    }

    #[test]
    fn positions_only_move_forward() {
        let run = messages(&[10, 11, 12, 13]);
        // In order, or the first read of a partition: everything.
        assert_eq!(offsets(continue_from(10, &run, 3)), [10, 11, 12, 13]);
        assert_eq!(offsets(continue_from(-1, &run, 3)), [10, 11, 12, 13]);
        // Replayed after a position reset: what came before `next` is dropped.
        assert_eq!(offsets(continue_from(12, &run, 3)), [12, 13]);
        assert!(continue_from(14, &run, 3).is_empty());
        // A gap is read past.
        assert_eq!(offsets(continue_from(7, &run, 3)), [10, 11, 12, 13]);
    }

    /// Takes from `q` until `done` says so (or `max` passed); returns what
    /// came: each message's offset, or -1 for an event such as the
    /// partition's end.
    fn take(
        q: &BatchConsumer<rdkafka::consumer::DefaultConsumerContext>,
        max: Duration,
        mut done: impl FnMut(&[i64]) -> bool,
    ) -> Vec<i64> {
        let mut seen = Vec::new();
        let mut batch = Vec::with_capacity(64);
        let deadline = Instant::now() + max;
        while !done(&seen) && Instant::now() < deadline {
            q.consume(Duration::from_millis(100), &mut batch);
            seen.extend(
                batch
                    .drain(..)
                    .map(|m| if m.error().is_some() { -1 } else { m.offset() }),
            );
        }
        seen
    }

    /// librdkafka's batch consume counts a partition-end event as consumed up
    /// to one past the end; a pause and resume (backpressure) then resumes
    /// fetching from there, and the first message produced after the end was
    /// never delivered: with end events on, the message after the pause is 6,
    /// not 5 (one CDR lost, with every offset stored). tallyd's consumers take
    /// no end events.
    #[test]
    fn a_pause_after_the_partition_end_skips_no_message() {
        use rdkafka::mocking::MockCluster;
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("t", 1, 1).unwrap();
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("group.id", "g");
        let producer: BaseProducer = client.create().unwrap();
        let send = |n: std::ops::Range<u32>| {
            for i in n {
                let payload = format!("m{i}");
                producer
                    .send(BaseRecord::<(), _>::to("t").payload(&payload))
                    .unwrap();
            }
            producer.flush(Duration::from_secs(10)).unwrap();
        };
        send(0..5);
        let mut cfg = client.clone();
        fixed_settings(&mut cfg);
        let q = BatchConsumer::new(cfg.create().unwrap(), "t");
        q.route(&[0]);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("t", 0, Offset::Offset(0)).unwrap();
        q.consumer().assign(&tpl).unwrap();
        let ten = Duration::from_secs(10);
        let first = take(&q, ten, |s| s.iter().filter(|&&o| o >= 0).count() == 5);
        assert_eq!(first.iter().filter(|&&o| o >= 0).count(), 5, "{first:?}");
        // Caught up: whatever the fetcher reports at the end is taken.
        take(&q, Duration::from_millis(500), |_| false);
        q.consumer().pause(&tpl).unwrap();
        send(5..7);
        std::thread::sleep(Duration::from_millis(200));
        q.consumer().resume(&tpl).unwrap();
        let after = take(&q, ten, |s| s.iter().any(|&o| o >= 0));
        let next = after.iter().find(|&&o| o >= 0);
        assert_eq!(next, Some(&5), "after the pause: {after:?}");
    }
}
