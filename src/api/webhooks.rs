//! An account's wallet-event webhook, behind the admin token:
//! `PUT|GET|DELETE /admin/accounts/{sid}/webhook` (docs/contract.md §6).
//!
//! The URL is checked as every callback URL is ([`check_callback_url`] under
//! `[webhooks]`'s policy) and again at every send. Each `PUT` makes a new
//! random secret, shown in its answer only: receivers verify
//! `X-Tallyd-Signature` with it, and a leaked secret is replaced by putting
//! the webhook again. Events already queued keep the URL they were queued
//! with and are signed with the secret current when they are sent.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use rand::RngCore;
use serde::Deserialize;
use serde_json::json;

use super::accounts;
use super::admin::{on_account, parse_body, path_sid, Admin};
use super::error::ApiError;
use super::ApiState;
use crate::webhooks::url::check_callback_url;

/// Body of `PUT /admin/accounts/{sid}/webhook`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookBody {
    pub url: Option<String>,
}

/// A fresh signing secret: `whsec_` and 64 hex digits (256 random bits).
pub fn new_secret() -> String {
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    let mut s = String::from("whsec_");
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

fn no_webhook(sid: &str) -> ApiError {
    ApiError::not_found(format!("account {sid} has no webhook"))
}

pub async fn set_webhook(
    State(state): State<ApiState>,
    _: Admin,
    sid: Option<Path<String>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let sid = path_sid(sid)?;
    let b: WebhookBody = parse_body(&body)?;
    let Some(raw) = b.url else {
        return Err(ApiError::invalid_parameter(
            "url",
            "url is required: the https:// (or http://) URL wallet events are posted to",
        ));
    };
    let url = check_callback_url(&raw, state.url_policy())
        .map_err(|why| ApiError::invalid_parameter("url", format!("url {why}")))?;
    let url = url.to_string();
    let secret = new_secret();
    let now = accounts::now_rfc3339();
    on_account(&state, sid, move |c, sid| {
        c.transaction(|c| {
            c.set_account_webhook(sid, &url, &secret, &now)?;
            // Events still to be delivered go to the new URL.
            c.redirect_wallet_events(sid, &url)
        })?;
        // The secret is shown this once.
        Ok(Ok(Json(json!({
            "account_sid": sid,
            "url": url,
            "secret": secret,
            "updated_at": now,
        }))
        .into_response()))
    })
    .await
}

pub async fn get_webhook(
    State(state): State<ApiState>,
    _: Admin,
    sid: Option<Path<String>>,
) -> Result<Response, ApiError> {
    let sid = path_sid(sid)?;
    on_account(&state, sid, |c, sid| {
        Ok(match c.account_webhook(sid)? {
            Some(w) => Ok(Json(json!({
                "account_sid": w.account_sid,
                "url": w.url,
                "updated_at": w.updated_at,
            }))
            .into_response()),
            None => Err(no_webhook(sid)),
        })
    })
    .await
}

pub async fn delete_webhook(
    State(state): State<ApiState>,
    _: Admin,
    sid: Option<Path<String>>,
) -> Result<Response, ApiError> {
    let sid = path_sid(sid)?;
    on_account(&state, sid, |c, sid| {
        Ok(if c.delete_account_webhook(sid)? {
            Ok(StatusCode::NO_CONTENT.into_response())
        } else {
            Err(no_webhook(sid))
        })
    })
    .await
}
