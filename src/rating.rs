//! Rating: from a validated CDR to its exact price (docs/contract.md §3).
//!
//! Tariffs are written in the config as decimals (`rust_decimal`) and compiled once
//! at start into integers at a fixed scale of 10⁻¹⁰ of the currency unit, so the
//! hot path prices a CDR with a few `i128` operations and no rounding until the
//! final half-up rounding to 5 decimals (a milli-cent). [`reference_price`] is the
//! same formula in `Decimal` and the tests hold the two equal.

use std::collections::BTreeMap;

use rust_decimal::{Decimal, RoundingStrategy};
use rustc_hash::FxHashMap;
use serde::Deserialize;

use crate::category::Category;
use crate::cdr::{AccountSid, CallStatus, Cdr, Mode, Usage};

/// Price unit of stored amounts: 10⁻⁵ of the currency unit (a milli-cent for USD).
pub const PRICE_SCALE: u32 = 5;
/// Internal scale of compiled tariff amounts.
const TARIFF_SCALE: u32 = 10;
const TARIFF_TO_PRICE: i128 = 100_000; // 10^(TARIFF_SCALE - PRICE_SCALE)

/// Tariff section of the config: plans, and which account is on which plan.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RatingConfig {
    /// Plan used for accounts not listed in `accounts`.
    pub default_plan: String,
    /// Plans by name.
    pub plans: BTreeMap<String, PlanConfig>,
    /// Account SID → plan name.
    #[serde(default)]
    pub accounts: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanConfig {
    /// Lowercase ISO 4217 code, e.g. `usd`.
    pub currency: String,
    /// Category name (leaf or rollup) → rate. A leaf uses its own rate or, failing
    /// that, the nearest ancestor's (so `calls` prices every inbound and outbound call).
    pub rates: BTreeMap<String, RateConfig>,
}

/// One rate. Decimals are strings in the TOML (`"0.13"`) so they stay exact.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateConfig {
    /// Price per minute of billed time (calls).
    pub per_minute: Option<Decimal>,
    /// Price per unit: per message segment for messages, per call for calls.
    pub per_unit: Option<Decimal>,
    /// Billing increment in seconds (1 = per-second billing, 60 = per minute).
    pub increment: Option<u32>,
    /// First billing increment in seconds (e.g. 60 for "60/1" billing).
    pub first_increment: Option<u32>,
    /// Minimum charge for a billed call or message.
    pub minimum: Option<Decimal>,
    /// Flat fee added to every billed call or message.
    pub connect_fee: Option<Decimal>,
    /// Whether calls with no connected time are billed (connect fee and minimum).
    pub bill_unanswered: Option<bool>,
    /// Per-`mode` overrides (`webhook`, `hosted`); unset keys inherit from this rate.
    #[serde(default)]
    pub modes: BTreeMap<String, RateConfig>,
}

/// A bad tariff: which plan, which key, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tariff error at `{key}`: {reason}")]
pub struct TariffError {
    pub key: String,
    pub reason: String,
}

fn terr(key: impl Into<String>, reason: impl Into<String>) -> TariffError {
    TariffError {
        key: key.into(),
        reason: reason.into(),
    }
}

/// A rate compiled to integers at 10⁻¹⁰.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompiledRate {
    /// Per-minute price (0 when the rate is per unit).
    per_minute: i128,
    /// Per-unit price (0 when the rate is per minute).
    per_unit: i128,
    increment: u32,
    first_increment: u32,
    minimum: i128,
    connect_fee: i128,
    bill_unanswered: bool,
}

impl CompiledRate {
    const FREE: CompiledRate = CompiledRate {
        per_minute: 0,
        per_unit: 0,
        increment: 1,
        first_increment: 1,
        minimum: 0,
        connect_fee: 0,
        bill_unanswered: false,
    };

