//! AgentPhone-compatible usage endpoints (docs/contract.md §5), Bearer API key:
//! `GET /v1/usage`, `/v1/usage/daily`, `/v1/usage/monthly`, `/v1/usage/by-number`,
//! `/v1/usage/by-agent`.
//!
//! "Last 24h" is the current UTC hour so far and the 23 before it (usage is
//! also counted per UTC hour, kept for the two newest days); "last 7d" is the
//! current UTC day and the six before it, and so on (usage is stored per day). Messages count message CDRs
//! (SMS and MMS), calls count every call CDR (`calls`, `calls-sip`,
//! `calls-client`). Webhook counts are the account's callbacks (usage
//! triggers and wallet events) in the store's outbox, by the UTC day each was
//! written: `totalWebhookDeliveries` every one, `successful…` those its
//! receiver accepted (2xx), `failed…` those given up on (refused, or not
//! accepted within `webhooks.retry_for_secs`); the rest are still being
//! tried. The daily and monthly `webhooks` count every callback written in
//! the day or month.

use std::collections::BTreeMap;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value as Json_};

use super::accounts::{self, Account};
use super::auth::{self, AuthThrottle};
use super::error::{shown, throttled, ApiError};
use super::records::{read_rows, RowKind};
use super::ApiState;
use crate::calendar::{Day, Month};
use crate::category::Category;
use crate::counters::{Dimension, Leaves, Tally};
use crate::store::page::{month_pages, PageId, OTHER};
use crate::store::Conn;

const MESSAGE_CATEGORIES: [Category; 2] = [Category::Sms, Category::Mms];
const CALL_CATEGORIES: [Category; 3] = [Category::Calls, Category::CallsSip, Category::CallsClient];

fn authenticate(c: &mut Conn, key: Option<String>) -> Result<Account, ApiError> {
    let key = key.ok_or_else(|| {
        ApiError::unauthorized("send your API key as Authorization: Bearer <key>")
    })?;
    accounts::by_api_key(c, &key)?
        .ok_or_else(|| ApiError::unauthorized("the API key is not valid (unknown or revoked)"))
}

/// Runs `f` on the store with the account of the request's API key. Failed
/// authentications are throttled per client address, and `f` (which reads the
/// query parameters) runs only once the key is known to be good.
pub(super) async fn with_account<T: Send + 'static>(
    state: &ApiState,
    headers: &HeaderMap,
    peer: Option<ConnectInfo<SocketAddr>>,
    f: impl FnOnce(&mut Conn, Account) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, Response> {
    let client = auth::client_of(peer);
    if let Err(wait) = state.throttle().check(client) {
        AuthThrottle::throttled("agentphone");
        return Err(throttled(false, wait));
    }
    let key = auth::bearer(headers).map(str::to_owned);
    let result = state
        .store()
        .run(move |c| Ok(authenticate(c, key).and_then(|a| f(c, a))))
        .await
        .map_err(|e| ApiError::from(e).into_response())?;
    match result {
        Ok(v) => Ok(v),
        Err(e) if e.status == StatusCode::UNAUTHORIZED => {
            match state.throttle().failed(client, "agentphone") {
                Ok(()) => Err(e.into_response()),
                Err(wait) => Err(throttled(false, wait)),
            }
        }
        Err(e) => Err(e.into_response()),
    }
}

/// The account of the request's API key, as [`with_account`] finds it, or
/// from the [`auth::KeyCache`] when it was found less than a second ago (the
/// wallet endpoints, where a call's hold and release are two requests).
pub(super) async fn cached_account(
    state: &ApiState,
    headers: &HeaderMap,
    peer: Option<ConnectInfo<SocketAddr>>,
) -> Result<Arc<Account>, Response> {
    let hash = auth::bearer(headers).map(accounts::key_hash);
    if let Some(hit) = hash.as_deref().and_then(|h| state.key_cache().get(h)) {
        // A blocked client stays blocked, whatever key it sends.
        if let Err(wait) = state.throttle().check(auth::client_of(peer)) {
            AuthThrottle::throttled("agentphone");
            return Err(throttled(false, wait));
        }
        return Ok(hit);
    }
    let seen = state.key_cache().generation();
    let a = Arc::new(with_account(state, headers, peer, |_, a| Ok(a)).await?);
    if let Some(h) = hash {
        state.key_cache().put(h, a.clone(), seen);
    }
    Ok(a)
}

