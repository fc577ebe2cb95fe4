//! SQLite: the hold writer's database of its own.
//!
//! SQLite has one write lock per database file, and the flush transaction
//! holds it while it rewrites pages of thousands of accounts (100 ms to 1 s
//! under load). A hold grant or release waiting behind it breaks the latency
//! a hold promises, so on SQLite the hold writer ([`crate::wallet::commit`])
//! writes grants and releases (explicit and at expiry) into a second file
//! beside the store, `<store>-holds`, which only it writes: its commits never
//! wait for a flush, and a flush never waits for it.
//!
//! The two files hold one set of holds between them:
//!
//! - the holds file has what the hold writer decided: a grant (`reserved`), a
//!   release (`released`);
//! - the store has what the flush decided, in the transaction of the offsets
//!   of the CDR that decided it: a settlement or release by the call's CDR
//!   (with its billing), and holds written there by older versions or by
//!   [`Conn::fenced`] writes;
//! - a hold's state is the store's if the store has it finished (`settled`,
//!   `released`), else the holds file's, else the store's
//!   ([`Conn::hold`], [`Conn::reserved_holds`]). Each file is committed on its
//!   own, and whichever committed first, the merge gives what the hold's last
//!   decision was: a grant is never finished, a release and a CDR's
//!   settlement are both final (exactly one of them took the hold in memory),
//!   and a settlement lost with an unflushed batch is replayed from the stored
//!   offsets onto the reserved hold the holds file still has.
//!
//! A grant is idempotent across both: one whose call id has a hold in either
//! file stores nothing and returns that hold (the flush may have settled it
//! before the grant's own write, or it is an old call id the registry
//! forgot). Grants the store has finished are dropped from the holds file
//! once past their expiry ([`HoldWriter::prune`]) and when the reserved holds
//! are read, so it keeps holds in flight and released ones.
//!
//! Fencing: the holds file keeps its own copy of `wallet_owners`, written by
//! [`Conn::claim_partitions`] right after the store's, before the claimer
//! reads anything; a grant or release checks its fence there, under the holds
//! file's write lock. A claim thus either waits for a write under the old
//! epoch and then reads it, or comes first and the write is refused — as in
//! one database. The copy only ever moves up: two claims of one partition
//! may reach the holds file in the other order than they committed in the
//! store (its busy handler is not first come, first served), and the older
//! must not overwrite the newer. A crash between the two claims leaves the
//! holds file at the previous owner's epoch until the next claim; that owner
//! has lost the partition in the store, so its flushes are fenced there and
//! its next assignment reloads.

use std::path::{Path, PathBuf};

use super::wallet::{Fence, HoldWrite, StoredHold};
use super::{Conn, Param, Result, Store};
use crate::wallet::HoldStatus;

/// The holds file of the SQLite store at `store`.
pub(crate) fn path(store: &Path) -> PathBuf {
    let mut p = store.as_os_str().to_owned();
    p.push("-holds");
    PathBuf::from(p)
}

/// Page size of the holds file: a batch of holds changes a few small rows,
/// and every page it touches is appended whole to the WAL at its commit (the
/// store's 32 KiB pages made each hold commit write ~100 KiB).
const PAGE_SIZE: i64 = 4096;

/// Opens the holds file of the SQLite store at `store`, creating its tables.
pub(crate) fn open(store: &Path) -> Result<Conn> {
    let file = path(store);
    if !file.exists() {
        // Its page size, fixed by the first write (the switch to WAL),
        // before the store's pragmas would give it the store's.
        let new = rusqlite::Connection::open(&file)?;
        new.pragma_update(None, "page_size", PAGE_SIZE)?;
        new.pragma_update(None, "journal_mode", "WAL")?;
    }
    // Its WAL is copied into it by the store's checkpointer, as the store's
    // is (see [`super::checkpoint`]), and by the hold writer once it is large
    // ([`HOLDS_WAL_PAGES`]).
    let c = super::sqlite::open(&file)?;
    for table in super::schema::WALLET_HOLDS
        .iter()
        .chain([&super::schema::WALLET_OWNERS])
    {
        c.execute_batch(table)?;
    }
    Ok(Conn::Sqlite(c))
}

/// The page cache of a kept reader of the holds file: 2 MiB.
const READER_CACHE: &str = "PRAGMA cache_size = -2048";

/// The holds file of the SQLite store `main` is connected to.
pub(super) fn open_beside(main: &Conn) -> Result<Conn> {
    match main {
        Conn::Sqlite(c) => open(Path::new(c.path().unwrap_or_default())),
        Conn::Postgres(_) => unreachable!("PostgreSQL has no holds file"),
    }
}

