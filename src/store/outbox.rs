//! The webhook outbox (`webhook_outbox`, see [`super::schema`]): callbacks
//! written in the transaction that caused them and sent afterwards by the
//! dispatcher ([`crate::webhooks`]), at least once, with a stable id.

use super::{Conn, Param, Result, Value};

/// What an outbox row is the callback of.
pub const KIND_USAGE_TRIGGER: &str = "usage_trigger";

/// A callback to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    /// The idempotency token: the same for every attempt and every replay.
    pub id: String,
    pub account_sid: String,
    /// [`KIND_USAGE_TRIGGER`], `wallet.low_balance`, `wallet.recharge_requested`.
    pub kind: String,
    /// The trigger SID or wallet event id it came from.
    pub source_sid: String,
    pub url: String,
    /// `GET` or `POST`.
    pub method: String,
    /// What a firing's callback parameters are rendered from
    /// ([`crate::triggers::callback`]; rows an older tallyd wrote hold the
    /// form-encoded parameters) or the JSON body (wallet events).
    pub body: String,
    /// Unix ms it was written (the firing's time).
    pub created_at: i64,
}

impl Conn {
    /// Adds `row` as pending, due now; a row with the same id already there
    /// (a replay of the same firing) is left as it is. True if added.
    pub fn insert_outbox(&mut self, row: &OutboxRow) -> Result<bool> {
        Ok(self.insert_outbox_rows(std::slice::from_ref(row))? == 1)
    }
}

impl Conn {
    /// Adds many rows as [`Conn::insert_outbox`] does, one statement per
    /// chunk of 1000 (a flush that fires thousands of triggers); returns how
    /// many were added.
    pub fn insert_outbox_rows(&mut self, rows: &[OutboxRow]) -> Result<u64> {
        Ok(self.insert_rows(rows, None)?.len() as u64)
    }

    /// Adds rows as [`Conn::insert_outbox_rows`] does, but already claimed
    /// for their first attempt until `lease_until` — the claim
    /// [`Conn::claim_outbox`] makes, made by the transaction that writes
    /// them: the caller hands them to its dispatcher after the commit, which
    /// sends them without reading or claiming them first. Returns the ids
    /// added (a row already there is not the caller's to send).
    pub fn insert_outbox_rows_leased(
        &mut self,
        rows: &[OutboxRow],
        lease_until: i64,
    ) -> Result<Vec<String>> {
        self.insert_rows(rows, Some(lease_until))
    }

    /// The ids of `rows` added: pending, due at their `created_at`, or
    /// claimed until `lease`.
    fn insert_rows(&mut self, rows: &[OutboxRow], lease: Option<i64>) -> Result<Vec<String>> {
        let mut added = Vec::new();
        for chunk in rows.chunks(1000) {
            let days: Vec<i64> = chunk
                .iter()
                .map(|r| r.created_at.div_euclid(86_400_000))
                .collect();
            let mut values = Vec::with_capacity(chunk.len());
            let mut params = Vec::with_capacity(chunk.len() * 9);
            for (i, (row, day)) in chunk.iter().zip(&days).enumerate() {
                let b = 1 + i * 9;
                // Attempts and the next attempt's time: a lease is a claim.
                let (attempts, next) = match lease {
                    Some(until) => (1, until.to_string()),
                    None => (0, format!("${}", b + 7)),
                };
                values.push(format!(
                    "(${b}, ${}, ${}, ${}, ${}, ${}, ${}, ${}, ${}, 'pending', {attempts}, {next})",
                    b + 1,
                    b + 2,
                    b + 3,
                    b + 4,
                    b + 5,
                    b + 6,
                    b + 7,
                    b + 8,
                ));
                params.extend([
                    Param::Text(&row.id),
                    Param::Text(&row.account_sid),
                    Param::Text(&row.kind),
                    Param::Text(&row.source_sid),
                    Param::Text(&row.url),
                    Param::Text(&row.method),
                    Param::Text(&row.body),
                    Param::Int(row.created_at),
                    Param::Int(*day),
                ]);
            }
            if values.is_empty() {
                continue;
            }
            let ids = self.query(
                &format!(
                    "INSERT INTO webhook_outbox (id, account_sid, kind, source_sid, url, method, \
                     body, created_at, day, status, attempts, next_attempt_at) VALUES {} \
                     ON CONFLICT (id) DO NOTHING RETURNING id",
                    values.join(", ")
                ),
                &params,
            )?;
            added.extend(ids.iter().map(|r| r[0].text().to_owned()));
        }
        Ok(added)
    }
}

