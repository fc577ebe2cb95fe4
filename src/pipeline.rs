//! The in-process hot path for one message: decode → validate → (dedup) → rate →
//! counters. Pure and synchronous; the Kafka consumer calls it per message.

use crate::cdr::{decode, Cdr, Rejection};
use crate::counters::{Deltas, LeafDay, Tally, UsageCounters};
use crate::rating::{Charge, Tariff};

/// What happened to one well-formed CDR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Rated and added to the counters.
    Counted(Charge),
    /// Its id was seen before; nothing was added.
    Duplicate,
}

/// Decides whether a CDR id has been seen before (and remembers it if not).
pub trait SeenIds {
    /// Returns `true` the first time `cdr` is offered, `false` for a repeat.
    fn first_sighting(&mut self, cdr: &Cdr<'_>) -> bool;
}

/// Accepts every CDR: for benches and callers that dedup elsewhere.
pub struct NoDedup;

impl SeenIds for NoDedup {
    #[inline]
    fn first_sighting(&mut self, _: &Cdr<'_>) -> bool {
        true
    }
}

/// Where rated CDRs are added: the shared, sharded [`UsageCounters`], or a
/// [`Deltas`] that its owner already holds exclusively (the daemon's consumer
/// thread, under its state lock), which then needs no lock of its own.
pub trait Record {
    fn record(self, key: LeafDay, t: Tally, phone_number: Option<&str>, agent_id: Option<&str>);
}

impl Record for &UsageCounters {
    #[inline]
    fn record(self, key: LeafDay, t: Tally, phone_number: Option<&str>, agent_id: Option<&str>) {
        UsageCounters::record(self, key, t, phone_number, agent_id)
    }
}

impl Record for &mut Deltas {
    #[inline]
    fn record(self, key: LeafDay, t: Tally, phone_number: Option<&str>, agent_id: Option<&str>) {
        Deltas::record(self, key, t, phone_number, agent_id)
    }
}

/// Runs one message through decode → validate → dedup → rate → counters.
#[inline]
pub fn ingest(
    bytes: &[u8],
    tariff: &Tariff,
    counters: impl Record,
    seen: &mut impl SeenIds,
) -> Result<Outcome, Rejection> {
    let cdr = decode(bytes)?;
    if !seen.first_sighting(&cdr) {
        return Ok(Outcome::Duplicate);
    }
    let leaf = cdr.leaf();
    let charge = tariff.rate(&cdr, leaf);
    counters.record(
        LeafDay {
            account: cdr.account,
            day: cdr.day(),
            leaf,
        },
        Tally::one(charge),
        cdr.phone_number.as_deref(),
        cdr.agent_id.as_deref(),
    );
    Ok(Outcome::Counted(charge))
}
