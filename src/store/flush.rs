//! The flush transaction, written once for both databases, and the reads of
//! what flushes stored.
//!
//! One flush is one transaction holding the usage pages' deltas, the consumed
//! offsets they came from and the newly seen dedup ids (effectively once:
//! nothing counted is lost or counted twice across a crash). Offsets are
//! advanced with a compare-and-set from the offset the batch started at, which
//! makes a flush idempotent (a batch retried after an unknown commit outcome is
//! recognised as already applied) and fences a zombie instance whose partitions
//! were taken over.
//!
//! A new kind of row written with the flush (wallet balances, holds, outbox
//! events) is a field of [`FlushBatch`] and one step in [`Conn::write_flush`],
//! with one SQL text for both databases.

use std::collections::{HashMap, HashSet};

use crate::calendar::Day;
use crate::counters::Tally;
use crate::dedup::blob;
use crate::triggers::Trigger;

use super::firing::TriggerReport;
use super::page::{decode_stored, Page, PageDelta};
use super::wallet::WalletRows;
use super::{Conn, Error, Param, Result};

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
    /// What the flush adds to each usage page it touches, in key order.
    pub pages: Vec<PageDelta>,
    pub offsets: Vec<OffsetAdvance>,
    pub dedup: Vec<DedupRows>,
    /// Dedup rows seen before this day are deleted.
    pub prune_dedup_before: Option<Day>,
    /// Wallet debits and hold settlements of the flushed CDRs.
    pub wallet: WalletRows,
    /// The usage triggers of the batch's accounts that have any, evaluated
    /// against the pages as this flush leaves them ([`super::firing`]).
    pub triggers: Vec<std::sync::Arc<Trigger>>,
    /// Unix ms the batch's first CDR was consumed: the time a firing's
    /// callback is counted from, unless `crossed_at_ms` has its crossing.
    pub consumed_at_ms: i64,
    /// Likely crossings the consumer saw: (trigger SID, period key, Unix ms
    /// the CDR that reached the value was counted).
    pub crossed_at_ms: Vec<(String, String, i64)>,
    /// `Some`: the callbacks of the triggers this flush fires are written
    /// claimed by this instance until then ([`Conn::insert_outbox_rows_leased`])
    /// and come back in the report, for its dispatcher to send at once;
    /// `None`: written pending, for the dispatcher's next read.
    pub outbox_lease_until: Option<i64>,
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

/// The rows of one account's page that a flush added to, as written: what
/// its usage triggers are evaluated on.
#[derive(Debug, Clone)]
pub struct Touched {
    pub account_sid: String,
    pub rows: Vec<(crate::calendar::Period, crate::counters::Leaves)>,
}

impl Touched {
    fn of(account_sid: &str, delta: &Page, after: &Page) -> Touched {
        Touched {
            account_sid: account_sid.to_owned(),
            rows: after.rows_of(delta),
        }
    }
}

/// A usage page's key columns: account SID and page text.
pub type PageKey = (String, String);

