//! Prepaid wallets, per-call holds and top-ups (docs/contract.md §4): pure, synchronous
//! and lock-free on the hot paths.
//!
//! Money is integer [`Money`] in 10⁻⁵ of the currency (a milli-cent for USD),
//! the unit of [`crate::rating::Charge::price`]. A [`Wallet`] keeps two atomics:
//! `available` (= balance − active holds) and `held`; the balance is their
//! sum. A hold is granted by a compare-and-swap on `available` that never takes
//! it below zero, so concurrent grants never overspend; a CDR's debit is one
//! `fetch_sub` and may take it below zero (usage without a hold).
//!
//! [`Wallets`] is the registry the consumer threads and the HTTP handlers share
//! (mini-redis `Db` style): wallets by account and holds by (account, call id),
//! in `DashMap`s. A consumer thread owns one [`Ledger`] per partition: it
//! debits wallets as CDRs are consumed, settles the holds their call ids match,
//! and hands what changed since the last flush to the flush transaction
//! ([`Ledger::take`]), which persists it with the partition's offsets.
//!
//! Persistence lives in [`crate::store::wallet`]; HTTP in [`crate::api::wallet`];
//! which instance answers for a wallet in [`owners`].

pub mod commit;

use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU8, Ordering};
use std::sync::Arc;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use rustc_hash::FxHashMap;

use crate::category::Category;
use crate::cdr::{AccountSid, CallNumberType, CallStatus, Cdr, Mode, Usage};
use crate::counters::table::{prefetch, Table, TableKey};
use crate::rating::{Charge, Plan};

/// The `[wallet]` section of the config.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WalletConfig {
    /// Balance a new account starts with (the seeds' free credit).
    #[serde(default = "default_starting_credit")]
    pub starting_credit: rust_decimal::Decimal,
    /// Rating plan name → starting credit, for plans that differ from
    /// `starting_credit`.
    #[serde(default)]
    pub plan_starting_credit: std::collections::BTreeMap<String, rust_decimal::Decimal>,
    /// Seconds after a hold's maximum call duration before a hold whose CDR
    /// never came is released.
    #[serde(default = "default_hold_grace_seconds")]
    pub hold_grace_seconds: u32,
    /// Balance below which an account's first downward crossing emits one
    /// low-balance event (accounts may set their own).
    #[serde(default = "default_low_balance_threshold")]
    pub low_balance_threshold: rust_decimal::Decimal,
    /// Auto-recharge amount requested at a crossing; 0 = auto-recharge off
    /// (the event is then `wallet.low_balance`).
    #[serde(default)]
    pub recharge_amount: rust_decimal::Decimal,
}

fn default_low_balance_threshold() -> rust_decimal::Decimal {
    rust_decimal::Decimal::new(100, 2)
}

fn default_starting_credit() -> rust_decimal::Decimal {
    rust_decimal::Decimal::new(500, 2)
}

fn default_hold_grace_seconds() -> u32 {
    60
}

impl Default for WalletConfig {
    fn default() -> Self {
        WalletConfig {
            starting_credit: default_starting_credit(),
            plan_starting_credit: Default::default(),
            hold_grace_seconds: default_hold_grace_seconds(),
            low_balance_threshold: default_low_balance_threshold(),
            recharge_amount: Default::default(),
        }
    }
}

impl WalletConfig {
    /// The default low-balance settings; an error names the key.
    pub fn low_balance(&self) -> Result<LowBalance, String> {
        let recharge = money("wallet.recharge_amount", self.recharge_amount)?;
        if recharge < 0 {
            return Err(format!(
                "wallet.recharge_amount: {} is negative",
                self.recharge_amount
            ));
        }
        Ok(LowBalance {
            threshold: money("wallet.low_balance_threshold", self.low_balance_threshold)?,
            recharge,
        })
    }

