//! Wallets, per-call holds and top-ups over HTTP (docs/contract.md §4; CallingBox and
//! AgentPhone semantics):
//!
//! - `POST /v1/holds`, `DELETE /v1/holds/{call_id}`,
//!   `GET /v1/calls/{call_id}/billing`, `GET /v1/wallet` (Bearer API key);
//! - `POST /admin/accounts/{sid}/credits` (admin token).
//!
//! Decisions are made in memory by [`crate::wallet::Wallets`] (lock-free);
//! a granted hold, a release and a top-up are written to the store before the
//! answer leaves. With several instances, each of these is answered by the
//! instance that owns the account's CDR partition and forwarded there by the
//! others ([`super::forward`]); the owner's writes are fenced by the epoch it
//! claimed the partition at, so an instance that lost the partition grants
//! nothing more.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::metrics as m;
use axum::body::Bytes;
use axum::extract::ConnectInfo;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value as Json_};

use super::accounts::{self, Account};
use super::admin::{check_sid, parse_body, Admin};
use super::agentphone::cached_account;
use super::error::ApiError;
use super::forward::{self, Decision, Incoming};
use super::{ApiState, NotPlain};
use crate::calendar::format_rfc3339;
use crate::cdr::{AccountSid, CallNumberType, Mode};
use crate::rating::Plan;
use crate::store::wallet::{Fence, StoredCredit, StoredHold};
use crate::store::Error as StoreError;
use crate::wallet::{
    self as w, decimal, hold_amount, refusal_message, Durable, Grant, Hold, HoldStatus, Money,
    Wallet,
};

/// Loads every stored balance and reserved hold into the state's wallets.
pub(super) fn load(state: &ApiState) -> Result<usize, StoreError> {
    let (balances, holds) = state
        .store()
        .with_conn(|c| Ok((c.wallet_balances()?, c.reserved_holds()?)))?;
    let wallets = state.wallets();
    let by_account = crate::wallet::owners::group_stored(wallets, balances, holds, |_| true);
    let n = by_account.len();
    for (a, (balance, holds)) in by_account {
        wallets.load(a, balance, holds);
    }
    Ok(n)
}

fn check_loaded(state: &ApiState) -> Result<(), ApiError> {
    if state
        .inner
        .wallets_loaded
        .load(std::sync::atomic::Ordering::Acquire)
    {
        return Ok(());
    }
    Err(ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        code: "starting",
        message: "tallyd is starting: wallets are not loaded from the store yet; retry".into(),
        param: None,
    })
}

fn sid_of(a: &Account) -> Result<AccountSid, ApiError> {
    AccountSid::parse(&a.sid).ok_or_else(|| ApiError::internal("stored account SID is malformed"))
}

/// The account of the request's API key (failures throttled per client, as
/// every API's are; recently authenticated keys from memory).
async fn account(
    state: &ApiState,
    headers: &HeaderMap,
    peer: Option<ConnectInfo<SocketAddr>>,
) -> Result<Arc<Account>, Response> {
    check_loaded(state).map_err(IntoResponse::into_response)?;
    cached_account(state, headers, peer).await
}

/// The per-call hold of an account on `plan` for a call of `number_type` and
/// `mode`.
fn hold_for(plan: &Plan, a: &Account, nt: CallNumberType, mode: Option<Mode>) -> Money {
    let minutes = a.limits.max_call_duration_minutes.clamp(0, u32::MAX as i64) as u32;
    hold_amount(plan, nt, mode, minutes)
}

/// The rating plan of `a` (the default plan's for a malformed SID).
fn plan_of<'s>(state: &'s ApiState, a: &Account) -> &'s Plan {
    state
        .inner
        .tariff
        .plan_for(AccountSid::parse(&a.sid).unwrap_or(AccountSid(0)))
}

// The answers' bodies are typed and written straight into the response: a
// hold is the hot path, and a `serde_json::Value` built per answer cost a
// map node and a key string per field. Fields are declared in the order of
// their names — the order the `Value` maps wrote them in — so each body is
// byte for byte what it was.