    /// Billable seconds after increments: `first_increment`, then whole `increment`s.
    #[inline]
    pub fn rounded_seconds(&self, billsec: u32) -> u64 {
        if billsec == 0 {
            return 0;
        }
        let (b, f, i) = (
            billsec as u64,
            self.first_increment as u64,
            self.increment as u64,
        );
        if b <= f {
            f
        } else {
            f + (b - f).div_ceil(i) * i
        }
    }

    /// Price in 10⁻⁵ units, rounded half-up.
    #[inline]
    fn price_call(&self, answered: bool, billsec: u32) -> i64 {
        if !answered && !self.bill_unanswered {
            return 0;
        }
        let secs = if answered {
            self.rounded_seconds(billsec) as i128
        } else {
            0
        };
        // amount × 60 at 10⁻¹⁰, so per-minute rates divide exactly at the end.
        let amount60 = (self.per_minute * secs + (self.connect_fee + self.per_unit) * 60)
            .max(self.minimum * 60);
        round_half_up(amount60, 60 * TARIFF_TO_PRICE)
    }

    #[inline]
    fn price_units(&self, units: u32) -> i64 {
        let amount = (self.per_unit * units as i128 + self.connect_fee).max(self.minimum);
        round_half_up(amount, TARIFF_TO_PRICE)
    }
}

#[inline]
fn round_half_up(n: i128, d: i128) -> i64 {
    debug_assert!(n >= 0 && d > 0);
    let n = n + d / 2;
    // Real prices fit 64 bits, where division is one instruction instead of a
    // call to the 128-bit routine (a third of the rating time).
    match (u64::try_from(n), u64::try_from(d)) {
        (Ok(n), Ok(d)) => (n / d) as i64,
        _ => (n / d) as i64,
    }
}

/// Number of mode slots: no mode, then one per [`Mode`].
const MODE_SLOTS: usize = 1 + Mode::ALL.len();

fn mode_slot(mode: Option<Mode>) -> usize {
    match mode {
        None => 0,
        Some(Mode::Webhook) => 1,
        Some(Mode::Hosted) => 2,
    }
}

/// A compiled plan: one rate per leaf category and mode slot.
#[derive(Debug, Clone)]
pub struct Plan {
    pub name: String,
    pub currency: String,
    rates: [[CompiledRate; MODE_SLOTS]; Category::LEAVES],
    /// Leaves with no rate in this plan (priced at zero); reported at start.
    pub unpriced: Vec<Category>,
}

/// The result of rating one CDR: what it adds to its leaf category.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Charge {
    /// Billed seconds (calls) or segments (messages).
    pub usage: u64,
    /// Price in 10⁻⁵ of the currency unit.
    pub price: i64,
}

/// All plans and the account → plan map.
#[derive(Debug, Clone)]
pub struct Tariff {
    plans: Vec<Plan>,
    default_plan: u16,
    accounts: FxHashMap<AccountSid, u16>,
}

impl Tariff {
    pub fn compile(cfg: &RatingConfig) -> Result<Tariff, TariffError> {
        if cfg.plans.is_empty() {
            return Err(terr("rating.plans", "at least one plan is required"));
        }
        let mut plans = Vec::new();
        let mut index = BTreeMap::new();
        for (name, p) in &cfg.plans {
            index.insert(name.clone(), plans.len() as u16);
            plans.push(compile_plan(name, p)?);
        }
        let default_plan = *index.get(&cfg.default_plan).ok_or_else(|| {
            terr(
                "rating.default_plan",
                format!(
                    "plan {:?} is not defined; defined plans: {:?}",
                    cfg.default_plan,
                    cfg.plans.keys().collect::<Vec<_>>()
                ),
            )
        })?;
        let mut accounts = FxHashMap::default();
        for (sid, plan) in &cfg.accounts {
            let key = format!("rating.accounts.{sid}");
            let account = AccountSid::parse(sid).ok_or_else(|| {
                terr(
                    &key,
                    "not an account SID (AC followed by 32 lowercase hex digits)",
                )
            })?;
            let p = *index
                .get(plan)
                .ok_or_else(|| terr(&key, format!("plan {plan:?} is not defined")))?;
            accounts.insert(account, p);
        }
        Ok(Tariff {
            plans,
            default_plan,
            accounts,
        })
    }

