//! Usage trigger rows (`usage_triggers`, see [`super::schema`]): what the
//! Usage Triggers API creates, lists, changes and deletes, and what the
//! in-memory [`crate::triggers::TriggerBook`] is loaded from.
//!
//! Decimals are kept as strings (exact, and the same text in both databases);
//! enums as their Twilio names (`recurring` is `""` for a trigger that fires
//! once). A row whose text does not decode is a permanent [`Error::BadRow`],
//! never a panic: the same read fails the same way until the row is fixed.
//!
//! A trigger's firing (`date_fired`, `fired_period`, `fired_value`) is read
//! from `usage_trigger_firings`, written only by the flush that fires it
//! ([`super::firing`]); an update through the API never undoes a firing, and
//! a delete takes the trigger's firing with it.
//!
//! Every insert, update and delete here also counts one edit in
//! `tallyd_meta` ([`Conn::triggers_edited`]): an instance whose book is
//! loaded reads that count every few seconds and reads the triggers again
//! only when it moved, not all of them each time (30,000 triggers took a
//! quarter of a CPU second per read).

use std::str::FromStr;

use rust_decimal::Decimal;

use super::{Conn, Error, Param, Result, Value};
use crate::triggers::{CallbackMethod, Recurring, Trigger, TriggerBy};

/// A trigger's columns in the order [`trigger_from_row`] reads: its
/// definition from `usage_triggers` (`t`), then its latest firing from
/// `usage_trigger_firings` (`f`; NULLs if it never fired).
const TRIGGER_SELECT: &str = "SELECT t.sid, t.account_sid, t.friendly_name, t.usage_category, \
     t.trigger_by, t.trigger_value, t.recurring, t.callback_url, t.callback_method, \
     t.date_created, t.date_updated, f.date_fired, f.period, f.value \
     FROM usage_triggers t LEFT JOIN usage_trigger_firings f ON f.sid = t.sid";

/// Which triggers a listing shows (Twilio's `Recurring`, `TriggerBy` and
/// `UsageCategory` filters); `None` shows all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TriggerFilter {
    /// The recurrences shown: Twilio lists `alltime` and once-only triggers
    /// together as "non-recurring".
    pub recurring: Option<Vec<Recurring>>,
    pub trigger_by: Option<TriggerBy>,
    pub usage_category: Option<String>,
}

/// One page of an account's triggers, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TriggerPage {
    pub triggers: Vec<Trigger>,
    /// Whether triggers follow this page.
    pub has_more: bool,
}

fn bad(key: &str, reason: String) -> Error {
    Error::BadRow {
        table: "usage_triggers",
        key: key.to_owned(),
        reason,
    }
}

fn decimal(key: &str, column: &str, text: &str) -> Result<Decimal> {
    Decimal::from_str(text)
        .map_err(|e| bad(key, format!("{column} {text:?} is not a decimal: {e}")))
}

/// Decodes a row of [`TRIGGER_SELECT`].
pub fn trigger_from_row(r: &[Value]) -> Result<Trigger> {
    if r.len() < 14 {
        return Err(bad("?", format!("{} columns read, 14 expected", r.len())));
    }
    let sid = r[0].text();
    let trigger_by = TriggerBy::parse(r[4].text()).ok_or_else(|| {
        bad(
            sid,
            format!("trigger_by {:?} is not count, usage or price", r[4].text()),
        )
    })?;
    let recurring = Recurring::parse(r[6].text()).ok_or_else(|| {
        bad(
            sid,
            format!(
                "recurring {:?} is not daily, monthly, yearly, alltime or empty",
                r[6].text()
            ),
        )
    })?;
    let callback_method = CallbackMethod::parse(r[8].text()).ok_or_else(|| {
        bad(
            sid,
            format!("callback_method {:?} is not GET or POST", r[8].text()),
        )
    })?;
    Ok(Trigger {
        sid: sid.to_owned(),
        account_sid: r[1].text().to_owned(),
        friendly_name: r[2].text().to_owned(),
        usage_category: r[3].text().to_owned(),
        trigger_by,
        trigger_value: decimal(sid, "trigger_value", r[5].text())?,
        recurring,
        callback_url: r[7].text().to_owned(),
        callback_method,
        date_created: r[9].text().to_owned(),
        date_updated: r[10].text().to_owned(),
        date_fired: r[11].opt_text().map(str::to_owned),
        fired_period: r[12].opt_text().map(str::to_owned),
        fired_value: r[13]
            .opt_text()
            .map(|v| decimal(sid, "fired_value", v))
            .transpose()?,
    })
}

