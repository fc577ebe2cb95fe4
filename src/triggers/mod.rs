//! Usage triggers (Twilio's Usage Triggers): the model, the in-memory book the
//! flusher evaluates against, and the evaluation itself.
//!
//! A trigger watches one account's value of one category — `count`, `usage`
//! (as the UsageRecord shows it: minutes for calls, segments for messages) or
//! `price` — in the current UTC period of its recurrence (`daily`, `monthly`,
//! `yearly`, `alltime`, or once). It fires when that value reaches its
//! `trigger_value`: once per period when recurring, once ever when not.
//!
//! Evaluation happens in the flush transaction ([`crate::store::flush`]): the
//! flush already reads and rewrites every page its CDRs touched, so the new
//! values of a partition's accounts are at hand without any further read. A
//! crossing marks the trigger fired for that period (a conditional update:
//! a period is fired at most once whatever the in-memory book believed) and
//! writes its callback into the webhook outbox, in the same transaction as the
//! offsets of the CDRs that crossed it: a crash before the commit replays the
//! CDRs and fires again once; after it, the replay starts past them.

pub mod callback;
pub mod watch;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;
use rust_decimal::Decimal;

use crate::calendar::{Day, Period};
use crate::category::Category;
use crate::counters::{Leaves, Tally};
use watch::Watches;

/// What a trigger's value measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TriggerBy {
    Count,
    Usage,
    Price,
}

impl TriggerBy {
    pub fn as_str(self) -> &'static str {
        match self {
            TriggerBy::Count => "count",
            TriggerBy::Usage => "usage",
            TriggerBy::Price => "price",
        }
    }
    pub fn parse(s: &str) -> Option<TriggerBy> {
        Some(match s {
            "count" => TriggerBy::Count,
            "usage" => TriggerBy::Usage,
            "price" => TriggerBy::Price,
            _ => return None,
        })
    }
}

/// How often a trigger can fire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Recurring {
    Daily,
    Monthly,
    Yearly,
    AllTime,
    /// Fires once ever (Twilio's empty `recurring`).
    Once,
}

impl Recurring {
    /// Twilio's `recurring` value (`""` for once).
    pub fn as_str(self) -> &'static str {
        match self {
            Recurring::Daily => "daily",
            Recurring::Monthly => "monthly",
            Recurring::Yearly => "yearly",
            Recurring::AllTime => "alltime",
            Recurring::Once => "",
        }
    }
    pub fn parse(s: &str) -> Option<Recurring> {
        Some(match s {
            "daily" => Recurring::Daily,
            "monthly" => Recurring::Monthly,
            "yearly" => Recurring::Yearly,
            "alltime" => Recurring::AllTime,
            "" => Recurring::Once,
            _ => return None,
        })
    }

    /// The period of this recurrence that `day` lies in.
    pub fn period_of(self, day: Day) -> Period {
        match self {
            Recurring::Daily => Period::Day(day),
            Recurring::Monthly => Period::Month(day.month()),
            Recurring::Yearly => Period::Year(day.year()),
            Recurring::AllTime | Recurring::Once => Period::AllTime,
        }
    }

    /// Whether a stored row of `period` is one this recurrence is measured on.
    pub fn measures(self, period: Period) -> bool {
        matches!(
            (self, period),
            (Recurring::Daily, Period::Day(_))
                | (Recurring::Monthly, Period::Month(_))
                | (Recurring::Yearly, Period::Year(_))
                | (Recurring::AllTime | Recurring::Once, Period::AllTime)
        )
    }
}

/// The key a firing is recorded under: `YYYY-MM-DD`, `YYYY-MM`, `YYYY` or
/// `all`. Keys of one recurrence sort in time order, so "fired for a later
/// period" is a string comparison in SQL.
pub fn period_key(p: Period) -> String {
    match p {
        Period::Day(d) => d.to_string(),
        Period::Month(m) => m.to_string(),
        Period::Year(y) => format!("{y:04}"),
        Period::AllTime => "all".to_owned(),
    }
}

/// The period a key of [`period_key`] names for `recurring` (`None` if it
/// does not parse).
pub fn parse_period_key(recurring: Recurring, key: &str) -> Option<Period> {
    Some(match recurring {
        Recurring::Daily => Period::Day(Day::parse(key)?),
        Recurring::Monthly => Period::Month(Day::parse(&format!("{key}-01"))?.month()),
        Recurring::Yearly => Period::Year(key.parse().ok()?),
        Recurring::AllTime | Recurring::Once => Period::AllTime,
    })
}

