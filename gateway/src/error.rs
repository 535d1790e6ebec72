//! Every error the API answers, as JSON `{"error":{"code","message"}}`
//! with its status: the one place codes and statuses are paired, so the
//! OpenAPI document ([`crate::openapi`]) and the handlers cannot disagree.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// Seconds a client is asked to wait after a 503 (`Retry-After`).
pub const RETRY_AFTER_SECS: u64 = 2;

/// What went wrong with a request, mapped to one status each.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// 400: a query parameter or header the route does not accept.
    #[error("{0}")]
    BadRequest(String),
    /// 401: no bearer token, or the wrong one.
    #[error("{0}")]
    Unauthorized(String),
    /// 404: a stream, topic or subscription the gateway does not expose or
    /// the broker does not have; `what` is `stream`, `topic`, `subscription`.
    #[error("no {what} `{name}`{}", if why.is_empty() { String::new() } else { format!(": {why}") })]
    NotFound { what: &'static str, name: String, why: String },
    /// 413: the body is over `max_body_bytes`, or Kafka refused the record
    /// as too large.
    #[error("{0}")]
    TooLarge(String),
    /// 422: the exchange exists but no queue is bound for the routing key,
    /// so the message would be lost (the worker's `Publisher` treats this
    /// as an error too).
    #[error(
        "no queue is bound to topic `{topic}` with routing key `{routing_key}`: the message would be lost"
    )]
    Unroutable { topic: String, routing_key: String },
    /// 502: the handler's reply cannot be an HTTP response.
    #[error("{0}")]
    BadReply(String),
    /// 503 with `Retry-After`: a broker cannot be reached or refused.
    #[error("{0}")]
    Unavailable(String),
    /// 504: no reply (or acknowledgement) within the deadline.
    #[error("{0}")]
    Timeout(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::NotFound { .. } => StatusCode::NOT_FOUND,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unroutable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::BadReply(_) => StatusCode::BAD_GATEWAY,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The machine-readable `error.code`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "bad_request",
            Self::Unauthorized(_) => "unauthorized",
            Self::NotFound { what: "stream", .. } => "unknown_stream",
            Self::NotFound { what: "topic", .. } => "unknown_topic",
            Self::NotFound { what: "subscription", .. } => "unknown_subscription",
            Self::NotFound { .. } => "not_found",
            Self::TooLarge(_) => "payload_too_large",
            Self::Unroutable { .. } => "unroutable",
            Self::BadReply(_) => "bad_reply",
            Self::Unavailable(_) => "unavailable",
            Self::Timeout(_) => "timeout",
        }
    }

    pub fn not_found(what: &'static str, name: &str, why: impl Into<String>) -> Self {
        Self::NotFound { what, name: name.to_owned(), why: why.into() }
    }
}

/// The JSON body of an error.
pub fn body(code: &str, message: &str) -> serde_json::Value {
    serde_json::json!({ "error": { "code": code, "message": message } })
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut response = (status, axum::Json(body(self.code(), &self.to_string()))).into_response();
        let headers = response.headers_mut();
        match self {
            Self::Unavailable(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
            }
            Self::Unauthorized(_) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_has_its_status_code_and_headers() {
        let e = ApiError::not_found("stream", "s", "not in `streams`");
        assert_eq!((e.status(), e.code()), (StatusCode::NOT_FOUND, "unknown_stream"));
        assert_eq!(e.to_string(), "no stream `s`: not in `streams`");
        let r = ApiError::Unavailable("kafka down".into()).into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers().get(header::RETRY_AFTER).and_then(|v| v.to_str().ok()), Some("2"));
        let r = ApiError::Unauthorized("no token".into()).into_response();
        assert_eq!(r.headers().get(header::WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()), Some("Bearer"));
        assert_eq!(ApiError::TooLarge("big".into()).status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(ApiError::Timeout("t".into()).status(), StatusCode::GATEWAY_TIMEOUT);
    }
}
