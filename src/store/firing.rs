//! Usage triggers fired in the flush transaction ([`crate::triggers`]): a
//! crossing found on the pages as the flush leaves them marks its trigger
//! fired for the period in `usage_trigger_firings` — a conditional upsert,
//! so a period fires at most once whatever an instance's in-memory book
//! believed — and writes the
//! callback into the webhook outbox ([`super::outbox`]) with an idempotency
//! token made of the trigger and the period, the same across replays.

use std::collections::HashMap;

use rust_decimal::Decimal;
use rustc_hash::FxHashMap;

use super::flush::Touched;
use super::outbox::{OutboxRow, KIND_USAGE_TRIGGER};
use super::{Conn, Param, Result};
use crate::calendar::Period;
use crate::counters::Tally;
use crate::triggers::callback::Callback;
use crate::triggers::{crossings, period_key, Crossing, Trigger};

/// A trigger fired by a flush, for the in-memory book once it committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Firing {
    pub account_sid: String,
    pub sid: String,
    pub period: String,
    pub date_fired: String,
    pub value: Decimal,
}

/// What a flush did to the usage triggers of its accounts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TriggerReport {
    pub fired: Vec<Firing>,
    /// Per trigger of the flush's accounts: the latest period of its
    /// recurrence the flush wrote, and its category's tally there as stored.
    pub observed: Vec<(std::sync::Arc<Trigger>, Period, Tally)>,
    /// The callbacks written claimed by this instance (the batch had an
    /// `outbox_lease_until`), for its dispatcher to send.
    pub leased: Vec<OutboxRow>,
}

/// A crossing to mark fired: the crossing, its period key and value as
/// text, and its trigger as the flush's book has it (the fields a firing's
/// callback keeps never change; its URL and method are read as stored).
struct ToMark<'c> {
    crossing: Crossing,
    key: String,
    value: String,
    trigger: &'c Trigger,
}

/// Crossings marked fired by one statement at most.
const FIRE_CHUNK: usize = 500;

