//! Error bodies: AgentPhone-shaped on `/v1` and `/admin`, Twilio-shaped everywhere
//! else. Every message a client can act on names the parameter and value; a
//! value is echoed at most [`SHOWN_CHARS`] characters long ([`shown`]).
//!
//! [`json_errors`] (a middleware the server puts around every route) gives the
//! errors that do not come from a handler — 404 of an unknown path, 405, 408,
//! 413, a path that does not decode — the same JSON bodies, and answers a URI
//! over [`MAX_URI_BYTES`] with 414 and headers over [`MAX_HEADER_BYTES`] with 431.

use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::http::{MAX_HEADER_BYTES, MAX_URI_BYTES};
use crate::store::Error as StoreError;

/// The most characters of a client's value an error message repeats.
pub const SHOWN_CHARS: usize = 64;

/// `s` as an error message may quote it: Rust's debug quoting (control
/// characters escaped), cut at [`SHOWN_CHARS`] characters with `…`.
pub fn shown(s: &str) -> String {
    match s.char_indices().nth(SHOWN_CHARS) {
        None => format!("{s:?}"),
        Some((cut, _)) => format!("{:?}…", &s[..cut]),
    }
}

/// A Twilio REST error: `{"code", "message", "more_info", "status"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TwilioError {
    pub status: StatusCode,
    pub code: u32,
    pub message: String,
}

impl TwilioError {
    /// 400, Twilio 20001: a query parameter is not valid.
    pub fn invalid_parameter(message: impl Into<String>) -> TwilioError {
        TwilioError {
            status: StatusCode::BAD_REQUEST,
            code: 20001,
            message: message.into(),
        }
    }
    /// 401, Twilio 20003: missing or wrong `AccountSid:AuthToken`.
    pub fn authenticate(message: impl Into<String>) -> TwilioError {
        TwilioError {
            status: StatusCode::UNAUTHORIZED,
            code: 20003,
            message: message.into(),
        }
    }
    /// 403, Twilio 20403: the credentials are valid but not for this account.
    pub fn forbidden(message: impl Into<String>) -> TwilioError {
        TwilioError {
            status: StatusCode::FORBIDDEN,
            code: 20403,
            message: message.into(),
        }
    }
    /// 404, Twilio 20404: also what an account gets for another tenant's
    /// resource, so that it cannot tell which accounts exist.
    pub fn not_found(path: &str) -> TwilioError {
        let path = match path.char_indices().nth(4 * SHOWN_CHARS) {
            Some((cut, _)) => format!("{}…", &path[..cut]),
            None => path.to_owned(),
        };
        TwilioError {
            status: StatusCode::NOT_FOUND,
            code: 20404,
            message: format!("The requested resource {path} was not found"),
        }
    }
    /// 429, Twilio 20429: too many failed authentications from this client.
    pub fn too_many_requests(retry_after_secs: u64) -> TwilioError {
        TwilioError {
            status: StatusCode::TOO_MANY_REQUESTS,
            code: 20429,
            message: format!(
                "Too Many Requests: too many failed authentications from this address; retry in {retry_after_secs} s"
            ),
        }
    }
    /// Any other status, for errors that come from the HTTP layer: Twilio's
    /// code where it has one (405 is 20004), else 20000 + the status.
    pub fn for_status(status: StatusCode, message: impl Into<String>) -> TwilioError {
        let code = match status.as_u16() {
            400 => 20001,
            401 => 20003,
            405 => 20004,
            s => 20000 + u32::from(s),
        };
        TwilioError {
            status,
            code,
            message: message.into(),
        }
    }
    /// 500, Twilio 20500.
    pub fn internal(e: impl std::fmt::Display) -> TwilioError {
        tracing::error!(error = %e, "usage records query failed");
        TwilioError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: 20500,
            message: "Internal Server Error: the usage store could not be read".into(),
        }
    }
}

