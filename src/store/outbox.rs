//! The webhook outbox (`webhook_outbox`, see [`super::schema`]): callbacks
//! written in the transaction that caused them and sent afterwards by the
//! dispatcher ([`crate::webhooks`]), at least once, with a stable id.

use super::{Conn, Param, Result};

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
    /// Form-encoded parameters (triggers) or the JSON body (wallet events).
    pub body: String,
    /// Unix ms it was written (the firing's time).
    pub created_at: i64,
}

impl Conn {
    /// Adds `row` as pending, due now; a row with the same id already there
    /// (a replay of the same firing) is left as it is. True if added.
    pub fn insert_outbox(&mut self, row: &OutboxRow) -> Result<bool> {
        let day = row.created_at.div_euclid(86_400_000);
        Ok(self.execute(
            "INSERT INTO webhook_outbox (id, account_sid, kind, source_sid, url, method, body, \
             created_at, day, status, attempts, next_attempt_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'pending', 0, $8) \
             ON CONFLICT (id) DO NOTHING",
            &[
                Param::Text(&row.id),
                Param::Text(&row.account_sid),
                Param::Text(&row.kind),
                Param::Text(&row.source_sid),
                Param::Text(&row.url),
                Param::Text(&row.method),
                Param::Text(&row.body),
                Param::Int(row.created_at),
                Param::Int(day),
            ],
        )? == 1)
    }
}
