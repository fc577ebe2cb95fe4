//! Usage Records as Twilio serves them (docs/contract.md §5), computed from the stored
//! per-period rows: which intervals a request lists, which stored rows answer
//! each interval, and how a record's values are written.
//!
//! Every (interval, category) pair is listed, with zeros where nothing was used,
//! so the number of records is known before the store is read and a page only
//! reads the rows of its own intervals.
//!
//! An interval is answered from the coarsest stored rows that tile it exactly:
//! whole years from `year` rows, whole months from `month` rows, the ragged edges
//! from `day` rows. Thirty days of daily records read 30 × categories day rows; a
//! year of all-time usage reads one year row per category.

use rust_decimal::prelude::*;

use super::twilio_categories::ZERO_CATEGORIES;
use crate::calendar::{Day, Month};
use crate::category::{Category, Unit};
use crate::counters::Leaves;
use crate::rating::price_to_decimal;
use crate::store::page::{month_pages, PageId};
use crate::store::{self, Conn};

pub use crate::store::conn::placeholders as in_list;

/// One stored row: every leaf category of one account × period.
#[derive(Debug, Clone)]
pub struct Row {
    /// The period's first day.
    pub start: Day,
    pub price_unit: String,
    pub leaves: Leaves,
}

/// The `kind` rows of `accounts` starting in `[from, to]`. A rollup category's
/// values are the sums over its leaves ([`Leaves::get`]).
pub fn read_rows(
    c: &mut Conn,
    accounts: &[String],
    kind: RowKind,
    from: Day,
    to: Day,
) -> store::Result<Vec<Row>> {
    let (first, last) = match kind {
        RowKind::Day | RowKind::Month => month_pages(from, to),
        RowKind::Year | RowKind::All => (PageId::All.text(), PageId::All.text()),
    };
    let mut rows = Vec::new();
    for page in c.read_pages(accounts, &first, &last)? {
        rows.extend(
            page.rows()
                .filter(|(p, _, _)| p.kind() == kind.as_str() && (from..=to).contains(&p.start()))
                .map(|(p, unit, leaves)| Row {
                    start: p.start(),
                    price_unit: unit.to_owned(),
                    leaves,
                }),
        );
    }
    Ok(rows)
}

/// The list endpoints: `Records` and its subresources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subresource {
    Root,
    Daily,
    Monthly,
    Yearly,
    AllTime,
    Today,
    Yesterday,
    ThisMonth,
    LastMonth,
}

impl Subresource {
    /// Parses a path segment, with or without `.json`.
    pub fn parse(segment: &str) -> Option<Subresource> {
        let name = segment.strip_suffix(".json").unwrap_or(segment);
        Some(match name {
            "Daily" => Subresource::Daily,
            "Monthly" => Subresource::Monthly,
            "Yearly" => Subresource::Yearly,
            "AllTime" => Subresource::AllTime,
            "Today" => Subresource::Today,
            "Yesterday" => Subresource::Yesterday,
            "ThisMonth" => Subresource::ThisMonth,
            "LastMonth" => Subresource::LastMonth,
            _ => return None,
        })
    }

    /// The path below `/Usage/Records` (`""` for the root).
    pub fn path_suffix(self) -> &'static str {
        match self {
            Subresource::Root => "",
            Subresource::Daily => "/Daily",
            Subresource::Monthly => "/Monthly",
            Subresource::Yearly => "/Yearly",
            Subresource::AllTime => "/AllTime",
            Subresource::Today => "/Today",
            Subresource::Yesterday => "/Yesterday",
            Subresource::ThisMonth => "/ThisMonth",
            Subresource::LastMonth => "/LastMonth",
        }
    }

    /// Whether `StartDate`/`EndDate` apply (the fixed periods ignore them).
    pub fn takes_dates(self) -> bool {
        matches!(
            self,
            Subresource::Root
                | Subresource::Daily
                | Subresource::Monthly
                | Subresource::Yearly
                | Subresource::AllTime
        )
    }
}

/// The `subresource_uris` keys and path names, in Twilio's order.
pub const SUBRESOURCE_URIS: [(&str, &str); 8] = [
    ("all_time", "AllTime"),
    ("daily", "Daily"),
    ("last_month", "LastMonth"),
    ("monthly", "Monthly"),
    ("this_month", "ThisMonth"),
    ("today", "Today"),
    ("yearly", "Yearly"),
    ("yesterday", "Yesterday"),
];

