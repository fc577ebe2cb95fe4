//! The one catalogue of what tallyd exports on `/metrics`.
//!
//! Every metric the daemon emits has its name as a constant here (call sites use
//! the constant, never a string of their own) and one entry in [`CATALOGUE`]:
//! kind, unit, labels and help text. [`install`] installs the Prometheus
//! recorder, describes every catalogued metric once (so `/metrics` carries
//! `# HELP` and `# TYPE` for each), and starts the counters at zero so that
//! `rate()` and `increase()` see their first increment.
//!
//! Names follow Prometheus' conventions: a `tallyd_` prefix, base units
//! (`_seconds`, `_bytes`), `_total` on counters and only on counters. Labels
//! take a bounded set of values — an outcome, a rejection reason, a Kafka
//! partition — never an account, number or call id.
//!
//! Latencies whose tail matters are [`Summary`] values: recorded into
//! `hdrhistogram`s (cheap enough for the hot threads, see [`LocalSummary`]) and
//! rendered beside the recorder's text as Prometheus summaries —
//! `{quantile="0.5|0.9|0.99|0.999"}` over the last [`WINDOW`], plus `_sum` and
//! `_count` since start. A summary appears on `/metrics` once it has recorded
//! something.
//!
//! [`PLANNED`] names the metrics the wallet, hold and webhook work will emit;
//! the alert rules and the dashboard under `config/` already use them. They are
//! not described until something emits them: move an entry to [`CATALOGUE`]
//! when wiring it.

use std::fmt::Write as _;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use metrics::Unit;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use parking_lot::Mutex;

use crate::cdr::RejectReason;

// --- Names of what the daemon emits ------------------------------------------

/// Counter `{outcome = counted | duplicate | rejected}`: CDRs consumed.
pub const CDRS_TOTAL: &str = "tallyd_cdrs_total";
/// Counter `{reason}`: rejected CDRs by [`RejectReason`].
pub const CDRS_REJECTED_TOTAL: &str = "tallyd_cdrs_rejected_total";
/// Counter: flushes that landed in the store.
pub const FLUSHES_TOTAL: &str = "tallyd_flushes_total";
/// Counter: usage triggers fired (each once per period, in the flush that crossed it).
pub const TRIGGERS_FIRED_TOTAL: &str = "tallyd_triggers_fired_total";
/// Histogram: how long a flush took, from hand-over to commit.
pub const FLUSH_DURATION_SECONDS: &str = "tallyd_flush_duration_seconds";
/// Counter: usage rows and breakdowns written by flushes.
pub const FLUSH_ROWS_TOTAL: &str = "tallyd_flush_rows_total";
/// Gauge: least time between two flush starts under load (flush pacing).
pub const FLUSH_GAP_SECONDS: &str = "tallyd_flush_gap_seconds";
/// Gauge: unflushed counter cells and breakdown entries.
pub const PENDING_CELLS: &str = "tallyd_pending_cells";
/// Gauge, 1 or 0: whether consumption is paused (backpressure).
pub const CONSUMER_PAUSED: &str = "tallyd_consumer_paused";
/// Gauge: Kafka partitions this instance consumes.
pub const PARTITIONS_ASSIGNED: &str = "tallyd_partitions_assigned";
/// Gauge, 1 or 0: whether the store answered the last attempt.
pub const STORE_UP: &str = "tallyd_store_up";
/// Gauge `{partition}`: messages between where a partition is read to and its end.
pub const CONSUMER_LAG: &str = "tallyd_consumer_lag";
/// Gauge: Unix time the last flush landed.
pub const LAST_FLUSH_TIMESTAMP_SECONDS: &str = "tallyd_last_flush_timestamp_seconds";
/// Counter: failed store attempts (each is retried).
pub const STORE_ERRORS_TOTAL: &str = "tallyd_store_errors_total";
/// Counter `{cause}`: store operations that can never succeed (a page that does
/// not decode, a value over a limit); the store is not down.
pub const STORE_PERMANENT_ERRORS_TOTAL: &str = "tallyd_store_permanent_errors_total";
/// Counter: partition assignments whose stored state took longer to load than
/// the group allows for (the load goes on; the store is slow or down).
pub const PARTITION_LOAD_OVERDUE_TOTAL: &str = "tallyd_partition_load_overdue_total";
/// Counter: flushes refused because another instance owns the partition now.
pub const FLUSH_FENCED_TOTAL: &str = "tallyd_flush_fenced_total";
/// Counter: dead letters that could not be queued or delivered.
pub const DEAD_LETTER_FAILURES_TOTAL: &str = "tallyd_dead_letter_failures_total";
/// Counter: Kafka client errors.
pub const KAFKA_ERRORS_TOTAL: &str = "tallyd_kafka_errors_total";
/// Counter: times the broker returned messages past a partition's next offset.
pub const OFFSET_GAPS_TOTAL: &str = "tallyd_offset_gaps_total";
/// Counter: messages before a partition's position that came again (skipped).
pub const REPLAYED_MESSAGES_TOTAL: &str = "tallyd_replayed_messages_total";

/// Gauge: webhook callbacks still to be delivered (pending outbox rows).
pub const WEBHOOK_OUTBOX_PENDING: &str = "tallyd_webhook_outbox_pending";
/// Gauge: webhook callbacks being sent now.
pub const WEBHOOKS_IN_FLIGHT: &str = "tallyd_webhooks_in_flight";
/// Counter: finished webhook callbacks removed from the outbox.
pub const WEBHOOK_OUTBOX_PRUNED_TOTAL: &str = "tallyd_webhook_outbox_pruned_total";
/// Counter `{outcome = delivered | retried | failed}`: webhook delivery attempts.
pub const WEBHOOK_DELIVERIES_TOTAL: &str = "tallyd_webhook_deliveries_total";

