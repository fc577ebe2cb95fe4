//! `GET /2010-04-01/Accounts/{AccountSid}/Usage/Records[/{Subresource}][.json]`:
//! HTTP Basic auth, query parameters, paging, and the JSON of Twilio's
//! UsageRecords resource (docs/contract.md §5).

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

use axum::http::header;
use base64::Engine;
use serde::Serialize;

use super::accounts::{self, constant_time_eq};
use super::auth::{self, AuthThrottle};
use super::error::{shown, throttled, TwilioError};
use super::records::{
    count_and_usage, fixed_interval, in_list, intervals, listed_categories, parse_date, tile,
    Buckets, Interval, Listed, RowKind, Subresource, Totals, SUBRESOURCE_URIS,
};
use super::ApiState;
use crate::calendar::{parse_rfc3339, Day};
use crate::store::{Conn, Param};

pub const API_VERSION: &str = "2010-04-01";
const DEFAULT_PAGE_SIZE: u32 = 50;
const MAX_PAGE_SIZE: u32 = 1000;

/// The query parameters of a list request, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    pub category: Option<Listed>,
    pub start: Option<Day>,
    pub end: Option<Day>,
    pub include_subaccounts: bool,
    /// Whether `IncludeSubaccounts` was given (it is then kept in paging links).
    pub include_given: bool,
    pub page_size: u32,
    pub page: Option<u64>,
    /// `PageToken`, decoded; checked against the listing it is used on by
    /// [`list_records`].
    pub token: Option<PageToken>,
}

/// The first and last day a date parameter may name.
fn date_range() -> (Day, Day) {
    (Day::from_ymd(1, 1, 1), Day::from_ymd(9999, 12, 31))
}

