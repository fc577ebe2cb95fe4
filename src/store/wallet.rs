//! Wallet rows: balances, holds and top-ups (tables in [`super::schema`]).
//!
//! The stored balance is the starting credit plus every top-up minus every
//! *flushed* debit: a partition's debits since its last flush are added in the
//! flush transaction with its offsets ([`WalletRows`], a step of
//! [`Conn::write_flush`]), so after a crash the replay from the stored offsets
//! re-debits exactly what the store does not have. Holds and top-ups are
//! written before their HTTP answer leaves, in transactions of their own.

use super::{Conn, Param, Result, Value};
use crate::wallet::{CallBilling, HoldStatus, Money, WalletCut};

/// A partition's wallet changes, written with its flush.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WalletRows {
    /// (account SID, sum of debits, starting credit if the account has no row).
    pub debits: Vec<(String, Money, Money)>,
    pub holds: Vec<HoldUpdate>,
}

/// A hold settled or released by its call's CDR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldUpdate {
    pub account_sid: String,
    pub call_id: String,
    pub amount: Money,
    pub created_at: i64,
    pub expires_at: i64,
    pub status: HoldStatus,
    pub billing: CallBilling,
}

impl From<WalletCut> for WalletRows {
    fn from(cut: WalletCut) -> WalletRows {
        WalletRows {
            debits: cut
                .debits
                .into_iter()
                .map(|(a, amount, start)| (a.to_string(), amount, start))
                .collect(),
            holds: cut
                .holds
                .into_iter()
                .map(|c| HoldUpdate {
                    account_sid: c.hold.account.to_string(),
                    call_id: c.hold.call_id.clone(),
                    amount: c.hold.amount,
                    created_at: c.hold.created_at,
                    expires_at: c.hold.expires_at,
                    status: c.status,
                    billing: c.billing,
                })
                .collect(),
        }
    }
}

/// A hold as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredHold {
    pub account_sid: String,
    pub call_id: String,
    pub amount: Money,
    pub status: HoldStatus,
    pub created_at: i64,
    pub expires_at: i64,
    pub billing: Option<CallBilling>,
}

/// A top-up as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCredit {
    pub account_sid: String,
    pub idempotency_key: String,
    pub amount: Money,
    pub reason: String,
    pub created_at: String,
}

const HOLD_COLUMNS: &str =
    "account_sid, call_id, amount, status, created_at, expires_at, duration, billsec, charged";

fn hold_row(r: &[Value]) -> StoredHold {
    StoredHold {
        account_sid: r[0].text().to_owned(),
        call_id: r[1].text().to_owned(),
        amount: r[2].int(),
        status: HoldStatus::parse(r[3].text()).unwrap_or(HoldStatus::Released),
        created_at: r[4].int(),
        expires_at: r[5].int(),
        billing: r[8].opt_int().map(|charged| CallBilling {
            duration: r[6].int() as u32,
            billsec: r[7].int() as u32,
            charged,
        }),
    }
}

impl Conn {
    /// The flush step: adds each account's debits into its balance and
    /// records the holds its CDRs settled or released.
    pub(super) fn write_wallet_rows(&mut self, w: &WalletRows) -> Result<()> {
        for (sid, amount, start) in &w.debits {
            self.execute(
                "INSERT INTO wallet_accounts (account_sid, balance) VALUES ($1, $2) \
                 ON CONFLICT (account_sid) DO UPDATE SET balance = wallet_accounts.balance - $3",
                &[
                    Param::Text(sid),
                    Param::Int(start - amount),
                    Param::Int(*amount),
                ],
            )?;
        }
        for h in &w.holds {
            // An upsert: the grant's own insert may still be on its way.
            self.execute(
                "INSERT INTO wallet_holds (account_sid, call_id, amount, status, created_at, \
                 expires_at, duration, billsec, charged) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                 ON CONFLICT (account_sid, call_id) DO UPDATE SET status = excluded.status, \
                 duration = excluded.duration, billsec = excluded.billsec, charged = excluded.charged",
                &[
                    Param::Text(&h.account_sid),
                    Param::Text(&h.call_id),
                    Param::Int(h.amount),
                    Param::Text(h.status.as_str()),
                    Param::Int(h.created_at),
                    Param::Int(h.expires_at),
                    Param::Int(h.billing.duration.into()),
                    Param::Int(h.billing.billsec.into()),
                    Param::Int(h.billing.charged),
                ],
            )?;
        }
        Ok(())
    }