/// An amount as the answers show it: the exact decimal text of [`decimal`]
/// (`"4.98750"`), written without a `String` of its own.
struct Amount(Money);

impl Serialize for Amount {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&crate::rating::price_to_decimal(self.0))
    }
}

/// The auto-recharge settings of `GET /v1/wallet` and of the admin API.
#[derive(Serialize)]
struct AutoRechargeBody {
    amount: Amount,
    enabled: bool,
    threshold: Amount,
}

/// The auto-recharge settings in effect: the account's own, else the defaults.
fn auto_recharge_body(state: &ApiState, own: (Option<Money>, Option<Money>)) -> AutoRechargeBody {
    let d = state.wallets().low_balance;
    let (threshold, amount) = (own.0.unwrap_or(d.threshold), own.1.unwrap_or(d.recharge));
    AutoRechargeBody {
        amount: Amount(amount),
        enabled: amount > 0,
        threshold: Amount(threshold),
    }
}

/// A wallet as the answers show it.
#[derive(Serialize)]
struct WalletBody<'a> {
    account_sid: &'a str,
    active_holds: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    auto_recharge: Option<AutoRechargeBody>,
    available: Amount,
    balance: Amount,
    currency: &'a str,
    held: Amount,
    hold_amount: Amount,
    status: &'static str,
}

/// The wallet of `a` now; `local_hold` is its hold for a local call if the
/// caller has it at hand (else it is sized here).
fn wallet_body<'a>(
    plan: &'a Plan,
    a: &'a Account,
    wallet: &Wallet,
    local_hold: Option<Money>,
) -> WalletBody<'a> {
    let v = wallet.view();
    let hold = local_hold.unwrap_or_else(|| hold_for(plan, a, CallNumberType::Local, None));
    WalletBody {
        account_sid: &a.sid,
        active_holds: v.active_holds,
        auto_recharge: None,
        available: Amount(v.available),
        balance: Amount(v.balance),
        currency: &plan.currency,
        held: Amount(v.held),
        hold_amount: Amount(hold),
        status: w::status(v.available, hold),
    }
}

/// A hold as the answers show it, with its account's wallet in the answers
/// to a hold request or release.
#[derive(Serialize)]
struct HoldBody<'a> {
    amount: Amount,
    call_id: &'a str,
    created_at: String,
    expires_at: String,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    wallet: Option<WalletBody<'a>>,
}