/// Summary: a CDR's event time (`timestamp`) to when it was counted.
pub const CDR_EVENT_TO_COUNTED_SECONDS: &str = "tallyd_cdr_event_to_counted_seconds";
/// Summary: a CDR consumed from Kafka to its flush landing in the store.
pub const CDR_CONSUMED_TO_FLUSHED_SECONDS: &str = "tallyd_cdr_consumed_to_flushed_seconds";
/// Summary: a hold request received to its answer sent.
pub const HOLD_REQUEST_TO_ANSWER_SECONDS: &str = "tallyd_hold_request_to_answer_seconds";
/// Summary: a usage trigger's crossing to its callback sent.
pub const TRIGGER_CROSSING_TO_CALLBACK_SECONDS: &str =
    "tallyd_trigger_crossing_to_callback_seconds";

// --- Names the wallet, hold and webhook work will emit (see PLANNED) -----------

/// Counter `{outcome = granted | repeated | refused | limited}`: hold requests.
pub const HOLDS_TOTAL: &str = "tallyd_holds_total";
/// Counter: store transactions of the hold writer (grants, releases and
/// expiries; [`HOLD_WRITES_TOTAL`] ÷ this = writes per group commit).
pub const HOLD_COMMITS_TOTAL: &str = "tallyd_hold_commits_total";
/// Counter: grants, releases and expiries the hold writer wrote.
pub const HOLD_WRITES_TOTAL: &str = "tallyd_hold_writes_total";
/// Gauge: wallets of this instance's accounts where not one more hold fits.
pub const WALLETS_PAUSED: &str = "tallyd_wallets_paused";
/// Gauge: wallets of this instance's accounts where fewer than two holds fit.
pub const WALLETS_LOW: &str = "tallyd_wallets_low";
/// Counter `{api}`: requests whose credentials were refused.
pub const HTTP_AUTH_FAILURES_TOTAL: &str = "tallyd_http_auth_failures_total";
/// Counter `{api}`: requests refused (429) because their client failed too often.
pub const HTTP_AUTH_THROTTLED_TOTAL: &str = "tallyd_http_auth_throttled_total";
/// Gauge: open HTTP connections.
pub const HTTP_CONNECTIONS: &str = "tallyd_http_connections";
/// Counter: connections closed at accept because every open one was serving.
pub const HTTP_CONNECTIONS_REFUSED_TOTAL: &str = "tallyd_http_connections_refused_total";
/// Counter: idle connections closed to make room for a new one at the cap.
pub const HTTP_CONNECTIONS_EVICTED_TOTAL: &str = "tallyd_http_connections_evicted_total";
/// Counter: top-ups credited.
pub const WALLET_CREDITS_TOTAL: &str = "tallyd_wallet_credits_total";
/// Counter `{outcome = answered | unavailable}`: wallet requests forwarded to
/// the instance that owns the account's partition.
pub const WALLET_FORWARDED_TOTAL: &str = "tallyd_wallet_forwarded_total";
/// Counter: CDRs read from another partition than `kafka.partitioner` computes
/// for their key.
pub const CDR_PARTITION_MISMATCH_TOTAL: &str = "tallyd_cdr_partition_mismatch_total";

// --- The catalogue --------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
    Summary,
}

/// One metric: what `/metrics` says about it and what its labels may be.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    /// `None` for counts of things and 0/1 states.
    pub unit: Option<Unit>,
    /// Label names; each takes a bounded set of values.
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

const fn metric(
    name: &'static str,
    kind: Kind,
    unit: Option<Unit>,
    labels: &'static [&'static str],
    help: &'static str,
) -> Metric {
    Metric {
        name,
        kind,
        unit,
        labels,
        help,
    }
}

use Kind::{Counter, Gauge, Histogram as Hist, Summary as Summ};