/// Reads an optional integer query parameter in `[min, max]`.
pub fn int_param(
    raw: Option<&str>,
    name: &str,
    default: i64,
    min: i64,
    max: i64,
) -> Result<i64, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.unwrap_or(""))
        .map_err(|e| ApiError::invalid_parameter(name, format!("malformed query string: {e}")))?;
    match pairs.iter().find(|(k, _)| k == name) {
        None => Ok(default),
        Some((_, v)) => v
            .trim()
            .parse::<i64>()
            .ok()
            .filter(|n| (min..=max).contains(n))
            .ok_or_else(|| {
                ApiError::invalid_parameter(
                    name,
                    format!(
                        "{name} must be an integer from {min} to {max}; got {}",
                        shown(v)
                    ),
                )
            }),
    }
}

fn str_param(raw: Option<&str>, name: &str) -> Option<String> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.unwrap_or("")).ok()?;
    pairs.into_iter().find(|(k, _)| k == name).map(|(_, v)| v)
}

/// Messages and calls (event counts) and call seconds in one stored row.
fn messages_calls_seconds(leaves: &Leaves) -> (i64, i64, i64) {
    let sum = |cats: &[Category], f: fn(Tally) -> u64| {
        cats.iter().map(|c| f(leaves.get(*c)) as i64).sum::<i64>()
    };
    (
        sum(&MESSAGE_CATEGORIES, |t| t.count),
        sum(&CALL_CATEGORIES, |t| t.count),
        sum(&CALL_CATEGORIES, |t| t.usage),
    )
}

/// Messages and calls per `start_date` of the account's `period` rows in
/// `[from, to]`.
fn counts_by_start(
    c: &mut Conn,
    sid: &str,
    period: RowKind,
    from: Day,
    to: Day,
) -> Result<BTreeMap<String, (i64, i64)>, ApiError> {
    let mut out: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for r in read_rows(c, &[sid.to_owned()], period, from, to)? {
        let (m, calls, _) = messages_calls_seconds(&r.leaves);
        let e = out.entry(r.start.to_string()).or_default();
        e.0 += m;
        e.1 += calls;
    }
    Ok(out)
}

fn rfc3339_day(d: Day) -> String {
    format!("{d}T00:00:00Z")
}

