//! Early flushes for crossings: what the consumer checks each CDR of an
//! account with triggers against, so that a crossing is flushed (and its
//! callback sent) within a fraction of a second instead of at the next
//! `flush.interval_ms`.
//!
//! The flush stays the only place a trigger fires ([`crate::store::firing`]);
//! this only decides *when* to flush. For each trigger the flusher reports the
//! value it left in the store for the latest period it touched; the consumer
//! adds up what each trigger's category gained since its last cut and asks
//! for a flush as soon as stored value + gained reaches the trigger value.
//! A trigger never seen by a flush since start counts as already at its
//! value (the first CDR asks for a flush that tells its stored value). A
//! check that misses (between a cut and its commit, the stored value is one
//! flush old) only delays the firing to the next flush; it never loses it.

use std::collections::HashMap;

use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;
use rustc_hash::FxHashMap;

use super::{parse_period_key, Recurring, Trigger, TriggerBy};
use crate::calendar::Period;
use crate::category::{Category, Unit};
use crate::cdr::{AccountSid, Cdr};
use crate::counters::Tally;
use crate::rating::Charge;

/// One trigger as the consumer checks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watch {
    sid: std::sync::Arc<str>,
    /// Leaves of the trigger's category ([`Category::leaf_set`]).
    leaf_set: u16,
    /// The measure, in the units the store keeps (events, seconds or
    /// segments, 10⁻⁵ of the currency).
    measure: Measure,
    recurring: Recurring,
    /// The trigger value in those units, rounded up.
    threshold: i64,
    /// The period it last fired for (it does not fire again for it or an
    /// earlier one; once-only triggers never again).
    fired: Option<Period>,
    /// The latest period a flush told the stored value of, and that value.
    known: Option<(Period, i64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Measure {
    Count,
    Usage,
    Price,
}

impl Measure {
    fn of(by: TriggerBy, category: Category) -> Measure {
        match (by, category.unit()) {
            (TriggerBy::Count, _) => Measure::Count,
            (TriggerBy::Price, _) | (TriggerBy::Usage, Unit::Price) => Measure::Price,
            (TriggerBy::Usage, _) => Measure::Usage,
        }
    }

    /// Units of this measure per unit of a trigger value.
    fn scale(self, category: Category) -> i64 {
        match (self, category.unit()) {
            (Measure::Price, _) => 100_000,
            (Measure::Usage, Unit::Calls) => 60,
            _ => 1,
        }
    }

    fn of_tally(self, t: Tally) -> i64 {
        match self {
            Measure::Count => t.count as i64,
            Measure::Usage => t.usage as i64,
            Measure::Price => t.price,
        }
    }

    fn of_charge(self, c: Charge) -> i64 {
        match self {
            Measure::Count => 1,
            Measure::Usage => c.usage as i64,
            Measure::Price => c.price,
        }
    }
}

impl Watch {
    /// The watch of a trigger; `None` for one that can never fire (a category
    /// tallyd does not count) or has fired for good.
    pub fn of(t: &Trigger, known: Option<(Period, Tally)>) -> Option<Watch> {
        let category = t.category()?;
        let measure = Measure::of(t.trigger_by, category);
        let fired = t
            .fired_period
            .as_deref()
            .map(|key| parse_period_key(t.recurring, key));
        if fired.is_some() && matches!(t.recurring, Recurring::Once | Recurring::AllTime) {
            return None;
        }
        // A value too large for the counters' units is one no usage reaches
        // (and too large for a Decimal once scaled: the product would panic).
        let threshold = t
            .trigger_value
            .checked_mul(Decimal::from(measure.scale(category)))
            .and_then(|v| v.ceil().to_i64())
            .unwrap_or(i64::MAX);
        Some(Watch {
            sid: t.sid.as_str().into(),
            leaf_set: category.leaf_set(),
            measure,
            recurring: t.recurring,
            threshold,
            fired: fired.flatten(),
            known: known.map(|(p, tally)| (p, measure.of_tally(tally))),
        })
    }

    /// How much more the period's value may grow before it reaches the
    /// threshold; `None` if the trigger cannot fire for `period`.
    fn headroom(&self, period: Period) -> Option<i64> {
        if self.fired.is_some_and(|f| period <= f) {
            return None;
        }
        match self.known {
            Some((p, _)) if p > period => None,
            Some((p, stored)) if p == period => Some(self.threshold - stored),
            // A later period than the one known: it starts at zero.
            Some(_) => Some(self.threshold),
            // Never seen by a flush: assume it is there.
            None => Some(0),
        }
    }
}

/// Every watched account's triggers: an immutable snapshot the consumer
/// holds between the book's changes. The book updates its own copy after
/// each flush ([`Self::observe`], [`Self::fired`]): cloning it copies one
/// pointer per account, and an account's list is copied only when changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Watches {
    by_account: FxHashMap<AccountSid, std::sync::Arc<Vec<Watch>>>,
}