/// Columns of an outbox row as [`Conn::due_outbox`] reads them.
const DUE_COLUMNS: &str = "id, account_sid, kind, source_sid, url, method, body, created_at, \
     attempts, next_attempt_at";

/// A pending row that is due, as read before claiming it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueRow {
    pub row: OutboxRow,
    /// Attempts made so far (a claim counts one).
    pub attempts: i64,
    /// The `next_attempt_at` it was read with: the claim's compare-and-set value.
    pub next_attempt_at: i64,
}

/// An outbox row's delivery state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxState {
    pub id: String,
    pub account_sid: String,
    pub kind: String,
    /// `pending`, `delivered` or `failed`.
    pub status: String,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub last_error: Option<String>,
    pub finished_at: Option<i64>,
}

/// Delivery counts of an account's callbacks: every callback written, those
/// delivered, those given up on (the rest are still being tried).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeliveryCounts {
    pub total: i64,
    pub delivered: i64,
    pub failed: i64,
}

/// An account's wallet-event webhook, without its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountWebhook {
    pub account_sid: String,
    pub url: String,
    pub updated_at: String,
}

const COUNTS: &str = "CAST(COUNT(*) AS BIGINT), \
     CAST(COALESCE(SUM(CASE WHEN status = 'delivered' THEN 1 ELSE 0 END), 0) AS BIGINT), \
     CAST(COALESCE(SUM(CASE WHEN status = 'failed' THEN 1 ELSE 0 END), 0) AS BIGINT)";

/// What a redirect sets besides the address: each row's `next_attempt_at`
/// moved on by a millisecond, so that a claim of a row read before the
/// redirect fails its compare-and-set and the row is read again with where
/// it goes now (an attempt already under way that fails is tried again at
/// its lease's end, to the new address).
const REDIRECTED: &str = "next_attempt_at = next_attempt_at + 1";

/// [`COUNTS`]' columns summed over `webhook_delivery_days`.
const PRUNED_COUNTS: &str = "CAST(COALESCE(SUM(total), 0) AS BIGINT), \
     CAST(COALESCE(SUM(delivered), 0) AS BIGINT), CAST(COALESCE(SUM(failed), 0) AS BIGINT)";

impl std::ops::Add for DeliveryCounts {
    type Output = DeliveryCounts;
    fn add(self, o: DeliveryCounts) -> DeliveryCounts {
        DeliveryCounts {
            total: self.total + o.total,
            delivered: self.delivered + o.delivered,
            failed: self.failed + o.failed,
        }
    }
}

impl std::ops::AddAssign for DeliveryCounts {
    fn add_assign(&mut self, o: DeliveryCounts) {
        *self = *self + o;
    }
}

fn counts(r: &[Value]) -> DeliveryCounts {
    DeliveryCounts {
        total: r[0].int(),
        delivered: r[1].int(),
        failed: r[2].int(),
    }
}

impl Conn {
    /// Pending rows due at `now` (Unix ms), soonest first, at most `limit`,
    /// leaving out the accounts in `skip` (those with as many callbacks in
    /// flight as they may have: their backlog must not hide other accounts'
    /// rows from the batch).
    pub fn due_outbox(&mut self, now: i64, limit: i64, skip: &[String]) -> Result<Vec<DueRow>> {
        let mut params = vec![Param::Int(now)];
        params.extend(skip.iter().map(|s| Param::Text(s)));
        let not_in = if skip.is_empty() {
            String::new()
        } else {
            format!(
                "AND account_sid NOT IN ({}) ",
                super::conn::placeholders(2, skip.len())
            )
        };
        params.push(Param::Int(limit));
        let sql = format!(
            "SELECT {DUE_COLUMNS} FROM webhook_outbox WHERE status = 'pending' \
             AND next_attempt_at <= $1 {not_in}ORDER BY next_attempt_at, id LIMIT ${}",
            skip.len() + 2
        );
        Ok(self
            .query(&sql, &params)?
            .iter()
            .map(|r| DueRow {
                row: OutboxRow {
                    id: r[0].text().to_owned(),
                    account_sid: r[1].text().to_owned(),
                    kind: r[2].text().to_owned(),
                    source_sid: r[3].text().to_owned(),
                    url: r[4].text().to_owned(),
                    method: r[5].text().to_owned(),
                    body: r[6].text().to_owned(),
                    created_at: r[7].int(),
                },
                attempts: r[8].int(),
                next_attempt_at: r[9].int(),
            })
            .collect())
    }

