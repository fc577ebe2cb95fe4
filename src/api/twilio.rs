//! `GET /2010-04-01/Accounts/{AccountSid}/Usage/Records[/{Subresource}][.json]`:
//! HTTP Basic auth, query parameters, paging, and the JSON of seed `003_…`.

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, Uri};
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

use axum::http::header;
use base64::Engine;
use serde::Serialize;

use super::accounts::{self, constant_time_eq};
use super::error::TwilioError;
use super::records::{
    count_and_usage, fixed_interval, in_list, intervals, listed_categories, parse_date, tile,
    Buckets, Interval, RowKind, Subresource, Totals, SUBRESOURCE_URIS,
};
use super::ApiState;
use crate::calendar::{parse_rfc3339, Day};
use crate::category::Category;
use crate::store::{Conn, Param};

pub const API_VERSION: &str = "2010-04-01";
const DEFAULT_PAGE_SIZE: u32 = 50;
const MAX_PAGE_SIZE: u32 = 1000;

/// The query parameters of a list request, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    pub category: Option<Category>,
    pub start: Option<Day>,
    pub end: Option<Day>,
    pub include_subaccounts: bool,
    /// Whether `IncludeSubaccounts` was given (it is then kept in paging links).
    pub include_given: bool,
    pub page_size: u32,
    pub page: Option<u64>,
    /// Offset of the first record, from `PageToken`.
    pub token_offset: Option<u64>,
}

/// Parses the query string; the first occurrence of a parameter wins, unknown
/// parameters are ignored (as Twilio does).
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
        Some(c) => Some(c.parse::<Category>().map_err(|_| {
            TwilioError::invalid_parameter(format!(
                "Category {c:?} is not a usage category of this account; valid categories: {}",
                listed_categories(None)
                    .iter()
                    .map(|c| c.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?),
    };
    let date = |name: &str| -> Result<Option<Day>, TwilioError> {
        match get(name) {
            None => Ok(None),
            // An unencoded `+30days` arrives as ` 30days` (form decoding).
            Some(s) => parse_date(&s.replacen(' ', "+", 1), today).map(Some).ok_or_else(|| {
                TwilioError::invalid_parameter(format!(
                    "{name} {s:?} is not a date: use YYYY-MM-DD or an offset such as -30days or +30days"
                ))
            }),
        }
    };
    let start = date("StartDate")?;
    let end = date("EndDate")?;
    if let (Some(s), Some(e)) = (start, end) {
        if s > e {
            return Err(TwilioError::invalid_parameter(format!(
                "StartDate {s} is after EndDate {e}"
            )));
        }
    }
    let include_subaccounts = match get("IncludeSubaccounts") {
        None => true,
        Some(v) if v.eq_ignore_ascii_case("true") => true,
        Some(v) if v.eq_ignore_ascii_case("false") => false,
        Some(v) => {
            return Err(TwilioError::invalid_parameter(format!(
                "IncludeSubaccounts {v:?} is not a boolean: use true or false"
            )))
        }
    };
    let page_size = match get("PageSize") {
        None => DEFAULT_PAGE_SIZE,
        Some(v) => v
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=MAX_PAGE_SIZE).contains(n))
            .ok_or_else(|| {
                TwilioError::invalid_parameter(format!(
                    "PageSize {v:?} is out of range: use an integer from 1 to {MAX_PAGE_SIZE}"
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
                        "Page {v:?} is not a page number: use an integer from 0"
                    ))
                })?,
        ),
    };
    let token_offset = match get("PageToken") {
        None => None,
        Some(t) => Some(
            t.strip_prefix("PA")
                .and_then(|n| n.parse::<u64>().ok())
                .filter(|o| *o < 1 << 50)
                .ok_or_else(|| {
                    TwilioError::invalid_parameter(format!(
                        "PageToken {t:?} was not issued by this API: follow next_page_uri or use Page"
                    ))
                })?,
        ),
    };
    Ok(ListQuery {
        category,
        start,
        end,
        include_subaccounts,
        include_given: get("IncludeSubaccounts").is_some(),
        page_size,
        page,
        token_offset,
    })
}

/// The credentials of an `Authorization: Basic` header.
pub fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, b64) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (user, pass) = text.split_once(':')?;
    Some((user.to_owned(), pass.to_owned()))
}