/// Parses the query string; the first occurrence of a parameter wins, unknown
/// parameters are ignored (as Twilio does). Dates are checked on every
/// subresource, also on those with a fixed period that do not use them.
pub fn parse_query(raw: Option<&str>, today: Day) -> Result<ListQuery, TwilioError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.unwrap_or(""))
        .map_err(|e| TwilioError::invalid_parameter(format!("malformed query string: {e}")))?;
    let get = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let category = match get("Category") {
        None => None,
        Some(c) => Some(Listed::parse(c).ok_or_else(|| {
            TwilioError::invalid_parameter(format!(
                "Category {} is not a Twilio usage category; tallyd counts: {}",
                shown(c),
                listed_categories(None)
                    .iter()
                    .map(|c| c.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?),
    };
    let (first, last) = date_range();
    let date = |name: &str| -> Result<Option<Day>, TwilioError> {
        match get(name) {
            None => Ok(None),
            // An unencoded `+30days` arrives as ` 30days` (form decoding).
            Some(s) => parse_date(&s.replacen(' ', "+", 1), today)
                .filter(|d| (first..=last).contains(d))
                .map(Some)
                .ok_or_else(|| {
                    TwilioError::invalid_parameter(format!(
                        "{name} {} is not a date from 0001-01-01 to 9999-12-31: use YYYY-MM-DD or an offset such as -30days or +30days",
                        shown(s)
                    ))
                }),
        }
    };
    let start = date("StartDate")?;
    let end = date("EndDate")?;
    // Without EndDate a listing ends today.
    if let Some(s) = start {
        let e = end.unwrap_or(today);
        if s > e {
            let which = if end.is_some() {
                ""
            } else {
                " (today: EndDate was not given)"
            };
            return Err(TwilioError::invalid_parameter(format!(
                "StartDate {s} is after EndDate {e}{which}"
            )));
        }
    }
    let include_subaccounts = match get("IncludeSubaccounts") {
        None => true,
        Some(v) if v.eq_ignore_ascii_case("true") => true,
        Some(v) if v.eq_ignore_ascii_case("false") => false,
        Some(v) => {
            return Err(TwilioError::invalid_parameter(format!(
                "IncludeSubaccounts {} is not a boolean: use true or false",
                shown(v)
            )))
        }
    };
    let (page_size, page, token) = paging(&get)?;
    Ok(ListQuery {
        category,
        start,
        end,
        include_subaccounts,
        include_given: get("IncludeSubaccounts").is_some(),
        page_size,
        page,
        token,
    })
}

/// The paging parameters of a Twilio list (`PageSize`, `Page`,
/// `PageToken`): the page size (default 50; above the maximum Twilio serves
/// the maximum — the official clients send `list(limit=5000)` as
/// PageSize=5000), the page number and the token, if given.
pub(super) fn paging<'a>(
    get: &impl Fn(&str) -> Option<&'a str>,
) -> Result<(u32, Option<u64>, Option<PageToken>), TwilioError> {
    let page_size = match get("PageSize") {
        None => DEFAULT_PAGE_SIZE,
        Some(v) => Some(v)
            .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
            // Digits too many for a u64 are a size above the maximum too.
            .map(|v| v.parse::<u64>().unwrap_or(u64::MAX))
            .filter(|n| *n >= 1)
            .map(|n| n.min(u64::from(MAX_PAGE_SIZE)) as u32)
            .ok_or_else(|| {
                TwilioError::invalid_parameter(format!(
                    "PageSize {} is not a page size: use an integer from 1 (at most {MAX_PAGE_SIZE} are served)",
                    shown(v)
                ))
            })?,
    };
    let page = match get("Page") {
        None => None,
        Some(v) => Some(
            v.parse::<u64>()
                .ok()
                .filter(|p| *p < 1 << 40)
                .ok_or_else(|| {
                    TwilioError::invalid_parameter(format!(
                        "Page {} is not a page number: use an integer from 0",
                        shown(v)
                    ))
                })?,
        ),
    };
    let token = match get("PageToken") {
        None => None,
        Some(t) => Some(PageToken::decode(t).ok_or_else(|| bad_token(t))?),
    };
    Ok((page_size, page, token))
}

/// Where a page of `listing` starts: its token's offset (a token issued for
/// another listing or page size is refused), else `page` × `page_size`.
pub(super) fn page_start(
    token: Option<PageToken>,
    page: Option<u64>,
    page_size: u32,
    listing: &str,
) -> Result<u64, TwilioError> {
    match token {
        Some(t) if t.is_for(listing, page_size) => Ok(t.offset),
        Some(t) => Err(bad_token(&t.encode())),
        None => Ok(page.unwrap_or(0) * u64::from(page_size)),
    }
}

fn bad_token(t: &str) -> TwilioError {
    TwilioError::invalid_parameter(format!(
        "PageToken {} was not issued for this listing: follow next_page_uri or previous_page_uri, or use Page",
        shown(t)
    ))
}

/// An opaque `PageToken`: `PA` + base64url of the first record's offset, the
/// page size and a check over both and the listing (path and filters), so a
/// token edited by hand, or used on another listing or page size, is refused.
/// The check is a checksum, not a secret: a token only says where a page
/// starts, which `Page` says too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageToken {
    pub offset: u64,
    pub page_size: u32,
    check: u32,
}

impl PageToken {
    fn check(listing: &str, offset: u64, page_size: u32) -> u32 {
        let mut bytes = listing.as_bytes().to_vec();
        bytes.extend_from_slice(&offset.to_le_bytes());
        bytes.extend_from_slice(&page_size.to_le_bytes());
        xxhash_rust::xxh3::xxh3_64(&bytes) as u32
    }

    pub fn new(listing: &str, offset: u64, page_size: u32) -> PageToken {
        PageToken {
            offset,
            page_size,
            check: Self::check(listing, offset, page_size),
        }
    }

    pub fn encode(&self) -> String {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.offset.to_le_bytes());
        b[8..12].copy_from_slice(&self.page_size.to_le_bytes());
        b[12..].copy_from_slice(&self.check.to_le_bytes());
        format!(
            "PA{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
        )
    }

    pub fn decode(t: &str) -> Option<PageToken> {
        let b = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(t.strip_prefix("PA")?)
            .ok()?;
        if b.len() != 16 {
            return None;
        }
        let (offset, rest) = b.split_at(8);
        let (page_size, check) = rest.split_at(4);
        Some(PageToken {
            offset: u64::from_le_bytes(offset.try_into().ok()?),
            page_size: u32::from_le_bytes(page_size.try_into().ok()?),
            check: u32::from_le_bytes(check.try_into().ok()?),
        })
    }

    /// Whether the token was issued for `listing` at `page_size`.
    pub fn is_for(&self, listing: &str, page_size: u32) -> bool {
        self.page_size == page_size
            && self.offset < 1 << 50
            && self.check == Self::check(listing, self.offset, self.page_size)
    }
}

/// The account a listing is for, as [`authorize`] found it.
pub struct Target {
    pub account: accounts::Account,
    pub has_subaccounts: bool,
    /// `tallyd_meta.last_flush`: the records' `as_of`.
    pub last_flush: Option<String>,
}

/// Checks `AccountSid:AuthToken` and that it may read `target`; one store
/// round trip when an account reads itself. Nothing a client sends reaches a
/// query before it has the shape of an account SID. Another tenant's account
/// is answered as if it did not exist (404), so SIDs cannot be probed.
pub fn authorize(
    c: &mut Conn,
    creds: Option<(String, String)>,
    target: &str,
    path: &str,
) -> Result<Target, TwilioError> {
    let Some((user, token)) = creds else {
        return Err(TwilioError::authenticate(
            "Authenticate: send HTTP Basic auth with AccountSid:AuthToken",
        ));
    };
    let refused = || {
        TwilioError::authenticate(
            "Authenticate: the AccountSid and AuthToken given do not match an account",
        )
    };
    if !accounts::is_account_sid(&user) {
        return Err(refused());
    }
    let found = |(account, has_subaccounts, last_flush)| Target {
        account,
        has_subaccounts,
        last_flush,
    };
    let caller = accounts::get_for_listing(c, &user)?
        .filter(|(a, _, _)| constant_time_eq(a.auth_token.expose(), &token))
        .ok_or_else(refused)?;
    if caller.0.sid == target {
        return Ok(found(caller));
    }
    if !accounts::is_account_sid(target)
        || !accounts::is_self_or_ancestor(c, &caller.0.sid, target)?
    {
        return Err(TwilioError::not_found(path));
    }
    let account =
        accounts::get_for_listing(c, target)?.ok_or_else(|| TwilioError::not_found(path))?;
    Ok(found(account))
}

#[derive(Serialize)]
struct SubresourceUris {
    all_time: String,
    daily: String,
    last_month: String,
    monthly: String,
    this_month: String,
    today: String,
    yearly: String,
    yesterday: String,
}

/// One UsageRecord, field for field as Twilio sends it. What is the same for
/// many records of a page is shared (`Arc`), so a 1000-record page allocates
/// little beyond its own numbers.
#[derive(Serialize)]
pub struct UsageRecord {
    account_sid: Arc<str>,
    api_version: &'static str,
    as_of: Arc<str>,
    category: &'static str,
    count: serde_json::Value,
    count_unit: &'static str,
    description: &'static str,
    end_date: Arc<str>,
    price: String,
    price_unit: Arc<str>,
    start_date: Arc<str>,
    /// Pre-serialized once per category: most of a record's bytes, copied as is.
    subresource_uris: Arc<Box<serde_json::value::RawValue>>,
    uri: String,
    usage: String,
    usage_unit: Arc<str>,
}

/// A page of UsageRecords with Twilio's paging fields.
#[derive(Serialize)]
pub struct RecordsPage {
    end: u64,
    first_page_uri: String,
    last_page_uri: String,
    next_page_uri: Option<String>,
    num_pages: u64,
    page: u64,
    page_size: u32,
    previous_page_uri: Option<String>,
    start: u64,
    total: u64,
    uri: String,
    usage_records: Vec<UsageRecord>,
}

fn query_string(pairs: &[(&str, String)]) -> String {
    serde_urlencoded::to_string(pairs).unwrap_or_default()
}

fn with_query(path: &str, query: &str) -> String {
    if query.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{query}")
    }
}

