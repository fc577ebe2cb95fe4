//! Sharded in-memory usage counters: the deltas since the last flush.
//!
//! The hot path adds one CDR to its (account, UTC day) [`DayCell`]: one hash-map
//! lookup, then an add into the cell's inline array of the 15 leaf categories
//! ([`Leaves`]) and into the cell's short list of by-number and by-agent
//! [`Breakdown`]s. Nothing else is touched per CDR:
//!
//! - Coarser periods are expanded at flush: each day cell is added into the rows
//!   of its day, month, year and all time ([`Deltas::rows`]).
//! - Rollups (`calls`, `sms-inbound`, `totalprice`, …) are never stored: a stored
//!   row holds the 15 leaf tallies and a rollup is the sum over its leaf set
//!   ([`Category::leaf_set`]), computed when the row is read. A rollup therefore
//!   equals the sum of its leaves by construction.
//!
//! Why this shape: a CDR costs one lookup in a map of live account-days instead of
//! one per leaf and breakdown, and a flush writes one row per account × period
//! instead of one per account × category × period (about 20× fewer rows), which
//! is what bounded end-to-end throughput. `benches/pipeline.rs`, quiet 2-vCPU VM,
//! 100k CDRs recorded and turned into flush rows (`design-rollups`): 53 ms for
//! 10k accounts against 151 ms for every ancestor × 4 periods on the hot path.
//! With 1M accounts (one CDR per cell, the worst case for cells) it is 516 ms
//! against 269 ms: zeroing a fresh cell per CDR costs more there, but flushes
//! see many CDRs per account-day in practice and the store writes dominate.
//!
//! [`UsageCounters::take`] swaps each shard's map for an empty one, so writers are
//! held only for a pointer swap per shard.

use crossbeam_utils::CachePadded;
use hashbrown::{HashMap, HashTable};
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
    /// Billed seconds (calls) or segments (messages).
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

/// The tallies of the 15 leaf categories, indexed by [`Category::index`]: one
/// account-day cell on the hot path, and one stored row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leaves(pub [Tally; Category::LEAVES]);

impl Default for Leaves {
    fn default() -> Leaves {
        Leaves([Tally::default(); Category::LEAVES])
    }
}

impl Leaves {
    #[inline]
    pub fn add_leaf(&mut self, leaf: Category, t: Tally) {
        self.0[leaf.index()].add(t);
    }

    pub fn add(&mut self, o: &Leaves) {
        for (a, b) in self.0.iter_mut().zip(&o.0) {
            a.add(*b);
        }
    }

    /// A leaf's own tally, or a rollup's: the sum over its leaves.
    pub fn get(&self, c: Category) -> Tally {
        let set = c.leaf_set();
        let mut t = Tally::default();
        for (i, leaf) in self.0.iter().enumerate() {
            if set & (1 << i) != 0 {
                t.add(*leaf);
            }
        }
        t
    }

    /// Every category with usage in this row (any leaf under it counted an event),
    /// with its tally.
    pub fn categories(&self) -> impl Iterator<Item = (Category, Tally)> + '_ {
        Category::ALL
            .into_iter()
            .map(|c| (c, self.get(c)))
            .filter(|(_, t)| t.count > 0)
    }
}

/// Where one rated CDR lands: account, event day, leaf category.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeafDay {
    pub account: AccountSid,
    pub day: Day,
    pub leaf: Category,
}

/// The hot-path cell key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountDay {
    pub account: AccountSid,
    pub day: Day,
}

/// A stored row's key: account and period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RowKey {
    pub account: AccountSid,
    pub period: Period,
}

/// A UsageRecord's key: account, category (any level), period.
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
}

/// Usage by phone number or agent, per day (AgentPhone's by-number/by-agent views).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BreakdownKey {
    pub account: AccountSid,
    pub day: Day,
    pub dimension: Dimension,
    pub value: Box<str>,
}

/// One number's or agent's calls and messages inside a [`DayCell`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Breakdown {
    pub dimension: Dimension,
    pub value: Box<str>,
    pub calls: Tally,
    pub messages: Tally,
    /// [`breakdown_id`] of dimension and value: what a lookup compares.
    id: u128,
}

