//! The admin API: accounts, subaccounts and AgentPhone API keys, behind
//! `Authorization: Bearer <api.admin_token>`. Disabled while no token is set.
//!
//! Every field is checked before it reaches the store, and a refusal is a 400
//! naming the field: SIDs have their shape, names are bounded and have no
//! control characters, limits are not negative, credentials are visible ASCII.
//! An account's auth token is returned when it is created or rotated, never
//! listed; an API key is returned when it is registered, and a key already
//! registered (to any account) is refused with 409 rather than moved.

use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::accounts::{
    self, constant_time_eq, credential_problem, is_account_sid, Account, KEY_CHARS, TOKEN_CHARS,
};
use super::auth::{self, AuthThrottle};
use super::error::{shown, throttled, ApiError};
use super::ApiState;
use crate::config::{PlanLimits, Secret};

/// Longest `friendly_name`, in characters.
pub const MAX_NAME_CHARS: usize = 256;
/// Longest `plan`, in characters.
pub const MAX_PLAN_CHARS: usize = 64;
/// Largest value of a plan limit.
pub const MAX_LIMIT: i64 = 1_000_000_000_000;

/// A request carrying the admin token (an extractor: a handler that takes it
/// runs only for the admin). Failures are throttled per client like any other.
pub struct Admin;

#[axum::async_trait]
impl FromRequestParts<ApiState> for Admin {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Admin, Response> {
        let Some(expected) = state.admin_token() else {
            return Err(ApiError::not_found(
                "the admin API is disabled: set api.admin_token (TALLYD_API__ADMIN_TOKEN)",
            )
            .into_response());
        };
        let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().cloned();
        let client = auth::client_of(peer);
        if let Err(wait) = state.throttle().check(client) {
            AuthThrottle::throttled("admin");
            return Err(throttled(false, wait));
        }
        match auth::bearer(&parts.headers) {
            Some(given) if constant_time_eq(given, expected) => Ok(Admin),
            _ => Err(match state.throttle().failed(client, "admin") {
                Ok(()) => ApiError::unauthorized(
                    "send the admin token as Authorization: Bearer <api.admin_token>",
                )
                .into_response(),
                Err(wait) => throttled(false, wait),
            }),
        }
    }
}

/// Parses a JSON body (empty = `{}`); an error names the field at fault.
pub(super) fn parse_body<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, ApiError> {
    let text: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    let mut de = serde_json::Deserializer::from_slice(text);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let (param, at) = if path == "." || path.is_empty() {
            ("body".to_owned(), String::new())
        } else {
            (path.clone(), format!("{path}: "))
        };
        ApiError::invalid_parameter(&param, format!("the JSON body is not valid: {at}{inner}"))
    })
}

/// Body of `POST /admin/accounts`; everything optional.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewAccount {
    pub sid: Option<String>,
    pub auth_token: Option<Secret>,
    pub parent_sid: Option<String>,
    pub friendly_name: Option<String>,
    pub plan: Option<String>,
    pub limits: Option<PlanLimits>,
}

/// Body of `PATCH /admin/accounts/{sid}`; absent fields are kept.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountUpdate {
    pub auth_token: Option<Secret>,
    pub friendly_name: Option<String>,
    pub plan: Option<String>,
    pub limits: Option<PlanLimits>,
}

pub(super) fn check_sid(param: &str, sid: &str) -> Result<(), ApiError> {
    if is_account_sid(sid) {
        Ok(())
    } else {
        Err(ApiError::invalid_parameter(
            param,
            format!(
                "{param} {} is not an account SID (AC followed by 32 lowercase hex digits)",
                shown(sid)
            ),
        ))
    }
}

fn check_credential(
    param: &str,
    value: &Secret,
    (min, max): (usize, usize),
) -> Result<(), ApiError> {
    match credential_problem(value.expose(), min, max) {
        None => Ok(()),
        Some(p) => Err(ApiError::invalid_parameter(param, format!("{param} {p}"))),
    }
}