impl Watches {
    pub fn build<'t>(
        triggers: impl Iterator<Item = &'t Trigger>,
        known: &HashMap<String, (Period, Tally)>,
    ) -> Watches {
        let mut by_account: FxHashMap<AccountSid, Vec<Watch>> = FxHashMap::default();
        for t in triggers {
            let Some(account) = AccountSid::parse(&t.account_sid) else {
                continue;
            };
            if let Some(w) = Watch::of(t, known.get(&t.sid).copied()) {
                by_account.entry(account).or_default().push(w);
            }
        }
        Watches {
            by_account: by_account
                .into_iter()
                .map(|(a, l)| (a, std::sync::Arc::new(l)))
                .collect(),
        }
    }

    /// A flush stored `tally` in `period` for `t`'s category, the latest
    /// period it wrote for it.
    pub(super) fn observe(&mut self, t: &Trigger, period: Period, tally: Tally) {
        if let Some(w) = self.watch_mut(t) {
            w.known = Some((period, w.measure.of_tally(tally)));
        }
    }

    /// `t` fired (its `fired_period` is the one it fired for). A once-only
    /// trigger's watch stays, never to ask again: the positions of an
    /// account's watches are what [`Gains`] counts by.
    pub(super) fn fired(&mut self, t: &Trigger) {
        let fired = t
            .fired_period
            .as_deref()
            .and_then(|key| parse_period_key(t.recurring, key));
        if let Some(w) = self.watch_mut(t) {
            w.fired = fired;
        }
    }

    fn watch_mut(&mut self, t: &Trigger) -> Option<&mut Watch> {
        let account = AccountSid::parse(&t.account_sid)?;
        let list = std::sync::Arc::make_mut(self.by_account.get_mut(&account)?);
        list.iter_mut().find(|w| *w.sid == *t.sid)
    }

    pub fn is_empty(&self) -> bool {
        self.by_account.is_empty()
    }

    /// Whether `account` has triggers watched.
    pub fn watches(&self, account: AccountSid) -> bool {
        self.by_account.contains_key(&account)
    }
}

/// A partition's side of the watch: what each watched trigger's period
/// gained since the partition's last cut, and whether one reached its value.
#[derive(Debug, Default)]
pub struct Gains {
    gained: FxHashMap<(AccountSid, usize, Period), i64>,
    /// A crossing is likely: flush early.
    pub crossed: bool,
    /// Each likely crossing since the cut: trigger SID, period, when the CDR
    /// that reached the value was counted (a firing's time is counted from it).
    pub likely: Vec<(std::sync::Arc<str>, Period, std::time::Instant)>,
    /// CDRs of watched accounts were counted unwatched since the cut (the
    /// consumer was far behind and flushes early for nothing then): a
    /// crossing may have gone unseen, so the next early flush is asked for
    /// as if one were likely.
    pub unwatched: bool,
}

impl Gains {
    /// Adds a counted CDR; sets [`Self::crossed`] if a trigger may have
    /// reached its value.
    #[inline]
    pub fn add(&mut self, watches: &Watches, cdr: &Cdr<'_>, charge: Charge) {
        let Some(list) = watches.by_account.get(&cdr.account) else {
            return;
        };
        let leaf = 1u16 << cdr.leaf().index();
        let day = cdr.day();
        for (i, w) in list.iter().enumerate() {
            if w.leaf_set & leaf == 0 {
                continue;
            }
            let period = w.recurring.period_of(day);
            let Some(headroom) = w.headroom(period) else {
                continue;
            };
            let (before, gained) = match self.gained.entry((cdr.account, i, period)) {
                std::collections::hash_map::Entry::Vacant(v) => (None, v.insert(0)),
                std::collections::hash_map::Entry::Occupied(o) => {
                    let b = *o.get();
                    (Some(b), o.into_mut())
                }
            };
            *gained += w.measure.of_charge(charge);
            if *gained >= headroom && before.map_or(true, |b| b < headroom) {
                self.crossed = true;
                self.likely
                    .push((w.sid.clone(), period, std::time::Instant::now()));
            }
        }
    }