impl Breakdown {
    #[inline]
    pub fn tally_mut(&mut self, class: UsageClass) -> &mut Tally {
        match class {
            UsageClass::Calls => &mut self.calls,
            UsageClass::Messages => &mut self.messages,
        }
    }
}

/// Breakdowns are found by a linear scan up to this many per cell (an account-day
/// usually has a handful of numbers and agents), through a hash index beyond.
const SCAN_LIMIT: usize = 8;

/// A breakdown's identity within a cell: the 128-bit xxh3 of dimension and value.
///
/// Lookups compare these instead of the strings, which live on the heap and cost
/// a cache miss each on the hot path. Two distinct values of one account-day
/// colliding has odds of about n²·2⁻¹²⁹ for n values, the same standard as the
/// dedup window's 128-bit CDR-id hashes ([`crate::dedup`]).
fn breakdown_id(dimension: Dimension, value: &str) -> u128 {
    let seed = match dimension {
        Dimension::Number => 1,
        Dimension::Agent => 2,
    };
    xxhash_rust::xxh3::xxh3_128_with_seed(value.as_bytes(), seed)
}

/// One account's usage on one UTC day since the last flush.
#[derive(Debug, Clone, Default)]
pub struct DayCell {
    pub leaves: Leaves,
    /// The first two live inside the cell: an account-day usually has one number
    /// and one agent, and reaching them then costs no pointer chase (a cache miss
    /// each on the hot path, 10–25% of the whole in-process path).
    breakdowns: smallvec::SmallVec<[Breakdown; 2]>,
    /// Positions in `breakdowns`, once it outgrows a linear scan.
    index: Option<Box<HashTable<u32>>>,
}

/// Equal when the tallies are, whatever order the breakdowns were first seen in.
impl PartialEq for DayCell {
    fn eq(&self, o: &DayCell) -> bool {
        self.leaves == o.leaves
            && self.breakdowns.len() == o.breakdowns.len()
            && self.breakdowns.iter().all(|b| o.breakdowns.contains(b))
    }
}

impl DayCell {
    /// The breakdown of `value`, added empty if new; and whether it was new.
    #[inline]
    fn breakdown(&mut self, dimension: Dimension, value: &str) -> (&mut Breakdown, bool) {
        let id = breakdown_id(dimension, value);
        let hash = id as u64;
        let found = match &self.index {
            None => self.breakdowns.iter().position(|b| b.id == id),
            Some(index) => {
                let bs = &self.breakdowns;
                index
                    .find(hash, |&i| bs[i as usize].id == id)
                    .map(|&i| i as usize)
            }
        };
        if let Some(i) = found {
            return (&mut self.breakdowns[i], false);
        }
        self.breakdowns.push(Breakdown {
            dimension,
            value: value.into(),
            calls: Tally::default(),
            messages: Tally::default(),
            id,
        });
        let n = self.breakdowns.len();
        let bs = &self.breakdowns;
        let rehash = |&i: &u32| bs[i as usize].id as u64;
        match &mut self.index {
            Some(index) => {
                index.insert_unique(hash, n as u32 - 1, rehash);
            }
            None if n > SCAN_LIMIT => {
                let mut index = HashTable::with_capacity(n * 2);
                for i in 0..n as u32 {
                    index.insert_unique(rehash(&i), i, rehash);
                }
                self.index = Some(Box::new(index));
            }
            None => {}
        }
        (&mut self.breakdowns[n - 1], true)
    }
}

/// One stored breakdown row's delta: a number's or agent's calls and messages on
/// one day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakdownDelta {
    pub key: BreakdownKey,
    pub calls: Tally,
    pub messages: Tally,
}

/// Everything taken from the counters at one flush.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Deltas {
    pub days: HashMap<AccountDay, DayCell, FxBuildHasher>,
    /// Breakdown entries over all cells.
    breakdown_count: usize,
}

impl Deltas {
    pub fn is_empty(&self) -> bool {
        self.days.is_empty()
    }

    /// Account-day cells plus breakdown entries held (for backpressure).
    pub fn live_cells(&self) -> usize {
        self.days.len() + self.breakdown_count
    }