impl<'a> HoldBody<'a> {
    fn of(h: &'a StoredHold) -> HoldBody<'a> {
        HoldBody::new(&h.call_id, h.amount, h.status, h.created_at, h.expires_at)
    }

    fn of_hold(h: &'a Hold) -> HoldBody<'a> {
        HoldBody::new(&h.call_id, h.amount, h.status(), h.created_at, h.expires_at)
    }

    fn new(
        call_id: &'a str,
        amount: Money,
        status: HoldStatus,
        created_at: i64,
        expires_at: i64,
    ) -> HoldBody<'a> {
        HoldBody {
            amount: Amount(amount),
            call_id,
            created_at: format_rfc3339(created_at),
            expires_at: format_rfc3339(expires_at),
            status: status.as_str(),
            wallet: None,
        }
    }

    fn with_wallet(mut self, wallet: WalletBody<'a>) -> HoldBody<'a> {
        self.wallet = Some(wallet);
        self
    }
}

/// The `402` of a hold refused for lack of balance.
#[derive(Serialize)]
struct RefusedBody {
    available: Amount,
    code: &'static str,
    hold_amount: Amount,
    message: String,
}

/// The `429` of a hold over the plan's concurrent calls.
#[derive(Serialize)]
struct TooManyCallsBody {
    code: &'static str,
    limit: u32,
    message: String,
}

/// Most answers' bodies fit in this (a hold with its wallet is ~350 bytes):
/// written into one buffer of it, not into axum's 128 bytes grown twice.
const BODY_BYTES: usize = 512;

/// `body` as a JSON answer (what `(status, Json(body))` answers).
fn json_answer(status: StatusCode, body: &impl Serialize) -> Response {
    let mut buf = Vec::with_capacity(BODY_BYTES);
    if let Err(e) = serde_json::to_writer(&mut buf, body) {
        return ApiError::internal(e).into_response();
    }
    let mut r = Response::new(axum::body::Body::from(buf));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn stored(h: &Hold) -> StoredHold {
    StoredHold {
        account_sid: h.account.to_string(),
        call_id: h.call_id.clone(),
        amount: h.amount,
        status: h.status(),
        created_at: h.created_at,
        expires_at: h.expires_at,
        billing: h.billing(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewHold {
    call_id: String,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    number_type: Option<String>,
}

fn check_call_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > 64 {
        return Err(ApiError::invalid_parameter(
            "call_id",
            format!(
                "call_id must be 1 to 64 characters (the call CDR's id); got {} characters",
                id.len()
            ),
        ));
    }
    Ok(())
}

fn store_unavailable(e: StoreError) -> ApiError {
    tracing::error!(error = %e, "wallet write failed");
    ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        code: "store_unavailable",
        message: "the store did not take the change; nothing was changed, retry".into(),
        param: None,
    }
}

/// The answer of an owner whose claim on the partition was taken over
/// between its decision and its write: nothing was written or granted.
fn fenced() -> ApiError {
    ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        code: "owner_moving",
        message: "this wallet is moving to another instance; nothing was changed, retry".into(),
        param: None,
    }
}

/// The account of a wallet request and the fence it is answered under here;
/// or its answer: refused, or its owner's (see [`forward::route`]).
async fn local(
    state: &ApiState,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    peer: Option<ConnectInfo<SocketAddr>>,
    body: Bytes,
) -> Result<(Arc<Account>, Option<Fence>), Response> {
    let a = account(state, &headers, peer).await?;
    let sid = sid_of(&a).map_err(IntoResponse::into_response)?;
    let req = Incoming {
        method: &method,
        uri: &uri,
        headers: &headers,
        body,
    };
    match forward::route(state, sid, req).await {
        Decision::Local(fence) => Ok((a, fence)),
        Decision::Answered(r) => Err(r),
    }
}

/// `POST /v1/holds`.
pub async fn create_hold(
    State(state): State<ApiState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    peer: Option<ConnectInfo<SocketAddr>>,
    body: Bytes,
) -> Response {
    match local(&state, method, uri, headers, peer, body.clone()).await {
        Ok((a, fence)) => create_hold_for(state, a, body, fence).await.into_response(),
        Err(answer) => answer,
    }
}

async fn create_hold_for(
    state: ApiState,
    a: Arc<Account>,
    body: Bytes,
    fence: Option<Fence>,
) -> Result<Response, ApiError> {
    let started = std::time::Instant::now();
    let req: NewHold = parse_body(&body)?;
    check_call_id(&req.call_id)?;
    let mode = match req.mode.as_deref() {
        None => None,
        Some(m) => Some(Mode::parse(m).ok_or_else(|| {
            ApiError::invalid_parameter(
                "mode",
                format!(
                    "mode must be webhook or hosted; got {}",
                    super::error::shown(m)
                ),
            )
        })?),
    };
    let nt = match req.number_type.as_deref().unwrap_or("local") {
        "local" => CallNumberType::Local,
        "mobile" => CallNumberType::Mobile,
        "tollfree" => CallNumberType::Tollfree,
        "sip" => CallNumberType::Sip,
        "client" => CallNumberType::Client,
        other => {
            return Err(ApiError::invalid_parameter(
                "number_type",
                format!(
                    "number_type must be local, mobile, tollfree, sip or client; got {}",
                    super::error::shown(other)
                ),
            ))
        }
    };
    let account = sid_of(&a)?;
    let plan = state.inner.tariff.plan_for(account);
    let amount = hold_for(plan, &a, nt, mode);
    // The wallet's hold for a local call, which its body shows: this one's
    // unless the call is of another kind.
    let local_hold = (nt == CallNumberType::Local && mode.is_none()).then_some(amount);
    let now = state.now();
    let expires_at = now + a.limits.max_call_duration_minutes * 60 + state.inner.hold_grace;
    let limit = a.limits.concurrent_calls.clamp(0, u32::MAX as i64) as u32;
    let wallets = state.wallets();
    let grant = wallets.grant(account, &req.call_id, amount, limit, now, expires_at);
    let wallet = wallets.wallet(account);
    let answer_with_wallet = |status: StatusCode, body: HoldBody<'_>| {
        let body = body.with_wallet(wallet_body(plan, &a, &wallet, local_hold));
        json_answer(status, &body)
    };
    let answer = match grant {
        Grant::Granted(hold) => match commit_grant(&state, hold.clone(), fence).await? {
            None => {
                metrics::counter!(m::HOLDS_TOTAL, "outcome" => "granted").increment(1);
                answer_with_wallet(StatusCode::CREATED, HoldBody::of_hold(&hold))
            }
            Some(earlier) => {
                // The call id had a hold the registry had forgotten.
                answer_with_wallet(StatusCode::OK, HoldBody::of(&earlier))
            }
        },
        Grant::Existing(hold) => {
            // Answered once its grant is in the store: never "reserved"
            // about a hold the store may not keep.
            let found = match hold.stored().await {
                Durable::Stored => None,
                // Not stored: what the store has, if anything (not the
                // registry, where a retry may have put a grant of its own
                // that is not stored yet either).
                Durable::Pending | Durable::NotStored => Some(
                    stored_hold(&state, account, &req.call_id)
                        .await?
                        .ok_or_else(|| {
                            store_unavailable(StoreError::Cancelled(format!(
                                "the first request for call id {:?} did not store its hold",
                                req.call_id
                            )))
                        })?,
                ),
            };
            metrics::counter!(m::HOLDS_TOTAL, "outcome" => "repeated").increment(1);
            let body = found
                .as_ref()
                .map_or_else(|| HoldBody::of_hold(&hold), HoldBody::of);
            answer_with_wallet(StatusCode::OK, body)
        }
        Grant::Refused { available, amount } => {
            metrics::counter!(m::HOLDS_TOTAL, "outcome" => "refused").increment(1);
            let body = RefusedBody {
                available: Amount(available),
                code: "calls_paused",
                hold_amount: Amount(amount),
                message: refusal_message(available, amount),
            };
            json_answer(StatusCode::PAYMENT_REQUIRED, &body)
        }
        Grant::TooManyCalls { limit } => {
            metrics::counter!(m::HOLDS_TOTAL, "outcome" => "limited").increment(1);
            let body = TooManyCallsBody {
                code: "too_many_concurrent_calls",
                message: format!(
                    "Your plan allows {limit} concurrent calls and {limit} are in progress. \
                     Wait for a call to end or release its hold."
                ),
                limit,
            };
            json_answer(StatusCode::TOO_MANY_REQUESTS, &body)
        }
    };
    m::HOLD_REQUEST_TO_ANSWER.record_since(started);
    Ok(answer)
}

/// Writes a granted hold and acts on what the store did — to the end even if
/// the request is dropped meanwhile (its client gone, a timeout), so a hold
/// the store did not take is always revoked, never left granted in memory
/// only. `None` if it is stored (or its call's CDR settled it first);
/// `Some` with the hold the call id already had in the store.
async fn commit_grant(
    state: &ApiState,
    hold: Arc<Hold>,
    fence: Option<Fence>,
) -> Result<Option<StoredHold>, ApiError> {
    let state = state.clone();
    let outcome = tokio::spawn(async move {
        let wallets = state.wallets();
        let written = state.hold_commits().insert(stored(&hold), fence).await;
        let outcome = match written {
            Ok(Some(None)) => Ok(None),
            // Its call's CDR came and was flushed before this insert.
            Ok(Some(Some(_))) if hold.status() != HoldStatus::Reserved => Ok(None),
            Ok(Some(Some(earlier))) => Ok(Some(earlier)),
            Ok(None) => Err(fenced()),
            Err(e) => Err(store_unavailable(e)),
        };
        if matches!(outcome, Ok(None)) {
            hold.set_durable(Durable::Stored);
        } else {
            wallets.revoke(&hold);
            hold.set_durable(Durable::NotStored);
        }
        outcome
    })
    .await
    .map_err(|e| store_unavailable(StoreError::Task(e.to_string())))?;
    outcome
}

/// The hold of `call_id` on `account`: the registry's, else the store's.
async fn find_hold(
    state: &ApiState,
    account: AccountSid,
    call_id: &str,
) -> Result<Option<StoredHold>, ApiError> {
    if let Some(h) = state.wallets().hold(account, call_id) {
        return Ok(Some(stored(&h)));
    }
    stored_hold(state, account, call_id).await
}

/// The hold of `call_id` on `account` as the store has it.
async fn stored_hold(
    state: &ApiState,
    account: AccountSid,
    call_id: &str,
) -> Result<Option<StoredHold>, ApiError> {
    Ok(state.store().hold(&account.to_string(), call_id).await?)
}

fn no_hold(call_id: &str) -> ApiError {
    ApiError::not_found(format!("no hold for call_id {call_id:?} on this account"))
}

/// `DELETE /v1/holds/{call_id}`: releases a hold whose call never started.
pub async fn release_hold(
    State(state): State<ApiState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    peer: Option<ConnectInfo<SocketAddr>>,
    Path(call_id): Path<String>,
) -> Response {
    match local(&state, method, uri, headers, peer, Bytes::new()).await {
        Ok((a, fence)) => release_hold_for(state, a, call_id, fence)
            .await
            .into_response(),
        Err(answer) => answer,
    }
}

async fn release_hold_for(
    state: ApiState,
    a: Arc<Account>,
    call_id: String,
    fence: Option<Fence>,
) -> Result<Response, ApiError> {
    check_call_id(&call_id)?;
    let account = sid_of(&a)?;
    let wallets = state.wallets();
    let Some(hold) = wallets.hold(account, &call_id) else {
        // Not in memory: finished long ago (the store says how) or unknown.
        let h = find_hold(&state, account, &call_id)
            .await?
            .ok_or_else(|| no_hold(&call_id))?;
        return finished(&h);
    };
    if wallets.release(&hold) {
        metrics::counter!(m::HOLDS_TOTAL, "outcome" => "released").increment(1);
    }
    if hold.status() == HoldStatus::Settled {
        return finished(&stored(&hold));
    }
    // Written even if an earlier request released it in memory: that one's
    // write may have failed.
    state
        .hold_commits()
        .release(stored(&hold), fence)
        .await
        .map_err(store_unavailable)?
        .ok_or_else(fenced)?;
    wallets.forget(&hold);
    let wallet = wallets.wallet(account);
    let body =
        HoldBody::of_hold(&hold).with_wallet(wallet_body(plan_of(&state, &a), &a, &wallet, None));
    Ok(json_answer(StatusCode::OK, &body))
}

fn finished(h: &StoredHold) -> Result<Response, ApiError> {
    match h.status {
        HoldStatus::Settled => Err(ApiError::conflict(format!(
            "the hold of call {} was already settled by its CDR",
            h.call_id
        ))),
        _ => Ok(json_answer(StatusCode::OK, &HoldBody::of(h))),
    }
}

/// `GET /v1/calls/{call_id}/billing`: CallingBox's call billing fields.
pub async fn call_billing(
    State(state): State<ApiState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    peer: Option<ConnectInfo<SocketAddr>>,
    Path(call_id): Path<String>,
) -> Response {
    match local(&state, method, uri, headers, peer, Bytes::new()).await {
        Ok((a, _)) => call_billing_for(state, a, call_id).await.into_response(),
        Err(answer) => answer,
    }
}

async fn call_billing_for(
    state: ApiState,
    a: Arc<Account>,
    call_id: String,
) -> Result<Json<Json_>, ApiError> {
    check_call_id(&call_id)?;
    let h = find_hold(&state, sid_of(&a)?, &call_id)
        .await?
        .ok_or_else(|| no_hold(&call_id))?;
    let b = h.billing.unwrap_or_default();
    Ok(Json(json!({
        "call_id": h.call_id,
        "duration_seconds": b.duration,
        "billed_duration_seconds": b.billsec,
        "billing_amount_milli_cents": b.charged,
        "reservation_status": h.status.as_str(),
        "hold_amount": decimal(h.amount),
    })))
}

/// `GET /v1/wallet`.
pub async fn wallet(
    State(state): State<ApiState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    peer: Option<ConnectInfo<SocketAddr>>,
) -> Response {
    match local(&state, method, uri, headers, peer, Bytes::new()).await {
        Ok((a, _)) => wallet_for(state, a).await.into_response(),
        Err(answer) => answer,
    }
}

async fn wallet_for(state: ApiState, a: Arc<Account>) -> Result<Response, ApiError> {
    let wallet = state.wallets().wallet(sid_of(&a)?);
    let sid = a.sid.clone();
    let own = state
        .store()
        .run(move |c| c.low_balance_settings(&sid))
        .await?;
    let mut body = wallet_body(plan_of(&state, &a), &a, &wallet, None);
    body.auto_recharge = Some(auto_recharge_body(&state, own));
    Ok(json_answer(StatusCode::OK, &body))
}

/// Body of `PUT /admin/accounts/{sid}/auto-recharge`: a decimal string, or
/// null for the `[wallet]` default.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoRecharge {
    threshold: Option<String>,
    amount: Option<String>,
}

fn amount_param(param: &str, v: Option<&str>) -> Result<Option<Money>, ApiError> {
    v.map(|v| money_param(param, v, "0 or more), or null for the default"))
        .transpose()
}

/// An amount of money sent as a decimal string: a [`super::plain_decimal`]
/// (`10`, `10.00`, `0.005`) of at most five decimal places. `want` ends the
/// message that says what to send instead.
fn money_param(param: &str, v: &str, want: &str) -> Result<Money, ApiError> {
    let bad = |why: &str| {
        ApiError::invalid_parameter(
            param,
            format!(
                "{param} {} {why}; send a decimal string like \"10.00\" ({want}",
                super::error::shown(v)
            ),
        )
    };
    let t = v.trim();
    if t.len() > 40 {
        return Err(bad("is not a plain decimal"));
    }
    let d = super::plain_decimal(t).map_err(|why| match why {
        NotPlain::Shape => bad("is not a plain decimal"),
        NotPlain::Inexact => bad("has more digits than a decimal holds"),
    })?;
    w::money(param, d).map_err(|e| bad(&e))
}

/// `PUT /admin/accounts/{sid}/auto-recharge`: the account's low-balance
/// threshold and auto-recharge amount (0 = off: a crossing emits
/// `wallet.low_balance` instead of `wallet.recharge_requested`).
pub async fn set_auto_recharge(
    State(state): State<ApiState>,
    _admin: Admin,
    Path(sid): Path<String>,
    body: Bytes,
) -> Result<Json<Json_>, ApiError> {
    check_sid("sid", &sid)?;
    let req: AutoRecharge = parse_body(&body)?;
    let threshold = amount_param("threshold", req.threshold.as_deref())?;
    let amount = amount_param("amount", req.amount.as_deref())?;
    let starting = state
        .wallets()
        .starting_credit(AccountSid::parse(&sid).expect("checked"));
    let s = sid.clone();
    let found = state
        .store()
        .run(move |c| {
            if accounts::get(c, &s)?.is_none() {
                return Ok(false);
            }
            c.set_low_balance(&s, threshold, amount, starting)?;
            Ok(true)
        })
        .await?;
    if !found {
        return Err(ApiError::not_found("no such account"));
    }
    Ok(Json(json!({
        "account_sid": sid,
        "auto_recharge": auto_recharge_body(&state, (threshold, amount)),
    })))
}

/// `GET /admin/wallet-events[?account_sid=…&limit=N]`: the outbox of wallet
/// events, oldest first.
pub async fn list_events(
    State(state): State<ApiState>,
    _admin: Admin,
    axum::extract::RawQuery(raw): axum::extract::RawQuery,
) -> Result<Json<Json_>, ApiError> {
    let limit = super::agentphone::int_param(raw.as_deref(), "limit", 1000, 1, 10_000)?;
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.as_deref().unwrap_or(""))
        .map_err(|e| {
            ApiError::invalid_parameter("query", format!("malformed query string: {e}"))
        })?;
    let sid = pairs
        .into_iter()
        .find(|(k, _)| k == "account_sid")
        .map(|(_, v)| v);
    if let Some(s) = &sid {
        check_sid("account_sid", s)?;
    }
    let events = state
        .store()
        .run(move |c| c.wallet_events(sid.as_deref(), limit))
        .await?;
    let events: Vec<Json_> = events
        .iter()
        .map(|e| serde_json::from_str(&e.payload).unwrap_or(Json_::Null))
        .collect();
    Ok(Json(json!({ "events": events })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewCredit {
    amount: String,
    idempotency_key: String,
    #[serde(default)]
    reason: String,
}

/// `POST /admin/accounts/{sid}/credits`: a top-up, credited once per
/// idempotency key, durable before the `201`.
pub async fn create_credit(
    State(state): State<ApiState>,
    _admin: Admin,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path(sid): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_loaded(&state)?;
    check_sid("sid", &sid)?;
    let req = Incoming {
        method: &method,
        uri: &uri,
        headers: &headers,
        body: body.clone(),
    };
    let fence = match forward::route(&state, AccountSid::parse(&sid).expect("checked"), req).await {
        Decision::Local(fence) => fence,
        Decision::Answered(r) => return Ok(r),
    };
    let req: NewCredit = parse_body(&body)?;
    let amount = money_param("amount", &req.amount, "more than 0)")?;
    if amount == 0 {
        return Err(ApiError::invalid_parameter(
            "amount",
            "amount is 0; a top-up credits more than 0",
        ));
    }
    if req.idempotency_key.is_empty() || req.idempotency_key.len() > 255 {
        return Err(ApiError::invalid_parameter(
            "idempotency_key",
            "idempotency_key must be 1 to 255 characters",
        ));
    }
    let account = AccountSid::parse(&sid).expect("checked");
    let wallets = state.wallets().clone();
    let starting = wallets.starting_credit(account);
    let low = wallets.low_balance;
    let credit = StoredCredit {
        account_sid: sid.clone(),
        idempotency_key: req.idempotency_key,
        amount,
        reason: req.reason,
        created_at: accounts::now_rfc3339(),
    };
    let wallet = wallets.wallet(account);
    let credited = wallet.clone();
    let (a, result) = state
        .store()
        .run(move |c| {
            let done = c.synced(|c| {
                c.fenced(fence.as_ref(), |c| {
                    let Some(a) = accounts::get(c, &sid)? else {
                        return Ok(None);
                    };
                    Ok(Some((a, c.credit_wallet_in(&credit, starting, low)?)))
                })
            })?;
            // Credited in memory as soon as it is committed, on the store's
            // thread: a request dropped meanwhile (the client gone, a timeout)
            // still leaves the top-up in the balance it is stored in.
            if let Some(Some((_, (credit, true)))) = &done {
                credited.credit(credit.amount);
                metrics::counter!(m::WALLET_CREDITS_TOTAL).increment(1);
            }
            Ok(done)
        })
        .await
        .map_err(store_unavailable)?
        .ok_or_else(fenced)?
        .ok_or_else(|| ApiError::not_found("no such account"))?;
    let (credit, new) = result;
    let body = json!({
        "account_sid": credit.account_sid,
        "amount": decimal(credit.amount),
        "idempotency_key": credit.idempotency_key,
        "reason": credit.reason,
        "created_at": credit.created_at,
        "credited": new,
        "wallet": wallet_body(plan_of(&state, &a), &a, &wallet, None),
    });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// Releases the holds past their expiry (and writes them released); holds
/// finished an hour ago are dropped from memory (the store keeps them).
/// Returns how many expired.
pub async fn expire_due(state: &ApiState) -> Result<usize, StoreError> {
    let now = state.now();
    let ownership = state.ownership();
    let expired = state.wallets().expire(now, now - 3600, |a| {
        matches!(ownership.route(a), crate::wallet::owners::Route::Local(_))
    });
    if expired.is_empty() {
        return Ok(0);
    }
    metrics::counter!(m::HOLDS_TOTAL, "outcome" => "expired").increment(expired.len() as u64);
    // Through the hold writer, in the batches it makes of them and of the
    // grants and releases of the moment.
    state
        .hold_commits()
        .release_all(expired.iter().map(|h| stored(h)).collect())
        .await?;
    Ok(expired.len())
}

/// Runs [`expire_due`] every second until `stop` is set.
pub async fn expire_holds(state: ApiState, stop: Arc<std::sync::atomic::AtomicBool>) {
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        if let Err(e) = expire_due(&state).await {
            // Released in memory; a restart brings them back reserved and
            // expires them again.
            tracing::warn!(error = %e, "expired holds not written");
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wallet::CENT;

    const SID: &str = "AC00000000000000000000000000000c11";

    /// The API over a fresh SQLite store in `dir`.
    fn api(dir: &std::path::Path) -> ApiState {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tallyd.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let url = format!("sqlite://{}/t.db", dir.display());
        let env = [("TALLYD_STORE__URL".to_string(), url.clone())];
        let (cfg, tariff) = crate::config::Config::from_toml(&text, &path, env).unwrap();
        ApiState::seeded(&cfg, &tariff, crate::store::Store::open(&url).unwrap()).unwrap()
    }

    /// Grants a hold of `call_id` in memory and writes it as a hold request
    /// does: its answer's status.
    async fn hold(state: &ApiState, call_id: &str) -> StatusCode {
        let account = AccountSid::parse(SID).unwrap();
        let Grant::Granted(h) = state.wallets().grant(account, call_id, CENT, 100, 0, 3_600) else {
            panic!("{call_id} not granted in memory");
        };
        match commit_grant(state, h, None).await {
            Ok(None) => StatusCode::CREATED,
            Ok(Some(_)) => StatusCode::OK,
            Err(e) => e.status,
        }
    }

    /// A panic in the hold writer fails its batch only: the hold is refused
    /// with a 503 to retry and not left granted in memory, and the writer
    /// goes on granting (the writer's thread died with the panic, and every
    /// later hold was refused).
    #[test]
    fn a_panic_in_the_hold_writer_refuses_its_batch_and_later_holds_are_granted() {
        let dir = tempfile::tempdir().unwrap();
        let state = api(dir.path());
        let account = AccountSid::parse(SID).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            assert_eq!(hold(&state, "CA0").await, StatusCode::CREATED);
            state.hold_commits().panic_in_next_batches(1);
            assert_eq!(
                hold(&state, "CA1").await,
                StatusCode::SERVICE_UNAVAILABLE,
                "the panicked batch's hold is refused"
            );
            let wallets = state.wallets();
            assert!(wallets.hold(account, "CA1").is_none(), "not in memory");
            let v = wallets.wallet(account).view();
            assert_eq!((v.active_holds, v.held), (1, CENT), "only CA0 holds");
            for id in ["CA2", "CA1"] {
                assert_eq!(hold(&state, id).await, StatusCode::CREATED, "{id}");
            }
        });
        let stored = state
            .store()
            .with_conn(|c| c.reserved_holds())
            .unwrap()
            .len();
        assert_eq!(stored, 3, "CA0, CA2 and CA1 on its retry");
    }
}
