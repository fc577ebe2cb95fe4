//! Wallet rows: balances, holds and top-ups (tables in [`super::schema`]).
//!
//! The stored balance is the starting credit plus every top-up minus every
//! *flushed* debit: a partition's debits since its last flush are added in the
//! flush transaction with its offsets ([`WalletRows`], a step of
//! [`Conn::write_flush`]), so after a crash the replay from the stored offsets
//! re-debits exactly what the store does not have. Top-ups are written before
//! their HTTP answer leaves, in transactions of their own; hold grants and
//! releases too, by the hold writer, many to a transaction
//! ([`Conn::write_holds`]; on SQLite into a file of their own, [`super::holds`]).
//!
//! With several instances, a partition's wallets have one owner at a time,
//! recorded in `wallet_owners` with an epoch bumped at every assignment
//! ([`Conn::claim_partitions`]). A hold, release or top-up is written in a
//! transaction that first checks its instance's epoch is still the row's
//! ([`Fence`]): the check locks the row, so a new owner's claim waits for it
//! and then loads what it wrote, or comes first and the stale write is refused
//! (and nothing is granted).

use super::{Conn, Param, Result, Value};
use crate::wallet::{decimal, CallBilling, HoldStatus, LowBalance, Money, WalletCut};

/// A partition's wallet changes, written with its flush.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WalletRows {
    /// (account SID, sum of debits, starting credit if the account has no row).
    pub debits: Vec<(String, Money, Money)>,
    pub holds: Vec<HoldUpdate>,
    /// Low-balance defaults for accounts that set none.
    pub low_balance: LowBalance,
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
        let mut rows = WalletRows {
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
            low_balance: cut.low_balance,
        };
        // In the order the hold writer locks rows in (see
        // [`Conn::fenced_writes`]), so a flush and a batch of holds written at
        // once on PostgreSQL never wait for each other in a cycle.
        rows.holds
            .sort_by(|a, b| (&a.account_sid, &a.call_id).cmp(&(&b.account_sid, &b.call_id)));
        rows
    }
}

/// A wallet event in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub event_id: String,
    pub account_sid: String,
    pub kind: String,
    /// The event's JSON body.
    pub payload: String,
    pub created_at: String,
}

/// A balance row after a change: balance, own threshold and recharge amount,
/// armed, crossings.
const AFTER: &str =
    "RETURNING balance, low_balance_threshold, recharge_amount, low_armed, low_crossings";

struct After {
    balance: Money,
    low: LowBalance,
    armed: bool,
    crossings: i64,
}

fn after(r: &[Value], defaults: LowBalance) -> After {
    After {
        balance: r[0].int(),
        low: LowBalance {
            threshold: r[1].opt_int().unwrap_or(defaults.threshold),
            recharge: r[2].opt_int().unwrap_or(defaults.recharge),
        },
        armed: r[3].int() != 0,
        crossings: r[4].int(),
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

/// A write of the hold writer ([`crate::wallet::commit`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldWrite {
    /// A granted hold: stored unless its call id has one.
    Grant(StoredHold),
    /// A hold released (explicitly or at expiry).
    Release(StoredHold),
}

impl HoldWrite {
    /// The row it writes: (account SID, call id).
    fn key(&self) -> (&str, &str) {
        let (HoldWrite::Grant(h) | HoldWrite::Release(h)) = self;
        (&h.account_sid, &h.call_id)
    }
}

/// The ownership a wallet write depends on: its partition's epoch as this
/// instance claimed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub topic: String,
    pub partition: i32,
    pub epoch: i64,
}

impl Conn {
    /// Records `owner` as the owner of `partitions` of `topic`, one epoch
    /// later than the last owner's (1 for the first); returns each partition's
    /// new epoch. In one transaction.
    pub fn claim_partitions(
        &mut self,
        topic: &str,
        partitions: &[i32],
        owner: &str,
    ) -> Result<Vec<(i32, i64)>> {
        let epochs = self.transaction(|c| {
            let mut epochs = Vec::with_capacity(partitions.len());
            for &p in partitions {
                let r = c.query(
                    "INSERT INTO wallet_owners (topic, partition, owner, epoch) VALUES ($1, $2, $3, 1) \
                     ON CONFLICT (topic, partition) DO UPDATE SET owner = excluded.owner, \
                     epoch = wallet_owners.epoch + 1 RETURNING epoch",
                    &[Param::Text(topic), Param::Int(p.into()), Param::Text(owner)],
                )?;
                epochs.push((p, r[0][0].int()));
            }
            Ok(epochs)
        })?;
        self.claim_holds(topic, &epochs, owner)?;
        Ok(epochs)
    }

