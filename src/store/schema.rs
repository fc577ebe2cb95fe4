//! The store's tables, the same in SQLite and PostgreSQL (types are chosen so one
//! text works in both).
//!
//! - `usage_records`: one row per account × category × period. `period` is `day`,
//!   `month`, `year` or `all`; `start_date` is the period's first day as
//!   `YYYY-MM-DD` (`1970-01-01` for `all`). `usage` is billed seconds for call
//!   categories and segments for message categories (0 for `totalprice`, whose usage
//!   is its price); `price` is in 10⁻⁵ of `price_unit` (a milli-cent for USD).
//! - `usage_breakdowns`: per-day usage by the account's phone number or by agent.
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

/// Statements run in order at start; each is idempotent.
pub const MIGRATIONS: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS usage_records (
        account_sid TEXT NOT NULL,
        period TEXT NOT NULL,
        category TEXT NOT NULL,
        start_date TEXT NOT NULL,
        count BIGINT NOT NULL,
        usage BIGINT NOT NULL,
        price BIGINT NOT NULL,
        price_unit TEXT NOT NULL,
        PRIMARY KEY (account_sid, period, start_date, category)
    )",
    "CREATE TABLE IF NOT EXISTS usage_breakdowns (
        account_sid TEXT NOT NULL,
        dimension TEXT NOT NULL,
        value TEXT NOT NULL,
        class TEXT NOT NULL,
        day TEXT NOT NULL,
        count BIGINT NOT NULL,
        usage BIGINT NOT NULL,
        price BIGINT NOT NULL,
        PRIMARY KEY (account_sid, dimension, value, class, day)
    )",
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