/// Everything the daemon emits.
pub const CATALOGUE: &[Metric] = &[
    metric(CDRS_TOTAL, Counter, None, &["outcome"],
        "CDRs consumed, by outcome: counted, duplicate (id seen before, not counted again) or rejected (sent to the dead-letter topic)."),
    metric(CDRS_REJECTED_TOTAL, Counter, None, &["reason"],
        "Rejected CDRs by reason (the tallyd-reason header of the dead letter)."),
    metric(TRIGGERS_FIRED_TOTAL, Counter, None, &[],
        "Usage triggers fired: written to the webhook outbox in the flush transaction that crossed them, once per period."),
    metric(FLUSHES_TOTAL, Counter, None, &[],
        "Flushes that landed in the store (counter deltas, offsets and dedup ids in one transaction)."),
    metric(FLUSH_DURATION_SECONDS, Hist, Some(Unit::Seconds), &[],
        "Time a flush took, from hand-over to the flusher to commit, retries included."),
    metric(FLUSH_ROWS_TOTAL, Counter, None, &[],
        "Usage rows and by-number/by-agent breakdowns written by flushes."),
    metric(FLUSH_GAP_SECONDS, Gauge, Some(Unit::Seconds), &[],
        "Least time between the starts of two flushes under load: flush.interval_ms, or longer when the store is slow (flush.max_busy_share)."),
    metric(PENDING_CELLS, Gauge, None, &[],
        "Unflushed counter cells and breakdown entries, summed over the consumers; consumption pauses at flush.max_pending_cells."),
    metric(CONSUMER_PAUSED, Gauge, None, &[],
        "1 while any consumer is paused for backpressure (store slow or down), else 0."),
    metric(PARTITIONS_ASSIGNED, Gauge, None, &[],
        "Kafka partitions of the CDR topic this instance consumes."),
    metric(STORE_UP, Gauge, None, &[],
        "1 if the store answered its last operation (flush, load or API query), 0 while it fails with retryable errors (down, unreachable)."),
    metric(CONSUMER_LAG, Gauge, None, &["partition"],
        "Messages between where an assigned partition is read to and its end as of the last fetch; 0 once the partition is revoked, so the sum over instances is the group's lag."),
    metric(LAST_FLUSH_TIMESTAMP_SECONDS, Gauge, Some(Unit::Seconds), &[],
        "Unix time the last flush landed in the store; alert on its age while cells are pending."),
    metric(STORE_ERRORS_TOTAL, Counter, None, &[],
        "Store operations that failed with a retryable error (store down or busy; flushes and loads are retried with backoff)."),
    metric(STORE_PERMANENT_ERRORS_TOTAL, Counter, None, &["cause"],
        "Store operations that can never succeed (cause: page, sqlite, postgres, ...): a partition whose flush failed so is re-read from its stored offset later; the store is not reported down."),
    metric(PARTITION_LOAD_OVERDUE_TOTAL, Counter, None, &[],
        "Partition assignments whose stored offsets and dedup ids took longer to load than a third of the group's session or poll timeout (the load goes on; the consumer keeps heartbeating)."),
    metric(FLUSH_FENCED_TOTAL, Counter, None, &[],
        "Flushes refused because another instance owns the partition now (its offsets moved)."),
    metric(DEAD_LETTER_FAILURES_TOTAL, Counter, None, &[],
        "Dead letters that could not be queued or delivered to the dead-letter topic."),
    metric(KAFKA_ERRORS_TOTAL, Counter, None, &[],
        "Kafka consumer client errors (a broker that is down reports many a second)."),
    metric(OFFSET_GAPS_TOTAL, Counter, None, &[],
        "Times the broker returned messages past a partition's next offset (legal after compaction, else a broker that skipped messages)."),
    metric(REPLAYED_MESSAGES_TOTAL, Counter, None, &[],
        "Messages before a partition's position that came again and were skipped, so a stored position never moves back."),
    metric(CDR_EVENT_TO_COUNTED_SECONDS, Summ, Some(Unit::Seconds), &[],
        EVENT_TO_COUNTED_HELP),
    metric(CDR_CONSUMED_TO_FLUSHED_SECONDS, Summ, Some(Unit::Seconds), &[],
        CONSUMED_TO_FLUSHED_HELP),
    metric(HOLD_REQUEST_TO_ANSWER_SECONDS, Summ, Some(Unit::Seconds), &[],
        HOLD_TO_ANSWER_HELP),
    metric(TRIGGER_CROSSING_TO_CALLBACK_SECONDS, Summ, Some(Unit::Seconds), &[],
        TRIGGER_TO_CALLBACK_HELP),
    metric(HOLD_COMMITS_TOTAL, Counter, None, &[],
        "Store transactions of the hold writer (group commit: grants, releases and expiries made at the same time share one)."),
    metric(HOLD_WRITES_TOTAL, Counter, None, &[],
        "Hold grants, releases and expiries written by the hold writer (divided by tallyd_hold_commits_total: writes per group commit)."),
    metric(HOLDS_TOTAL, Counter, None, &["outcome"],
        "Holds by outcome: granted, repeated (same call_id again), refused (402 calls_paused), limited (429 concurrent calls), settled (its call's CDR charged), released (unanswered call or DELETE) or expired (no CDR within the maximum duration plus grace)."),
    metric(WALLETS_PAUSED, Gauge, None, &[],
        "Wallets owned by this instance whose available balance does not fit one more hold (status paused)."),
    metric(HTTP_AUTH_FAILURES_TOTAL, Counter, None, &["api"],
        "Requests whose credentials were refused, by API (twilio, agentphone, admin)."),
    metric(HTTP_AUTH_THROTTLED_TOTAL, Counter, None, &["api"],
        "Requests answered 429 because their client address failed authentication too often (api.auth_failures_per_minute)."),
    metric(HTTP_CONNECTIONS, Gauge, None, &[],
        "Open HTTP connections (at most http.max_connections)."),
    metric(HTTP_CONNECTIONS_REFUSED_TOTAL, Counter, None, &[],
        "Connections closed at accept because http.max_connections were open and every one was serving a request."),
    metric(HTTP_CONNECTIONS_EVICTED_TOTAL, Counter, None, &[],
        "Idle connections closed to make room for a new one at http.max_connections."),
    metric(WALLET_CREDITS_TOTAL, Counter, None, &[],
        "Top-ups credited (POST /admin/accounts/{sid}/credits; a repeated idempotency key is not counted again)."),
    metric(WALLET_FORWARDED_TOTAL, Counter, None, &["outcome"],
        "Wallet requests for accounts whose partition another instance owns: answered (forwarded to the owner, its answer passed back) or unavailable (503: the owner is not known, not recorded in a store that answers, or did not answer)."),
    metric(CDR_PARTITION_MISMATCH_TOTAL, Counter, None, &[],
        "CDRs read from another partition than kafka.partitioner computes for their key (the switch's partitioner differs from the configured one: wallets may be owned by the wrong instance)."),
    metric(WEBHOOK_DELIVERIES_TOTAL, Counter, None, &["outcome"],
        "Webhook delivery attempts by outcome: delivered, retried (will be tried again), failed (given up after the retry period) or refused (can never work: an address the policy refuses, a deleted account or webhook; failed at once)."),
    metric(WEBHOOK_OUTBOX_PENDING, Gauge, None, &[],
        "Webhook callbacks (usage triggers, wallet events) in the store's outbox still to be delivered, over all instances; read every second by the dispatcher."),
    metric(WEBHOOKS_IN_FLIGHT, Gauge, None, &[],
        "Webhook callbacks this instance is sending now (at most webhooks.max_in_flight)."),
    metric(WEBHOOK_OUTBOX_PRUNED_TOTAL, Counter, None, &[],
        "Finished (delivered or failed) webhook callbacks this instance removed from the store's outbox webhooks.keep_finished_secs after they finished; their counts stay in the delivery statistics."),
];

