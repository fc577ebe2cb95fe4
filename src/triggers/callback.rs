//! A fired trigger's callback as the webhook outbox keeps it, and the
//! Twilio parameters it is sent with.
//!
//! The flush that fires a trigger writes its callback in the same
//! transaction. That write is on the ingest's critical path, so the outbox
//! row carries only what the parameters cannot be rebuilt from: the period,
//! when it fired, the value, and the trigger's fields that never change
//! (category, measure, value, recurrence; an update changes only the URL,
//! method and name). The dispatcher renders the parameters when it sends
//! ([`form_body`]); a row written whole by an earlier tallyd (its body
//! starts `AccountSid=`) is sent as it is.
//!
//! The kept form is one line: `firing/1 PERIOD UNIX_SECONDS VALUE RECURRING
//! CATEGORY BY TRIGGER_VALUE`, a once-only trigger's recurrence written `-`.

use rust_decimal::Decimal;

use super::{parse_period_key, period_key, Recurring, Trigger};
use crate::calendar::{Day, Period};

const TAG: &str = "firing/1";

/// What a firing's callback says besides its row's account, trigger and
/// idempotency token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Callback<'a> {
    pub period: Period,
    /// When it fired, Unix seconds.
    pub fired_at: i64,
    pub value: Decimal,
    pub recurring: Recurring,
    pub category: &'a str,
    pub trigger_by: &'a str,
    pub trigger_value: Decimal,
}