impl Conn {
    /// Marks each crossing's trigger fired for its period unless it already
    /// fired for it or a later one (or, once-only, at all), or is gone (or
    /// is another account's); returns, for those it marked, their positions
    /// in `chunk` with the callback URL and method stored now.
    ///
    /// Two statements: the triggers are read (on PostgreSQL locked FOR
    /// SHARE in SID order, as an update or delete locks them: one of those
    /// waits for this transaction, then redirects or deletes what it wrote),
    /// then their firings upserted in `usage_trigger_firings`. (One
    /// `INSERT … SELECT` joining the triggers was slower on PostgreSQL: it
    /// hashed the whole table for each chunk.)
    fn mark_fired(
        &mut self,
        chunk: &[ToMark<'_>],
        date_fired: &str,
    ) -> Result<Vec<(usize, String, String)>> {
        let lock = self.row_lock(" ORDER BY sid FOR SHARE");
        let sids: Vec<Param> = chunk.iter().map(|m| Param::Text(&m.crossing.sid)).collect();
        let stored = self.query(
            &format!(
                "SELECT sid, account_sid, callback_url, callback_method FROM usage_triggers \
                 WHERE sid IN ({}){lock}",
                super::conn::placeholders(1, sids.len())
            ),
            &sids,
        )?;
        let mut stored: HashMap<&str, &[super::Value]> =
            stored.iter().map(|r| (r[0].text(), r.as_slice())).collect();
        // In the crossings' order; a trigger of another account of that SID
        // is not the crossing's.
        let found: Vec<(usize, &[super::Value])> = chunk
            .iter()
            .enumerate()
            .filter_map(|(i, m)| {
                let row = stored.remove(m.crossing.sid.as_str())?;
                (row[1].text() == m.crossing.account_sid).then_some((i, row))
            })
            .collect();
        if found.is_empty() {
            return Ok(Vec::new());
        }
        let mut values = String::with_capacity(found.len() * 24);
        let mut params = Vec::with_capacity(1 + found.len() * 4);
        params.push(Param::Text(date_fired));
        for (n, (i, _)) in found.iter().enumerate() {
            let m = &chunk[*i];
            let b = 2 + n * 4;
            if n > 0 {
                values.push_str(", ");
            }
            values.push_str(&format!("(${b}, ${}, $1, ${}, ${})", b + 1, b + 2, b + 3));
            params.extend([
                Param::Text(&m.crossing.sid),
                Param::Text(&m.key),
                Param::Text(&m.value),
                Param::Text(m.trigger.recurring.as_str()),
            ]);
        }
        let fired = self.query(
            &format!(
                "INSERT INTO usage_trigger_firings (sid, period, date_fired, value, recurring) \
                 VALUES {values} ON CONFLICT (sid) DO UPDATE SET period = excluded.period, \
                 date_fired = excluded.date_fired, value = excluded.value \
                 WHERE usage_trigger_firings.recurring IN ('daily', 'monthly', 'yearly') \
                 AND usage_trigger_firings.period < excluded.period \
                 RETURNING sid"
            ),
            &params,
        )?;
        let fired: std::collections::HashSet<&str> = fired.iter().map(|r| r[0].text()).collect();
        Ok(found
            .into_iter()
            .filter(|(i, _)| fired.contains(chunk[*i].crossing.sid.as_str()))
            .map(|(i, row)| (i, row[2].text().to_owned(), row[3].text().to_owned()))
            .collect())
    }

    /// Evaluates `triggers` on the pages `touched` and fires each crossing the
    /// store has not fired yet: firing row and outbox row, in the caller's
    /// transaction. The outbox row's time is the crossing's in
    /// `crossed_at_ms` if there, else `consumed_at_ms`; with `lease_until`
    /// the rows are written claimed until then and returned in the report.
    pub(super) fn fire_triggers(
        &mut self,
        triggers: &[std::sync::Arc<Trigger>],
        touched: &[Touched],
        consumed_at_ms: i64,
        crossed_at_ms: &[(String, String, i64)],
        lease_until: Option<i64>,
    ) -> Result<TriggerReport> {
        let mut report = TriggerReport::default();
        if triggers.is_empty() {
            return Ok(report);
        }
        let now = chrono::Utc::now();
        let date_fired = crate::calendar::format_rfc3339(now.timestamp());
        let mut by_account: FxHashMap<&str, Vec<std::sync::Arc<Trigger>>> = FxHashMap::default();
        for t in triggers {
            by_account
                .entry(t.account_sid.as_str())
                .or_default()
                .push(t.clone());
        }
        let started = std::time::Instant::now();
        report.observed.reserve(triggers.len());
        let mut found: Vec<(Crossing, &Trigger)> = Vec::new();
        for page in touched {
            let Some(mine) = by_account.get(page.account_sid.as_str()) else {
                continue;
            };
            for t in mine {
                let Some(category) = t.category() else {
                    continue;
                };
                if let Some((p, leaves)) = page
                    .rows
                    .iter()
                    .filter(|(p, _)| t.recurring.measures(*p))
                    .max_by_key(|(p, _)| *p)
                {
                    report
                        .observed
                        .push(((*t).clone(), *p, leaves.get(category)));
                }
            }
            found.extend(crossings(mine, &page.rows).into_iter().map(|c| {
                let t: &Trigger = &mine[c.trigger];
                (c, t)
            }));
        }
        // A trigger crossing in two periods of one flush (CDRs of two days)
        // is marked one period per round, oldest first: one statement may
        // update a row once.
        let crossed_at: HashMap<(&str, &str), i64> = crossed_at_ms
            .iter()
            .map(|(sid, p, at)| ((sid.as_str(), p.as_str()), *at))
            .collect();
        let evaluated = started.elapsed();
        let (mut marking, mut queueing) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
        let mut rounds: Vec<Vec<ToMark<'_>>> = Vec::new();
        let mut seen: FxHashMap<String, usize> = FxHashMap::default();
        for (c, trigger) in found {
            let n = seen.entry(c.sid.clone()).or_insert(0);
            if rounds.len() <= *n {
                rounds.push(Vec::new());
            }
            rounds[*n].push(ToMark {
                key: period_key(c.period),
                value: c.value.normalize().to_string(),
                crossing: c,
                trigger,
            });
            *n += 1;
        }
        // Locked in SID order across the chunks too (see `mark_fired`).
        for round in &mut rounds {
            round.sort_unstable_by(|a, b| a.crossing.sid.cmp(&b.crossing.sid));
        }
        for round in &rounds {
            for chunk in round.chunks(FIRE_CHUNK) {
                let t = std::time::Instant::now();
                let marked = self.mark_fired(chunk, &date_fired)?;
                marking += t.elapsed();
                let t = std::time::Instant::now();
                let mut rows = Vec::with_capacity(marked.len());
                for (i, url, method) in marked {
                    let m = &chunk[i];
                    let c = &m.crossing;
                    let token = format!("{}-FIRES-{}-{}", c.account_sid, c.sid, m.key);
                    let body = Callback::of(m.trigger, c.period, now.timestamp(), c.value).encode();
                    rows.push(OutboxRow {
                        account_sid: c.account_sid.clone(),
                        kind: KIND_USAGE_TRIGGER.to_owned(),
                        source_sid: c.sid.clone(),
                        url,
                        method,
                        body,
                        // When the CDR that reached the value was counted, if
                        // the consumer saw it coming; else when the batch
                        // began.
                        created_at: crossed_at
                            .get(&(c.sid.as_str(), m.key.as_str()))
                            .copied()
                            .unwrap_or(consumed_at_ms),
                        id: token,
                    });
                    report.fired.push(Firing {
                        account_sid: c.account_sid.clone(),
                        sid: c.sid.clone(),
                        period: m.key.clone(),
                        date_fired: date_fired.clone(),
                        value: c.value,
                    });
                }
                match lease_until {
                    None => {
                        self.insert_outbox_rows(&rows)?;
                    }
                    Some(until) => {
                        let added: std::collections::HashSet<String> = self
                            .insert_outbox_rows_leased(&rows, until)?
                            .into_iter()
                            .collect();
                        report
                            .leased
                            .extend(rows.into_iter().filter(|r| added.contains(&r.id)));
                    }
                }
                queueing += t.elapsed();
            }
        }
        tracing::debug!(
            triggers = triggers.len(),
            fired = report.fired.len(),
            evaluate_ms = evaluated.as_millis() as u64,
            mark_ms = marking.as_millis() as u64,
            outbox_ms = queueing.as_millis() as u64,
            "usage triggers evaluated"
        );
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calendar::Day;
    use crate::category::Category;
    use crate::cdr::AccountSid;
    use crate::counters::{Leaves, RowKey, Tally};
    use crate::store::page::{pages_of, RowDelta};
    use crate::store::{FlushBatch, OffsetAdvance, Store};
    use crate::triggers::{CallbackMethod, Recurring, TriggerBy};
    use rust_decimal_macros::dec;

    fn flush(
        store: &Store,
        t: &Trigger,
        day: Day,
        calls: u64,
        from: Option<i64>,
        to: i64,
    ) -> Vec<Firing> {
        flush_days(store, t, &[day], calls, from, to)
    }

    fn flush_days(
        store: &Store,
        t: &Trigger,
        days: &[Day],
        calls: u64,
        from: Option<i64>,
        to: i64,
    ) -> Vec<Firing> {
        let b = batch(t, days, calls, from, to);
        store.write_flush_firing(&b).unwrap().1.fired
    }

    /// A flush of partition 0 from `from` to `to` adding `calls` minute-long
    /// calls of account 7 on each of `days`, evaluating `t`.
    fn batch(t: &Trigger, days: &[Day], calls: u64, from: Option<i64>, to: i64) -> FlushBatch {
        let rows: Vec<RowDelta> = days
            .iter()
            .flat_map(|d| Period::containing(*d))
            .map(|p| RowDelta {
                key: RowKey {
                    account: AccountSid(7),
                    period: p,
                },
                leaves: {
                    let mut l = Leaves::default();
                    l.add_leaf(
                        Category::CallsOutbound,
                        Tally {
                            count: calls,
                            usage: 60 * calls,
                            price: 1_000 * calls as i64,
                        },
                    );
                    l
                },
                price_unit: "usd".into(),
            })
            .collect();
        FlushBatch {
            as_of: "2026-03-02T00:00:00+00:00".into(),
            pages: pages_of(&rows, &[]),
            offsets: vec![OffsetAdvance {
                topic: "cdrs".into(),
                partition: 0,
                from,
                to,
            }],
            triggers: vec![std::sync::Arc::new(t.clone())],
            consumed_at_ms: 1_000,
            ..FlushBatch::default()
        }
    }

    fn insert(store: &Store, t: &Trigger) {
        store.with_conn(|c| c.insert_trigger(t)).unwrap();
    }

    fn outbox(store: &Store) -> Vec<(String, String, String, i64)> {
        store
            .with_conn(|c| {
                c.query(
                    "SELECT id, method, body, created_at FROM webhook_outbox ORDER BY id",
                    &[],
                )
            })
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r[0].text().into(),
                    r[1].text().into(),
                    r[2].text().into(),
                    r[3].int(),
                )
            })
            .collect()
    }

    #[test]
    fn a_crossing_fires_once_per_period_and_replays_never_repeat_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("sqlite://{}/t.db", dir.path().display())).unwrap();
        let account = AccountSid(7).to_string();
        let mut t = Trigger {
            sid: "UT0123456789abcdef0123456789abcdef".into(),
            account_sid: account.clone(),
            callback_method: CallbackMethod::Get,
            ..Trigger::example("calls", TriggerBy::Usage, dec!(3), Recurring::Daily)
        };
        insert(&store, &t);
        let d1 = Day::from_ymd(2026, 3, 1);
        // 2 minutes: below 3.
        assert!(flush(&store, &t, d1, 2, None, 2).is_empty());
        // 4 minutes: crosses.
        let f = flush(&store, &t, d1, 2, Some(2), 4);
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].period.as_str(), f[0].value), ("2026-03-01", dec!(4)));
        // The same flush again (an unknown commit outcome retried): applied
        // already, nothing fired twice.
        assert!(flush(&store, &t, d1, 2, Some(2), 4).is_empty());
        // A stale book (it never heard of the firing) still cannot fire the
        // day again: the store decides.
        assert!(flush(&store, &t, d1, 2, Some(4), 6).is_empty());
        // The next day crosses again.
        let d2 = Day::from_ymd(2026, 3, 2);
        assert!(flush(&store, &t, d2, 2, Some(6), 8).is_empty());
        t.fired_period = Some("2026-03-01".into());
        let f = flush(&store, &t, d2, 2, Some(8), 10);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].period, "2026-03-02");

        // Two days crossing in one flush fire both, oldest first.
        let (d3, d4) = (Day::from_ymd(2026, 3, 3), Day::from_ymd(2026, 3, 4));
        t.fired_period = Some("2026-03-02".into());
        let f = flush_days(&store, &t, &[d4, d3], 4, Some(10), 12);
        let periods: Vec<&str> = f.iter().map(|f| f.period.as_str()).collect();
        assert_eq!(periods, ["2026-03-03", "2026-03-04"]);
        let rows = outbox(&store);
        assert_eq!(rows.len(), 4);
        let (id, method, body, at) = &rows[0];
        assert_eq!(id, &format!("{account}-FIRES-{}-2026-03-01", t.sid));
        assert_eq!((method.as_str(), *at), ("GET", 1_000));
        assert!(body.starts_with("firing/1 "), "kept to render: {body}");
        let body = crate::triggers::callback::form_body(body, &account, &t.sid, id);
        let params: std::collections::HashMap<String, String> =
            serde_urlencoded::from_str(&body).unwrap();
        assert_eq!(params["AccountSid"], account);
        assert_eq!(params["UsageTriggerSid"], t.sid);
        assert_eq!(params["CurrentValue"], "4");
        assert_eq!(params["TriggerValue"], "3");
        assert_eq!(params["TriggerBy"], "usage");
        assert_eq!(params["Recurring"], "daily");
        assert_eq!(params["UsageCategory"], "calls");
        assert_eq!(params["IdempotencyToken"], *id);
        assert!(params["UsageRecordUri"].contains("Daily.json?Category=calls&StartDate=2026-03-01"));
        assert!(
            params["DateFired"].ends_with("+0000"),
            "{}",
            params["DateFired"]
        );
    }

    #[test]
    fn a_once_trigger_fires_once_ever_and_a_deleted_one_never() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("sqlite://{}/t.db", dir.path().display())).unwrap();
        let t = Trigger {
            sid: "UT00000000000000000000000000000009".into(),
            account_sid: AccountSid(7).to_string(),
            ..Trigger::example("totalprice", TriggerBy::Price, dec!(0.02), Recurring::Once)
        };
        // Not in the store (deleted): never fires.
        assert!(flush(&store, &t, Day::from_ymd(2026, 3, 1), 5, None, 1).is_empty());
        insert(&store, &t);
        let f = flush(&store, &t, Day::from_ymd(2026, 3, 1), 1, Some(1), 2);
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].period.as_str(), f[0].value), ("all", dec!(0.06)));
        assert!(flush(&store, &t, Day::from_ymd(2027, 3, 1), 9, Some(2), 3).is_empty());
        assert_eq!(outbox(&store).len(), 1);
    }

    #[test]
    fn a_leased_firing_is_written_claimed_and_handed_back_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("sqlite://{}/t.db", dir.path().display())).unwrap();
        let t = Trigger {
            sid: "UT0123456789abcdef0123456789abcdef".into(),
            account_sid: AccountSid(7).to_string(),
            ..Trigger::example("calls", TriggerBy::Count, dec!(2), Recurring::Daily)
        };
        insert(&store, &t);
        let b = FlushBatch {
            outbox_lease_until: Some(9_000),
            ..batch(&t, &[Day::from_ymd(2026, 3, 1)], 3, None, 3)
        };
        let (_, report) = store.write_flush_firing(&b).unwrap();
        assert_eq!(report.fired.len(), 1);
        let ids: Vec<&str> = report.leased.iter().map(|r| r.id.as_str()).collect();
        let (id, ..) = &outbox(&store)[0];
        assert_eq!(ids, [id.as_str()]);
        // Claimed for its first attempt until the lease, as a claim leaves it.
        let s = store.with_conn(|c| c.outbox_state(id)).unwrap().unwrap();
        assert_eq!(
            (s.status.as_str(), s.attempts, s.next_attempt_at),
            ("pending", 1, 9_000)
        );
        // The flush retried (an unknown commit outcome) hands nothing back.
        let (_, again) = store.write_flush_firing(&b).unwrap();
        assert!(again.leased.is_empty() && again.fired.is_empty());
        // Without a lease the row is pending and due at its crossing's time.
        let d2 = Day::from_ymd(2026, 3, 2);
        let mut t2 = t.clone();
        t2.fired_period = Some("2026-03-01".into());
        let (_, report) = store
            .write_flush_firing(&batch(&t2, &[d2], 3, Some(3), 6))
            .unwrap();
        assert_eq!((report.fired.len(), report.leased.len()), (1, 0));
        let (id, ..) = &outbox(&store)[1];
        let s = store.with_conn(|c| c.outbox_state(id)).unwrap().unwrap();
        assert_eq!((s.attempts, s.next_attempt_at), (0, 1_000));
    }

    /// `usage_triggers` as stores made before `usage_trigger_firings` had it,
    /// with a daily trigger of account 7 that fired on 2026-03-01 at 4 and
    /// one that never fired.
    fn old_triggers(account: &str) -> String {
        let row = |sid: &str, fired: &str| {
            format!(
                "INSERT INTO usage_triggers VALUES ('{sid}', '{account}', '', 'calls', 'usage', \
                 '3', 'daily', 'https://example.com/a', 'POST', '2026-01-01T00:00:00Z', \
                 '2026-01-01T00:00:00Z', {fired});"
            )
        };
        format!(
            "CREATE TABLE usage_triggers (sid TEXT PRIMARY KEY, account_sid TEXT NOT NULL, \
             friendly_name TEXT NOT NULL, usage_category TEXT NOT NULL, \
             trigger_by TEXT NOT NULL, trigger_value TEXT NOT NULL, recurring TEXT NOT NULL, \
             callback_url TEXT NOT NULL, callback_method TEXT NOT NULL, \
             date_created TEXT NOT NULL, date_updated TEXT NOT NULL, date_fired TEXT, \
             fired_period TEXT, fired_value TEXT); {} {}",
            row("UT1", "'2026-03-01T10:00:00Z', '2026-03-01', '4'"),
            row("UT2", "NULL, NULL, NULL"),
        )
    }

    /// The store at `url` holds [`old_triggers`]: opened (twice), the firing
    /// is in `usage_trigger_firings`, the old columns are gone, and the
    /// firing still counts (the same day never fires again, the next does).
    fn assert_old_firings_move(url: &str) {
        let account = AccountSid(7).to_string();
        Store::open(url).unwrap();
        let store = Store::open(url).unwrap();
        let (fired, calm) = store
            .with_conn(|c| Ok((c.trigger(&account, "UT1")?, c.trigger(&account, "UT2")?)))
            .unwrap();
        let fired = fired.unwrap();
        assert_eq!(fired.fired_period.as_deref(), Some("2026-03-01"));
        assert_eq!(fired.date_fired.as_deref(), Some("2026-03-01T10:00:00Z"));
        assert_eq!(fired.fired_value, Some(dec!(4)));
        let calm = calm.unwrap();
        assert_eq!((calm.fired_period, calm.date_fired), (None, None));
        let gone = store.with_conn(|c| c.query("SELECT fired_period FROM usage_triggers", &[]));
        assert!(gone.is_err(), "the old columns are dropped");
        let mut stale = fired.clone();
        stale.fired_period = None;
        assert!(flush(&store, &stale, Day::from_ymd(2026, 3, 1), 9, None, 1).is_empty());
        let f = flush(&store, &stale, Day::from_ymd(2026, 3, 2), 9, Some(1), 2);
        assert_eq!(f.len(), 1);
    }

    #[test]
    fn a_sqlite_store_keeping_firings_in_usage_triggers_moves_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute_batch(&old_triggers(&AccountSid(7).to_string()))
            .unwrap();
        assert_old_firings_move(&format!("sqlite://{}", path.display()));
    }

    /// Needs the server the test command starts (`TALLYD_TEST_POSTGRES_URL`,
    /// default the local one).
    #[test]
    fn a_postgres_store_keeping_firings_in_usage_triggers_moves_them() {
        use crate::store::tests::{drop_schema, pg_schema};
        let (mut admin, schema, url) = pg_schema("firings");
        admin
            .batch_execute(&format!(
                "SET search_path = {schema}; {}",
                old_triggers(&AccountSid(7).to_string())
            ))
            .unwrap();
        assert_old_firings_move(&url);
        drop_schema(&mut admin, &schema);
    }
}