/// Whether a stored state is final (the hold left `reserved`).
fn finished(h: &StoredHold) -> bool {
    h.status != HoldStatus::Reserved
}

/// The hold writer's connections: on SQLite its own to the store (reads) and
/// to the holds file (writes); on PostgreSQL one connection, the store's.
pub struct HoldWriter {
    main: Conn,
    holds: Option<Conn>,
}

/// WAL pages after which the hold writer copies the holds file's WAL into
/// it itself (64 MiB of 4 KiB pages).
///
/// The store's checkpointer copies what is committed when it runs, but under
/// a steady load of holds the writer commits meanwhile, so no checkpoint ever
/// copies the whole WAL, and SQLite starts a WAL over only after one has: it
/// grew by ~10 MiB/s at 5,000 holds/s, without end. The writer is the holds
/// file's only writer, so a checkpoint it runs after its commit catches up,
/// and the next commit starts the WAL over. It costs that commit a copy of the
/// pages and two syncs, every few seconds under such a load; the file is cut
/// back to this size when the WAL starts over.
pub(crate) const HOLDS_WAL_PAGES: i64 = 16_384;

impl HoldWriter {
    pub(super) fn new(main: Conn) -> Result<HoldWriter> {
        let holds = match &main {
            Conn::Sqlite(_) => {
                let holds = open_beside(&main)?;
                if let Conn::Sqlite(c) = &holds {
                    c.pragma_update(None, "wal_autocheckpoint", HOLDS_WAL_PAGES)?;
                    c.pragma_update(None, "journal_size_limit", HOLDS_WAL_PAGES * PAGE_SIZE)?;
                }
                Some(holds)
            }
            Conn::Postgres(_) => None,
        };
        Ok(HoldWriter { main, holds })
    }

    /// Whether its connections still work (see [`Conn::is_alive`]).
    pub fn is_alive(&mut self) -> bool {
        self.main.is_alive()
    }

    /// Writes a batch (see [`Conn::write_holds`]).
    pub fn write(
        &mut self,
        writes: &[(HoldWrite, Option<Fence>)],
    ) -> Result<Vec<Option<Option<StoredHold>>>> {
        match &mut self.holds {
            Some(holds) => write_split(&mut self.main, holds, writes),
            None => self.main.write_holds(writes),
        }
    }
}

/// [`Conn::write_holds`] on SQLite: the batch in one transaction of the holds
/// file, its fences checked there; a grant looks for its call id's hold in
/// the store first (read only: a read never waits for the flush).
pub(super) fn write_split(
    main: &mut Conn,
    holds: &mut Conn,
    writes: &[(HoldWrite, Option<Fence>)],
) -> Result<Vec<Option<Option<StoredHold>>>> {
    // Read before the holds file's transaction: a hold the store has
    // finished stays so. Several grants are read in one read transaction
    // (one snapshot, its locks taken once instead of per grant).
    let grants = writes
        .iter()
        .filter(|(w, _)| matches!(w, HoldWrite::Grant(_)))
        .count();
    if grants > 1 {
        main.batch("BEGIN")?;
    }
    let read = writes
        .iter()
        .map(|(w, _)| match w {
            HoldWrite::Grant(h) => main.hold_row(&h.account_sid, &h.call_id),
            HoldWrite::Release(_) => Ok(None),
        })
        .collect::<Result<Vec<_>>>();
    if grants > 1 {
        main.batch(if read.is_ok() { "COMMIT" } else { "ROLLBACK" })?;
    }
    let in_store = read?;
    holds.fenced_writes(writes, |c, i, w| match w {
        HoldWrite::Grant(h) => match &in_store[i] {
            Some(found) => Ok(Some(found.clone())),
            None => c.insert_hold(h),
        },
        HoldWrite::Release(h) => c.release_hold(h).map(|()| None),
    })
}

/// Grants the holds file still has reserved whose expiry is before `before`,
/// looked at per round of the hold writer: any the store has finished is
/// dropped.
const PRUNE_ROUND: i64 = 1000;

