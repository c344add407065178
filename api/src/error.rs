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
    /// `401 unauthorized`: no token, or one that is expired, badly signed, of another
    /// algorithm or missing claims; the reason says which.
    #[error("{reason}")]
    Unauthorized {
        /// Why.
        reason: String,
    },
    /// `403 forbidden`: the token is valid but its role may not do this.
    #[error("{reason}")]
    Forbidden {
        /// Why, without revealing what the caller may not see.
        reason: String,
    },
    /// `403 origin_not_allowed`: a WebSocket upgrade from a browser page whose `Origin` is
    /// not on the allow-list ([`crate::origin`]).
    #[error("WebSocket connections from the origin {origin:?} are not allowed")]
    OriginNotAllowed {
        /// The request's `Origin`.
        origin: String,
    },
    /// `429 rate_limited`, with `Retry-After`.
    #[error("rate limit exceeded for {limit}; retry in {} s", retry_after.as_secs().max(1))]
    RateLimited {
        /// Which limit (`location_update`, `delivery_creation`, `api_key`).
        limit: &'static str,
        /// When a retry would pass.
        retry_after: std::time::Duration,
    },
    /// `400` with a stable code: `malformed_json`, `unknown_field`, `invalid_coordinates`,
    /// `invalid_status`, `invalid_query`, ...
    #[error("{message}")]
    BadRequest {
        /// The stable code.
        code: &'static str,
        /// For people.
        message: String,
    },
    /// `409` with a stable code: `illegal_transition`, `delivery_exists`, `not_rateable`.
    #[error("{message}")]
    Conflict {
        /// The stable code.
        code: &'static str,
        /// For people.
        message: String,
    },
    /// `413 payload_too_large`.
    #[error("the request body is larger than {limit} bytes")]
    PayloadTooLarge {
        /// The limit, bytes.
        limit: usize,
    },
    /// `415 unsupported_media_type`: a body that is not `application/json`.
    #[error("the request body must be application/json")]
    UnsupportedMediaType,
    /// `503 commands_unavailable`: the command could not be published (the broker is
    /// unreachable, or this process takes no commands); nothing was accepted.
    #[error("{reason}")]
    CommandsUnavailable {
        /// Why.
        reason: String,
    },
    /// `503 source_unavailable`: the pipeline's source cannot deliver input now (RabbitMQ
    /// is down or being reconnected to); the message says why.
    #[error("{reason}")]
    SourceUnavailable {
        /// A sentence for operators.
        reason: String,
    },
    /// `503 store_unavailable`: the system of record (PostgreSQL) is not configured for
    /// this process, or cannot be reached now; the reason says which.
    #[error("{reason}")]
    StoreUnavailable {
        /// Why.
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
            ApiError::InvalidId { .. } | ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden { .. } | ApiError::OriginNotAllowed { .. } => StatusCode::FORBIDDEN,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::SourceUnavailable { .. }
            | ApiError::CommandsUnavailable { .. }
            | ApiError::StoreUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
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
            ApiError::Unauthorized { .. } => "unauthorized",
            ApiError::Forbidden { .. } => "forbidden",
            ApiError::OriginNotAllowed { .. } => "origin_not_allowed",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::BadRequest { code, .. } | ApiError::Conflict { code, .. } => code,
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::CommandsUnavailable { .. } => "commands_unavailable",
            ApiError::StoreUnavailable { .. } => "store_unavailable",
            ApiError::Internal(_) => "internal",
        }
    }
}

/// The body of every error answer: `{"error": {"code": "...", "message": "..."}}`. Also
/// the `ErrorBody` schema of the OpenAPI document ([`crate::openapi`]).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// The inside of an [`ErrorBody`].
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable and machine-readable: clients match on it (`not_found`, `invalid_id`,
    /// `unauthorized`, `forbidden`, `rate_limited`, `malformed_json`, `unknown_field`,
    /// `illegal_transition`, `payload_too_large`, `unsupported_media_type`,
    /// `store_unavailable`, ...).
    #[schema(value_type = String, example = "not_found")]
    pub code: &'static str,
    /// For people; its wording may change.
    #[schema(example = "no delivery with id 7f8c2f9e-4b1a-4c47-9a43-2b1c7a0d9e11")]
    pub message: String,
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
        let mut response = (self.status(), Json(body)).into_response();
        if let ApiError::Unauthorized { .. } = &self {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        if let ApiError::RateLimited { retry_after, .. } = &self {
            let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            if let Ok(value) = axum::http::HeaderValue::from_str(&seconds.max(1).to_string()) {
                response
                    .headers_mut()
                    .insert(axum::http::header::RETRY_AFTER, value);
            }
        }
        response
    }
}

/// A JSON body whose every rejection is an [`ApiError`] of the one JSON shape:
/// `malformed_json` (syntax, wrong types, missing fields), `unknown_field`,
/// `payload_too_large` (413), `unsupported_media_type` (415). Request types use
/// `#[serde(deny_unknown_fields)]`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<S, T> axum::extract::FromRequest<S> for ApiJson<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        use axum::extract::rejection::JsonRejection;
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(JsonRejection::MissingJsonContentType(_)) => Err(ApiError::UnsupportedMediaType),
            Err(JsonRejection::BytesRejection(rejection)) => {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    Err(ApiError::PayloadTooLarge { limit: BODY_LIMIT })
                } else {
                    Err(ApiError::BadRequest {
                        code: "malformed_body",
                        message: rejection.body_text(),
                    })
                }
            }
            Err(JsonRejection::JsonDataError(error)) => {
                let text = error.body_text();
                let code = if text.contains("unknown field") {
                    "unknown_field"
                } else {
                    "malformed_json"
                };
                Err(ApiError::BadRequest {
                    code,
                    message: text,
                })
            }
            Err(other) => Err(ApiError::BadRequest {
                code: "malformed_json",
                message: other.body_text(),
            }),
        }
    }
}

/// The largest request body accepted, bytes (the router's body limit).
pub const BODY_LIMIT: usize = 64 * 1024;
