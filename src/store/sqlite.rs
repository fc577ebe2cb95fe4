//! The SQLite side of the store: migrations and the flush, written as multi-row
//! upserts with bound parameters.

use crate::dedup::blob;

use super::schema::{self, leaf_values, LEAF_COLUMN_COUNT};
use super::{
    period_start, stale_advance, upsert_rows, FlushBatch, FlushOutcome, Result, BREAKDOWN_COLUMNS,
    SET_LAST_FLUSH, UPSERT_BREAKDOWN_TAIL,
};

/// Creates or updates the tables of a SQLite store; idempotent.
pub fn migrate_sqlite(c: &mut rusqlite::Connection) -> rusqlite::Result<()> {
    for m in schema::migrations(false) {
        c.execute_batch(m)?;
    }
    let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let breakdowns: String = tx.query_row(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'usage_breakdowns'",
        [],
        |r| r.get(0),
    )?;
    if !breakdowns.contains("WITHOUT ROWID") {
        tx.execute_batch(&schema::SQLITE_REBUILD_BREAKDOWNS)?;
    }
    tx.commit()
}

/// Writes one flush in one transaction (what it holds: [`crate::store`]).
pub(super) fn flush(c: &mut rusqlite::Connection, b: &FlushBatch) -> Result<FlushOutcome> {
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
            use rusqlite::OptionalExtension;
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
    let (rows_done, breakdowns_done);
    {
        let upsert = |values: &str| upsert_rows(&format!("VALUES {values}"));
        write_chunked(
            &tx,
            &b.rows,
            4 + LEAF_COLUMN_COUNT,
            upsert,
            |st, base, r| {
                st.raw_bind_parameter(base + 1, r.key.account.write_text(&mut [0; 34]))?;
                st.raw_bind_parameter(base + 2, r.key.period.kind())?;
                st.raw_bind_parameter(base + 3, &*period_start(r.key.period))?;
                st.raw_bind_parameter(base + 4, &r.price_unit)?;
                for (i, v) in leaf_values(&r.leaves).enumerate() {
                    st.raw_bind_parameter(base + i + 5, v)?;
                }
                Ok(())
            },
        )?;
        rows_done = started.elapsed();
        let upsert = |values: &str| {
            format!(
                "INSERT INTO usage_breakdowns ({BREAKDOWN_COLUMNS}) VALUES {values} {UPSERT_BREAKDOWN_TAIL}"
            )
        };
        write_chunked(&tx, &b.breakdowns, 10, upsert, |st, base, d| {
            let k = &d.key;
            st.raw_bind_parameter(base + 1, k.account.write_text(&mut [0; 34]))?;
            st.raw_bind_parameter(base + 2, k.dimension.as_str())?;
            st.raw_bind_parameter(base + 3, &*k.value)?;
            st.raw_bind_parameter(base + 4, &*k.day.text())?;
            st.raw_bind_parameter(base + 5, d.calls.count as i64)?;
            st.raw_bind_parameter(base + 6, d.calls.usage as i64)?;
            st.raw_bind_parameter(base + 7, d.calls.price)?;
            st.raw_bind_parameter(base + 8, d.messages.count as i64)?;
            st.raw_bind_parameter(base + 9, d.messages.usage as i64)?;
            st.raw_bind_parameter(base + 10, d.messages.price)
        })?;
        breakdowns_done = started.elapsed();
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
        rows_ms = rows_done.as_millis() as u64,
        breakdowns = b.breakdowns.len(),
        breakdowns_ms = (breakdowns_done - rows_done).as_millis() as u64,
        dedup_ms = (before_commit - breakdowns_done).as_millis() as u64,
        commit_ms = (started.elapsed() - before_commit).as_millis() as u64,
        "sqlite flush written"
    );
    Ok(FlushOutcome::Applied)
}

/// Rows per SQLite upsert statement: one statement of many rows costs less per
/// row than as many single-row statements (fewer VM starts and resets).
pub(super) const ROWS_PER_STATEMENT: usize = 16;

/// `(?1, …, ?c), (?c+1, …), …` for `n` rows of `c` columns.
fn placeholders(n: usize, c: usize) -> String {
    (0..n)
        .map(|r| {
            let cols: Vec<String> = (1..=c).map(|i| format!("?{}", r * c + i)).collect();
            format!("({})", cols.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Inserts `items`, [`ROWS_PER_STATEMENT`] a statement and one statement for
/// the rest: `sql(values)` is the statement for the `(?1, …), (…)` tuples of
/// `columns` parameters each, and `bind(statement, offset, item)` binds an
/// item's columns after `offset` parameters.
fn write_chunked<T>(
    tx: &rusqlite::Transaction<'_>,
    items: &[T],
    columns: usize,
    sql: impl Fn(&str) -> String,
    bind: impl Fn(&mut rusqlite::Statement<'_>, usize, &T) -> rusqlite::Result<()>,
) -> Result<()> {
    let write = |st: &mut rusqlite::Statement<'_>, chunk: &[T]| -> Result<()> {
        for (r, item) in chunk.iter().enumerate() {
            bind(st, r * columns, item)?;
        }
        st.raw_execute()?;
        Ok(())
    };
    let mut chunks = items.chunks_exact(ROWS_PER_STATEMENT);
    if items.len() >= ROWS_PER_STATEMENT {
        let mut st = tx.prepare_cached(&sql(&placeholders(ROWS_PER_STATEMENT, columns)))?;
        for chunk in chunks.by_ref() {
            write(&mut st, chunk)?;
        }
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        write(
            &mut tx.prepare(&sql(&placeholders(rest.len(), columns)))?,
            rest,
        )?;
    }
    Ok(())
}