/// The RFC 3339 `as_of` in Twilio's form: `2019-06-24T22:32:49+00:00`.
fn as_of(last_flush: Option<&str>, now: i64) -> String {
    let secs = last_flush.and_then(parse_rfc3339).unwrap_or(now);
    chrono::DateTime::from_timestamp(secs, 0)
        .unwrap_or_default()
        .format("%Y-%m-%dT%H:%M:%S+00:00")
        .to_string()
}

/// Sums stored rows of `kind` with `start_date` in `[from, to]` into the bucket
/// each row's start falls in.
#[allow(clippy::too_many_arguments)]
fn read_rows(
    c: &mut Conn,
    accounts: &[String],
    kind: RowKind,
    from: Day,
    to: Day,
    starts: &[Day],
    cells: &mut [Totals],
    categories: &[Listed],
    price_unit: &mut Option<String>,
) -> Result<(), TwilioError> {
    for row in super::records::read_rows(c, accounts, kind, from, to)? {
        let bucket = match kind {
            RowKind::All => 0,
            _ => match starts.partition_point(|s| *s <= row.start) {
                0 => continue,
                i => i - 1,
            },
        };
        for (ci, cat) in categories.iter().enumerate() {
            let Listed::Counted(cat) = cat else { continue };
            let t = row.leaves.get(*cat);
            cells[bucket * categories.len() + ci].add(Totals {
                count: t.count as i64,
                usage: t.usage as i64,
                price: t.price,
            });
        }
        if price_unit.is_none() {
            *price_unit = Some(row.price_unit);
        }
    }
    Ok(())
}

