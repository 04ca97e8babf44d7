//! The API's errors. A handler returns [`ApiError`]; its response carries
//! an [`ErrorInfo`] extension, and the request middleware (see
//! [`crate::http`]) writes the body `{"message", "request_id", "code"}`
//! with the request's id. Causes of 500s are logged, never shown.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// Seconds a client should wait before retrying a 503.
pub const RETRY_AFTER_SECS: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Bad input; the message says what is wrong.
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    NotFound(String),
    /// The body is over the limit.
    #[error("{0}")]
    TooLarge(String),
    /// Too many failed logins; retry after this many seconds.
    #[error("{0}")]
    TooManyRequests(String, u64),
    /// A service we depend on is down or overloaded; retry later.
    #[error("service unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// What the middleware needs to write an error body.
#[derive(Debug, Clone)]
pub struct ErrorInfo {
    pub message: String,
    pub code: &'static str,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn bad(msg: impl Into<String>) -> ApiError {
        ApiError::BadRequest(msg.into())
    }

    pub fn not_found(what: &str) -> ApiError {
        ApiError::NotFound(format!("{what} not found"))
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            ApiError::TooManyRequests(..) => (StatusCode::TOO_MANY_REQUESTS, "too_many_requests"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let message = match &self {
            ApiError::Internal(e) => {
                tracing::error!(error = %format_args!("{e:#}"), "internal error");
                "internal error".to_owned()
            }
            ApiError::Unavailable(what) => {
                tracing::warn!(error = %what, "unavailable");
                "service temporarily unavailable, retry later".to_owned()
            }
            other => other.to_string(),
        };
        let mut resp = status.into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut().insert("retry-after", RETRY_AFTER_SECS.into());
        }
        if let ApiError::TooManyRequests(_, secs) = &self {
            resp.headers_mut().insert("retry-after", (*secs).into());
        }
        resp.extensions_mut().insert(ErrorInfo { message, code });
        resp
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(e: deadpool_postgres::PoolError) -> ApiError {
        ApiError::Unavailable(format!("database pool: {e}"))
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> ApiError {
        if crate::db::is_unavailable(&e) {
            ApiError::Unavailable(format!("database: {e}"))
        } else {
            ApiError::Internal(anyhow::Error::new(e).context("database"))
        }
    }
}

impl From<redis::RedisError> for ApiError {
    fn from(e: redis::RedisError) -> ApiError {
        ApiError::Unavailable(format!("redis: {e}"))
    }
}

/// A row of the caller (a post, a follow, a message) refused because the
/// caller's user does not exist: the token was issued for a user that is
/// gone. That is the token's fault (401), not a server error.
pub fn caller_must_exist(e: tokio_postgres::Error) -> ApiError {
    let ghost = e.as_db_error().is_some_and(|d| {
        *d.code() == tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION
            && matches!(
                d.constraint(),
                Some("posts_author_id_fkey" | "follows_follower_id_fkey" | "messages_from_id_fkey")
            )
    });
    if ghost { ApiError::Unauthorized("the token's user does not exist".into()) } else { e.into() }
}