/// A store failure: 503 (Twilio 20503) if retrying may work — the store did
/// not answer, so nothing it was asked was done — else 500.
impl From<StoreError> for TwilioError {
    fn from(e: StoreError) -> Self {
        if e.kind() == crate::store::ErrorKind::Retryable {
            tracing::warn!(error = %e, "the store did not answer");
            return TwilioError::for_status(
                StatusCode::SERVICE_UNAVAILABLE,
                "Service Unavailable: the store did not answer; nothing was changed, retry",
            );
        }
        TwilioError::internal(e)
    }
}

impl IntoResponse for TwilioError {
    fn into_response(self) -> Response {
        let body = json!({
            "code": self.code,
            "message": self.message,
            "more_info": format!("https://www.twilio.com/docs/errors/{}", self.code),
            "status": self.status.as_u16(),
        });
        let mut r = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"Twilio API\""),
            );
        }
        r
    }
}

/// An error on `/v1/…` and `/admin/…`:
/// `{"error": {"type", "code", "message", "param"}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub param: Option<String>,
}

impl ApiError {
    pub fn invalid_parameter(param: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_parameter",
            message: message.into(),
            param: Some(param.to_owned()),
        }
    }
    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            code: "unauthorized",
            message: message.into(),
            param: None,
        }
    }
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            message: message.into(),
            param: None,
        }
    }
    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::CONFLICT,
            code: "conflict",
            message: message.into(),
            param: None,
        }
    }
    /// 429: too many failed authentications from this client.
    pub fn too_many_requests(retry_after_secs: u64) -> ApiError {
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            code: "rate_limited",
            message: format!(
                "too many failed authentications from this address; retry in {retry_after_secs} s"
            ),
            param: None,
        }
    }
    /// Any other status, for errors that come from the HTTP layer.
    pub fn for_status(status: StatusCode, message: impl Into<String>) -> ApiError {
        let code = match status.as_u16() {
            400 => "invalid_request",
            404 => "not_found",
            405 => "method_not_allowed",
            408 => "request_timeout",
            413 => "payload_too_large",
            414 => "uri_too_long",
            431 => "headers_too_large",
            _ if status.is_server_error() => "internal",
            _ => "invalid_request",
        };
        ApiError {
            status,
            code,
            message: message.into(),
            param: None,
        }
    }
    pub fn internal(e: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %e, "API request failed");
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal",
            message: "the usage store could not be read".into(),
            param: None,
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::internal(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = if self.status.is_server_error() {
            "api_error"
        } else {
            "invalid_request_error"
        };
        let mut error = json!({
            "type": kind,
            "code": self.code,
            "message": self.message,
        });
        if let Some(p) = self.param {
            error["param"] = p.into();
        }
        let mut r = (self.status, Json(json!({ "error": error }))).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            // Every 503 of a handler is worth a retry soon (starting, a store
            // or a wallet owner away).
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

/// The 429 of a client over its quota of failed authentications, in the shape
/// of `twilio` or not, with `Retry-After`.
pub fn throttled(twilio: bool, wait: std::time::Duration) -> Response {
    let secs = crate::api::auth::retry_after_secs(wait);
    let mut r = if twilio {
        TwilioError::too_many_requests(secs).into_response()
    } else {
        ApiError::too_many_requests(secs).into_response()
    };
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    r
}

/// Whether `path` is on the AgentPhone-shaped side (`/v1`, `/admin`).
fn agentphone_shaped(path: &str) -> bool {
    ["/v1", "/admin"].iter().any(|p| {
        path.strip_prefix(p)
            .is_some_and(|r| r.is_empty() || r.starts_with('/'))
    })
}

/// An error response in the shape `path` calls for.
pub fn error_for(path: &str, status: StatusCode, message: String) -> Response {
    if agentphone_shaped(path) {
        ApiError::for_status(status, message).into_response()
    } else {
        TwilioError::for_status(status, message).into_response()
    }
}

/// What a framework error says, for a status that has no message of its own.
fn default_message(status: StatusCode, path: &str, method: &str) -> String {
    match status {
        StatusCode::NOT_FOUND => TwilioError::not_found(path).message,
        StatusCode::METHOD_NOT_ALLOWED => format!("Method {method} is not allowed on this resource"),
        StatusCode::REQUEST_TIMEOUT => {
            "Request Timeout: the request was not read and answered within http.request_timeout_secs".into()
        }
        StatusCode::PAYLOAD_TOO_LARGE => "Request Entity Too Large: the request body is too large".into(),
        s => s.canonical_reason().unwrap_or("error").to_owned(),
    }
}

/// The length of `uri` as text (what `uri.to_string().len()` is, without
/// writing it out).
fn uri_len(uri: &axum::http::Uri) -> usize {
    uri.scheme_str().map_or(0, |s| s.len() + "://".len())
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path().len()
        + uri.query().map_or(0, |q| q.len() + 1)
}

/// Middleware: refuses over-long URIs (414) and headers (431), and turns every
/// error response that is not JSON yet into the JSON error of its path's API.
pub async fn json_errors(req: Request, next: Next) -> Response {
    let uri_len = uri_len(req.uri());
    let header_bytes: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    let path = req.uri().path().to_owned();
    if uri_len > MAX_URI_BYTES {
        return error_for(
            &path,
            StatusCode::URI_TOO_LONG,
            format!("URI Too Long: {uri_len} bytes, at most {MAX_URI_BYTES}"),
        );
    }
    if header_bytes > MAX_HEADER_BYTES {
        return error_for(
            &path,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!(
                "Request Header Fields Too Large: {header_bytes} bytes of headers, at most {MAX_HEADER_BYTES}"
            ),
        );
    }
    let method = req.method().clone();
    let response = next.run(req).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    // A framework rejection says what was wrong in a short text body
    // ("Invalid URL: …", "Failed to buffer the request body: length limit
    // exceeded"); keep it.
    let text = axum::body::to_bytes(body, 1024).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let message = if text.trim().is_empty() {
        default_message(status, &path, method.as_str())
    } else {
        format!(
            "{}: {}",
            status.canonical_reason().unwrap_or("error"),
            text.trim()
        )
    };
    let mut shaped = error_for(&path, status, message);
    for name in [header::ALLOW, header::RETRY_AFTER] {
        if let Some(v) = parts.headers.get(&name) {
            shaped.headers_mut().insert(name, v.clone());
        }
    }
    shaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uris_length_is_that_of_its_text() {
        for u in [
            "/",
            "/v1/holds",
            "/v1/usage?from=2026-01-01&to=2026-02-01",
            "http://example.com:8080/a/b?c=d",
            "https://example.com",
            "example.com:443",
            "*",
        ] {
            let uri: axum::http::Uri = u.parse().unwrap();
            assert_eq!(uri_len(&uri), uri.to_string().len(), "{u}");
        }
    }

    #[test]
    fn shown_values_are_bounded_and_quoted() {
        assert_eq!(shown("abc"), "\"abc\"");
        assert_eq!(shown("a\0b"), "\"a\\0b\"");
        let long = "x".repeat(300_000);
        let s = shown(&long);
        assert!(s.len() < SHOWN_CHARS + 8, "{}", s.len());
        assert!(s.ends_with('…'));
    }

    /// A store that did not answer is a 503 "retry" (Twilio 20503), what the
    /// Twilio APIs promise; a store that answers wrongly is a 500.
    #[test]
    fn store_failures_are_503_when_retrying_may_work() {
        let down = TwilioError::from(StoreError::Cancelled("connection refused".into()));
        assert_eq!(
            (down.status, down.code),
            (StatusCode::SERVICE_UNAVAILABLE, 20503)
        );
        assert!(down.message.contains("retry"), "{}", down.message);
        let broken = TwilioError::from(StoreError::BadRow {
            table: "usage_triggers",
            key: "UT1".into(),
            reason: "trigger_value \"lots\"".into(),
        });
        assert_eq!(
            (broken.status, broken.code),
            (StatusCode::INTERNAL_SERVER_ERROR, 20500)
        );
    }

    #[test]
    fn shapes_follow_the_prefix() {
        assert!(agentphone_shaped("/v1/usage"));
        assert!(agentphone_shaped("/admin"));
        assert!(!agentphone_shaped("/v10/usage"));
        assert!(!agentphone_shaped("/2010-04-01/Accounts"));
        assert!(!agentphone_shaped("/administrator"));
    }
}