/// `GET /v1/usage`.
pub async fn usage(
    State(state): State<ApiState>,
    headers: HeaderMap,
    peer: Option<ConnectInfo<SocketAddr>>,
) -> Result<Json<Json_>, Response> {
    let today = state.today();
    let now = state.now();
    let st = state.clone();
    with_account(&state, &headers, peer, move |c, a| {
        let used = breakdown(c, &a.sid, Dimension::Number, None)?
            .keys()
            .filter(|n| n.as_str() != OTHER)
            .count() as i64;
        let all = counts_by_start(c, &a.sid, RowKind::All, Day(0), Day(0))?;
        let (total_messages, total_calls) = all.values().copied().next().unwrap_or_default();
        let days = counts_by_start(c, &a.sid, RowKind::Day, Day(today.0 - 29), today)?;
        let window = |n: i32| {
            let from = Day(today.0 - (n - 1)).to_string();
            days.range(from..)
                .fold((0, 0), |acc, (_, v)| (acc.0 + v.0, acc.1 + v.1))
        };
        let (m1, c1) = last_24_hours(c, &a.sid, now)?;
        let (m7, c7) = window(7);
        let (m30, c30) = window(30);
        let month = today.month();
        let limit = a.limits.numbers;
        let hooks = c.delivery_counts(&a.sid)?;
        Ok(Json(json!({
            "plan": {
                "name": a.plan.clone().unwrap_or_else(|| st.rating_plan_name(&a.sid)),
                "limits": {
                    "numbers": a.limits.numbers,
                    "messagesPerMonth": a.limits.messages_per_month,
                    "voiceMinutesPerMonth": a.limits.voice_minutes_per_month,
                    "maxCallDurationMinutes": a.limits.max_call_duration_minutes,
                    "concurrentCalls": a.limits.concurrent_calls,
                }
            },
            "numbers": {
                "used": used,
                "active": used,
                "limit": limit,
                "remaining": (limit - used).max(0),
            },
            "stats": {
                "totalMessages": total_messages,
                "messagesLast24h": m1,
                "messagesLast7d": m7,
                "messagesLast30d": m30,
                "totalCalls": total_calls,
                "callsLast24h": c1,
                "callsLast7d": c7,
                "callsLast30d": c30,
                "totalWebhookDeliveries": hooks.total,
                "successfulWebhookDeliveries": hooks.delivered,
                "failedWebhookDeliveries": hooks.failed,
            },
            "periodStart": rfc3339_day(month.first_day()),
            "periodEnd": rfc3339_day(Month(month.0 + 1).first_day()),
        })))
    })
    .await
}

/// `GET /v1/usage/daily?days=N` (1–365, default 30): oldest day first, ending today.
pub async fn daily(
    State(state): State<ApiState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
    peer: Option<ConnectInfo<SocketAddr>>,
) -> Result<Json<Json_>, Response> {
    let today = state.today();
    with_account(&state, &headers, peer, move |c, a| {
        let days = int_param(raw.as_deref(), "days", 30, 1, 365)? as i32;
        let from = Day(today.0 - (days - 1));
        let counts = counts_by_start(c, &a.sid, RowKind::Day, from, today)?;
        let hooks: BTreeMap<i64, i64> = c
            .delivery_counts_by_day(&a.sid, from.0.into(), today.0.into())?
            .into_iter()
            .map(|(day, n)| (day, n.total))
            .collect();
        let data: Vec<Json_> = (from.0..=today.0)
            .map(|d| {
                let date = Day(d).to_string();
                let (m, calls) = counts.get(&date).copied().unwrap_or_default();
                let webhooks = hooks.get(&d.into()).copied().unwrap_or_default();
                json!({"date": date, "messages": m, "calls": calls, "webhooks": webhooks})
            })
            .collect();
        Ok(Json(json!({"data": data, "days": days})))
    })
    .await
}

/// `GET /v1/usage/monthly?months=N` (1–24, default 6): oldest month first, ending
/// with the current month.
pub async fn monthly(
    State(state): State<ApiState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
    peer: Option<ConnectInfo<SocketAddr>>,
) -> Result<Json<Json_>, Response> {
    let this = state.today().month();
    with_account(&state, &headers, peer, move |c, a| {
        let months = int_param(raw.as_deref(), "months", 6, 1, 24)? as i32;
        let first = Month(this.0 - (months - 1));
        let counts = counts_by_start(
            c,
            &a.sid,
            RowKind::Month,
            first.first_day(),
            this.first_day(),
        )?;
        let mut hooks: BTreeMap<i32, i64> = BTreeMap::new();
        let last_day = Month(this.0 + 1).first_day().0 - 1;
        for (day, n) in
            c.delivery_counts_by_day(&a.sid, first.first_day().0.into(), last_day.into())?
        {
            *hooks.entry(Day(day as i32).month().0).or_default() += n.total;
        }
        let data: Vec<Json_> = (first.0..=this.0)
            .map(|m| {
                let month = Month(m);
                let (msgs, calls) = counts
                    .get(&month.first_day().to_string())
                    .copied()
                    .unwrap_or_default();
                let webhooks = hooks.get(&m).copied().unwrap_or_default();
                json!({"month": month.to_string(), "messages": msgs, "calls": calls, "webhooks": webhooks})
            })
            .collect();
        Ok(Json(json!({"data": data, "months": months})))
    })
    .await
}