impl HoldWriter {
    /// Drops from the holds file grants past `before` (unix seconds) that the
    /// store has finished; returns how many. Which to look at is only a
    /// guess by time: a hold is dropped only once the store has it finished.
    pub fn prune(&mut self, before: i64) -> Result<usize> {
        let Some(holds) = &mut self.holds else {
            return Ok(0);
        };
        let due = holds.query(
            "SELECT account_sid, call_id FROM wallet_holds \
             WHERE status = 'reserved' AND expires_at < $1 LIMIT $2",
            &[Param::Int(before), Param::Int(PRUNE_ROUND)],
        )?;
        let mut done = Vec::new();
        for r in &due {
            let (sid, id) = (r[0].text(), r[1].text());
            if self.main.hold_row(sid, id)?.as_ref().is_some_and(finished) {
                done.push((sid, id));
            }
        }
        holds.delete_reserved_holds(&done)?;
        Ok(done.len())
    }
}

impl Conn {
    /// SQLite: records the epochs `claimed` in the holds file too (see the
    /// module doc).
    pub(super) fn claim_holds(
        &mut self,
        topic: &str,
        claimed: &[(i32, i64)],
        owner: &str,
    ) -> Result<()> {
        if !matches!(self, Conn::Sqlite(_)) {
            return Ok(());
        }
        let mut holds = open_beside(self)?;
        holds.transaction(|c| {
            for &(p, epoch) in claimed {
                c.execute(
                    "INSERT INTO wallet_owners (topic, partition, owner, epoch) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (topic, partition) DO UPDATE SET owner = excluded.owner, \
                     epoch = excluded.epoch WHERE excluded.epoch > wallet_owners.epoch",
                    &[
                        Param::Text(topic),
                        Param::Int(p.into()),
                        Param::Text(owner),
                        Param::Int(epoch),
                    ],
                )?;
            }
            Ok(())
        })
    }

    /// SQLite: a hold as the holds file and the store have it between them.
    pub(super) fn merged_hold(
        &mut self,
        account_sid: &str,
        call_id: &str,
    ) -> Result<Option<StoredHold>> {
        self.merged_hold_with(account_sid, call_id, |main| {
            open_beside(main)?.hold_row(account_sid, call_id)
        })
    }

    /// [`Conn::merged_hold`], the holds file's row read by `written` (given
    /// this connection, to the store) if the store has not finished the hold.
    fn merged_hold_with(
        &mut self,
        account_sid: &str,
        call_id: &str,
        written: impl FnOnce(&Conn) -> Result<Option<StoredHold>>,
    ) -> Result<Option<StoredHold>> {
        let stored = self.hold_row(account_sid, call_id)?;
        if stored.as_ref().is_some_and(finished) {
            return Ok(stored);
        }
        Ok(written(self)?.or(stored))
    }

    /// SQLite: the holds reserved in both files together; drops from the
    /// holds file the grants the store has finished.
    pub(super) fn merged_reserved_holds(&mut self) -> Result<Vec<StoredHold>> {
        let mut holds = open_beside(self)?;
        let mut out = Vec::new();
        let mut settled = Vec::new();
        for h in holds.reserved_rows()? {
            match self.hold_row(&h.account_sid, &h.call_id)? {
                Some(s) if finished(&s) => settled.push(h),
                _ => out.push(h),
            }
        }
        for h in self.reserved_rows()? {
            let written = holds.hold_row(&h.account_sid, &h.call_id)?;
            if written.is_none() {
                out.push(h);
            }
        }
        if !settled.is_empty() {
            let keys: Vec<_> = settled
                .iter()
                .map(|h| (h.account_sid.as_str(), h.call_id.as_str()))
                .collect();
            holds.delete_reserved_holds(&keys)?;
        }
        Ok(out)
    }

    /// Drops from the holds file, in one transaction, the grants of `keys`
    /// (account SID, call id) still there as reserved: the store has them
    /// finished.
    fn delete_reserved_holds(&mut self, keys: &[(&str, &str)]) -> Result<()> {
        self.transaction(|c| {
            for (account_sid, call_id) in keys {
                c.execute(
                    "DELETE FROM wallet_holds WHERE account_sid = $1 AND call_id = $2 \
                     AND status = 'reserved'",
                    &[Param::Text(account_sid), Param::Text(call_id)],
                )?;
            }
            Ok(())
        })
    }
}

impl Store {
    /// A hold as stored ([`Conn::hold`]), read on a pooled connection; on
    /// SQLite the holds file is read on a pooled connection of its own too,
    /// instead of one opened (its pragmas set, its tables checked) per read.
    pub async fn hold(&self, account_sid: &str, call_id: &str) -> Result<Option<StoredHold>> {
        let (sid, id, store) = (account_sid.to_owned(), call_id.to_owned(), self.clone());
        self.run(move |c| match c {
            Conn::Sqlite(_) => c.merged_hold_with(&sid, &id, |_| {
                store.with_holds_conn(|holds| holds.hold_row(&sid, &id))
            }),
            Conn::Postgres(_) => c.hold(&sid, &id),
        })
        .await
    }