/// `GET` or `POST`, the method a callback is sent with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallbackMethod {
    Get,
    Post,
}

impl CallbackMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            CallbackMethod::Get => "GET",
            CallbackMethod::Post => "POST",
        }
    }
    /// Case-insensitive, as Twilio accepts it.
    pub fn parse(s: &str) -> Option<CallbackMethod> {
        if s.eq_ignore_ascii_case("GET") {
            Some(CallbackMethod::Get)
        } else if s.eq_ignore_ascii_case("POST") {
            Some(CallbackMethod::Post)
        } else {
            None
        }
    }
}

/// One usage trigger, as stored (`usage_triggers`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trigger {
    /// `UT` + 32 hex digits.
    pub sid: String,
    pub account_sid: String,
    pub friendly_name: String,
    /// The Twilio category name (`calls`, `sms-outbound`, `totalprice`, …;
    /// Twilio's categories tallyd does not count are accepted and never fire).
    pub usage_category: String,
    pub trigger_by: TriggerBy,
    /// Absolute (a relative `+N` was resolved when the trigger was created).
    pub trigger_value: Decimal,
    pub recurring: Recurring,
    pub callback_url: String,
    pub callback_method: CallbackMethod,
    /// RFC 3339 UTC.
    pub date_created: String,
    pub date_updated: String,
    /// RFC 3339 UTC of the last firing.
    pub date_fired: Option<String>,
    /// [`period_key`] of the period it last fired for.
    pub fired_period: Option<String>,
    /// The value that made it fire last (Twilio's `current_value` between
    /// evaluations).
    pub fired_value: Option<Decimal>,
}

impl Trigger {
    /// The counted category, `None` for one of Twilio's tallyd has no usage in.
    pub fn category(&self) -> Option<Category> {
        self.usage_category.parse().ok()
    }

    /// The day the trigger was created (periods ending before it never fire).
    pub fn created_day(&self) -> Day {
        crate::calendar::parse_rfc3339(&self.date_created)
            .map(Day::from_unix)
            .unwrap_or(Day(0))
    }

    /// Whether it may still fire for `period` (not yet fired for it or a later
    /// one; once-only triggers never again after their first firing).
    pub fn may_fire_for(&self, period: Period) -> bool {
        match (&self.fired_period, self.recurring) {
            (None, _) => true,
            (Some(_), Recurring::Once | Recurring::AllTime) => false,
            (Some(f), _) => period_key(period).as_str() > f.as_str(),
        }
    }
}

#[cfg(test)]
impl Trigger {
    /// A trigger for tests: account `AC…01`, SID `UT…01`, made 2026-01-01,
    /// callback `POST https://example.com/hook`, never fired.
    pub fn example(category: &str, by: TriggerBy, value: Decimal, recurring: Recurring) -> Trigger {
        Trigger {
            sid: "UT00000000000000000000000000000001".into(),
            account_sid: "AC00000000000000000000000000000001".into(),
            friendly_name: String::new(),
            usage_category: category.into(),
            trigger_by: by,
            trigger_value: value,
            recurring,
            callback_url: "https://example.com/hook".into(),
            callback_method: CallbackMethod::Post,
            date_created: "2026-01-01T00:00:00Z".into(),
            date_updated: "2026-01-01T00:00:00Z".into(),
            date_fired: None,
            fired_period: None,
            fired_value: None,
        }
    }
}

/// The value of `category` measured `by` in a stored row: count, usage as
/// the UsageRecord shows it (calls in minutes, exact; messages in segments)
/// or price in the currency unit (10⁻⁵ exact).
pub fn value_of(leaves: &Leaves, category: Category, by: TriggerBy) -> Decimal {
    let t = leaves.get(category);
    match by {
        TriggerBy::Count => Decimal::from(t.count),
        TriggerBy::Usage => match category.unit() {
            crate::category::Unit::Calls => Decimal::from(t.usage) / Decimal::from(60),
            crate::category::Unit::Price => Decimal::new(t.price, 5),
            crate::category::Unit::Messages => Decimal::from(t.usage),
        },
        TriggerBy::Price => Decimal::new(t.price, 5),
    }
}