    /// Claims due rows for one attempt each, in one transaction: a row is
    /// claimed only if it is still pending with the `next_attempt_at` it was
    /// read with (the compare-and-set that keeps two instances from sending
    /// one row at once); its `next_attempt_at` becomes `lease_until`, when
    /// another instance may take it over if this one never reports, and its
    /// attempt is counted. Returns, per row, whether this call claimed it.
    ///
    /// Rows are locked in id order, as every other change of several rows
    /// here locks them ([`Conn::pending_of`]): on PostgreSQL two such
    /// transactions never wait for each other in a cycle.
    pub fn claim_outbox(&mut self, rows: &[(&str, i64)], lease_until: i64) -> Result<Vec<bool>> {
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_unstable_by_key(|&i| rows[i].0);
        self.transaction(|c| {
            let mut claimed = vec![false; rows.len()];
            for i in order {
                let (id, seen) = rows[i];
                claimed[i] = c.execute(
                    "UPDATE webhook_outbox SET next_attempt_at = $1, attempts = attempts + 1 \
                     WHERE id = $2 AND status = 'pending' AND next_attempt_at = $3",
                    &[Param::Int(lease_until), Param::Text(id), Param::Int(seen)],
                )? == 1;
            }
            Ok(claimed)
        })
    }

    /// The condition "`id` is one of the pending rows that pass `filter`",
    /// which on PostgreSQL also locks those rows in id order (a plain
    /// `UPDATE … WHERE filter` locks them in scan order, and could wait in a
    /// cycle with a claim of the same rows).
    fn pending_of(&self, filter: &str) -> String {
        let lock = self.row_lock(" ORDER BY id FOR UPDATE");
        format!("id IN (SELECT id FROM webhook_outbox WHERE {filter} AND status = 'pending'{lock})")
    }

    /// Marks a row delivered at `at` (a receiver answered 2xx). Whoever holds
    /// the lease, a delivered callback is delivered. True if it was pending.
    pub fn outbox_delivered(&mut self, id: &str, at: i64) -> Result<bool> {
        Ok(self.execute(
            "UPDATE webhook_outbox SET status = 'delivered', finished_at = $1, last_error = NULL \
             WHERE id = $2 AND status = 'pending'",
            &[Param::Int(at), Param::Text(id)],
        )? == 1)
    }

    /// After a failed attempt made under the lease ending `lease`: the row is
    /// due again at `next` (`Some`) or failed for good at `at` (`None`), with
    /// `error` saying why. Nothing changes if the lease was taken over (the
    /// other instance reports its own attempt). True if changed.
    pub fn outbox_attempt_failed(
        &mut self,
        id: &str,
        lease: i64,
        next: Option<i64>,
        at: i64,
        error: &str,
    ) -> Result<bool> {
        // Due again at `next`, or failed for good at `at`.
        let (sql, first) = match next {
            Some(next) => (
                "UPDATE webhook_outbox SET next_attempt_at = $1, last_error = $2 \
                 WHERE id = $3 AND status = 'pending' AND next_attempt_at = $4",
                next,
            ),
            None => (
                "UPDATE webhook_outbox SET status = 'failed', finished_at = $1, last_error = $2 \
                 WHERE id = $3 AND status = 'pending' AND next_attempt_at = $4",
                at,
            ),
        };
        let n = self.execute(
            sql,
            &[
                Param::Int(first),
                Param::Text(error),
                Param::Text(id),
                Param::Int(lease),
            ],
        )?;
        Ok(n == 1)
    }

    /// Rows still pending (the outbox's depth).
    pub fn outbox_pending(&mut self) -> Result<i64> {
        Ok(self
            .query(
                "SELECT CAST(COUNT(*) AS BIGINT) FROM webhook_outbox WHERE status = 'pending'",
                &[],
            )?
            .first()
            .map_or(0, |r| r[0].int()))
    }

    /// One row's delivery state.
    pub fn outbox_state(&mut self, id: &str) -> Result<Option<OutboxState>> {
        Ok(self
            .query(
                "SELECT id, account_sid, kind, status, attempts, next_attempt_at, last_error, \
                 finished_at FROM webhook_outbox WHERE id = $1",
                &[Param::Text(id)],
            )?
            .first()
            .map(|r| OutboxState {
                id: r[0].text().to_owned(),
                account_sid: r[1].text().to_owned(),
                kind: r[2].text().to_owned(),
                status: r[3].text().to_owned(),
                attempts: r[4].int(),
                next_attempt_at: r[5].int(),
                last_error: r[6].opt_text().map(str::to_owned),
                finished_at: r[7].opt_int(),
            }))
    }