    /// Adds a single CDR's charge; used by a shard and by single-threaded callers.
    #[inline]
    pub fn record(
        &mut self,
        key: LeafDay,
        t: Tally,
        phone_number: Option<&str>,
        agent_id: Option<&str>,
    ) {
        let cell = self
            .days
            .entry(AccountDay {
                account: key.account,
                day: key.day,
            })
            .or_default();
        cell.leaves.add_leaf(key.leaf, t);
        let class = UsageClass::of(key.leaf);
        for (dimension, value) in [
            (Dimension::Number, phone_number),
            (Dimension::Agent, agent_id),
        ] {
            if let Some(v) = value {
                let (b, new) = cell.breakdown(dimension, v);
                b.tally_mut(class).add(t);
                self.breakdown_count += new as usize;
            }
        }
    }

    /// Merges another set of deltas into this one.
    pub fn merge(&mut self, other: Deltas) {
        for (k, cell) in other.days {
            match self.days.entry(k) {
                hashbrown::hash_map::Entry::Vacant(v) => {
                    self.breakdown_count += cell.breakdowns.len();
                    v.insert(cell);
                }
                hashbrown::hash_map::Entry::Occupied(mut o) => {
                    let mine = o.get_mut();
                    mine.leaves.add(&cell.leaves);
                    for b in &cell.breakdowns {
                        let (m, new) = mine.breakdown(b.dimension, &b.value);
                        m.calls.add(b.calls);
                        m.messages.add(b.messages);
                        self.breakdown_count += new as usize;
                    }
                }
            }
        }
    }

    /// The stored rows these deltas add to: each account-day cell counted in its
    /// day, month, year and all-time rows.
    pub fn rows(&self) -> HashMap<RowKey, Leaves, FxBuildHasher> {
        let mut out: HashMap<RowKey, Leaves, FxBuildHasher> = HashMap::default();
        out.reserve(self.days.len() * 2);
        for (k, cell) in &self.days {
            for period in Period::containing(k.day) {
                out.entry(RowKey {
                    account: k.account,
                    period,
                })
                .or_default()
                .add(&cell.leaves);
            }
        }
        out
    }