/// The last day of `p` (`AllTime` never ends).
fn last_day(p: Period) -> Day {
    match p {
        Period::Day(d) => d,
        Period::Month(m) => m.last_day(),
        Period::Year(y) => Day::from_ymd(y, 12, 31),
        Period::AllTime => Day(i32::MAX),
    }
}

/// A trigger whose value reached its `trigger_value` in a period a flush
/// touched; it fires if the store agrees it has not fired for that period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crossing {
    /// The position of the trigger in the slice [`crossings`] was given.
    pub trigger: usize,
    pub sid: String,
    pub account_sid: String,
    pub period: Period,
    pub value: Decimal,
}

/// The crossings among `triggers` (all of one account) given the periods a
/// flush added usage to and each one's value after it: `touched` yields
/// (period, stored row after the flush). Periods ending before a trigger was
/// created, and periods it already fired for, are skipped; a trigger that
/// crosses in several touched periods (CDRs of two days in one flush) crosses
/// in each, oldest first.
pub fn crossings<T: std::borrow::Borrow<Trigger>>(
    triggers: &[T],
    touched: &[(Period, Leaves)],
) -> Vec<Crossing> {
    let mut out = Vec::new();
    for (i, t) in triggers.iter().enumerate() {
        let t: &Trigger = t.borrow();
        let Some(category) = t.category() else {
            continue;
        };
        let created = t.created_day();
        let mut periods: Vec<&(Period, Leaves)> = touched
            .iter()
            .filter(|(p, _)| t.recurring.measures(*p) && last_day(*p) >= created)
            .collect();
        periods.sort_by_key(|(p, _)| *p);
        let mut fired: Option<Period> = None;
        for (period, leaves) in periods {
            let once = matches!(t.recurring, Recurring::Once | Recurring::AllTime);
            if !t.may_fire_for(*period) || (once && fired.is_some()) {
                continue;
            }
            let value = value_of(leaves, category, t.trigger_by);
            if value >= t.trigger_value {
                fired = Some(*period);
                out.push(Crossing {
                    trigger: i,
                    sid: t.sid.clone(),
                    account_sid: t.account_sid.clone(),
                    period: *period,
                    value,
                });
            }
        }
    }
    out
}

/// How often the book looks whether triggers were edited in the store
/// (through another instance), and reloads them if so.
pub const RELOAD_EVERY: std::time::Duration = std::time::Duration::from_secs(5);
/// How often the book is reloaded whether or not an edit was counted: the
/// firing columns that other instances' flushes write are not counted as
/// edits (the store decides a firing; the book's copy only spares work), nor
/// are the edits of a tallyd from before the count.
pub const FULL_RELOAD_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Every trigger by account, in memory, so that the flusher knows which of a
/// cut's accounts to evaluate without reading the store, and the consumers
/// know which CDRs may cross one ([`watch`]). Loaded at start, changed by
/// this instance's API as it changes the store, and reloaded when the store
/// counted edits made through other instances ([`Reloads`]).
#[derive(Debug, Clone, Default)]
pub struct TriggerBook {
    inner: Arc<RwLock<Inner>>,
    /// Bumped at every change, so a consumer takes a new [`Watches`] only
    /// when there is one.
    version: Arc<AtomicU64>,
    /// Bumped at every trigger this instance's API created, changed or
    /// deleted: a reload read before such a change must not undo it.
    edits: Arc<AtomicU64>,
    /// The thread [`Self::record_flush_soon`] hands flushes to, started at
    /// its first use; it ends when the last clone of the book is dropped.
    recorder: Arc<std::sync::OnceLock<std::sync::mpsc::SyncSender<FlushRecord>>>,
}

/// Flushes [`TriggerBook::record_flush_soon`] queues for the book's thread
/// at most.
const RECORDS_QUEUED: usize = 16;

/// What one committed flush did to the book ([`TriggerBook::record_flush`]).
type FlushRecord = (
    Vec<(Arc<Trigger>, Period, Tally)>,
    Vec<crate::store::firing::Firing>,
);