/// Everything a list request needs besides the store.
pub struct RecordsRequest {
    pub target: Target,
    pub sub: Subresource,
    /// The path as requested, without `.json` (Twilio's paging links omit it).
    pub base_path: String,
    pub query: ListQuery,
    pub today: Day,
    pub now: i64,
    /// The account's currency, for records with no stored rows.
    pub currency: String,
}

/// Builds one page of records.
pub fn list_records(c: &mut Conn, req: RecordsRequest) -> Result<RecordsPage, TwilioError> {
    let q = &req.query;
    let sid = &req.target.account.sid;
    let accounts = if q.include_subaccounts && req.target.has_subaccounts {
        accounts::with_descendants(c, sid)?
    } else {
        vec![sid.clone()]
    };
    let as_of = as_of(req.target.last_flush.as_deref(), req.now);

    let buckets = if let Some(iv) = fixed_interval(req.sub, req.today) {
        Buckets::Intervals(vec![iv])
    } else {
        let end = q.end.unwrap_or(req.today);
        // An EndDate before the account existed lists that one day.
        let start = match q.start {
            Some(s) => s,
            None => first_day(c, &accounts, end)?.min(end),
        };
        if q.start.is_none()
            && q.end.is_none()
            && matches!(req.sub, Subresource::Root | Subresource::AllTime)
        {
            Buckets::AllTime(Interval { start, end })
        } else {
            Buckets::Intervals(intervals(req.sub, start, end))
        }
    };

    // Filters are carried into every paging link; date offsets are resolved so
    // the pages of one listing agree even across midnight.
    let mut filters: Vec<(&str, String)> = Vec::new();
    if let Some(c) = q.category {
        filters.push(("Category", c.name().to_owned()));
    }
    if req.sub.takes_dates() {
        if let Some(s) = q.start {
            filters.push(("StartDate", s.to_string()));
        }
        if let Some(e) = q.end {
            filters.push(("EndDate", e.to_string()));
        }
    }
    if q.include_given {
        filters.push(("IncludeSubaccounts", q.include_subaccounts.to_string()));
    }
    let listing = with_query(&req.base_path, &query_string(&filters));

    let categories = listed_categories(q.category);
    let per_bucket = categories.len() as u64;
    let total = buckets.len() as u64 * per_bucket;
    let size = q.page_size as u64;
    // A PageToken says where its page starts; the page number follows from it.
    let start = page_start(q.token, q.page, q.page_size, &listing)?;
    let page = start / size;
    let end_excl = (start + size).min(total);

    let mut records = Vec::new();
    if start < end_excl {
        let (b0, b1) = (start / per_bucket, (end_excl - 1) / per_bucket);
        let page_buckets: Vec<Interval> = (b0..=b1).map(|i| buckets.get(i as usize)).collect();
        let starts: Vec<Day> = page_buckets.iter().map(|iv| iv.start).collect();
        let mut cells = vec![Totals::default(); page_buckets.len() * categories.len()];
        let mut price_unit = None;
        let ranges = match buckets {
            Buckets::AllTime(_) => vec![super::records::RowRange {
                kind: RowKind::All,
                from: Day(0),
                to: Day(0),
            }],
            Buckets::Intervals(_) => tile(&page_buckets),
        };
        for r in ranges {
            read_rows(
                c,
                &accounts,
                r.kind,
                r.from,
                r.to,
                &starts,
                &mut cells,
                &categories,
                &mut price_unit,
            )?;
        }
        let price_unit: Arc<str> = price_unit.unwrap_or_else(|| req.currency.clone()).into();
        let account_base = format!("/{API_VERSION}/Accounts/{sid}/Usage/Records");
        let list_base = format!("{account_base}{}", req.sub.path_suffix());
        let account_sid: Arc<str> = sid.as_str().into();
        let as_of: Arc<str> = as_of.into();
        let per_category: Vec<(Arc<Box<serde_json::value::RawValue>>, Arc<str>)> = categories
            .iter()
            .map(|category| -> Result<_, TwilioError> {
                // Category names need no URL encoding.
                let u = |name: &str| format!("{account_base}/{name}.json?Category={category}");
                let uris = SubresourceUris {
                    all_time: u(SUBRESOURCE_URIS[0].1),
                    daily: u(SUBRESOURCE_URIS[1].1),
                    last_month: u(SUBRESOURCE_URIS[2].1),
                    monthly: u(SUBRESOURCE_URIS[3].1),
                    this_month: u(SUBRESOURCE_URIS[4].1),
                    today: u(SUBRESOURCE_URIS[5].1),
                    yearly: u(SUBRESOURCE_URIS[6].1),
                    yesterday: u(SUBRESOURCE_URIS[7].1),
                };
                let raw = serde_json::value::to_raw_value(&uris).map_err(TwilioError::internal)?;
                Ok((Arc::new(raw), category.usage_unit(&price_unit).into()))
            })
            .collect::<Result<_, _>>()?;
        let dates: Vec<(Arc<str>, Arc<str>)> = page_buckets
            .iter()
            .map(|iv| (iv.start.to_string().into(), iv.end.to_string().into()))
            .collect();
        records.reserve((end_excl - start) as usize);
        for i in start..end_excl {
            let local_bucket = (i / per_bucket - b0) as usize;
            let ci = (i % per_bucket) as usize;
            let category = categories[ci];
            let (start_date, end_date) = &dates[local_bucket];
            let totals = cells[local_bucket * categories.len() + ci];
            let (count, usage) = count_and_usage(category, totals);
            records.push(UsageRecord {
                account_sid: account_sid.clone(),
                api_version: API_VERSION,
                as_of: as_of.clone(),
                category: category.name(),
                count,
                count_unit: category.count_unit(),
                description: category.description(),
                end_date: end_date.clone(),
                price: super::records::price_string(totals.price),
                price_unit: price_unit.clone(),
                start_date: start_date.clone(),
                subresource_uris: per_category[ci].0.clone(),
                uri: format!(
                    "{list_base}?Category={category}&StartDate={start_date}&EndDate={end_date}"
                ),
                usage,
                usage_unit: per_category[ci].1.clone(),
            });
        }
    }

    let link = |page: u64, offset: Option<u64>| {
        let mut p = filters.clone();
        p.push(("Page", page.to_string()));
        p.push(("PageSize", size.to_string()));
        if let Some(o) = offset {
            p.push((
                "PageToken",
                PageToken::new(&listing, o, q.page_size).encode(),
            ));
        }
        with_query(&req.base_path, &query_string(&p))
    };
    let num_pages = total.div_ceil(size).max(1);
    // `end` is the index of the page's last record, so `end - start + 1` is
    // always its length: a page past the end has `end = start - 1`, and its
    // previous page is the one before it, as for any other page.
    Ok(RecordsPage {
        end: (start + records.len() as u64).saturating_sub(1),
        first_page_uri: link(0, None),
        last_page_uri: link(num_pages - 1, None),
        next_page_uri: (end_excl < total).then(|| link(page + 1, Some(end_excl))),
        num_pages,
        page,
        page_size: q.page_size,
        previous_page_uri: (page > 0).then(|| link(page - 1, Some((page - 1) * size))),
        start,
        total,
        uri: listing,
        usage_records: records,
    })
}

