//! Twilio's Usage Triggers (docs/contract.md §6):
//! `GET|POST /2010-04-01/Accounts/{AccountSid}/Usage/Triggers[.json]` and
//! `GET|POST|DELETE …/Usage/Triggers/{UsageTriggerSid}[.json]`, with the
//! parameters, resource fields and paging of Twilio's API, so code written
//! for Twilio (and the official helper libraries) manages triggers here
//! unchanged.
//!
//! Requests authenticate exactly as Usage Records do ([`twilio::authorize`]):
//! HTTP Basic `AccountSid:AuthToken`, failures throttled per client, an
//! account manages its own triggers and its subaccounts', and any other
//! account — or a trigger SID that is unknown or another account's — is the
//! same 404, so neither accounts nor triggers can be probed. Credentials are
//! checked before any parameter is read.
//!
//! Every change is written to the store first and then to the in-memory
//! [`crate::triggers::TriggerBook`], so the flusher evaluates the new trigger
//! from its next flush on; a change the store did not take is not made.
//! `current_value` is read from the stored usage (as of the last flush), the
//! way the flusher measures it: the account's own value of the category, by
//! `trigger_by`, in the trigger's current UTC period.

use std::collections::HashMap;
use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use rand::RngCore;
use rust_decimal::Decimal;
use serde::Serialize;

use super::auth::{self, AuthThrottle};
use super::error::{shown, throttled, TwilioError};
use super::records::{read_rows, Listed, RowKind};
use super::twilio::{self, PageToken, Target, API_VERSION};
use super::{ApiState, NotPlain};
use crate::calendar::{format_rfc3339, parse_rfc3339, Day, Period};
use crate::counters::Leaves;
use crate::store::triggers::TriggerFilter;
use crate::store::{Conn, Error as StoreError, Param};
use crate::triggers::{value_of, CallbackMethod, Recurring, Trigger, TriggerBook, TriggerBy};
use crate::webhooks::url::{check_callback_url, UrlPolicy};

/// The most triggers one account may have.
pub const MAX_TRIGGERS_PER_ACCOUNT: u64 = 1000;
/// The longest `FriendlyName`, in characters (Twilio's limit).
pub const MAX_FRIENDLY_NAME_CHARS: usize = 64;
/// The longest `TriggerValue` accepted, in characters.
const MAX_TRIGGER_VALUE_CHARS: usize = 40;

/// Form or query parameters; the first occurrence of a name wins and names
/// tallyd does not know are ignored, as Twilio does.
struct Params(Vec<(String, String)>);

