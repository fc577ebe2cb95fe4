//! The PostgreSQL side of the store: migrations and the flush, which locks and
//! reads the pages it touches, adds to them in tallyd, and writes them back:
//! pages that were there through a binary COPY into a staging table, new ones
//! as array parameters.

use std::collections::HashMap;

use postgres::types::Type;

use crate::dedup::blob;

use super::legacy::{self, OldBreakdown, OldRow};
use super::page::PageDelta;
use super::schema;
use super::{stale_advance, FlushBatch, FlushOutcome, Result, SET_LAST_FLUSH};

/// Creates or updates the tables of a PostgreSQL store, converting the usage
/// tables of an older store into pages; idempotent, and serialised between
/// instances that start at once.
pub fn migrate_postgres(c: &mut postgres::Client) -> Result<()> {
    let mut tx = c.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock(7461726)", &[])?;
    for m in schema::migrations(true) {
        tx.batch_execute(m)?;
    }
    let old: Option<String> = tx
        .query_one("SELECT to_regclass('usage_rows')::text", &[])?
        .get(0);
    if old.is_some() {
        let rows: Vec<OldRow> = tx
            .query(legacy::ROWS_SQL.as_str(), &[])?
            .iter()
            .map(|r| OldRow {
                account: r.get(0),
                period: r.get(1),
                start: r.get(2),
                price_unit: r.get(3),
                values: (0..legacy::LEAF_COLUMNS.len())
                    .map(|i| r.get(4 + i))
                    .collect(),
            })
            .collect();
        let breakdowns: Vec<OldBreakdown> = tx
            .query(legacy::BREAKDOWNS_SQL, &[])?
            .iter()
            .map(|r| OldBreakdown {
                key: [r.get(0), r.get(1), r.get(2), r.get(3)],
                values: std::array::from_fn(|i| r.get(4 + i)),
            })
            .collect();
        let pages = legacy::to_pages(&rows, &breakdowns)?;
        write_pages(&mut tx, &pages)?;
        tx.batch_execute(legacy::DROP_SQL)?;
    }
    tx.commit()?;
    Ok(())
}

/// Adds each page delta into its stored page (or stores it as a new page).
///
/// The stored pages are read `FOR UPDATE` in key order, so two writers adding
/// to the same page (an account seen on two partitions) take turns, and never
/// deadlock. A page that did not exist when read but was inserted by another
/// writer before this one's insert is read and added to in a second round.
fn write_pages(tx: &mut postgres::Transaction<'_>, pages: &[PageDelta]) -> Result<()> {
    let mut todo: Vec<&PageDelta> = pages.iter().collect();
    while !todo.is_empty() {
        todo = write_round(tx, &todo)?;
    }
    Ok(())
}

