//! Accounts that may read usage: SID, auth token, optional parent (a subaccount),
//! plan name and limits, and AgentPhone API keys. They live in the store
//! (`api_accounts`, `api_keys`), so every daemon instance sees the same set.
//!
//! The store is the source of truth. `[[api.accounts]]` in config only seeds
//! accounts the store does not have yet (with their keys); an account that
//! exists is left as it is, so a token rotated or a key revoked through the
//! admin API stays so across restarts. A config entry that differs from its
//! stored account is reported at start ([`seed_from_config`]).
//!
//! Auth tokens are kept as given, because Twilio's request signatures
//! (`X-Twilio-Signature` on callbacks) are computed with the token itself; they
//! are shown once (when an account is created or its token rotated), never
//! listed, and redacted from `Debug`. API keys are kept only as SHA-256
//! hashes: a key is shown once, when it is registered.

use rand::RngCore;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::{AccountConfig, PlanLimits, Secret};
use crate::store::{Conn, Param, Result, Value};

/// One account as stored. Serialized without its auth token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Account {
    pub sid: String,
    #[serde(skip_serializing)]
    pub auth_token: Secret,
    pub parent_sid: Option<String>,
    pub friendly_name: String,
    /// Plan name shown by `/v1/usage`; `None` means the account's rating plan.
    pub plan: Option<String>,
    pub limits: PlanLimits,
    /// RFC 3339.
    pub created_at: String,
    pub updated_at: String,
}

/// Whether `s` is an account SID: `AC` + 32 lowercase hex digits.
pub fn is_account_sid(s: &str) -> bool {
    crate::cdr::AccountSid::parse(s).is_some()
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex(&b)
}

fn hex(b: &[u8]) -> String {
    const H: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(H[(x >> 4) as usize] as char);
        s.push(H[(x & 15) as usize] as char);
    }
    s
}

/// A fresh account SID.
pub fn new_account_sid() -> String {
    format!("AC{}", random_hex(16))
}

/// A fresh 32-hex-digit auth token (Twilio's format).
pub fn new_auth_token() -> String {
    random_hex(16)
}

/// A fresh AgentPhone-style API key.
pub fn new_api_key() -> String {
    format!("ap_{}", random_hex(24))
}

/// SHA-256 of an API key, hex: what the store keeps instead of the key.
pub fn key_hash(key: &str) -> String {
    hex(&Sha256::digest(key.as_bytes()))
}

/// The public handle of a key: derived from its hash, safe to list.
pub fn key_id(hash: &str) -> String {
    format!("key_{}", &hash[..16])
}

/// Compares secrets without an early exit on the first differing byte.
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

const COLUMNS: &str = "account_sid, auth_token, parent_sid, friendly_name, plan_name, \
     numbers_limit, messages_per_month, voice_minutes_per_month, \
     max_call_duration_minutes, concurrent_calls, created_at, updated_at";

fn from_row(r: &[Value]) -> Account {
    Account {
        sid: r[0].text().to_owned(),
        auth_token: Secret::new(r[1].text()),
        parent_sid: r[2].opt_text().map(str::to_owned),
        friendly_name: r[3].text().to_owned(),
        plan: r[4].opt_text().map(str::to_owned),
        limits: PlanLimits {
            numbers: r[5].int(),
            messages_per_month: r[6].int(),
            voice_minutes_per_month: r[7].int(),
            max_call_duration_minutes: r[8].int(),
            concurrent_calls: r[9].int(),
        },
        created_at: r[10].text().to_owned(),
        updated_at: r[11].text().to_owned(),
    }
}

pub fn get(c: &mut Conn, sid: &str) -> Result<Option<Account>> {
    let sql = format!("SELECT {COLUMNS} FROM api_accounts WHERE account_sid = $1");
    Ok(c.query(&sql, &[Param::Text(sid)])?
        .first()
        .map(|r| from_row(r)))
}