    /// Runs `f` on an idle connection to the SQLite store's holds file, or
    /// on a new one, which is kept for the next read.
    fn with_holds_conn<T>(&self, f: impl FnOnce(&mut Conn) -> Result<T>) -> Result<T> {
        let super::Backend::Sqlite(store) = &self.inner.backend else {
            unreachable!("PostgreSQL has no holds file");
        };
        let idle = self.inner.holds_idle.lock().pop();
        let mut conn = match idle {
            Some(c) => c,
            None => {
                let mut c = open(store)?;
                // Point reads of a hold: a kept connection needs no 64 MiB
                // page cache of its own.
                c.batch(READER_CACHE)?;
                c
            }
        };
        let out = f(&mut conn);
        super::give_back(&self.inner.holds_idle, conn, out.is_ok());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::wallet::{HoldUpdate, WalletRows};
    use crate::store::Store;
    use crate::wallet::CallBilling;

    const SID: &str = "AC00000000000000000000000000000c11";

    fn hold(call_id: &str, expires_at: i64) -> StoredHold {
        StoredHold {
            account_sid: SID.into(),
            call_id: call_id.into(),
            amount: 300_000,
            status: HoldStatus::Reserved,
            created_at: 0,
            expires_at,
            billing: None,
        }
    }

    /// What the flush writes when a call's CDR settles its hold.
    fn settle(store: &Store, h: &StoredHold) {
        let rows = WalletRows {
            holds: vec![HoldUpdate {
                account_sid: h.account_sid.clone(),
                call_id: h.call_id.clone(),
                amount: h.amount,
                created_at: h.created_at,
                expires_at: h.expires_at,
                status: HoldStatus::Settled,
                billing: CallBilling {
                    duration: 60,
                    billsec: 60,
                    charged: 1_300,
                },
            }],
            ..Default::default()
        };
        store
            .with_conn(|c| c.transaction(|c| c.write_wallet_rows(&rows, "2026-12-07T00:00:00Z")))
            .unwrap();
    }

    fn status(store: &Store, call_id: &str) -> Option<HoldStatus> {
        store
            .with_conn(|c| c.hold(SID, call_id))
            .unwrap()
            .map(|h| h.status)
    }

    /// Each file committed on its own, in either order: the merge gives each
    /// hold its last decision, a repeat grant finds the store's settlement,
    /// and what the store settled leaves the holds file.
    #[test]
    fn a_hold_is_its_last_decision_whichever_file_has_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("t.db");
        let store = Store::open(&format!("sqlite://{}", db.display())).unwrap();
        let mut w = store.hold_writer().unwrap();
        let grant = |w: &mut HoldWriter, h: StoredHold| {
            store
                .write_holds(w, &[(HoldWrite::Grant(h), None)])
                .unwrap()[0]
                .clone()
        };
        for id in ["settled", "released", "reserved", "pruned"] {
            assert_eq!(grant(&mut w, hold(id, 100)), Some(None), "{id} stored");
        }
        // Settled by its CDR's flush after its grant was written.
        settle(&store, &hold("settled", 100));
        // Settled by its CDR's flush before its grant's own write.
        settle(&store, &hold("early", 100));
        let early = grant(&mut w, hold("early", 100)).unwrap().unwrap();
        assert_eq!(
            early.status,
            HoldStatus::Settled,
            "the grant finds the settlement"
        );
        // Released after its grant; and a hold the store itself has reserved
        // (an older version's), released through the holds file.
        store
            .with_conn(|c| c.insert_hold(&hold("in-store", 100)))
            .unwrap();
        let released = [
            (HoldWrite::Release(hold("released", 100)), None),
            (HoldWrite::Release(hold("in-store", 100)), None),
        ];
        store.write_holds(&mut w, &released).unwrap();
        // The old version's reserved hold is reserved while nothing released it.
        store
            .with_conn(|c| c.insert_hold(&hold("old", 100)))
            .unwrap();

        let mut reserved: Vec<String> = store
            .with_conn(|c| c.reserved_holds())
            .unwrap()
            .into_iter()
            .map(|h| h.call_id)
            .collect();
        reserved.sort();
        assert_eq!(reserved, ["old", "pruned", "reserved"]);
        assert_eq!(status(&store, "settled"), Some(HoldStatus::Settled));
        assert_eq!(status(&store, "released"), Some(HoldStatus::Released));
        assert_eq!(status(&store, "in-store"), Some(HoldStatus::Released));
        assert_eq!(status(&store, "none"), None);
        // Read through the store's pool, the holds file on one connection
        // kept between reads: the same holds.
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for id in ["settled", "released", "in-store", "reserved", "old", "none"] {
            let pooled = rt.block_on(store.hold(SID, id)).unwrap();
            assert_eq!(
                pooled,
                store.with_conn(|c| c.hold(SID, id)).unwrap(),
                "{id}"
            );
        }
        assert_eq!(store.inner.holds_idle.lock().len(), 1, "one connection");
        let again = grant(&mut w, hold("settled", 100)).unwrap().unwrap();
        assert_eq!(
            again.billing.unwrap().charged,
            1_300,
            "a repeat finds the store's hold"
        );

        let mut file = open(&db).unwrap();
        let Conn::Sqlite(raw) = &file else {
            unreachable!()
        };
        let page: i64 = raw.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap();
        assert_eq!(page, PAGE_SIZE, "small pages: a commit appends whole pages");
        assert_eq!(
            file.hold_row(SID, "settled").unwrap(),
            None,
            "reading the reserved holds drops what the store settled"
        );
        assert_eq!(
            file.hold_row(SID, "early").unwrap(),
            None,
            "nothing written"
        );
        // The writer drops settled grants past their expiry as it goes.
        settle(&store, &hold("pruned", 100));
        assert_eq!(w.prune(100).unwrap(), 0, "not past its expiry yet");
        assert_eq!(w.prune(101).unwrap(), 1);
        assert_eq!(file.hold_row(SID, "pruned").unwrap(), None);
        assert_eq!(
            file.hold_row(SID, "reserved").unwrap().unwrap().status,
            HoldStatus::Reserved,
            "a hold the store has not finished stays"
        );
    }

