//! Stores made before [`super::page`] kept one database row per account × period
//! (`usage_rows`, three columns per leaf category) and one per by-number or
//! by-agent breakdown (`usage_breakdowns`). At start, in the migration's
//! transaction, their contents are added into pages and the two tables dropped.
//! By-number rows kept per day (by versions before numbers were all-time) become
//! the number's all-time entry.

use std::sync::LazyLock;

use crate::calendar::{Day, Period};
use crate::category::Category;
use crate::cdr::AccountSid;
use crate::counters::{BreakdownDelta, BreakdownKey, Dimension, Leaves, RowKey, Tally};

use super::page::{pages_of, PageDelta};
use super::{Error, Result, RowDelta};

/// `usage_rows`' leaf columns in leaf-index order: `count`, `usage`, `price` of
/// each leaf, named after it (`calls_inbound_local_count`, …).
pub static LEAF_COLUMNS: LazyLock<Vec<String>> = LazyLock::new(|| {
    Category::ALL[..Category::LEAVES]
        .iter()
        .flat_map(|c| {
            let base = c.name().replace('-', "_");
            ["count", "usage", "price"].map(|f| format!("{base}_{f}"))
        })
        .collect()
});

/// The query for every old row: key, price unit, then [`LEAF_COLUMNS`].
pub static ROWS_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT account_sid, period, start_date, price_unit, {} FROM usage_rows",
        LEAF_COLUMNS.join(", ")
    )
});

/// The query for every old breakdown: key, then calls and messages tallies.
pub const BREAKDOWNS_SQL: &str = "SELECT account_sid, dimension, value, day, \
     calls_count, calls_usage, calls_price, messages_count, messages_usage, messages_price \
     FROM usage_breakdowns";

pub const DROP_SQL: &str = "DROP TABLE usage_rows; DROP TABLE usage_breakdowns";

/// One old `usage_rows` row as read.
pub struct OldRow {
    pub account: String,
    pub period: String,
    pub start: String,
    pub price_unit: String,
    /// [`LEAF_COLUMNS`]' values.
    pub values: Vec<i64>,
}

/// One old `usage_breakdowns` row as read: key texts and the six tallies.
pub struct OldBreakdown {
    pub key: [String; 4],
    pub values: [i64; 6],
}

fn bad(what: &str, v: &str) -> Error {
    Error::Legacy(format!("{what} {v:?} in an old usage table"))
}

fn account(s: &str) -> Result<AccountSid> {
    AccountSid::parse(s).ok_or_else(|| bad("account SID", s))
}

fn day(s: &str) -> Result<Day> {
    Day::parse(s).ok_or_else(|| bad("date", s))
}

fn tally(v: &[i64]) -> Tally {
    Tally {
        count: v[0] as u64,
        usage: v[1] as u64,
        price: v[2],
    }
}

/// The pages holding what the old rows held.
pub fn to_pages(rows: &[OldRow], breakdowns: &[OldBreakdown]) -> Result<Vec<PageDelta>> {
    let rows = rows
        .iter()
        .map(|r| {
            let start = day(&r.start)?;
            let period = match r.period.as_str() {
                "day" => Period::Day(start),
                "month" => Period::Month(start.month()),
                "year" => Period::Year(start.year()),
                "all" => Period::AllTime,
                other => return Err(bad("period", other)),
            };
            let mut leaves = Leaves::default();
            for (t, v) in leaves.0.iter_mut().zip(r.values.chunks_exact(3)) {
                *t = tally(v);
            }
            Ok(RowDelta {
                key: RowKey {
                    account: account(&r.account)?,
                    period,
                },
                leaves,
                price_unit: r.price_unit.clone(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let breakdowns = breakdowns
        .iter()
        .map(|b| {
            let [sid, dimension, value, on] = &b.key;
            let dimension = match dimension.as_str() {
                "number" => Dimension::Number,
                "agent" => Dimension::Agent,
                other => return Err(bad("dimension", other)),
            };
            Ok(BreakdownDelta {
                key: BreakdownKey {
                    account: account(sid)?,
                    day: dimension.day_of(day(on)?),
                    dimension,
                    value: value.as_str().into(),
                },
                calls: tally(&b.values[..3]),
                messages: tally(&b.values[3..]),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let pages = pages_of(&rows, &breakdowns);
    tracing::info!(
        rows = rows.len(),
        breakdowns = breakdowns.len(),
        pages = pages.len(),
        "converting the old usage tables into pages"
    );
    Ok(pages)
}