/// What the book's last reload from the store saw
/// ([`TriggerBook::reload_if_edited`]).
#[derive(Debug, Default)]
pub struct Reloads {
    /// The store's count of trigger edits then.
    edits: Option<String>,
    /// When (`None`: never).
    at: Option<std::time::Instant>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Shared with the flushes that evaluate them (a flush takes its
    /// accounts' triggers without copying them).
    by_account: HashMap<String, Vec<Arc<Trigger>>>,
    /// By trigger SID: the latest period a flush wrote, and its category's
    /// tally there.
    known: HashMap<String, (Period, Tally)>,
    /// Built on demand from the two above.
    watches: Option<Arc<Watches>>,
}

impl Inner {
    fn changed(&mut self, version: &AtomicU64) {
        self.watches = None;
        version.fetch_add(1, Ordering::Release);
    }
}

impl TriggerBook {
    pub fn new() -> TriggerBook {
        TriggerBook::default()
    }

    /// Replaces every trigger with `all` (a load from the store).
    pub fn replace_all(&self, all: Vec<Trigger>) {
        let mut inner = self.inner.write();
        Self::replace(&mut inner, all, &self.version);
    }

    fn replace(inner: &mut Inner, all: Vec<Trigger>, version: &AtomicU64) {
        let mut by_account: HashMap<String, Vec<Arc<Trigger>>> = HashMap::new();
        for t in all {
            by_account
                .entry(t.account_sid.clone())
                .or_default()
                .push(Arc::new(t));
        }
        if inner.by_account != by_account {
            inner.by_account = by_account;
            inner.changed(version);
        }
    }

    /// The count of this instance's edits so far, taken before a reload
    /// reads the store.
    pub fn edits(&self) -> u64 {
        self.edits.load(Ordering::Acquire)
    }

    /// Replaces every trigger with `all`, read from the store after
    /// [`Self::edits`] returned `edits`, unless this instance edited one
    /// since (then the next reload does it). False if skipped.
    pub fn reload(&self, all: Vec<Trigger>, edits: u64) -> bool {
        let mut inner = self.inner.write();
        if self.edits.load(Ordering::Acquire) != edits {
            return false;
        }
        Self::replace(&mut inner, all, &self.version);
        true
    }

    /// Adds or replaces one trigger (by SID).
    pub fn upsert(&self, t: Trigger) {
        let mut inner = self.inner.write();
        self.edits.fetch_add(1, Ordering::AcqRel);
        let list = inner.by_account.entry(t.account_sid.clone()).or_default();
        match list.iter_mut().find(|x| x.sid == t.sid) {
            Some(slot) => *slot = Arc::new(t),
            None => list.push(Arc::new(t)),
        }
        inner.changed(&self.version);
    }

    /// Removes one trigger.
    pub fn remove(&self, account_sid: &str, sid: &str) {
        let mut inner = self.inner.write();
        self.edits.fetch_add(1, Ordering::AcqRel);
        if let Some(list) = inner.by_account.get_mut(account_sid) {
            list.retain(|t| t.sid != sid);
            if list.is_empty() {
                inner.by_account.remove(account_sid);
            }
        }
        inner.known.remove(sid);
        inner.changed(&self.version);
    }

    /// Removes every trigger of an account (deleted).
    pub fn remove_account(&self, account_sid: &str) {
        let mut inner = self.inner.write();
        self.edits.fetch_add(1, Ordering::AcqRel);
        if let Some(list) = inner.by_account.remove(account_sid) {
            for t in list {
                inner.known.remove(&t.sid);
            }
        }
        inner.changed(&self.version);
    }

    /// Records what a committed flush did: the values it left in the store
    /// (per trigger, the latest period it wrote and the category's tally
    /// there) and the triggers it fired — one change of the book, so the
    /// consumers take new watches once per flush, not per firing. The
    /// watches are updated in place for the flush's triggers (a flush comes
    /// every fraction of a second; rebuilding every trigger's watch each time
    /// took a core's worth of the CPU at 10k accounts with 3 triggers each).
    pub fn record_flush(
        &self,
        observed: &[(Arc<Trigger>, Period, Tally)],
        fired: &[crate::store::firing::Firing],
    ) {
        Self::record(&self.inner, &self.version, observed, fired);
    }