    pub fn plans(&self) -> &[Plan] {
        &self.plans
    }

    #[inline]
    pub fn plan_for(&self, account: AccountSid) -> &Plan {
        let i = self
            .accounts
            .get(&account)
            .copied()
            .unwrap_or(self.default_plan);
        &self.plans[i as usize]
    }

    /// Prices one CDR into its leaf category.
    #[inline]
    pub fn rate(&self, cdr: &Cdr<'_>, leaf: Category) -> Charge {
        self.plan_for(cdr.account).rate(&cdr.usage, leaf)
    }
}

impl Plan {
    #[inline]
    pub fn rate(&self, usage: &Usage, leaf: Category) -> Charge {
        match *usage {
            Usage::Call {
                status,
                billsec,
                mode,
                ..
            } => {
                let r = &self.rates[leaf.index()][mode_slot(mode)];
                let answered = status == CallStatus::Completed && billsec > 0;
                Charge {
                    usage: if answered { billsec as u64 } else { 0 },
                    price: r.price_call(answered, billsec),
                }
            }
            Usage::Message { segments, .. } => {
                let r = &self.rates[leaf.index()][0];
                Charge {
                    usage: segments as u64,
                    price: r.price_units(segments),
                }
            }
        }
    }

    pub fn compiled(&self, leaf: Category, mode: Option<Mode>) -> &CompiledRate {
        &self.rates[leaf.index()][mode_slot(mode)]
    }
}

fn compile_plan(name: &str, p: &PlanConfig) -> Result<Plan, TariffError> {
    let base = format!("rating.plans.{name}");
    let c = &p.currency;
    if c.len() != 3 || !c.bytes().all(|b| b.is_ascii_lowercase()) {
        return Err(terr(
            format!("{base}.currency"),
            format!("{c:?} is not a lowercase ISO 4217 code like \"usd\""),
        ));
    }
    let mut by_cat: [Option<&RateConfig>; Category::COUNT] = [None; Category::COUNT];
    for (cat, rate) in &p.rates {
        let key = format!("{base}.rates.{cat}");
        let category: Category = cat
            .parse()
            .map_err(|_| terr(&key, "unknown usage category"))?;
        if category == Category::TotalPrice {
            return Err(terr(
                &key,
                "totalprice is the sum of all prices and cannot have a rate",
            ));
        }
        for m in rate.modes.keys() {
            if Mode::parse(m).is_none() {
                return Err(terr(
                    format!("{key}.modes.{m}"),
                    "unknown mode; modes are webhook, hosted",
                ));
            }
        }
        by_cat[category.index()] = Some(rate);
    }
    let mut rates = [[CompiledRate::FREE; MODE_SLOTS]; Category::LEAVES];
    let mut unpriced = Vec::new();
    for leaf in &Category::ALL[..Category::LEAVES] {
        let Some((owner, rate)) = leaf
            .with_ancestors()
            .find_map(|c| by_cat[c.index()].map(|r| (c, r)))
        else {
            unpriced.push(*leaf);
            continue;
        };
        let key = format!("{base}.rates.{owner}");
        rates[leaf.index()][0] = compile_rate(&key, rate, &RateConfig::default())?;
        for mode in Mode::ALL {
            let slot = mode_slot(Some(mode));
            rates[leaf.index()][slot] = match rate.modes.get(mode.name()) {
                Some(over) => compile_rate(&format!("{key}.modes.{}", mode.name()), over, rate)?,
                None => rates[leaf.index()][0],
            };
        }
    }
    Ok(Plan {
        name: name.to_owned(),
        currency: c.clone(),
        rates,
        unpriced,
    })
}