    /// Each account's starting credit under its plan in `tariff`; an error
    /// names the key of an amount that is not exact to 10⁻⁵ or a plan that
    /// does not exist.
    pub fn starting_credits(
        &self,
        tariff: &std::sync::Arc<crate::rating::Tariff>,
    ) -> Result<StartingCredit, String> {
        let default = money("wallet.starting_credit", self.starting_credit)?;
        let mut by_plan = FxHashMap::default();
        for (plan, amount) in &self.plan_starting_credit {
            let key = format!("wallet.plan_starting_credit.{plan}");
            if !tariff.plans().iter().any(|p| &p.name == plan) {
                return Err(format!("{key}: no rating plan is named {plan:?}"));
            }
            by_plan.insert(plan.clone(), money(&key, *amount)?);
        }
        let tariff = tariff.clone();
        Ok(Box::new(move |account| {
            by_plan
                .get(&tariff.plan_for(account).name)
                .copied()
                .unwrap_or(default)
        }))
    }
}

/// Parses a decimal amount into [`Money`], refusing what is not exact.
pub fn money(key: &str, d: rust_decimal::Decimal) -> Result<Money, String> {
    let mut scaled = d;
    scaled.rescale(crate::rating::PRICE_SCALE);
    if scaled != d || d.scale() > crate::rating::PRICE_SCALE {
        return Err(format!(
            "{key}: {d} has more than {} decimal places",
            crate::rating::PRICE_SCALE
        ));
    }
    i64::try_from(scaled.mantissa())
        .ok()
        .filter(|m| m.unsigned_abs() < 1 << 53)
        .ok_or_else(|| format!("{key}: {d} is too large"))
}

/// Low-balance settings: below `threshold`, one event per downward crossing;
/// `recharge` > 0 asks for an auto-recharge of that amount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LowBalance {
    pub threshold: Money,
    pub recharge: Money,
}

/// An amount in 10⁻⁵ of the currency unit (a milli-cent for USD).
pub type Money = i64;

/// One cent in [`Money`].
pub const CENT: Money = 1_000;
/// One currency unit (a dollar) in [`Money`].
pub const UNIT: Money = 100_000;

/// Where a hold is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum HoldStatus {
    /// Granted; its amount is held.
    Reserved = 0,
    /// Its call's CDR came and was answered: charged, the rest released.
    Settled = 1,
    /// Released: explicitly, by an unanswered call's CDR, or at expiry.
    Released = 2,
}

impl HoldStatus {
    fn from_u8(v: u8) -> HoldStatus {
        match v {
            0 => HoldStatus::Reserved,
            1 => HoldStatus::Settled,
            _ => HoldStatus::Released,
        }
    }

    /// The CallingBox `reservation_status` text.
    pub fn as_str(self) -> &'static str {
        match self {
            HoldStatus::Reserved => "reserved",
            HoldStatus::Settled => "settled",
            HoldStatus::Released => "released",
        }
    }

    pub fn parse(s: &str) -> Option<HoldStatus> {
        match s {
            "reserved" => Some(HoldStatus::Reserved),
            "settled" => Some(HoldStatus::Settled),
            "released" => Some(HoldStatus::Released),
            _ => None,
        }
    }
}

/// The call's CDR as the hold records it (CallingBox's call billing fields).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CallBilling {
    pub duration: u32,
    pub billsec: u32,
    pub charged: Money,
}

/// A per-call hold.
#[derive(Debug)]
pub struct Hold {
    pub account: AccountSid,
    pub call_id: String,
    pub amount: Money,
    /// Unix seconds the hold was granted at.
    pub created_at: i64,
    /// Unix seconds after which an unsettled hold is released.
    pub expires_at: i64,
    status: AtomicU8,
    /// Set once, by the consumer thread, when the call's CDR is consumed.
    billing: parking_lot::Mutex<Option<CallBilling>>,
    /// Whether its grant is in the store: a repeat of its call id is
    /// answered only once it is ([`Hold::stored`]).
    durable: AtomicU8,
    stored_or_not: tokio::sync::Notify,
}

