//! Wallet requests across instances (docs/contract.md §4, "Across instances").
//!
//! A wallet has one writer, the instance that owns its account's CDR
//! partition ([`crate::wallet::owners`]). A wallet request that reaches
//! another instance is forwarded to the owner the store records
//! (`wallet_owners`): same method, path, query, body and credentials, marked
//! with [`FORWARDED`] so it is never forwarded twice, and the owner's answer
//! is passed back unchanged. When the owner is unknown, unreachable, or a
//! forwarded request lands on an instance that no longer owns the partition
//! (the partition is moving), the answer is a 503 with `Retry-After`: the
//! caller retries and reaches the new owner once it has loaded the wallets,
//! and no hold is ever granted from a wallet its instance does not own.

use std::time::Duration;

use axum::body::Bytes;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::ApiState;
use crate::cdr::AccountSid;
use crate::metrics as m;
use crate::store::wallet::Fence;
use crate::wallet::owners::Route;

/// Marks a request forwarded by another instance (its value: that instance's
/// URL). A forwarded request is answered here or refused, never forwarded on.
pub const FORWARDED: &str = "x-tallyd-forwarded-by";

/// The HTTP client wallet requests are forwarded with.
#[derive(Clone)]
pub struct Forwarder {
    client: reqwest::Client,
    /// An owner away is met by every request until its partitions move.
    log_throttle: std::sync::Arc<crate::log_throttle::LogThrottle>,
}

impl Forwarder {
    pub fn new(timeout: Duration) -> Forwarder {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(2)))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        Forwarder {
            client,
            log_throttle: Default::default(),
        }
    }
}

/// The request as it came, for forwarding.
pub struct Incoming<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
    pub body: Bytes,
}

/// What to do with a wallet request for an account.
pub enum Decision {
    /// Answer here; writes are fenced by `Fence` (none for a lone API).
    Local(Option<Fence>),
    /// The owner's answer (or a 503 saying why there is none).
    Answered(Response),
}

fn unavailable(code: &'static str, message: String) -> Response {
    ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        code,
        message,
        param: None,
    }
    .into_response()
}

/// Answers here if this instance owns `account`'s wallet; else forwards the
/// request to the owner and returns its answer.
pub async fn route(state: &ApiState, account: AccountSid, req: Incoming<'_>) -> Decision {
    let ownership = state.ownership().clone();
    let partition = match ownership.route(account) {
        Route::Local(fence) => return Decision::Local(fence),
        Route::Unknown => {
            metrics::counter!(m::WALLET_FORWARDED_TOTAL, "outcome" => "unavailable").increment(1);
            return Decision::Answered(unavailable(
                "owner_unknown",
                "this instance does not know the CDR topic's partitions yet, so not which \
                 instance owns this wallet; retry"
                    .into(),
            ));
        }
        Route::Elsewhere(p) => p,
    };
    if req.headers.contains_key(FORWARDED) {
        // The sender found this instance recorded as the owner, but the
        // partition is being taken or moved: never grant from a stale wallet.
        return Decision::Answered(unavailable(
            "owner_moving",
            format!("the wallets of CDR partition {partition} are moving between instances; retry"),
        ));
    }
    let topic = ownership.topic.clone();
    let owner = state
        .store()
        .run(move |c| c.wallet_owner(&topic, partition))
        .await;
    let owner = match owner {
        Ok(Some((owner, _))) if owner != ownership.me() => owner,
        Ok(Some(_)) => {
            // Recorded as ours: the load of the partition is under way — or
            // another instance advertises the same URL, and then this lasts.
            let throttle = &state.inner.forwarder.log_throttle;
            if let Some(repeats) = throttle.admit("owner is me", std::time::Instant::now()) {
                tracing::warn!(partition, advertise_url = %ownership.me(), repeats_not_logged = repeats,
                    "the store records this instance as the owner of a partition it has not loaded; \
                     if this lasts, another instance advertises the same URL: set http.advertise_url");
            }
            return Decision::Answered(unavailable(
                "owner_moving",
                format!("this instance is loading the wallets of CDR partition {partition}; retry"),
            ));
        }
        Ok(None) => {
            metrics::counter!(m::WALLET_FORWARDED_TOTAL, "outcome" => "unavailable").increment(1);
            return Decision::Answered(unavailable(
                "owner_unknown",
                format!("no instance has taken CDR partition {partition}, which holds this wallet, yet; retry"),
            ));
        }
        Err(e) => {
            metrics::counter!(m::WALLET_FORWARDED_TOTAL, "outcome" => "unavailable").increment(1);
            tracing::warn!(error = %e, partition, "cannot read the wallet owner");
            return Decision::Answered(unavailable(
                "store_unavailable",
                "the store did not say which instance owns this wallet; retry".into(),
            ));
        }
    };
    Decision::Answered(forward(state, &owner, partition, req).await)
}

/// Sends the request to `owner` and passes its answer back.
async fn forward(state: &ApiState, owner: &str, partition: i32, req: Incoming<'_>) -> Response {
    let path = req
        .uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/");
    let url = format!("{owner}{path}");
    let mut out = state
        .inner
        .forwarder
        .client
        .request(req.method.clone(), &url)
        .header(FORWARDED, state.ownership().me())
        .body(req.body);
    for name in [header::AUTHORIZATION, header::CONTENT_TYPE, header::ACCEPT] {
        if let Some(v) = req.headers.get(&name) {
            out = out.header(name, v.clone());
        }
    }
    let answer = async {
        let r = out.send().await?;
        let status = r.status();
        let headers = r.headers().clone();
        let body = r.bytes().await?;
        Ok::<_, reqwest::Error>((status, headers, body))
    }
    .await;
    match answer {
        Ok((status, headers, body)) => {
            metrics::counter!(m::WALLET_FORWARDED_TOTAL, "outcome" => "answered").increment(1);
            let mut r = (status, body).into_response();
            for name in [
                header::CONTENT_TYPE,
                header::RETRY_AFTER,
                header::WWW_AUTHENTICATE,
            ] {
                if let Some(v) = headers.get(&name) {
                    r.headers_mut().insert(name, v.clone());
                }
            }
            r
        }
        Err(e) => {
            metrics::counter!(m::WALLET_FORWARDED_TOTAL, "outcome" => "unavailable").increment(1);
            let throttle = &state.inner.forwarder.log_throttle;
            if let Some(repeats) = throttle.admit(owner, std::time::Instant::now()) {
                tracing::warn!(error = %e, owner, partition, repeats_not_logged = repeats,
                    "wallet owner did not answer; requests for its wallets get 503 until it does or its partitions move");
            }
            let mut r = unavailable(
                "owner_unavailable",
                format!(
                    "the instance that owns this wallet (CDR partition {partition}) did not answer; retry"
                ),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
    }
}