/// Metrics the wallet, hold and webhook work will emit, named now so that the
/// alert rules and the dashboard can use them. Not described (nothing emits
/// them yet); move an entry to [`CATALOGUE`] when wiring it.
pub const PLANNED: &[Metric] = &[metric(
    WALLETS_LOW,
    Gauge,
    None,
    &[],
    "Wallets owned by this instance where fewer than two more holds fit (status low).",
)];

/// A summary's help: what it measures, then what its values cover ([`WINDOW`]).
macro_rules! summary_help {
    ($what:literal) => {
        concat!(
            $what,
            " Quantiles over the last 5 minutes; _sum and _count since start."
        )
    };
}
const EVENT_TO_COUNTED_HELP: &str = summary_help!(
    "Seconds from a CDR's event time (its timestamp) to when tallyd counted it: switch and Kafka delay plus tallyd's own; late CDRs show in the tail."
);
const CONSUMED_TO_FLUSHED_HELP: &str = summary_help!(
    "Seconds from a CDR consumed from Kafka to its flush landing in the store: how stale the usage the API serves is."
);
const HOLD_TO_ANSWER_HELP: &str =
    summary_help!("Seconds from a hold request received to its answer sent.");
const TRIGGER_TO_CALLBACK_HELP: &str =
    summary_help!("Seconds from a usage trigger's crossing to its callback sent.");

/// CDR event time → counted.
pub static CDR_EVENT_TO_COUNTED: Summary = Summary::new(
    CDR_EVENT_TO_COUNTED_SECONDS,
    EVENT_TO_COUNTED_HELP,
    // Late CDRs count into the day they happened, however late; beyond this
    // they are recorded as this.
    Duration::from_secs(45 * 24 * 3600),
);
/// CDR consumed → flushed.
pub static CDR_CONSUMED_TO_FLUSHED: Summary = Summary::new(
    CDR_CONSUMED_TO_FLUSHED_SECONDS,
    CONSUMED_TO_FLUSHED_HELP,
    Duration::from_secs(24 * 3600),
);
/// Hold request → answer.
pub static HOLD_REQUEST_TO_ANSWER: Summary = Summary::new(
    HOLD_REQUEST_TO_ANSWER_SECONDS,
    HOLD_TO_ANSWER_HELP,
    Duration::from_secs(3600),
);
/// Usage trigger crossing → callback sent.
pub static TRIGGER_CROSSING_TO_CALLBACK: Summary = Summary::new(
    TRIGGER_CROSSING_TO_CALLBACK_SECONDS,
    TRIGGER_TO_CALLBACK_HELP,
    Duration::from_secs(7 * 24 * 3600),
);

/// The summaries `/metrics` renders, in this order.
pub static SUMMARIES: [&Summary; 4] = [
    &CDR_EVENT_TO_COUNTED,
    &CDR_CONSUMED_TO_FLUSHED,
    &HOLD_REQUEST_TO_ANSWER,
    &TRIGGER_CROSSING_TO_CALLBACK,
];

/// Looks a name up in [`CATALOGUE`].
pub fn catalogued(name: &str) -> Option<&'static Metric> {
    CATALOGUE.iter().find(|m| m.name == name)
}

// --- The exporter ---------------------------------------------------------------

/// Buckets of the (fixed-bucket) histograms: flush durations.
const BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// What `/metrics` serves: the recorder's metrics and the summaries.
#[derive(Clone)]
pub struct Exposition {
    handle: PrometheusHandle,
}

impl Exposition {
    /// The Prometheus text exposition of everything.
    pub fn render(&self) -> String {
        self.handle.run_upkeep();
        let mut text = self.handle.render();
        let now = Instant::now();
        for s in SUMMARIES {
            s.render_at(&mut text, now);
        }
        text
    }
}

/// Installs the global Prometheus recorder (once per process), describes the
/// catalogue and starts the counters at zero.
pub fn install() -> Exposition {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    let handle = HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets(BUCKETS)
                .expect("static buckets")
                .install_recorder()
                .expect("metrics recorder installed once");
            describe();
            start_at_zero();
            handle
        })
        .clone();
    Exposition { handle }
}

fn describe() {
    for m in CATALOGUE {
        let (name, help) = (m.name, m.help);
        match (m.kind, m.unit) {
            (Kind::Counter, Some(u)) => metrics::describe_counter!(name, u, help),
            (Kind::Counter, None) => metrics::describe_counter!(name, help),
            (Kind::Gauge, Some(u)) => metrics::describe_gauge!(name, u, help),
            (Kind::Gauge, None) => metrics::describe_gauge!(name, help),
            (Kind::Histogram, Some(u)) => metrics::describe_histogram!(name, u, help),
            (Kind::Histogram, None) => metrics::describe_histogram!(name, help),
            // Rendered by `Summary` itself, with its help.
            (Kind::Summary, _) => {}
        }
    }
}

/// Registers at zero every counter whose label values are known (a counter
/// that first appears at 1 loses that increment to `rate()`), and the gauges
/// whose value at start is known (an alert on "no partitions assigned" needs
/// the series before the first assignment).
fn start_at_zero() {
    for g in [
        PARTITIONS_ASSIGNED,
        CONSUMER_PAUSED,
        PENDING_CELLS,
        WEBHOOKS_IN_FLIGHT,
    ] {
        metrics::gauge!(g).set(0.0);
    }
    for m in CATALOGUE {
        if m.kind == Kind::Counter && m.labels.is_empty() {
            metrics::counter!(m.name).absolute(0);
        }
    }
    for outcome in ["counted", "duplicate", "rejected"] {
        metrics::counter!(CDRS_TOTAL, "outcome" => outcome).absolute(0);
    }
    for outcome in ["delivered", "retried", "failed", "refused"] {
        metrics::counter!(WEBHOOK_DELIVERIES_TOTAL, "outcome" => outcome).absolute(0);
    }
    for r in RejectReason::ALL {
        metrics::counter!(CDRS_REJECTED_TOTAL, "reason" => r.as_str()).absolute(0);
    }
}