/// Whether a hold's grant is in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Durable {
    /// Its write has not committed yet.
    Pending = 0,
    Stored = 1,
    /// Its write failed or was fenced: the hold was revoked.
    NotStored = 2,
}

impl Hold {
    pub fn new(
        account: AccountSid,
        call_id: &str,
        amount: Money,
        created_at: i64,
        expires_at: i64,
    ) -> Hold {
        Hold {
            account,
            call_id: call_id.to_owned(),
            amount,
            created_at,
            expires_at,
            status: AtomicU8::new(HoldStatus::Reserved as u8),
            billing: parking_lot::Mutex::new(None),
            durable: AtomicU8::new(Durable::Pending as u8),
            stored_or_not: tokio::sync::Notify::new(),
        }
    }

    /// A hold read from the store.
    pub fn from_store(
        account: AccountSid,
        call_id: &str,
        amount: Money,
        created_at: i64,
        expires_at: i64,
    ) -> Hold {
        let h = Hold::new(account, call_id, amount, created_at, expires_at);
        h.durable.store(Durable::Stored as u8, Ordering::Release);
        h
    }

    /// Records whether its grant's write committed, and wakes whoever waits
    /// in [`Hold::stored`].
    pub fn set_durable(&self, d: Durable) {
        self.durable.store(d as u8, Ordering::Release);
        self.stored_or_not.notify_waiters();
    }

    fn durability(&self) -> Durable {
        match self.durable.load(Ordering::Acquire) {
            0 => Durable::Pending,
            1 => Durable::Stored,
            _ => Durable::NotStored,
        }
    }

    /// Waits until its grant's write is done: [`Durable::Stored`] or
    /// [`Durable::NotStored`]. A request for a call id whose first grant
    /// is still being written answers only then, so it never says
    /// "reserved" about a hold that the store may not keep.
    pub async fn stored(&self) -> Durable {
        loop {
            let woken = self.stored_or_not.notified();
            tokio::pin!(woken);
            // Registered before the state is read: a `set_durable` between the
            // read and the wait still wakes it.
            woken.as_mut().enable();
            match self.durability() {
                Durable::Pending => woken.await,
                done => return done,
            }
        }
    }

    pub fn status(&self) -> HoldStatus {
        HoldStatus::from_u8(self.status.load(Ordering::Acquire))
    }

    /// The call's CDR, once consumed.
    pub fn billing(&self) -> Option<CallBilling> {
        *self.billing.lock()
    }

    /// Restores a hold's state as stored.
    pub fn restore(&self, status: HoldStatus, billing: Option<CallBilling>) {
        self.status.store(status as u8, Ordering::Release);
        *self.billing.lock() = billing;
    }

    /// Moves a reserved hold to `to`; false if it had left `reserved` already
    /// (exactly one of concurrent settle/release/expire wins).
    fn leave_reserved(&self, to: HoldStatus) -> bool {
        self.status
            .compare_exchange(
                HoldStatus::Reserved as u8,
                to as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }
}

/// One account's prepaid balance.
#[derive(Debug)]
pub struct Wallet {
    pub account: AccountSid,
    /// Balance − active holds. Only [`Wallets::grant`] lowers it for a hold,
    /// never below zero; debits may.
    available: AtomicI64,
    held: AtomicI64,
    active_holds: AtomicU32,
    /// Whether the last hold asked for was refused for lack of balance (the
    /// `tallyd_wallets_paused` gauge counts these).
    paused: std::sync::atomic::AtomicBool,
}

/// A wallet's amounts at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalletView {
    pub balance: Money,
    pub held: Money,
    pub available: Money,
    pub active_holds: u32,
}

impl Wallet {
    fn new(account: AccountSid, balance: Money) -> Wallet {
        Wallet {
            account,
            available: AtomicI64::new(balance),
            held: AtomicI64::new(0),
            active_holds: AtomicU32::new(0),
            paused: Default::default(),
        }
    }

