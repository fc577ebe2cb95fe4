//! The store: SQLite (embedded default) or PostgreSQL, chosen by URL — the one
//! store layer the flusher, the consumers' loads, the HTTP API and the demo all
//! go through.
//!
//! - [`Store`] is a cloneable handle: the parsed URL, a pool of idle
//!   connections, the store's health. [`Store::migrate`] creates and upgrades the
//!   tables once, at start; connections are opened the one way [`conn::Conn`]
//!   does (one set of SQLite pragmas and timeouts, one PostgreSQL setup) and
//!   never migrate.
//! - [`Error`] is the one error type, and says what retrying can do
//!   ([`ErrorKind`]): a connection refused or a serialization failure is
//!   *retryable*; a page that does not decode or a violated constraint is
//!   *permanent* (retrying the same write fails the same way); *fenced* means
//!   another instance owns the partition.
//! - [`flush`] is the flush transaction, written once for both databases: the
//!   offsets' compare-and-set, the usage pages' read-modify-write, the dedup
//!   ids, pruning, meta. [`sqlite`] and [`pg`] supply the few primitives that
//!   differ (opening, bulk page reads and writes).
//! - [`wallet`] holds the wallets' rows; on SQLite, the hold writer's grants
//!   and releases go to a database file of their own ([`holds`]), so they
//!   never wait for a flush.
//! - [`triggers`] holds the usage triggers' rows (the Usage Triggers API's,
//!   and what the flusher's trigger book is loaded from).
//! - [`schema`] holds the tables, [`page`] how usage is laid out in them,
//!   [`legacy`] the conversion of older stores, [`checkpoint`] the copying of
//!   SQLite's WAL into the database file off the flush path.

pub mod checkpoint;
pub mod conn;
pub mod firing;
pub mod flush;
pub mod holds;
mod legacy;
pub mod outbox;
pub mod page;
mod pg;
pub mod schema;
mod sqlite;
pub mod triggers;
pub mod wallet;

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Semaphore;

pub use conn::{Conn, Param, Value};
pub use flush::{
    DedupRows, FlushBatch, FlushOutcome, OffsetAdvance, StoredBreakdown, StoredRecord,
};

use checkpoint::Checkpointer;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("store URL {0:?} is neither sqlite://PATH nor postgres://…")]
    BadUrl(String),
    #[error("cannot create directory for SQLite file {path}: {source}")]
    Dir {
        path: String,
        source: std::io::Error,
    },
    #[error("SQLite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("PostgreSQL: {}", pg_detail(.0))]
    Postgres(#[from] postgres::Error),
    #[error("usage page {page:?} of {account}: {reason}")]
    Page {
        account: String,
        page: String,
        reason: page::PageError,
    },
    #[error("cannot convert the store's old usage tables: {0}")]
    Legacy(String),
    /// A stored row that does not decode (a value no version of tallyd writes).
    #[error("{table} row {key:?}: {reason}")]
    BadRow {
        table: &'static str,
        key: String,
        reason: String,
    },
    #[error("gave up: {0}")]
    Cancelled(String),
    #[error("store task failed: {0}")]
    Task(String),
    #[error(
        "partition {topic}/{partition} was advanced by someone else (expected offset {expected:?}, found {found:?}); \
         this instance no longer owns it"
    )]
    Fenced {
        topic: String,
        partition: i32,
        expected: Option<i64>,
        found: Option<i64>,
    },
}