// --- Summaries --------------------------------------------------------------------

/// Time a summary's quantiles look back over.
pub const WINDOW: Duration = Duration::from_secs(5 * 60);
/// The window is kept as this many slices; the oldest is dropped as time moves.
const SLICES: u32 = 5;
/// The quantiles rendered.
pub const QUANTILES: [f64; 4] = [0.5, 0.9, 0.99, 0.999];
/// Two significant digits: a quantile is reported as the upper edge of its
/// bucket, at most 1% above the true value, and a histogram reaching days in
/// microseconds stays under 40 KiB.
const SIGNIFICANT_DIGITS: u8 = 2;

/// A latency distribution rendered as a Prometheus summary.
///
/// Record one observation with [`Summary::record`] (a lock each: fine for
/// requests and callbacks), many from a hot thread through a [`LocalSummary`]
/// (a lock per published batch), or a flush's worth with
/// [`Summary::record_consumed`]. Recording never blocks on a scrape for
/// longer than the scrape's merge of a few histograms.
pub struct Summary {
    name: &'static str,
    help: &'static str,
    highest: Duration,
    window: OnceLock<Mutex<Window>>,
}

/// What a summary shows now.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Each of [`QUANTILES`] over the window, `None` when the window is empty.
    pub quantiles: [(f64, Option<Duration>); 4],
    /// Observations since start.
    pub count: u64,
    /// Sum of the observations since start.
    pub sum: Duration,
}

struct Window {
    slices: Vec<Histogram<u64>>,
    /// The slice being recorded into, and when its time began.
    current: usize,
    current_start: Instant,
    count: u64,
    sum_micros: u64,
}

impl Summary {
    /// A summary of durations up to `highest` (longer ones are recorded as
    /// `highest`; their sum is kept exactly).
    pub const fn new(name: &'static str, help: &'static str, highest: Duration) -> Summary {
        Summary {
            name,
            help,
            highest,
            window: OnceLock::new(),
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    fn window(&self, now: Instant) -> parking_lot::MutexGuard<'_, Window> {
        let mut w = self
            .window
            .get_or_init(|| {
                let highest = micros(self.highest).max(2);
                let slice = Histogram::new_with_bounds(1, highest, SIGNIFICANT_DIGITS)
                    .expect("histogram bounds are valid");
                Mutex::new(Window {
                    slices: vec![slice; SLICES as usize],
                    current: 0,
                    current_start: now,
                    count: 0,
                    sum_micros: 0,
                })
            })
            .lock();
        w.rotate(now);
        w
    }

    /// Records one observation.
    pub fn record(&self, d: Duration) {
        self.record_at(d, Instant::now());
    }

    /// Records the time since `start`.
    pub fn record_since(&self, start: Instant) {
        let now = Instant::now();
        self.record_at(now.saturating_duration_since(start), now);
    }

    fn record_at(&self, d: Duration, now: Instant) {
        self.window(now).record(micros(d), 1);
    }

    /// Records each batch of `consumed` as flushed at `flushed`: one lock for the
    /// whole flush.
    pub fn record_consumed(&self, consumed: &ConsumedAt, flushed: Instant) {
        if consumed.batches.is_empty() {
            return;
        }
        let mut w = self.window(flushed);
        for &(at, n) in &consumed.batches {
            w.record(micros(flushed.saturating_duration_since(at)), n);
        }
    }

    /// A buffer for a hot thread: it records without a lock and publishes into
    /// this summary in batches.
    pub fn local(&self) -> LocalSummary<'_> {
        LocalSummary {
            summary: self,
            pending: Vec::with_capacity(LOCAL_CAPACITY),
        }
    }

    fn publish_at(&self, micros: &[u64], now: Instant) {
        if micros.is_empty() {
            return;
        }
        let mut w = self.window(now);
        for &v in micros {
            w.record(v, 1);
        }
    }

    /// The quantiles over the window and the totals since start.
    pub fn snapshot(&self) -> Snapshot {
        self.snapshot_at(Instant::now())
    }

    fn snapshot_at(&self, now: Instant) -> Snapshot {
        let (merged, count, sum_micros) = match self.window.get() {
            None => (None, 0, 0),
            Some(_) => {
                let w = self.window(now);
                (Some(w.merged()), w.count, w.sum_micros)
            }
        };
        let quantiles = QUANTILES.map(|q| {
            let v = merged
                .as_ref()
                .filter(|h| !h.is_empty())
                .map(|h| Duration::from_micros(h.value_at_quantile(q)));
            (q, v)
        });
        Snapshot {
            quantiles,
            count,
            sum: Duration::from_micros(sum_micros),
        }
    }