/// The first day an undated listing covers: the earlier of the first day with
/// usage and the day the earliest account was created; `fallback` if neither.
fn first_day(c: &mut Conn, accounts: &[String], fallback: Day) -> Result<Day, TwilioError> {
    let params: Vec<Param<'_>> = accounts.iter().map(|a| Param::Text(a)).collect();
    let n = accounts.len();
    let oldest_page = c.query(
        &format!(
            "SELECT MIN(page) FROM usage_pages WHERE account_sid IN ({}) AND page < 'all'",
            in_list(1, n)
        ),
        &params,
    )?;
    let oldest_page = oldest_page.first().map(|r| r[0].text().to_owned());
    let usage = match oldest_page.filter(|p| !p.is_empty()) {
        Some(p) => c
            .read_pages(accounts, &p, &p)?
            .iter()
            .flat_map(|page| {
                page.rows()
                    .filter(|r| r.0.kind() == "day")
                    .map(|r| r.0.start())
            })
            .min(),
        None => None,
    };
    let created = c.query(
        &format!(
            "SELECT MIN(created_at) FROM api_accounts WHERE account_sid IN ({})",
            in_list(1, n)
        ),
        &params,
    )?;
    let created = created
        .first()
        .and_then(|r| r[0].text().get(..10).and_then(Day::parse));
    Ok(match (usage, created) {
        (Some(u), Some(c)) => u.min(c),
        (Some(d), None) | (None, Some(d)) => d,
        (None, None) => fallback,
    })
}