/// What retrying an operation that failed with an [`Error`] can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The store is down, busy or lost the connection: the same operation may
    /// succeed later.
    Retryable,
    /// The same operation fails the same way whenever it is tried: data the
    /// store holds or is given is wrong (a page that does not decode, a value
    /// too large, a constraint violated), or the configuration is.
    Permanent,
    /// Another instance advanced the partition: this one no longer owns it.
    Fenced,
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Fenced { .. } => ErrorKind::Fenced,
            Error::BadUrl(_) | Error::Page { .. } | Error::Legacy(_) | Error::BadRow { .. } => {
                ErrorKind::Permanent
            }
            Error::Dir { .. } | Error::Cancelled(_) | Error::Task(_) => ErrorKind::Retryable,
            Error::Sqlite(e) => sqlite_kind(e),
            Error::Postgres(e) => pg_kind(e),
        }
    }

    /// Whether retrying the same batch can never succeed because another
    /// instance owns the partition.
    pub fn is_fenced(&self) -> bool {
        self.kind() == ErrorKind::Fenced
    }

    pub fn is_permanent(&self) -> bool {
        self.kind() == ErrorKind::Permanent
    }

    /// A short name of the error's cause for metric labels.
    pub fn cause(&self) -> &'static str {
        match self {
            Error::BadUrl(_) | Error::Dir { .. } => "config",
            Error::Sqlite(_) => "sqlite",
            Error::Postgres(_) => "postgres",
            Error::Page { .. } => "page",
            Error::Legacy(_) => "legacy",
            Error::BadRow { .. } => "row",
            Error::Cancelled(_) | Error::Task(_) => "cancelled",
            Error::Fenced { .. } => "fenced",
        }
    }
}

fn sqlite_kind(e: &rusqlite::Error) -> ErrorKind {
    use rusqlite::ErrorCode as C;
    match e {
        rusqlite::Error::SqliteFailure(f, _) => match f.code {
            C::ConstraintViolation
            | C::TooBig
            | C::TypeMismatch
            | C::DatabaseCorrupt
            | C::NotADatabase
            | C::ApiMisuse
            | C::ParameterOutOfRange => ErrorKind::Permanent,
            _ => ErrorKind::Retryable,
        },
        // Conversion and usage errors: the data or the query is wrong.
        _ => ErrorKind::Permanent,
    }
}

fn pg_kind(e: &postgres::Error) -> ErrorKind {
    let Some(db) = e.as_db_error() else {
        // No answer from the server: a connection that failed or was closed.
        // Values that do not convert are errors of the data.
        let text = e.to_string();
        return if text.contains("serializing") || text.contains("deserializing") {
            ErrorKind::Permanent
        } else {
            ErrorKind::Retryable
        };
    };
    let code = db.code().code();
    // Connection exceptions, transaction rollbacks (serialization, deadlock),
    // insufficient resources, operator intervention (shutdown, cancel), system
    // errors, lock timeouts, objects in use.
    let retryable = ["08", "40", "53", "57", "58"]
        .iter()
        .any(|class| code.starts_with(class))
        || matches!(code, "55P03" | "55006");
    if retryable {
        ErrorKind::Retryable
    } else {
        ErrorKind::Permanent
    }
}

/// The server's message when there is one ("db error" alone says nothing).
fn pg_detail(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where the store is.
#[derive(Clone)]
pub(crate) enum Backend {
    Sqlite(PathBuf),
    Postgres(Box<postgres::Config>),
}

/// Whether the store answers, for `/readyz` and `tallyd_store_up`.
#[derive(Default)]
pub struct StoreHealth {
    up: AtomicBool,
    /// Why the last operation failed, while the store is down.
    last_error: Mutex<Option<String>>,
}

impl StoreHealth {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Why the store is down (`None` while it is up).
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().clone()
    }

    pub(crate) fn record<T>(&self, result: &Result<T>) {
        match result {
            Ok(_) => {
                if !self.up.swap(true, Ordering::Relaxed) {
                    *self.last_error.lock() = None;
                    metrics::gauge!(crate::metrics::STORE_UP).set(1.0);
                }
            }
            Err(e) => match e.kind() {
                ErrorKind::Retryable => {
                    self.up.store(false, Ordering::Relaxed);
                    *self.last_error.lock() = Some(e.to_string());
                    metrics::gauge!(crate::metrics::STORE_UP).set(0.0);
                    metrics::counter!(crate::metrics::STORE_ERRORS_TOTAL).increment(1);
                }
                // The store answered: it is up, the data or the owner is wrong.
                ErrorKind::Permanent => {
                    tracing::error!(error = %e, "permanent store error");
                    metrics::counter!(crate::metrics::STORE_PERMANENT_ERRORS_TOTAL, "cause" => e.cause())
                        .increment(1);
                }
                ErrorKind::Fenced => {}
            },
        }
    }
}