    /// Takes `amount` from the balance; may go below zero.
    #[inline]
    pub fn debit(&self, amount: Money) {
        self.available.fetch_sub(amount, Ordering::AcqRel);
    }

    /// Adds `amount` to the balance.
    pub fn credit(&self, amount: Money) {
        self.available.fetch_add(amount, Ordering::AcqRel);
    }

    /// The amounts now. `held` is read first and `available` second, so a
    /// concurrent grant may show in one and not yet in the other; each value
    /// is exact once the wallet is quiet.
    pub fn view(&self) -> WalletView {
        let held = self.held.load(Ordering::Acquire);
        let available = self.available.load(Ordering::Acquire);
        WalletView {
            balance: available + held,
            held,
            available,
            active_holds: self.active_holds.load(Ordering::Acquire),
        }
    }

    /// Sets the wallet to a stored state: `balance`, of which `held` is held
    /// by `active` holds.
    fn reset(&self, balance: Money, held: Money, active: u32) {
        self.held.store(held, Ordering::Release);
        self.active_holds.store(active, Ordering::Release);
        self.available.store(balance - held, Ordering::Release);
    }

    /// Takes one hold slot if fewer than `limit` are in use.
    fn take_slot(&self, limit: u32) -> bool {
        self.active_holds
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok()
    }

    /// Moves `amount` from available to held if available stays ≥ 0; on
    /// refusal returns what was available.
    fn reserve(&self, amount: Money) -> Result<(), Money> {
        self.available
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |a| {
                (a >= amount).then_some(a - amount)
            })
            .map(|_| {
                self.held.fetch_add(amount, Ordering::AcqRel);
            })
    }

    /// Gives a hold's amount back to available and frees its slot.
    fn unreserve(&self, amount: Money) {
        self.settle(amount, 0);
    }

    /// Ends a hold of `amount` whose call cost `price`: the price is taken
    /// from the hold and the rest returned to available, in one step (so
    /// available never dips while a covered call is settled).
    fn settle(&self, amount: Money, price: Money) {
        self.available.fetch_add(amount - price, Ordering::AcqRel);
        self.held.fetch_sub(amount, Ordering::AcqRel);
        self.active_holds.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The answer to a hold request.
#[derive(Debug, Clone)]
pub enum Grant {
    /// A new hold.
    Granted(Arc<Hold>),
    /// The call id already has a hold: that one.
    Existing(Arc<Hold>),
    /// Available is below the hold amount.
    Refused { available: Money, amount: Money },
    /// The plan's concurrent-call limit is reached.
    TooManyCalls { limit: u32 },
}

/// Starting credit of an account with no stored wallet.
pub type StartingCredit = Box<dyn Fn(AccountSid) -> Money + Send + Sync>;

type HoldKey = (AccountSid, Box<str>);

/// Wallets and holds by account, shared by the consumer threads and the HTTP
/// handlers.
pub struct Wallets {
    wallets: DashMap<AccountSid, Arc<Wallet>>,
    holds: DashMap<HoldKey, Arc<Hold>>,
    /// `holds.len()`, kept apart so the hot path's check is one load instead
    /// of a lock per shard.
    hold_count: std::sync::atomic::AtomicUsize,
    starting_credit: StartingCredit,
    /// Defaults for accounts that set none.
    pub low_balance: LowBalance,
}

impl std::fmt::Debug for Wallets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wallets")
            .field("wallets", &self.wallets.len())
            .field("holds", &self.holds.len())
            .finish()
    }
}

impl Wallets {
    pub fn new(starting_credit: StartingCredit) -> Wallets {
        Wallets {
            wallets: DashMap::new(),
            holds: DashMap::new(),
            hold_count: Default::default(),
            starting_credit,
            low_balance: LowBalance::default(),
        }
    }

    /// The same registry with these low-balance defaults.
    pub fn with_low_balance(mut self, low_balance: LowBalance) -> Wallets {
        self.low_balance = low_balance;
        self
    }