    /// Appends the summary in the Prometheus text format, if it has recorded
    /// anything since start.
    fn render_at(&self, out: &mut String, now: Instant) {
        let s = self.snapshot_at(now);
        if s.count == 0 {
            return;
        }
        let name = self.name;
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        let _ = writeln!(out, "# HELP {name} {}", self.help);
        let _ = writeln!(out, "# TYPE {name} summary");
        for (q, v) in s.quantiles {
            match v {
                Some(v) => {
                    let _ = writeln!(out, "{name}{{quantile=\"{q}\"}} {}", v.as_secs_f64());
                }
                None => {
                    let _ = writeln!(out, "{name}{{quantile=\"{q}\"}} NaN");
                }
            }
        }
        let _ = writeln!(out, "{name}_sum {}", s.sum.as_secs_f64());
        let _ = writeln!(out, "{name}_count {}", s.count);
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Window {
    /// Drops the slices whose time has passed.
    fn rotate(&mut self, now: Instant) {
        let slice = WINDOW / SLICES;
        let elapsed = now.saturating_duration_since(self.current_start);
        let passed = (elapsed.as_nanos() / slice.as_nanos()) as u64;
        if passed == 0 {
            return;
        }
        for i in 1..=passed.min(SLICES as u64) {
            let idx = (self.current + i as usize) % self.slices.len();
            self.slices[idx].reset();
        }
        self.current = (self.current + (passed % SLICES as u64) as usize) % self.slices.len();
        self.current_start += slice * passed.min(u32::MAX as u64) as u32;
    }

    fn record(&mut self, micros: u64, n: u64) {
        self.slices[self.current].saturating_record_n(micros, n);
        self.count = self.count.saturating_add(n);
        self.sum_micros = self.sum_micros.saturating_add(micros.saturating_mul(n));
    }

    fn merged(&self) -> Histogram<u64> {
        let mut all = self.slices[self.current].clone();
        for (i, h) in self.slices.iter().enumerate() {
            if i != self.current {
                all.add(h).expect("slices share their bounds");
            }
        }
        all
    }
}

/// Observations a [`LocalSummary`] keeps before it publishes on its own.
const LOCAL_CAPACITY: usize = 4096;

/// A hot thread's buffer of observations for one [`Summary`]: `record` is a
/// push, [`LocalSummary::publish`] (once per batch, and on drop) takes the
/// summary's lock once for all of them.
pub struct LocalSummary<'a> {
    summary: &'a Summary,
    pending: Vec<u64>,
}

impl LocalSummary<'_> {
    pub fn record(&mut self, d: Duration) {
        self.pending.push(micros(d));
        if self.pending.len() >= LOCAL_CAPACITY {
            self.publish();
        }
    }

    /// Hands the buffered observations to the summary.
    pub fn publish(&mut self) {
        self.summary.publish_at(&self.pending, Instant::now());
        self.pending.clear();
    }
}

impl Drop for LocalSummary<'_> {
    fn drop(&mut self) {
        self.publish();
    }
}

/// How long ago, at `now`, was the Unix time `event_secs` (zero for an event
/// time in the future: a switch clock ahead of ours).
pub fn unix_age(event_secs: i64, now: SystemTime) -> Duration {
    let now = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as i128;
    let event = event_secs as i128 * 1_000_000;
    Duration::from_micros((now - event).clamp(0, u64::MAX as i128) as u64)
}

/// When the messages of a flush were consumed, batch by batch (batches a few
/// milliseconds apart share one entry), for [`Summary::record_consumed`] when
/// the flush lands.
#[derive(Debug, Default, Clone)]
pub struct ConsumedAt {
    batches: Vec<(Instant, u64)>,
}

/// Batches consumed within this of the last entry are added to it.
const CONSUMED_GRAIN: Duration = Duration::from_millis(10);

impl ConsumedAt {
    /// `n` messages were consumed at `at`.
    pub fn push(&mut self, at: Instant, n: u64) {
        if n == 0 {
            return;
        }
        match self.batches.last_mut() {
            Some((first, count)) if at.saturating_duration_since(*first) < CONSUMED_GRAIN => {
                *count += n
            }
            _ => self.batches.push((at, n)),
        }
    }

    /// When the first message recorded was consumed.
    pub fn first(&self) -> Option<Instant> {
        self.batches.first().map(|&(at, _)| at)
    }

    /// Messages recorded.
    pub fn messages(&self) -> u64 {
        self.batches.iter().map(|&(_, n)| n).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }
}

/// One line for the demo: each summary with observations, its quantiles over
/// the window.
pub fn latency_report() -> Option<String> {
    let parts: Vec<String> = SUMMARIES
        .iter()
        .filter_map(|s| {
            let snap = s.snapshot();
            (snap.count > 0).then(|| {
                let short = s
                    .name
                    .trim_start_matches("tallyd_")
                    .trim_end_matches("_seconds")
                    .replace("_to_", "→");
                let qs: Vec<String> = ["p50", "p90", "p99", "p99.9"]
                    .iter()
                    .zip(snap.quantiles)
                    .map(|(q, (_, v))| match v {
                        Some(v) => format!("{q} {}", human(v)),
                        None => format!("{q} -"),
                    })
                    .collect();
                format!("{short}: {} (n={})", qs.join(" "), snap.count)
            })
        })
        .collect();
    (!parts.is_empty()).then(|| format!("latency, last 5 min: {}", parts.join("; ")))
}