/// Messages and calls in the 24 hours up to `now` (Unix seconds), from the
/// hourly counts: this hour so far and the 23 before it.
fn last_24_hours(c: &mut Conn, sid: &str, now: i64) -> Result<(i64, i64), ApiError> {
    let this_hour = now.div_euclid(3_600);
    let today = Day::from_unix(now);
    let (first, last) = month_pages(Day(today.0 - 1), today);
    let (mut messages, mut calls) = (0, 0);
    for page in c.read_pages(&[sid.to_owned()], &first, &last)? {
        for e in page.breakdowns() {
            let Some(hour) = (e.dimension == Dimension::Hour)
                .then(|| e.value.parse::<i64>().ok())
                .flatten()
            else {
                continue;
            };
            let at = e.day.0 as i64 * 24 + hour;
            if (this_hour - 23..=this_hour).contains(&at) {
                messages += e.messages.count as i64;
                calls += e.calls.count as i64;
            }
        }
    }
    Ok((messages, calls))
}

/// Per value of a breakdown dimension: (messages, calls, call seconds).
fn breakdown(
    c: &mut Conn,
    sid: &str,
    dimension: Dimension,
    from: Option<(Day, Day)>,
) -> Result<BTreeMap<String, (i64, i64, i64)>, ApiError> {
    let (first, last) = match (from, dimension) {
        (Some((a, b)), _) => month_pages(a, b),
        // Numbers are kept all-time (`Dimension::day_of`): only on the `all` page.
        (None, Dimension::Number) => (PageId::All.text(), PageId::All.text()),
        (None, Dimension::Agent | Dimension::Hour) => (String::new(), PageId::All.text()),
    };
    let (a, b) = from.unwrap_or((Day(i32::MIN), Day(i32::MAX)));
    let mut out: BTreeMap<String, (i64, i64, i64)> = BTreeMap::new();
    for page in c.read_pages(&[sid.to_owned()], &first, &last)? {
        for e in page.breakdowns() {
            if e.dimension == dimension && (a..=b).contains(&e.day) {
                let v = out.entry(e.value.to_owned()).or_default();
                v.0 += e.messages.count as i64;
                v.1 += e.calls.count as i64;
                v.2 += e.calls.usage as i64;
            }
        }
    }
    Ok(out)
}

/// `GET /v1/usage/by-number`: all-time usage per phone number of the account.
pub async fn by_number(
    State(state): State<ApiState>,
    headers: HeaderMap,
    peer: Option<ConnectInfo<SocketAddr>>,
) -> Result<Json<Json_>, Response> {
    with_account(&state, &headers, peer, move |c, a| {
        let data: Vec<Json_> = breakdown(c, &a.sid, Dimension::Number, None)?
            .into_iter()
            .map(|(number, (messages, calls, _))| {
                // Usage of numbers past the page bound is listed as one entry.
                let (id, phone) = if number == OTHER {
                    (json!("other"), Json_::Null)
                } else {
                    (json!(number), json!(number))
                };
                json!({
                    "numberId": id,
                    "phoneNumber": phone,
                    "country": null,
                    "status": "active",
                    "messages": messages,
                    "calls": calls,
                    "agentId": null,
                    "agentName": null,
                })
            })
            .collect();
        Ok(Json(json!({ "data": data })))
    })
    .await
}

/// The current UTC week (from Monday), month or year containing `today`, as
/// `[first, last]` days.
pub fn calendar_period(period: &str, today: Day) -> Option<(Day, Day)> {
    Some(match period {
        "week" => {
            // 1970-01-01 was a Thursday: weekday index with Monday = 0.
            let monday = Day(today.0 - (today.0 + 3).rem_euclid(7));
            (monday, Day(monday.0 + 6))
        }
        "month" => (today.month().first_day(), today.month().last_day()),
        "year" => (
            Day::from_ymd(today.year(), 1, 1),
            Day::from_ymd(today.year(), 12, 31),
        ),
        _ => return None,
    })
}