impl Params {
    fn parse(raw: &[u8], what: &str) -> Result<Params, TwilioError> {
        serde_urlencoded::from_bytes(raw)
            .map(Params)
            .map_err(|e| TwilioError::invalid_parameter(format!("malformed {what}: {e}")))
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// A parameter that is absent or empty is not given.
    fn given(&self, name: &str) -> Option<&str> {
        self.get(name).filter(|v| !v.is_empty())
    }
}

/// Whether `s` is a usage trigger SID: `UT` + 32 lowercase hex digits.
pub fn is_trigger_sid(s: &str) -> bool {
    s.len() == 34
        && s.starts_with("UT")
        && s[2..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A fresh trigger SID (128 random bits).
pub fn new_trigger_sid() -> String {
    let mut b = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut b);
    let mut s = String::with_capacity(34);
    s.push_str("UT");
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

/// A stored RFC 3339 time as Twilio writes dates: `Sun, 06 Sep 2015 12:58:45 +0000`.
pub fn rfc2822(stored: &str) -> String {
    chrono::DateTime::from_timestamp(parse_rfc3339(stored).unwrap_or(0), 0)
        .unwrap_or_default()
        .format("%a, %d %b %Y %H:%M:%S +0000")
        .to_string()
}

/// A decimal as Twilio writes one: `"0"`, `"2.5"`, `"150"`.
fn decimal_string(d: Decimal) -> String {
    d.normalize().to_string()
}

/// `TriggerValue`: a non-negative decimal, or `+N` (N more than the current
/// value). Returns whether it is relative, and the number.
pub fn parse_trigger_value(raw: &str) -> Result<(bool, Decimal), TwilioError> {
    let bad = || {
        TwilioError::invalid_parameter(format!(
            "TriggerValue {} is not a non-negative decimal: use a number such as 100 or 2.5, or +N (URL-encoded %2BN) for N more than the current value",
            shown(raw)
        ))
    };
    // An unencoded `+` arrives as a space (form decoding).
    let (relative, number) = match raw.as_bytes().first() {
        Some(b'+' | b' ') => (true, &raw[1..]),
        _ => (false, raw),
    };
    if raw.len() > MAX_TRIGGER_VALUE_CHARS {
        return Err(bad());
    }
    // Exact: a value with more decimal places than a Decimal keeps is
    // refused, not rounded to another threshold.
    let value = super::plain_decimal(number).map_err(|why| match why {
        NotPlain::Shape => bad(),
        NotPlain::Inexact => TwilioError::invalid_parameter(format!(
            "TriggerValue {} has more digits than a decimal of 28 significant digits holds",
            shown(raw)
        )),
    })?;
    Ok((relative, value.normalize()))
}

fn parse_category(name: &str, v: &str) -> Result<Listed, TwilioError> {
    Listed::parse(v).ok_or_else(|| {
        TwilioError::invalid_parameter(format!(
            "{name} {} is not a Twilio usage category: use one such as calls, sms, calls-outbound or totalprice",
            shown(v)
        ))
    })
}

/// A short word of a fixed set, in any case; `what` ends the refusal.
fn parse_word<T>(
    name: &str,
    v: &str,
    parse: fn(&str) -> Option<T>,
    what: &str,
) -> Result<T, TwilioError> {
    Some(v)
        .filter(|v| v.len() <= 16)
        .and_then(|v| parse(&v.to_ascii_lowercase()))
        .ok_or_else(|| TwilioError::invalid_parameter(format!("{name} {} {what}", shown(v))))
}

fn parse_recurring(v: &str) -> Result<Recurring, TwilioError> {
    parse_word(
        "Recurring",
        v,
        Recurring::parse,
        "is not a recurrence: use daily, monthly, yearly or alltime, or leave it empty for a trigger that fires once",
    )
}

fn parse_trigger_by(v: &str) -> Result<TriggerBy, TwilioError> {
    parse_word(
        "TriggerBy",
        v,
        TriggerBy::parse,
        "is not a trigger field: use count, usage or price",
    )
}

fn parse_method(v: &str) -> Result<CallbackMethod, TwilioError> {
    CallbackMethod::parse(v).ok_or_else(|| {
        TwilioError::invalid_parameter(format!(
            "CallbackMethod {} is not an HTTP method callbacks are sent with: use GET or POST",
            shown(v)
        ))
    })
}

fn check_url(policy: UrlPolicy, v: &str) -> Result<(), TwilioError> {
    check_callback_url(v, policy)
        .map(|_| ())
        .map_err(|why| TwilioError::invalid_parameter(format!("CallbackUrl {} {why}", shown(v))))
}

fn check_friendly_name(v: &str) -> Result<(), TwilioError> {
    let chars = v.chars().count();
    if chars > MAX_FRIENDLY_NAME_CHARS {
        return Err(TwilioError::invalid_parameter(format!(
            "FriendlyName is {chars} characters long; at most {MAX_FRIENDLY_NAME_CHARS} are accepted"
        )));
    }
    if v.chars().any(char::is_control) {
        return Err(TwilioError::invalid_parameter(format!(
            "FriendlyName {} has control characters",
            shown(v)
        )));
    }
    Ok(())
}

/// The parameters of a create request, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTrigger {
    pub callback_url: String,
    pub relative: bool,
    pub trigger_value: Decimal,
    pub usage_category: Listed,
    pub callback_method: CallbackMethod,
    pub friendly_name: String,
    pub recurring: Recurring,
    pub trigger_by: TriggerBy,
}

/// Reads and checks the form of a create request.
pub fn parse_create(body: &[u8], policy: UrlPolicy) -> Result<NewTrigger, TwilioError> {
    let p = Params::parse(body, "form body")?;
    let required = |name: &str| {
        p.given(name).ok_or_else(|| {
            TwilioError::invalid_parameter(format!(
                "{name} is required (a form-encoded parameter of the request body)"
            ))
        })
    };
    let callback_url = required("CallbackUrl")?;
    let raw_value = required("TriggerValue")?;
    let category = required("UsageCategory")?;
    check_url(policy, callback_url)?;
    let (relative, trigger_value) = parse_trigger_value(raw_value)?;
    let usage_category = parse_category("UsageCategory", category)?;
    let callback_method = match p.given("CallbackMethod") {
        None => CallbackMethod::Post,
        Some(m) => parse_method(m)?,
    };
    let friendly_name = p.get("FriendlyName").unwrap_or("");
    check_friendly_name(friendly_name)?;
    let recurring = match p.get("Recurring") {
        None => Recurring::Once,
        Some(r) => parse_recurring(r)?,
    };
    let trigger_by = match p.given("TriggerBy") {
        None => TriggerBy::Usage,
        Some(b) => parse_trigger_by(b)?,
    };
    Ok(NewTrigger {
        callback_url: callback_url.to_owned(),
        relative,
        trigger_value,
        usage_category,
        callback_method,
        friendly_name: friendly_name.to_owned(),
        recurring,
        trigger_by,
    })
}

/// The changes of an update request, checked (`None` keeps a value).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TriggerUpdate {
    pub callback_url: Option<String>,
    pub callback_method: Option<CallbackMethod>,
    pub friendly_name: Option<String>,
}

/// Reads and checks the form of an update request.
pub fn parse_update(body: &[u8], policy: UrlPolicy) -> Result<TriggerUpdate, TwilioError> {
    let p = Params::parse(body, "form body")?;
    let callback_url = match p.get("CallbackUrl") {
        None => None,
        Some(u) => {
            check_url(policy, u)?;
            Some(u.to_owned())
        }
    };
    let callback_method = p.given("CallbackMethod").map(parse_method).transpose()?;
    let friendly_name = match p.get("FriendlyName") {
        None => None,
        Some(n) => {
            check_friendly_name(n)?;
            Some(n.to_owned())
        }
    };
    Ok(TriggerUpdate {
        callback_url,
        callback_method,
        friendly_name,
    })
}

/// The query of a list request, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    pub filter: TriggerFilter,
    /// The filters as given, canonical, for the paging links.
    pub filter_pairs: Vec<(&'static str, String)>,
    pub page_size: u32,
    pub page: Option<u64>,
    pub token: Option<PageToken>,
}

/// Reads and checks the query of a list request (paging as Usage Records:
/// a `PageSize` above the maximum is served as the maximum).
pub fn parse_list_query(raw: Option<&str>) -> Result<ListQuery, TwilioError> {
    let p = Params::parse(raw.unwrap_or("").as_bytes(), "query string")?;
    let mut filter = TriggerFilter::default();
    let mut filter_pairs = Vec::new();
    if let Some(r) = p.get("Recurring") {
        let r = parse_recurring(r)?;
        filter.recurring = Some(match r {
            // Twilio lists `alltime` and once-only triggers as one kind.
            Recurring::AllTime | Recurring::Once => vec![Recurring::Once, Recurring::AllTime],
            r => vec![r],
        });
        filter_pairs.push(("Recurring", r.as_str().to_owned()));
    }
    if let Some(b) = p.given("TriggerBy") {
        let b = parse_trigger_by(b)?;
        filter.trigger_by = Some(b);
        filter_pairs.push(("TriggerBy", b.as_str().to_owned()));
    }
    if let Some(c) = p.given("UsageCategory") {
        let c = parse_category("UsageCategory", c)?;
        filter.usage_category = Some(c.name().to_owned());
        filter_pairs.push(("UsageCategory", c.name().to_owned()));
    }
    let (page_size, page, token) = twilio::paging(&|k| p.get(k))?;
    Ok(ListQuery {
        filter,
        filter_pairs,
        page_size,
        page,
        token,
    })
}

/// The stored usage row kind a period is kept in.
fn row_kind(p: Period) -> RowKind {
    match p {
        Period::Day(_) => RowKind::Day,
        Period::Month(_) => RowKind::Month,
        Period::Year(_) => RowKind::Year,
        Period::AllTime => RowKind::All,
    }
}

/// Current values of one account's triggers: each period's stored row is
/// read once however many triggers of a page measure it.
struct CurrentValues {
    account: String,
    today: Day,
    rows: HashMap<Period, Leaves>,
}

impl CurrentValues {
    fn new(account: &str, today: Day) -> CurrentValues {
        CurrentValues {
            account: account.to_owned(),
            today,
            rows: HashMap::new(),
        }
    }