    /// The account's starting credit (for a wallet the store does not hold yet).
    pub fn starting_credit(&self, account: AccountSid) -> Money {
        (self.starting_credit)(account)
    }

    /// The account's wallet, made with its starting credit if it has none.
    pub fn wallet(&self, account: AccountSid) -> Arc<Wallet> {
        if let Some(w) = self.wallets.get(&account) {
            return w.clone();
        }
        self.wallets
            .entry(account)
            .or_insert_with(|| Arc::new(Wallet::new(account, self.starting_credit(account))))
            .clone()
    }

    /// Sets an account's wallet to what the store holds: its balance and its
    /// reserved holds (which replace any the registry had for the account).
    pub fn load(&self, account: AccountSid, balance: Money, reserved: Vec<Hold>) {
        self.holds.retain(|k, _| {
            let keep = k.0 != account;
            if !keep {
                self.hold_count.fetch_sub(1, Ordering::AcqRel);
            }
            keep
        });
        let held = reserved.iter().map(|h| h.amount).sum();
        let active = reserved.len() as u32;
        for h in reserved {
            if self
                .holds
                .insert((account, h.call_id.clone().into()), Arc::new(h))
                .is_none()
            {
                self.hold_count.fetch_add(1, Ordering::AcqRel);
            }
        }
        self.wallet(account).reset(balance, held, active);
    }

    /// The hold of `call_id` on `account`, if the registry has it.
    pub fn hold(&self, account: AccountSid, call_id: &str) -> Option<Arc<Hold>> {
        self.holds
            .get(&(account, Box::<str>::from(call_id)))
            .map(|h| h.clone())
    }

    /// Grants a hold of `amount` for `call_id` if available covers it and fewer
    /// than `limit` holds are active; the same call id again gets its existing
    /// hold. Lock-free: a slot and then the amount are taken by compare-and-swap.
    pub fn grant(
        &self,
        account: AccountSid,
        call_id: &str,
        amount: Money,
        limit: u32,
        now: i64,
        expires_at: i64,
    ) -> Grant {
        let key: HoldKey = (account, call_id.into());
        if let Some(h) = self.holds.get(&key) {
            return Grant::Existing(h.clone());
        }
        let wallet = self.wallet(account);
        if !wallet.take_slot(limit) {
            return self.existing_or(&key, Grant::TooManyCalls { limit });
        }
        if let Err(available) = wallet.reserve(amount) {
            wallet.active_holds.fetch_sub(1, Ordering::AcqRel);
            if !wallet.paused.swap(true, Ordering::AcqRel) {
                metrics::gauge!(crate::metrics::WALLETS_PAUSED).increment(1.0);
            }
            return self.existing_or(&key, Grant::Refused { available, amount });
        }
        if wallet.paused.swap(false, Ordering::AcqRel) {
            metrics::gauge!(crate::metrics::WALLETS_PAUSED).decrement(1.0);
        }
        match self.holds.entry(key) {
            Entry::Occupied(e) => {
                // A concurrent request for the same call id won.
                wallet.unreserve(amount);
                Grant::Existing(e.get().clone())
            }
            Entry::Vacant(v) => {
                let hold = Arc::new(Hold::new(account, call_id, amount, now, expires_at));
                v.insert(hold.clone());
                self.hold_count.fetch_add(1, Ordering::AcqRel);
                Grant::Granted(hold)
            }
        }
    }

    fn existing_or(&self, key: &HoldKey, refusal: Grant) -> Grant {
        match self.holds.get(key) {
            Some(h) => Grant::Existing(h.clone()),
            None => refusal,
        }
    }

    /// Takes back a hold [`Wallets::grant`] just granted (its grant could not be
    /// made durable): as if it had never been asked for.
    pub fn revoke(&self, hold: &Arc<Hold>) {
        if self.unregister(hold, |_| true) && hold.leave_reserved(HoldStatus::Released) {
            self.wallet(hold.account).unreserve(hold.amount);
        }
    }

