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
        /// Which limit (`location_update`, `delivery_creation`, `api_key`, `rating`).
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
    /// `431 headers_too_large`: the request's head (request line and headers) is larger
    /// than [`HEADER_LIMIT`](crate::server::HEADER_LIMIT).
    #[error("the request's headers are larger than {limit} bytes")]
    HeadersTooLarge {
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
            ApiError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
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
            ApiError::HeadersTooLarge { .. } => "headers_too_large",
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
/// `invalid_unicode` (a lone surrogate escape such as `"\ud800"`, or bytes that are not
/// UTF-8, in a string: the message names the field), `payload_too_large` (413),
/// `unsupported_media_type` (415). Request types use `#[serde(deny_unknown_fields)]`.
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
        if !json_content_type(req.headers()) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let bytes = match axum::body::Bytes::from_request(req, state).await {
            Ok(bytes) => bytes,
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return Err(ApiError::PayloadTooLarge { limit: BODY_LIMIT });
            }
            Err(rejection) => {
                return Err(ApiError::BadRequest {
                    code: "malformed_body",
                    message: rejection.body_text(),
                });
            }
        };
        // serde reads a struct from a JSON array as well (`[null, null]` was a courier
        // profile), so every body must be an object before its fields are read.
        let first = bytes.iter().find(|byte| !byte.is_ascii_whitespace());
        if first.is_some_and(|byte| *byte != b'{') {
            return Err(ApiError::BadRequest {
                code: "malformed_json",
                message: "the body must be a JSON object".into(),
            });
        }
        match Json::<T>::from_bytes(&bytes) {
            Ok(Json(value)) => Ok(ApiJson(value)),
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
            Err(other) => {
                // The text names the field (`comment: lone leading surrogate in hex escape
                // at line 1 column 30`): the same stable code the event contract gives it.
                let message = other.body_text();
                let code = if delivertrack_dataflow::contract::is_not_unicode_error(&message) {
                    "invalid_unicode"
                } else {
                    "malformed_json"
                };
                Err(ApiError::BadRequest { code, message })
            }
        }
    }
}

/// Is the request's `Content-Type` JSON (`application/json`, or `application/*+json`), as
/// axum's `Json` requires?
fn json_content_type(headers: &axum::http::HeaderMap) -> bool {
    let Some(value) = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
    else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or_default().trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    kind.eq_ignore_ascii_case("application")
        && (subtype.eq_ignore_ascii_case("json") || subtype.to_ascii_lowercase().ends_with("+json"))
}

/// The largest request body accepted, bytes (the router's body limit).
pub const BODY_LIMIT: usize = 64 * 1024;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use axum::Router;
    use axum::body::Body;
    use axum::http::Request;
    use axum::routing::put;
    use serde::Deserialize;
    use serde_json::Value;
    use tower::ServiceExt;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Profile {
        name: Option<String>,
        vehicle_type: Option<String>,
    }

    async fn put_body(content_type: &str, body: &'static str) -> (u16, Value) {
        let app = Router::new().route(
            "/",
            put(|ApiJson(_profile): ApiJson<Profile>| async { StatusCode::NO_CONTENT }),
        );
        let request = Request::put("/")
            .header("content-type", content_type)
            .body(Body::from(body))
            .unwrap();
        let response = app.oneshot(request).await.unwrap();
        let status = response.status().as_u16();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    #[tokio::test]
    async fn a_body_must_be_an_object() {
        for body in [
            "[null, null]",
            "[]",
            " [\"a\", \"b\"]",
            "null",
            "1",
            "\"x\"",
            "true",
        ] {
            let (status, answer) = put_body("application/json", body).await;
            assert_eq!(
                (status, answer["error"]["code"].as_str()),
                (400, Some("malformed_json")),
                "{body}: {answer}"
            );
        }
    }

    #[tokio::test]
    async fn objects_media_types_and_field_errors_keep_their_answers() {
        assert_eq!(put_body("application/json", "{}").await.0, 204);
        assert_eq!(
            put_body("application/merge-patch+json", " {\"name\": null}")
                .await
                .0,
            204
        );
        assert_eq!(
            put_body("Application/JSON; charset=utf-8", "{}").await.0,
            204
        );
        let code = |answer: (u16, Value)| {
            (
                answer.0,
                answer.1["error"]["code"].as_str().map(str::to_owned),
            )
        };
        assert_eq!(
            code(put_body("text/plain", "{}").await),
            (415, Some("unsupported_media_type".into()))
        );
        assert_eq!(
            code(put_body("application/json", "{\"colour\": 1}").await),
            (400, Some("unknown_field".into()))
        );
        assert_eq!(
            code(put_body("application/json", "{\"name\": 1}").await),
            (400, Some("malformed_json".into()))
        );
        assert_eq!(
            code(put_body("application/json", "{\"name\": \"a\", \"name\": \"b\"}").await),
            (400, Some("malformed_json".into()))
        );
        assert_eq!(
            code(put_body("application/json", "{").await),
            (400, Some("malformed_json".into()))
        );
    }
}