    /// [`Self::record_flush`] on the book's own thread, so that the flusher
    /// goes on to its next partition meanwhile (at a drain's end, updating
    /// 30,000 triggers' watches after each partition took a tenth of its
    /// write). In order: a flush recorded after another is applied after it.
    /// The book only spares work and tells the consumers when to flush
    /// early; the store decides every firing, so a record that lands a
    /// moment later changes nothing that is stored.
    pub fn record_flush_soon(
        &self,
        observed: Vec<(Arc<Trigger>, Period, Tally)>,
        fired: Vec<crate::store::firing::Firing>,
    ) {
        if observed.is_empty() && fired.is_empty() {
            return;
        }
        let sender = self.recorder.get_or_init(|| {
            // Bounded: a flusher ahead of the book waits for it rather
            // than queueing stale records without end.
            let (tx, rx) = std::sync::mpsc::sync_channel::<FlushRecord>(RECORDS_QUEUED);
            let (inner, version) = (self.inner.clone(), self.version.clone());
            let spawned = std::thread::Builder::new()
                .name("tallyd-triggers".into())
                .spawn(move || {
                    for (observed, fired) in rx {
                        Self::record(&inner, &version, &observed, &fired);
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "could not start the usage trigger book's thread; flushes record in line");
            }
            tx
        });
        if let Err(std::sync::mpsc::SendError((observed, fired))) = sender.send((observed, fired)) {
            Self::record(&self.inner, &self.version, &observed, &fired);
        }
    }

    fn record(
        inner: &RwLock<Inner>,
        version: &AtomicU64,
        observed: &[(Arc<Trigger>, Period, Tally)],
        fired: &[crate::store::firing::Firing],
    ) {
        if observed.is_empty() && fired.is_empty() {
            return;
        }
        let mut inner = inner.write();
        let Inner {
            by_account,
            known,
            watches,
        } = &mut *inner;
        let mut watches = watches.as_mut().map(Arc::make_mut);
        for (t, period, tally) in observed {
            let newer = match known.get_mut(&t.sid) {
                Some((p, _)) if *p > *period => false,
                Some(slot) => {
                    *slot = (*period, *tally);
                    true
                }
                // Not for a trigger deleted since that flush (its record
                // was queued): it would stay for good.
                None if !by_account
                    .get(&t.account_sid)
                    .is_some_and(|l| l.iter().any(|x| x.sid == t.sid)) =>
                {
                    false
                }
                None => {
                    known.insert(t.sid.clone(), (*period, *tally));
                    true
                }
            };
            if let (true, Some(w)) = (newer, watches.as_deref_mut()) {
                w.observe(t, *period, *tally);
            }
        }
        for f in fired {
            if let Some(t) = by_account
                .get_mut(&f.account_sid)
                .and_then(|l| l.iter_mut().find(|t| t.sid == f.sid))
                // A reload read after a later firing is not undone (period
                // keys sort in time order).
                .filter(|t| t.fired_period.as_deref() < Some(f.period.as_str()))
            {
                // A flush holding the old one keeps it.
                let t = Arc::make_mut(t);
                t.fired_period = Some(f.period.clone());
                t.date_fired = Some(f.date_fired.clone());
                t.fired_value = Some(f.value);
                if let Some(w) = watches.as_deref_mut() {
                    w.fired(t);
                }
            }
        }
        version.fetch_add(1, Ordering::Release);
    }

    /// The current [`Watches`] if the book changed since `seen` (updated).
    pub fn watches_since(&self, seen: &mut u64) -> Option<Arc<Watches>> {
        let now = self.version.load(Ordering::Acquire);
        if now == *seen {
            return None;
        }
        *seen = now;
        let inner = self.inner.upgradable_read();
        if let Some(w) = &inner.watches {
            return Some(w.clone());
        }
        let mut inner = parking_lot::RwLockUpgradableReadGuard::upgrade(inner);
        let built = Arc::new(Watches::build(
            inner.by_account.values().flatten().map(|t| &**t),
            &inner.known,
        ));
        inner.watches = Some(built.clone());
        Some(built)
    }

    /// Every [`RELOAD_EVERY`] until `shutdown`, reloads the triggers from
    /// `store` if they were edited there ([`Self::reload_if_edited`]):
    /// created, changed or deleted through another instance (this
    /// instance's own edits change the book at once).
    pub async fn keep_loaded(
        self,
        store: crate::store::Store,
        shutdown: Arc<std::sync::atomic::AtomicBool>,
    ) {
        let reloads = Arc::new(parking_lot::Mutex::new(Reloads::default()));
        loop {
            tokio::time::sleep(RELOAD_EVERY).await;
            if shutdown.load(Ordering::Relaxed) {
                return;
            }
            let (book, reloads) = (self.clone(), reloads.clone());
            let now = std::time::Instant::now();
            let done = store
                .run(move |c| book.reload_if_edited(c, &mut reloads.lock(), now))
                .await;
            if let Err(e) = done {
                tracing::warn!(error = %e, "could not reload the usage triggers; trying again")
            }
        }
    }

    /// Reloads every trigger from `c` if the store counted an edit since the
    /// last reload, or that was [`FULL_RELOAD_EVERY`] ago or more (`now`
    /// being now); true if it did.
    pub fn reload_if_edited(
        &self,
        c: &mut crate::store::Conn,
        reloads: &mut Reloads,
        now: std::time::Instant,
    ) -> crate::store::Result<bool> {
        // The count first: an edit between the two reads is read again next
        // time.
        let counted = c.triggers_edited()?;
        let fresh = reloads
            .at
            .is_some_and(|at| now.saturating_duration_since(at) < FULL_RELOAD_EVERY);
        if fresh && reloads.edits == counted {
            return Ok(false);
        }
        let edits = self.edits();
        let all = c.all_triggers()?;
        let n = all.len();
        if !self.reload(all, edits) {
            return Ok(false);
        }
        tracing::debug!(triggers = n, "usage triggers reloaded");
        *reloads = Reloads {
            edits: counted,
            at: Some(now),
        };
        Ok(true)
    }

    /// The triggers of `account_sid` (empty if none), shared, not copied.
    pub fn of(&self, account_sid: &str) -> Vec<Arc<Trigger>> {
        self.inner
            .read()
            .by_account
            .get(account_sid)
            .cloned()
            .unwrap_or_default()
    }

    pub fn has(&self, account_sid: &str) -> bool {
        self.inner.read().by_account.contains_key(account_sid)
    }

    pub fn is_empty(&self) -> bool {
        self.inner.read().by_account.is_empty()
    }

    /// Number of triggers.
    pub fn len(&self) -> usize {
        self.inner.read().by_account.values().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counters::Tally;
    use rust_decimal_macros::dec;

    fn trigger(category: &str, by: TriggerBy, value: Decimal, recurring: Recurring) -> Trigger {
        Trigger::example(category, by, value, recurring)
    }

    fn leaves(leaf: Category, count: u64, usage: u64, price: i64) -> Leaves {
        let mut l = Leaves::default();
        l.add_leaf(
            leaf,
            Tally {
                count,
                usage,
                price,
            },
        );
        l
    }

    fn day(d: u32) -> Day {
        Day::from_ymd(2026, 3, d)
    }

    /// The store is read again after an edit counted there (made through
    /// any instance), and otherwise only after [`FULL_RELOAD_EVERY`].
    #[test]
    fn a_reload_reads_the_store_after_an_edit_or_a_while() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            crate::store::Store::open(&format!("sqlite://{}/t.db", dir.path().display())).unwrap();
        let book = TriggerBook::new();
        let mut reloads = Reloads::default();
        let t0 = std::time::Instant::now();
        let mut reload = |secs: u64| {
            let now = t0 + std::time::Duration::from_secs(secs);
            store
                .with_conn(|c| book.reload_if_edited(c, &mut reloads, now))
                .unwrap()
        };
        let a = trigger("sms", TriggerBy::Count, dec!(5), Recurring::Daily);
        let account = a.account_sid.clone();
        store.with_conn(|c| c.insert_trigger(&a)).unwrap();
        assert!(reload(0), "the first look reads");
        assert_eq!(book.len(), 1);
        assert!(!reload(5), "nothing edited");
        // A firing is no edit: read with the next full reload.
        store
            .with_conn(|c| {
                c.execute(
                    "INSERT INTO usage_trigger_firings (sid, period, date_fired, value, recurring) \
                     VALUES ($1, '2026-03-01', '2026-03-01T10:00:00Z', '5', 'daily')",
                    &[crate::store::Param::Text(&a.sid)],
                )
            })
            .unwrap();
        assert!(!reload(10));
        assert_eq!(book.of(&account)[0].fired_period, None);
        assert!(reload(FULL_RELOAD_EVERY.as_secs()));
        assert_eq!(
            book.of(&account)[0].fired_period.as_deref(),
            Some("2026-03-01")
        );
        // Every kind of edit is read at the next look.
        let mut b = a.clone();
        b.sid = "UT2".into();
        let look = FULL_RELOAD_EVERY.as_secs() + 5;
        store.with_conn(|c| c.insert_trigger(&b)).unwrap();
        assert!(reload(look));
        assert_eq!(book.len(), 2);
        store
            .with_conn(|c| {
                c.update_trigger(
                    &account,
                    "UT2",
                    Some("https://example.com/b"),
                    None,
                    None,
                    "2026-03-02T00:00:00Z",
                )
            })
            .unwrap();
        assert!(reload(look + 5));
        assert!(book
            .of(&account)
            .iter()
            .any(|t| t.callback_url == "https://example.com/b"));
        store
            .with_conn(|c| c.delete_trigger(&account, "UT2"))
            .unwrap();
        assert!(reload(look + 10));
        assert_eq!(book.len(), 1);
        store
            .with_conn(|c| crate::api::accounts::delete(c, &account))
            .unwrap();
        assert!(reload(look + 15));
        assert!(book.is_empty());
        assert!(!reload(look + 20));
    }

    #[test]
    fn a_rollup_crosses_by_count_usage_and_price() {
        let row = leaves(Category::CallsOutbound, 3, 150, 450_000);
        let touched = [(Period::Day(day(2)), row)];
        // calls rolls up calls-outbound: 3 calls, 2.5 minutes, $4.50.
        for (by, at, below) in [
            (TriggerBy::Count, dec!(3), dec!(4)),
            (TriggerBy::Usage, dec!(2.5), dec!(2.51)),
            (TriggerBy::Price, dec!(4.5), dec!(4.50001)),
        ] {
            let t = trigger("calls", by, at, Recurring::Daily);
            assert_eq!(crossings(&[&t], &touched).len(), 1, "{by:?} at {at}");
            let t = trigger("calls", by, below, Recurring::Daily);
            assert!(
                crossings(&[&t], &touched).is_empty(),
                "{by:?} below {below}"
            );
        }
        // A sibling category is not affected.
        let t = trigger("sms", TriggerBy::Count, dec!(1), Recurring::Daily);
        assert!(crossings(&[&t], &touched).is_empty());
        // Twilio's categories tallyd does not count never fire.
        let t = trigger("recordings", TriggerBy::Count, dec!(0), Recurring::Daily);
        assert!(crossings(&[&t], &touched).is_empty());
    }

    #[test]
    fn once_per_period_and_once_ever() {
        let row = leaves(Category::SmsOutboundLongcode, 5, 5, 0);
        let touched = [
            (Period::Day(day(3)), row),
            (Period::Day(day(2)), row),
            (Period::Month(day(2).month()), row),
            (Period::AllTime, row),
        ];
        let mut t = trigger("sms", TriggerBy::Count, dec!(5), Recurring::Daily);
        let c = crossings(&[&t], &touched);
        assert_eq!(
            c.iter().map(|c| c.period).collect::<Vec<_>>(),
            [Period::Day(day(2)), Period::Day(day(3))],
            "both days, oldest first; only day rows"
        );
        t.fired_period = Some(period_key(Period::Day(day(2))));
        let c = crossings(&[&t], &touched);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].period, Period::Day(day(3)));
        t.fired_period = Some(period_key(Period::Day(day(3))));
        assert!(crossings(&[&t], &touched).is_empty());