    /// The recorded owner of a partition and its epoch.
    pub fn wallet_owner(&mut self, topic: &str, partition: i32) -> Result<Option<(String, i64)>> {
        Ok(self
            .query(
                "SELECT owner, epoch FROM wallet_owners WHERE topic = $1 AND partition = $2",
                &[Param::Text(topic), Param::Int(partition.into())],
            )?
            .first()
            .map(|r| (r[0].text().to_owned(), r[1].int())))
    }

    /// Runs `f` in a transaction if `fence` (when given) still holds: its
    /// row is locked first, so the partition cannot change owner until the
    /// transaction ends. `Ok(None)`: fenced, nothing written.
    pub fn fenced<T>(
        &mut self,
        fence: Option<&Fence>,
        f: impl FnOnce(&mut Conn) -> Result<T>,
    ) -> Result<Option<T>> {
        self.transaction(|c| {
            if let Some(fence) = fence {
                if !c.hold_fence(fence)? {
                    return Ok(None);
                }
            }
            f(c).map(Some)
        })
    }

    /// Locks the fence's row until the transaction ends if it still has the
    /// fence's epoch; false if another instance claimed the partition since.
    /// PostgreSQL takes a shared lock: writers under the same fence go on at
    /// once, a claim ([`Conn::claim_partitions`]) waits for them all. SQLite's
    /// transaction already holds the database's one write lock.
    fn hold_fence(&mut self, fence: &Fence) -> Result<bool> {
        let lock = self.row_lock(" FOR SHARE");
        let held = self.query(
            &format!(
                "SELECT 1 FROM wallet_owners \
                 WHERE topic = $1 AND partition = $2 AND epoch = $3{lock}"
            ),
            &[
                Param::Text(&fence.topic),
                Param::Int(fence.partition.into()),
                Param::Int(fence.epoch),
            ],
        )?;
        Ok(!held.is_empty())
    }

