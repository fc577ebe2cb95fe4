//! Error bodies: Twilio-shaped on the Twilio paths, AgentPhone-shaped on `/v1`
//! and `/admin`. Every message a client can act on names the parameter and value.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::store::Error as StoreError;

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
    /// 404, Twilio 20404.
    pub fn not_found(path: &str) -> TwilioError {
        TwilioError {
            status: StatusCode::NOT_FOUND,
            code: 20404,
            message: format!("The requested resource {path} was not found"),
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

impl From<StoreError> for TwilioError {
    fn from(e: StoreError) -> Self {
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
        r
    }
}