/// A handle on the store: cheap to clone, shared by everything that reads or
/// writes it.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Backend,
    /// The URL with its password replaced, for logs and errors.
    shown: String,
    idle: Mutex<Vec<Conn>>,
    /// A SQLite store's idle connections to its holds file, for the reads
    /// of [`Store::hold`] (see [`holds`]).
    holds_idle: Mutex<Vec<Conn>>,
    /// Bounds concurrent queries of the async callers ([`Store::run`]).
    permits: Semaphore,
    health: Arc<StoreHealth>,
    /// A SQLite store's WAL checkpoints (see [`checkpoint`]).
    checkpointer: Option<Checkpointer>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Dropping a sync postgres client runs a small runtime of its own, which
        // panics on a tokio worker; the last handle may well be dropped on one.
        let conns = std::mem::take(self.idle.get_mut());
        if !conns.is_empty() && tokio::runtime::Handle::try_current().is_ok() {
            let _ = std::thread::spawn(move || drop(conns)).join();
        }
    }
}

/// Idle connections kept per store (more may be open at once; the extra ones
/// are closed when they come back).
const MAX_IDLE: usize = 16;

/// `url` with the password of `scheme://user:password@…` replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// Returns `conn` to the pool `idle` after a use that went `ok`: a
/// connection that failed may be mid-transaction or dead, and is not reused.
fn give_back(idle: &Mutex<Vec<Conn>>, conn: Conn, ok: bool) {
    if ok && !conn.is_broken() {
        let mut idle = idle.lock();
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
    }
}