    /// Removes `hold` itself (not a later hold of its call id) from the
    /// registry if `also` accepts it; true if it did.
    fn unregister(&self, hold: &Arc<Hold>, also: impl FnOnce(&Hold) -> bool) -> bool {
        let key: HoldKey = (hold.account, hold.call_id.as_str().into());
        let removed = self
            .holds
            .remove_if(&key, |_, h| Arc::ptr_eq(h, hold) && also(h))
            .is_some();
        if removed {
            self.hold_count.fetch_sub(1, Ordering::AcqRel);
        }
        removed
    }

    /// Drops a finished hold from the registry (the store has it): a hold
    /// released because its call never started is not kept for a CDR, so
    /// granting and releasing call ids at any rate leaves nothing behind in
    /// memory. A repeat of its call id is answered from the store.
    pub fn forget(&self, hold: &Arc<Hold>) {
        self.unregister(hold, |h| h.status() != HoldStatus::Reserved);
    }

    /// Releases a reserved hold (its call never started, or it expired); false
    /// if it was no longer reserved.
    pub fn release(&self, hold: &Hold) -> bool {
        if !hold.leave_reserved(HoldStatus::Released) {
            return false;
        }
        self.wallet(hold.account).unreserve(hold.amount);
        true
    }

    /// Reserved holds whose expiry is at or before `now`, released; and holds
    /// that finished before `forget_before` dropped from the registry (the
    /// store keeps them).
    /// Only the holds of accounts `mine` accepts are released (another
    /// instance owns the others' wallets).
    pub fn expire(
        &self,
        now: i64,
        forget_before: i64,
        mine: impl Fn(AccountSid) -> bool,
    ) -> Vec<Arc<Hold>> {
        let due: Vec<Arc<Hold>> = self
            .holds
            .iter()
            .filter(|h| h.status() == HoldStatus::Reserved && h.expires_at <= now)
            .filter(|h| mine(h.account))
            .map(|h| h.clone())
            .collect();
        let expired = due.into_iter().filter(|h| self.release(h)).collect();
        self.holds.retain(|_, h| {
            let keep = h.status() == HoldStatus::Reserved || h.expires_at >= forget_before;
            if !keep {
                self.hold_count.fetch_sub(1, Ordering::AcqRel);
            }
            keep
        });
        expired
    }

    /// Every wallet the registry has.
    pub fn accounts(&self) -> Vec<AccountSid> {
        self.wallets.iter().map(|w| *w.key()).collect()
    }
}

/// Sizes a call's hold: the price of an answered call of the plan's longest
/// duration at the rate the call will be priced at (its `mode` and
/// `number_type`; the dearer of the inbound and outbound rates, since the hold
/// does not know the direction), rounded up to the cent.
pub fn hold_amount(
    plan: &Plan,
    number_type: CallNumberType,
    mode: Option<Mode>,
    max_minutes: u32,
) -> Money {
    use Category::*;
    let leaves: &[Category] = match number_type {
        CallNumberType::Local => &[CallsInboundLocal, CallsOutbound],
        CallNumberType::Mobile => &[CallsInboundMobile, CallsOutbound],
        CallNumberType::Tollfree => &[CallsInboundTollfree, CallsOutbound],
        CallNumberType::Sip => &[CallsSipInbound, CallsSipOutbound],
        CallNumberType::Client => &[CallsClient],
    };
    let secs = max_minutes.saturating_mul(60);
    let usage = Usage::Call {
        number_type,
        status: CallStatus::Completed,
        duration: secs,
        billsec: secs,
        mode,
    };
    let worst = leaves
        .iter()
        .map(|l| plan.rate(&usage, *l).price)
        .max()
        .unwrap_or(0);
    round_up_to_cent(worst)
}

pub fn round_up_to_cent(m: Money) -> Money {
    m.div_euclid(CENT) * CENT + if m.rem_euclid(CENT) > 0 { CENT } else { 0 }
}

