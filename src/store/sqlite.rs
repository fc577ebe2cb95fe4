//! What is SQLite's own in the store: opening a connection (the one set of
//! pragmas and timeouts) and the bulk page primitives of the flush.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use rusqlite::OptionalExtension;

use super::flush::PageKey;
use super::{Error, Result};

/// Opens the SQLite store at `path`, creating the file and its directory.
pub(super) fn open(path: &Path) -> Result<rusqlite::Connection> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| Error::Dir {
            path: path.display().to_string(),
            source,
        })?;
    }
    let conn = rusqlite::Connection::open(path)?;
    // Large pages for wide usage pages written in key order: a flush into a
    // new store's tables took 153 ms instead of 183 ms (4 KiB pages), a
    // drain's final flush 8% less. Takes effect when the file is created; an
    // existing store keeps its page size.
    conn.pragma_update(None, "page_size", 32768)?;
    // WAL + NORMAL: a crash of the process loses nothing committed; a power
    // loss may lose the last transactions, deltas and offsets together. WAL
    // also lets the API's readers and the flush writer work at once.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    // Up to 64 MiB of pages cached per connection, so a flush does not re-read
    // its pages from disk.
    conn.pragma_update(None, "cache_size", -65536)?;
    // Commits do not copy the WAL into the file: the store's checkpointer
    // thread does (see `checkpoint`).
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    Ok(conn)
}

/// The stored pages of `keys` (SQLite has one writer at a time: the flush's
/// `BEGIN IMMEDIATE` already holds the write lock).
pub(super) fn read_pages(
    c: &rusqlite::Connection,
    keys: &[PageKey],
) -> Result<HashMap<PageKey, Vec<u8>>> {
    let mut read =
        c.prepare_cached("SELECT data FROM usage_pages WHERE account_sid = ?1 AND page = ?2")?;
    let mut out = HashMap::with_capacity(keys.len());
    for k in keys {
        let stored: Option<Vec<u8>> = read.query_row([&k.0, &k.1], |r| r.get(0)).optional()?;
        if let Some(data) = stored {
            out.insert(k.clone(), data);
        }
    }
    Ok(out)
}

pub(super) fn update_pages(c: &rusqlite::Connection, rows: &[(&PageKey, &[u8])]) -> Result<()> {
    let mut write =
        c.prepare_cached("UPDATE usage_pages SET data = ?3 WHERE account_sid = ?1 AND page = ?2")?;
    for (k, data) in rows {
        write.execute(rusqlite::params![k.0, k.1, data])?;
    }
    Ok(())
}

/// Inserts new pages; returns the keys inserted (all of them: no other writer
/// can have inserted one since they were read).
pub(super) fn insert_pages(
    c: &rusqlite::Connection,
    rows: &[(&PageKey, &[u8])],
) -> Result<HashSet<PageKey>> {
    let mut write = c.prepare_cached(
        "INSERT INTO usage_pages (account_sid, page, data) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
    )?;
    let mut inserted = HashSet::with_capacity(rows.len());
    for (k, data) in rows {
        if write.execute(rusqlite::params![k.0, k.1, data])? == 1 {
            inserted.insert((*k).clone());
        }
    }
    Ok(inserted)
}