/// An inclusive range of days.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interval {
    pub start: Day,
    pub end: Day,
}

/// The intervals a request lists, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Buckets {
    /// One interval answered from the stored all-time rows (`Records` and
    /// `AllTime` without dates); the interval is only what the record shows.
    AllTime(Interval),
    /// One record per category for each interval.
    Intervals(Vec<Interval>),
}

impl Buckets {
    pub fn len(&self) -> usize {
        match self {
            Buckets::AllTime(_) => 1,
            Buckets::Intervals(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn get(&self, i: usize) -> Interval {
        match self {
            Buckets::AllTime(iv) => *iv,
            Buckets::Intervals(v) => v[i],
        }
    }
}

fn next_day(d: Day) -> Day {
    Day(d.0 + 1)
}

fn month_after(m: Month) -> Month {
    Month(m.0 + 1)
}

/// The intervals of a dated request over `[start, end]` (`start <= end`).
pub fn intervals(sub: Subresource, start: Day, end: Day) -> Vec<Interval> {
    let clip = |s: Day, e: Day| Interval {
        start: s.max(start),
        end: e.min(end),
    };
    match sub {
        Subresource::Daily => (start.0..=end.0)
            .map(|d| Interval {
                start: Day(d),
                end: Day(d),
            })
            .collect(),
        Subresource::Monthly => {
            let mut out = Vec::new();
            let mut m = start.month();
            while m <= end.month() {
                out.push(clip(m.first_day(), m.last_day()));
                m = month_after(m);
            }
            out
        }
        Subresource::Yearly => (start.year()..=end.year())
            .map(|y| clip(Day::from_ymd(y, 1, 1), Day::from_ymd(y, 12, 31)))
            .collect(),
        _ => vec![Interval { start, end }],
    }
}

/// The single interval of a fixed-period subresource, relative to `today`.
pub fn fixed_interval(sub: Subresource, today: Day) -> Option<Interval> {
    let month = today.month();
    Some(match sub {
        Subresource::Today => Interval {
            start: today,
            end: today,
        },
        Subresource::Yesterday => Interval {
            start: Day(today.0 - 1),
            end: Day(today.0 - 1),
        },
        Subresource::ThisMonth => Interval {
            start: month.first_day(),
            end: month.last_day(),
        },
        Subresource::LastMonth => {
            let m = Month(month.0 - 1);
            Interval {
                start: m.first_day(),
                end: m.last_day(),
            }
        }
        _ => return None,
    })
}

/// A stored period kind (a row's [`crate::calendar::Period::kind`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowKind {
    Day,
    Month,
    Year,
    All,
}

impl RowKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RowKind::Day => "day",
            RowKind::Month => "month",
            RowKind::Year => "year",
            RowKind::All => "all",
        }
    }
}

/// Stored rows of one kind whose `start_date` is in `[from, to]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowRange {
    pub kind: RowKind,
    pub from: Day,
    pub to: Day,
}

/// The fewest stored-row ranges that cover consecutive intervals exactly.
pub fn tile(intervals: &[Interval]) -> Vec<RowRange> {
    let mut out: Vec<RowRange> = Vec::new();
    let mut push = |kind: RowKind, at: Day| match out.last_mut() {
        Some(last) if last.kind == kind && last.to < at => last.to = at,
        _ => out.push(RowRange {
            kind,
            from: at,
            to: at,
        }),
    };
    for iv in intervals {
        let mut cur = iv.start;
        while cur <= iv.end {
            let (y, m, d) = cur.ymd();
            let year_end = Day::from_ymd(y, 12, 31);
            let month_end = cur.month().last_day();
            if m == 1 && d == 1 && year_end <= iv.end {
                push(RowKind::Year, cur);
                cur = next_day(year_end);
            } else if d == 1 && month_end <= iv.end {
                push(RowKind::Month, cur);
                cur = next_day(month_end);
            } else {
                push(RowKind::Day, cur);
                cur = next_day(cur);
            }
        }
    }
    out
}

/// A category a listing shows: one tallyd counts, or one of Twilio's that it
/// does not ([`ZERO_CATEGORIES`]), whose records are always zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listed {
    Counted(Category),
    /// An index into [`ZERO_CATEGORIES`].
    Zero(usize),
}