/// Dollars with two decimals, the way the CallingBox messages show money:
/// `round_up` for what the user must add, down otherwise.
pub fn dollars(m: Money, round_up: bool) -> String {
    let cents = if round_up {
        round_up_to_cent(m) / CENT
    } else {
        m.div_euclid(CENT)
    };
    let sign = if cents < 0 { "-" } else { "" };
    let c = cents.unsigned_abs();
    format!("{sign}${}.{:02}", c / 100, c % 100)
}

/// The exact decimal text of an amount, with its 5 decimals (`"4.98750"`).
pub fn decimal(m: Money) -> String {
    crate::rating::price_to_decimal(m).to_string()
}

/// The CallingBox refusal text (docs/contract.md §4): available balance, hold and
/// shortfall, in dollars with 2 decimals.
pub fn refusal_message(available: Money, amount: Money) -> String {
    format!(
        "Calls paused. Your balance is {} but each call requires a {} hold \
         (we release it back if no one answers). Add {} or more in credits to keep calling.",
        dollars(available, false),
        dollars(amount, true),
        dollars(amount - available, true),
    )
}

/// Wallet status colour: `paused` when not one more hold fits, `low` when
/// fewer than two do.
pub fn status(available: Money, hold_amount: Money) -> &'static str {
    if available < hold_amount {
        "paused"
    } else if available < 2 * hold_amount {
        "low"
    } else {
        "ok"
    }
}

/// A hold whose state changed on the consumer thread, to be written with the
/// partition's next flush.
#[derive(Debug, Clone)]
pub struct HoldChange {
    pub hold: Arc<Hold>,
    /// Whether this CDR moved the hold out of `reserved` (not so for a late
    /// CDR of an expired hold).
    pub took_hold: bool,
    pub status: HoldStatus,
    pub billing: CallBilling,
}

/// What a partition's CDRs did to wallets since its last flush.
#[derive(Debug, Default, Clone)]
pub struct WalletCut {
    /// Per account: the sum of its debits, and its starting credit (for a
    /// wallet the store does not hold yet).
    pub debits: Vec<(AccountSid, Money, Money)>,
    pub holds: Vec<HoldChange>,
    /// The low-balance defaults, for accounts that set none.
    pub low_balance: LowBalance,
}

impl WalletCut {
    pub fn is_empty(&self) -> bool {
        self.debits.is_empty() && self.holds.is_empty()
    }
}

/// One partition's wallet work on its consumer thread: debits wallets as CDRs
/// are consumed and remembers what the next flush must write.
///
/// Dropping a ledger (its partition revoked or re-read from the store) takes
/// back from memory what no flush confirmed: the replay from the stored
/// offsets debits and settles it again, so nothing counts twice.
pub struct Ledger {
    wallets: Arc<Wallets>,
    /// Accounts seen on this partition: their wallet and unflushed debits (in
    /// the counters' table, so a batch can load them ahead: [`Ledger::prefetch`]).
    accounts: Table<AccountSid, (Arc<Wallet>, Money)>,
    holds: Vec<HoldChange>,
    /// What was handed to a flush not yet confirmed ([`Ledger::flushed`]).
    in_flight: (Vec<(Arc<Wallet>, Money)>, Vec<HoldChange>),
}

impl Ledger {
    pub fn new(wallets: Arc<Wallets>) -> Ledger {
        Ledger {
            wallets,
            accounts: Table::default(),
            holds: Vec::new(),
            in_flight: Default::default(),
        }
    }

    /// The last cut taken has landed in the store.
    pub fn flushed(&mut self) {
        self.in_flight.0.clear();
        self.in_flight.1.clear();
    }

