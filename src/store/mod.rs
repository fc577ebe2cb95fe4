//! The store: SQLite (embedded default) or PostgreSQL, chosen by URL.
//!
//! One flush is one transaction holding the counter deltas, the consumed offsets
//! they came from and the newly seen dedup ids (DESIGN invariant 1). Offsets are
//! advanced with a compare-and-set from the offset the batch started at, which makes
//! a flush idempotent (a batch retried after an unknown commit outcome is detected
//! as already applied) and fences a zombie instance whose partitions were taken over.
//!
//! `sqlite` and `pg` write a flush into each database; [`schema`] holds the
//! tables both share; [`checkpoint`] copies SQLite's WAL into the database file
//! off the flush path.

pub mod checkpoint;
mod pg;
pub mod schema;
mod sqlite;

pub use pg::migrate_postgres;
pub use sqlite::migrate_sqlite;

use std::collections::HashMap;

use crate::calendar::{Day, DayText, Period};
use crate::counters::{BreakdownDelta, Leaves, RowKey};
use schema::{leaves_from, LEAF_COLUMNS, LEAF_COLUMN_COUNT, LEAF_COLUMN_LIST};

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
    #[error("gave up: {0}")]
    Cancelled(String),
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

impl Error {
    /// Whether retrying the same batch can never succeed.
    pub fn is_fenced(&self) -> bool {
        matches!(self, Error::Fenced { .. })
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

/// The delta of one stored row (account × period, all leaf categories) with the
/// currency of its account's plan.
#[derive(Debug, Clone, PartialEq)]
pub struct RowDelta {
    pub key: RowKey,
    pub leaves: Leaves,
    pub price_unit: String,
}

/// A partition's consumed position moving from `from` (what the store held when the
/// batch started; `None` if nothing) to `to` (the next offset to read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetAdvance {
    pub topic: String,
    pub partition: i32,
    pub from: Option<i64>,
    pub to: i64,
}

/// Dedup ids first seen on one partition since the last flush.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DedupRows {
    pub topic: String,
    pub partition: i32,
    pub seen_day: Day,
    /// The batch's first offset: the row's key.
    pub first_offset: i64,
    /// The id hashes, stored as one blob ([`crate::dedup::blob`]).
    pub ids: Vec<u128>,
}

/// Everything one flush writes, in one transaction.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FlushBatch {
    /// RFC 3339 flush time, the records' `as_of`.
    pub as_of: String,
    pub rows: Vec<RowDelta>,
    pub breakdowns: Vec<BreakdownDelta>,
    pub offsets: Vec<OffsetAdvance>,
    pub dedup: Vec<DedupRows>,
    /// Dedup rows seen before this day are deleted.
    pub prune_dedup_before: Option<Day>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushOutcome {
    Applied,
    /// The batch's offsets were already stored: an earlier attempt committed.
    AlreadyApplied,
}

/// A stored UsageRecord: one category of one row.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct StoredRecord {
    pub account_sid: String,
    pub period: String,
    pub start_date: String,
    pub category: String,
    pub count: i64,
    pub usage: i64,
    pub price: i64,
    pub price_unit: String,
}

/// A stored by-number or by-agent row; `calls` and `messages` are
/// (count, usage, price).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct StoredBreakdown {
    pub account_sid: String,
    pub dimension: String,
    pub value: String,
    pub day: String,
    pub calls: [i64; 3],
    pub messages: [i64; 3],
}

pub enum Store {
    Sqlite(rusqlite::Connection),
    Postgres(postgres::Client),
}

fn period_start(p: Period) -> DayText {
    p.start().text()
}