impl Listed {
    /// A Twilio category name.
    pub fn parse(s: &str) -> Option<Listed> {
        if let Ok(c) = s.parse::<Category>() {
            return Some(Listed::Counted(c));
        }
        ZERO_CATEGORIES
            .binary_search_by(|z| z.0.cmp(s))
            .ok()
            .map(Listed::Zero)
    }
    pub fn name(self) -> &'static str {
        match self {
            Listed::Counted(c) => c.name(),
            Listed::Zero(i) => ZERO_CATEGORIES[i].0,
        }
    }
    pub fn count_unit(self) -> &'static str {
        match self {
            Listed::Counted(c) => c.count_unit(),
            Listed::Zero(i) => ZERO_CATEGORIES[i].1,
        }
    }
    pub fn usage_unit(self, currency: &str) -> String {
        match self {
            Listed::Counted(c) => c.usage_unit(currency),
            Listed::Zero(i) => ZERO_CATEGORIES[i].2.to_owned(),
        }
    }
    pub fn description(self) -> &'static str {
        match self {
            Listed::Counted(c) => c.description(),
            Listed::Zero(i) => ZERO_CATEGORIES[i].3,
        }
    }
}

impl std::fmt::Display for Listed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The categories a listing shows, in the order records are listed: the one
/// asked for, or every category tallyd counts (alphabetical, as Twilio).
pub fn listed_categories(filter: Option<Listed>) -> Vec<Listed> {
    match filter {
        Some(c) => vec![c],
        None => {
            let mut all = Category::ALL.to_vec();
            all.sort_by_key(|c| c.name());
            all.into_iter().map(Listed::Counted).collect()
        }
    }
}

/// Count, usage and price summed over the rows of one record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub count: i64,
    /// Billed seconds (calls) or segments (messages).
    pub usage: i64,
    /// 10⁻⁵ of the currency.
    pub price: i64,
}

impl Totals {
    pub fn add(&mut self, o: Totals) {
        self.count += o.count;
        self.usage += o.usage;
        self.price += o.price;
    }
}

/// A price in 10⁻⁵ units as Twilio writes it: `"0"`, `"0.195"`, `"2192.84855"`.
pub fn price_string(price: i64) -> String {
    price_to_decimal(price).normalize().to_string()
}

/// Billed seconds as minutes, rounded half-up to 2 decimals: 90 → `"1.5"`.
pub fn minutes_string(seconds: i64) -> String {
    (Decimal::from(seconds) / Decimal::from(60))
        .round_dp_with_strategy(2, RoundingStrategy::MidpointAwayFromZero)
        .normalize()
        .to_string()
}

/// `count` and `usage` of a record as JSON values (strings; `count` null for
/// `totalprice`).
pub fn count_and_usage(category: Listed, t: Totals) -> (serde_json::Value, String) {
    let Listed::Counted(category) = category else {
        return ("0".into(), "0".into());
    };
    match category.unit() {
        Unit::Calls => (t.count.to_string().into(), minutes_string(t.usage)),
        Unit::Messages => (t.count.to_string().into(), t.usage.to_string()),
        Unit::Price => (serde_json::Value::Null, price_string(t.price)),
    }
}