    /// Every by-number and by-agent tally, keyed for the store.
    pub fn breakdowns(&self) -> impl Iterator<Item = BreakdownDelta> + '_ {
        self.days.iter().flat_map(|(k, cell)| {
            cell.breakdowns.iter().map(move |b| BreakdownDelta {
                key: BreakdownKey {
                    account: k.account,
                    day: k.day,
                    dimension: b.dimension,
                    value: b.value.clone(),
                },
                calls: b.calls,
                messages: b.messages,
            })
        })
    }

    /// The UsageRecords these deltas add to: every category with usage (leaf or
    /// rollup) × day, month, year and all time. The store keeps rows, not
    /// records; this is the same expansion the read side does, for tests and tools.
    pub fn expand(&self) -> HashMap<RecordKey, Tally, FxBuildHasher> {
        let mut out: HashMap<RecordKey, Tally, FxBuildHasher> = HashMap::default();
        for (k, leaves) in self.rows() {
            for (category, t) in leaves.categories() {
                out.insert(
                    RecordKey {
                        account: k.account,
                        category,
                        period: k.period,
                    },
                    t,
                );
            }
        }
        out
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
        self.shard(key.account)
            .lock()
            .record(key, t, phone_number, agent_id);
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

    /// Live account-day cells plus breakdown entries (for the gauge and
    /// backpressure).
    pub fn live_cells(&self) -> usize {
        self.shards.iter().map(|s| s.lock().live_cells()).sum()
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
            None,
            None,
        );
        d.record(
            key(1, 20_001, Category::CallsOutbound),
            Tally {
                count: 1,
                usage: 30,
                price: 6_500,
            },
            None,
            None,
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

    /// The calls + messages of one breakdown row.
    fn breakdown(d: &Deltas, a: u128, day: i32, dim: Dimension, v: &str) -> Option<Tally> {
        d.breakdowns()
            .find(|b| {
                let k = &b.key;
                k.account == AccountSid(a)
                    && k.day == Day(day)
                    && k.dimension == dim
                    && &*k.value == v
            })
            .map(|b| {
                let mut t = b.calls;
                t.add(b.messages);
                t
            })
    }

    #[test]
    fn take_empties_and_keeps_breakdowns() {
        let c = UsageCounters::new(4);
        let sms = |n| Tally {
            count: 1,
            usage: n,
            price: 2000 * n as i64,
        };
        for a in 0..10u128 {
            c.record(
                key(a, 1, Category::SmsInboundLongcode),
                sms(2),
                Some("+1555"),
                None,
            );
        }
        c.record(
            key(3, 1, Category::SmsInboundLongcode),
            sms(1),
            Some("+1555"),
            Some("ag"),
        );
        assert_eq!(c.live_cells(), 10 + 11);
        let d = c.take();
        assert_eq!(d.days.len(), 10);
        assert_eq!(d.breakdowns().count(), 11);
        assert_eq!(
            breakdown(&d, 3, 1, Dimension::Number, "+1555"),
            Some(Tally {
                count: 2,
                usage: 3,
                price: 6000
            })
        );
        assert_eq!(breakdown(&d, 3, 1, Dimension::Agent, "ag"), Some(sms(1)));
        assert_eq!(c.live_cells(), 0);
        assert!(c.take().is_empty());
    }

    #[test]
    fn many_breakdown_values_in_one_cell_stay_distinct() {
        // Past the linear-scan limit the cell switches to a hash index; every value
        // must still land in its own entry, before and after the switch and a merge.
        let mut d = Deltas::default();
        let t = Tally {
            count: 1,
            usage: 60,
            price: 5,
        };
        for round in 0..3 {
            for n in 0..40 {
                let num = format!("+1555{n:04}");
                d.record(
                    key(9, 2, Category::CallsOutbound),
                    t,
                    Some(&num),
                    (round == 0).then_some("a"),
                );
            }
        }
        let mut other = Deltas::default();
        other.record(
            key(9, 2, Category::CallsOutbound),
            t,
            Some("+15550007"),
            Some("b"),
        );
        d.merge(other);
        assert_eq!(d.live_cells(), 1 + 40 + 2);
        assert_eq!(
            breakdown(&d, 9, 2, Dimension::Number, "+15550007")
                .unwrap()
                .count,
            4
        );
        assert_eq!(
            breakdown(&d, 9, 2, Dimension::Number, "+15550039")
                .unwrap()
                .count,
            3
        );
        assert_eq!(
            breakdown(&d, 9, 2, Dimension::Agent, "a").unwrap().count,
            40
        );
        assert_eq!(
            d.days
                .values()
                .next()
                .unwrap()
                .leaves
                .get(Category::Calls)
                .count,
            121
        );
    }

    #[test]
    fn rows_hold_leaves_and_rollups_are_sums() {
        let mut d = Deltas::default();
        let t = |p| Tally {
            count: 1,
            usage: 1,
            price: p,
        };
        d.record(
            key(1, 20_000, Category::SmsInboundLongcode),
            t(2000),
            None,
            None,
        );
        d.record(
            key(1, 20_001, Category::MmsOutboundShortcode),
            t(3000),
            None,
            None,
        );
        let rows = d.rows();
        // Two day rows, one month, one year, one all-time.
        assert_eq!(rows.len(), 5);
        let all = rows[&RowKey {
            account: AccountSid(1),
            period: Period::AllTime,
        }];
        assert_eq!(all.get(Category::TotalPrice).price, 5000);
        assert_eq!(all.get(Category::Sms).count, 1);
        assert_eq!(all.get(Category::Calls), Tally::default());
        let listed: Vec<Category> = all.categories().map(|(c, _)| c).collect();
        use Category::*;
        assert_eq!(
            listed,
            [
                SmsInboundLongcode,
                MmsOutboundShortcode,
                SmsInbound,
                Sms,
                MmsOutbound,
                Mms,
                TotalPrice
            ]
        );
    }

    #[test]
    fn live_state_sizes_match_the_docs() {
        // README "Memory" and config flush.max_pending_cells quote these.
        let cell = std::mem::size_of::<(AccountDay, DayCell)>();
        let entry = std::mem::size_of::<Breakdown>();
        eprintln!("account-day cell {cell} B, breakdown entry {entry} B + string");
        assert!(cell <= 630, "account-day cell is {cell} bytes");
        assert!(entry <= 100, "breakdown entry is {entry} bytes");
    }
}
