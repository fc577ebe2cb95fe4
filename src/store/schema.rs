//! The store's tables, the same in SQLite and PostgreSQL (types are chosen so one
//! text works in both).
//!
//! - `usage_rows`: one row per account × period. `period` is `day`, `month`,
//!   `year` or `all`; `start_date` is the period's first day as `YYYY-MM-DD`
//!   (`1970-01-01` for `all`). The row holds the 15 leaf categories, three columns
//!   each, named after the category (`calls_inbound_local_count`, `…_usage`,
//!   `…_price`): `count` is events, `usage` billed seconds for calls and segments
//!   for messages, `price` is in 10⁻⁵ of `price_unit` (a milli-cent for USD).
//!   A UsageRecord of a rollup category (`calls`, `sms`, `totalprice`, …) is the sum
//!   of its leaves' columns, computed when it is read ([`crate::counters::Leaves`]);
//!   one row per period instead of one per category keeps a flush ~20× smaller.
//! - `usage_breakdowns`: usage by the account's phone number or by agent
//!   (`dimension` = `number` or `agent`), calls and messages in one row; per day
//!   for agents, all-time (`day` = `1970-01-01`) for numbers
//!   ([`crate::counters::Dimension::day_of`]). Stores written before numbers were
//!   kept all-time also hold per-day number rows; readers sum over days, so both
//!   count.
//! - `consumer_offsets`: next offset to read per topic partition, written in the
//!   same transaction as the deltas the consumed messages produced.
//! - `dedup_batches`: the 128-bit hashes of the CDR ids first seen in one flush, per
//!   partition, packed 16 bytes each into one blob (one row per flush and partition
//!   instead of one per CDR), with the day they were seen; whole rows are pruned
//!   once older than the dedup window.
//! - `tallyd_meta`: key/value; `last_flush` is the RFC 3339 time of the last flush
//!   (the records' `as_of`).
//! - `api_accounts`: accounts of the HTTP API (auth token, parent, plan and limits),
//!   from config and the admin API.
//! - `api_keys`: AgentPhone Bearer keys, stored as SHA-256 hex only; `key_id` is the
//!   public handle used to list and revoke a key.

use std::sync::LazyLock;

use crate::category::Category;
use crate::counters::{Leaves, Tally};

/// The leaf columns of `usage_rows` in leaf-index order, `count`, `usage`, `price`
/// for each leaf.
pub static LEAF_COLUMNS: LazyLock<Vec<String>> = LazyLock::new(|| {
    Category::ALL[..Category::LEAVES]
        .iter()
        .flat_map(|c| {
            let base = c.name().replace('-', "_");
            ["count", "usage", "price"].map(|f| format!("{base}_{f}"))
        })
        .collect()
});

/// `LEAF_COLUMNS` joined by commas, for a SELECT or INSERT column list.
pub static LEAF_COLUMN_LIST: LazyLock<String> = LazyLock::new(|| LEAF_COLUMNS.join(", "));

/// Number of leaf columns (3 per leaf).
pub const LEAF_COLUMN_COUNT: usize = 3 * Category::LEAVES;

/// Reads a row's leaf columns, in `LEAF_COLUMNS` order.
pub fn leaves_from(mut values: impl Iterator<Item = i64>) -> Leaves {
    let mut leaves = Leaves::default();
    for t in leaves.0.iter_mut() {
        let mut next = || values.next().unwrap_or(0);
        *t = Tally {
            count: next() as u64,
            usage: next() as u64,
            price: next(),
        };
    }
    leaves
}

/// A row's leaf columns, in `LEAF_COLUMNS` order.
pub fn leaf_values(leaves: &Leaves) -> impl Iterator<Item = i64> + '_ {
    leaves
        .0
        .iter()
        .flat_map(|t| [t.count as i64, t.usage as i64, t.price])
}

static USAGE_ROWS: LazyLock<String> = LazyLock::new(|| {
    let cols: String = LEAF_COLUMNS
        .iter()
        .map(|c| format!("        {c} BIGINT NOT NULL DEFAULT 0,\n"))
        .collect();
    format!(
        "CREATE TABLE IF NOT EXISTS usage_rows (
        account_sid TEXT NOT NULL,
        period TEXT NOT NULL,
        start_date TEXT NOT NULL,
        price_unit TEXT NOT NULL,
{cols}        PRIMARY KEY (account_sid, period, start_date)
    )"
    )
});

/// Statements run in order at start; each is idempotent. PostgreSQL also gets
/// [`POSTGRES_ONLY`] and [`POSTGRES_BYTEWISE_KEYS`].
pub fn migrations(postgres: bool) -> impl Iterator<Item = &'static str> {
    let (breakdowns, extra): (&str, &[&str]) = if postgres {
        (&USAGE_BREAKDOWNS.0, POSTGRES_ONLY)
    } else {
        (&USAGE_BREAKDOWNS.1, &[])
    };
    let bytewise = postgres.then(|| POSTGRES_BYTEWISE_KEYS.as_str());
    [USAGE_ROWS.as_str(), breakdowns]
        .into_iter()
        .chain(MIGRATIONS.iter().copied())
        .chain(extra.iter().copied())
        .chain(bytewise)
}