/// Parses `StartDate`/`EndDate`: `YYYY-MM-DD`, or an offset from `today` such as
/// `-30days` or `+30days`.
pub fn parse_date(s: &str, today: Day) -> Option<Day> {
    if let Some(d) = Day::parse(s) {
        return Some(d);
    }
    let (sign, rest) = match s.as_bytes().first()? {
        b'-' => (-1, &s[1..]),
        b'+' => (1, &s[1..]),
        _ => return None,
    };
    let n = rest
        .strip_suffix("days")
        .or_else(|| rest.strip_suffix("day"))?;
    if n.is_empty() || n.len() > 6 || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(Day(today.0 + sign * n.parse::<i32>().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Day {
        Day::parse(s).unwrap()
    }

    fn r(kind: RowKind, from: &str, to: &str) -> RowRange {
        RowRange {
            kind,
            from: d(from),
            to: d(to),
        }
    }

    #[test]
    fn tiles_use_the_coarsest_rows() {
        let iv = |a, b| Interval {
            start: d(a),
            end: d(b),
        };
        assert_eq!(
            tile(&[iv("2024-12-30", "2026-02-02")]),
            [
                r(RowKind::Day, "2024-12-30", "2024-12-31"),
                r(RowKind::Year, "2025-01-01", "2025-01-01"),
                r(RowKind::Month, "2026-01-01", "2026-01-01"),
                r(RowKind::Day, "2026-02-01", "2026-02-02"),
            ]
        );
        let days = intervals(Subresource::Daily, d("2025-01-30"), d("2025-02-02"));
        assert_eq!(days.len(), 4);
        assert_eq!(tile(&days), [r(RowKind::Day, "2025-01-30", "2025-02-02")]);
        let months = intervals(Subresource::Monthly, d("2025-01-15"), d("2025-04-10"));
        assert_eq!(
            months
                .iter()
                .map(|i| (i.start.to_string(), i.end.to_string()))
                .collect::<Vec<_>>(),
            [
                ("2025-01-15".into(), "2025-01-31".into()),
                ("2025-02-01".into(), "2025-02-28".into()),
                ("2025-03-01".into(), "2025-03-31".into()),
                ("2025-04-01".into(), "2025-04-10".into()),
            ]
        );
        assert_eq!(
            tile(&months),
            [
                r(RowKind::Day, "2025-01-15", "2025-01-31"),
                r(RowKind::Month, "2025-02-01", "2025-03-01"),
                r(RowKind::Day, "2025-04-01", "2025-04-10"),
            ]
        );
    }

    #[test]
    fn fixed_periods() {
        let today = d("2025-03-04");
        let i = fixed_interval(Subresource::LastMonth, today).unwrap();
        assert_eq!((i.start, i.end), (d("2025-02-01"), d("2025-02-28")));
        let i = fixed_interval(Subresource::Yesterday, today).unwrap();
        assert_eq!((i.start, i.end), (d("2025-03-03"), d("2025-03-03")));
        let i = fixed_interval(Subresource::LastMonth, d("2025-01-10")).unwrap();
        assert_eq!((i.start, i.end), (d("2024-12-01"), d("2024-12-31")));
    }

    #[test]
    fn values_are_written_like_twilio() {
        assert_eq!(price_string(0), "0");
        assert_eq!(price_string(19_500), "0.195");
        assert_eq!(price_string(219_284_855), "2192.84855");
        assert_eq!(minutes_string(90), "1.5");
        assert_eq!(minutes_string(60), "1");
        assert_eq!(minutes_string(100), "1.67");
        assert_eq!(minutes_string(3), "0.05");
        assert_eq!(minutes_string(0), "0");
        let (c, u) = count_and_usage(
            Listed::Counted(Category::TotalPrice),
            Totals {
                count: 3,
                usage: 0,
                price: 1000,
            },
        );
        assert_eq!((c, u.as_str()), (serde_json::Value::Null, "0.01"));
    }

    #[test]
    fn dates_and_offsets() {
        let today = d("2025-03-04");
        assert_eq!(parse_date("2025-01-31", today), Some(d("2025-01-31")));
        assert_eq!(parse_date("-30days", today), Some(d("2025-02-02")));
        assert_eq!(parse_date("+1day", today), Some(d("2025-03-05")));
        for bad in ["2025-02-30", "-days", "30days", "-3weeks", "yesterday", ""] {
            assert_eq!(parse_date(bad, today), None, "{bad}");
        }
    }

    #[test]
    fn categories_are_alphabetical() {
        let all = listed_categories(None);
        assert_eq!(all.len(), Category::COUNT);
        assert_eq!(all[0], Listed::Counted(Category::Calls));
        assert_eq!(*all.last().unwrap(), Listed::Counted(Category::TotalPrice));
    }

    #[test]
    fn every_twilio_category_parses_and_zero_ones_are_sorted() {
        assert!(ZERO_CATEGORIES.windows(2).all(|w| w[0].0 < w[1].0));
        for (name, _, _, _) in ZERO_CATEGORIES {
            let l = Listed::parse(name).unwrap();
            assert_eq!(l.name(), *name);
            assert!(
                name.parse::<Category>().is_err(),
                "{name} is counted by tallyd and listed as zero"
            );
            assert_eq!(
                count_and_usage(l, Totals::default()),
                ("0".into(), "0".into())
            );
        }
        let p = Listed::parse("phonenumbers").unwrap();
        assert_eq!(
            (p.count_unit(), p.usage_unit("usd")),
            ("numbers", "numbers".into())
        );
        assert_eq!(
            Listed::parse("calls"),
            Some(Listed::Counted(Category::Calls))
        );
        assert_eq!(Listed::parse("calls-teleport"), None);
    }
}