/// One round of [`write_pages`]; returns the deltas whose new page lost an
/// insert race.
fn write_round<'p>(
    tx: &mut postgres::Transaction<'_>,
    pages: &[&'p PageDelta],
) -> Result<Vec<&'p PageDelta>> {
    let keys: Vec<(String, String)> = pages.iter().map(|p| p.key()).collect();
    let (accounts, ids): (Vec<&str>, Vec<&str>) =
        keys.iter().map(|(a, p)| (a.as_str(), p.as_str())).unzip();
    let mut stored: HashMap<(String, String), Vec<u8>> = tx
        .query(
            r#"SELECT p.account_sid, p.page, p.data FROM usage_pages p
               JOIN unnest($1::text[], $2::text[]) AS k(account_sid, page)
                 ON p.account_sid = k.account_sid COLLATE "C" AND p.page = k.page COLLATE "C"
               ORDER BY 1, 2 FOR UPDATE OF p"#,
            &[&accounts, &ids],
        )?
        .into_iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect();
    let mut fresh = Vec::with_capacity(pages.len());
    let mut datas = Vec::with_capacity(pages.len());
    for (p, (account, page)) in pages.iter().zip(&keys) {
        let stored = stored.remove(&(account.clone(), page.clone()));
        fresh.push(stored.is_none());
        datas.push(p.onto(stored.as_deref())?);
    }
    let rows = || keys.iter().zip(&datas).zip(&fresh);
    // Pages that were there: through a binary COPY into a staging table, then
    // one UPDATE joining it (each a HOT update, see the schema).
    if fresh.contains(&false) {
        tx.batch_execute(
            "CREATE TEMP TABLE IF NOT EXISTS usage_pages_in \
             (LIKE usage_pages) ON COMMIT DELETE ROWS; \
             TRUNCATE usage_pages_in",
        )?;
        let sink = tx.copy_in("COPY usage_pages_in (account_sid, page, data) FROM STDIN BINARY")?;
        let mut w = postgres::binary_copy::BinaryCopyInWriter::new(
            sink,
            &[Type::TEXT, Type::TEXT, Type::BYTEA],
        );
        for (((account, page), data), _) in rows().filter(|(_, new)| !**new) {
            w.write(&[account, page, data])?;
        }
        w.finish()?;
        tx.batch_execute(
            "UPDATE usage_pages p SET data = s.data FROM usage_pages_in s \
             WHERE p.account_sid = s.account_sid AND p.page = s.page",
        )?;
    }
    // New pages: inserted straight from array parameters. Staged like the
    // others, each was written twice (staging table, then table); in a drain's
    // final flush, where nearly every page is new, the COPY took a third of
    // the pages' time in PostgreSQL.
    let mut new_pages: (Vec<&str>, Vec<&str>, Vec<&[u8]>) = Default::default();
    for (((account, page), data), _) in rows().filter(|(_, new)| **new) {
        new_pages.0.push(account);
        new_pages.1.push(page);
        new_pages.2.push(data);
    }
    let inserted: std::collections::HashSet<(String, String)> = if new_pages.0.is_empty() {
        Default::default()
    } else {
        tx.query(
            "INSERT INTO usage_pages (account_sid, page, data) \
             SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[]) \
             ON CONFLICT (account_sid, page) DO NOTHING RETURNING account_sid, page",
            &[&new_pages.0, &new_pages.1, &new_pages.2],
        )?
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
    };
    Ok(pages
        .iter()
        .zip(keys.iter().zip(fresh))
        .filter(|(_, (k, new))| *new && !inserted.contains(*k))
        .map(|(p, _)| *p)
        .collect())
}

/// Writes one flush share, whose rows and breakdowns are `pages`, in one
/// transaction (what it holds: [`crate::store`]).
pub(super) fn flush(
    c: &mut postgres::Client,
    b: &FlushBatch,
    pages: &[PageDelta],
) -> Result<FlushOutcome> {
    let mut tx = c.transaction()?;
    for (i, o) in b.offsets.iter().enumerate() {
        let moved = match o.from {
            None => tx.execute(
                "INSERT INTO consumer_offsets (topic, partition, next_offset) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                &[&o.topic, &o.partition, &o.to],
            )?,
            Some(from) => tx.execute(
                "UPDATE consumer_offsets SET next_offset = $3 WHERE topic = $1 AND partition = $2 AND next_offset = $4",
                &[&o.topic, &o.partition, &o.to, &from],
            )?,
        };
        if moved == 0 {
            let found: Option<i64> = tx
                .query_opt(
                    "SELECT next_offset FROM consumer_offsets WHERE topic = $1 AND partition = $2",
                    &[&o.topic, &o.partition],
                )?
                .map(|r| r.get(0));
            return stale_advance(o, found, i == 0);
        }
    }
    let started = std::time::Instant::now();
    write_pages(&mut tx, pages)?;
    tracing::debug!(
        rows = b.rows.len(),
        breakdowns = b.breakdowns.len(),
        pages = pages.len(),
        pages_ms = started.elapsed().as_millis() as u64,
        "postgres flush written"
    );
    for d in &b.dedup {
        tx.execute(
            "INSERT INTO dedup_batches (topic, partition, seen_day, first_offset, ids) VALUES ($1, $2, $3, $4, $5)",
            &[
                &d.topic,
                &d.partition,
                &d.seen_day.0,
                &d.first_offset,
                &&*blob(&d.ids),
            ],
        )?;
    }
    if let Some(before) = b.prune_dedup_before {
        tx.execute(
            "DELETE FROM dedup_batches WHERE seen_day < $1",
            &[&before.0],
        )?;
    }
    tx.execute(SET_LAST_FLUSH, &[&b.as_of])?;
    tx.commit()?;
    Ok(FlushOutcome::Applied)
}