    /// The flush step: adds each account's debits into its balance and
    /// records the holds its CDRs settled or released.
    pub(super) fn write_wallet_rows(&mut self, w: &WalletRows, as_of: &str) -> Result<()> {
        for (sid, amount, start) in &w.debits {
            let r = self.query(
                &format!(
                    "INSERT INTO wallet_accounts (account_sid, balance) VALUES ($1, $2) \
                     ON CONFLICT (account_sid) DO UPDATE SET balance = wallet_accounts.balance - $3 \
                     {AFTER}"
                ),
                &[
                    Param::Text(sid),
                    Param::Int(start - amount),
                    Param::Int(*amount),
                ],
            )?;
            let a = after(&r[0], w.low_balance);
            if a.armed && a.balance < a.low.threshold {
                self.low_balance_crossed(sid, &a, as_of)?;
            }
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

    /// Records a downward crossing of the low-balance threshold: disarms the
    /// account and writes one event to `wallet_events` and, for an account
    /// with a webhook, to `webhook_outbox`, in the caller's transaction.
    fn low_balance_crossed(&mut self, sid: &str, a: &After, at: &str) -> Result<()> {
        let n = a.crossings + 1;
        self.execute(
            "UPDATE wallet_accounts SET low_armed = 0, low_crossings = $1 WHERE account_sid = $2",
            &[Param::Int(n), Param::Text(sid)],
        )?;
        let kind = if a.low.recharge > 0 {
            "wallet.recharge_requested"
        } else {
            "wallet.low_balance"
        };
        let id = format!("evt_{sid}_{n}");
        let mut data = serde_json::json!({
            "account_sid": sid,
            "balance": decimal(a.balance),
            "threshold": decimal(a.low.threshold),
        });
        if a.low.recharge > 0 {
            data["amount"] = decimal(a.low.recharge).into();
        }
        let payload =
            serde_json::json!({"id": id, "type": kind, "created_at": at, "data": data}).to_string();
        self.execute(
            "INSERT INTO wallet_events (event_id, account_sid, kind, payload, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
            &[
                Param::Text(&id),
                Param::Text(sid),
                Param::Text(kind),
                Param::Text(&payload),
                Param::Text(at),
            ],
        )?;
        // Sent to the account's webhook, if it has one, by the dispatcher.
        let created_ms = crate::calendar::parse_rfc3339(at)
            .map_or_else(|| chrono::Utc::now().timestamp_millis(), |s| s * 1000);
        self.insert_wallet_event_outbox(&id, sid, kind, &payload, created_ms)?;
        Ok(())
    }

    /// Sets an account's own low-balance threshold and recharge amount
    /// (`None`: the `[wallet]` defaults), creating its wallet row with the
    /// starting credit if it has none.
    pub fn set_low_balance(
        &mut self,
        sid: &str,
        threshold: Option<Money>,
        recharge: Option<Money>,
        starting: Money,
    ) -> Result<()> {
        // -1 stands for NULL: one statement text whichever is set.
        self.execute(
            "INSERT INTO wallet_accounts (account_sid, balance, low_balance_threshold, recharge_amount) \
             VALUES ($1, $2, NULLIF(CAST($3 AS BIGINT), -1), NULLIF(CAST($4 AS BIGINT), -1)) \
             ON CONFLICT (account_sid) DO UPDATE SET \
             low_balance_threshold = excluded.low_balance_threshold, \
             recharge_amount = excluded.recharge_amount",
            &[
                Param::Text(sid),
                Param::Int(starting),
                Param::Int(threshold.unwrap_or(-1)),
                Param::Int(recharge.unwrap_or(-1)),
            ],
        )?;
        Ok(())
    }

    /// An account's own low-balance settings: (threshold, recharge amount).
    pub fn low_balance_settings(&mut self, sid: &str) -> Result<(Option<Money>, Option<Money>)> {
        Ok(self
            .query(
                "SELECT low_balance_threshold, recharge_amount FROM wallet_accounts \
                 WHERE account_sid = $1",
                &[Param::Text(sid)],
            )?
            .first()
            .map(|r| (r[0].opt_int(), r[1].opt_int()))
            .unwrap_or_default())
    }

    /// Outbox events, oldest first: one account's or all, at most `limit`.
    pub fn wallet_events(&mut self, sid: Option<&str>, limit: i64) -> Result<Vec<StoredEvent>> {
        let rows = match sid {
            Some(sid) => self.query(
                "SELECT event_id, account_sid, kind, payload, created_at FROM wallet_events \
                 WHERE account_sid = $1 ORDER BY created_at, event_id LIMIT $2",
                &[Param::Text(sid), Param::Int(limit)],
            )?,
            None => self.query(
                "SELECT event_id, account_sid, kind, payload, created_at FROM wallet_events \
                 ORDER BY created_at, event_id LIMIT $1",
                &[Param::Int(limit)],
            )?,
        };
        Ok(rows
            .iter()
            .map(|r| StoredEvent {
                event_id: r[0].text().to_owned(),
                account_sid: r[1].text().to_owned(),
                kind: r[2].text().to_owned(),
                payload: r[3].text().to_owned(),
                created_at: r[4].text().to_owned(),
            })
            .collect())
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
        self.hold_row(&h.account_sid, &h.call_id)
    }

    /// Stores many granted holds in one transaction (a group commit): as
    /// [`Conn::write_holds`] with grants only.
    pub fn insert_holds(
        &mut self,
        holds: &[(StoredHold, Option<Fence>)],
    ) -> Result<Vec<Option<Option<StoredHold>>>> {
        let writes: Vec<(HoldWrite, Option<Fence>)> = holds
            .iter()
            .map(|(h, f)| (HoldWrite::Grant(h.clone()), f.clone()))
            .collect();
        self.write_holds(&writes)
    }

    /// Writes many grants and releases in one transaction, in order (a group
    /// commit; on SQLite into the holds file, see [`super::holds`]). Each
    /// result is `None` for a write whose [`Fence`] no longer holds (nothing
    /// written); for a grant, `Some` of what [`Conn::insert_hold`] returns;
    /// for a release, `Some(None)`.
    pub fn write_holds(
        &mut self,
        writes: &[(HoldWrite, Option<Fence>)],
    ) -> Result<Vec<Option<Option<StoredHold>>>> {
        if let Conn::Sqlite(_) = self {
            let mut holds = super::holds::open_beside(self)?;
            return super::holds::write_split(self, &mut holds, writes);
        }
        self.fenced_writes(writes, |c, _, w| match w {
            HoldWrite::Grant(h) => c.insert_hold(h),
            HoldWrite::Release(h) => c.release_hold(h).map(|()| None),
        })
    }

    /// Runs `write` for each write of the batch whose fence holds, in one
    /// transaction: each fence's row is locked once, before anything is
    /// written, as [`Conn::fenced`] does. `None` for a fenced write.
    ///
    /// Rows are locked in one order, so batches written at once on several
    /// PostgreSQL connections (and a flush settling holds) never wait for
    /// each other in a cycle: the fences sorted, then the holds by account
    /// and call id — writes of one call id keep their order in the batch
    /// (a grant before its release). Results are in the order of `writes`.
    pub(super) fn fenced_writes(
        &mut self,
        writes: &[(HoldWrite, Option<Fence>)],
        mut write: impl FnMut(&mut Conn, usize, &HoldWrite) -> Result<Option<StoredHold>>,
    ) -> Result<Vec<Option<Option<StoredHold>>>> {
        self.transaction(|c| {
            let mut wanted: Vec<&Fence> = writes.iter().filter_map(|(_, f)| f.as_ref()).collect();
            wanted.sort_by(|a, b| {
                (&a.topic, a.partition, a.epoch).cmp(&(&b.topic, b.partition, b.epoch))
            });
            wanted.dedup();
            let mut fences: Vec<(&Fence, bool)> = Vec::with_capacity(wanted.len());
            for fence in wanted {
                fences.push((fence, c.hold_fence(fence)?));
            }
            let mut order: Vec<usize> = (0..writes.len()).collect();
            order.sort_by(|&a, &b| writes[a].0.key().cmp(&writes[b].0.key()));
            let mut out = vec![None; writes.len()];
            for i in order {
                let (w, fence) = &writes[i];
                let held = fence
                    .as_ref()
                    .map_or(true, |f| fences.iter().any(|(g, ok)| *g == f && *ok));
                if held {
                    out[i] = Some(write(c, i, w)?);
                }
            }
            Ok(out)
        })
    }

    /// Marks a hold released (explicitly or at expiry) if it is reserved;
    /// stores it released if its grant is not stored yet (a release may be
    /// written before the grant it follows, which then finds it released).
    pub fn release_hold(&mut self, h: &StoredHold) -> Result<()> {
        self.execute(
            "INSERT INTO wallet_holds (account_sid, call_id, amount, status, created_at, expires_at) \
             VALUES ($1, $2, $3, 'released', $4, $5) ON CONFLICT (account_sid, call_id) \
             DO UPDATE SET status = 'released' WHERE wallet_holds.status = 'reserved'",
            &[
                Param::Text(&h.account_sid),
                Param::Text(&h.call_id),
                Param::Int(h.amount),
                Param::Int(h.created_at),
                Param::Int(h.expires_at),
            ],
        )?;
        Ok(())
    }

    /// A hold as stored (on SQLite, as the store and its holds file have
    /// it between them: see [`super::holds`]).
    pub fn hold(&mut self, account_sid: &str, call_id: &str) -> Result<Option<StoredHold>> {
        match self {
            Conn::Sqlite(_) => self.merged_hold(account_sid, call_id),
            Conn::Postgres(_) => self.hold_row(account_sid, call_id),
        }
    }

    /// Every hold still reserved (on SQLite, in the store and its holds file
    /// together).
    pub fn reserved_holds(&mut self) -> Result<Vec<StoredHold>> {
        match self {
            Conn::Sqlite(_) => self.merged_reserved_holds(),
            Conn::Postgres(_) => self.reserved_rows(),
        }
    }

    /// The row of a hold in this database.
    pub(super) fn hold_row(
        &mut self,
        account_sid: &str,
        call_id: &str,
    ) -> Result<Option<StoredHold>> {
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

    /// The reserved holds of this database.
    pub(super) fn reserved_rows(&mut self) -> Result<Vec<StoredHold>> {
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
    /// A top-up that lifts the balance to the threshold or above re-arms the
    /// low-balance event.
    pub fn credit_wallet(
        &mut self,
        c: &StoredCredit,
        starting: Money,
        defaults: LowBalance,
    ) -> Result<(StoredCredit, bool)> {
        self.transaction(|tx| tx.credit_wallet_in(c, starting, defaults))
    }

    /// [`Conn::credit_wallet`] in the caller's transaction.
    pub fn credit_wallet_in(
        &mut self,
        c: &StoredCredit,
        starting: Money,
        defaults: LowBalance,
    ) -> Result<(StoredCredit, bool)> {
        {
            let tx = self;
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
            let r = tx.query(
                &format!(
                    "INSERT INTO wallet_accounts (account_sid, balance) VALUES ($1, $2) \
                     ON CONFLICT (account_sid) DO UPDATE SET balance = wallet_accounts.balance + $3 \
                     {AFTER}"
                ),
                &[
                    Param::Text(&c.account_sid),
                    Param::Int(starting + c.amount),
                    Param::Int(c.amount),
                ],
            )?;
            let a = after(&r[0], defaults);
            if !a.armed && a.balance >= a.low.threshold {
                tx.execute(
                    "UPDATE wallet_accounts SET low_armed = 1 WHERE account_sid = $1",
                    &[Param::Text(&c.account_sid)],
                )?;
            }
            Ok((c.clone(), true))
        }
    }
}