        let mut once = trigger("sms", TriggerBy::Count, dec!(5), Recurring::Once);
        assert_eq!(crossings(&[&once], &touched).len(), 1);
        once.fired_period = Some("all".into());
        assert!(crossings(&[&once], &touched).is_empty());
    }

    #[test]
    fn periods_over_before_the_trigger_was_made_never_fire() {
        let row = leaves(Category::SmsOutboundLongcode, 5, 5, 0);
        let mut t = trigger("sms", TriggerBy::Count, dec!(1), Recurring::Daily);
        t.date_created = "2026-03-03T10:00:00Z".into();
        let touched = [(Period::Day(day(2)), row), (Period::Day(day(3)), row)];
        let c = crossings(&[&t], &touched);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].period, Period::Day(day(3)));
    }

    #[test]
    fn a_reload_read_before_an_edit_does_not_undo_it() {
        let book = TriggerBook::new();
        let t = trigger("sms", TriggerBy::Count, dec!(5), Recurring::Daily);
        let edits = book.edits();
        // The API creates a trigger after the reload read the store…
        book.upsert(t.clone());
        // …so the reload's (older) view is not applied.
        assert!(!book.reload(Vec::new(), edits));
        assert_eq!(book.of(&t.account_sid), [Arc::new(t.clone())]);
        // A reload read after it is.
        let edits = book.edits();
        assert!(book.reload(Vec::new(), edits));
        assert!(book.is_empty());
        book.upsert(t.clone());
        book.remove_account(&t.account_sid);
        assert!(book.is_empty());
    }

    /// The watches a flush updates in place are those a rebuild from the
    /// book would make.
    #[test]
    fn watches_updated_by_a_flush_equal_a_rebuild() {
        let book = TriggerBook::new();
        let sms = Arc::new(trigger("sms", TriggerBy::Count, dec!(5), Recurring::Daily));
        let calls = Arc::new(Trigger {
            sid: "UT00000000000000000000000000000002".into(),
            ..trigger("calls", TriggerBy::Usage, dec!(2), Recurring::Daily)
        });
        book.replace_all(vec![(*sms).clone(), (*calls).clone()]);
        let mut seen = u64::MAX;
        let before = book.watches_since(&mut seen).unwrap();
        let tally = Tally {
            count: 3,
            usage: 180,
            price: 0,
        };
        let firing = crate::store::firing::Firing {
            account_sid: calls.account_sid.clone(),
            sid: calls.sid.clone(),
            period: "2026-03-02".into(),
            date_fired: "2026-03-02T10:00:00Z".into(),
            value: dec!(3),
        };
        book.record_flush(
            &[
                (sms.clone(), Period::Day(day(2)), tally),
                (calls.clone(), Period::Day(day(2)), tally),
            ],
            std::slice::from_ref(&firing),
        );
        let after = book.watches_since(&mut seen).expect("changed");
        assert_ne!(after, before);
        let inner = book.inner.read();
        let rebuilt = Watches::build(
            inner.by_account.values().flatten().map(|t| &**t),
            &inner.known,
        );
        assert_eq!(*after, rebuilt);
        // An older period's value does not replace a newer one's.
        drop(inner);
        book.record_flush(&[(sms.clone(), Period::Day(day(1)), Tally::default())], &[]);
        let again = book.watches_since(&mut seen).expect("changed");
        assert_eq!(*again, rebuilt);
    }

    /// Records reach the book's thread after the commit, so a later change
    /// may be there first: a trigger deleted since is not brought back into
    /// the known values, and a firing for an earlier period than the book
    /// has (a reload read after a later one) does not undo it. The
    /// recorded flushes arrive in order.
    #[test]
    fn a_late_record_undoes_no_delete_and_no_later_firing() {
        let book = TriggerBook::new();
        let t = Arc::new(trigger("sms", TriggerBy::Count, dec!(5), Recurring::Daily));
        book.replace_all(vec![(*t).clone()]);
        let firing = |d: u32| crate::store::firing::Firing {
            account_sid: t.account_sid.clone(),
            sid: t.sid.clone(),
            period: period_key(Period::Day(day(d))),
            date_fired: "2026-03-02T10:00:00Z".into(),
            value: dec!(5),
        };
        let fired = || book.of(&t.account_sid)[0].fired_period.clone();
        let recorded = book.version.load(Ordering::Acquire);
        book.record_flush_soon(Vec::new(), vec![firing(2)]);
        book.record_flush_soon(Vec::new(), vec![firing(1)]);
        // Each record is one change of the book: both are in once it
        // changed twice.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while book.version.load(Ordering::Acquire) < recorded + 2 {
            assert!(std::time::Instant::now() < deadline, "not recorded");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(fired().as_deref(), Some("2026-03-02"));

        book.remove(&t.account_sid, &t.sid);
        book.record_flush(&[(t.clone(), Period::Day(day(3)), Tally::default())], &[]);
        assert!(!book.inner.read().known.contains_key(&t.sid));
    }

    #[test]
    fn period_keys_sort_in_time_order() {
        assert_eq!(period_key(Period::Day(day(2))), "2026-03-02");
        assert_eq!(period_key(Period::Month(day(2).month())), "2026-03");
        assert_eq!(period_key(Period::Year(2026)), "2026");
        assert!(period_key(Period::Day(day(9))) < period_key(Period::Day(day(10))));
    }
}
