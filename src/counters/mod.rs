//! In-memory usage counters: the deltas since the last flush.
//!
//! The hot path adds one CDR to its (account, UTC day) cell — an inline array of
//! the 15 leaf categories ([`Leaves`]) — and to the by-number and by-agent
//! [`Breakdown`]s of that account-day. Nothing else is touched per CDR:
//!
//! - Coarser periods are expanded at flush: each day cell is added into the rows
//!   of its day, month, year and all time ([`Deltas::rows`]).
//! - Rollups (`calls`, `sms-inbound`, `totalprice`, …) are never stored: a stored
//!   row holds the 15 leaf tallies and a rollup is the sum over its leaf set
//!   ([`Category::leaf_set`]), computed when the row is read. A rollup therefore
//!   equals the sum of its leaves by construction.
//!
//! Why this shape: a CDR costs one lookup in a map of live account-days instead of
//! one per leaf and period, and a flush writes one row per account × period
//! instead of one per account × category × period (about 20× fewer rows), which
//! is what bounded end-to-end throughput. `benches/pipeline.rs`, quiet 2-vCPU VM,
//! 100k CDRs recorded and turned into flush rows (`design-rollups`): 53 ms for
//! 10k accounts against 151 ms for every ancestor × 4 periods on the hot path.
//! With 1M accounts (one CDR per cell, the worst case for cells) it is 516 ms
//! against 269 ms: zeroing a fresh cell per CDR costs more there, but flushes
//! see many CDRs per account-day in practice and the store writes dominate.
//!
//! The cells and breakdowns live in [`table::Table`]s, whose lookups can be
//! prefetched: the daemon runs a polled batch through [`Deltas::place`],
//! [`Deltas::prefetch`] and [`Deltas::record_at`] in three waves so that the cache
//! misses of a whole batch overlap ([`crate::pipeline::ingest_batch`]).
//!
//! Each consumer thread owns the deltas of its partitions (one writer, no
//! lock); a flush takes them ([`Deltas::take`]) and merges what several
//! consumers hand over ([`Deltas::merge`]).

pub mod table;

use hashbrown::HashMap;
use rustc_hash::FxBuildHasher;

use crate::calendar::{Day, Period};
use crate::category::Category;
use crate::cdr::AccountSid;
use crate::rating::Charge;
use table::{fold_mul, prefetch, Table, TableKey};

/// Count, usage and price accumulated in one cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
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
    /// The UTC hour of the day (0-23), for the last-24-hours counts.
    pub hour: u8,
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

/// What a breakdown row counts by: the account's own number, the agent, or
/// the UTC hour of the day (value `00`-`23`; AgentPhone's last-24-hours
/// counts; a page keeps the hours of its two newest days only, see
/// [`crate::store::page::Page::add_page`]).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Dimension {
    Number,
    Agent,
    Hour,
}

/// The values of [`Dimension::Hour`].
pub const HOURS: [&str; 24] = [
    "00", "01", "02", "03", "04", "05", "06", "07", "08", "09", "10", "11", "12", "13", "14", "15",
    "16", "17", "18", "19", "20", "21", "22", "23",
];

impl Dimension {
    pub fn as_str(self) -> &'static str {
        match self {
            Dimension::Number => "number",
            Dimension::Agent => "agent",
            Dimension::Hour => "hour",
        }
    }

    /// The day a usage event on `day` is kept under. Agents are kept per day (the
    /// by-agent view sums a week, month or year). Numbers are kept all-time, under
    /// 1970-01-01 like the all-time UsageRecords: the by-number view is all-time,
    /// and one row per number instead of one per number and day made a flush of a
    /// 30-day spread of traffic write a sixth fewer rows.
    #[inline]
    pub fn day_of(self, day: Day) -> Day {
        match self {
            Dimension::Number => Period::AllTime.start(),
            Dimension::Agent | Dimension::Hour => day,
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

/// Usage by phone number (all-time) or agent (per day), for AgentPhone's
/// by-number and by-agent views; see [`Dimension::day_of`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BreakdownKey {
    pub account: AccountSid,
    pub day: Day,
    pub dimension: Dimension,
    pub value: Box<str>,
}

/// A breakdown's identity on the hot path: account, day and the 128-bit xxh3 of
/// dimension and value.
///
/// Lookups compare these instead of the strings, which live on the heap and would
/// cost a cache miss each. Two distinct values of one account-day colliding has
/// odds of about n²·2⁻¹²⁹ for n values, the same standard as the dedup window's
/// 128-bit CDR-id hashes ([`crate::dedup`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BreakdownId {
    account: AccountSid,
    day: Day,
    value: u128,
}