impl Store {
    /// Parses `sqlite://PATH` or `postgres://…` (also `postgresql://…`); opens
    /// nothing. `pool_size` bounds the async callers' concurrent queries.
    pub fn new(url: &str, pool_size: usize) -> Result<Store> {
        let bad = || Error::BadUrl(redact_url(url));
        let backend = if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(bad());
            }
            Backend::Sqlite(PathBuf::from(path))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let mut cfg = postgres::Config::from_str(url).map_err(|_| bad())?;
            if cfg.get_connect_timeout().is_none() {
                cfg.connect_timeout(std::time::Duration::from_secs(5));
            }
            Backend::Postgres(Box::new(cfg))
        } else {
            return Err(bad());
        };
        let checkpointer = match &backend {
            Backend::Sqlite(_) => Some(Checkpointer::start(backend.clone())?),
            Backend::Postgres(_) => None,
        };
        Ok(Store {
            inner: Arc::new(Inner {
                backend,
                shown: redact_url(url),
                idle: Mutex::new(Vec::new()),
                holds_idle: Mutex::new(Vec::new()),
                permits: Semaphore::new(pool_size.max(1)),
                health: Arc::new(StoreHealth::default()),
                checkpointer,
            }),
        })
    }

    /// [`Store::new`] and [`Store::migrate`]: for tools and tests that use a
    /// store on their own.
    pub fn open(url: &str) -> Result<Store> {
        let store = Store::new(url, 4)?;
        store.migrate()?;
        Ok(store)
    }

    /// Creates or upgrades the tables (idempotent; PostgreSQL instances starting
    /// together take turns). Run once at start, before anything else uses the
    /// store.
    pub fn migrate(&self) -> Result<()> {
        self.with_conn(schema::migrate)
    }

    /// The URL, password redacted.
    pub fn url(&self) -> &str {
        &self.inner.shown
    }

    pub fn is_sqlite(&self) -> bool {
        matches!(self.inner.backend, Backend::Sqlite(_))
    }

    pub fn health(&self) -> &Arc<StoreHealth> {
        &self.inner.health
    }

    /// A new connection of its own (not from the pool).
    pub fn connect(&self) -> Result<Conn> {
        let c = Conn::open(&self.inner.backend);
        if c.is_err() {
            self.inner.health.record(&c);
        }
        c
    }

    /// Runs `f` with a pooled connection, on this thread. A pooled PostgreSQL
    /// connection is checked before it is handed out (one empty query): one
    /// the server closed meanwhile (a restarted server, a killed backend) is
    /// replaced by a new one instead of failing `f`.
    pub fn with_conn<T>(&self, f: impl FnOnce(&mut Conn) -> Result<T>) -> Result<T> {
        let mut conn = loop {
            let Some(mut c) = self.inner.idle.lock().pop() else {
                break self.connect()?;
            };
            if c.is_alive() {
                break c;
            }
            tracing::info!("a pooled store connection was closed by the server; replacing it");
        };
        let out = f(&mut conn);
        self.inner.health.record(&out);
        give_back(&self.inner.idle, conn, out.is_ok());
        out
    }

    /// Runs `f` on tokio's blocking pool once a connection permit is free.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Conn) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let _permit = self
            .inner
            .permits
            .acquire()
            .await
            .map_err(|e| Error::Task(e.to_string()))?;
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.with_conn(f))
            .await
            .map_err(|e| Error::Task(e.to_string()))?
    }

    /// The hold writer's own connections (see [`holds::HoldWriter`]).
    pub fn hold_writer(&self) -> Result<holds::HoldWriter> {
        let w = self.connect().and_then(holds::HoldWriter::new);
        if w.is_err() {
            self.inner.health.record(&w);
        }
        w
    }

    /// Writes a batch of grants and releases with the hold writer's
    /// connections (see [`Conn::write_holds`]).
    pub fn write_holds(
        &self,
        w: &mut holds::HoldWriter,
        writes: &[(wallet::HoldWrite, Option<wallet::Fence>)],
    ) -> Result<Vec<Option<Option<wallet::StoredHold>>>> {
        let out = w.write(writes);
        self.inner.health.record(&out);
        out
    }

    /// Writes one flush atomically (see [`flush`]).
    pub fn write_flush(&self, b: &FlushBatch) -> Result<FlushOutcome> {
        self.write_flush_firing(b).map(|(o, _)| o)
    }

    /// [`Self::write_flush`], also returning the usage triggers it fired.
    pub fn write_flush_firing(
        &self,
        b: &FlushBatch,
    ) -> Result<(FlushOutcome, firing::TriggerReport)> {
        let out = self.with_conn(|c| c.write_flush_firing(b));
        if let (Ok(_), Some(c)) = (&out, &self.inner.checkpointer) {
            c.request();
        }
        out
    }

    /// Next offset to read per partition of `topic`.
    pub fn load_offsets(&self, topic: &str) -> Result<std::collections::HashMap<i32, i64>> {
        self.with_conn(|c| c.load_offsets(topic))
    }

    /// Dedup blobs of one partition seen on or after `since`: (seen day, packed ids).
    pub fn load_dedup(
        &self,
        topic: &str,
        partition: i32,
        since: crate::calendar::Day,
    ) -> Result<Vec<(crate::calendar::Day, Vec<u8>)>> {
        self.with_conn(|c| c.load_dedup(topic, partition, since))
    }

    /// All stored UsageRecords of one period kind (`day`, `month`, `year`,
    /// `all`), sorted (see [`Conn::read_records`]).
    pub fn read_records(&self, period: &str) -> Result<Vec<StoredRecord>> {
        self.with_conn(|c| c.read_records(period))
    }

    /// Every stored by-number and by-agent row, sorted.
    pub fn read_breakdowns(&self) -> Result<Vec<StoredBreakdown>> {
        self.with_conn(|c| c.read_breakdowns())
    }

    /// The `as_of` of the last flush, if any.
    pub fn last_flush(&self) -> Result<Option<String>> {
        self.with_conn(|c| c.last_flush())
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Store").field(&self.inner.shown).finish()
    }
}