fn compile_rate(
    key: &str,
    r: &RateConfig,
    parent: &RateConfig,
) -> Result<CompiledRate, TariffError> {
    // A mode override that sets one of per_minute/per_unit replaces the parent's pair.
    let (per_minute, per_unit) = if r.per_minute.is_some() || r.per_unit.is_some() {
        (r.per_minute, r.per_unit)
    } else {
        (parent.per_minute, parent.per_unit)
    };
    if per_minute.is_some() && per_unit.is_some() {
        return Err(terr(key, "set either per_minute or per_unit, not both"));
    }
    if per_minute.is_none() && per_unit.is_none() {
        return Err(terr(key, "a rate needs per_minute or per_unit"));
    }
    let increment = r.increment.or(parent.increment).unwrap_or(1);
    if increment == 0 {
        return Err(terr(
            format!("{key}.increment"),
            "must be at least 1 second",
        ));
    }
    let first_increment = r
        .first_increment
        .or(parent.first_increment)
        .unwrap_or(increment);
    if first_increment == 0 {
        return Err(terr(
            format!("{key}.first_increment"),
            "must be at least 1 second",
        ));
    }
    let money = |field: &str, v: Option<Decimal>| -> Result<i128, TariffError> {
        let Some(v) = v else { return Ok(0) };
        if v.is_sign_negative() && !v.is_zero() {
            return Err(terr(format!("{key}.{field}"), format!("{v} is negative")));
        }
        if v.scale() > TARIFF_SCALE {
            return Err(terr(
                format!("{key}.{field}"),
                format!("{v} has more than {TARIFF_SCALE} decimal places"),
            ));
        }
        let mut scaled = v;
        scaled.rescale(TARIFF_SCALE);
        let m = scaled.mantissa();
        if m > 10i128.pow(24) {
            return Err(terr(format!("{key}.{field}"), format!("{v} is too large")));
        }
        Ok(m)
    };
    Ok(CompiledRate {
        per_minute: money("per_minute", per_minute)?,
        per_unit: money("per_unit", per_unit)?,
        increment,
        first_increment,
        minimum: money("minimum", r.minimum.or(parent.minimum))?,
        connect_fee: money("connect_fee", r.connect_fee.or(parent.connect_fee))?,
        bill_unanswered: r
            .bill_unanswered
            .or(parent.bill_unanswered)
            .unwrap_or(false),
    })
}

/// Converts a stored price (10⁻⁵ units) to a `Decimal` with 5 decimal places.
pub fn price_to_decimal(price: i64) -> Decimal {
    Decimal::new(price, PRICE_SCALE)
}

