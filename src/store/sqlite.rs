//! The SQLite side of the store: migrations and the flush, which reads, adds to
//! and rewrites each page it touches.

use rusqlite::OptionalExtension;

use crate::dedup::blob;

use super::legacy::{self, OldBreakdown, OldRow};
use super::page::PageDelta;
use super::schema;
use super::{stale_advance, FlushBatch, FlushOutcome, Result, SET_LAST_FLUSH};

/// Creates or updates the tables of a SQLite store, converting the usage tables
/// of an older store into pages; idempotent.
pub fn migrate_sqlite(c: &mut rusqlite::Connection) -> Result<()> {
    for m in schema::migrations(false) {
        c.execute_batch(m)?;
    }
    let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let old: Option<String> = tx
        .query_row(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'usage_rows'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    if old.is_some() {
        let rows = tx
            .prepare(&legacy::ROWS_SQL)?
            .query_map([], |r| {
                Ok(OldRow {
                    account: r.get(0)?,
                    period: r.get(1)?,
                    start: r.get(2)?,
                    price_unit: r.get(3)?,
                    values: (0..legacy::LEAF_COLUMNS.len())
                        .map(|i| r.get(4 + i))
                        .collect::<rusqlite::Result<_>>()?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let breakdowns = tx
            .prepare(legacy::BREAKDOWNS_SQL)?
            .query_map([], |r| {
                Ok(OldBreakdown {
                    key: [r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?],
                    values: [
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                        r.get(7)?,
                        r.get(8)?,
                        r.get(9)?,
                    ],
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let pages = legacy::to_pages(&rows, &breakdowns)?;
        write_pages(&tx, &pages)?;
        tx.execute_batch(legacy::DROP_SQL)?;
    }
    tx.commit()?;
    Ok(())
}

/// Adds each page delta into its stored page (or stores it as a new page).
fn write_pages(tx: &rusqlite::Transaction<'_>, pages: &[PageDelta]) -> Result<()> {
    let mut read =
        tx.prepare_cached("SELECT data FROM usage_pages WHERE account_sid = ?1 AND page = ?2")?;
    let mut write = tx.prepare_cached(
        "INSERT INTO usage_pages (account_sid, page, data) VALUES (?1, ?2, ?3) \
         ON CONFLICT (account_sid, page) DO UPDATE SET data = excluded.data",
    )?;
    for p in pages {
        let (account, page) = p.key();
        let stored: Option<Vec<u8>> = read.query_row([&account, &page], |r| r.get(0)).optional()?;
        let data = p.onto(stored.as_deref())?;
        write.execute(rusqlite::params![account, page, data])?;
    }
    Ok(())
}

/// Writes one flush, whose rows and breakdowns are `pages`, in one transaction
/// (what it holds: [`crate::store`]).
pub(super) fn flush(
    c: &mut rusqlite::Connection,
    b: &FlushBatch,
    pages: &[PageDelta],
) -> Result<FlushOutcome> {
    let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    for (i, o) in b.offsets.iter().enumerate() {
        let moved = match o.from {
            None => tx.execute(
                "INSERT INTO consumer_offsets (topic, partition, next_offset) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
                rusqlite::params![o.topic, o.partition, o.to],
            )?,
            Some(from) => tx.execute(
                "UPDATE consumer_offsets SET next_offset = ?3 WHERE topic = ?1 AND partition = ?2 AND next_offset = ?4",
                rusqlite::params![o.topic, o.partition, o.to, from],
            )?,
        };
        if moved == 0 {
            let found: Option<i64> = tx
                .query_row(
                    "SELECT next_offset FROM consumer_offsets WHERE topic = ?1 AND partition = ?2",
                    rusqlite::params![o.topic, o.partition],
                    |r| r.get(0),
                )
                .optional()?;
            return stale_advance(o, found, i == 0);
        }
    }
    let started = std::time::Instant::now();
    write_pages(&tx, pages)?;
    let pages_done = started.elapsed();
    {
        let mut st = tx.prepare_cached(
            "INSERT INTO dedup_batches (topic, partition, seen_day, first_offset, ids) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        for d in &b.dedup {
            st.execute(rusqlite::params![
                d.topic,
                d.partition,
                d.seen_day.0,
                d.first_offset,
                blob(&d.ids)
            ])?;
        }
    }
    if let Some(before) = b.prune_dedup_before {
        tx.execute("DELETE FROM dedup_batches WHERE seen_day < ?1", [before.0])?;
    }
    tx.execute(SET_LAST_FLUSH, [&b.as_of])?;
    let before_commit = started.elapsed();
    tx.commit()?;
    tracing::debug!(
        rows = b.rows.len(),
        breakdowns = b.breakdowns.len(),
        pages = pages.len(),
        pages_ms = pages_done.as_millis() as u64,
        dedup_ms = (before_commit - pages_done).as_millis() as u64,
        commit_ms = (started.elapsed() - before_commit).as_millis() as u64,
        "sqlite flush written"
    );
    Ok(FlushOutcome::Applied)
}