    /// Starts loading what debiting `account` touches, one dependent line per
    /// wave of a batch (see [`crate::pipeline::ingest_batch`]): `0` the
    /// account's slot, `1` its entry, `2` its wallet's balance. Without it the
    /// entry and the wallet are two cache misses per CDR in a row.
    #[inline]
    pub fn prefetch(&self, account: AccountSid, wave: u8) {
        let h = account.hash64();
        match wave {
            0 => self.accounts.prefetch_slot(h),
            1 => {
                if let Some(e) = self.accounts.candidate(h) {
                    prefetch(e);
                }
            }
            _ => {
                if let Some((k, (wallet, _))) = self.accounts.candidate(h) {
                    if *k == account {
                        prefetch(&wallet.available);
                    }
                }
            }
        }
    }

    /// Debits the CDR's price from its account; a call CDR whose id has a hold
    /// settles it (answered) or releases it (not answered). A hold already
    /// released (expired) still records the call: a late CDR is charged.
    #[inline]
    pub fn debit(&mut self, cdr: &Cdr<'_>, charge: Charge) {
        let wallets = &self.wallets;
        let (entry, _) =
            self.accounts
                .get_or_insert_with(cdr.account, cdr.account.hash64(), || {
                    (wallets.wallet(cdr.account), 0)
                });
        let (wallet, pending) = entry;
        *pending += charge.price;
        if let Usage::Call {
            duration, billsec, ..
        } = cdr.usage
        {
            if wallets.hold_count.load(Ordering::Acquire) != 0 {
                if let Some(hold) = wallets.hold(cdr.account, &cdr.id) {
                    let to = if charge.usage > 0 {
                        HoldStatus::Settled
                    } else {
                        HoldStatus::Released
                    };
                    let billing = CallBilling {
                        duration,
                        billsec,
                        charged: charge.price,
                    };
                    *hold.billing.lock() = Some(billing);
                    let settled = hold.leave_reserved(to);
                    self.holds.push(HoldChange {
                        took_hold: settled,
                        status: hold.status(),
                        hold: hold.clone(),
                        billing,
                    });
                    if settled {
                        match to {
                            HoldStatus::Settled => {
                                metrics::counter!(crate::metrics::HOLDS_TOTAL, "outcome" => "settled").increment(1)
                            }
                            _ => metrics::counter!(crate::metrics::HOLDS_TOTAL, "outcome" => "released")
                                .increment(1),
                        }
                        wallet.settle(hold.amount, charge.price);
                        return;
                    }
                }
            }
        }
        wallet.debit(charge.price);
    }

    /// What changed since the last take, for the partition's flush.
    pub fn take(&mut self) -> WalletCut {
        let mut debits = Vec::new();
        for (account, (wallet, pending)) in self.accounts.iter_mut() {
            if *pending != 0 {
                self.in_flight.0.push((wallet.clone(), *pending));
                debits.push((
                    *account,
                    std::mem::take(pending),
                    self.wallets.starting_credit(*account),
                ));
            }
        }
        debits.sort_by_key(|d| d.0);
        let holds = std::mem::take(&mut self.holds);
        self.in_flight.1.extend(holds.iter().cloned());
        WalletCut {
            debits,
            holds,
            low_balance: self.wallets.low_balance,
        }
    }

    /// The accounts this partition has debited.
    pub fn accounts(&self) -> impl Iterator<Item = AccountSid> + '_ {
        self.accounts.entries().iter().map(|(k, _)| *k)
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        let pending = self
            .accounts
            .entries()
            .iter()
            .map(|(_, (w, p))| (w.clone(), *p));
        for (wallet, amount) in self.in_flight.0.drain(..).chain(pending) {
            wallet.credit(amount);
        }
        for c in self.in_flight.1.drain(..).chain(self.holds.drain(..)) {
            let wallet = self.wallets.wallet(c.hold.account);
            if c.took_hold && c.hold.status() != HoldStatus::Reserved {
                c.hold.restore(HoldStatus::Reserved, None);
                wallet.held.fetch_add(c.hold.amount, Ordering::AcqRel);
                wallet.available.fetch_sub(c.hold.amount, Ordering::AcqRel);
                wallet.active_holds.fetch_add(1, Ordering::AcqRel);
            }
        }
    }
}

pub mod owners;

#[cfg(test)]
mod tests;