    /// Under a steady load of holds the holds file's WAL stays bounded
    /// without the store's checkpointer (which, run beside steady commits,
    /// never copied the whole WAL: it grew without end).
    #[test]
    fn the_holds_files_wal_stays_bounded_under_steady_writes() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("t.db");
        let store = Store::open(&format!("sqlite://{}", db.display())).unwrap();
        let mut w = store.hold_writer().unwrap();
        let wal = path(&db).with_extension("db-holds-wal");
        let mut largest = 0;
        // ~90 MiB of WAL pages in all (a grant writes ~1.3 pages).
        for batch in 0..4_000 {
            let writes: Vec<_> = (0..20)
                .map(|i| (HoldWrite::Grant(hold(&format!("CA{batch}-{i}"), 100)), None))
                .collect();
            store.write_holds(&mut w, &writes).unwrap();
            largest = largest.max(std::fs::metadata(&wal).map_or(0, |m| m.len()));
        }
        let limit = (HOLDS_WAL_PAGES * (PAGE_SIZE + 24) + 32) as u64;
        assert!(
            largest <= limit * 11 / 10,
            "the WAL grew to {largest} bytes"
        );
    }

    /// The holds file's fences follow the store's claims.
    #[test]
    fn a_claim_fences_the_holds_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("sqlite://{}/t.db", dir.path().display())).unwrap();
        let mut w = store.hold_writer().unwrap();
        let claim = || {
            store
                .with_conn(|c| c.claim_partitions("cdrs", &[3], "http://me"))
                .unwrap()[0]
                .1
        };
        let fence = |epoch| Fence {
            topic: "cdrs".into(),
            partition: 3,
            epoch,
        };
        let first = claim();
        let write = |w: &mut HoldWriter, id: &str, epoch| {
            store
                .write_holds(w, &[(HoldWrite::Grant(hold(id, 100)), Some(fence(epoch)))])
                .unwrap()[0]
                .clone()
        };
        assert_eq!(write(&mut w, "CA1", first), Some(None));
        let second = claim();
        assert_eq!(second, first + 1);
        assert_eq!(write(&mut w, "CA2", first), None, "fenced");
        assert_eq!(status(&store, "CA2"), None);
        assert_eq!(write(&mut w, "CA3", second), Some(None));
        assert_eq!(status(&store, "CA3"), Some(HoldStatus::Reserved));
        // An older claim's copy reaching the holds file late changes nothing.
        store
            .with_conn(|c| c.claim_holds("cdrs", &[(3, first)], "http://old"))
            .unwrap();
        assert_eq!(write(&mut w, "CA4", first), None, "still fenced");
        assert_eq!(
            write(&mut w, "CA5", second),
            Some(None),
            "the newer claim holds"
        );
    }
}