/// The account a listing is for, as [`authorize`] found it.
pub struct Target {
    pub account: accounts::Account,
    pub has_subaccounts: bool,
    /// `tallyd_meta.last_flush`: the records' `as_of`.
    pub last_flush: Option<String>,
}

/// Checks `AccountSid:AuthToken` and that it may read `target`; one store
/// round trip when an account reads itself.
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
    let found = |(account, has_subaccounts, last_flush)| Target {
        account,
        has_subaccounts,
        last_flush,
    };
    let caller = accounts::get_for_listing(c, &user)?
        .filter(|(a, _, _)| constant_time_eq(&a.auth_token, &token))
        .ok_or_else(|| {
            TwilioError::authenticate(format!(
                "Authenticate: the AccountSid {user:?} and AuthToken given do not match an account"
            ))
        })?;
    if caller.0.sid == target {
        return Ok(found(caller));
    }
    let account =
        accounts::get_for_listing(c, target)?.ok_or_else(|| TwilioError::not_found(path))?;
    if !accounts::is_self_or_ancestor(c, &caller.0.sid, target)? {
        return Err(TwilioError::forbidden(format!(
            "Account {} may read only itself and its subaccounts, not {target}",
            caller.0.sid
        )));
    }
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
    categories: &[Category],
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

    let categories = listed_categories(q.category);
    let per_bucket = categories.len() as u64;
    let total = buckets.len() as u64 * per_bucket;
    let size = q.page_size as u64;
    let start = q.token_offset.unwrap_or_else(|| q.page.unwrap_or(0) * size);
    let page = q.page.unwrap_or(start / size);
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
    let link = |page: u64, offset: Option<u64>| {
        let mut p = filters.clone();
        p.push(("Page", page.to_string()));
        p.push(("PageSize", size.to_string()));
        if let Some(o) = offset {
            p.push(("PageToken", format!("PA{o}")));
        }
        with_query(&req.base_path, &query_string(&p))
    };
    let num_pages = total.div_ceil(size).max(1);
    Ok(RecordsPage {
        end: if end_excl > start {
            end_excl - 1
        } else {
            start
        },
        first_page_uri: link(0, None),
        last_page_uri: link(num_pages - 1, None),
        next_page_uri: (end_excl < total).then(|| link(page + 1, Some(end_excl))),
        num_pages,
        page,
        page_size: q.page_size,
        previous_page_uri: (start > 0)
            .then(|| link(page.saturating_sub(1), Some(start.saturating_sub(size)))),
        start,
        total,
        uri: with_query(&req.base_path, &query_string(&filters)),
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
    Path(sid): Path<String>,
    uri: Uri,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Response {
    serve(state, sid, Subresource::Root, uri, raw, headers)
        .await
        .into_response()
}

/// `…/Usage/Records/{Subresource}[.json]`.
pub async fn records_sub(
    State(state): State<ApiState>,
    Path((sid, segment)): Path<(String, String)>,
    uri: Uri,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Response {
    let Some(sub) = Subresource::parse(&segment) else {
        return TwilioError::not_found(uri.path()).into_response();
    };
    serve(state, sid, sub, uri, raw, headers)
        .await
        .into_response()
}

async fn serve(
    state: ApiState,
    sid: String,
    sub: Subresource,
    uri: Uri,
    raw: Option<String>,
    headers: HeaderMap,
) -> Result<Response, TwilioError> {
    let now = state.now();
    let today = Day::from_unix(now);
    let path = uri.path().to_owned();
    let query = parse_query(raw.as_deref(), today)?;
    let creds = basic_credentials(&headers);
    let base_path = path.strip_suffix(".json").unwrap_or(&path).to_owned();
    let currency = state.currency_of(&sid);
    // The page is serialized on the blocking pool too: a 1000-record page is
    // about a megabyte of JSON.
    let body = state
        .store()
        .run(move |c| {
            Ok(authorize(c, creds, &sid, &path).and_then(|target| {
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
        .await??;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
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
            ("PageSize=1001", "PageSize \"1001\""),
            ("PageSize=ten", "PageSize \"ten\""),
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

    #[test]
    fn basic_auth_is_decoded() {
        let mut h = HeaderMap::new();
        h.insert(
            axum::http::header::AUTHORIZATION,
            "Basic QUNhYmM6dG9rZW4=".parse().unwrap(),
        );
        assert_eq!(
            basic_credentials(&h),
            Some(("ACabc".to_owned(), "token".to_owned()))
        );
    }
}
