//! Stores made before [`super::page`] kept one database row per account × period
//! (`usage_rows`, three columns per leaf category) and one per by-number or
//! by-agent breakdown (`usage_breakdowns`). At start, in the migration's
//! transaction, their contents are added into pages and the two tables dropped.
//! By-number rows kept per day (by versions before numbers were all-time) become
//! the number's all-time entry.
//!
//! Stores made before `usage_trigger_firings` kept each trigger's latest
//! firing in three columns of `usage_triggers` (`date_fired`, `fired_period`,
//! `fired_value`); they are moved into that table and the columns dropped.

use std::sync::LazyLock;

use crate::calendar::{Day, Period};
use crate::category::Category;
use crate::cdr::AccountSid;
use crate::counters::{BreakdownDelta, BreakdownKey, Dimension, Leaves, RowKey, Tally};

use super::page::{pages_of, PageDelta, RowDelta};
use super::{Conn, Error, Result};

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
static ROWS_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT account_sid, period, start_date, price_unit, {} FROM usage_rows",
        LEAF_COLUMNS.join(", ")
    )
});

/// The query for every old breakdown: key, then calls and messages tallies.
const BREAKDOWNS_SQL: &str = "SELECT account_sid, dimension, value, day, \
     calls_count, calls_usage, calls_price, messages_count, messages_usage, messages_price \
     FROM usage_breakdowns";

const DROP_SQL: &str = "DROP TABLE usage_rows; DROP TABLE usage_breakdowns";

/// One old `usage_rows` row as read.
struct OldRow {
    account: String,
    period: String,
    start: String,
    price_unit: String,
    /// [`LEAF_COLUMNS`]' values.
    values: Vec<i64>,
}

/// One old `usage_breakdowns` row as read: key texts and the six tallies.
struct OldBreakdown {
    key: [String; 4],
    values: [i64; 6],
}

/// If the store has the old usage tables: adds what they hold into pages and
/// drops them (inside the migration's transaction).
pub(super) fn convert(c: &mut Conn) -> Result<()> {
    let probe = match c {
        Conn::Sqlite(_) => {
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'usage_rows'"
        }
        Conn::Postgres(_) => "SELECT to_regclass('usage_rows')::text",
    };
    let old = c.query(probe, &[])?;
    if old.first().and_then(|r| r[0].opt_text()).is_none() {
        return Ok(());
    }
    let rows: Vec<OldRow> = c
        .query(ROWS_SQL.as_str(), &[])?
        .iter()
        .map(|r| OldRow {
            account: r[0].text().to_owned(),
            period: r[1].text().to_owned(),
            start: r[2].text().to_owned(),
            price_unit: r[3].text().to_owned(),
            values: r[4..].iter().map(|v| v.int()).collect(),
        })
        .collect();
    let breakdowns: Vec<OldBreakdown> = c
        .query(BREAKDOWNS_SQL, &[])?
        .iter()
        .map(|r| OldBreakdown {
            key: std::array::from_fn(|i| r[i].text().to_owned()),
            values: std::array::from_fn(|i| r[4 + i].int()),
        })
        .collect();
    let pages = to_pages(&rows, &breakdowns)?;
    c.write_pages(&pages, &Default::default())?;
    c.batch(DROP_SQL)
}

/// If `usage_triggers` still has its firing columns: moves the firings they
/// hold into `usage_trigger_firings` and drops them (inside the migration's
/// transaction).
pub(super) fn convert_trigger_firings(c: &mut Conn) -> Result<()> {
    let probe = match c {
        Conn::Sqlite(_) => {
            "SELECT name FROM pragma_table_info('usage_triggers') WHERE name = 'fired_period'"
        }
        Conn::Postgres(_) => {
            "SELECT column_name::text FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = 'usage_triggers' \
             AND column_name = 'fired_period'"
        }
    };
    if c.query(probe, &[])?.is_empty() {
        return Ok(());
    }
    if matches!(c, Conn::Postgres(_)) {
        // An instance of an older version still running must not mark a
        // firing in the old columns between the copy and the drop.
        c.batch("LOCK TABLE usage_triggers IN SHARE ROW EXCLUSIVE MODE")?;
    }
    let moved = c.execute(
        "INSERT INTO usage_trigger_firings (sid, period, date_fired, value, recurring) \
         SELECT sid, fired_period, date_fired, fired_value, recurring FROM usage_triggers \
         WHERE fired_period IS NOT NULL AND date_fired IS NOT NULL AND fired_value IS NOT NULL \
         ON CONFLICT (sid) DO NOTHING",
        &[],
    )?;
    tracing::info!(
        firings = moved,
        "moving usage trigger firings into their own table"
    );
    c.batch(
        "ALTER TABLE usage_triggers DROP COLUMN date_fired; \
         ALTER TABLE usage_triggers DROP COLUMN fired_period; \
         ALTER TABLE usage_triggers DROP COLUMN fired_value",
    )
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
fn to_pages(rows: &[OldRow], breakdowns: &[OldBreakdown]) -> Result<Vec<PageDelta>> {
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
