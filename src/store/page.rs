//! Counter pages: how usage is laid out in the store.
//!
//! An account's stored rows (one per period, all 15 leaf categories) and its
//! by-number and by-agent breakdowns are kept in a few pages, one `usage_pages`
//! row each, keyed by account and page:
//!
//! - `YYYY-MM`: the month's day rows, its month row and the by-agent breakdowns
//!   of its days;
//! - `all`: the year rows, the all-time row and the all-time breakdowns (by
//!   number).
//!
//! A flush reads each page it touches, adds its deltas in tallyd and writes the
//! page back. The point is the number of database rows a flush writes: a drain
//! of 2M CDRs over 10k accounts ends with a flush of 188k rows and breakdowns,
//! which are 25k pages. PostgreSQL spends ~17 µs of CPU per upserted row
//! whatever its width (index lookup, tuple, WAL record); reading and rewriting a
//! page of ~1 KiB costs about as much as one row.
//!
//! A page is encoded with postcard (varints; only leaves with usage are
//! written) after a format byte. Readers decode the pages of the span they ask
//! for: a month of daily records is one page per account.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::calendar::{Day, Month, Period};
use crate::cdr::AccountSid;
use crate::counters::{BreakdownDelta, Dimension, Leaves, RowKey, Tally};

/// The delta of one stored row (account × period, all leaf categories) with the
/// currency of its account's plan.
#[derive(Debug, Clone, PartialEq)]
pub struct RowDelta {
    pub key: RowKey,
    pub leaves: Leaves,
    pub price_unit: String,
}

/// The first byte of every encoded page.
const FORMAT: u8 = 1;

/// Most breakdown entries of one dimension a page holds: numbers on an
/// account's `all` page, agent-days on a month page. A flush rewrites every page
/// it touches, so an account with ever more numbers or agents must not grow its
/// pages without bound. Usage of a value that does not fit is added to the
/// [`OTHER`] entry of its day instead: it is still in the account's rows (and
/// every UsageRecord), only not broken down by that value.
pub const MAX_BREAKDOWN_ENTRIES: usize = 2048;

/// The value of the entry that takes usage beyond [`MAX_BREAKDOWN_ENTRIES`]:
/// empty, which no CDR's `phone_number` or `agent_id` can be.
pub const OTHER: &str = "";

/// The page of an account that a row or breakdown is kept on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PageId {
    /// Day and month rows of the month, by-agent breakdowns of its days.
    Month(Month),
    /// Year and all-time rows, all-time (by-number) breakdowns.
    All,
}

impl PageId {
    pub fn of_period(p: Period) -> PageId {
        match p {
            Period::Day(d) => PageId::Month(d.month()),
            Period::Month(m) => PageId::Month(m),
            Period::Year(_) | Period::AllTime => PageId::All,
        }
    }

    /// The page of a breakdown kept under `day` (1970-01-01 = all-time).
    pub fn of_day(day: Day) -> PageId {
        if day == Period::AllTime.start() {
            PageId::All
        } else {
            PageId::Month(day.month())
        }
    }

    /// The page's key: `YYYY-MM` or `all` (which sorts after every month).
    pub fn text(self) -> String {
        match self {
            PageId::Month(m) => m.to_string(),
            PageId::All => "all".into(),
        }
    }
}

/// The keys of the month pages holding days `from` to `to`, for
/// `page >= first AND page <= last` (which never includes `all`).
pub fn month_pages(from: Day, to: Day) -> (String, String) {
    (from.month().to_string(), to.month().to_string())
}

/// An encoded page that does not decode.
#[derive(Debug, thiserror::Error)]
#[error("unreadable usage page: {0}")]
pub struct PageError(String);

/// Where in time a stored row is: the wire form of [`Period`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
enum Span {
    Day(i32),
    Month(i32),
    Year(i32),
    All,
}

impl From<Period> for Span {
    fn from(p: Period) -> Span {
        match p {
            Period::Day(d) => Span::Day(d.0),
            Period::Month(m) => Span::Month(m.0),
            Period::Year(y) => Span::Year(y),
            Period::AllTime => Span::All,
        }
    }
}