/// The rating formula written directly in `Decimal`, as the specification reads;
/// the compiled integer path must agree with it for every input.
pub fn reference_price(
    rate: &RateConfig,
    answered: bool,
    billsec: u32,
    units: Option<u32>,
) -> Decimal {
    let d = |v: Option<Decimal>| v.unwrap_or(Decimal::ZERO);
    let amount = match units {
        Some(n) => d(rate.per_unit) * Decimal::from(n) + d(rate.connect_fee),
        None => {
            if !answered && !rate.bill_unanswered.unwrap_or(false) {
                return Decimal::ZERO;
            }
            let inc = rate.increment.unwrap_or(1) as u64;
            let first = rate.first_increment.unwrap_or(inc as u32) as u64;
            let b = if answered { billsec as u64 } else { 0 };
            let secs = if b == 0 {
                0
            } else if b <= first {
                first
            } else {
                first + (b - first).div_ceil(inc) * inc
            };
            d(rate.per_minute) * Decimal::from(secs) / Decimal::from(60)
                + d(rate.connect_fee)
                + d(rate.per_unit)
        }
    };
    amount
        .max(d(rate.minimum))
        .round_dp_with_strategy(PRICE_SCALE, RoundingStrategy::MidpointAwayFromZero)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cdr::{CallNumberType, MessageKind, MessageNumberType};
    use rust_decimal_macros::dec;

    fn rate(toml_src: &str) -> RateConfig {
        toml::from_str(toml_src).unwrap()
    }

    fn plan_with(rate_toml: &str) -> Plan {
        let src = format!(
            "currency = \"usd\"\n[rates.calls]\n{rate_toml}\n[rates.sms]\nper_unit = \"0.02\"\n"
        );
        compile_plan("t", &toml::from_str(&src).unwrap()).unwrap()
    }

    fn call(status: CallStatus, billsec: u32, mode: Option<Mode>) -> Usage {
        Usage::Call {
            number_type: CallNumberType::Local,
            status,
            duration: billsec + 5,
            billsec,
            mode,
        }
    }

    fn price(p: &Plan, status: CallStatus, billsec: u32) -> Decimal {
        price_to_decimal(
            p.rate(&call(status, billsec, None), Category::CallsOutbound)
                .price,
        )
    }

    #[test]
    fn zero_billsec_and_unanswered_are_free_by_default() {
        let p = plan_with("per_minute = \"0.05\"\nminimum = \"0.01\"\nconnect_fee = \"0.002\"");
        assert_eq!(price(&p, CallStatus::Completed, 0), dec!(0));
        assert_eq!(price(&p, CallStatus::NoAnswer, 0), dec!(0));
        assert_eq!(price(&p, CallStatus::Busy, 0), dec!(0));
        let c = p.rate(&call(CallStatus::Failed, 0, None), Category::CallsOutbound);
        assert_eq!(c, Charge { usage: 0, price: 0 });
    }

    #[test]
    fn bill_unanswered_charges_connect_fee_and_minimum() {
        let p = plan_with("per_minute = \"0.05\"\nconnect_fee = \"0.002\"\nbill_unanswered = true");
        assert_eq!(price(&p, CallStatus::NoAnswer, 0), dec!(0.002));
        let p = plan_with("per_minute = \"0.05\"\nminimum = \"0.01\"\nbill_unanswered = true");
        assert_eq!(price(&p, CallStatus::Busy, 0), dec!(0.01));
    }

    #[test]
    fn increments() {
        // 1/1: per second.
        let p = plan_with("per_minute = \"0.06\"");
        assert_eq!(price(&p, CallStatus::Completed, 61), dec!(0.061));
        // 6/6
        let p = plan_with("per_minute = \"0.06\"\nincrement = 6");
        assert_eq!(price(&p, CallStatus::Completed, 61), dec!(0.066));
        assert_eq!(price(&p, CallStatus::Completed, 1), dec!(0.006));
        assert_eq!(price(&p, CallStatus::Completed, 60), dec!(0.06));
        // 60/60
        let p = plan_with("per_minute = \"0.06\"\nincrement = 60");
        assert_eq!(price(&p, CallStatus::Completed, 61), dec!(0.12));
        assert_eq!(price(&p, CallStatus::Completed, 1), dec!(0.06));
        // 60/1: first minute whole, then per second.
        let p = plan_with("per_minute = \"0.06\"\nfirst_increment = 60\nincrement = 1");
        assert_eq!(price(&p, CallStatus::Completed, 1), dec!(0.06));
        assert_eq!(price(&p, CallStatus::Completed, 61), dec!(0.061));
        assert_eq!(
            p.compiled(Category::CallsOutbound, None)
                .rounded_seconds(59),
            60
        );
    }

    #[test]
    fn rounds_half_up_at_the_fifth_decimal() {
        // 0.13/min for 1 s = 0.0021666… → 0.00217
        let p = plan_with("per_minute = \"0.13\"");
        assert_eq!(price(&p, CallStatus::Completed, 1), dec!(0.00217));
        // 0.0003/min × 1 s = 0.000005 exactly: the midpoint goes up.
        let p = plan_with("per_minute = \"0.0003\"");
        assert_eq!(price(&p, CallStatus::Completed, 1), dec!(0.00001));
        // 0.00029/min × 1 s = 0.0000048333…: rounds down.
        let p = plan_with("per_minute = \"0.00029\"");
        assert_eq!(price(&p, CallStatus::Completed, 1), dec!(0));
    }

    #[test]
    fn minimum_charge_and_connect_fee() {
        let p = plan_with("per_minute = \"0.13\"\nminimum = \"0.01\"");
        assert_eq!(price(&p, CallStatus::Completed, 1), dec!(0.01));
        assert_eq!(price(&p, CallStatus::Completed, 4), dec!(0.01)); // 0.00867 < 1¢
        assert_eq!(price(&p, CallStatus::Completed, 5), dec!(0.01083));
        let p = plan_with("per_minute = \"0.05\"\nconnect_fee = \"0.015\"");
        assert_eq!(price(&p, CallStatus::Completed, 60), dec!(0.065));
    }

    #[test]
    fn mode_dependent_rates() {
        let p = plan_with("per_minute = \"0.13\"\nminimum = \"0.01\"\n[rates.calls.modes.hosted]\nper_minute = \"0.22\"");
        let at = |m| {
            price_to_decimal(
                p.rate(
                    &call(CallStatus::Completed, 60, m),
                    Category::CallsInboundMobile,
                )
                .price,
            )
        };
        assert_eq!(at(None), dec!(0.13));
        assert_eq!(at(Some(Mode::Webhook)), dec!(0.13));
        assert_eq!(at(Some(Mode::Hosted)), dec!(0.22));
        // The override inherits the minimum.
        let short = p.rate(
            &call(CallStatus::Completed, 1, Some(Mode::Hosted)),
            Category::CallsOutbound,
        );
        assert_eq!(price_to_decimal(short.price), dec!(0.01));
    }

    #[test]
    fn messages_multiply_segments() {
        let p = plan_with("per_minute = \"0.13\"");
        let m = Usage::Message {
            kind: MessageKind::Sms,
            number_type: MessageNumberType::Longcode,
            segments: 3,
        };
        assert_eq!(
            p.rate(&m, Category::SmsInboundLongcode),
            Charge {
                usage: 3,
                price: 6000
            }
        );
        // No mms rate in this plan: free, and reported.
        assert_eq!(p.rate(&m, Category::MmsInboundLongcode).price, 0);
        assert!(p.unpriced.contains(&Category::MmsInboundLongcode));
        assert!(
            p.unpriced.contains(&Category::CallsSipInbound),
            "sip does not inherit the calls rate"
        );
    }

    #[test]
    fn bad_tariffs_name_the_key() {
        let bad = |src: &str| {
            let cfg: PlanConfig = toml::from_str(src).unwrap();
            compile_plan("p", &cfg).unwrap_err()
        };
        let e = bad("currency = \"USD\"\n[rates.calls]\nper_minute = \"1\"");
        assert_eq!(e.key, "rating.plans.p.currency");
        let e = bad("currency = \"usd\"\n[rates.calls-bogus]\nper_minute = \"1\"");
        assert_eq!(e.key, "rating.plans.p.rates.calls-bogus");
        let e = bad("currency = \"usd\"\n[rates.calls]\nper_minute = \"-1\"");
        assert_eq!(e.key, "rating.plans.p.rates.calls.per_minute");
        let e = bad("currency = \"usd\"\n[rates.calls]\nper_minute = \"1\"\nper_unit = \"1\"");
        assert!(e.reason.contains("not both"));
        let e = bad("currency = \"usd\"\n[rates.calls]\nper_minute = \"1\"\nincrement = 0");
        assert_eq!(e.key, "rating.plans.p.rates.calls.increment");
        let e = bad("currency = \"usd\"\n[rates.calls]\nper_minute = \"1\"\n[rates.calls.modes.psychic]\nper_minute = \"2\"");
        assert_eq!(e.key, "rating.plans.p.rates.calls.modes.psychic");
        assert!(toml::from_str::<PlanConfig>(
            "currency = \"usd\"\n[rates.calls]\nper_minit = \"1\""
        )
        .is_err());
    }

    #[test]
    fn reference_agrees_on_seed_prices() {
        let r = rate("per_minute = \"0.13\"\nminimum = \"0.01\"");
        assert_eq!(reference_price(&r, true, 1, None), dec!(0.01));
        assert_eq!(reference_price(&r, true, 90, None), dec!(0.195));
    }
}