/// A name shown to people: 1 to `max` characters, no control characters.
fn check_text(param: &str, value: &str, max: usize) -> Result<(), ApiError> {
    let chars = value.chars().count();
    if chars == 0 || chars > max {
        return Err(ApiError::invalid_parameter(
            param,
            format!("{param} must be 1 to {max} characters, got {chars}"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiError::invalid_parameter(
            param,
            format!("{param} must not contain control characters (such as NUL or newlines)"),
        ));
    }
    Ok(())
}

fn check_limits(limits: &PlanLimits) -> Result<(), ApiError> {
    let fields = [
        ("numbers", limits.numbers),
        ("messages_per_month", limits.messages_per_month),
        ("voice_minutes_per_month", limits.voice_minutes_per_month),
        (
            "max_call_duration_minutes",
            limits.max_call_duration_minutes,
        ),
        ("concurrent_calls", limits.concurrent_calls),
    ];
    for (field, v) in fields {
        if !(0..=MAX_LIMIT).contains(&v) {
            let param = format!("limits.{field}");
            return Err(ApiError::invalid_parameter(
                &param,
                format!("{param} = {v}: must be from 0 to {MAX_LIMIT}"),
            ));
        }
    }
    Ok(())
}

/// The account named by a path: an account SID, or a 404 (nothing else reaches
/// the store).
pub(super) fn path_sid(sid: Option<Path<String>>) -> Result<String, ApiError> {
    match sid {
        Some(Path(s)) if is_account_sid(&s) => Ok(s),
        Some(Path(s)) => Err(unknown(&s)),
        None => Err(ApiError::not_found(
            "the account SID in the path does not decode",
        )),
    }
}

pub(super) fn unknown(sid: &str) -> ApiError {
    ApiError::not_found(format!("account {} does not exist", shown(sid)))
}

/// An account as the admin API shows it: without its token, unless `token` is
/// given (the one time it is shown).
fn shown_account(a: &Account, token: Option<&Secret>) -> serde_json::Value {
    let mut v = serde_json::to_value(a).unwrap_or_default();
    if let Some(t) = token {
        v["auth_token"] = t.expose().into();
    }
    v
}

pub async fn create_account(
    State(state): State<ApiState>,
    _: Admin,
    body: Bytes,
) -> Result<Response, ApiError> {
    let new: NewAccount = parse_body(&body)?;
    let sid = new.sid.unwrap_or_else(accounts::new_account_sid);
    check_sid("sid", &sid)?;
    if let Some(p) = &new.parent_sid {
        check_sid("parent_sid", p)?;
    }
    let auth_token = new
        .auth_token
        .unwrap_or_else(|| Secret::new(accounts::new_auth_token()));
    check_credential("auth_token", &auth_token, TOKEN_CHARS)?;
    if let Some(n) = &new.friendly_name {
        check_text("friendly_name", n, MAX_NAME_CHARS)?;
    }
    if let Some(p) = &new.plan {
        check_text("plan", p, MAX_PLAN_CHARS)?;
    }
    let limits = new.limits.unwrap_or(state.default_limits());
    check_limits(&limits)?;
    let now = accounts::now_rfc3339();
    let account = Account {
        friendly_name: new.friendly_name.unwrap_or_else(|| sid.clone()),
        sid,
        auth_token,
        parent_sid: new.parent_sid,
        plan: new.plan,
        limits,
        created_at: now.clone(),
        updated_at: now,
    };
    let answer = state
        .store()
        .run(move |c| {
            Ok(c.transaction(|c| {
                if accounts::get(c, &account.sid)?.is_some() {
                    return Ok(Err(ApiError::conflict(format!(
                        "account {} already exists",
                        account.sid
                    ))));
                }
                if let Some(p) = &account.parent_sid {
                    if accounts::get(c, p)?.is_none() {
                        return Ok(Err(ApiError::invalid_parameter(
                            "parent_sid",
                            format!("parent_sid {p} is not an existing account"),
                        )));
                    }
                }
                accounts::upsert(c, &account)?;
                let body = shown_account(&account, Some(&account.auth_token));
                Ok(Ok((StatusCode::CREATED, Json(body)).into_response()))
            }))
        })
        .await??;
    // Keys authenticated before this change are looked up again.
    state.key_cache().clear();
    answer
}

pub async fn list_accounts(State(state): State<ApiState>, _: Admin) -> Result<Response, ApiError> {
    let list = state.store().run(accounts::list).await?;
    Ok(Json(json!({ "accounts": list })).into_response())
}

pub async fn get_account(
    State(state): State<ApiState>,
    _: Admin,
    sid: Option<Path<String>>,
) -> Result<Response, ApiError> {
    let sid = path_sid(sid)?;
    let s = sid.clone();
    match state.store().run(move |c| accounts::get(c, &s)).await? {
        Some(a) => Ok(Json(a).into_response()),
        None => Err(unknown(&sid)),
    }
}

pub async fn update_account(
    State(state): State<ApiState>,
    _: Admin,
    sid: Option<Path<String>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let sid = path_sid(sid)?;
    let upd: AccountUpdate = parse_body(&body)?;
    if let Some(t) = &upd.auth_token {
        check_credential("auth_token", t, TOKEN_CHARS)?;
    }
    if let Some(n) = &upd.friendly_name {
        check_text("friendly_name", n, MAX_NAME_CHARS)?;
    }
    if let Some(p) = &upd.plan {
        check_text("plan", p, MAX_PLAN_CHARS)?;
    }
    if let Some(l) = &upd.limits {
        check_limits(l)?;
    }
    let answer = state
        .store()
        .run(move |c| {
            Ok(c.transaction(|c| {
                let Some(mut a) = accounts::get(c, &sid)? else {
                    return Ok(Err(unknown(&sid)));
                };
                let rotated = upd.auth_token.is_some();
                if let Some(t) = upd.auth_token {
                    a.auth_token = t;
                }
                if let Some(n) = upd.friendly_name {
                    a.friendly_name = n;
                }
                if let Some(p) = upd.plan {
                    a.plan = Some(p);
                }
                if let Some(l) = upd.limits {
                    a.limits = l;
                }
                a.updated_at = accounts::now_rfc3339();
                accounts::upsert(c, &a)?;
                let body = shown_account(&a, rotated.then_some(&a.auth_token));
                Ok(Ok(Json(body).into_response()))
            }))
        })
        .await??;
    // Keys authenticated before this change are looked up again.
    state.key_cache().clear();
    answer
}

pub async fn delete_account(
    State(state): State<ApiState>,
    _: Admin,
    sid: Option<Path<String>>,
) -> Result<Response, ApiError> {
    let sid = path_sid(sid)?;
    let book = state.triggers().clone();
    let answer = state
        .store()
        .run(move |c| {
            let tree = accounts::with_descendants(c, &sid)?;
            if tree.len() > 1 {
                return Ok(Err(ApiError::conflict(format!(
                    "account {sid} has subaccounts ({}); delete them first",
                    tree[1..].join(", ")
                ))));
            }
            Ok(if accounts::delete(c, &sid)? {
                book.remove_account(&sid);
                Ok(StatusCode::NO_CONTENT.into_response())
            } else {
                Err(unknown(&sid))
            })
        })
        .await?;
    // Keys authenticated before this change are looked up again.
    state.key_cache().clear();
    answer
}

/// Runs `f` on a store connection for the existing account `sid`; an
/// unknown account is a 404 (the admin endpoints under
/// `/admin/accounts/{sid}/…`).
pub(super) async fn on_account(
    state: &ApiState,
    sid: String,
    f: impl FnOnce(&mut crate::store::Conn, &str) -> crate::store::Result<Result<Response, ApiError>>
        + Send
        + 'static,
) -> Result<Response, ApiError> {
    state
        .store()
        .run(move |c| {
            if accounts::get(c, &sid)?.is_none() {
                return Ok(Err(unknown(&sid)));
            }
            f(c, &sid)
        })
        .await?
}

/// Body of `POST /admin/accounts/{sid}/api-keys`: an existing key to register, or
/// nothing to have one generated.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    pub key: Option<Secret>,
}

pub async fn create_api_key(
    State(state): State<ApiState>,
    _: Admin,
    sid: Option<Path<String>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let sid = path_sid(sid)?;
    let new: NewKey = parse_body(&body)?;
    let key = new
        .key
        .unwrap_or_else(|| Secret::new(accounts::new_api_key()));
    check_credential("key", &key, KEY_CHARS)?;
    on_account(&state, sid, move |c, sid| {
            let Some(key_id) = accounts::add_api_key(c, sid, key.expose())? else {
                return Ok(Err(ApiError::conflict(
                    "this key is already registered; a key names one account: revoke it there first, or register another",
                )));
            };
            // The key itself is shown this once; the store keeps only its hash.
            Ok(Ok((
                StatusCode::CREATED,
                Json(json!({ "key": key.expose(), "key_id": key_id, "account_sid": sid })),
            )
                .into_response()))
        })
    .await
}

pub async fn list_api_keys(
    State(state): State<ApiState>,
    _: Admin,
    sid: Option<Path<String>>,
) -> Result<Response, ApiError> {
    let sid = path_sid(sid)?;
    on_account(&state, sid, |c, sid| {
        let keys = accounts::api_keys(c, sid)?;
        Ok(Ok(Json(json!({ "api_keys": keys })).into_response()))
    })
    .await
}

/// Whether `id` has the shape of a key id (`key_` + 16 hex digits).
fn is_key_id(id: &str) -> bool {
    id.strip_prefix("key_")
        .is_some_and(|h| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

pub async fn delete_api_key(
    State(state): State<ApiState>,
    _: Admin,
    params: Option<Path<(String, String)>>,
) -> Result<Response, ApiError> {
    let Some(Path((sid, key_id))) = params else {
        return Err(ApiError::not_found("the path does not decode"));
    };
    let sid = path_sid(Some(Path(sid)))?;
    let missing = ApiError::not_found(format!("account {sid} has no API key {}", shown(&key_id)));
    if !is_key_id(&key_id) {
        return Err(missing);
    }
    let deleted = state
        .store()
        .run(move |c| accounts::delete_api_key(c, &sid, &key_id))
        .await?;
    // The revoked key is not answered from memory any more.
    state.key_cache().clear();
    match deleted {
        true => Ok(StatusCode::NO_CONTENT.into_response()),
        false => Err(missing),
    }
}