impl BreakdownId {
    #[inline]
    fn new(account: AccountSid, day: Day, dimension: Dimension, value: &str) -> BreakdownId {
        let seed = match dimension {
            Dimension::Number => 1,
            Dimension::Agent => 2,
            Dimension::Hour => 3,
        };
        BreakdownId {
            account,
            day,
            value: xxhash_rust::xxh3::xxh3_128_with_seed(value.as_bytes(), seed),
        }
    }

    /// An hour's id, without hashing a string: the hour spread over the bits
    /// (an odd multiplier; distinct from every string's hash but with odds
    /// like theirs).
    #[inline]
    fn hour(account: AccountSid, day: Day, hour: u8) -> BreakdownId {
        BreakdownId {
            account,
            day,
            value: (hour as u128 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835),
        }
    }
}

impl TableKey for BreakdownId {
    #[inline]
    fn hash64(&self) -> u64 {
        // The value hash is already uniform; fold the account-day in.
        self.value as u64 ^ AccountDay::hash_parts(self.account, self.day)
    }
}

impl TableKey for AccountSid {
    #[inline]
    fn hash64(&self) -> u64 {
        fold_mul(self.0 as u64 ^ (self.0 >> 64) as u64, 0x9e37_79b9_7f4a_7c15)
    }
}

impl TableKey for AccountDay {
    #[inline]
    fn hash64(&self) -> u64 {
        AccountDay::hash_parts(self.account, self.day)
    }
}

impl AccountDay {
    #[inline]
    fn hash_parts(account: AccountSid, day: Day) -> u64 {
        let a = account.0;
        let h = fold_mul(
            a as u64 ^ 0x243f_6a88_85a3_08d3,
            (a >> 64) as u64 ^ 0x1319_8a2e_0370_7344,
        );
        fold_mul(h ^ day.0 as u32 as u64, 0x9e37_79b9_7f4a_7c15)
    }
}

/// One number's or agent's calls and messages on one account-day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Breakdown {
    pub dimension: Dimension,
    pub value: Box<str>,
    pub calls: Tally,
    pub messages: Tally,
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

/// One stored breakdown row's delta: a number's or agent's calls and messages on
/// one day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakdownDelta {
    pub key: BreakdownKey,
    pub calls: Tally,
    pub messages: Tally,
}

/// Where one rated CDR will be added, worked out (and its slots prefetched) a
/// batch ahead of the update: see [`Deltas::place`].
#[derive(Debug, Clone, Copy)]
pub struct Placement {
    cell: u64,
    number: Option<(BreakdownId, u64)>,
    agent: Option<(BreakdownId, u64)>,
    hour: (BreakdownId, u64),
}

/// Everything taken from the counters at one flush: per account and UTC day, the
/// 15 leaf tallies; per account, day and number or agent, a breakdown.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Deltas {
    cells: Table<AccountDay, Leaves>,
    breakdowns: Table<BreakdownId, Breakdown>,
}

