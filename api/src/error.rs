//! [`ApiError`]: every failure a handler can answer with, as one JSON shape.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// An error answered to a client as `{"error": {"code": "...", "message": "..."}}`.
///
/// The `code` is stable (clients match on it); the message is for people. Internal errors
/// are logged with their cause and answered without it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// `404 not_found`: no such entity.
    #[error("no {resource} with id {id}")]
    NotFound {
        /// What was looked up (`"courier"`).
        resource: &'static str,
        /// The id asked for.
        id: String,
    },
    /// `400 invalid_id`: the path does not hold a well-formed id.
    #[error("{value:?} is not a valid {resource} id (a UUID is expected)")]
    InvalidId {
        /// What was looked up.
        resource: &'static str,
        /// What the client sent.
        value: String,
    },
    /// `404 route_not_found`: no such route.
    #[error("no such route")]
    RouteNotFound,
    /// `503 source_unavailable`: the pipeline's source cannot deliver input now (RabbitMQ
    /// is down or being reconnected to); the message says why.
    #[error("{reason}")]
    SourceUnavailable {
        /// A sentence for operators.
        reason: String,
    },
    /// `500 internal`: a bug or a failed dependency; the cause is logged, never sent.
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl ApiError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::NotFound { .. } | ApiError::RouteNotFound => StatusCode::NOT_FOUND,
            ApiError::InvalidId { .. } => StatusCode::BAD_REQUEST,
            ApiError::SourceUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::NotFound { .. } => "not_found",
            ApiError::InvalidId { .. } => "invalid_id",
            ApiError::RouteNotFound => "route_not_found",
            ApiError::SourceUnavailable { .. } => "source_unavailable",
            ApiError::Internal(_) => "internal",
        }
    }
}

#[derive(Serialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Serialize)]
struct ErrorDetail {
    code: &'static str,
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(cause) = &self {
            tracing::error!(error = %cause, "A request failed with an internal error.");
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message: self.to_string(),
            },
        };
        (self.status(), Json(body)).into_response()
    }
}