impl<'a> Callback<'a> {
    /// The callback of `t` firing for `period` at `fired_at` with `value`.
    pub fn of(t: &'a Trigger, period: Period, fired_at: i64, value: Decimal) -> Callback<'a> {
        Callback {
            period,
            fired_at,
            value,
            recurring: t.recurring,
            category: &t.usage_category,
            trigger_by: t.trigger_by.as_str(),
            trigger_value: t.trigger_value,
        }
    }

    /// The outbox row's body.
    pub fn encode(&self) -> String {
        let recurring = match self.recurring {
            Recurring::Once => "-",
            r => r.as_str(),
        };
        format!(
            "{TAG} {} {} {} {recurring} {} {} {}",
            period_key(self.period),
            self.fired_at,
            self.value.normalize(),
            self.category,
            self.trigger_by,
            self.trigger_value,
        )
    }

    /// A body [`Self::encode`] wrote; `None` if `body` is not one.
    pub fn decode(body: &'a str) -> Option<Callback<'a>> {
        let mut f = body.strip_prefix(TAG)?.strip_prefix(' ')?.split(' ');
        let (key, fired_at, value) = (f.next()?, f.next()?, f.next()?);
        let recurring = match f.next()? {
            "-" => Recurring::Once,
            "" => return None,
            r => Recurring::parse(r)?,
        };
        let callback = Callback {
            period: parse_period_key(recurring, key)?,
            fired_at: fired_at.parse().ok()?,
            value: value.parse().ok()?,
            recurring,
            category: f.next()?,
            trigger_by: f.next()?,
            trigger_value: f.next()?.parse().ok()?,
        };
        f.next().is_none().then_some(callback)
    }

    /// The form-encoded Twilio parameters, as Twilio sends them: `AccountSid`,
    /// `UsageTriggerSid`, `DateFired`, `Recurring`, `UsageCategory`,
    /// `TriggerBy`, `TriggerValue`, `CurrentValue`, `UsageRecordUri`,
    /// `IdempotencyToken`.
    pub fn params(&self, account_sid: &str, trigger_sid: &str, token: &str) -> String {
        let date_fired = chrono::DateTime::from_timestamp(self.fired_at, 0)
            .unwrap_or_default()
            .format("%a, %d %b %Y %H:%M:%S +0000")
            .to_string();
        let (trigger_value, value) = (
            self.trigger_value.to_string(),
            self.value.normalize().to_string(),
        );
        let uri = record_uri(account_sid, self.category, self.recurring, self.period);
        serde_urlencoded::to_string([
            ("AccountSid", account_sid),
            ("UsageTriggerSid", trigger_sid),
            ("DateFired", date_fired.as_str()),
            ("Recurring", self.recurring.as_str()),
            ("UsageCategory", self.category),
            ("TriggerBy", self.trigger_by),
            ("TriggerValue", trigger_value.as_str()),
            ("CurrentValue", value.as_str()),
            ("UsageRecordUri", uri.as_str()),
            ("IdempotencyToken", token),
        ])
        .expect("strings encode")
    }
}

/// The form-encoded parameters of a usage trigger callback kept as `body`
/// (account, trigger and token from its outbox row): rendered from a kept
/// [`Callback`], or `body` itself if it is the parameters already (a row an
/// earlier tallyd wrote).
pub fn form_body(body: &str, account_sid: &str, trigger_sid: &str, token: &str) -> String {
    match Callback::decode(body) {
        Some(c) => c.params(account_sid, trigger_sid, token),
        None => body.to_owned(),
    }
}

/// The UsageRecords list of the period a trigger fired in.
pub fn record_uri(account: &str, category: &str, recurring: Recurring, period: Period) -> String {
    let base = format!("/2010-04-01/Accounts/{account}/Usage/Records");
    let (sub, from, to) = match period {
        Period::Day(d) => ("/Daily", d, d),
        Period::Month(m) => ("/Monthly", m.first_day(), m.last_day()),
        Period::Year(y) => ("/Yearly", Day::from_ymd(y, 1, 1), Day::from_ymd(y, 12, 31)),
        Period::AllTime if recurring == Recurring::Once => ("", Day(0), Day(0)),
        Period::AllTime => ("/AllTime", Day(0), Day(0)),
    };
    if matches!(period, Period::AllTime) {
        return format!("{base}{sub}.json?Category={category}");
    }
    format!("{base}{sub}.json?Category={category}&StartDate={from}&EndDate={to}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::triggers::TriggerBy;
    use rust_decimal_macros::dec;

    #[test]
    fn a_kept_callback_renders_what_twilio_sends() {
        let t = Trigger {
            sid: "UT0123456789abcdef0123456789abcdef".into(),
            account_sid: "AC0123456789abcdef0123456789abcdef".into(),
            ..Trigger::example("calls", TriggerBy::Usage, dec!(2.50), Recurring::Daily)
        };
        let day = Day::from_ymd(2026, 3, 1);
        // 2026-03-01T12:00:00Z
        let kept = Callback::of(&t, Period::Day(day), 1_772_366_400, dec!(4.000)).encode();
        assert_eq!(
            kept,
            "firing/1 2026-03-01 1772366400 4 daily calls usage 2.50"
        );
        let token = "AC0123456789abcdef0123456789abcdef-FIRES-UT0123456789abcdef0123456789abcdef-2026-03-01";
        let body = form_body(&kept, &t.account_sid, &t.sid, token);
        let params: Vec<(String, String)> = serde_urlencoded::from_str(&body).unwrap();
        let got: Vec<(&str, &str)> = params
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("AccountSid", t.account_sid.as_str()),
                ("UsageTriggerSid", t.sid.as_str()),
                ("DateFired", "Sun, 01 Mar 2026 12:00:00 +0000"),
                ("Recurring", "daily"),
                ("UsageCategory", "calls"),
                ("TriggerBy", "usage"),
                ("TriggerValue", "2.50"),
                ("CurrentValue", "4"),
                (
                    "UsageRecordUri",
                    "/2010-04-01/Accounts/AC0123456789abcdef0123456789abcdef/Usage/Records/Daily.json?Category=calls&StartDate=2026-03-01&EndDate=2026-03-01"
                ),
                ("IdempotencyToken", token),
            ]
        );
        // A row an earlier tallyd wrote whole is sent as it is.
        assert_eq!(form_body(&body, "x", "y", "z"), body);
    }

    #[test]
    fn every_recurrence_and_period_survives_the_row() {
        let cases = [
            (Recurring::Daily, Period::Day(Day::from_ymd(2026, 12, 31))),
            (
                Recurring::Monthly,
                Period::Month(Day::from_ymd(2026, 2, 1).month()),
            ),
            (Recurring::Yearly, Period::Year(2027)),
            (Recurring::AllTime, Period::AllTime),
            (Recurring::Once, Period::AllTime),
        ];
        for (recurring, period) in cases {
            let t = Trigger::example("totalprice", TriggerBy::Price, dec!(0.02), recurring);
            let c = Callback::of(&t, period, 1_800_000_000, dec!(0.0215));
            let kept = c.encode();
            assert_eq!(Callback::decode(&kept), Some(c), "{kept}");
        }
        for bad in [
            "",
            "firing/1",
            "firing/1 2026-03-01 1 4 daily calls usage",
            "firing/1 2026-03-01 1 4 daily calls usage 2 extra",
            "firing/1 2026-03-01 x 4 daily calls usage 2",
            "firing/1 2026-13-01 1 4 daily calls usage 2",
            "firing/1 2026-03-01 1 4 weekly calls usage 2",
            "firing/2 2026-03-01 1 4 daily calls usage 2",
        ] {
            assert_eq!(Callback::decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn record_uris_name_the_period() {
        let d = Day::from_ymd(2026, 3, 1);
        assert_eq!(
            record_uri("AC1", "calls", Recurring::Daily, Period::Day(d)),
            "/2010-04-01/Accounts/AC1/Usage/Records/Daily.json?Category=calls&StartDate=2026-03-01&EndDate=2026-03-01"
        );
        assert_eq!(
            record_uri("AC1", "sms", Recurring::Monthly, Period::Month(d.month())),
            "/2010-04-01/Accounts/AC1/Usage/Records/Monthly.json?Category=sms&StartDate=2026-03-01&EndDate=2026-03-31"
        );
        assert_eq!(
            record_uri("AC1", "sms", Recurring::Once, Period::AllTime),
            "/2010-04-01/Accounts/AC1/Usage/Records.json?Category=sms"
        );
        assert_eq!(
            record_uri("AC1", "sms", Recurring::AllTime, Period::AllTime),
            "/2010-04-01/Accounts/AC1/Usage/Records/AllTime.json?Category=sms"
        );
    }
}