fn human(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 86_400.0 {
        format!("{:.1}d", s / 86_400.0)
    } else if s >= 60.0 {
        format!("{:.1}min", s / 60.0)
    } else if s >= 1.0 {
        format!("{s:.2}s")
    } else if s >= 0.001 {
        format!("{:.1}ms", s * 1e3)
    } else {
        format!("{}µs", d.as_micros())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEST_HELP: &str = "test summary";

    fn summary() -> Summary {
        Summary::new("tallyd_test_seconds", TEST_HELP, Duration::from_secs(3600))
    }

    fn quantile(s: &Snapshot, q: f64) -> Option<Duration> {
        s.quantiles.iter().find(|(x, _)| *x == q).unwrap().1
    }

    /// Within 1% (two significant digits).
    fn close(got: Option<Duration>, want: Duration) -> bool {
        let got = got.expect("a quantile").as_secs_f64();
        let want = want.as_secs_f64();
        (got - want).abs() <= want * 0.01 + 1e-6
    }

    #[test]
    fn quantiles_sum_and_count_of_known_values() {
        let s = summary();
        let t0 = Instant::now();
        // 1..=1000 ms: p50 = 500 ms, p90 = 900, p99 = 990, p99.9 = 999.
        for ms in 1..=1000 {
            s.record_at(Duration::from_millis(ms), t0);
        }
        let snap = s.snapshot_at(t0);
        assert_eq!(snap.count, 1000);
        assert_eq!(snap.sum, Duration::from_millis(500_500));
        for (q, want) in [(0.5, 500), (0.9, 900), (0.99, 990), (0.999, 999)] {
            let got = quantile(&snap, q);
            assert!(close(got, Duration::from_millis(want)), "q{q}: {got:?}");
        }
    }

    #[test]
    fn the_window_forgets_old_observations_but_the_totals_do_not() {
        let s = summary();
        let t0 = Instant::now();
        for _ in 0..100 {
            s.record_at(Duration::from_secs(10), t0);
        }
        // Within the window: the old values still set the quantiles.
        let mid = t0 + WINDOW / 2;
        s.record_at(Duration::from_millis(1), mid);
        assert!(close(
            quantile(&s.snapshot_at(mid), 0.5),
            Duration::from_secs(10)
        ));
        // A window later only the newer observation is left.
        let later = t0 + WINDOW + WINDOW / SLICES;
        let snap = s.snapshot_at(later);
        assert!(close(quantile(&snap, 0.999), Duration::from_millis(1)));
        assert_eq!(snap.count, 101);
        // Long after, the window is empty; the totals stay.
        let snap = s.snapshot_at(t0 + WINDOW * 10);
        assert_eq!(snap.quantiles.map(|(_, v)| v), [None; 4]);
        assert_eq!(snap.count, 101);
        assert_eq!(
            snap.sum,
            Duration::from_secs(1000) + Duration::from_millis(1)
        );
    }

    #[test]
    fn longer_than_highest_counts_as_highest_and_sums_exactly() {
        let s = Summary::new("tallyd_test_seconds", TEST_HELP, Duration::from_secs(10));
        let t0 = Instant::now();
        s.record_at(Duration::from_secs(100), t0);
        let snap = s.snapshot_at(t0);
        assert!(close(quantile(&snap, 0.5), Duration::from_secs(10)));
        assert_eq!(snap.sum, Duration::from_secs(100));
    }

    #[test]
    fn local_buffers_publish_on_demand_when_full_and_on_drop() {
        let s = summary();
        let mut local = s.local();
        local.record(Duration::from_millis(5));
        assert_eq!(s.snapshot().count, 0, "nothing before publish");
        local.publish();
        assert_eq!(s.snapshot().count, 1);
        for _ in 0..LOCAL_CAPACITY {
            local.record(Duration::from_millis(7));
        }
        assert_eq!(s.snapshot().count, 1 + LOCAL_CAPACITY as u64);
        local.record(Duration::from_millis(9));
        drop(local);
        let snap = s.snapshot();
        assert_eq!(snap.count, 2 + LOCAL_CAPACITY as u64);
        assert!(close(quantile(&snap, 0.5), Duration::from_millis(7)));
    }

    #[test]
    fn locals_on_many_threads_add_up() {
        let s = summary();
        std::thread::scope(|scope| {
            for t in 0..4u64 {
                let s = &s;
                scope.spawn(move || {
                    let mut local = s.local();
                    for i in 0..10_000u64 {
                        local.record(Duration::from_micros(1 + (i + t) % 100));
                        if i % 500 == 0 {
                            local.publish();
                        }
                    }
                });
            }
            scope.spawn(|| {
                for _ in 0..50 {
                    let _ = s.snapshot();
                }
            });
        });
        assert_eq!(s.snapshot().count, 40_000);
    }

    #[test]
    fn consumed_batches_are_recorded_by_age_at_the_flush() {
        let s = summary();
        let t0 = Instant::now();
        let mut consumed = ConsumedAt::default();
        consumed.push(t0, 10);
        consumed.push(t0 + Duration::from_millis(1), 5); // same grain: one entry
        consumed.push(t0 + Duration::from_millis(1500), 85);
        consumed.push(t0 + Duration::from_millis(1600), 0);
        assert_eq!(consumed.messages(), 100);
        assert_eq!(consumed.batches.len(), 2);
        let flushed = t0 + Duration::from_secs(2);
        s.record_consumed(&consumed, flushed);
        let snap = s.snapshot_at(flushed);
        assert_eq!(snap.count, 100);
        // 85 of 100 were 500 ms old at the flush, 15 were 2 s old.
        assert!(close(quantile(&snap, 0.5), Duration::from_millis(500)));
        assert!(close(quantile(&snap, 0.9), Duration::from_secs(2)));
        s.record_consumed(&ConsumedAt::default(), flushed);
        assert_eq!(s.snapshot_at(flushed).count, 100);
    }

    #[test]
    fn record_since_measures_from_the_start() {
        let s = summary();
        let start = Instant::now()
            .checked_sub(Duration::from_millis(50))
            .expect("the clock is past 50 ms");
        s.record_since(start);
        let snap = s.snapshot();
        assert_eq!(snap.count, 1);
        let got = quantile(&snap, 0.5).unwrap();
        // 50 ms ago, plus however long this took (within two digits' bucket).
        assert!(
            got >= Duration::from_millis(49) && got < Duration::from_secs(5),
            "{got:?}"
        );
    }

    /// The four summaries as their call sites record them: event ages from a
    /// consumer's batch, a flush's consumed batches, a hold request's time and
    /// a trigger's delay; the demo's line reports each.
    #[test]
    fn the_daemon_summaries_record_and_report() {
        let now_secs = 1_800_000_000;
        let now = UNIX_EPOCH + Duration::from_secs(now_secs as u64);
        let mut local = CDR_EVENT_TO_COUNTED.local();
        for age in [2, 3, 4, 3600] {
            local.record(unix_age(now_secs - age, now));
        }
        drop(local);
        let mut consumed = ConsumedAt::default();
        let t0 = Instant::now();
        consumed.push(t0, 100);
        CDR_CONSUMED_TO_FLUSHED.record_consumed(&consumed, t0 + Duration::from_millis(300));
        HOLD_REQUEST_TO_ANSWER.record_since(Instant::now());
        TRIGGER_CROSSING_TO_CALLBACK.record(Duration::from_millis(1500));

        let event = CDR_EVENT_TO_COUNTED.snapshot();
        assert_eq!(event.count, 4);
        assert!(close(quantile(&event, 0.5), Duration::from_secs(3)));
        assert!(close(quantile(&event, 0.999), Duration::from_secs(3600)));
        assert_eq!(CDR_CONSUMED_TO_FLUSHED.snapshot().count, 100);
        assert_eq!(HOLD_REQUEST_TO_ANSWER.snapshot().count, 1);
        let line = latency_report().unwrap();
        for part in [
            // Quantiles are the upper edge of their bucket: within 1% above.
            "cdr_event→counted: p50 3.0",
            "p99.9 60.",
            "min (n=4)",
            "cdr_consumed→flushed: p50 30",
            "hold_request→answer: p50 ",
            "trigger_crossing→callback: p50 1.5",
        ] {
            assert!(line.contains(part), "{part:?} not in {line}");
        }
    }

    #[test]
    fn unix_age_is_never_negative() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000) + Duration::from_millis(250);
        assert_eq!(
            unix_age(999_990, now),
            Duration::from_secs(10) + Duration::from_millis(250)
        );
        assert_eq!(unix_age(2_000_000, now), Duration::ZERO);
    }

    #[test]
    fn renders_a_prometheus_summary_only_once_it_has_data() {
        let s = summary();
        let mut out = String::new();
        s.render_at(&mut out, Instant::now());
        assert_eq!(out, "", "nothing recorded, nothing rendered");
        s.record(Duration::from_millis(250));
        s.record(Duration::from_millis(750));
        s.render_at(&mut out, Instant::now());
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "# HELP tallyd_test_seconds test summary");
        assert_eq!(lines[1], "# TYPE tallyd_test_seconds summary");
        for (line, q) in lines[2..6].iter().zip(["0.5", "0.9", "0.99", "0.999"]) {
            let prefix = format!("tallyd_test_seconds{{quantile=\"{q}\"}} ");
            let v: f64 = line.strip_prefix(&prefix).unwrap().parse().unwrap();
            assert!(v > 0.2 && v < 0.76, "{line}");
        }
        assert_eq!(lines[6], "tallyd_test_seconds_sum 1");
        assert_eq!(lines[7], "tallyd_test_seconds_count 2");
        // An empty window (after a quiet spell) still renders, with NaN quantiles.
        let mut quiet = String::new();
        s.render_at(&mut quiet, Instant::now() + WINDOW * 2);
        assert!(quiet.contains("tallyd_test_seconds{quantile=\"0.99\"} NaN"));
        assert!(quiet.contains("tallyd_test_seconds_count 2"));
    }

    #[test]
    fn catalogue_follows_prometheus_conventions() {
        let mut seen = std::collections::HashSet::new();
        let per_account = [
            "account",
            "account_sid",
            "sid",
            "phone_number",
            "number",
            "agent",
            "agent_id",
            "call_id",
            "id",
        ];
        for m in CATALOGUE.iter().chain(PLANNED) {
            assert!(seen.insert(m.name), "{} listed twice", m.name);
            assert!(m.name.starts_with("tallyd_"), "{}", m.name);
            assert!(
                m.name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{} is not snake_case",
                m.name
            );
            assert_eq!(
                m.kind == Kind::Counter,
                m.name.ends_with("_total"),
                "{}: _total is for counters, and every counter has it",
                m.name
            );
            let unit_suffix = match m.unit {
                Some(Unit::Seconds) => Some("_seconds"),
                Some(Unit::Bytes) => Some("_bytes"),
                None => None,
                Some(u) => panic!("{}: {u:?} is not a base unit", m.name),
            };
            if let Some(suffix) = unit_suffix {
                assert!(m.name.ends_with(suffix), "{} must end in {suffix}", m.name);
            }
            for bad in ["_seconds", "_bytes"] {
                if unit_suffix != Some(bad) {
                    assert!(
                        !m.name.contains(bad),
                        "{} says {bad} without the unit",
                        m.name
                    );
                }
            }
            for l in m.labels {
                assert!(
                    !per_account.contains(l),
                    "{}: label {l} is unbounded",
                    m.name
                );
                assert!(
                    *l != "quantile" && *l != "le",
                    "{}: {l} is reserved",
                    m.name
                );
            }
            assert!(
                m.help.len() > 20 && !m.help.contains('\n'),
                "{}: help",
                m.name
            );
        }
        for s in SUMMARIES {
            let m = catalogued(s.name).expect("every summary is catalogued");
            assert_eq!((m.kind, m.help), (Kind::Summary, s.help));
            assert!(
                m.help.ends_with("_sum and _count since start."),
                "{}",
                m.name
            );
        }
    }

    /// Call sites name metrics with the catalogue's constants, never with a
    /// string of their own (which could be a name the catalogue lacks).
    #[test]
    fn call_sites_use_the_catalogue_constants() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut files = vec![];
        let mut dirs = vec![root.join("src")];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    dirs.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    files.push(p);
                }
            }
        }
        let mut literal_sites = vec![];
        for f in files {
            let rel = f.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if rel == "src/metrics.rs" {
                continue;
            }
            let text = std::fs::read_to_string(&f).unwrap();
            for mac in ["counter!(", "gauge!(", "histogram!("] {
                for (at, _) in text.match_indices(mac) {
                    // The name, if it is a string literal (rustfmt may put it
                    // on the next line).
                    let args = text[at + mac.len()..].trim_start();
                    let Some(literal) = args.strip_prefix('"') else {
                        continue;
                    };
                    let name = literal.split('"').next().unwrap();
                    let line = text[..at].lines().count();
                    literal_sites.push(format!("{rel}:{line} ({name})"));
                }
            }
        }
        assert!(
            literal_sites.is_empty(),
            "use the catalogue's name constants at {literal_sites:?}"
        );
    }
}
