//! The store: SQLite (embedded default) or PostgreSQL, chosen by URL.
//!
//! One flush is one transaction holding the counter deltas, the consumed offsets
//! they came from and the newly seen dedup ids (DESIGN invariant 1). Offsets are
//! advanced with a compare-and-set from the offset the batch started at, which makes
//! a flush idempotent (a batch retried after an unknown commit outcome is detected
//! as already applied) and fences a zombie instance whose partitions were taken over.
//!
//! `sqlite` and `pg` write a flush into each database; [`schema`] holds the
//! tables both share, [`page`] how usage is laid out in them, [`legacy`] the
//! conversion of older stores; [`checkpoint`] copies SQLite's WAL into the
//! database file off the flush path.

pub mod checkpoint;
mod legacy;
pub mod page;
mod pg;
pub mod schema;
mod sqlite;

pub use pg::migrate_postgres;
pub use sqlite::migrate_sqlite;

use std::collections::HashMap;

use crate::calendar::Day;
use crate::counters::{BreakdownDelta, Leaves, RowKey};
use page::{Page, PageError};

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
        reason: PageError,
    },
    #[error("cannot convert the store's old usage tables: {0}")]
    Legacy(String),
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

/// Whether `url` names a SQLite store, which has one writer: one flusher and one
/// connection serve every consumer.
pub fn is_sqlite_url(url: &str) -> bool {
    url.starts_with("sqlite://")
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
            return Err(Error::BadUrl(crate::config::redact_url(url)));
        };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<()> {
        match self {
            Store::Sqlite(c) => migrate_sqlite(c),
            Store::Postgres(c) => migrate_postgres(c),
        }
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
        let pages = page::pages_of(&b.rows, &b.breakdowns);
        match self {
            Store::Sqlite(c) => sqlite::flush(c, b, &pages),
            Store::Postgres(c) => pg::flush(c, b, &pages),
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

    /// Every stored page, decoded: (account SID, page).
    fn read_pages(&mut self) -> Result<Vec<(String, Page)>> {
        let sql = "SELECT account_sid, page, data FROM usage_pages";
        let raw: Vec<(String, String, Vec<u8>)> = match self {
            Store::Sqlite(c) => {
                let mut st = c.prepare(sql)?;
                let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
                rows.collect::<Result<_, _>>()?
            }
            Store::Postgres(c) => c
                .query(sql, &[])?
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect(),
        };
        raw.into_iter()
            .map(|(account, page, data)| match Page::decode(&data) {
                Ok(p) => Ok((account, p)),
                Err(reason) => Err(Error::Page {
                    account,
                    page,
                    reason,
                }),
            })
            .collect()
    }

    /// All stored UsageRecords of one period kind (`day`, `month`, `year`, `all`):
    /// every category with usage in each row, rollups summed from their leaves;
    /// sorted.
    pub fn read_records(&mut self, period: &str) -> Result<Vec<StoredRecord>> {
        let mut out = Vec::new();
        for (account_sid, page) in self.read_pages()? {
            for (p, price_unit, leaves) in page.rows().filter(|r| r.0.kind() == period) {
                let start_date = p.start().to_string();
                out.extend(leaves.categories().map(|(c, t)| StoredRecord {
                    account_sid: account_sid.clone(),
                    period: period.to_owned(),
                    start_date: start_date.clone(),
                    category: c.name().to_owned(),
                    count: t.count as i64,
                    usage: t.usage as i64,
                    price: t.price,
                    price_unit: price_unit.to_owned(),
                }));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Every stored by-number and by-agent row, sorted.
    pub fn read_breakdowns(&mut self) -> Result<Vec<StoredBreakdown>> {
        let mut out = Vec::new();
        for (account_sid, page) in self.read_pages()? {
            out.extend(page.breakdowns().map(|b| {
                let t = |t: crate::counters::Tally| [t.count as i64, t.usage as i64, t.price];
                StoredBreakdown {
                    account_sid: account_sid.clone(),
                    dimension: b.dimension.as_str().to_owned(),
                    value: b.value.to_owned(),
                    day: b.day.to_string(),
                    calls: t(b.calls),
                    messages: t(b.messages),
                }
            }));
        }
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
    use super::*;
    use crate::calendar::Period;
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
            let mut s = Store::open(url).unwrap();
            s.write_flush(&batch((to > 10).then_some(10), to)).unwrap();
        }
        let mut s = Store::open(url).unwrap();
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
        let base = std::env::var("TALLYD_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let schema = format!("tallyd_unit_legacy_{}", std::process::id());
        let mut admin = postgres::Client::connect(&base, postgres::NoTls)
            .unwrap_or_else(|e| panic!("PostgreSQL at {base}: {e}"));
        admin
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}; SET search_path = {schema}; {}",
                old_tables()
            ))
            .unwrap();
        let sep = if base.contains('?') { '&' } else { '?' };
        assert_old_tables_become_pages(&format!("{base}{sep}options=-csearch_path%3D{schema}"));
        let old: i64 = admin
            .query_one(
                "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = $1
                 AND table_name IN ('usage_rows', 'usage_breakdowns')",
                &[&schema],
            )
            .unwrap()
            .get(0);
        assert_eq!(old, 0, "the old tables are dropped");
        admin
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .unwrap();
    }

    /// Many accounts' pages, new and then added to, in both stores; the
    /// PostgreSQL flush also with two writers adding to the same pages at once.
    #[test]
    fn flushes_of_many_accounts_add_up_in_their_pages() {
        let dir = tempfile::tempdir().unwrap();
        let base = std::env::var("TALLYD_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let schema = format!("tallyd_unit_pages_{}", std::process::id());
        let mut admin = postgres::Client::connect(&base, postgres::NoTls).unwrap();
        admin
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
            ))
            .unwrap();
        let sep = if base.contains('?') { '&' } else { '?' };
        let pg = format!("{base}{sep}options=-csearch_path%3D{schema}");
        let one = batch(None, 1);
        let n = 300u128;
        let on_partition = |partition: i32, from: Option<i64>, to: i64| {
            let mut b = batch(from, to);
            b.offsets[0].partition = partition;
            b.dedup.clear();
            b.rows = (0..n)
                .map(|a| RowDelta {
                    key: RowKey {
                        account: AccountSid(a + 1),
                        ..one.rows[0].key
                    },
                    ..one.rows[0].clone()
                })
                .collect();
            b.breakdowns = (0..n)
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
                            let mut s = Store::open(&url).unwrap();
                            s.write_flush(&b).unwrap()
                        })
                    })
                    .collect();
                for w in writers {
                    assert_eq!(w.join().unwrap(), FlushOutcome::Applied);
                }
            }
            let mut s = Store::open(&url).unwrap();
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
        admin
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .unwrap();
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
