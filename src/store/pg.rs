//! What is PostgreSQL's own in the store: opening a connection, and the bulk
//! page primitives of the flush — pages locked and read in one query, pages
//! that were there written back through a binary COPY into a staging table,
//! new ones inserted from array parameters.

use std::collections::{HashMap, HashSet};

use postgres::types::Type;

use super::flush::PageKey;
use super::Result;

pub(super) fn open(cfg: &postgres::Config) -> Result<postgres::Client> {
    let mut c = cfg.connect(postgres::NoTls)?;
    // Server NOTICEs ("relation … already exists, skipping" for the flush's
    // temp tables) would be logged at INFO twice per flush.
    c.batch_execute("SET client_min_messages = warning")?;
    Ok(c)
}

/// The stored pages of `keys`, locked `FOR UPDATE` in key order, so two writers
/// adding to the same page (an account seen on two partitions) take turns and
/// never deadlock.
pub(super) fn read_pages(
    c: &mut postgres::Client,
    keys: &[PageKey],
) -> Result<HashMap<PageKey, Vec<u8>>> {
    let (accounts, ids): (Vec<&str>, Vec<&str>) =
        keys.iter().map(|(a, p)| (a.as_str(), p.as_str())).unzip();
    Ok(c.query(
        r#"SELECT p.account_sid, p.page, p.data FROM usage_pages p
           JOIN unnest($1::text[], $2::text[]) AS k(account_sid, page)
             ON p.account_sid = k.account_sid COLLATE "C" AND p.page = k.page COLLATE "C"
           ORDER BY 1, 2 FOR UPDATE OF p"#,
        &[&accounts, &ids],
    )?
    .into_iter()
    .map(|r| ((r.get(0), r.get(1)), r.get(2)))
    .collect())
}

/// Writes back pages that were there: a binary COPY into a staging table, then
/// one UPDATE joining it (each a HOT update, see the schema).
pub(super) fn update_pages(c: &mut postgres::Client, rows: &[(&PageKey, &[u8])]) -> Result<()> {
    c.batch_execute(
        "CREATE TEMP TABLE IF NOT EXISTS usage_pages_in \
         (LIKE usage_pages) ON COMMIT DELETE ROWS; \
         TRUNCATE usage_pages_in",
    )?;
    let sink = c.copy_in("COPY usage_pages_in (account_sid, page, data) FROM STDIN BINARY")?;
    let mut w = postgres::binary_copy::BinaryCopyInWriter::new(
        sink,
        &[Type::TEXT, Type::TEXT, Type::BYTEA],
    );
    for ((account, page), data) in rows {
        w.write(&[account, page, data])?;
    }
    w.finish()?;
    c.batch_execute(
        "UPDATE usage_pages p SET data = s.data FROM usage_pages_in s \
         WHERE p.account_sid = s.account_sid AND p.page = s.page",
    )?;
    Ok(())
}

/// Inserts new pages straight from array parameters; returns the keys
/// inserted (a page another writer inserted since it was read is not). Staged
/// like the others, each was written twice (staging table, then table); in a
/// drain's final flush, where nearly every page is new, the COPY took a third
/// of the pages' time in PostgreSQL.
pub(super) fn insert_pages(
    c: &mut postgres::Client,
    rows: &[(&PageKey, &[u8])],
) -> Result<HashSet<PageKey>> {
    let mut cols: (Vec<&str>, Vec<&str>, Vec<&[u8]>) = Default::default();
    for ((account, page), data) in rows {
        cols.0.push(account);
        cols.1.push(page);
        cols.2.push(data);
    }
    Ok(c.query(
        "INSERT INTO usage_pages (account_sid, page, data) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[]) \
         ON CONFLICT (account_sid, page) DO NOTHING RETURNING account_sid, page",
        &[&cols.0, &cols.1, &cols.2],
    )?
    .into_iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect())
}