/// `CREATE TABLE {name} (…)` of `usage_breakdowns`.
fn breakdowns_table(name: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {name} (
        account_sid TEXT NOT NULL,
        dimension TEXT NOT NULL,
        value TEXT NOT NULL,
        day TEXT NOT NULL,
        calls_count BIGINT NOT NULL,
        calls_usage BIGINT NOT NULL,
        calls_price BIGINT NOT NULL,
        messages_count BIGINT NOT NULL,
        messages_usage BIGINT NOT NULL,
        messages_price BIGINT NOT NULL,
        PRIMARY KEY (account_sid, dimension, value, day)
    )"
    )
}

/// `usage_breakdowns` for PostgreSQL and for SQLite. In SQLite it is a WITHOUT
/// ROWID table: the primary key is the table's own B-tree instead of an index
/// beside it, one B-tree to search and write per upsert instead of two (a flush of
/// 80k breakdowns: 10% less time; `usage_rows`, with far wider rows, gained
/// nothing from it).
static USAGE_BREAKDOWNS: LazyLock<(String, String)> = LazyLock::new(|| {
    let t = breakdowns_table("usage_breakdowns");
    (t.clone(), format!("{t} WITHOUT ROWID"))
});

/// Rebuilds a SQLite `usage_breakdowns` made before it was a WITHOUT ROWID
/// table; run in one transaction when `sqlite_master` shows the old shape.
pub static SQLITE_REBUILD_BREAKDOWNS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{} WITHOUT ROWID;
        INSERT INTO usage_breakdowns_new SELECT * FROM usage_breakdowns;
        DROP TABLE usage_breakdowns;
        ALTER TABLE usage_breakdowns_new RENAME TO usage_breakdowns;",
        breakdowns_table("usage_breakdowns_new")
    )
});

/// Every flush updates the same counter rows in place. Leaving half of each page
/// free lets PostgreSQL make those HOT updates (no new index entry per update):
/// measured 650 ms instead of 1 s to upsert 82k rows. Applies to pages written
/// from now on.
const POSTGRES_ONLY: &[&str] = &[
    "ALTER TABLE usage_rows SET (fillfactor = 50)",
    "ALTER TABLE usage_breakdowns SET (fillfactor = 50)",
];

/// The primary-key columns of the counter tables.
const KEY_COLUMNS: [(&str, &[&str]); 2] = [
    ("usage_rows", &["account_sid", "period", "start_date"]),
    (
        "usage_breakdowns",
        &["account_sid", "dimension", "value", "day"],
    ),
];

/// In PostgreSQL, key columns compare bytewise (`COLLATE "C"`): every flush looks
/// up and inserts each row's key in the primary-key B-tree, and under the
/// database's default collation (even `C.UTF-8` before PostgreSQL 17) each
/// comparison went through the C library's `strcoll`. Keys are ASCII (SIDs, ISO
/// dates, phone numbers), whose bytewise order is the same. Tables made before
/// get their key columns converted once; the check makes it a no-op after.
static POSTGRES_BYTEWISE_KEYS: LazyLock<String> = LazyLock::new(|| {
    let per_table: String = KEY_COLUMNS
        .iter()
        .map(|(table, columns)| {
            let alters: Vec<String> = columns
                .iter()
                .map(|c| format!(r#"ALTER COLUMN {c} TYPE TEXT COLLATE "C""#))
                .collect();
            format!(
                "IF EXISTS (SELECT 1 FROM information_schema.columns \
                   WHERE table_schema = current_schema() AND table_name = '{table}' \
                   AND column_name = '{}' AND collation_name IS DISTINCT FROM 'C') THEN \
                   ALTER TABLE {table} {}; \
                 END IF; ",
                columns[0],
                alters.join(", ")
            )
        })
        .collect();
    format!("DO $$ BEGIN {per_table}END $$")
});

const MIGRATIONS: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS consumer_offsets (
        topic TEXT NOT NULL,
        partition INTEGER NOT NULL,
        next_offset BIGINT NOT NULL,
        PRIMARY KEY (topic, partition)
    )",
    "CREATE TABLE IF NOT EXISTS dedup_batches (
        topic TEXT NOT NULL,
        partition INTEGER NOT NULL,
        seen_day INTEGER NOT NULL,
        first_offset BIGINT NOT NULL,
        ids BYTEA NOT NULL,
        PRIMARY KEY (topic, partition, first_offset)
    )",
    "CREATE INDEX IF NOT EXISTS dedup_batches_by_day ON dedup_batches (seen_day)",
    "CREATE TABLE IF NOT EXISTS tallyd_meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS api_accounts (
        account_sid TEXT PRIMARY KEY,
        auth_token TEXT NOT NULL,
        parent_sid TEXT,
        friendly_name TEXT NOT NULL,
        plan_name TEXT,
        numbers_limit BIGINT NOT NULL,
        messages_per_month BIGINT NOT NULL,
        voice_minutes_per_month BIGINT NOT NULL,
        max_call_duration_minutes BIGINT NOT NULL,
        concurrent_calls BIGINT NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS api_accounts_by_parent ON api_accounts (parent_sid)",
    "CREATE TABLE IF NOT EXISTS api_keys (
        key_hash TEXT PRIMARY KEY,
        key_id TEXT NOT NULL UNIQUE,
        account_sid TEXT NOT NULL,
        created_at TEXT NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS api_keys_by_account ON api_keys (account_sid)",
];
