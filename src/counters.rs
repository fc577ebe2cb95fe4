//! Sharded in-memory usage counters: the deltas since the last flush.
//!
//! The hot path adds one [`Tally`] per CDR to its (account, UTC day, leaf category)
//! cell — one hash-map update under an uncontended shard lock. Rollups and coarser
//! periods are *not* maintained on the hot path: a CDR would touch up to
//! 4 categories × 4 periods = 16 cells, while a flush expands each leaf-day delta
//! (which aggregates many CDRs) once. `benches/pipeline.rs` measures both choices.
//!
//! What the benches say (2-core VM, load average ≈ 6 from parallel builds, so
//! absolute times are inflated; compare within a group):
//!
//! - `design-rollups`, 100k CDRs recorded then taken and expanded: leaf×day +
//!   expand 342 ms (10k accounts) / 543 ms (1M); every ancestor × 4 periods on the
//!   hot path 291 ms / 412 ms. At that batch size a leaf-day cell holds only 1–10
//!   CDRs, so expanding at flush does about the hot-path work again, plus `take`
//!   re-merging the shards. Leaf×day pays off when many CDRs share a cell between
//!   flushes (2 s at 2M CDR/s is 4M CDRs; over 10k accounts ≈ 25 per cell) and it
//!   keeps 16× fewer live cells for backpressure. It stays, but the numbers above
//!   do not settle it for flushes that see mostly distinct cells; re-measure with
//!   a production-sized batch before changing it.
//! - `design-shards`, one update: mutex shards 180 ns vs `dashmap` 189 ns (10k
//!   accounts), 357 vs 305 ns (1M); two writers: 406 vs 317 ns per CDR (10k),
//!   369 vs 432 ns (1M). Within noise of each other; mutex shards are kept because
//!   `take` swaps a whole shard in one lock, which `dashmap` cannot do.
//!
//! [`UsageCounters::take`] swaps each shard's map for an empty one, so writers are
//! held only for a pointer swap per shard.

use std::hash::Hash;

use crossbeam_utils::CachePadded;
use hashbrown::{Equivalent, HashMap};
use parking_lot::Mutex;
use rustc_hash::FxBuildHasher;

use crate::calendar::{Day, Period};
use crate::category::Category;
use crate::cdr::AccountSid;
use crate::rating::Charge;

/// Count, usage and price accumulated in one cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tally {
    /// Usage events (calls, messages).
    pub count: u64,
    /// Billed seconds (calls) or segments (messages); for `totalprice`, unused.
    pub usage: u64,
    /// Price in 10⁻⁵ of the currency unit.
    pub price: i64,
}

impl Tally {
    #[inline]
    pub fn one(charge: Charge) -> Tally {
        Tally {
            count: 1,
            usage: charge.usage,
            price: charge.price,
        }
    }
    #[inline]
    pub fn add(&mut self, o: Tally) {
        self.count += o.count;
        self.usage += o.usage;
        self.price += o.price;
    }
}

/// The hot-path cell key: account, event day, leaf category.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeafDay {
    pub account: AccountSid,
    pub day: Day,
    pub leaf: Category,
}

/// A stored-record key: account, category (any level), period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordKey {
    pub account: AccountSid,
    pub category: Category,
    pub period: Period,
}

/// What a breakdown row counts by: the account's own number or the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dimension {
    Number,
    Agent,
}

impl Dimension {
    pub fn as_str(self) -> &'static str {
        match self {
            Dimension::Number => "number",
            Dimension::Agent => "agent",
        }
    }
}

/// Whether a breakdown row counts calls or messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum UsageClass {
    Calls,
    Messages,
}

impl UsageClass {
    pub fn of(leaf: Category) -> UsageClass {
        match leaf.unit() {
            crate::category::Unit::Calls => UsageClass::Calls,
            _ => UsageClass::Messages,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            UsageClass::Calls => "calls",
            UsageClass::Messages => "messages",
        }
    }
}

/// Usage by phone number or agent, per day (AgentPhone's by-number/by-agent views).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct BreakdownKey {
    pub account: AccountSid,
    pub day: Day,
    pub dimension: Dimension,
    pub value: Box<str>,
    pub class: UsageClass,
}

/// Everything taken from the counters at one flush.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Deltas {
    pub leaf_days: HashMap<LeafDay, Tally, FxBuildHasher>,
    pub breakdowns: HashMap<BreakdownKey, Tally, FxBuildHasher>,
}

impl Deltas {
    pub fn is_empty(&self) -> bool {
        self.leaf_days.is_empty() && self.breakdowns.is_empty()
    }

    /// Adds a single CDR's charge; used by a shard and by single-threaded callers.
    #[inline]
    pub fn record(&mut self, key: LeafDay, t: Tally) {
        self.leaf_days.entry(key).or_default().add(t);
    }

    pub fn record_breakdown(
        &mut self,
        account: AccountSid,
        day: Day,
        dim: Dimension,
        value: &str,
        class: UsageClass,
        t: Tally,
    ) {
        // Look up by borrowed key first so repeat numbers/agents do not allocate.
        let probe = BreakdownProbe {
            account,
            day,
            dimension: dim,
            value,
            class,
        };
        match self.breakdowns.get_mut(&probe) {
            Some(tally) => tally.add(t),
            None => {
                let key = BreakdownKey {
                    account,
                    day,
                    dimension: dim,
                    value: value.into(),
                    class,
                };
                self.breakdowns.insert(key, t);
            }
        }
    }

    /// Merges another set of deltas into this one.
    pub fn merge(&mut self, other: Deltas) {
        for (k, t) in other.leaf_days {
            self.record(k, t);
        }
        for (k, t) in other.breakdowns {
            self.breakdowns.entry(k).or_default().add(t);
        }
    }