    /// A cut was taken: what it holds is the flusher's to report.
    pub fn cut(&mut self) -> Vec<(std::sync::Arc<str>, Period, std::time::Instant)> {
        self.gained.clear();
        self.crossed = false;
        self.unwatched = false;
        std::mem::take(&mut self.likely)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calendar::Day;
    use crate::cdr::decode;
    use rust_decimal_macros::dec;

    const ACCOUNT: &str = "AC00000000000000000000000000000c11";

    fn trigger(by: TriggerBy, value: Decimal, recurring: Recurring) -> Trigger {
        Trigger {
            account_sid: ACCOUNT.into(),
            ..Trigger::example("calls", by, value, recurring)
        }
    }

    fn call(day: &str, billsec: u32) -> Vec<u8> {
        format!(
            r#"{{"id":"CA{day}{billsec}","account_sid":"{ACCOUNT}","kind":"call",
            "timestamp":"{day}T10:00:00Z","direction":"outbound","status":"completed",
            "duration":{billsec},"billsec":{billsec}}}"#
        )
        .into_bytes()
    }

    fn charge(billsec: u64) -> Charge {
        Charge {
            usage: billsec,
            price: 0,
        }
    }

    #[test]
    fn a_crossing_is_seen_from_the_stored_value_and_what_was_gained() {
        let t = trigger(TriggerBy::Usage, dec!(3), Recurring::Daily);
        let day = Period::Day(Day::parse("2026-03-02").unwrap());
        // The store holds 2 minutes of the day: 60 seconds of headroom.
        let stored = Tally {
            count: 2,
            usage: 120,
            price: 0,
        };
        let known = HashMap::from([(t.sid.clone(), (day, stored))]);
        let w = Watches::build([&t].into_iter(), &known);
        let mut g = Gains::default();
        let c = call("2026-03-02", 30);
        g.add(&w, &decode(&c).unwrap(), charge(30));
        assert!(!g.crossed, "2.5 minutes");
        g.add(&w, &decode(&c).unwrap(), charge(30));
        assert!(g.crossed, "3 minutes");
        // The CDR that reached the value is remembered once, with its time.
        g.add(&w, &decode(&c).unwrap(), charge(30));
        assert_eq!(g.likely.len(), 1);
        assert_eq!((&*g.likely[0].0, g.likely[0].1), (t.sid.as_str(), day));
        assert_eq!(g.cut().len(), 1);
        assert!(!g.crossed && g.likely.is_empty());
        // The next day starts from zero: 180 seconds to go.
        let c = call("2026-03-03", 120);
        g.add(&w, &decode(&c).unwrap(), charge(120));
        assert!(!g.crossed);
        g.add(&w, &decode(&c).unwrap(), charge(120));
        assert!(g.crossed);
        // A day before the one known cannot fire.
        g.cut();
        let c = call("2026-03-01", 600);
        g.add(&w, &decode(&c).unwrap(), charge(600));
        assert!(!g.crossed);
    }

    /// A value too large for the counters' units (28 digits, scaled by the
    /// price's 10⁵) is watched as one never reached, not a panic of the
    /// consumer thread that builds the watches.
    #[test]
    fn a_value_too_large_to_reach_is_never_crossed() {
        for by in [TriggerBy::Price, TriggerBy::Usage, TriggerBy::Count] {
            let t = trigger(by, dec!(9999999999999999999999999999), Recurring::Daily);
            let w = Watch::of(&t, None).unwrap();
            assert_eq!(w.threshold, i64::MAX, "{by:?}");
        }
    }

    #[test]
    fn unknown_values_ask_at_once_and_fired_periods_never() {
        let t = trigger(TriggerBy::Count, dec!(100), Recurring::Daily);
        let w = Watches::build([&t].into_iter(), &HashMap::new());
        let mut g = Gains::default();
        let c = call("2026-03-02", 30);
        g.add(&w, &decode(&c).unwrap(), charge(30));
        assert!(g.crossed, "never seen by a flush: a flush tells the value");

        let mut fired = t.clone();
        fired.fired_period = Some("2026-03-02".into());
        let w = Watches::build([&fired].into_iter(), &HashMap::new());
        let mut g = Gains::default();
        g.add(&w, &decode(&c).unwrap(), charge(30));
        assert!(!g.crossed, "fired for the day already");

        let mut once = trigger(TriggerBy::Count, dec!(1), Recurring::Once);
        let mut w = Watches::build([&once].into_iter(), &HashMap::new());
        once.fired_period = Some("all".into());
        assert!(Watches::build([&once].into_iter(), &HashMap::new()).is_empty());
        // Fired since the watches were built: they never ask for it again.
        w.fired(&once);
        let mut g = Gains::default();
        g.add(&w, &decode(&c).unwrap(), charge(30));
        assert!(!g.crossed, "a once-only trigger that fired");
        // Other accounts and categories are not watched.
        let mut sms = t.clone();
        sms.usage_category = "sms".into();
        let w = Watches::build([&sms].into_iter(), &HashMap::new());
        let mut g = Gains::default();
        g.add(&w, &decode(&c).unwrap(), charge(30));
        assert!(!g.crossed);
    }
}