fn triggers_of(rows: Vec<Vec<Value>>) -> Result<Vec<Trigger>> {
    rows.iter().map(|r| trigger_from_row(r)).collect()
}

/// The `tallyd_meta` key of the count of edits made to `usage_triggers`.
const EDITS_KEY: &str = "usage_trigger_edits";

impl Conn {
    /// Counts one edit of `usage_triggers` (see the module documentation).
    fn count_trigger_edit(&mut self) -> Result<()> {
        self.execute(
            "INSERT INTO tallyd_meta (key, value) VALUES ($1, '1') ON CONFLICT (key) \
             DO UPDATE SET value = CAST(CAST(tallyd_meta.value AS BIGINT) + 1 AS TEXT)",
            &[Param::Text(EDITS_KEY)],
        )?;
        Ok(())
    }

    /// The count of edits made to `usage_triggers` so far (`None` before
    /// the first): a reader that saw the same count before has seen every
    /// trigger as it is now, except for their firing columns.
    pub fn triggers_edited(&mut self) -> Result<Option<String>> {
        Ok(self
            .query(
                "SELECT value FROM tallyd_meta WHERE key = $1",
                &[Param::Text(EDITS_KEY)],
            )?
            .first()
            .map(|r| r[0].text().to_owned()))
    }

    /// Adds a new trigger (its SID must be new), with its firing if it has one.
    pub fn insert_trigger(&mut self, t: &Trigger) -> Result<()> {
        let value = t.trigger_value.to_string();
        self.execute(
            "INSERT INTO usage_triggers (sid, account_sid, friendly_name, usage_category, \
             trigger_by, trigger_value, recurring, callback_url, callback_method, date_created, \
             date_updated) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            &[
                Param::Text(&t.sid),
                Param::Text(&t.account_sid),
                Param::Text(&t.friendly_name),
                Param::Text(&t.usage_category),
                Param::Text(t.trigger_by.as_str()),
                Param::Text(&value),
                Param::Text(t.recurring.as_str()),
                Param::Text(&t.callback_url),
                Param::Text(t.callback_method.as_str()),
                Param::Text(&t.date_created),
                Param::Text(&t.date_updated),
            ],
        )?;
        if let (Some(date_fired), Some(period), Some(fired)) =
            (&t.date_fired, &t.fired_period, t.fired_value)
        {
            self.execute(
                "INSERT INTO usage_trigger_firings (sid, period, date_fired, value, recurring) \
                 VALUES ($1, $2, $3, $4, $5)",
                &[
                    Param::Text(&t.sid),
                    Param::Text(period),
                    Param::Text(date_fired),
                    Param::Text(&fired.to_string()),
                    Param::Text(t.recurring.as_str()),
                ],
            )?;
        }
        self.count_trigger_edit()
    }

    /// The trigger `sid` of `account_sid` (`None` if it has no such trigger,
    /// also when another account has one of that SID).
    pub fn trigger(&mut self, account_sid: &str, sid: &str) -> Result<Option<Trigger>> {
        let rows = self.query(
            &format!("{TRIGGER_SELECT} WHERE t.account_sid = $1 AND t.sid = $2"),
            &[Param::Text(account_sid), Param::Text(sid)],
        )?;
        rows.first().map(|r| trigger_from_row(r)).transpose()
    }

    /// Up to `limit` of the account's triggers that pass `filter`, from the
    /// `offset`-th on, ordered by (`date_created`, `sid`).
    pub fn triggers_page(
        &mut self,
        account_sid: &str,
        filter: &TriggerFilter,
        offset: u64,
        limit: u32,
    ) -> Result<TriggerPage> {
        // One text for every combination of filters: a filter given as NULL
        // is off. Two recurrences at most are asked for at once.
        let recurring = filter.recurring.as_deref().unwrap_or(&[]);
        let r1 = recurring.first().map(|r| r.as_str());
        let r2 = recurring.get(1).or(recurring.first()).map(|r| r.as_str());
        let mut rows = self.query(
            &format!(
                "{TRIGGER_SELECT} WHERE t.account_sid = $1 \
                 AND (CAST($2 AS TEXT) IS NULL OR t.recurring = $2 OR t.recurring = $3) \
                 AND (CAST($4 AS TEXT) IS NULL OR t.trigger_by = $4) \
                 AND (CAST($5 AS TEXT) IS NULL OR t.usage_category = $5) \
                 ORDER BY t.date_created, t.sid LIMIT $6 OFFSET $7"
            ),
            &[
                Param::Text(account_sid),
                Param::OptText(r1),
                Param::OptText(r2),
                Param::OptText(filter.trigger_by.map(TriggerBy::as_str)),
                Param::OptText(filter.usage_category.as_deref()),
                Param::Int(i64::from(limit) + 1),
                Param::Int(i64::try_from(offset).unwrap_or(i64::MAX)),
            ],
        )?;
        let has_more = rows.len() > limit as usize;
        rows.truncate(limit as usize);
        Ok(TriggerPage {
            triggers: triggers_of(rows)?,
            has_more,
        })
    }

    /// Changes what the API may change of a trigger (`None` keeps a value)
    /// and sets `date_updated`; returns the trigger as it is now, `None` if
    /// the account has no trigger `sid`.
    pub fn update_trigger(
        &mut self,
        account_sid: &str,
        sid: &str,
        callback_url: Option<&str>,
        callback_method: Option<CallbackMethod>,
        friendly_name: Option<&str>,
        date_updated: &str,
    ) -> Result<Option<Trigger>> {
        let n = self.execute(
            "UPDATE usage_triggers SET callback_url = COALESCE($1, callback_url), \
             callback_method = COALESCE($2, callback_method), \
             friendly_name = COALESCE($3, friendly_name), date_updated = $4 \
             WHERE account_sid = $5 AND sid = $6",
            &[
                Param::OptText(callback_url),
                Param::OptText(callback_method.map(CallbackMethod::as_str)),
                Param::OptText(friendly_name),
                Param::Text(date_updated),
                Param::Text(account_sid),
                Param::Text(sid),
            ],
        )?;
        if n == 0 {
            return Ok(None);
        }
        self.count_trigger_edit()?;
        self.trigger(account_sid, sid)
    }

    /// Deletes the account's trigger `sid`; false if it had none.
    pub fn delete_trigger(&mut self, account_sid: &str, sid: &str) -> Result<bool> {
        self.delete_triggers_where(
            "account_sid = $1 AND sid = $2",
            &[Param::Text(account_sid), Param::Text(sid)],
        )
        .map(|n| n == 1)
    }

    /// Deletes every trigger of an account (the account is being deleted);
    /// returns how many.
    pub fn delete_account_triggers(&mut self, account_sid: &str) -> Result<u64> {
        self.delete_triggers_where("account_sid = $1", &[Param::Text(account_sid)])
    }

    /// The triggers first, locked in SID order on PostgreSQL (as a flush
    /// firing them locks them), then their firings: a flush that locked a
    /// trigger first has committed its firing by then and it is deleted; one
    /// that comes second finds the trigger gone and fires nothing. (Firings
    /// first could wait in a cycle with such a flush, or miss the firing it
    /// was writing.)
    fn delete_triggers_where(&mut self, filter: &str, params: &[Param<'_>]) -> Result<u64> {
        let lock = self.row_lock(" ORDER BY sid FOR UPDATE");
        let gone = self.query(
            &format!(
                "DELETE FROM usage_triggers \
                 WHERE sid IN (SELECT sid FROM usage_triggers WHERE {filter}{lock}) RETURNING sid"
            ),
            params,
        )?;
        for chunk in gone.chunks(500) {
            let sids: Vec<Param> = chunk.iter().map(|r| Param::Text(r[0].text())).collect();
            self.execute(
                &format!(
                    "DELETE FROM usage_trigger_firings WHERE sid IN ({})",
                    super::conn::placeholders(1, sids.len())
                ),
                &sids,
            )?;
        }
        if !gone.is_empty() {
            self.count_trigger_edit()?;
        }
        Ok(gone.len() as u64)
    }

    /// Every trigger of every account (to load or reload the book).
    pub fn all_triggers(&mut self) -> Result<Vec<Trigger>> {
        triggers_of(self.query(
            &format!("{TRIGGER_SELECT} ORDER BY t.account_sid, t.date_created, t.sid"),
            &[],
        )?)
    }

    /// How many triggers the account has.
    pub fn count_triggers(&mut self, account_sid: &str) -> Result<u64> {
        let rows = self.query(
            "SELECT CAST(COUNT(*) AS BIGINT) FROM usage_triggers WHERE account_sid = $1",
            &[Param::Text(account_sid)],
        )?;
        Ok(rows.first().map_or(0, |r| r[0].int().max(0) as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let store = Store::open(&url).unwrap();
        store.migrate().unwrap();
        (dir, store)
    }

    fn trigger(account: &str, sid: &str, created: &str) -> Trigger {
        Trigger {
            sid: sid.to_owned(),
            account_sid: account.to_owned(),
            friendly_name: "f".into(),
            usage_category: "calls".into(),
            trigger_by: TriggerBy::Usage,
            trigger_value: Decimal::new(1505, 1),
            recurring: Recurring::Once,
            callback_url: "https://example.com/cb".into(),
            callback_method: CallbackMethod::Post,
            date_created: created.into(),
            date_updated: created.into(),
            date_fired: None,
            fired_period: None,
            fired_value: None,
        }
    }

    #[test]
    fn rows_round_trip_and_pages_follow_creation_order() {
        let (_d, store) = store();
        store
            .with_conn(|c| {
                let mut a = trigger("ACa", "UT2", "2026-01-01T00:00:00Z");
                a.recurring = Recurring::Daily;
                a.fired_value = Some(Decimal::new(3, 0));
                a.fired_period = Some("2026-01-01".into());
                a.date_fired = Some("2026-01-01T01:00:00Z".into());
                c.insert_trigger(&a)?;
                c.insert_trigger(&trigger("ACa", "UT1", "2026-01-01T00:00:00Z"))?;
                c.insert_trigger(&trigger("ACa", "UT0", "2026-01-02T00:00:00Z"))?;
                c.insert_trigger(&trigger("ACb", "UT9", "2025-01-01T00:00:00Z"))?;
                assert_eq!(c.trigger("ACa", "UT2")?, Some(a.clone()));
                assert_eq!(c.trigger("ACb", "UT2")?, None, "another account's");
                assert_eq!(c.count_triggers("ACa")?, 3);
                let all = TriggerFilter::default();
                let p = c.triggers_page("ACa", &all, 0, 2)?;
                let sids: Vec<_> = p.triggers.iter().map(|t| t.sid.as_str()).collect();
                assert_eq!((sids, p.has_more), (vec!["UT1", "UT2"], true));
                let p = c.triggers_page("ACa", &all, 2, 2)?;
                assert_eq!((p.triggers.len(), p.has_more), (1, false));
                let daily = TriggerFilter {
                    recurring: Some(vec![Recurring::Daily]),
                    ..TriggerFilter::default()
                };
                assert_eq!(c.triggers_page("ACa", &daily, 0, 9)?.triggers, vec![a]);
                let once = TriggerFilter {
                    recurring: Some(vec![Recurring::Once, Recurring::AllTime]),
                    trigger_by: Some(TriggerBy::Usage),
                    usage_category: Some("calls".into()),
                };
                assert_eq!(c.triggers_page("ACa", &once, 0, 9)?.triggers.len(), 2);
                let price = TriggerFilter {
                    trigger_by: Some(TriggerBy::Price),
                    ..TriggerFilter::default()
                };
                assert!(c.triggers_page("ACa", &price, 0, 9)?.triggers.is_empty());
                assert_eq!(c.all_triggers()?.len(), 4);
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn updates_keep_firings_and_deletes_are_per_account() {
        let (_d, store) = store();
        store
            .with_conn(|c| {
                let mut t = trigger("ACa", "UT1", "2026-01-01T00:00:00Z");
                t.fired_period = Some("all".into());
                t.date_fired = Some("2026-01-02T00:00:00Z".into());
                t.fired_value = Some(Decimal::new(2, 0));
                c.insert_trigger(&t)?;
                let u = c
                    .update_trigger(
                        "ACa",
                        "UT1",
                        None,
                        Some(CallbackMethod::Get),
                        Some("new"),
                        "2026-02-01T00:00:00Z",
                    )?
                    .unwrap();
                assert_eq!(u.callback_url, t.callback_url);
                assert_eq!(u.callback_method, CallbackMethod::Get);
                assert_eq!(u.friendly_name, "new");
                assert_eq!(u.date_updated, "2026-02-01T00:00:00Z");
                assert_eq!(u.fired_period.as_deref(), Some("all"));
                assert_eq!(c.update_trigger("ACb", "UT1", None, None, None, "x")?, None);
                assert!(!c.delete_trigger("ACb", "UT1")?);
                assert!(c.delete_trigger("ACa", "UT1")?);
                assert!(!c.delete_trigger("ACa", "UT1")?);
                assert_eq!(c.trigger("ACa", "UT1")?, None);
                let firings = c.query("SELECT sid FROM usage_trigger_firings", &[])?;
                assert!(firings.is_empty(), "its firing goes with it");
                Ok(())
            })
            .unwrap();
    }

    /// Needs the server the test command starts (`TALLYD_TEST_POSTGRES_URL`,
    /// default the local one). A flush holding a trigger FOR SHARE and
    /// writing its firing (as `fire_triggers` does) while the trigger is
    /// deleted: the delete waits, and the firing goes with the trigger.
    #[test]
    fn a_trigger_deleted_while_a_flush_fires_it_takes_the_firing_along() {
        use crate::store::tests::{drop_schema, pg_schema};
        let (mut admin, schema, url) = pg_schema("trigger_delete");
        let store = Store::open(&url).unwrap();
        store
            .with_conn(|c| c.insert_trigger(&trigger("ACa", "UT1", "2026-01-01T00:00:00Z")))
            .unwrap();
        let mut flush = store.connect().unwrap();
        flush.batch("BEGIN").unwrap();
        flush
            .query(
                "SELECT sid FROM usage_triggers WHERE sid = 'UT1' FOR SHARE",
                &[],
            )
            .unwrap();
        flush
            .execute(
                "INSERT INTO usage_trigger_firings (sid, period, date_fired, value, recurring) \
                 VALUES ('UT1', 'all', '2026-01-02T00:00:00Z', '151', '')",
                &[],
            )
            .unwrap();
        let deleting = {
            let store = store.clone();
            std::thread::spawn(move || store.with_conn(|c| c.delete_trigger("ACa", "UT1")))
        };
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(!deleting.is_finished(), "the delete waits for the flush");
        flush.batch("COMMIT").unwrap();
        assert!(deleting.join().unwrap().unwrap());
        let left = store
            .with_conn(|c| c.query("SELECT sid FROM usage_trigger_firings", &[]))
            .unwrap();
        assert!(left.is_empty(), "the firing the flush wrote is deleted too");
        drop(store);
        drop(flush);
        drop_schema(&mut admin, &schema);
    }

    #[test]
    fn a_row_that_does_not_decode_is_a_permanent_error() {
        let (_d, store) = store();
        store
            .with_conn(|c| {
                c.insert_trigger(&trigger("ACa", "UT1", "2026-01-01T00:00:00Z"))?;
                c.execute("UPDATE usage_triggers SET trigger_by = 'minutes'", &[])?;
                Ok(())
            })
            .unwrap();
        let e = store.with_conn(|c| c.trigger("ACa", "UT1")).unwrap_err();
        assert!(e.is_permanent(), "{e}");
        assert!(e.to_string().contains("\"minutes\""), "{e}");
        let e = store.with_conn(|c| c.all_triggers()).unwrap_err();
        assert!(e.is_permanent(), "{e}");
        store
            .with_conn(|c| {
                c.execute(
                    "UPDATE usage_triggers SET trigger_by = 'count', trigger_value = 'lots'",
                    &[],
                )
            })
            .unwrap();
        let e = store.with_conn(|c| c.trigger("ACa", "UT1")).unwrap_err();
        assert!(e.to_string().contains("trigger_value \"lots\""), "{e}");
    }
}