    /// An account's delivery counts over all time.
    pub fn delivery_counts(&mut self, sid: &str) -> Result<DeliveryCounts> {
        let live = self
            .query(
                &format!("SELECT {COUNTS} FROM webhook_outbox WHERE account_sid = $1"),
                &[Param::Text(sid)],
            )?
            .first()
            .map(|r| counts(r))
            .unwrap_or_default();
        let pruned = self
            .query(
                &format!(
                    "SELECT {PRUNED_COUNTS} FROM webhook_delivery_days WHERE account_sid = $1"
                ),
                &[Param::Text(sid)],
            )?
            .first()
            .map(|r| counts(r))
            .unwrap_or_default();
        Ok(live + pruned)
    }

    /// An account's delivery counts per day its callbacks were written (days
    /// since 1970), for days `from..=to`; days without callbacks are absent.
    pub fn delivery_counts_by_day(
        &mut self,
        sid: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<(i64, DeliveryCounts)>> {
        let params = [Param::Text(sid), Param::Int(from), Param::Int(to)];
        let live = self.query(
            &format!(
                "SELECT day, {COUNTS} FROM webhook_outbox \
                 WHERE account_sid = $1 AND day >= $2 AND day <= $3 GROUP BY day"
            ),
            &params,
        )?;
        let pruned = self.query(
            "SELECT day, total, delivered, failed FROM webhook_delivery_days \
             WHERE account_sid = $1 AND day >= $2 AND day <= $3",
            &params,
        )?;
        let mut by_day: std::collections::BTreeMap<i64, DeliveryCounts> = Default::default();
        for r in live.iter().chain(&pruned) {
            *by_day.entry(r[0].int()).or_default() += counts(&r[1..]);
        }
        Ok(by_day.into_iter().collect())
    }

    /// Removes up to `limit` callbacks that finished (delivered or failed)
    /// before `before` (Unix ms), oldest first, after adding them to
    /// `webhook_delivery_days`: the delivery stats count them as before.
    /// One transaction, serialised between PostgreSQL instances (two must
    /// not both count the same rows). Returns how many it removed.
    pub fn prune_outbox(&mut self, before: i64, limit: i64) -> Result<u64> {
        const OLDEST: &str = "SELECT id FROM webhook_outbox WHERE finished_at < $1 \
             ORDER BY finished_at, id LIMIT $2";
        let params = [Param::Int(before), Param::Int(limit)];
        self.transaction(|c| {
            if matches!(c, Conn::Postgres(_)) {
                c.execute("SELECT pg_advisory_xact_lock(7461727)", &[])?;
            }
            c.execute(
                &format!(
                    "INSERT INTO webhook_delivery_days (account_sid, day, total, delivered, failed) \
                     SELECT account_sid, day, {COUNTS} FROM webhook_outbox \
                     WHERE id IN ({OLDEST}) GROUP BY account_sid, day \
                     ON CONFLICT (account_sid, day) DO UPDATE SET \
                     total = webhook_delivery_days.total + excluded.total, \
                     delivered = webhook_delivery_days.delivered + excluded.delivered, \
                     failed = webhook_delivery_days.failed + excluded.failed"
                ),
                &params,
            )?;
            c.execute(
                &format!("DELETE FROM webhook_outbox WHERE id IN ({OLDEST})"),
                &params,
            )
        })
    }

    /// The keys callbacks of `kind` to `accounts` are signed with now: each
    /// account's auth token (usage triggers) or its webhook secret (wallet
    /// events), read in one query per 500 accounts; an account (or webhook)
    /// that is gone is absent.
    pub fn signing_keys(
        &mut self,
        kind: &str,
        accounts: &[&str],
    ) -> Result<std::collections::HashMap<String, String>> {
        let (column, table) = if kind == KIND_USAGE_TRIGGER {
            ("auth_token", "api_accounts")
        } else {
            ("secret", "account_webhooks")
        };
        let mut keys = std::collections::HashMap::with_capacity(accounts.len());
        for chunk in accounts.chunks(500) {
            let params: Vec<Param> = chunk.iter().map(|a| Param::Text(a)).collect();
            let sql = format!(
                "SELECT account_sid, {column} FROM {table} WHERE account_sid IN ({})",
                super::conn::placeholders(1, chunk.len())
            );
            for r in self.query(&sql, &params)? {
                keys.insert(r[0].text().to_owned(), r[1].text().to_owned());
            }
        }
        Ok(keys)
    }

    /// Sets (or replaces) an account's wallet-event webhook.
    pub fn set_account_webhook(
        &mut self,
        sid: &str,
        url: &str,
        secret: &str,
        updated_at: &str,
    ) -> Result<()> {
        self.execute(
            "INSERT INTO account_webhooks (account_sid, url, secret, updated_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (account_sid) DO UPDATE SET \
             url = excluded.url, secret = excluded.secret, updated_at = excluded.updated_at",
            &[
                Param::Text(sid),
                Param::Text(url),
                Param::Text(secret),
                Param::Text(updated_at),
            ],
        )?;
        Ok(())
    }

    pub fn account_webhook(&mut self, sid: &str) -> Result<Option<AccountWebhook>> {
        Ok(self
            .query(
                "SELECT account_sid, url, updated_at FROM account_webhooks WHERE account_sid = $1",
                &[Param::Text(sid)],
            )?
            .first()
            .map(|r| AccountWebhook {
                account_sid: r[0].text().to_owned(),
                url: r[1].text().to_owned(),
                updated_at: r[2].text().to_owned(),
            }))
    }

    /// Removes an account's webhook; true if it had one.
    pub fn delete_account_webhook(&mut self, sid: &str) -> Result<bool> {
        Ok(self.execute(
            "DELETE FROM account_webhooks WHERE account_sid = $1",
            &[Param::Text(sid)],
        )? == 1)
    }

    /// Points the callbacks of usage trigger `trigger_sid` not yet delivered
    /// at its `url` and `method` as they are now: an updated trigger's
    /// retries go where it says, not where it said when it fired. Returns how
    /// many.
    pub fn redirect_trigger_callbacks(
        &mut self,
        trigger_sid: &str,
        url: &str,
        method: &str,
    ) -> Result<u64> {
        let which = self.pending_of("kind = $3 AND source_sid = $4");
        self.execute(
            &format!("UPDATE webhook_outbox SET url = $1, method = $2, {REDIRECTED} WHERE {which}"),
            &[
                Param::Text(url),
                Param::Text(method),
                Param::Text(KIND_USAGE_TRIGGER),
                Param::Text(trigger_sid),
            ],
        )
    }

    /// Fails the callbacks of usage trigger `trigger_sid` not yet delivered
    /// (it was deleted: nothing is sent for it any more). Returns how many.
    pub fn drop_trigger_callbacks(&mut self, trigger_sid: &str, at: i64) -> Result<u64> {
        let which = self.pending_of("kind = $2 AND source_sid = $3");
        self.execute(
            &format!(
                "UPDATE webhook_outbox SET status = 'failed', finished_at = $1, \
                 last_error = 'the usage trigger was deleted' WHERE {which}"
            ),
            &[
                Param::Int(at),
                Param::Text(KIND_USAGE_TRIGGER),
                Param::Text(trigger_sid),
            ],
        )
    }

    /// Points the account's wallet events not yet delivered at its webhook's
    /// `url` as it is now (signed, like every attempt, with its secret as it
    /// is now). Returns how many.
    pub fn redirect_wallet_events(&mut self, account_sid: &str, url: &str) -> Result<u64> {
        let which = self.pending_of("account_sid = $2 AND kind <> $3");
        self.execute(
            &format!("UPDATE webhook_outbox SET url = $1, {REDIRECTED} WHERE {which}"),
            &[
                Param::Text(url),
                Param::Text(account_sid),
                Param::Text(KIND_USAGE_TRIGGER),
            ],
        )
    }

    /// Queues a wallet event for the account's webhook, if it has one (in the
    /// caller's transaction): id = the event id, POST of the JSON payload.
    /// True if a row was added.
    pub fn insert_wallet_event_outbox(
        &mut self,
        event_id: &str,
        sid: &str,
        kind: &str,
        payload: &str,
        created_at: i64,
    ) -> Result<bool> {
        let day = created_at.div_euclid(86_400_000);
        Ok(self.execute(
            "INSERT INTO webhook_outbox (id, account_sid, kind, source_sid, url, method, body, \
             created_at, day, status, attempts, next_attempt_at) \
             SELECT CAST($1 AS TEXT), account_sid, CAST($2 AS TEXT), CAST($1 AS TEXT), url, 'POST', \
             CAST($3 AS TEXT), CAST($4 AS BIGINT), \
             CAST($5 AS BIGINT), 'pending', 0, CAST($4 AS BIGINT) \
             FROM account_webhooks WHERE account_sid = $6 \
             ON CONFLICT (id) DO NOTHING",
            &[
                Param::Text(event_id),
                Param::Text(kind),
                Param::Text(payload),
                Param::Int(created_at),
                Param::Int(day),
                Param::Text(sid),
            ],
        )? == 1)
    }
}