    /// The value `category` has, measured `by`, in the current period of
    /// `recurring` (0 for a category tallyd does not count).
    fn of(
        &mut self,
        c: &mut Conn,
        category: &str,
        by: TriggerBy,
        recurring: Recurring,
    ) -> Result<Decimal, StoreError> {
        let Ok(category) = category.parse() else {
            return Ok(Decimal::ZERO);
        };
        let period = recurring.period_of(self.today);
        if !self.rows.contains_key(&period) {
            let start = period.start();
            let leaves = read_rows(
                c,
                std::slice::from_ref(&self.account),
                row_kind(period),
                start,
                start,
            )?
            .into_iter()
            .find(|r| r.start == start)
            .map(|r| r.leaves)
            .unwrap_or_default();
            self.rows.insert(period, leaves);
        }
        Ok(value_of(&self.rows[&period], category, by))
    }
}

/// A UsageTrigger, field for field as Twilio sends it.
#[derive(Debug, Serialize)]
pub struct TriggerJson {
    account_sid: String,
    api_version: &'static str,
    callback_method: &'static str,
    callback_url: String,
    current_value: String,
    date_created: String,
    date_fired: Option<String>,
    date_updated: String,
    friendly_name: String,
    recurring: &'static str,
    sid: String,
    trigger_by: &'static str,
    trigger_value: String,
    uri: String,
    usage_category: String,
    usage_record_uri: String,
}

fn trigger_json(t: &Trigger, current: Decimal) -> TriggerJson {
    let account = &t.account_sid;
    let records = match t.recurring {
        Recurring::Daily => "/Daily",
        Recurring::Monthly => "/Monthly",
        Recurring::Yearly => "/Yearly",
        Recurring::AllTime => "/AllTime",
        Recurring::Once => "",
    };
    TriggerJson {
        account_sid: account.clone(),
        api_version: API_VERSION,
        callback_method: t.callback_method.as_str(),
        callback_url: t.callback_url.clone(),
        current_value: decimal_string(current),
        date_created: rfc2822(&t.date_created),
        date_fired: t.date_fired.as_deref().map(rfc2822),
        date_updated: rfc2822(&t.date_updated),
        friendly_name: t.friendly_name.clone(),
        recurring: t.recurring.as_str(),
        sid: t.sid.clone(),
        trigger_by: t.trigger_by.as_str(),
        trigger_value: decimal_string(t.trigger_value),
        uri: format!(
            "/{API_VERSION}/Accounts/{account}/Usage/Triggers/{}.json",
            t.sid
        ),
        // Category names need no URL encoding.
        usage_record_uri: format!(
            "/{API_VERSION}/Accounts/{account}/Usage/Records{records}.json?Category={}",
            t.usage_category
        ),
        usage_category: t.usage_category.clone(),
    }
}

fn json_of(c: &mut Conn, t: &Trigger, now: &mut CurrentValues) -> Result<TriggerJson, TwilioError> {
    let current = now.of(c, &t.usage_category, t.trigger_by, t.recurring)?;
    Ok(trigger_json(t, current))
}

/// A page of UsageTriggers with Twilio's paging fields.
#[derive(Debug, Serialize)]
pub struct TriggersPage {
    end: u64,
    first_page_uri: String,
    next_page_uri: Option<String>,
    page: u64,
    page_size: u32,
    previous_page_uri: Option<String>,
    start: u64,
    uri: String,
    usage_triggers: Vec<TriggerJson>,
}

/// What a request changed, applied to the book once the store has it.
enum BookChange {
    None,
    Upsert(Box<Trigger>),
    Remove { account: String, sid: String },
}

/// An answer: status, JSON body (none for 204) and the book change.
struct Answer {
    status: StatusCode,
    body: Option<Vec<u8>>,
    change: BookChange,
}

impl Answer {
    fn json(
        status: StatusCode,
        v: &impl Serialize,
        change: BookChange,
    ) -> Result<Answer, TwilioError> {
        Ok(Answer {
            status,
            body: Some(serde_json::to_vec(v).map_err(TwilioError::internal)?),
            change,
        })
    }
}

/// What a handler's store closure needs of the request besides its own
/// parameters.
struct Context {
    now: i64,
    path: String,
    policy: UrlPolicy,
}

/// Authenticates (failures throttled per client, as Usage Records), then runs
/// `f` on the store with the account the path names, then applies its change
/// to the trigger book. `sid` is `None` when the path did not decode (a 404
/// once the caller is known).
async fn serve(
    state: ApiState,
    sid: Option<String>,
    uri: Uri,
    headers: HeaderMap,
    peer: Option<ConnectInfo<SocketAddr>>,
    f: impl FnOnce(&mut Conn, Target, Context) -> Result<Answer, TwilioError> + Send + 'static,
) -> Response {
    let client = auth::client_of(peer);
    if let Err(wait) = state.throttle().check(client) {
        AuthThrottle::throttled("twilio");
        return throttled(true, wait);
    }
    let req = Context {
        now: state.now(),
        path: uri.path().to_owned(),
        policy: state.url_policy(),
    };
    let creds = auth::basic(&headers);
    let sid = sid.unwrap_or_default();
    let path = req.path.clone();
    let book = state.triggers().clone();
    // The book is changed in the same blocking task as the store, right
    // after it: a client that hangs up once the store has the change cannot
    // leave the book without it.
    let result = state
        .store()
        .run(move |c| {
            Ok(twilio::authorize(c, creds, &sid, &path)
                .and_then(|target| f(c, target, req))
                .map(|answer| {
                    apply(&book, answer.change);
                    (answer.status, answer.body)
                }))
        })
        .await;
    let (status, body) = match result {
        Err(e) => return TwilioError::from(e).into_response(),
        Ok(Ok(a)) => a,
        Ok(Err(e)) if e.status == StatusCode::UNAUTHORIZED => {
            return match state.throttle().failed(client, "twilio") {
                Ok(()) => e.into_response(),
                Err(wait) => throttled(true, wait),
            }
        }
        Ok(Err(e)) => return e.into_response(),
    };
    match body {
        Some(body) => (status, [(header::CONTENT_TYPE, "application/json")], body).into_response(),
        None => status.into_response(),
    }
}

/// Applies a change the store has taken to the trigger book.
fn apply(book: &TriggerBook, change: BookChange) {
    match change {
        BookChange::None => {}
        BookChange::Upsert(mut t) => {
            // A firing the flusher recorded in the book meanwhile is kept:
            // the row read before it would undo it.
            if let Some(old) = book.of(&t.account_sid).into_iter().find(|o| o.sid == t.sid) {
                if old.fired_period > t.fired_period {
                    t.fired_period.clone_from(&old.fired_period);
                    t.date_fired.clone_from(&old.date_fired);
                    t.fired_value = old.fired_value;
                }
            }
            book.upsert(*t);
        }
        BookChange::Remove { account, sid } => book.remove(&account, &sid),
    }
}

/// The trigger SID of a path segment (`UT…` or `UT….json`), if it has the shape.
fn trigger_sid(segment: &str) -> Option<&str> {
    let sid = segment.strip_suffix(".json").unwrap_or(segment);
    is_trigger_sid(sid).then_some(sid)
}

/// `POST …/Usage/Triggers[.json]`: creates a trigger (201).
pub async fn create(
    State(state): State<ApiState>,
    sid: Option<Path<String>>,
    uri: Uri,
    headers: HeaderMap,
    peer: Option<ConnectInfo<SocketAddr>>,
    body: Bytes,
) -> Response {
    let sid = sid.map(|Path(s)| s);
    serve(state, sid, uri, headers, peer, move |c, target, req| {
        let new = parse_create(&body, req.policy)?;
        let account = target.account.sid;
        let today = Day::from_unix(req.now);
        let mut now = CurrentValues::new(&account, today);
        let category = new.usage_category.name();
        // Read before the insert: once it commits, nothing may fail the
        // answer (a client told "nothing was changed, retry" would create it
        // twice).
        let current = now
            .of(c, category, new.trigger_by, new.recurring)
            ?;
        let trigger_value = if new.relative {
            current.checked_add(new.trigger_value).ok_or_else(|| {
                TwilioError::invalid_parameter(format!(
                    "TriggerValue +{} is too large",
                    new.trigger_value
                ))
            })?
        } else {
            new.trigger_value
        };
        let created = format_rfc3339(req.now);
        let t = Trigger {
            sid: new_trigger_sid(),
            account_sid: account.clone(),
            friendly_name: new.friendly_name,
            usage_category: category.to_owned(),
            trigger_by: new.trigger_by,
            trigger_value: trigger_value.normalize(),
            recurring: new.recurring,
            callback_url: new.callback_url,
            callback_method: new.callback_method,
            date_created: created.clone(),
            date_updated: created,
            date_fired: None,
            fired_period: None,
            fired_value: None,
        };
        let inserted = c
            .transaction(|c| {
                // Locks the account's row until the commit, so that creates
                // racing on PostgreSQL count one another (SQLite's write
                // transactions are serial already).
                let locked = c.execute(
                    "UPDATE api_accounts SET account_sid = account_sid WHERE account_sid = $1",
                    &[Param::Text(&account)],
                )?;
                if locked == 0 {
                    // Deleted since it was authorized: no trigger for it.
                    return Ok(Err(None));
                }
                let n = c.count_triggers(&account)?;
                if n >= MAX_TRIGGERS_PER_ACCOUNT {
                    return Ok(Err(Some(n)));
                }
                c.insert_trigger(&t)?;
                Ok(Ok(()))
            })
            ?;
        match inserted {
            Ok(()) => {}
            Err(None) => return Err(TwilioError::not_found(&req.path)),
            Err(Some(n)) => {
                return Err(TwilioError::invalid_parameter(format!(
                    "Account {account} has {n} usage triggers, the most one account may have ({MAX_TRIGGERS_PER_ACCOUNT}); delete one before creating another"
                )))
            }
        }
        let json = trigger_json(&t, current);
        Answer::json(StatusCode::CREATED, &json, BookChange::Upsert(Box::new(t)))
    })
    .await
}

/// `GET …/Usage/Triggers[.json]`: one page of the account's triggers, oldest
/// first.
pub async fn list(
    State(state): State<ApiState>,
    sid: Option<Path<String>>,
    uri: Uri,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    peer: Option<ConnectInfo<SocketAddr>>,
) -> Response {
    let sid = sid.map(|Path(s)| s);
    serve(state, sid, uri, headers, peer, move |c, target, req| {
        let q = parse_list_query(raw.as_deref())?;
        let account = target.account.sid;
        let base = format!("/{API_VERSION}/Accounts/{account}/Usage/Triggers.json");
        let query = |extra: &[(&'static str, String)]| {
            let mut p = q.filter_pairs.clone();
            p.extend_from_slice(extra);
            let qs = serde_urlencoded::to_string(&p).unwrap_or_default();
            if qs.is_empty() {
                base.clone()
            } else {
                format!("{base}?{qs}")
            }
        };
        let listing = query(&[]);
        let size = u64::from(q.page_size);
        let start = twilio::page_start(q.token, q.page, q.page_size, &listing)?;
        let page = start / size;
        let found = c.triggers_page(&account, &q.filter, start, q.page_size)?;
        let mut now = CurrentValues::new(&account, Day::from_unix(req.now));
        let usage_triggers = found
            .triggers
            .iter()
            .map(|t| json_of(c, t, &mut now))
            .collect::<Result<Vec<_>, _>>()?;
        let link = |page: u64, offset: Option<u64>| {
            let mut p = vec![("PageSize", size.to_string()), ("Page", page.to_string())];
            if let Some(o) = offset {
                p.push((
                    "PageToken",
                    PageToken::new(&listing, o, q.page_size).encode(),
                ));
            }
            query(&p)
        };
        let end_excl = start + usage_triggers.len() as u64;
        let body = TriggersPage {
            end: end_excl.saturating_sub(1),
            first_page_uri: link(0, None),
            next_page_uri: found.has_more.then(|| link(page + 1, Some(end_excl))),
            page,
            page_size: q.page_size,
            previous_page_uri: (page > 0).then(|| link(page - 1, Some((page - 1) * size))),
            start,
            uri: link(page, None),
            usage_triggers,
        };
        Answer::json(StatusCode::OK, &body, BookChange::None)
    })
    .await
}

/// `GET …/Usage/Triggers/{Sid}[.json]`.
pub async fn fetch(
    State(state): State<ApiState>,
    params: Option<Path<(String, String)>>,
    uri: Uri,
    headers: HeaderMap,
    peer: Option<ConnectInfo<SocketAddr>>,
) -> Response {
    let (sid, segment) = split(params);
    serve(state, sid, uri, headers, peer, move |c, target, req| {
        let account = target.account.sid;
        let t = match trigger_sid(&segment) {
            Some(ut) => c.trigger(&account, ut)?,
            None => None,
        }
        .ok_or_else(|| TwilioError::not_found(&req.path))?;
        let mut now = CurrentValues::new(&account, Day::from_unix(req.now));
        let json = json_of(c, &t, &mut now)?;
        Answer::json(StatusCode::OK, &json, BookChange::None)
    })
    .await
}

/// `POST …/Usage/Triggers/{Sid}[.json]`: changes `CallbackUrl`,
/// `CallbackMethod`, `FriendlyName`.
pub async fn update(
    State(state): State<ApiState>,
    params: Option<Path<(String, String)>>,
    uri: Uri,
    headers: HeaderMap,
    peer: Option<ConnectInfo<SocketAddr>>,
    body: Bytes,
) -> Response {
    let (sid, segment) = split(params);
    serve(state, sid, uri, headers, peer, move |c, target, req| {
        let account = target.account.sid;
        let not_found = || TwilioError::not_found(&req.path);
        let ut = trigger_sid(&segment).ok_or_else(not_found)?;
        // An unknown SID is a 404 whatever the body says.
        let old = c.trigger(&account, ut)?.ok_or_else(not_found)?;
        let u = parse_update(&body, req.policy)?;
        // Read before the write, as for a create (an update changes none of
        // what the value depends on).
        let current = CurrentValues::new(&account, Day::from_unix(req.now)).of(
            c,
            &old.usage_category,
            old.trigger_by,
            old.recurring,
        )?;
        let t = c
            .transaction(|c| {
                let t = c.update_trigger(
                    &account,
                    ut,
                    u.callback_url.as_deref(),
                    u.callback_method,
                    u.friendly_name.as_deref(),
                    &format_rfc3339(req.now),
                )?;
                // Callbacks still to be delivered go where it says now.
                if let Some(t) = &t {
                    c.redirect_trigger_callbacks(ut, &t.callback_url, t.callback_method.as_str())?;
                }
                Ok(t)
            })?
            .ok_or_else(not_found)?;
        let json = trigger_json(&t, current);
        Answer::json(StatusCode::OK, &json, BookChange::Upsert(Box::new(t)))
    })
    .await
}

/// `DELETE …/Usage/Triggers/{Sid}[.json]` (204).
pub async fn delete(
    State(state): State<ApiState>,
    params: Option<Path<(String, String)>>,
    uri: Uri,
    headers: HeaderMap,
    peer: Option<ConnectInfo<SocketAddr>>,
) -> Response {
    let (sid, segment) = split(params);
    serve(state, sid, uri, headers, peer, move |c, target, req| {
        let account = target.account.sid;
        let ut = trigger_sid(&segment).ok_or_else(|| TwilioError::not_found(&req.path))?;
        let deleted = c.transaction(|c| {
            let deleted = c.delete_trigger(&account, ut)?;
            if deleted {
                // Nothing more is sent for it.
                c.drop_trigger_callbacks(ut, req.now.saturating_mul(1000))?;
            }
            Ok(deleted)
        })?;
        if !deleted {
            return Err(TwilioError::not_found(&req.path));
        }
        Ok(Answer {
            status: StatusCode::NO_CONTENT,
            body: None,
            change: BookChange::Remove {
                account,
                sid: ut.to_owned(),
            },
        })
    })
    .await
}

fn split(params: Option<Path<(String, String)>>) -> (Option<String>, String) {
    match params {
        Some(Path((sid, segment))) => (Some(sid), segment),
        None => (None, String::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRICT: UrlPolicy = UrlPolicy {
        allow_loopback: false,
        allow_private: false,
    };

    fn form(pairs: &[(&str, &str)]) -> Vec<u8> {
        serde_urlencoded::to_string(pairs).unwrap().into_bytes()
    }

    const OK: [(&str, &str); 3] = [
        ("CallbackUrl", "https://example.com/cb"),
        ("TriggerValue", "100"),
        ("UsageCategory", "calls"),
    ];

    #[test]
    fn create_defaults_and_relative_values() {
        let n = parse_create(&form(&OK), STRICT).unwrap();
        assert_eq!(n.callback_method, CallbackMethod::Post);
        assert_eq!(n.recurring, Recurring::Once);
        assert_eq!(n.trigger_by, TriggerBy::Usage);
        assert_eq!((n.relative, n.trigger_value), (false, Decimal::from(100)));
        assert_eq!(n.friendly_name, "");
        let mut f = OK.to_vec();
        f[1] = ("TriggerValue", "+2.50");
        f.push(("Recurring", "monthly"));
        f.push(("TriggerBy", "price"));
        f.push(("CallbackMethod", "get"));
        f.push(("Unknown", "ignored"));
        let n = parse_create(&form(&f), STRICT).unwrap();
        assert_eq!((n.relative, n.trigger_value), (true, Decimal::new(25, 1)));
        assert_eq!(n.recurring, Recurring::Monthly);
        assert_eq!(n.trigger_by, TriggerBy::Price);
        assert_eq!(n.callback_method, CallbackMethod::Get);
        // An unencoded + is a space once decoded.
        let raw = b"CallbackUrl=https://example.com/&TriggerValue=+30&UsageCategory=sms";
        let n = parse_create(raw, STRICT).unwrap();
        assert_eq!((n.relative, n.trigger_value), (true, Decimal::from(30)));
    }

    /// More decimal places than a Decimal keeps: refused, not rounded to
    /// another threshold (0 would fire on any usage).
    #[test]
    fn trigger_values_are_exact_or_refused() {
        for raw in [
            "0.00000000000000000000000000001",
            "1.00000000000000000000000000009",
        ] {
            let e = parse_trigger_value(raw).unwrap_err();
            assert!(e.message.contains("TriggerValue"), "{raw}: {}", e.message);
        }
        let (_, v) = parse_trigger_value("0.0000000000000000000000000001").unwrap();
        assert_eq!(v, Decimal::new(1, 28));
    }

    #[test]
    fn create_errors_name_the_parameter() {
        for (change, want) in [
            (("CallbackUrl", ""), "CallbackUrl is required"),
            (("TriggerValue", ""), "TriggerValue is required"),
            (("UsageCategory", ""), "UsageCategory is required"),
            (("CallbackUrl", "ftp://x.example/"), "CallbackUrl \"ftp"),
            (("CallbackUrl", "http://127.0.0.1:9/"), "loopback"),
            (("CallbackUrl", "http://169.254.169.254/"), "private"),
            (("TriggerValue", "-5"), "TriggerValue \"-5\""),
            (("TriggerValue", "1e3"), "TriggerValue \"1e3\""),
            (("TriggerValue", "1.2.3"), "TriggerValue \"1.2.3\""),
            (("TriggerValue", "+"), "TriggerValue \"+\""),
            (("TriggerValue", "1."), "TriggerValue \"1.\""),
            (
                ("TriggerValue", "123456789012345678901234567890"),
                "28 significant digits",
            ),
            (("UsageCategory", "minutes"), "UsageCategory \"minutes\""),
            (("Recurring", "weekly"), "Recurring \"weekly\""),
            (("TriggerBy", "seconds"), "TriggerBy \"seconds\""),
            (("CallbackMethod", "PUT"), "CallbackMethod \"PUT\""),
            (("FriendlyName", &"n".repeat(65)), "FriendlyName is 65"),
            (("FriendlyName", "a\u{7}b"), "FriendlyName \"a\\u{7}b\""),
        ] {
            let f: Vec<_> = OK
                .iter()
                .copied()
                .filter(|(k, _)| *k != change.0)
                .chain([change])
                .collect();
            let e = parse_create(&form(&f), STRICT).unwrap_err();
            assert_eq!((e.status.as_u16(), e.code), (400, 20001), "{want}");
            assert!(e.message.contains(want), "{want}: {}", e.message);
        }
        let long = "9".repeat(100_000);
        let f = [OK[0], ("TriggerValue", long.as_str()), OK[2]];
        let e = parse_create(&form(&f), STRICT).unwrap_err();
        assert!(e.message.len() < 400, "the value is not echoed whole");
        let lo = UrlPolicy {
            allow_loopback: true,
            allow_private: false,
        };
        let f = [("CallbackUrl", "http://127.0.0.1:9/"), OK[1], OK[2]];
        assert!(parse_create(&form(&f), lo).is_ok());
    }

    #[test]
    fn list_filters_and_paging() {
        let q = parse_list_query(None).unwrap();
        assert_eq!(
            (q.page_size, q.page, q.filter),
            (50, None, TriggerFilter::default())
        );
        let q = parse_list_query(Some(
            "Recurring=alltime&TriggerBy=count&UsageCategory=sms&PageSize=5000&Page=2",
        ))
        .unwrap();
        assert_eq!(
            q.filter.recurring,
            Some(vec![Recurring::Once, Recurring::AllTime])
        );
        assert_eq!(q.filter.trigger_by, Some(TriggerBy::Count));
        assert_eq!(q.filter.usage_category.as_deref(), Some("sms"));
        assert_eq!((q.page_size, q.page), (1000, Some(2)));
        let q = parse_list_query(Some("Recurring=daily")).unwrap();
        assert_eq!(q.filter.recurring, Some(vec![Recurring::Daily]));
        for (raw, want) in [
            ("Recurring=hourly", "Recurring \"hourly\""),
            ("TriggerBy=x", "TriggerBy \"x\""),
            ("UsageCategory=nope", "UsageCategory \"nope\""),
            ("PageSize=0", "PageSize \"0\""),
            ("Page=-1", "Page \"-1\""),
            ("PageToken=zz", "PageToken \"zz\""),
        ] {
            let e = parse_list_query(Some(raw)).unwrap_err();
            assert!(e.message.contains(want), "{raw}: {}", e.message);
        }
    }

    #[test]
    fn sids_and_dates_have_twilio_shapes() {
        let a = new_trigger_sid();
        assert!(is_trigger_sid(&a), "{a}");
        assert_ne!(a, new_trigger_sid());
        assert!(!is_trigger_sid("UT0000000000000000000000000000000G"));
        assert!(!is_trigger_sid("AC00000000000000000000000000000000"));
        assert_eq!(trigger_sid(&format!("{a}.json")), Some(a.as_str()));
        assert_eq!(
            rfc2822("2015-09-06T12:58:45Z"),
            "Sun, 06 Sep 2015 12:58:45 +0000"
        );
    }
}