fn rows<'a>(v: &'a [(&'a PageKey, Vec<u8>)]) -> Vec<(&'a PageKey, &'a [u8])> {
    v.iter().map(|(k, d)| (*k, d.as_slice())).collect()
}

const SET_LAST_FLUSH: &str = "INSERT INTO tallyd_meta (key, value) VALUES ('last_flush', $1) \
     ON CONFLICT (key) DO UPDATE SET value = excluded.value";

impl Conn {
    /// Writes one flush atomically (see the module doc for the offset
    /// protocol).
    pub fn write_flush(&mut self, b: &FlushBatch) -> Result<FlushOutcome> {
        self.write_flush_firing(b).map(|(o, _)| o)
    }

    /// [`Self::write_flush`], also returning the usage triggers it fired.
    pub fn write_flush_firing(&mut self, b: &FlushBatch) -> Result<(FlushOutcome, TriggerReport)> {
        self.transaction(|c| {
            for (i, o) in b.offsets.iter().enumerate() {
                if !c.advance_offset(o)? {
                    let found = c.stored_offset(&o.topic, o.partition)?;
                    // Only the first advance can find the batch applied: a
                    // batch is all or nothing.
                    if i == 0 && found == Some(o.to) {
                        return Ok((FlushOutcome::AlreadyApplied, TriggerReport::default()));
                    }
                    return Err(Error::Fenced {
                        topic: o.topic.clone(),
                        partition: o.partition,
                        expected: o.from,
                        found,
                    });
                }
            }
            let started = std::time::Instant::now();
            let watched: HashSet<&str> =
                b.triggers.iter().map(|t| t.account_sid.as_str()).collect();
            let after = c.write_pages(&b.pages, &watched)?;
            let pages_done = started.elapsed();
            let fired = c.fire_triggers(
                &b.triggers,
                &after,
                b.consumed_at_ms,
                &b.crossed_at_ms,
                b.outbox_lease_until,
            )?;
            let fired_done = started.elapsed();
            for d in &b.dedup {
                c.execute(
                    "INSERT INTO dedup_batches (topic, partition, seen_day, first_offset, ids) \
                     VALUES ($1, $2, $3, $4, $5)",
                    &[
                        Param::Text(&d.topic),
                        Param::Int(d.partition.into()),
                        Param::Int(d.seen_day.0.into()),
                        Param::Int(d.first_offset),
                        Param::Bytes(&blob(&d.ids)),
                    ],
                )?;
            }
            if let Some(before) = b.prune_dedup_before {
                c.execute(
                    "DELETE FROM dedup_batches WHERE seen_day < $1",
                    &[Param::Int(before.0.into())],
                )?;
            }
            c.write_wallet_rows(&b.wallet, &b.as_of)?;
            c.execute(SET_LAST_FLUSH, &[Param::Text(&b.as_of)])?;
            tracing::debug!(
                pages = b.pages.len(),
                pages_ms = pages_done.as_millis() as u64,
                triggers_ms = (fired_done - pages_done).as_millis() as u64,
                rest_ms = (started.elapsed() - fired_done).as_millis() as u64,
                fired = fired.fired.len(),
                "flush written"
            );
            Ok((FlushOutcome::Applied, fired))
        })
    }

    /// Moves one partition's stored offset from `o.from` to `o.to`; false if
    /// the store did not hold `o.from`.
    fn advance_offset(&mut self, o: &OffsetAdvance) -> Result<bool> {
        let moved = match o.from {
            None => self.execute(
                "INSERT INTO consumer_offsets (topic, partition, next_offset) VALUES ($1, $2, $3) \
                 ON CONFLICT DO NOTHING",
                &[
                    Param::Text(&o.topic),
                    Param::Int(o.partition.into()),
                    Param::Int(o.to),
                ],
            )?,
            Some(from) => self.execute(
                "UPDATE consumer_offsets SET next_offset = $1 \
                 WHERE topic = $2 AND partition = $3 AND next_offset = $4",
                &[
                    Param::Int(o.to),
                    Param::Text(&o.topic),
                    Param::Int(o.partition.into()),
                    Param::Int(from),
                ],
            )?,
        };
        Ok(moved == 1)
    }

    fn stored_offset(&mut self, topic: &str, partition: i32) -> Result<Option<i64>> {
        Ok(self
            .query(
                "SELECT next_offset FROM consumer_offsets WHERE topic = $1 AND partition = $2",
                &[Param::Text(topic), Param::Int(partition.into())],
            )?
            .first()
            .map(|r| r[0].int()))
    }

    /// Adds each page delta into its stored page, or stores it as a new page.
    /// A page that did not exist when read but was inserted by another writer
    /// before this one's insert is read and added to in another round.
    /// Returns, for the accounts in `watched`, each period the flush added to
    /// with its row as written.
    pub(super) fn write_pages(
        &mut self,
        pages: &[PageDelta],
        watched: &HashSet<&str>,
    ) -> Result<Vec<Touched>> {
        let mut touched = Vec::new();
        let mut todo: Vec<&PageDelta> = pages.iter().collect();
        while !todo.is_empty() {
            let keys: Vec<PageKey> = todo.iter().map(|p| p.key()).collect();
            let mut stored = self.read_pages_for_update(&keys)?;
            let mut existing = Vec::new();
            let mut fresh = Vec::new();
            let mut fresh_at = Vec::new();
            for (i, (p, key)) in todo.iter().zip(&keys).enumerate() {
                let old = stored.remove(key);
                // Pages of breakdowns only have nothing triggers measure.
                let new = if p.delta.has_rows() && watched.contains(key.0.as_str()) {
                    let page = p.sum(old.as_deref())?;
                    touched.push(Touched::of(&key.0, &p.delta, &page));
                    page.encode()
                } else {
                    p.onto(old.as_deref())?
                };
                match old {
                    Some(_) => existing.push((key, new)),
                    None => {
                        fresh.push((key, new));
                        fresh_at.push(i);
                    }
                }
            }
            if !existing.is_empty() {
                self.update_pages(&rows(&existing))?;
            }
            let inserted = if fresh.is_empty() {
                HashSet::new()
            } else {
                self.insert_pages(&rows(&fresh))?
            };
            todo = fresh_at
                .into_iter()
                .filter(|&i| !inserted.contains(&keys[i]))
                .map(|i| todo[i])
                .collect();
        }
        Ok(touched)
    }

    fn read_pages_for_update(&mut self, keys: &[PageKey]) -> Result<HashMap<PageKey, Vec<u8>>> {
        match self {
            Conn::Sqlite(c) => super::sqlite::read_pages(c, keys),
            Conn::Postgres(c) => super::pg::read_pages(&mut c.client, keys),
        }
    }

    fn update_pages(&mut self, rows: &[(&PageKey, &[u8])]) -> Result<()> {
        match self {
            Conn::Sqlite(c) => super::sqlite::update_pages(c, rows),
            Conn::Postgres(c) => super::pg::update_pages(&mut c.client, rows),
        }
    }

    fn insert_pages(&mut self, rows: &[(&PageKey, &[u8])]) -> Result<HashSet<PageKey>> {
        match self {
            Conn::Sqlite(c) => super::sqlite::insert_pages(c, rows),
            Conn::Postgres(c) => super::pg::insert_pages(&mut c.client, rows),
        }
    }

    /// Next offset to read per partition of `topic`.
    pub fn load_offsets(&mut self, topic: &str) -> Result<HashMap<i32, i64>> {
        Ok(self
            .query(
                "SELECT partition, next_offset FROM consumer_offsets WHERE topic = $1",
                &[Param::Text(topic)],
            )?
            .iter()
            .map(|r| (r[0].int() as i32, r[1].int()))
            .collect())
    }

    /// Dedup blobs of one partition seen on or after `since`: (seen day, packed ids).
    pub fn load_dedup(
        &mut self,
        topic: &str,
        partition: i32,
        since: Day,
    ) -> Result<Vec<(Day, Vec<u8>)>> {
        Ok(self
            .query(
                "SELECT seen_day, ids FROM dedup_batches \
                 WHERE topic = $1 AND partition = $2 AND seen_day >= $3",
                &[
                    Param::Text(topic),
                    Param::Int(partition.into()),
                    Param::Int(since.0.into()),
                ],
            )?
            .into_iter()
            .map(|mut r| {
                let ids = std::mem::replace(&mut r[1], super::Value::Null).into_bytes();
                (Day(r[0].int() as i32), ids)
            })
            .collect())
    }

    /// Every stored page, decoded: (account SID, page).
    fn read_all_pages(&mut self) -> Result<Vec<(String, Page)>> {
        self.query("SELECT account_sid, page, data FROM usage_pages", &[])?
            .into_iter()
            .map(|r| {
                let page = decode_stored(r[0].text(), r[1].text(), r[2].bytes())?;
                Ok((r[0].text().to_owned(), page))
            })
            .collect()
    }

    /// The stored pages of `accounts` whose keys are in `[first, last]`
    /// (`YYYY-MM` or `all`), decoded.
    pub fn read_pages(
        &mut self,
        accounts: &[String],
        first: &str,
        last: &str,
    ) -> Result<Vec<Page>> {
        let n = accounts.len();
        let list = super::conn::placeholders(1, n);
        let sql = format!(
            "SELECT account_sid, page, data FROM usage_pages \
             WHERE account_sid IN ({list}) AND page >= ${} AND page <= ${}",
            n + 1,
            n + 2
        );
        let mut params: Vec<Param<'_>> = accounts.iter().map(|a| Param::Text(a)).collect();
        params.push(Param::Text(first));
        params.push(Param::Text(last));
        self.query(&sql, &params)?
            .into_iter()
            .map(|r| decode_stored(r[0].text(), r[1].text(), r[2].bytes()))
            .collect()
    }

    /// All stored UsageRecords of one period kind (`day`, `month`, `year`, `all`):
    /// every category with usage in each row, rollups summed from their leaves;
    /// sorted.
    pub fn read_records(&mut self, period: &str) -> Result<Vec<StoredRecord>> {
        let mut out = Vec::new();
        for (account_sid, page) in self.read_all_pages()? {
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
        for (account_sid, page) in self.read_all_pages()? {
            out.extend(page.breakdowns().map(|b| {
                let t = |t: Tally| [t.count as i64, t.usage as i64, t.price];
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
        Ok(self
            .query(
                "SELECT value FROM tallyd_meta WHERE key = 'last_flush'",
                &[],
            )?
            .first()
            .map(|r| r[0].text().to_owned()))
    }
}