impl Store {
    /// Opens `sqlite://PATH` (creating the file and its directory) or `postgres://…`,
    /// and runs the migrations.
    pub fn open(url: &str) -> Result<Store> {
        let mut store = if let Some(path) = url.strip_prefix("sqlite://") {
            if let Some(dir) = std::path::Path::new(path)
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
            {
                std::fs::create_dir_all(dir).map_err(|source| Error::Dir {
                    path: path.into(),
                    source,
                })?;
            }
            let conn = rusqlite::Connection::open(path)?;
            // Large pages for wide counter rows written in key order: a flush
            // into a new store's tables took 153 ms instead of 183 ms (4 KiB
            // pages), a drain's final flush 8% less. Takes effect when the file
            // is created; an existing store keeps its page size.
            conn.pragma_update(None, "page_size", 32768)?;
            // WAL + NORMAL: a crash of the process loses nothing committed; a power
            // loss may lose the last transactions, deltas and offsets together.
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            conn.pragma_update(None, "cache_size", -65536)?;
            conn.busy_timeout(std::time::Duration::from_secs(10))?;
            Store::Sqlite(conn)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let mut c = postgres::Client::connect(url, postgres::NoTls)?;
            // Server NOTICEs ("relation … already exists, skipping" for the
            // flush's temp tables) would be logged at INFO twice per flush.
            c.batch_execute("SET client_min_messages = warning")?;
            Store::Postgres(c)
        } else {
            return Err(Error::BadUrl(url.into()));
        };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<()> {
        match self {
            Store::Sqlite(c) => migrate_sqlite(c)?,
            Store::Postgres(c) => migrate_postgres(c)?,
        }
        Ok(())
    }

    /// Leaves copying a SQLite store's WAL into its file to
    /// [`checkpoint::Checkpointer`] instead of this connection's commits. (No-op
    /// for PostgreSQL.)
    pub fn defer_checkpoints(&mut self) -> Result<()> {
        if let Store::Sqlite(c) = self {
            c.pragma_update(None, "wal_autocheckpoint", 0)?;
        }
        Ok(())
    }

    /// Copies what is committed in a SQLite store's WAL into its file, without
    /// waiting for readers or the writer. (No-op for PostgreSQL.)
    pub fn checkpoint(&mut self) -> Result<()> {
        if let Store::Sqlite(c) = self {
            c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))?;
        }
        Ok(())
    }

    /// Writes one flush atomically. See the module doc for the offset protocol.
    pub fn write_flush(&mut self, b: &FlushBatch) -> Result<FlushOutcome> {
        match self {
            Store::Sqlite(c) => sqlite::flush(c, b),
            Store::Postgres(c) => pg::flush(c, b),
        }
    }

    /// Next offset to read per partition of `topic`.
    pub fn load_offsets(&mut self, topic: &str) -> Result<HashMap<i32, i64>> {
        let sql = "SELECT partition, next_offset FROM consumer_offsets WHERE topic = $1";
        Ok(match self {
            Store::Sqlite(c) => {
                let mut st = c.prepare(sql)?;
                let rows =
                    st.query_map([topic], |r| Ok((r.get::<_, i32>(0)?, r.get::<_, i64>(1)?)))?;
                rows.collect::<Result<_, _>>()?
            }
            Store::Postgres(c) => c
                .query(sql, &[&topic])?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect(),
        })
    }

    /// Dedup blobs of one partition seen on or after `since`: (seen day, packed ids).
    pub fn load_dedup(
        &mut self,
        topic: &str,
        partition: i32,
        since: Day,
    ) -> Result<Vec<(Day, Vec<u8>)>> {
        let sql = "SELECT seen_day, ids FROM dedup_batches WHERE topic = $1 AND partition = $2 AND seen_day >= $3";
        Ok(match self {
            Store::Sqlite(c) => {
                let mut st = c.prepare(sql)?;
                let rows = st.query_map(rusqlite::params![topic, partition, since.0], |r| {
                    Ok((Day(r.get(0)?), r.get::<_, Vec<u8>>(1)?))
                })?;
                rows.collect::<Result<_, _>>()?
            }
            Store::Postgres(c) => c
                .query(sql, &[&topic, &partition, &since.0])?
                .iter()
                .map(|r| (Day(r.get(0)), r.get(1)))
                .collect(),
        })
    }

    /// All stored UsageRecords of one period kind (`day`, `month`, `year`, `all`):
    /// every category with usage in each row, rollups summed from their leaves;
    /// sorted.
    pub fn read_records(&mut self, period: &str) -> Result<Vec<StoredRecord>> {
        let sql = format!(
            "SELECT account_sid, start_date, price_unit, {} FROM usage_rows WHERE period = $1",
            *LEAF_COLUMN_LIST
        );
        let rows: Vec<(String, String, String, Leaves)> = match self {
            Store::Sqlite(c) => {
                let mut st = c.prepare(&sql)?;
                let rows = st.query_map([period], |r| {
                    let mut vals = Vec::with_capacity(LEAF_COLUMN_COUNT);
                    for i in 0..LEAF_COLUMN_COUNT {
                        vals.push(r.get::<_, i64>(3 + i)?);
                    }
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        leaves_from(vals.into_iter()),
                    ))
                })?;
                rows.collect::<Result<_, _>>()?
            }
            Store::Postgres(c) => c
                .query(&sql, &[&period])?
                .iter()
                .map(|r| {
                    let vals = (0..LEAF_COLUMN_COUNT).map(|i| r.get::<_, i64>(3 + i));
                    (r.get(0), r.get(1), r.get(2), leaves_from(vals))
                })
                .collect(),
        };
        let mut out: Vec<StoredRecord> = rows
            .into_iter()
            .flat_map(|(account_sid, start_date, price_unit, leaves)| {
                leaves
                    .categories()
                    .map(|(c, t)| StoredRecord {
                        account_sid: account_sid.clone(),
                        period: period.to_owned(),
                        start_date: start_date.clone(),
                        category: c.name().to_owned(),
                        count: t.count as i64,
                        usage: t.usage as i64,
                        price: t.price,
                        price_unit: price_unit.clone(),
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// Every stored by-number and by-agent row, sorted.
    pub fn read_breakdowns(&mut self) -> Result<Vec<StoredBreakdown>> {
        let sql = format!("SELECT {BREAKDOWN_COLUMNS} FROM usage_breakdowns");
        let raw: Vec<([String; 4], [i64; 6])> = match self {
            Store::Sqlite(c) => {
                let mut st = c.prepare(&sql)?;
                let rows = st.query_map([], |r| {
                    let mut n = [0; 6];
                    for (i, v) in n.iter_mut().enumerate() {
                        *v = r.get(4 + i)?;
                    }
                    Ok(([r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?], n))
                })?;
                rows.collect::<Result<_, _>>()?
            }
            Store::Postgres(c) => c
                .query(&sql, &[])?
                .iter()
                .map(|r| {
                    (
                        [r.get(0), r.get(1), r.get(2), r.get(3)],
                        std::array::from_fn(|i| r.get(4 + i)),
                    )
                })
                .collect(),
        };
        let mut out: Vec<StoredBreakdown> = raw
            .into_iter()
            .map(
                |([account_sid, dimension, value, day], n)| StoredBreakdown {
                    account_sid,
                    dimension,
                    value,
                    day,
                    calls: [n[0], n[1], n[2]],
                    messages: [n[3], n[4], n[5]],
                },
            )
            .collect();
        out.sort();
        Ok(out)
    }

    /// The `as_of` of the last flush, if any.
    pub fn last_flush(&mut self) -> Result<Option<String>> {
        let sql = "SELECT value FROM tallyd_meta WHERE key = 'last_flush'";
        Ok(match self {
            Store::Sqlite(c) => {
                use rusqlite::OptionalExtension;
                c.query_row(sql, [], |r| r.get(0)).optional()?
            }
            Store::Postgres(c) => c.query_opt(sql, &[])?.map(|r| r.get(0)),
        })
    }
}

/// `INSERT INTO usage_rows (…) {values} ON CONFLICT … DO UPDATE` adding every
/// leaf column; `values` supplies the key, `price_unit` and the leaf columns.
fn upsert_rows(values: &str) -> String {
    let adds: Vec<String> = LEAF_COLUMNS
        .iter()
        .map(|c| format!("{c} = usage_rows.{c} + excluded.{c}"))
        .collect();
    format!(
        "INSERT INTO usage_rows (account_sid, period, start_date, price_unit, {}) {values} \
         ON CONFLICT (account_sid, period, start_date) DO UPDATE SET {}",
        *LEAF_COLUMN_LIST,
        adds.join(", ")
    )
}

const BREAKDOWN_COLUMNS: &str = "account_sid, dimension, value, day, \
     calls_count, calls_usage, calls_price, messages_count, messages_usage, messages_price";

const UPSERT_BREAKDOWN_TAIL: &str =
    "ON CONFLICT (account_sid, dimension, value, day) DO UPDATE SET \
     calls_count = usage_breakdowns.calls_count + excluded.calls_count, \
     calls_usage = usage_breakdowns.calls_usage + excluded.calls_usage, \
     calls_price = usage_breakdowns.calls_price + excluded.calls_price, \
     messages_count = usage_breakdowns.messages_count + excluded.messages_count, \
     messages_usage = usage_breakdowns.messages_usage + excluded.messages_usage, \
     messages_price = usage_breakdowns.messages_price + excluded.messages_price";

const SET_LAST_FLUSH: &str =
    "INSERT INTO tallyd_meta (key, value) VALUES ('last_flush', $1) ON CONFLICT (key) DO UPDATE SET value = excluded.value";

/// Decides what an offset compare-and-set that moved nothing means: the whole batch
/// committed before (only the first advance can see that — a batch is all or
/// nothing), or someone else owns the partition.
fn stale_advance(o: &OffsetAdvance, found: Option<i64>, first: bool) -> Result<FlushOutcome> {
    if first && found == Some(o.to) {
        Ok(FlushOutcome::AlreadyApplied)
    } else {
        Err(Error::Fenced {
            topic: o.topic.clone(),
            partition: o.partition,
            expected: o.from,
            found,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::sqlite::ROWS_PER_STATEMENT;
    use super::*;
    use crate::category::Category;
    use crate::cdr::AccountSid;
    use crate::counters::Tally;

    fn batch(from: Option<i64>, to: i64) -> FlushBatch {
        FlushBatch {
            as_of: "2025-01-10T00:00:00+00:00".into(),
            rows: vec![RowDelta {
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
            breakdowns: vec![],
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
        }
    }

    #[test]
    fn sqlite_breakdowns_made_with_a_rowid_are_rebuilt_keeping_their_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        let old = rusqlite::Connection::open(&path).unwrap();
        old.execute_batch(
            "CREATE TABLE usage_breakdowns (account_sid TEXT NOT NULL, dimension TEXT NOT NULL,
                value TEXT NOT NULL, day TEXT NOT NULL, calls_count BIGINT NOT NULL,
                calls_usage BIGINT NOT NULL, calls_price BIGINT NOT NULL,
                messages_count BIGINT NOT NULL, messages_usage BIGINT NOT NULL,
                messages_price BIGINT NOT NULL, PRIMARY KEY (account_sid, dimension, value, day));
             INSERT INTO usage_breakdowns VALUES ('AC1', 'number', '+1555', '2025-01-01', 1, 60, 5, 0, 0, 0);",
        )
        .unwrap();
        drop(old);
        let url = format!("sqlite://{}", path.display());
        for _ in 0..2 {
            let Store::Sqlite(c) = Store::open(&url).unwrap() else {
                unreachable!()
            };
            let sql: String = c
                .query_row(
                    "SELECT sql FROM sqlite_master WHERE name = 'usage_breakdowns'",
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            assert!(sql.ends_with("WITHOUT ROWID"), "{sql}");
            let kept: (String, i64) = c
                .query_row(
                    "SELECT value, calls_usage FROM usage_breakdowns WHERE account_sid = 'AC1'",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .unwrap();
            assert_eq!(kept, ("+1555".to_string(), 60));
        }
    }

    /// PostgreSQL's key columns are moved to `COLLATE "C"` once, keeping the rows,
    /// which later flushes still find and add to. Needs the server the test
    /// command starts (`TALLYD_TEST_POSTGRES_URL`, default the local one).
    #[test]
    fn postgres_key_columns_become_bytewise_keeping_their_rows() {
        let base = std::env::var("TALLYD_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let schema = format!("tallyd_unit_collate_{}", std::process::id());
        let mut admin = postgres::Client::connect(&base, postgres::NoTls)
            .unwrap_or_else(|e| panic!("PostgreSQL at {base}: {e}"));
        admin
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}; SET search_path = {schema}"
            ))
            .unwrap();
        // The tables as an earlier version made them: default collation.
        for create in schema::migrations(false).take(2) {
            admin
                .batch_execute(&create.replace(" WITHOUT ROWID", ""))
                .unwrap();
        }
        admin
            .batch_execute(
                "INSERT INTO usage_rows (account_sid, period, start_date, price_unit, calls_outbound_count)
                 VALUES ('AC00000000000000000000000000000007', 'day', '2024-10-04', 'usd', 5)",
            )
            .unwrap();
        let sep = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{sep}options=-csearch_path%3D{schema}");
        for to in [10, 15] {
            let mut s = Store::open(&url).unwrap();
            s.write_flush(&batch((to > 10).then_some(10), to)).unwrap();
        }
        let collations: Vec<(String, Option<String>)> = admin
            .query(
                "SELECT table_name::text || '.' || column_name::text, collation_name::text
                 FROM information_schema.columns WHERE table_schema = $1
                 AND table_name IN ('usage_rows', 'usage_breakdowns') AND data_type = 'text'
                 AND column_name <> 'price_unit' ORDER BY 1",
                &[&schema],
            )
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        assert_eq!(collations.len(), 7, "{collations:?}");
        for (column, collation) in &collations {
            assert_eq!(collation.as_deref(), Some("C"), "{column}");
        }
        // The old row plus two flushes of two calls each, in one row.
        let count: i64 = admin
            .query_one(
                "SELECT calls_outbound_count FROM usage_rows WHERE period = 'day'",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(count, 5 + 2 + 2);
        admin
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .unwrap();
    }

    /// Rows and breakdowns go in many-row statements plus one for the rest:
    /// every count around the statement size lands whole, and twice adds up.
    #[test]
    fn sqlite_many_row_statements_write_every_row() {
        for n in [
            1,
            ROWS_PER_STATEMENT - 1,
            ROWS_PER_STATEMENT,
            2 * ROWS_PER_STATEMENT + 3,
        ] {
            let dir = tempfile::tempdir().unwrap();
            let mut s = Store::open(&format!("sqlite://{}/t.db", dir.path().display())).unwrap();
            let one = batch(None, 1);
            let mut b = batch(None, 1);
            b.rows = (0..n as u128)
                .map(|a| RowDelta {
                    key: RowKey {
                        account: AccountSid(a + 1),
                        ..one.rows[0].key
                    },
                    ..one.rows[0].clone()
                })
                .collect();
            b.breakdowns = (0..n as u128)
                .map(|a| BreakdownDelta {
                    key: crate::counters::BreakdownKey {
                        account: AccountSid(a + 1),
                        day: Day(20_000),
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
            s.write_flush(&b).unwrap();
            b.offsets[0] = OffsetAdvance {
                from: Some(1),
                to: 2,
                ..b.offsets[0].clone()
            };
            b.dedup.clear();
            s.write_flush(&b).unwrap();
            let Store::Sqlite(c) = &s else { unreachable!() };
            let (rows, calls): (i64, i64) = c
                .query_row(
                    "SELECT COUNT(*), SUM(calls_outbound_count) FROM usage_rows",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .unwrap();
            assert_eq!((rows, calls), (n as i64, 4 * n as i64), "{n} rows");
            let (numbers, usage): (i64, i64) = c
                .query_row(
                    "SELECT COUNT(DISTINCT value), SUM(calls_usage) FROM usage_breakdowns",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .unwrap();
            assert_eq!(
                (numbers, usage),
                (n as i64, 120 * n as i64),
                "{n} breakdowns"
            );
        }
    }

    #[test]
    fn a_new_sqlite_store_has_large_pages_and_wal() {
        let dir = tempfile::tempdir().unwrap();
        let Store::Sqlite(c) =
            Store::open(&format!("sqlite://{}/t.db", dir.path().display())).unwrap()
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
        let mut s = Store::open(&url).unwrap();
        s.defer_checkpoints().unwrap();
        // A flush past SQLite's auto-checkpoint threshold (1000 pages = 32 MiB).
        let mut b = batch(None, 10);
        b.dedup[0].ids = vec![7; (40 << 20) / 16];
        s.write_flush(&b).unwrap();
        assert!(size("t.db") < 1 << 20, "the commit checkpointed");
        assert!(size("t.db-wal") > 40 << 20);
        let c = checkpoint::Checkpointer::start(&url).unwrap();
        c.request();
        drop(c);
        assert!(
            size("t.db") > 40 << 20,
            "the checkpointer copied the WAL into the database file"
        );
        assert_eq!(s.load_offsets("cdrs").unwrap()[&0], 10);
    }

    #[test]
    fn sqlite_flush_is_idempotent_and_fences() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/sub/t.db", dir.path().display());
        let mut s = Store::open(&url).unwrap();
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
