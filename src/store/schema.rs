//! The store's tables, the same in SQLite and PostgreSQL (types are chosen so one
//! text works in both; `usage_pages` differs only in storage options).
//!
//! - `usage_pages`: an account's usage rows and breakdowns, a few pages per
//!   account ([`super::page`]): `page` is `YYYY-MM` (that month's day and month
//!   rows, by-agent breakdowns of its days) or `all` (year and all-time rows,
//!   by-number breakdowns); `data` is the encoded page. A row holds the 15 leaf
//!   categories' count (events), usage (billed seconds for calls, segments for
//!   messages) and price (in 10⁻⁵ of `price_unit`, a milli-cent for USD); a
//!   UsageRecord of a rollup category (`calls`, `sms`, `totalprice`, …) is the sum
//!   of its leaves, computed when it is read ([`crate::counters::Leaves`]).
//!   Stores made before pages had `usage_rows` and `usage_breakdowns` instead,
//!   one database row per period or breakdown; [`super::legacy`] converts them.
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

use super::{Conn, Result};

/// `usage_pages` in PostgreSQL: keys compare bytewise (`COLLATE "C"`; keys are
/// ASCII, so the order is the same as the default collation's, without a
/// `strcoll` per comparison), and half of each heap page is left free so that a
/// flush rewriting a page can make a HOT update (no new index entry).
const POSTGRES_PAGES: &str = r#"CREATE TABLE IF NOT EXISTS usage_pages (
        account_sid TEXT COLLATE "C" NOT NULL,
        page TEXT COLLATE "C" NOT NULL,
        data BYTEA NOT NULL,
        PRIMARY KEY (account_sid, page)
    ) WITH (fillfactor = 50)"#;

/// `usage_pages` in SQLite: a WITHOUT ROWID table, so the primary key is the
/// table's own B-tree (one B-tree to search and write per page, not two).
const SQLITE_PAGES: &str = "CREATE TABLE IF NOT EXISTS usage_pages (
        account_sid TEXT NOT NULL,
        page TEXT NOT NULL,
        data BYTEA NOT NULL,
        PRIMARY KEY (account_sid, page)
    ) WITHOUT ROWID";

/// Statements run in order at start; each is idempotent.
pub fn migrations(postgres: bool) -> impl Iterator<Item = &'static str> {
    let pages = if postgres {
        POSTGRES_PAGES
    } else {
        SQLITE_PAGES
    };
    std::iter::once(pages).chain(MIGRATIONS.iter().copied())
}

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

/// Creates or updates the tables, converting the usage tables of an older
/// store into pages; idempotent, in one transaction, and serialised between
/// PostgreSQL instances that start at once.
pub(super) fn migrate(c: &mut Conn) -> Result<()> {
    let postgres = matches!(c, Conn::Postgres(_));
    c.transaction(|c| {
        if postgres {
            c.execute("SELECT pg_advisory_xact_lock(7461726)", &[])?;
        }
        for m in migrations(postgres) {
            c.batch(m)?;
        }
        super::legacy::convert(c)
    })
}