    /// Stores a granted hold; if the call id already had one, stores nothing
    /// and returns that one.
    pub fn insert_hold(&mut self, h: &StoredHold) -> Result<Option<StoredHold>> {
        let inserted = self.execute(
            "INSERT INTO wallet_holds (account_sid, call_id, amount, status, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (account_sid, call_id) DO NOTHING",
            &[
                Param::Text(&h.account_sid),
                Param::Text(&h.call_id),
                Param::Int(h.amount),
                Param::Text(h.status.as_str()),
                Param::Int(h.created_at),
                Param::Int(h.expires_at),
            ],
        )?;
        if inserted == 1 {
            return Ok(None);
        }
        self.hold(&h.account_sid, &h.call_id)
    }

    /// Stores many granted holds in one transaction (a group commit); each
    /// result is as [`Conn::insert_hold`]'s.
    pub fn insert_holds(&mut self, holds: &[StoredHold]) -> Result<Vec<Option<StoredHold>>> {
        self.transaction(|c| holds.iter().map(|h| c.insert_hold(h)).collect())
    }

    /// Marks a reserved hold released (explicitly or at expiry).
    pub fn release_hold(&mut self, account_sid: &str, call_id: &str) -> Result<()> {
        self.execute(
            "UPDATE wallet_holds SET status = 'released' \
             WHERE account_sid = $1 AND call_id = $2 AND status = 'reserved'",
            &[Param::Text(account_sid), Param::Text(call_id)],
        )?;
        Ok(())
    }

    pub fn hold(&mut self, account_sid: &str, call_id: &str) -> Result<Option<StoredHold>> {
        Ok(self
            .query(
                &format!(
                    "SELECT {HOLD_COLUMNS} FROM wallet_holds WHERE account_sid = $1 AND call_id = $2"
                ),
                &[Param::Text(account_sid), Param::Text(call_id)],
            )?
            .first()
            .map(|r| hold_row(r)))
    }

    /// Every hold still reserved.
    pub fn reserved_holds(&mut self) -> Result<Vec<StoredHold>> {
        Ok(self
            .query(
                &format!("SELECT {HOLD_COLUMNS} FROM wallet_holds WHERE status = 'reserved'"),
                &[],
            )?
            .iter()
            .map(|r| hold_row(r))
            .collect())
    }

    /// Every stored balance: (account SID, balance).
    pub fn wallet_balances(&mut self) -> Result<Vec<(String, Money)>> {
        Ok(self
            .query("SELECT account_sid, balance FROM wallet_accounts", &[])?
            .iter()
            .map(|r| (r[0].text().to_owned(), r[1].int()))
            .collect())
    }

    /// One stored balance.
    pub fn wallet_balance(&mut self, account_sid: &str) -> Result<Option<Money>> {
        Ok(self
            .query(
                "SELECT balance FROM wallet_accounts WHERE account_sid = $1",
                &[Param::Text(account_sid)],
            )?
            .first()
            .map(|r| r[0].int()))
    }

    /// Credits a top-up once per (account, idempotency key), in one
    /// transaction: `Ok((credit, true))` if this call credited it,
    /// `Ok((first, false))` with the first top-up of that key otherwise.
    pub fn credit_wallet(
        &mut self,
        c: &StoredCredit,
        starting: Money,
    ) -> Result<(StoredCredit, bool)> {
        self.transaction(|tx| {
            let inserted = tx.execute(
                "INSERT INTO wallet_credits (account_sid, idempotency_key, amount, reason, created_at) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (account_sid, idempotency_key) DO NOTHING",
                &[
                    Param::Text(&c.account_sid),
                    Param::Text(&c.idempotency_key),
                    Param::Int(c.amount),
                    Param::Text(&c.reason),
                    Param::Text(&c.created_at),
                ],
            )?;
            if inserted == 0 {
                let r = tx.query(
                    "SELECT account_sid, idempotency_key, amount, reason, created_at \
                     FROM wallet_credits WHERE account_sid = $1 AND idempotency_key = $2",
                    &[Param::Text(&c.account_sid), Param::Text(&c.idempotency_key)],
                )?;
                let r = &r[0];
                return Ok((
                    StoredCredit {
                        account_sid: r[0].text().to_owned(),
                        idempotency_key: r[1].text().to_owned(),
                        amount: r[2].int(),
                        reason: r[3].text().to_owned(),
                        created_at: r[4].text().to_owned(),
                    },
                    false,
                ));
            }
            tx.execute(
                "INSERT INTO wallet_accounts (account_sid, balance) VALUES ($1, $2) \
                 ON CONFLICT (account_sid) DO UPDATE SET balance = wallet_accounts.balance + $3",
                &[
                    Param::Text(&c.account_sid),
                    Param::Int(starting + c.amount),
                    Param::Int(c.amount),
                ],
            )?;
            Ok((c.clone(), true))
        })
    }
}
