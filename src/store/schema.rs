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
//!   (the records' `as_of`); `usage_trigger_edits` counts the edits made to
//!   `usage_triggers` (see [`super::triggers`]).
//! - `api_accounts`: accounts of the HTTP API (auth token, parent, plan and limits),
//!   from config and the admin API.
//! - `api_keys`: AgentPhone Bearer keys, stored as SHA-256 hex only; `key_id` is the
//!   public handle used to list and revoke a key.
//! - `wallet_accounts`: each account's prepaid balance in 10⁻⁵ of its currency:
//!   starting credit + top-ups − debits of flushed CDRs (those not yet flushed
//!   are re-debited by the replay from `consumer_offsets`); see
//!   [`super::wallet`].
//! - `wallet_holds`: per-call holds by (account, call id): amount, status
//!   (`reserved`, `settled`, `released`), Unix-second creation and expiry, and
//!   the call's `duration`, `billsec` and `charged` once its CDR was consumed.
//!   `low_balance_threshold` and `recharge_amount` are the account's own
//!   low-balance settings (NULL: `[wallet]`'s); `low_armed` is 1 until the
//!   stored balance crosses below the threshold and again once a top-up
//!   lifts it back; `low_crossings` numbers the crossings (event ids).
//! - `wallet_credits`: top-ups by (account, idempotency key), so the same key
//!   credits once.
//! - `wallet_events`: the outbox of wallet events (`wallet.low_balance`,
//!   `wallet.recharge_requested`), each written in the transaction of the
//!   balance change that caused it; `payload` is the event's JSON body.
//! - `wallet_owners`: which instance owns the wallets of a CDR partition's
//!   accounts: `owner` is its advertised base URL (`http.advertise_url`), where
//!   the other instances forward wallet requests; `epoch` goes up by one at
//!   every assignment, and a hold, release or top-up is written only while the
//!   row still has the epoch its instance took (a fence against an owner that
//!   lost the partition; see [`super::wallet`]).
//! - `usage_triggers`: Twilio usage triggers ([`crate::triggers`]) as the
//!   API made them; `trigger_value` is a decimal string.
//! - `usage_trigger_firings`: the latest firing of each trigger that fired,
//!   written in the flush transaction that fired it: `period` is the period
//!   key (`YYYY-MM-DD`, `YYYY-MM`, `YYYY`, `all`) it fired for, `value` the
//!   decimal it had reached, `recurring` the trigger's (whether it may fire
//!   again for a later period). Apart from the trigger definitions so that
//!   a flush firing thousands of triggers rewrites a few pages of narrow rows,
//!   not most pages of the wide ones.
//! - `account_webhooks`: where an account's wallet events are sent and the
//!   secret their HMAC-SHA256 signature is made with.
//! - `webhook_outbox`: callbacks to send (trigger firings, wallet events), each
//!   written in the transaction that caused it; `id` is the idempotency token
//!   (the same across replays and retries), `body` what a firing's parameters
//!   are rendered from (`triggers::callback`) or a wallet event's JSON, `status` `pending` → `delivered` | `failed`, times in Unix ms,
//!   `day` the UTC day (days since 1970) it was created, for the delivery stats.
//!   Finished rows are removed `webhooks.keep_finished_secs` after they
//!   finished, their counts added to `webhook_delivery_days` first.
//! - `webhook_delivery_days`: per account and `day`, the counts of the
//!   removed outbox rows (written, delivered, failed); the delivery stats are
//!   these plus the rows still in the outbox.

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

/// `usage_trigger_firings` in PostgreSQL: half of each heap page left free
/// so that a later firing of a trigger is a HOT update.
const POSTGRES_FIRINGS: &str = "CREATE TABLE IF NOT EXISTS usage_trigger_firings (
        sid TEXT PRIMARY KEY,
        period TEXT NOT NULL,
        date_fired TEXT NOT NULL,
        value TEXT NOT NULL,
        recurring TEXT NOT NULL
    ) WITH (fillfactor = 50)";

/// `usage_trigger_firings` in SQLite: WITHOUT ROWID, one B-tree of narrow rows.
const SQLITE_FIRINGS: &str = "CREATE TABLE IF NOT EXISTS usage_trigger_firings (
        sid TEXT PRIMARY KEY,
        period TEXT NOT NULL,
        date_fired TEXT NOT NULL,
        value TEXT NOT NULL,
        recurring TEXT NOT NULL
    ) WITHOUT ROWID";