impl From<Span> for Period {
    fn from(s: Span) -> Period {
        match s {
            Span::Day(d) => Period::Day(Day(d)),
            Span::Month(m) => Period::Month(Month(m)),
            Span::Year(y) => Period::Year(y),
            Span::All => Period::AllTime,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Row {
    span: Span,
    price_unit: String,
    /// (leaf index, tally) of the leaves with usage, by leaf index.
    leaves: Vec<(u8, Tally)>,
}

impl Row {
    fn dense(&self) -> Leaves {
        let mut l = Leaves::default();
        for (i, t) in &self.leaves {
            if let Some(slot) = l.0.get_mut(*i as usize) {
                *slot = *t;
            }
        }
        l
    }

    fn set(&mut self, leaves: &Leaves) {
        self.leaves = leaves
            .0
            .iter()
            .enumerate()
            .filter(|(_, t)| **t != Tally::default())
            .map(|(i, t)| (i as u8, *t))
            .collect();
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Breakdown {
    dimension: Dimension,
    value: String,
    day: i32,
    calls: Tally,
    messages: Tally,
}

impl Breakdown {
    /// What a page's breakdowns are ordered by: dimension, value, day.
    fn key(&self) -> (Dimension, &str, i32) {
        (self.dimension, self.value.as_str(), self.day)
    }
}

/// A stored by-number or by-agent entry, as read from a page.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakdownEntry<'p> {
    pub dimension: Dimension,
    pub value: &'p str,
    pub day: Day,
    pub calls: Tally,
    pub messages: Tally,
}

/// One page: rows ordered by period, breakdowns by dimension, value and day.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Page {
    rows: Vec<Row>,
    breakdowns: Vec<Breakdown>,
}

impl Page {
    /// Adds `leaves` to the row of `period`; a new row takes `price_unit` (an
    /// existing one keeps its own).
    pub fn add_row(&mut self, period: Period, price_unit: &str, leaves: &Leaves) {
        let span = Span::from(period);
        match self.rows.binary_search_by(|r| r.span.cmp(&span)) {
            Ok(i) => {
                let mut sum = self.rows[i].dense();
                sum.add(leaves);
                self.rows[i].set(&sum);
            }
            Err(i) => {
                let mut row = Row {
                    span,
                    price_unit: price_unit.to_owned(),
                    leaves: Vec::new(),
                };
                row.set(leaves);
                self.rows.insert(i, row);
            }
        }
    }

    pub fn add_breakdown(
        &mut self,
        dimension: Dimension,
        value: &str,
        day: Day,
        calls: Tally,
        messages: Tally,
    ) {
        let found = self
            .breakdowns
            .binary_search_by(|b| b.key().cmp(&(dimension, value, day.0)));
        match found {
            Ok(i) => {
                self.breakdowns[i].calls.add(calls);
                self.breakdowns[i].messages.add(messages);
            }
            Err(_) if value != OTHER && self.entries_of(dimension) >= MAX_BREAKDOWN_ENTRIES => {
                self.add_breakdown(dimension, OTHER, day, calls, messages)
            }
            Err(i) => self.breakdowns.insert(
                i,
                Breakdown {
                    dimension,
                    value: value.to_owned(),
                    day: day.0,
                    calls,
                    messages,
                },
            ),
        }
    }

    /// Breakdown entries of `dimension` other than [`OTHER`]: the entries are
    /// sorted by dimension, then value, so a dimension's are contiguous and its
    /// `OTHER` ones (the empty value) come first.
    fn entries_of(&self, dimension: Dimension) -> usize {
        let key = |b: &Breakdown| (b.dimension, !b.value.is_empty());
        let start = self
            .breakdowns
            .partition_point(|b| key(b) < (dimension, true));
        let end = self
            .breakdowns
            .partition_point(|b| b.dimension <= dimension);
        end - start
    }

    /// Adds every row and breakdown of `other`. Hourly entries
    /// ([`Dimension::Hour`]) are kept for the page's two newest days with
    /// any: they serve only the last 24 hours, and would otherwise make a
    /// month page grow by 24 entries a day. (The newest day only grows, so
    /// what is kept is the same however the entries came in.)
    pub fn add_page(&mut self, other: &Page) {
        for r in &other.rows {
            self.add_row(r.span.into(), &r.price_unit, &r.dense());
        }
        self.merge_breakdowns(other.breakdowns.iter().cloned());
        self.prune_hours();
    }

    /// Adds `sorted` (breakdowns in the page's order; equal keys are summed)
    /// in one merge of the two ordered lists: the same result as adding them one by
    /// one with [`Page::add_breakdown`] in that order, without a search and a
    /// shift of the list per entry. Values new to the page past a dimension's
    /// [`MAX_BREAKDOWN_ENTRIES`] go to its [`OTHER`] entry of their day, as
    /// there.
    fn merge_breakdowns(&mut self, sorted: impl Iterator<Item = Breakdown>) {
        let mut sorted = sorted.peekable();
        if sorted.peek().is_none() {
            return;
        }
        let mut held: BTreeMap<Dimension, usize> = BTreeMap::new();
        let old = std::mem::take(&mut self.breakdowns);
        for b in old.iter().filter(|b| b.value != OTHER) {
            *held.entry(b.dimension).or_default() += 1;
        }
        let mut out = Vec::with_capacity(old.len() + sorted.size_hint().0);
        let mut overflow = Vec::new();
        let mut old = old.into_iter().peekable();
        // The next entry of `sorted`, with the ones of the same key summed in.
        fn take(sorted: &mut std::iter::Peekable<impl Iterator<Item = Breakdown>>) -> Breakdown {
            let mut b = sorted.next().expect("peeked");
            while let Some(n) = sorted.next_if(|n| n.key() == b.key()) {
                b.calls.add(n.calls);
                b.messages.add(n.messages);
            }
            b
        }
        loop {
            let order = match (old.peek(), sorted.peek()) {
                (Some(a), Some(b)) => a.key().cmp(&b.key()),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (None, None) => break,
            };
            match order {
                std::cmp::Ordering::Less => out.extend(old.next()),
                std::cmp::Ordering::Equal => {
                    let (mut a, b) = (old.next().expect("peeked"), take(&mut sorted));
                    a.calls.add(b.calls);
                    a.messages.add(b.messages);
                    out.push(a);
                }
                std::cmp::Ordering::Greater => {
                    let b = take(&mut sorted);
                    if b.value == OTHER {
                        out.push(b);
                        continue;
                    }
                    let n = held.entry(b.dimension).or_default();
                    if *n >= MAX_BREAKDOWN_ENTRIES {
                        overflow.push(b);
                    } else {
                        *n += 1;
                        out.push(b);
                    }
                }
            }
        }
        self.breakdowns = out;
        for b in overflow {
            self.add_breakdown(b.dimension, OTHER, Day(b.day), b.calls, b.messages);
        }
    }

    fn prune_hours(&mut self) {
        let newest = self
            .breakdowns
            .iter()
            .filter(|b| b.dimension == Dimension::Hour)
            .map(|b| b.day)
            .max();
        if let Some(newest) = newest {
            self.breakdowns
                .retain(|b| b.dimension != Dimension::Hour || b.day >= newest - 1);
        }
    }

    /// The rows: period, price unit, leaves.
    pub fn rows(&self) -> impl Iterator<Item = (Period, &str, Leaves)> + '_ {
        self.rows
            .iter()
            .map(|r| (r.span.into(), r.price_unit.as_str(), r.dense()))
    }

    /// This page's rows of the periods `delta` has rows of: (period, leaves).
    pub fn rows_of(&self, delta: &Page) -> Vec<(Period, Leaves)> {
        delta
            .rows
            .iter()
            .filter_map(|d| {
                let i = self.rows.binary_search_by(|r| r.span.cmp(&d.span)).ok()?;
                Some((self.rows[i].span.into(), self.rows[i].dense()))
            })
            .collect()
    }

    /// Whether the page has usage rows (not only breakdowns).
    pub fn has_rows(&self) -> bool {
        !self.rows.is_empty()
    }

    pub fn breakdowns(&self) -> impl Iterator<Item = BreakdownEntry<'_>> + '_ {
        self.breakdowns.iter().map(|b| BreakdownEntry {
            dimension: b.dimension,
            value: &b.value,
            day: Day(b.day),
            calls: b.calls,
            messages: b.messages,
        })
    }

    /// Rows and breakdowns on the page.
    pub fn len(&self) -> usize {
        self.rows.len() + self.breakdowns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![FORMAT];
        postcard::to_io(self, &mut out).expect("a page encodes into memory");
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Page, PageError> {
        match bytes.split_first() {
            Some((&FORMAT, rest)) => {
                postcard::from_bytes(rest).map_err(|e| PageError(e.to_string()))
            }
            Some((v, _)) => Err(PageError(format!("format {v}, this tallyd reads {FORMAT}"))),
            None => Err(PageError("empty".into())),
        }
    }
}

/// The stored page of `account` keyed `page`, decoded; an error that names
/// both if it does not decode (a permanent store error).
pub fn decode_stored(account: &str, page: &str, bytes: &[u8]) -> Result<Page, super::Error> {
    Page::decode(bytes).map_err(|reason| super::Error::Page {
        account: account.to_owned(),
        page: page.to_owned(),
        reason,
    })
}

/// What one flush adds to one page of one account.
#[derive(Debug, Clone, PartialEq)]
pub struct PageDelta {
    pub account: AccountSid,
    pub page: PageId,
    pub delta: Page,
}

impl PageDelta {
    /// The page's key columns: account SID and page text.
    pub fn key(&self) -> (String, String) {
        let sid = self.account.write_text(&mut [0; 34]).to_owned();
        (sid, self.page.text())
    }

    /// The stored page (if any) with this delta added, decoded.
    pub fn sum(&self, stored: Option<&[u8]>) -> Result<Page, super::Error> {
        let Some(bytes) = stored else {
            return Ok(self.delta.clone());
        };
        let mut sum = decode_stored(&self.account.to_string(), &self.page.text(), bytes)?;
        sum.add_page(&self.delta);
        Ok(sum)
    }

    /// The page to store: the stored one (if any) with this delta added.
    pub fn onto(&self, stored: Option<&[u8]>) -> Result<Vec<u8>, super::Error> {
        let Some(bytes) = stored else {
            return Ok(self.delta.encode());
        };
        let mut sum = decode_stored(&self.account.to_string(), &self.page.text(), bytes)?;
        sum.add_page(&self.delta);
        Ok(sum.encode())
    }
}

/// Page deltas being gathered, by account and page.
#[derive(Debug, Default)]
pub struct PageDeltas(BTreeMap<(AccountSid, PageId), Page>);

impl PageDeltas {
    /// Adds `leaves` to the row of `period` on its page.
    pub fn add_row(
        &mut self,
        account: AccountSid,
        period: Period,
        price_unit: &str,
        leaves: &Leaves,
    ) {
        self.0
            .entry((account, PageId::of_period(period)))
            .or_default()
            .add_row(period, price_unit, leaves);
    }

    /// Adds many by-number or by-agent entries: sorted into page order first,
    /// so each page takes its entries in one merge ([`Page::add_page`]'s)
    /// instead of a search and a shift per entry.
    pub fn add_breakdowns(&mut self, mut all: Vec<BreakdownDelta>) {
        fn page_of(b: &BreakdownDelta) -> (AccountSid, PageId) {
            (b.key.account, PageId::of_day(b.key.day))
        }
        // The page, then the page's own order (`Breakdown::key`).
        fn order(b: &BreakdownDelta) -> ((AccountSid, PageId), Dimension, &str, Day) {
            (page_of(b), b.key.dimension, &b.key.value, b.key.day)
        }
        all.sort_unstable_by(|a, b| order(a).cmp(&order(b)));
        let mut all = all.into_iter().peekable();
        while let Some(page) = all.peek().map(page_of) {
            let entries = std::iter::from_fn(|| all.next_if(|b| page_of(b) == page));
            self.0
                .entry(page)
                .or_default()
                .merge_breakdowns(entries.map(|b| Breakdown {
                    dimension: b.key.dimension,
                    value: b.key.value.into_string(),
                    day: b.key.day.0,
                    calls: b.calls,
                    messages: b.messages,
                }));
        }
    }

    /// Adds everything `other` gathered.
    pub fn merge(&mut self, other: PageDeltas) {
        for (key, page) in other.0 {
            match self.0.entry(key) {
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(page);
                }
                std::collections::btree_map::Entry::Occupied(mut o) => o.get_mut().add_page(&page),
            }
        }
    }

    /// The page deltas in key order (account SID, then page text: the order of
    /// the store's primary key, and one lock order for every writer).
    /// Hourly entries are pruned here as when added to a stored page, so
    /// that what a page keeps never depends on how CDRs were cut into flushes.
    pub fn into_vec(self) -> Vec<PageDelta> {
        self.0
            .into_iter()
            .map(|((account, page), mut delta)| {
                delta.prune_hours();
                PageDelta {
                    account,
                    page,
                    delta,
                }
            })
            .collect()
    }
}

/// Rows and breakdowns gathered into the pages they go to, in key order.
pub fn pages_of(rows: &[RowDelta], breakdowns: &[BreakdownDelta]) -> Vec<PageDelta> {
    let mut pages = PageDeltas::default();
    for r in rows {
        pages.add_row(r.key.account, r.key.period, &r.price_unit, &r.leaves);
    }
    pages.add_breakdowns(breakdowns.to_vec());
    pages.into_vec()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_page_keeps_the_hours_of_its_two_newest_days() {
        let one = Tally {
            count: 1,
            usage: 1,
            price: 1,
        };
        let mut stored = Page::default();
        for day in [20_000, 20_001] {
            stored.add_breakdown(Dimension::Hour, "05", Day(day), Tally::default(), one);
        }
        stored.add_breakdown(Dimension::Agent, "agt", Day(20_000), one, one);
        let mut delta = Page::default();
        delta.add_breakdown(Dimension::Hour, "06", Day(20_002), Tally::default(), one);
        stored.add_page(&delta);
        let hours: Vec<(i32, &str)> = stored
            .breakdowns()
            .filter(|b| b.dimension == Dimension::Hour)
            .map(|b| (b.day.0, b.value))
            .collect();
        assert_eq!(hours, [(20_001, "05"), (20_002, "06")]);
        // Other dimensions are never pruned.
        assert_eq!(
            stored
                .breakdowns()
                .filter(|b| b.dimension == Dimension::Agent)
                .count(),
            1
        );
    }

    use super::*;
    use crate::category::Category;

    #[test]
    fn breakdowns_past_the_bound_go_to_other() {
        let all = Period::AllTime.start();
        let one = Tally {
            count: 1,
            usage: 60,
            price: 100,
        };
        let mut stored = Page::default();
        for n in 0..MAX_BREAKDOWN_ENTRIES + 500 {
            stored.add_breakdown(
                Dimension::Number,
                &format!("+1555{n:07}"),
                all,
                one,
                Tally::default(),
            );
        }
        // Agents are bounded apart from numbers.
        stored.add_breakdown(Dimension::Agent, "agt", Day(20_000), one, Tally::default());
        let numbers: Vec<_> = stored
            .breakdowns()
            .filter(|b| b.dimension == Dimension::Number)
            .collect();
        assert_eq!(
            numbers.len(),
            MAX_BREAKDOWN_ENTRIES + 1,
            "the bound and `other`"
        );
        let other = numbers.iter().find(|b| b.value == OTHER).unwrap();
        assert_eq!(other.calls.count, 500);
        let total: u64 = numbers.iter().map(|b| b.calls.count).sum();
        assert_eq!(
            total,
            (MAX_BREAKDOWN_ENTRIES + 500) as u64,
            "no usage is lost"
        );
        // A number already on the page keeps counting under its own name; a
        // new one goes to `other`, also when a flush's delta is added.
        let mut delta = Page::default();
        delta.add_breakdown(
            Dimension::Number,
            "+15550000001",
            all,
            one,
            Tally::default(),
        );
        delta.add_breakdown(
            Dimension::Number,
            "+19999999999",
            all,
            one,
            Tally::default(),
        );
        stored.add_page(&delta);
        let get = |v: &str| {
            stored
                .breakdowns()
                .find(|b| b.value == v)
                .map(|b| b.calls.count)
        };
        assert_eq!(get("+15550000001"), Some(2));
        assert_eq!(get("+19999999999"), None);
        assert_eq!(get(OTHER), Some(501));
        assert_eq!(
            stored
                .breakdowns()
                .filter(|b| b.dimension == Dimension::Agent)
                .count(),
            1
        );
        let size = stored.encode().len();
        assert!(size < 64 * 1024, "a full page is {size} bytes");
    }
    fn entry() -> impl proptest::strategy::Strategy<Value = (u8, u32, i32, u64)> {
        use proptest::prelude::*;
        // Mostly numbers, so that their dimension passes the cap.
        let dimension = prop_oneof![8 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8)];
        (dimension, 0u32..6_000, 0i32..2, 1u64..5)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// A page's breakdowns added in one merge ([`Page::add_page`]) are
        /// what adding them one by one in the page's order gives, the cap
        /// and `other` included (a stored page can hold the cap's worth of
        /// numbers and more).
        #[test]
        fn merging_breakdowns_is_adding_them_one_by_one(
            stored in proptest::collection::vec(entry(), 0..3_000),
            delta in proptest::collection::vec(entry(), 0..600),
        ) {
            let dims = [Dimension::Number, Dimension::Agent, Dimension::Hour];
            let page = |entries: &[(u8, u32, i32, u64)]| {
                let mut p = Page::default();
                for &(d, v, day, n) in entries {
                    let value = if v == 0 { String::new() } else { format!("v{v}") };
                    p.add_breakdown(dims[d as usize], &value, Day(20_000 + day), tally(n, n, n as i64), tally(1, 0, 0));
                }
                p
            };
            let (base, delta) = (page(&stored), page(&delta));
            let mut merged = base.clone();
            merged.add_page(&delta);
            let mut one_by_one = base;
            for b in delta.breakdowns() {
                one_by_one.add_breakdown(b.dimension, b.value, b.day, b.calls, b.messages);
            }
            one_by_one.prune_hours();
            proptest::prop_assert_eq!(merged, one_by_one);
        }
    }

    use crate::counters::BreakdownKey;

    fn tally(count: u64, usage: u64, price: i64) -> Tally {
        Tally {
            count,
            usage,
            price,
        }
    }

    fn leaves(leaf: Category, t: Tally) -> Leaves {
        let mut l = Leaves::default();
        l.add_leaf(leaf, t);
        l
    }

    #[test]
    fn rows_and_breakdowns_go_to_their_month_or_the_all_page() {
        let day = Day::parse("2026-11-03").unwrap();
        let account = AccountSid(7);
        let rows: Vec<RowDelta> = Period::containing(day)
            .into_iter()
            .map(|period| RowDelta {
                key: RowKey { account, period },
                leaves: leaves(Category::CallsInboundLocal, tally(1, 60, 850)),
                price_unit: "usd".into(),
            })
            .collect();
        let breakdowns: Vec<BreakdownDelta> = [Dimension::Number, Dimension::Agent]
            .into_iter()
            .map(|dimension| BreakdownDelta {
                key: BreakdownKey {
                    account,
                    day: dimension.day_of(day),
                    dimension,
                    value: "x".into(),
                },
                calls: tally(1, 60, 850),
                messages: Tally::default(),
            })
            .collect();
        let pages = pages_of(&rows, &breakdowns);
        let shape: Vec<(String, Vec<&str>, Vec<Dimension>)> = pages
            .iter()
            .map(|p| {
                (
                    p.page.text(),
                    p.delta.rows().map(|r| r.0.kind()).collect(),
                    p.delta.breakdowns().map(|b| b.dimension).collect(),
                )
            })
            .collect();
        assert_eq!(
            shape,
            [
                (
                    "2026-11".to_string(),
                    vec!["day", "month"],
                    vec![Dimension::Agent]
                ),
                (
                    "all".to_string(),
                    vec!["year", "all"],
                    vec![Dimension::Number]
                ),
            ]
        );
        assert_eq!(pages[0].key().0, "AC00000000000000000000000000000007");
    }

    #[test]
    fn adding_pages_sums_what_they_share_and_keeps_order() {
        let d = |s| Day::parse(s).unwrap();
        let mut a = Page::default();
        a.add_row(
            Period::Day(d("2026-11-05")),
            "usd",
            &leaves(Category::SmsOutboundLongcode, tally(2, 3, 1_500)),
        );
        a.add_breakdown(
            Dimension::Agent,
            "b",
            d("2026-11-05"),
            tally(1, 9, 5),
            Tally::default(),
        );
        let mut b = Page::default();
        b.add_row(
            Period::Day(d("2026-11-01")),
            "usd",
            &leaves(Category::CallsOutbound, tally(1, 60, 1_300)),
        );
        b.add_row(
            Period::Day(d("2026-11-05")),
            "eur",
            &leaves(Category::SmsOutboundLongcode, tally(1, 1, -200)),
        );
        b.add_breakdown(
            Dimension::Agent,
            "a",
            d("2026-11-05"),
            Tally::default(),
            tally(1, 1, 7),
        );
        b.add_breakdown(
            Dimension::Agent,
            "b",
            d("2026-11-05"),
            tally(1, 1, 5),
            Tally::default(),
        );
        a.add_page(&b);
        let rows: Vec<(Period, String, Tally)> = a
            .rows()
            .map(|(p, u, l)| (p, u.to_owned(), l.get(Category::TotalPrice)))
            .collect();
        assert_eq!(
            rows,
            [
                (
                    Period::Day(d("2026-11-01")),
                    "usd".into(),
                    tally(1, 60, 1_300)
                ),
                // The row keeps its first price unit.
                (
                    Period::Day(d("2026-11-05")),
                    "usd".into(),
                    tally(3, 4, 1_300)
                ),
            ]
        );
        let agents: Vec<(&str, Tally, Tally)> = a
            .breakdowns()
            .map(|b| (b.value, b.calls, b.messages))
            .collect();
        assert_eq!(
            agents,
            [
                ("a", Tally::default(), tally(1, 1, 7)),
                ("b", tally(2, 10, 10), Tally::default())
            ]
        );
        assert_eq!(Page::decode(&a.encode()).unwrap(), a);
    }

    #[test]
    fn a_page_with_an_unknown_format_or_garbage_is_an_error() {
        let mut bytes = Page::default().encode();
        assert_eq!(bytes, [FORMAT, 0, 0]);
        bytes[0] = 9;
        let e = Page::decode(&bytes).unwrap_err().to_string();
        assert!(e.contains("format 9"), "{e}");
        assert!(Page::decode(&[FORMAT, 5]).is_err());
        assert!(Page::decode(&[]).is_err());
    }

    #[test]
    fn month_pages_cover_the_days_and_never_the_all_page() {
        let (first, last) = month_pages(
            Day::parse("2025-12-30").unwrap(),
            Day::parse("2026-02-01").unwrap(),
        );
        assert_eq!((first.as_str(), last.as_str()), ("2025-12", "2026-02"));
        assert!(PageId::All.text().as_str() > last.as_str());
    }
}
