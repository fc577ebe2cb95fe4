//! The in-process hot path for one message: decode → validate → (dedup) → rate →
//! counters. Pure and synchronous; the Kafka consumer calls it per message.

use crate::cdr::{decode, Cdr, Rejection};
use crate::counters::{LeafDay, Tally, UsageCounters};
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

/// Runs one message through decode → validate → dedup → rate → counters.
#[inline]
pub fn ingest(
    bytes: &[u8],
    tariff: &Tariff,
    counters: &UsageCounters,
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
