//! The in-process hot path: decode → validate → (dedup) → rate → wallet → counters.
//! Pure and synchronous; the Kafka consumer runs every polled batch through
//! [`ingest_batch`], tests and tools call [`ingest`] per message.

use crate::cdr::{decode, AccountSid, Cdr, Rejection};
use crate::counters::table::prefetch;
use crate::counters::{Deltas, LeafDay, Tally};
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
    /// What [`SeenIds::prepare`] works out for [`SeenIds::first_sighting`].
    type Token: Copy;
    /// Works out what the lookup of `cdr`'s id needs, and starts loading the
    /// memory it will read (a batch runs this well before the lookup).
    fn prepare(&self, cdr: &Cdr<'_>) -> Self::Token;
    /// Returns `true` the first time an id is offered, `false` for a repeat.
    fn first_sighting(&mut self, token: Self::Token) -> bool;
}

/// Accepts every CDR: for benches and callers that dedup elsewhere.
pub struct NoDedup;

impl SeenIds for NoDedup {
    type Token = ();
    #[inline]
    fn prepare(&self, _: &Cdr<'_>) {}
    #[inline]
    fn first_sighting(&mut self, _: ()) -> bool {
        true
    }
}

#[inline]
fn leaf_day(cdr: &Cdr<'_>) -> LeafDay {
    LeafDay {
        account: cdr.account,
        day: cdr.day(),
        leaf: cdr.leaf(),
        hour: (cdr.timestamp.rem_euclid(86_400) / 3_600) as u8,
    }
}

/// Runs one message through the same path as [`ingest_batch`] (for tests and
/// tools that count CDRs one at a time).
pub fn ingest(
    bytes: &[u8],
    tariff: &Tariff,
    deltas: &mut Deltas,
    seen: &mut impl SeenIds,
) -> Result<Outcome, Rejection> {
    let mut out = None;
    ingest_batch(&[bytes], tariff, deltas, seen, &mut (), |_, r| {
        out = Some(r)
    });
    out.expect("one message, one outcome")
}

/// Where a rated CDR's price is debited: the partition's wallet
/// [`Ledger`](crate::wallet::Ledger), or nowhere (`()`, for benches and tools
/// without wallets).
pub trait Debit {
    /// Starts loading what a debit of `account` will touch: wave 0, 1 and 2
    /// of a batch, each a line the one before makes reachable.
    #[inline]
    fn prefetch(&self, _account: AccountSid, _wave: u8) {}
    fn debit(&mut self, cdr: &Cdr<'_>, charge: Charge);
}

impl Debit for () {
    #[inline]
    fn debit(&mut self, _: &Cdr<'_>, _: Charge) {}
}

impl Debit for crate::wallet::Ledger {
    #[inline]
    fn prefetch(&self, account: AccountSid, wave: u8) {
        crate::wallet::Ledger::prefetch(self, account, wave)
    }
    #[inline]
    fn debit(&mut self, cdr: &Cdr<'_>, charge: Charge) {
        crate::wallet::Ledger::debit(self, cdr, charge)
    }
}

/// A decoded CDR of a batch with what its updates need.
struct Prepared<'m, T> {
    cdr: Cdr<'m>,
    key: LeafDay,
    seen: T,
    placement: crate::counters::Placement,
}

/// Runs a batch of messages through the same path as [`ingest`], one message
/// after the other in effect, and reports each message's result to `outcome`
/// (with its index in `msgs`), in order.
///
/// The memory the batch's updates will touch — dedup slots, counter and wallet
/// slots, then the cells, breakdowns and ledger entries they point to, then the
/// wallets — is requested in waves ahead of the updates, so the cache misses
/// of the whole batch overlap instead of following one another; with live
/// state far larger than the cache they were most of the cost of a CDR.
/// Messages of one partition share `seen`.
pub fn ingest_batch<'m, S: SeenIds>(
    msgs: &[&'m [u8]],
    tariff: &Tariff,
    deltas: &mut Deltas,
    seen: &mut S,
    wallet: &mut impl Debit,
    mut outcome: impl FnMut(usize, Result<Outcome, Rejection>),
) {
    // Wave 1: decode, hash, prefetch the slots; and the next message's bytes,
    // which the broker thread wrote on another core.
    let prepared: Vec<Result<Prepared<'m, S::Token>, Rejection>> = msgs
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if let Some(next) = msgs.get(i + 1) {
                for line in next.chunks(64) {
                    prefetch(line.as_ptr());
                }
            }
            decode(m).map(|cdr| {
                wallet.prefetch(cdr.account, 0);
                let key = leaf_day(&cdr);
                let placement =
                    deltas.place(&key, cdr.phone_number.as_deref(), cdr.agent_id.as_deref());
                Prepared {
                    seen: seen.prepare(&cdr),
                    key,
                    placement,
                    cdr,
                }
            })
        })
        .collect();
    // Wave 2: the slots are in cache; prefetch the entries they point to.
    for p in prepared.iter().flatten() {
        deltas.prefetch(&p.placement, p.key.leaf);
        wallet.prefetch(p.cdr.account, 1);
    }
    // Wave 2b: the ledger entries are in cache; prefetch the wallets.
    for p in prepared.iter().flatten() {
        wallet.prefetch(p.cdr.account, 2);
    }
    // Wave 3: the updates, in message order (read in place: a prepared CDR
    // is a few hundred bytes, and moving each out again showed in profiles).
    for (i, p) in prepared.iter().enumerate() {
        let result = p.as_ref().map_err(Rejection::clone).map(|p| {
            if !seen.first_sighting(p.seen) {
                return Outcome::Duplicate;
            }
            let charge = tariff.rate(&p.cdr, p.key.leaf);
            wallet.debit(&p.cdr, charge);
            deltas.record_at(
                &p.placement,
                p.key,
                Tally::one(charge),
                p.cdr.phone_number.as_deref(),
                p.cdr.agent_id.as_deref(),
            );
            Outcome::Counted(charge)
        });
        outcome(i, result);
    }
}