/// `GET /v1/usage/by-agent?period=week|month|year`: usage per agent in the current
/// UTC calendar period; usage with no agent is reported as "Unassigned".
pub async fn by_agent(
    State(state): State<ApiState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
    peer: Option<ConnectInfo<SocketAddr>>,
) -> Result<Json<Json_>, Response> {
    let today = state.today();
    with_account(&state, &headers, peer, move |c, a| {
        let period = str_param(raw.as_deref(), "period").ok_or_else(|| {
            ApiError::invalid_parameter("period", "period is required: one of week, month, year")
        })?;
        let (first, last) = calendar_period(&period, today).ok_or_else(|| {
            ApiError::invalid_parameter(
                "period",
                format!("period must be one of week, month, year; got {}", shown(&period)),
            )
        })?;
        if let Some(tz) = str_param(raw.as_deref(), "tz").filter(|t| !t.is_empty()) {
            if !matches!(tz.as_str(), "UTC" | "Etc/UTC" | "GMT") {
                return Err(ApiError::invalid_parameter(
                    "tz",
                    format!(
                        "tz {} is not supported: usage is kept per UTC day, so only UTC is accepted",
                        shown(&tz)
                    ),
                ));
            }
        }
        let agents = breakdown(c, &a.sid, Dimension::Agent, Some((first, last)))?;
        // Everything in the period, to find what no agent handled.
        let (mut msgs, mut calls, mut secs) = (0, 0, 0);
        for r in read_rows(c, std::slice::from_ref(&a.sid), RowKind::Day, first, last)? {
            let (m, cl, s) = messages_calls_seconds(&r.leaves);
            msgs += m;
            calls += cl;
            secs += s;
        }
        let mut data: Vec<Json_> = Vec::new();
        for (agent, (m, cl, s)) in &agents {
            msgs -= m;
            calls -= cl;
            secs -= s;
            let (id, name) = if agent == OTHER {
                (Json_::Null, json!("Other agents"))
            } else {
                (json!(agent), json!(agent))
            };
            data.push(json!({
                "agentId": id,
                "agentName": name,
                "messages": m,
                "calls": cl,
                "totalSeconds": s,
                "isOrphan": false,
            }));
        }
        if msgs > 0 || calls > 0 {
            data.push(json!({
                "agentId": null,
                "agentName": "Unassigned",
                "messages": msgs.max(0),
                "calls": calls.max(0),
                "totalSeconds": secs.max(0),
                "isOrphan": true,
            }));
        }
        Ok(Json(json!({
            "data": data,
            "period": period,
            "periodStart": rfc3339_day(first),
            "periodEnd": rfc3339_day(Day(last.0 + 1)),
        })))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int_params_are_checked() {
        assert_eq!(int_param(None, "days", 30, 1, 365).unwrap(), 30);
        assert_eq!(int_param(Some("days=7"), "days", 30, 1, 365).unwrap(), 7);
        for bad in ["days=0", "days=366", "days=abc", "days=1.5", "days="] {
            let e = int_param(Some(bad), "days", 30, 1, 365).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("days"));
            assert!(e.message.contains("from 1 to 365"), "{}", e.message);
        }
    }

    #[test]
    fn weeks_start_on_monday() {
        let wed = Day::parse("2025-01-08").unwrap();
        let (a, b) = calendar_period("week", wed).unwrap();
        assert_eq!(
            (a.to_string(), b.to_string()),
            ("2025-01-06".into(), "2025-01-12".into())
        );
        let mon = Day::parse("2025-01-06").unwrap();
        assert_eq!(calendar_period("week", mon).unwrap().0, mon);
        let sun = Day::parse("2025-01-12").unwrap();
        assert_eq!(calendar_period("week", sun).unwrap().0, mon);
        assert!(calendar_period("fortnight", wed).is_none());
    }
}