/// `…/Usage/Records` and `…/Usage/Records.json`.
pub async fn records_root(
    State(state): State<ApiState>,
    sid: Option<Path<String>>,
    uri: Uri,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    peer: Option<ConnectInfo<SocketAddr>>,
) -> Response {
    let sid = sid.map(|Path(s)| s);
    serve(state, sid, Some(Subresource::Root), uri, raw, headers, peer)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// `…/Usage/Records/{Subresource}[.json]`.
pub async fn records_sub(
    State(state): State<ApiState>,
    params: Option<Path<(String, String)>>,
    uri: Uri,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    peer: Option<ConnectInfo<SocketAddr>>,
) -> Response {
    let (sid, sub) = match params {
        Some(Path((sid, segment))) => (Some(sid), Subresource::parse(&segment)),
        None => (None, None),
    };
    serve(state, sid, sub, uri, raw, headers, peer)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// Authenticates (throttling failures per client), then reads the query and
/// builds the page: a client without valid credentials learns nothing about
/// parameters, paths or accounts. `sid` is `None` when the path did not
/// decode, `sub` when it names no subresource: both are 404s once the caller
/// is known.
async fn serve(
    state: ApiState,
    sid: Option<String>,
    sub: Option<Subresource>,
    uri: Uri,
    raw: Option<String>,
    headers: HeaderMap,
    peer: Option<ConnectInfo<SocketAddr>>,
) -> Result<Response, Response> {
    let client = auth::client_of(peer);
    if let Err(wait) = state.throttle().check(client) {
        AuthThrottle::throttled("twilio");
        return Err(throttled(true, wait));
    }
    let now = state.now();
    let today = Day::from_unix(now);
    let path = uri.path().to_owned();
    let creds = auth::basic(&headers);
    let base_path = path.strip_suffix(".json").unwrap_or(&path).to_owned();
    let sid = sid.unwrap_or_default();
    let currency = state.currency_of(&sid);
    // The page is serialized on the blocking pool too: a 1000-record page is
    // about a megabyte of JSON.
    let body = state
        .store()
        .run(move |c| {
            Ok(authorize(c, creds, &sid, &path).and_then(|target| {
                let sub = sub.ok_or_else(|| TwilioError::not_found(&path))?;
                let query = parse_query(raw.as_deref(), today)?;
                let page = list_records(
                    c,
                    RecordsRequest {
                        target,
                        sub,
                        base_path,
                        query,
                        today,
                        now,
                        currency,
                    },
                )?;
                serde_json::to_vec(&page).map_err(TwilioError::internal)
            }))
        })
        .await
        .map_err(|e| TwilioError::from(e).into_response())?;
    match body {
        Ok(body) => Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response()),
        Err(e) if e.status == StatusCode::UNAUTHORIZED => {
            match state.throttle().failed(client, "twilio") {
                Ok(()) => Err(e.into_response()),
                Err(wait) => Err(throttled(true, wait)),
            }
        }
        Err(e) => Err(e.into_response()),
    }
}

/// Any other path under `/2010-04-01`: a Twilio 20404.
pub async fn not_found(uri: Uri) -> Response {
    TwilioError::not_found(uri.path()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn today() -> Day {
        Day::parse("2025-03-04").unwrap()
    }

    #[test]
    fn query_defaults() {
        let q = parse_query(None, today()).unwrap();
        assert_eq!(q.page_size, 50);
        assert!(q.include_subaccounts);
        assert_eq!((q.start, q.end, q.category), (None, None, None));
    }

    #[test]
    fn query_errors_name_parameter_and_value() {
        for (raw, want) in [
            ("PageSize=0", "PageSize \"0\""),
            ("PageSize=-5", "PageSize \"-5\""),
            ("PageSize=ten", "PageSize \"ten\""),
            ("StartDate=0000-12-31", "StartDate \"0000-12-31\""),
            ("StartDate=-999999days", "StartDate \"-999999days\""),
            (
                "StartDate=2025-03-05",
                "StartDate 2025-03-05 is after EndDate 2025-03-04 (today",
            ),
            ("Category=calls-bogus", "Category \"calls-bogus\""),
            ("StartDate=2025-02-30", "StartDate \"2025-02-30\""),
            ("EndDate=tomorrow", "EndDate \"tomorrow\""),
            (
                "StartDate=2025-02-02&EndDate=2025-02-01",
                "StartDate 2025-02-02 is after EndDate 2025-02-01",
            ),
            ("IncludeSubaccounts=yes", "IncludeSubaccounts \"yes\""),
            ("Page=-1", "Page \"-1\""),
            ("PageToken=xyz", "PageToken \"xyz\""),
        ] {
            let e = parse_query(Some(raw), today()).unwrap_err();
            assert_eq!(e.code, 20001, "{raw}");
            assert!(e.message.contains(want), "{raw}: {}", e.message);
        }
    }

    #[test]
    fn page_sizes_above_the_maximum_are_served_as_the_maximum() {
        for (raw, size) in [
            ("PageSize=1000", 1000),
            ("PageSize=1001", 1000),
            ("PageSize=5000", 1000),
            ("PageSize=99999999999999999999", 1000),
            ("PageSize=1", 1),
        ] {
            assert_eq!(
                parse_query(Some(raw), today()).unwrap().page_size,
                size,
                "{raw}"
            );
        }
    }

    #[test]
    fn page_tokens_are_opaque_and_bound_to_their_listing() {
        let listing = "/2010-04-01/Accounts/AC/Usage/Records/Daily?Category=calls";
        let t = PageToken::new(listing, 200, 100);
        let text = t.encode();
        assert!(text.starts_with("PA") && !text.contains("200"), "{text}");
        let back = PageToken::decode(&text).unwrap();
        assert_eq!(back, t);
        assert!(back.is_for(listing, 100));
        assert!(!back.is_for(listing, 50), "another page size");
        assert!(!back.is_for("/2010-04-01/Accounts/AC/Usage/Records/Daily", 100));
        // Any edit of a character is noticed.
        for i in 2..text.len() {
            let mut b = text.clone().into_bytes();
            b[i] = if b[i] == b'A' { b'B' } else { b'A' };
            let edited = String::from_utf8(b).unwrap();
            assert!(
                !PageToken::decode(&edited).is_some_and(|e| e.is_for(listing, 100)),
                "{edited}"
            );
        }
        assert!(PageToken::decode("PA100").is_none());
    }

    #[test]
    fn offsets_resolve_against_today() {
        let q = parse_query(Some("StartDate=-30days&EndDate=%2B1days"), today()).unwrap();
        assert_eq!(q.start.unwrap().to_string(), "2025-02-02");
        assert_eq!(q.end.unwrap().to_string(), "2025-03-05");
        let q = parse_query(Some("EndDate=+2days"), today()).unwrap();
        assert_eq!(q.end.unwrap().to_string(), "2025-03-06");
    }

    #[test]
    fn as_of_uses_twilio_format() {
        assert_eq!(
            as_of(Some("2019-06-24T22:32:49.123Z"), 0),
            "2019-06-24T22:32:49+00:00"
        );
        assert_eq!(as_of(None, 0), "1970-01-01T00:00:00+00:00");
    }
}
