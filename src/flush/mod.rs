//! The flusher: turns the consistent snapshots the consumers take into store
//! transactions, off the hot path.
//!
//! - [`expand`] (pure): the snapshot's counter deltas become the usage pages
//!   they add to, and its partitions are spread over the writer connections.
//! - This module: the job protocol between a consumer and its flusher.
//! - [`worker`]: the flusher thread — waits for dead letters to be safe, writes
//!   each share in one transaction ([`crate::store::flush`]), retries what the
//!   store may still take, reports what it never will.

pub mod expand;
pub mod worker;

use std::sync::atomic::{AtomicBool, AtomicI64};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::Duration;

use crate::calendar::Day;
use crate::counters::Deltas;
use crate::store::{self, DedupRows, FlushOutcome, OffsetAdvance};

pub use worker::Flusher;

/// One partition's share of a flush: the usage counted from its messages, the
/// offsets those messages span and the ids first seen among them. It is always
/// written whole, in one transaction.
pub struct PartitionCut {
    pub deltas: Deltas,
    pub offset: OffsetAdvance,
    pub dedup: Option<DedupRows>,
    /// Wallet debits and hold settlements of its CDRs.
    pub wallet: crate::wallet::WalletCut,
    /// When its messages were consumed (`tallyd_cdr_consumed_to_flushed_seconds`,
    /// and the time a usage trigger's crossing is counted from).
    pub consumed: crate::metrics::ConsumedAt,
    /// Likely usage trigger crossings among its CDRs: trigger SID, period,
    /// when the CDR that reached the value was counted.
    pub crossings: Vec<(
        std::sync::Arc<str>,
        crate::calendar::Period,
        std::time::Instant,
    )>,
}

/// What the consumer hands over at a flush: a consistent cut.
pub struct Snapshot {
    pub parts: Vec<PartitionCut>,
    pub prune_dedup_before: Option<Day>,
}

/// A flush that landed: how, and how long the store took to write it (the batch's
/// expansion and the successful attempt; retries and backoff excluded, so a store
/// outage does not read as a slow store).
pub struct Flushed {
    pub outcome: FlushOutcome,
    pub took: Duration,
    /// Partitions whose cut failed with a permanent store error (see
    /// [`crate::store::ErrorKind`]): nothing of theirs was written, and the
    /// store still holds their previous offset; every other partition's cut
    /// landed. The consumer re-reads them from the store's offset later.
    pub stuck: Vec<(i32, store::Error)>,
}

pub type FlushResult = Result<Flushed, store::Error>;

/// A consumer's snapshot handed to its flusher; the result comes back on
/// `reply`. Setting `cancel` makes the flusher give up retrying (at shutdown or
/// when a revocation cannot wait any longer).
pub struct Job {
    pub snapshot: Box<Snapshot>,
    pub cancel: Arc<AtomicBool>,
    pub reply: SyncSender<FlushResult>,
}

/// Shared health of the flusher, read by `/readyz` and the metrics.
#[derive(Default)]
pub struct FlushHealth {
    /// Unix seconds of the last successful flush (0 = never).
    pub last_success: AtomicI64,
}