/// An account, whether it has subaccounts, and the store's `last_flush`: what a
/// usage listing needs before it reads records, in one round trip.
pub fn get_for_listing(c: &mut Conn, sid: &str) -> Result<Option<(Account, bool, Option<String>)>> {
    let sql = format!(
        "SELECT {COLUMNS}, \
         CASE WHEN EXISTS (SELECT 1 FROM api_accounts s WHERE s.parent_sid = api_accounts.account_sid) \
         THEN 1 ELSE 0 END, \
         (SELECT value FROM tallyd_meta WHERE key = 'last_flush') \
         FROM api_accounts WHERE account_sid = $1"
    );
    Ok(c.query(&sql, &[Param::Text(sid)])?.first().map(|r| {
        (
            from_row(r),
            r[12].int() != 0,
            r[13].opt_text().map(str::to_owned),
        )
    }))
}

pub fn list(c: &mut Conn) -> Result<Vec<Account>> {
    let sql = format!("SELECT {COLUMNS} FROM api_accounts ORDER BY account_sid");
    Ok(c.query(&sql, &[])?.iter().map(|r| from_row(r)).collect())
}

/// The account an API key belongs to.
pub fn by_api_key(c: &mut Conn, key: &str) -> Result<Option<Account>> {
    let sql = format!(
        "SELECT {} FROM api_accounts a JOIN api_keys k ON k.account_sid = a.account_sid \
         WHERE k.key_hash = $1",
        COLUMNS
            .split(", ")
            .map(|c| format!("a.{}", c.trim()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(c.query(&sql, &[Param::Text(&key_hash(key))])?
        .first()
        .map(|r| from_row(r)))
}

/// The account and every account below it (subaccounts, their subaccounts, …),
/// the account first.
pub fn with_descendants(c: &mut Conn, sid: &str) -> Result<Vec<String>> {
    let mut out = vec![sid.to_owned()];
    let mut i = 0;
    while i < out.len() {
        let rows = c.query(
            "SELECT account_sid FROM api_accounts WHERE parent_sid = $1 ORDER BY account_sid",
            &[Param::Text(&out[i])],
        )?;
        for r in rows {
            let child = r[0].text().to_owned();
            // A parent loop written by hand into the table must not hang a request.
            if !out.contains(&child) {
                out.push(child);
            }
        }
        i += 1;
    }
    Ok(out)
}

/// Whether `ancestor` is `sid` itself or above it in the parent chain.
pub fn is_self_or_ancestor(c: &mut Conn, ancestor: &str, sid: &str) -> Result<bool> {
    let mut cur = sid.to_owned();
    for _ in 0..64 {
        if cur == ancestor {
            return Ok(true);
        }
        match get(c, &cur)?.and_then(|a| a.parent_sid) {
            Some(p) => cur = p,
            None => return Ok(false),
        }
    }
    Ok(false)
}

/// Inserts or replaces an account.
pub fn upsert(c: &mut Conn, a: &Account) -> Result<()> {
    let sql = format!(
        "INSERT INTO api_accounts ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
         ON CONFLICT (account_sid) DO UPDATE SET auth_token = excluded.auth_token, \
         parent_sid = excluded.parent_sid, friendly_name = excluded.friendly_name, \
         plan_name = excluded.plan_name, numbers_limit = excluded.numbers_limit, \
         messages_per_month = excluded.messages_per_month, \
         voice_minutes_per_month = excluded.voice_minutes_per_month, \
         max_call_duration_minutes = excluded.max_call_duration_minutes, \
         concurrent_calls = excluded.concurrent_calls, updated_at = excluded.updated_at"
    );
    c.execute(
        &sql,
        &[
            Param::Text(&a.sid),
            Param::Text(a.auth_token.expose()),
            Param::OptText(a.parent_sid.as_deref()),
            Param::Text(&a.friendly_name),
            Param::OptText(a.plan.as_deref()),
            Param::Int(a.limits.numbers),
            Param::Int(a.limits.messages_per_month),
            Param::Int(a.limits.voice_minutes_per_month),
            Param::Int(a.limits.max_call_duration_minutes),
            Param::Int(a.limits.concurrent_calls),
            Param::Text(&a.created_at),
            Param::Text(&a.updated_at),
        ],
    )?;
    Ok(())
}

/// Deletes an account, its API keys, its usage triggers and its webhook
/// (wallet events not yet delivered then fail: nowhere to send them, no
/// secret to sign them with); returns whether it existed. Its usage and its
/// wallet (balance, holds, top-ups) stay: they are the record of what was
/// used and paid, and CDRs of the SID may still come. An account created
/// again with the same SID takes them up.
pub fn delete(c: &mut Conn, sid: &str) -> Result<bool> {
    c.transaction(|c| {
        // The account's row first: a trigger's create locks it before the
        // count of trigger edits, so the two never wait for each other in a
        // cycle (PostgreSQL), and a create that committed first has its
        // trigger seen, and deleted, by the statements below.
        let existed = c.execute(
            "DELETE FROM api_accounts WHERE account_sid = $1",
            &[Param::Text(sid)],
        )? > 0;
        for table in ["api_keys", "account_webhooks"] {
            c.execute(
                &format!("DELETE FROM {table} WHERE account_sid = $1"),
                &[Param::Text(sid)],
            )?;
        }
        c.delete_account_triggers(sid)?;
        Ok(existed)
    })
}

/// A stored API key, without the key itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiKeyInfo {
    pub key_id: String,
    pub account_sid: String,
    pub created_at: String,
}

/// Registers a key for `sid`; returns its id, or `None` if the key is already
/// registered (to this account or another: a key names one account).
pub fn add_api_key(c: &mut Conn, sid: &str, key: &str) -> Result<Option<String>> {
    let hash = key_hash(key);
    let id = key_id(&hash);
    let added = c.execute(
        "INSERT INTO api_keys (key_hash, key_id, account_sid, created_at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (key_hash) DO NOTHING",
        &[
            Param::Text(&hash),
            Param::Text(&id),
            Param::Text(sid),
            Param::Text(&now_rfc3339()),
        ],
    )?;
    Ok((added > 0).then_some(id))
}

/// Whether `key` is registered to `sid`.
pub fn has_api_key(c: &mut Conn, sid: &str, key: &str) -> Result<bool> {
    Ok(!c
        .query(
            "SELECT 1 FROM api_keys WHERE key_hash = $1 AND account_sid = $2",
            &[Param::Text(&key_hash(key)), Param::Text(sid)],
        )?
        .is_empty())
}

pub fn api_keys(c: &mut Conn, sid: &str) -> Result<Vec<ApiKeyInfo>> {
    Ok(c.query(
        "SELECT key_id, account_sid, created_at FROM api_keys WHERE account_sid = $1 ORDER BY created_at, key_id",
        &[Param::Text(sid)],
    )?
    .into_iter()
    .map(|r| ApiKeyInfo {
        key_id: r[0].text().to_owned(),
        account_sid: r[1].text().to_owned(),
        created_at: r[2].text().to_owned(),
    })
    .collect())
}

pub fn delete_api_key(c: &mut Conn, sid: &str, key_id: &str) -> Result<bool> {
    Ok(c.execute(
        "DELETE FROM api_keys WHERE account_sid = $1 AND key_id = $2",
        &[Param::Text(sid), Param::Text(key_id)],
    )? > 0)
}

/// A config entry that cannot be used, named by its position and key.
#[derive(Debug, thiserror::Error)]
#[error("api.accounts[{index}].{key}: {message}")]
pub struct AccountConfigError {
    pub index: usize,
    pub key: &'static str,
    pub message: String,
}

/// Why a credential cannot be used, or `None`: `min`–`max` visible ASCII
/// characters (no spaces or control characters, so it travels in a header
/// unchanged and reaches no query with a NUL).
pub fn credential_problem(value: &str, min: usize, max: usize) -> Option<String> {
    if value.len() < min || value.len() > max {
        Some(format!(
            "must be {min} to {max} characters, got {}",
            value.chars().count()
        ))
    } else if !value.bytes().all(|b| b.is_ascii_graphic()) {
        Some("must be visible ASCII characters only (no spaces or control characters)".into())
    } else {
        None
    }
}

/// Auth tokens: Twilio's are 32 hex digits; any 8 to 128 visible ASCII
/// characters are accepted.
pub const TOKEN_CHARS: (usize, usize) = (8, 128);
/// API keys: 8 to 256 visible ASCII characters.
pub const KEY_CHARS: (usize, usize) = (8, 256);

/// Checks `[[api.accounts]]`: SIDs well-formed and unique, parents declared or
/// already known (checked at seeding), tokens and keys usable, no key twice.
pub fn validate_config(accounts: &[AccountConfig]) -> Result<(), AccountConfigError> {
    let err = |index, key, message: String| AccountConfigError {
        index,
        key,
        message,
    };
    let mut keys = std::collections::HashSet::new();
    for (i, a) in accounts.iter().enumerate() {
        if !is_account_sid(&a.sid) {
            return Err(err(
                i,
                "sid",
                format!(
                    "{} is not an account SID (AC followed by 32 lowercase hex digits)",
                    super::error::shown(&a.sid)
                ),
            ));
        }
        if accounts[..i].iter().any(|b| b.sid == a.sid) {
            return Err(err(i, "sid", format!("{} is declared twice", a.sid)));
        }
        if let Some(p) = credential_problem(a.auth_token.expose(), TOKEN_CHARS.0, TOKEN_CHARS.1) {
            return Err(err(i, "auth_token", p));
        }
        if let Some(p) = &a.parent_sid {
            if !is_account_sid(p) || *p == a.sid {
                return Err(err(
                    i,
                    "parent_sid",
                    format!("{} is not another account's SID", super::error::shown(p)),
                ));
            }
        }
        for (k, key) in a.api_keys.iter().enumerate() {
            if let Some(p) = credential_problem(key.expose(), KEY_CHARS.0, KEY_CHARS.1) {
                return Err(err(i, "api_keys", format!("key {k}: {p}")));
            }
            if !keys.insert(key.expose()) {
                return Err(err(
                    i,
                    "api_keys",
                    format!("key {k} is declared twice: a key names one account"),
                ));
            }
        }
        if let Some(l) = &a.limits {
            if let Some((field, v)) = l.negative() {
                return Err(err(
                    i,
                    "limits",
                    format!("{field} = {v}: must not be negative"),
                ));
            }
        }
    }
    Ok(())
}

/// What seeding did with one config entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seeded {
    /// The store did not have the account: created with its token and keys.
    Created,
    /// The store has it: left as it is. The fields say what differs from the
    /// config entry (the admin API changed them, or the config did since).
    Kept {
        token_differs: bool,
        /// Keys of the entry the account does not have (revoked, or added to
        /// the config later; either way not re-added).
        missing_keys: usize,
    },
}

/// Creates the config's accounts that the store does not have, with their
/// keys; accounts that exist are not touched (see the module doc). Returns
/// what happened to each entry, in order, and logs entries that differ.
pub fn seed_from_config(
    c: &mut Conn,
    accounts: &[AccountConfig],
    default_limits: PlanLimits,
) -> Result<Vec<Seeded>> {
    let seeded = c.transaction(|c| {
        let now = now_rfc3339();
        let mut out = Vec::with_capacity(accounts.len());
        for a in accounts {
            if let Some(existing) = get(c, &a.sid)? {
                let mut missing_keys = 0;
                for k in &a.api_keys {
                    if !has_api_key(c, &a.sid, k.expose())? {
                        missing_keys += 1;
                    }
                }
                out.push(Seeded::Kept {
                    token_differs: existing.auth_token != a.auth_token,
                    missing_keys,
                });
                continue;
            }
            upsert(
                c,
                &Account {
                    sid: a.sid.clone(),
                    auth_token: a.auth_token.clone(),
                    parent_sid: a.parent_sid.clone(),
                    friendly_name: a.friendly_name.clone().unwrap_or_else(|| a.sid.clone()),
                    plan: a.plan.clone(),
                    limits: a.limits.unwrap_or(default_limits),
                    created_at: now.clone(),
                    updated_at: now.clone(),
                },
            )?;
            for k in &a.api_keys {
                // A key another account holds stays with it; the entry is
                // created without it.
                add_api_key(c, &a.sid, k.expose())?;
            }
            out.push(Seeded::Created);
        }
        Ok(out)
    })?;
    for (index, (a, s)) in accounts.iter().zip(&seeded).enumerate() {
        if let Seeded::Kept {
            token_differs,
            missing_keys,
        } = s
        {
            if *token_differs || *missing_keys > 0 {
                tracing::warn!(
                    entry = %format!("api.accounts[{index}]"),
                    sid = %a.sid,
                    token_differs,
                    missing_keys,
                    "account exists in the store and differs from its config entry; the store is kept \
                     (config only seeds new accounts: change it through the admin API)"
                );
            }
        }
    }
    Ok(seeded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_credentials_have_twilio_shapes() {
        let sid = new_account_sid();
        assert!(is_account_sid(&sid), "{sid}");
        assert_eq!(new_auth_token().len(), 32);
        assert_ne!(new_api_key(), new_api_key());
    }

    #[test]
    fn key_hash_is_sha256_hex() {
        assert_eq!(
            key_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(key_id(&key_hash("abc")), "key_ba7816bf8f01cfea");
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq("abc", "abc"));
        assert!(!constant_time_eq("abc", "abd"));
        assert!(!constant_time_eq("abc", "abcd"));
    }

    #[test]
    fn config_errors_name_the_entry_and_key() {
        let mut a = AccountConfig {
            sid: "ACnope".into(),
            auth_token: Secret::new("token-123456"),
            parent_sid: None,
            friendly_name: None,
            plan: None,
            limits: None,
            api_keys: vec![],
        };
        let e = validate_config(std::slice::from_ref(&a)).unwrap_err();
        assert_eq!(e.to_string().split(':').next(), Some("api.accounts[0].sid"));
        a.sid = format!("AC{}", "0".repeat(32));
        a.parent_sid = Some(a.sid.clone());
        let e = validate_config(std::slice::from_ref(&a))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("api.accounts[0].parent_sid"), "{e}");
        a.parent_sid = None;
        a.auth_token = Secret::new("short");
        let e = validate_config(std::slice::from_ref(&a))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("api.accounts[0].auth_token"), "{e}");
        a.auth_token = Secret::new("token with spaces");
        let e = validate_config(std::slice::from_ref(&a))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("api.accounts[0].auth_token"), "{e}");
        a.auth_token = Secret::new("token-123456");
        a.api_keys = vec![Secret::new("key-123456"), Secret::new("key-123456")];
        let e = validate_config(std::slice::from_ref(&a))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("api.accounts[0].api_keys") && e.contains("twice"),
            "{e}"
        );
        let mut b = a.clone();
        a.api_keys = vec![Secret::new("key-123456")];
        b.sid = format!("AC{}", "1".repeat(32));
        b.api_keys = vec![Secret::new("key-123456")];
        let e = validate_config(&[a.clone(), b]).unwrap_err().to_string();
        assert!(e.starts_with("api.accounts[1].api_keys"), "{e}");
        a.limits = Some(PlanLimits {
            numbers: -1,
            ..PlanLimits::default()
        });
        let e = validate_config(&[a]).unwrap_err().to_string();
        assert!(e.contains("limits") && e.contains("numbers = -1"), "{e}");
    }
}