/// Statements run in order at start; each is idempotent.
pub fn migrations(postgres: bool) -> impl Iterator<Item = &'static str> {
    let own = if postgres {
        [POSTGRES_PAGES, POSTGRES_FIRINGS]
    } else {
        [SQLITE_PAGES, SQLITE_FIRINGS]
    };
    own.into_iter().chain(MIGRATIONS.iter().copied())
}

/// `wallet_holds`, also the table of the SQLite holds file ([`super::holds`]).
pub(super) const WALLET_HOLDS: [&str; 2] = [
    "CREATE TABLE IF NOT EXISTS wallet_holds (
        account_sid TEXT NOT NULL,
        call_id TEXT NOT NULL,
        amount BIGINT NOT NULL,
        status TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        duration BIGINT,
        billsec BIGINT,
        charged BIGINT,
        PRIMARY KEY (account_sid, call_id)
    )",
    "CREATE INDEX IF NOT EXISTS wallet_holds_by_status ON wallet_holds (status)",
];

/// `wallet_owners`, also kept in the SQLite holds file ([`super::holds`]).
pub(super) const WALLET_OWNERS: &str = "CREATE TABLE IF NOT EXISTS wallet_owners (
        topic TEXT NOT NULL,
        partition INTEGER NOT NULL,
        owner TEXT NOT NULL,
        epoch BIGINT NOT NULL,
        PRIMARY KEY (topic, partition)
    )";

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
    "CREATE TABLE IF NOT EXISTS wallet_accounts (
        account_sid TEXT PRIMARY KEY,
        balance BIGINT NOT NULL,
        low_balance_threshold BIGINT,
        recharge_amount BIGINT,
        low_armed BIGINT NOT NULL DEFAULT 1,
        low_crossings BIGINT NOT NULL DEFAULT 0
    )",
    WALLET_HOLDS[0],
    WALLET_HOLDS[1],
    "CREATE TABLE IF NOT EXISTS wallet_credits (
        account_sid TEXT NOT NULL,
        idempotency_key TEXT NOT NULL,
        amount BIGINT NOT NULL,
        reason TEXT NOT NULL,
        created_at TEXT NOT NULL,
        PRIMARY KEY (account_sid, idempotency_key)
    )",
    "CREATE TABLE IF NOT EXISTS wallet_events (
        event_id TEXT PRIMARY KEY,
        account_sid TEXT NOT NULL,
        kind TEXT NOT NULL,
        payload TEXT NOT NULL,
        created_at TEXT NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS wallet_events_by_account ON wallet_events (account_sid, created_at)",
    WALLET_OWNERS,
    "CREATE TABLE IF NOT EXISTS usage_triggers (
        sid TEXT PRIMARY KEY,
        account_sid TEXT NOT NULL,
        friendly_name TEXT NOT NULL,
        usage_category TEXT NOT NULL,
        trigger_by TEXT NOT NULL,
        trigger_value TEXT NOT NULL,
        recurring TEXT NOT NULL,
        callback_url TEXT NOT NULL,
        callback_method TEXT NOT NULL,
        date_created TEXT NOT NULL,
        date_updated TEXT NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS usage_triggers_by_account ON usage_triggers (account_sid, date_created)",
    "CREATE TABLE IF NOT EXISTS account_webhooks (
        account_sid TEXT PRIMARY KEY,
        url TEXT NOT NULL,
        secret TEXT NOT NULL,
        updated_at TEXT NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS webhook_outbox (
        id TEXT PRIMARY KEY,
        account_sid TEXT NOT NULL,
        kind TEXT NOT NULL,
        source_sid TEXT NOT NULL,
        url TEXT NOT NULL,
        method TEXT NOT NULL,
        body TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        day BIGINT NOT NULL,
        status TEXT NOT NULL,
        attempts BIGINT NOT NULL DEFAULT 0,
        next_attempt_at BIGINT NOT NULL,
        last_error TEXT,
        finished_at BIGINT
    )",
    "CREATE INDEX IF NOT EXISTS webhook_outbox_due ON webhook_outbox (status, next_attempt_at)",
    "CREATE INDEX IF NOT EXISTS webhook_outbox_by_account ON webhook_outbox (account_sid, day)",
    "CREATE INDEX IF NOT EXISTS webhook_outbox_finished ON webhook_outbox (finished_at) \
     WHERE finished_at IS NOT NULL",
    "CREATE TABLE IF NOT EXISTS webhook_delivery_days (
        account_sid TEXT NOT NULL,
        day BIGINT NOT NULL,
        total BIGINT NOT NULL,
        delivered BIGINT NOT NULL,
        failed BIGINT NOT NULL,
        PRIMARY KEY (account_sid, day)
    )",
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
        super::legacy::convert(c)?;
        super::legacy::convert_trigger_firings(c)
    })
}