    /// Expands leaf-day deltas into every record they count in: each ancestor
    /// category × (day, month, year, all-time).
    pub fn expand(&self) -> HashMap<RecordKey, Tally, FxBuildHasher> {
        let mut out: HashMap<RecordKey, Tally, FxBuildHasher> = HashMap::default();
        for (k, t) in &self.leaf_days {
            let periods = Period::containing(k.day);
            for category in k.leaf.with_ancestors() {
                for period in periods {
                    out.entry(RecordKey {
                        account: k.account,
                        category,
                        period,
                    })
                    .or_default()
                    .add(*t);
                }
            }
        }
        out
    }
}

/// Borrowed twin of [`BreakdownKey`], hashed identically.
#[derive(Hash)]
struct BreakdownProbe<'a> {
    account: AccountSid,
    day: Day,
    dimension: Dimension,
    value: &'a str,
    class: UsageClass,
}

impl Equivalent<BreakdownKey> for BreakdownProbe<'_> {
    fn equivalent(&self, k: &BreakdownKey) -> bool {
        k.account == self.account
            && k.day == self.day
            && k.dimension == self.dimension
            && k.class == self.class
            && *k.value == *self.value
    }
}

// `Box<str>` and `&str` hash the same, so the probe and the key agree field by field.
impl Hash for BreakdownKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        BreakdownProbe {
            account: self.account,
            day: self.day,
            dimension: self.dimension,
            value: &self.value,
            class: self.class,
        }
        .hash(state)
    }
}

/// Deltas sharded by account so concurrent writers rarely meet on a lock.
pub struct UsageCounters {
    shards: Box<[CachePadded<Mutex<Deltas>>]>,
    mask: usize,
}

impl UsageCounters {
    /// `shards` is rounded up to a power of two.
    pub fn new(shards: usize) -> UsageCounters {
        let n = shards.max(1).next_power_of_two();
        UsageCounters {
            shards: (0..n)
                .map(|_| CachePadded::new(Mutex::new(Deltas::default())))
                .collect(),
            mask: n - 1,
        }
    }

    #[inline]
    fn shard(&self, account: AccountSid) -> &Mutex<Deltas> {
        // The SID's low bits are uniformly random hex.
        &self.shards[(account.0 as usize) & self.mask]
    }

    /// Adds one rated CDR.
    #[inline]
    pub fn record(
        &self,
        key: LeafDay,
        t: Tally,
        phone_number: Option<&str>,
        agent_id: Option<&str>,
    ) {
        let mut shard = self.shard(key.account).lock();
        shard.record(key, t);
        let class = UsageClass::of(key.leaf);
        if let Some(n) = phone_number {
            shard.record_breakdown(key.account, key.day, Dimension::Number, n, class, t);
        }
        if let Some(a) = agent_id {
            shard.record_breakdown(key.account, key.day, Dimension::Agent, a, class, t);
        }
    }

    /// Takes every delta recorded since the last take, leaving the counters empty.
    pub fn take(&self) -> Deltas {
        let mut all = Deltas::default();
        for shard in self.shards.iter() {
            let taken = std::mem::take(&mut *shard.lock());
            if all.is_empty() {
                all = taken;
            } else {
                all.merge(taken);
            }
        }
        all
    }

    /// Number of live leaf-day cells (for the memory gauge and backpressure).
    pub fn live_cells(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let s = s.lock();
                s.leaf_days.len() + s.breakdowns.len()
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(a: u128, day: i32, leaf: Category) -> LeafDay {
        LeafDay {
            account: AccountSid(a),
            day: Day(day),
            leaf,
        }
    }

    #[test]
    fn expand_fills_every_ancestor_and_period() {
        let mut d = Deltas::default();
        d.record(
            key(1, 20_000, Category::CallsInboundLocal),
            Tally {
                count: 1,
                usage: 60,
                price: 13_000,
            },
        );
        d.record(
            key(1, 20_001, Category::CallsOutbound),
            Tally {
                count: 1,
                usage: 30,
                price: 6_500,
            },
        );
        let e = d.expand();
        let get = |c, p| {
            e[&RecordKey {
                account: AccountSid(1),
                category: c,
                period: p,
            }]
        };
        let day0 = Day(20_000);
        assert_eq!(get(Category::CallsInbound, Period::Day(day0)).usage, 60);
        assert_eq!(get(Category::Calls, Period::Month(day0.month())).count, 2);
        assert_eq!(get(Category::TotalPrice, Period::AllTime).price, 19_500);
        assert!(!e.contains_key(&RecordKey {
            account: AccountSid(1),
            category: Category::CallsSip,
            period: Period::AllTime
        }));
    }

    #[test]
    fn take_empties_and_keeps_breakdowns() {
        let c = UsageCounters::new(4);
        for a in 0..10u128 {
            c.record(
                key(a, 1, Category::SmsInboundLongcode),
                Tally {
                    count: 1,
                    usage: 2,
                    price: 4000,
                },
                Some("+1555"),
                None,
            );
        }
        c.record(
            key(3, 1, Category::SmsInboundLongcode),
            Tally {
                count: 1,
                usage: 1,
                price: 2000,
            },
            Some("+1555"),
            Some("ag"),
        );
        let d = c.take();
        assert_eq!(d.leaf_days.len(), 10);
        assert_eq!(d.breakdowns.len(), 11);
        let k = BreakdownKey {
            account: AccountSid(3),
            day: Day(1),
            dimension: Dimension::Number,
            value: "+1555".into(),
            class: UsageClass::Messages,
        };
        assert_eq!(
            d.breakdowns[&k],
            Tally {
                count: 2,
                usage: 3,
                price: 6000
            }
        );
        assert_eq!(c.live_cells(), 0);
        assert!(c.take().is_empty());
    }
}