/// Whether `url` names a SQLite store, which has one writer: one flusher and
/// one writer connection serve every consumer.
pub fn is_sqlite_url(url: &str) -> bool {
    url.starts_with("sqlite://")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::calendar::{Day, Period};
    use crate::category::Category;
    use crate::cdr::AccountSid;
    use crate::counters::{BreakdownDelta, Leaves, RowKey, Tally};
    use page::{pages_of, RowDelta};

    /// A fresh schema `tallyd_unit_NAME_<pid>` on the test server
    /// (`TALLYD_TEST_POSTGRES_URL`, default the local one): an admin
    /// connection, and the URL of a store in that schema. Dropped by
    /// [`drop_schema`].
    pub(crate) fn pg_schema(name: &str) -> (postgres::Client, String, String) {
        let base = std::env::var("TALLYD_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let schema = format!("tallyd_unit_{name}_{}", std::process::id());
        let mut admin = postgres::Client::connect(&base, postgres::NoTls)
            .unwrap_or_else(|e| panic!("PostgreSQL at {base}: {e}"));
        admin
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
            ))
            .unwrap();
        let sep = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{sep}options=-csearch_path%3D{schema}");
        (admin, schema, url)
    }

    pub(crate) fn drop_schema(admin: &mut postgres::Client, schema: &str) {
        admin
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .unwrap();
    }

    fn batch(from: Option<i64>, to: i64) -> FlushBatch {
        FlushBatch {
            as_of: "2025-01-10T00:00:00+00:00".into(),
            pages: pages_of(
                &[RowDelta {
                    key: RowKey {
                        account: AccountSid(7),
                        period: Period::Day(Day(20_000)),
                    },
                    leaves: {
                        let mut l = Leaves::default();
                        l.add_leaf(
                            Category::CallsOutbound,
                            Tally {
                                count: 2,
                                usage: 90,
                                price: 19_500,
                            },
                        );
                        l
                    },
                    price_unit: "usd".into(),
                }],
                &[],
            ),
            offsets: vec![OffsetAdvance {
                topic: "cdrs".into(),
                partition: 0,
                from,
                to,
            }],
            dedup: vec![DedupRows {
                topic: "cdrs".into(),
                partition: 0,
                seen_day: Day(20_000),
                first_offset: from.unwrap_or(0),
                ids: vec![u128::from_le_bytes([1; 16])],
            }],
            prune_dedup_before: None,
            wallet: Default::default(),
            triggers: Vec::new(),
            consumed_at_ms: 0,
            crossed_at_ms: Vec::new(),
            outbox_lease_until: None,
        }
    }

    /// The usage tables of a store made before pages, with a day row, per-day
    /// rows of one number (numbers were once kept per day) and an agent's row.
    fn old_tables() -> String {
        let leaves: String = legacy::LEAF_COLUMNS
            .iter()
            .map(|c| format!("{c} BIGINT NOT NULL DEFAULT 0, "))
            .collect();
        format!(
            "CREATE TABLE usage_rows (account_sid TEXT NOT NULL, period TEXT NOT NULL,
                start_date TEXT NOT NULL, price_unit TEXT NOT NULL, {leaves}
                PRIMARY KEY (account_sid, period, start_date));
             CREATE TABLE usage_breakdowns (account_sid TEXT NOT NULL, dimension TEXT NOT NULL,
                value TEXT NOT NULL, day TEXT NOT NULL, calls_count BIGINT NOT NULL,
                calls_usage BIGINT NOT NULL, calls_price BIGINT NOT NULL,
                messages_count BIGINT NOT NULL, messages_usage BIGINT NOT NULL,
                messages_price BIGINT NOT NULL, PRIMARY KEY (account_sid, dimension, value, day));
             INSERT INTO usage_rows (account_sid, period, start_date, price_unit,
                calls_outbound_count, calls_outbound_usage, calls_outbound_price)
                VALUES ('{SID}', 'day', '2024-10-04', 'usd', 5, 300, 65000);
             INSERT INTO usage_breakdowns VALUES
                ('{SID}', 'number', '+15550001', '2024-10-03', 1, 60, 13000, 0, 0, 0),
                ('{SID}', 'number', '+15550001', '2024-10-04', 4, 240, 52000, 0, 0, 0),
                ('{SID}', 'agent', 'agt_sales', '2024-10-04', 0, 0, 0, 2, 2, 1500);"
        )
    }

    const SID: &str = "AC00000000000000000000000000000007";

    /// Opens `url` twice over [`old_tables`], flushing [`batch`] (two calls on
    /// 2024-10-04) each time: the old rows are converted once and the flushes
    /// add to them.
    fn assert_old_tables_become_pages(url: &str) {
        for to in [10, 15] {
            let s = Store::open(url).unwrap();
            s.write_flush(&batch((to > 10).then_some(10), to)).unwrap();
        }
        let s = Store::open(url).unwrap();
        let day: Vec<(String, String, i64, i64, i64)> = s
            .read_records("day")
            .unwrap()
            .into_iter()
            .filter(|r| r.category == "calls-outbound")
            .map(|r| (r.account_sid, r.start_date, r.count, r.usage, r.price))
            .collect();
        assert_eq!(
            day,
            [(
                SID.into(),
                "2024-10-04".into(),
                5 + 2 + 2,
                300 + 180,
                65_000 + 39_000
            ),]
        );
        type Entry = (String, String, String, [i64; 3], [i64; 3]);
        let breakdowns: Vec<Entry> = s
            .read_breakdowns()
            .unwrap()
            .into_iter()
            .map(|b| (b.dimension, b.value, b.day, b.calls, b.messages))
            .collect();
        assert_eq!(
            breakdowns,
            [
                (
                    "agent".into(),
                    "agt_sales".into(),
                    "2024-10-04".into(),
                    [0; 3],
                    [2, 2, 1500]
                ),
                (
                    "number".into(),
                    "+15550001".into(),
                    "1970-01-01".into(),
                    [5, 300, 65_000],
                    [0; 3]
                ),
            ]
        );
    }

    #[test]
    fn a_sqlite_store_with_the_old_usage_tables_is_converted_to_pages() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute_batch(&old_tables())
            .unwrap();
        let url = format!("sqlite://{}", path.display());
        assert_old_tables_become_pages(&url);
        let c = rusqlite::Connection::open(&path).unwrap();
        let old: i64 = c
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE name IN ('usage_rows', 'usage_breakdowns')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(old, 0, "the old tables are dropped");
    }

    /// Needs the server the test command starts (`TALLYD_TEST_POSTGRES_URL`,
    /// default the local one).
    #[test]
    fn a_postgres_store_with_the_old_usage_tables_is_converted_to_pages() {
        let (mut admin, schema, url) = pg_schema("legacy");
        admin
            .batch_execute(&format!("SET search_path = {schema}; {}", old_tables()))
            .unwrap();
        assert_old_tables_become_pages(&url);
        let old: i64 = admin
            .query_one(
                "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = $1
                 AND table_name IN ('usage_rows', 'usage_breakdowns')",
                &[&schema],
            )
            .unwrap()
            .get(0);
        assert_eq!(old, 0, "the old tables are dropped");
        drop_schema(&mut admin, &schema);
    }

    /// Many accounts' pages, new and then added to, in both stores; the
    /// PostgreSQL flush also with two writers adding to the same pages at once.
    #[test]
    fn flushes_of_many_accounts_add_up_in_their_pages() {
        let dir = tempfile::tempdir().unwrap();
        let (mut admin, schema, pg) = pg_schema("pages");
        let one = batch(None, 1);
        let n = 300u128;
        let on_partition = |partition: i32, from: Option<i64>, to: i64| {
            let mut b = batch(from, to);
            b.offsets[0].partition = partition;
            b.dedup.clear();
            let rows: Vec<RowDelta> = (0..n)
                .map(|a| RowDelta {
                    key: RowKey {
                        account: AccountSid(a + 1),
                        period: Period::Day(Day(20_000)),
                    },
                    leaves: one.pages[0].delta.rows().next().unwrap().2,
                    price_unit: "usd".into(),
                })
                .collect();
            let breakdowns: Vec<BreakdownDelta> = (0..n)
                .map(|a| BreakdownDelta {
                    key: crate::counters::BreakdownKey {
                        account: AccountSid(a + 1),
                        day: Day(0),
                        dimension: crate::counters::Dimension::Number,
                        value: format!("+1555{a:04}").into(),
                    },
                    calls: Tally {
                        count: 1,
                        usage: 60,
                        price: 13_000,
                    },
                    messages: Tally::default(),
                })
                .collect();
            b.pages = pages_of(&rows, &breakdowns);
            b
        };
        for url in [format!("sqlite://{}/t.db", dir.path().display()), pg] {
            Store::open(&url).unwrap();
            // Partitions 0 and 1 both carry every account: twice two
            // flushes, the second pair written at once from two connections.
            for (from, to) in [(None, 1), (Some(1), 2)] {
                let writers: Vec<_> = (0..2)
                    .map(|partition| {
                        let (url, b) = (url.clone(), on_partition(partition, from, to));
                        std::thread::spawn(move || {
                            let s = Store::new(&url, 1).unwrap();
                            s.write_flush(&b).unwrap()
                        })
                    })
                    .collect();
                for w in writers {
                    assert_eq!(w.join().unwrap(), FlushOutcome::Applied);
                }
            }
            let s = Store::new(&url, 1).unwrap();
            let days = s.read_records("day").unwrap();
            let outbound: Vec<_> = days
                .iter()
                .filter(|r| r.category == "calls-outbound")
                .collect();
            assert_eq!(outbound.len(), n as usize, "{url}");
            assert!(
                outbound.iter().all(|r| (r.count, r.usage) == (8, 360)),
                "{url}"
            );
            let numbers = s.read_breakdowns().unwrap();
            assert_eq!(numbers.len(), n as usize, "{url}");
            assert!(numbers.iter().all(|b| b.calls == [4, 240, 52_000]), "{url}");
        }
        drop_schema(&mut admin, &schema);
    }

    /// An account deleted while a trigger is created on it (PostgreSQL, the
    /// create holding the account's row): neither waits for the other in a
    /// cycle, and no trigger outlives the account.
    #[test]
    fn an_account_deleted_during_a_trigger_create_takes_the_trigger() {
        use crate::api::accounts;
        use crate::triggers::{Recurring, Trigger, TriggerBy};
        let (mut admin, schema, url) = pg_schema("acctdel");
        Store::open(&url).unwrap();
        let sid = "AC0000000000000000000000000000de1e";
        let account = accounts::Account {
            sid: sid.into(),
            auth_token: crate::config::Secret::new("token-123456"),
            parent_sid: None,
            friendly_name: String::new(),
            plan: None,
            limits: crate::config::PlanLimits::default(),
            created_at: "2026-12-07T00:00:00Z".into(),
            updated_at: "2026-12-07T00:00:00Z".into(),
        };
        let trigger = |n: u32| Trigger {
            sid: format!("UT{n:032}"),
            account_sid: sid.into(),
            ..Trigger::example("calls", TriggerBy::Count, 10.into(), Recurring::Daily)
        };
        let stores = [Store::new(&url, 1).unwrap(), Store::new(&url, 1).unwrap()];
        stores[0]
            .with_conn(|c| {
                accounts::upsert(c, &account)?;
                c.insert_trigger(&trigger(1))
            })
            .unwrap();
        let start = Arc::new(std::sync::Barrier::new(2));
        let create = {
            let (s, start) = (stores[0].clone(), start.clone());
            let t = trigger(2);
            std::thread::spawn(move || {
                s.with_conn(|c| {
                    c.transaction(|c| {
                        c.execute(
                            "UPDATE api_accounts SET account_sid = account_sid WHERE account_sid = $1",
                            &[Param::Text(sid)],
                        )?;
                        start.wait();
                        // Give the delete time to queue behind this row.
                        std::thread::sleep(std::time::Duration::from_millis(300));
                        c.insert_trigger(&t)
                    })
                })
            })
        };
        let delete = {
            let (s, start) = (stores[1].clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                s.with_conn(|c| accounts::delete(c, sid))
            })
        };
        create.join().unwrap().expect("the create");
        assert!(delete.join().unwrap().expect("the delete"));
        let left = stores[0].with_conn(|c| c.count_triggers(sid)).unwrap();
        assert_eq!(left, 0, "a trigger outlived its account");
        drop_schema(&mut admin, &schema);
    }

    /// Two batches of the same call ids' grants written at once on two
    /// PostgreSQL connections, listed in opposite orders: each call id is
    /// stored once and found by the other batch, and neither batch fails (a
    /// deadlock, had they locked the rows in their listed order).
    #[test]
    fn postgres_hold_batches_written_at_once_never_deadlock() {
        use crate::wallet::HoldStatus;
        use wallet::{HoldWrite, StoredHold};
        let (mut admin, schema, url) = pg_schema("holds");
        Store::open(&url).unwrap();
        let grant = |round: usize, i: usize| {
            HoldWrite::Grant(StoredHold {
                account_sid: format!("AC{:032x}", i % 3),
                call_id: format!("CA{round}-{i}"),
                amount: 300_000,
                status: HoldStatus::Reserved,
                created_at: 0,
                expires_at: 3_600,
                billing: None,
            })
        };
        let stores = [Store::new(&url, 1).unwrap(), Store::new(&url, 1).unwrap()];
        for round in 0..20 {
            let start = Arc::new(std::sync::Barrier::new(2));
            let writers: Vec<_> = stores
                .iter()
                .enumerate()
                .map(|(n, s)| {
                    let mut writes: Vec<_> = (0..40).map(|i| (grant(round, i), None)).collect();
                    if n == 1 {
                        writes.reverse();
                    }
                    let (s, start) = (s.clone(), start.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        s.with_conn(|c| c.write_holds(&writes))
                    })
                })
                .collect();
            let found: Vec<_> = writers
                .into_iter()
                .map(|w| w.join().unwrap().expect("a batch failed"))
                .collect();
            // Each call id: stored by one batch (`Some(None)`), found by
            // the other (`Some(Some(_))`).
            let stored = found.iter().flatten().filter(|f| **f == Some(None)).count();
            assert_eq!(stored, 40, "round {round}");
        }
        drop_schema(&mut admin, &schema);
    }

    #[test]
    fn a_new_sqlite_store_has_large_pages_and_wal() {
        let dir = tempfile::tempdir().unwrap();
        let Conn::Sqlite(c) = Store::open(&format!("sqlite://{}/t.db", dir.path().display()))
            .unwrap()
            .connect()
            .unwrap()
        else {
            unreachable!()
        };
        let page: i64 = c.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap();
        let journal: String = c
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!((page, journal.as_str()), (32768, "wal"));
    }

    #[test]
    fn sqlite_flushes_leave_the_wal_to_the_checkpointer() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/t.db", dir.path().display());
        let size = |name: &str| std::fs::metadata(dir.path().join(name)).map_or(0, |m| m.len());
        let s = Store::open(&url).unwrap();
        // A flush past SQLite's auto-checkpoint threshold (1000 pages = 32 MiB),
        // on a connection of its own: its commit leaves the WAL alone.
        let mut b = batch(None, 10);
        b.dedup[0].ids = vec![7; (40 << 20) / 16];
        s.connect().unwrap().write_flush(&b).unwrap();
        assert!(size("t.db") < 1 << 20, "the commit checkpointed");
        assert!(size("t.db-wal") > 40 << 20);
        // A flush through the store asks its checkpointer, which has copied
        // the WAL by the time the store is closed.
        s.write_flush(&batch(Some(10), 11)).unwrap();
        assert_eq!(s.load_offsets("cdrs").unwrap()[&0], 11);
        drop(s);
        assert!(
            size("t.db") > 40 << 20,
            "the checkpointer copied the WAL into the database file"
        );
    }

    #[test]
    fn sqlite_flush_is_idempotent_and_fences() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/sub/t.db", dir.path().display());
        let s = Store::open(&url).unwrap();
        assert_eq!(
            s.write_flush(&batch(None, 10)).unwrap(),
            FlushOutcome::Applied
        );
        // The same batch again (an unknown commit outcome retried) changes nothing.
        assert_eq!(
            s.write_flush(&batch(None, 10)).unwrap(),
            FlushOutcome::AlreadyApplied
        );
        assert_eq!(
            s.write_flush(&batch(Some(10), 15)).unwrap(),
            FlushOutcome::Applied
        );
        // calls-outbound, its rollup calls and totalprice.
        let recs = s.read_records("day").unwrap();
        assert_eq!(recs.len(), 3);
        for r in &recs {
            assert_eq!((r.count, r.usage, r.price), (4, 180, 39_000), "{r:?}");
        }
        assert_eq!(
            recs.iter().map(|r| r.category.as_str()).collect::<Vec<_>>(),
            ["calls", "calls-outbound", "totalprice"]
        );
        // A batch that starts from a stale offset belongs to a zombie.
        assert!(s.write_flush(&batch(Some(10), 12)).unwrap_err().is_fenced());
        assert_eq!(s.load_offsets("cdrs").unwrap()[&0], 15);
        assert_eq!(s.load_dedup("cdrs", 0, Day(19_999)).unwrap().len(), 2);
        assert_eq!(
            s.last_flush().unwrap().as_deref(),
            Some("2025-01-10T00:00:00+00:00")
        );
        drop(s);
        // Reopening migrates idempotently.
        assert_eq!(
            Store::open(&url).unwrap().load_offsets("cdrs").unwrap()[&0],
            15
        );
        assert!(matches!(Store::open("mysql://x"), Err(Error::BadUrl(_))));
    }
}
