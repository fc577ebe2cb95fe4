//! The admin API: accounts, subaccounts and AgentPhone API keys, behind
//! `Authorization: Bearer <api.admin_token>`. Disabled while no token is set.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::accounts::{self, constant_time_eq, is_account_sid, Account};
use super::error::ApiError;
use super::ApiState;
use crate::config::PlanLimits;

pub(super) fn check_admin(state: &ApiState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = state.admin_token() else {
        return Err(ApiError::not_found(
            "the admin API is disabled: set api.admin_token (TALLYD_API__ADMIN_TOKEN)",
        ));
    };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if constant_time_eq(given.trim(), expected) {
        Ok(())
    } else {
        Err(ApiError::unauthorized(
            "send the admin token as Authorization: Bearer <api.admin_token>",
        ))
    }
}

pub(super) fn parse_body<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, ApiError> {
    let text: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    serde_json::from_slice(text).map_err(|e| {
        ApiError::invalid_parameter("body", format!("the JSON body is not valid: {e}"))
    })
}

/// Body of `POST /admin/accounts`; everything optional.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewAccount {
    pub sid: Option<String>,
    pub auth_token: Option<String>,
    pub parent_sid: Option<String>,
    pub friendly_name: Option<String>,
    pub plan: Option<String>,
    pub limits: Option<PlanLimits>,
}

/// Body of `PATCH /admin/accounts/{sid}`; absent fields are kept.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountUpdate {
    pub auth_token: Option<String>,
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
                "{param} {sid:?} is not an account SID (AC followed by 32 lowercase hex digits)"
            ),
        ))
    }
}

fn check_token(token: &str) -> Result<(), ApiError> {
    if token.len() < 8 {
        return Err(ApiError::invalid_parameter(
            "auth_token",
            "auth_token needs at least 8 characters",
        ));
    }
    Ok(())
}

fn unknown(sid: &str) -> ApiError {
    ApiError::not_found(format!("account {sid} does not exist"))
}

pub async fn create_account(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_admin(&state, &headers)?;
    let new: NewAccount = parse_body(&body)?;
    let sid = new.sid.unwrap_or_else(accounts::new_account_sid);
    check_sid("sid", &sid)?;
    if let Some(p) = &new.parent_sid {
        check_sid("parent_sid", p)?;
    }
    let auth_token = new.auth_token.unwrap_or_else(accounts::new_auth_token);
    check_token(&auth_token)?;
    let now = accounts::now_rfc3339();
    let account = Account {
        friendly_name: new.friendly_name.unwrap_or_else(|| sid.clone()),
        sid,
        auth_token,
        parent_sid: new.parent_sid,
        plan: new.plan,
        limits: new.limits.unwrap_or(state.default_limits()),
        created_at: now.clone(),
        updated_at: now,
    };
    state
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
                Ok(Ok((StatusCode::CREATED, Json(account)).into_response()))
            }))
        })
        .await??
}

pub async fn list_accounts(
    State(state): State<ApiState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_admin(&state, &headers)?;
    let list = state.store().run(accounts::list).await?;
    Ok(Json(json!({ "accounts": list })).into_response())
}

pub async fn get_account(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(sid): Path<String>,
) -> Result<Response, ApiError> {
    check_admin(&state, &headers)?;
    let s = sid.clone();
    match state.store().run(move |c| accounts::get(c, &s)).await? {
        Some(a) => Ok(Json(a).into_response()),
        None => Err(unknown(&sid)),
    }
}

pub async fn update_account(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(sid): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_admin(&state, &headers)?;
    let upd: AccountUpdate = parse_body(&body)?;
    if let Some(t) = &upd.auth_token {
        check_token(t)?;
    }
    state
        .store()
        .run(move |c| {
            Ok(c.transaction(|c| {
                let Some(mut a) = accounts::get(c, &sid)? else {
                    return Ok(Err(unknown(&sid)));
                };
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
                Ok(Ok(Json(a).into_response()))
            }))
        })
        .await??
}

pub async fn delete_account(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(sid): Path<String>,
) -> Result<Response, ApiError> {
    check_admin(&state, &headers)?;
    state
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
                Ok(StatusCode::NO_CONTENT.into_response())
            } else {
                Err(unknown(&sid))
            })
        })
        .await?
}

/// Body of `POST /admin/accounts/{sid}/api-keys`: an existing key to register, or
/// nothing to have one generated.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    pub key: Option<String>,
}

pub async fn create_api_key(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(sid): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_admin(&state, &headers)?;
    let new: NewKey = parse_body(&body)?;
    let key = new.key.unwrap_or_else(accounts::new_api_key);
    if key.len() < 8 {
        return Err(ApiError::invalid_parameter(
            "key",
            "key needs at least 8 characters",
        ));
    }
    state
        .store()
        .run(move |c| {
            if accounts::get(c, &sid)?.is_none() {
                return Ok(Err(unknown(&sid)));
            }
            let key_id = accounts::add_api_key(c, &sid, &key)?;
            // The key itself is shown this once; the store keeps only its hash.
            Ok(Ok((
                StatusCode::CREATED,
                Json(json!({ "key": key, "key_id": key_id, "account_sid": sid })),
            )
                .into_response()))
        })
        .await?
}

pub async fn list_api_keys(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(sid): Path<String>,
) -> Result<Response, ApiError> {
    check_admin(&state, &headers)?;
    state
        .store()
        .run(move |c| {
            if accounts::get(c, &sid)?.is_none() {
                return Ok(Err(unknown(&sid)));
            }
            let keys = accounts::api_keys(c, &sid)?;
            Ok(Ok(Json(json!({ "api_keys": keys })).into_response()))
        })
        .await?
}

pub async fn delete_api_key(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((sid, key_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    check_admin(&state, &headers)?;
    state
        .store()
        .run(move |c| {
            Ok(if accounts::delete_api_key(c, &sid, &key_id)? {
                Ok(StatusCode::NO_CONTENT.into_response())
            } else {
                Err(ApiError::not_found(format!(
                    "account {sid} has no API key {key_id}"
                )))
            })
        })
        .await?
}