impl Deltas {
    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }

    /// Account-day cells plus breakdown entries held (for backpressure).
    pub fn live_cells(&self) -> usize {
        self.cells.len() + self.breakdowns.len()
    }

    /// The account-day cells: each account's leaf tallies of one day.
    pub fn cells(&self) -> &[(AccountDay, Leaves)] {
        self.cells.entries()
    }

    /// Account-day cells held.
    pub fn account_days(&self) -> usize {
        self.cells.len()
    }

    /// Takes everything, leaving tables sized for as much again (the next flush
    /// interval sees about the same live accounts, and then never rehashes).
    pub fn take(&mut self) -> Deltas {
        let next = Deltas {
            cells: Table::with_capacity(self.cells.len()),
            breakdowns: Table::with_capacity(self.breakdowns.len()),
        };
        std::mem::replace(self, next)
    }

    /// Moves the by-number/by-agent entries into a `Deltas` of their own, so a
    /// flush can expand them on another thread than the account-day cells.
    pub fn split_breakdowns(&mut self) -> Deltas {
        Deltas {
            cells: Table::default(),
            breakdowns: std::mem::take(&mut self.breakdowns),
        }
    }

    /// First wave of a batched update: hashes where a CDR lands and starts
    /// loading the slots it will read.
    #[inline]
    pub fn place(
        &self,
        key: &LeafDay,
        phone_number: Option<&str>,
        agent_id: Option<&str>,
    ) -> Placement {
        let cell = AccountDay::hash_parts(key.account, key.day);
        self.cells.prefetch_slot(cell);
        let breakdown = |dimension: Dimension, value: Option<&str>| {
            value.map(|v| {
                let id = BreakdownId::new(key.account, dimension.day_of(key.day), dimension, v);
                let h = id.hash64();
                self.breakdowns.prefetch_slot(h);
                (id, h)
            })
        };
        let hour = BreakdownId::hour(key.account, key.day, key.hour);
        let hour_hash = hour.hash64();
        self.breakdowns.prefetch_slot(hour_hash);
        Placement {
            cell,
            number: breakdown(Dimension::Number, phone_number),
            agent: breakdown(Dimension::Agent, agent_id),
            hour: (hour, hour_hash),
        }
    }

    /// Second wave: with the slots in cache, starts loading the entries — the
    /// cell's key and the leaf's tally, each breakdown's key and tally.
    #[inline]
    pub fn prefetch(&self, p: &Placement, leaf: Category) {
        if let Some((key, leaves)) = self.cells.candidate(p.cell) {
            prefetch(key);
            let t = &leaves.0[leaf.index()];
            prefetch(t);
            prefetch(
                (t as *const Tally)
                    .wrapping_add(1)
                    .cast::<u8>()
                    .wrapping_sub(1),
            );
        }
        for (_, h) in [p.number, p.agent, Some(p.hour)].into_iter().flatten() {
            if let Some(entry) = self.breakdowns.candidate(h) {
                prefetch(entry);
                prefetch(&entry.1.calls);
                prefetch(&entry.1.messages);
            }
        }
    }

    /// Adds a single CDR's charge.
    #[inline]
    pub fn record(
        &mut self,
        key: LeafDay,
        t: Tally,
        phone_number: Option<&str>,
        agent_id: Option<&str>,
    ) {
        let p = self.place(&key, phone_number, agent_id);
        self.record_at(&p, key, t, phone_number, agent_id);
    }

    /// Last wave: adds the CDR where [`Deltas::place`] found it lands (the same
    /// key and strings must be passed again).
    #[inline]
    pub fn record_at(
        &mut self,
        p: &Placement,
        key: LeafDay,
        t: Tally,
        phone_number: Option<&str>,
        agent_id: Option<&str>,
    ) {
        let cell = AccountDay {
            account: key.account,
            day: key.day,
        };
        self.cells
            .get_or_insert_with(cell, p.cell, Leaves::default)
            .0
            .add_leaf(key.leaf, t);
        let class = UsageClass::of(key.leaf);
        let hour = HOURS.get(key.hour as usize).copied();
        for (dimension, value, placed) in [
            (Dimension::Number, phone_number, p.number),
            (Dimension::Agent, agent_id, p.agent),
            (Dimension::Hour, hour, Some(p.hour)),
        ] {
            if let (Some(v), Some((id, h))) = (value, placed) {
                let (b, _) = self.breakdowns.get_or_insert_with(id, h, || Breakdown {
                    dimension,
                    value: v.into(),
                    calls: Tally::default(),
                    messages: Tally::default(),
                });
                b.tally_mut(class).add(t);
            }
        }
    }

    /// Merges another set of deltas into this one.
    pub fn merge(&mut self, other: Deltas) {
        if self.is_empty() {
            *self = other;
            return;
        }
        for (k, leaves) in other.cells.into_entries() {
            self.cells
                .get_or_insert_with(k, k.hash64(), Leaves::default)
                .0
                .add(&leaves);
        }
        for (id, b) in other.breakdowns.into_entries() {
            let (mine, new) = self
                .breakdowns
                .get_or_insert_with(id, id.hash64(), || b.clone());
            if !new {
                mine.calls.add(b.calls);
                mine.messages.add(b.messages);
            }
        }
    }

    /// The stored rows these deltas add to: each account-day cell counted in its
    /// day, month, year and all-time rows.
    pub fn rows(&self) -> HashMap<RowKey, Leaves, FxBuildHasher> {
        let mut out: HashMap<RowKey, Leaves, FxBuildHasher> = HashMap::default();
        out.reserve(self.cells.len() * 2);
        self.add_rows_to(&mut out);
        out
    }

    /// Adds every account-day cell into its day, month, year and all-time rows.
    pub fn add_rows_to(&self, rows: &mut HashMap<RowKey, Leaves, FxBuildHasher>) {
        for (k, leaves) in self.cells.entries() {
            for period in Period::containing(k.day) {
                rows.entry(RowKey {
                    account: k.account,
                    period,
                })
                .or_default()
                .add(leaves);
            }
        }
    }

    /// Every by-number and by-agent tally, keyed for the store, consuming the
    /// deltas (the numbers and agent ids move, not copied).
    pub fn into_breakdowns(self) -> impl Iterator<Item = BreakdownDelta> {
        self.breakdowns
            .into_entries()
            .into_iter()
            .map(|(id, b)| BreakdownDelta {
                key: BreakdownKey {
                    account: id.account,
                    day: id.day,
                    dimension: b.dimension,
                    value: b.value,
                },
                calls: b.calls,
                messages: b.messages,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn key(a: u128, day: i32, leaf: Category) -> LeafDay {
        LeafDay {
            account: AccountSid(a),
            day: Day(day),
            leaf,
            hour: 0,
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
        d.clone()
            .into_breakdowns()
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
        let mut c = Deltas::default();
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
        // 10 account-days, 11 number/agent entries, 10 account-hours.
        assert_eq!(c.live_cells(), 10 + 11 + 10);
        let d = c.take();
        assert_eq!(d.account_days(), 10);
        assert_eq!(d.clone().into_breakdowns().count(), 21);
        assert_eq!(
            breakdown(&d, 3, 0, Dimension::Number, "+1555"),
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
    fn numbers_are_kept_all_time_and_agents_per_day() {
        let mut d = Deltas::default();
        let t = Tally {
            count: 1,
            usage: 60,
            price: 5,
        };
        for day in [20_000, 20_001, 20_031] {
            d.record(
                key(4, day, Category::CallsOutbound),
                t,
                Some("+1555"),
                Some("a"),
            );
        }
        let mut got: Vec<(Dimension, i32, u64)> = d
            .into_breakdowns()
            .map(|b| (b.key.dimension, b.key.day.0, b.calls.count))
            .collect();
        got.sort();
        assert_eq!(
            got,
            [
                (Dimension::Number, 0, 3),
                (Dimension::Agent, 20_000, 1),
                (Dimension::Agent, 20_001, 1),
                (Dimension::Agent, 20_031, 1),
                (Dimension::Hour, 20_000, 1),
                (Dimension::Hour, 20_001, 1),
                (Dimension::Hour, 20_031, 1),
            ]
        );
    }

    #[test]
    fn every_cdr_counts_in_its_utc_hour() {
        let mut d = Deltas::default();
        let t = Tally {
            count: 1,
            usage: 1,
            price: 5,
        };
        for hour in [0u8, 0, 7, 23] {
            let mut k = key(4, 20_000, Category::SmsOutboundLongcode);
            k.hour = hour;
            d.record(k, t, None, None);
        }
        let mut call = key(4, 20_000, Category::CallsOutbound);
        call.hour = 7;
        d.record(call, t, None, None);
        let mut got: Vec<(String, u64, u64)> = d
            .into_breakdowns()
            .map(|b| (b.key.value.to_string(), b.messages.count, b.calls.count))
            .collect();
        got.sort();
        assert_eq!(
            got,
            [
                ("00".to_owned(), 2, 0),
                ("07".to_owned(), 1, 1),
                ("23".to_owned(), 1, 0)
            ]
        );
    }

    #[test]
    fn many_breakdown_values_in_one_cell_stay_distinct() {
        // Every value must land in its own entry, also across table growth and a
        // merge.
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
        // The cell, 40 numbers, 2 agents, 1 hour.
        assert_eq!(d.live_cells(), 1 + 40 + 2 + 1);
        assert_eq!(
            breakdown(&d, 9, 0, Dimension::Number, "+15550007")
                .unwrap()
                .count,
            4
        );
        assert_eq!(
            breakdown(&d, 9, 0, Dimension::Number, "+15550039")
                .unwrap()
                .count,
            3
        );
        assert_eq!(
            breakdown(&d, 9, 2, Dimension::Agent, "a").unwrap().count,
            40
        );
        let all = d.rows()[&RowKey {
            account: AccountSid(9),
            period: Period::AllTime,
        }];
        assert_eq!(all.get(Category::Calls).count, 121);
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
        // docs/design.md "Memory" and config flush.max_pending_cells quote these.
        let cell = std::mem::size_of::<(AccountDay, Leaves)>();
        let entry = std::mem::size_of::<(BreakdownId, Breakdown)>();
        eprintln!("account-day cell {cell} B, breakdown entry {entry} B + string");
        assert!(cell <= 400, "account-day cell is {cell} bytes");
        assert!(entry <= 128, "breakdown entry is {entry} bytes");
    }
}
