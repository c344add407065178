//! `GET /openapi.json`: the OpenAPI 3.1 document of every route, generated with utoipa.
//!
//! Each handler carries its own `#[utoipa::path(...)]` (method, path, parameters, body,
//! every answer with its status); [`ApiDoc`] lists them all, with the request and response
//! schemas, the reusable error answers and the security schemes. The document is built and
//! serialized once, at the first request.
//!
//! The tests hold the document to the router: every route of the router is documented
//! (against a list written by hand), every documented operation is served (requested
//! through the real router, none answers `405` or `404 route_not_found`, and no other
//! method is), every schema of a read-model view matches what the view serializes to, and
//! real answers of every operation — writes through the real dataflow, reads of what they
//! made, records in the real PostgreSQL, errors of each kind — have a documented status,
//! content type and headers, and a body that matches its schema field for field.
//!
//! # Layout
//! - [`schemas`] — the schemas of the read model's views and the write routes' answers,
//!   which other crates define.
//! - `check` (tests only) — a strict check of a JSON value against a schema of the
//!   document.
//! - `tests` — the tests above.

#[cfg(test)]
mod check;
pub mod schemas;
#[cfg(test)]
mod tests;

use std::sync::LazyLock;

use axum::Router;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Ref, RefOr};
use utoipa::{Modify, OpenApi, ToResponse};

use crate::error::{ApiError, ErrorBody};
use crate::state::AppState;

/// The name of the bearer-token security scheme (`Authorization: Bearer <JWT>`).
pub const BEARER_JWT: &str = "bearer_jwt";
/// The name of the query-parameter alternative (`?access_token=<JWT>`), for clients that
/// cannot send headers (browsers opening a WebSocket).
pub const ACCESS_TOKEN: &str = "access_token";

/// The document: every path, the schemas they use, the reusable answers and the security
/// schemes.
#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "DeliverTrack API",
        description = "Real-time delivery tracking: commands (deliveries, status changes, \
            ratings, courier locations, zones), authenticated reads, the read model's \
            dashboard views, live WebSockets and the GraphQL analytics API.\n\n\
            Every error is JSON of one shape, `{\"error\": {\"code\", \"message\"}}`, with a \
            stable `code`. Protected routes take an HS256 JWT (`sub`, `role`: `customer`, \
            `courier` or `admin`, `exp`) as `Authorization: Bearer <token>` or, for clients \
            that cannot send headers, as the `access_token` query parameter. Any route may \
            be called with an `X-API-Key` header, which limits calls per key (`429 \
            rate_limited` with `Retry-After` over the key's quota; `401 unauthorized` for an \
            unlisted key when unlisted keys are refused).",
        license(name = "See the repository"),
    ),
    paths(
        crate::commands::deliveries::create,
        crate::commands::deliveries::change_status,
        crate::commands::deliveries::rate,
        crate::commands::locations::report,
        crate::commands::zones::upsert,
        crate::commands::zones::delete,
        crate::reads::deliveries::list,
        crate::reads::deliveries::one,
        crate::reads::zones::list,
        crate::reads::zones::one,
        crate::reads::profiles::get_courier,
        crate::reads::profiles::put_courier,
        crate::reads::profiles::get_customer,
        crate::reads::profiles::put_customer,
        crate::track::upgrade,
        crate::live::upgrade,
        crate::graphql::http::execute,
        crate::graphql::http::graphiql,
        crate::graphql::ws::upgrade,
        crate::map::map,
        crate::snapshot::snapshot,
        crate::couriers::courier,
        crate::deliveries::delivery,
        crate::health::healthz,
        crate::health::readyz,
        crate::metrics::metrics,
        openapi_json,
    ),
    components(responses(Unauthorized, PayloadTooLarge, UnsupportedMediaType, RateLimited, HeadersTooLarge)),
    modifiers(&SecuritySchemes, &ApiKeyLimits),
    tags(
        (name = "commands", description = "Writes: each command becomes one event of the \
            contract, published with a confirm, and is answered once the read model shows \
            it (`202 Accepted` with the event id if not within the bound)."),
        (name = "deliveries", description = "Deliveries as their customer, their courier or an admin may see them."),
        (name = "zones", description = "Delivery zones (geofences), for admins."),
        (name = "records", description = "Courier and customer records, kept in PostgreSQL."),
        (name = "live", description = "WebSockets: the change stream and per-delivery tracking."),
        (name = "graphql", description = "The GraphQL analytics API."),
        (name = "read model", description = "The dashboard's unauthenticated views of the read model."),
        (name = "health", description = "Liveness, readiness and metrics."),
        (name = "meta", description = "This document."),
    )
)]
pub struct ApiDoc;

/// `401 unauthorized`.
#[derive(Debug, ToResponse)]
#[response(
    description = "`unauthorized`: no bearer token, or one that is expired, badly signed, of \
        another algorithm or missing claims; the message says which.",
    headers(("WWW-Authenticate" = String, description = "`Bearer`"))
)]
#[allow(dead_code)]
pub struct Unauthorized(ErrorBody);

/// `413 payload_too_large`.
#[derive(Debug, ToResponse)]
#[response(description = "`payload_too_large`: the body is larger than 64 KiB.")]
#[allow(dead_code)]
pub struct PayloadTooLarge(ErrorBody);

/// `415 unsupported_media_type`.
#[derive(Debug, ToResponse)]
#[response(description = "`unsupported_media_type`: the body is not `application/json`.")]
#[allow(dead_code)]
pub struct UnsupportedMediaType(ErrorBody);

/// `429 rate_limited`.
#[derive(Debug, ToResponse)]
#[response(
    description = "`rate_limited`: a rate limit is exceeded (the per-API-key limit of \
        `X-API-Key` applies to every route); retry after `Retry-After` seconds.",
    headers(("Retry-After" = u64, description = "Seconds until a retry would pass."))
)]
#[allow(dead_code)]
pub struct RateLimited(ErrorBody);

/// `431 headers_too_large`.
#[derive(Debug, ToResponse)]
#[response(
    description = "`headers_too_large`: the request line and headers together are larger than \
        64 KiB (any route). Over 128 KiB the connection is answered `431` without a body and \
        closed before the head is read in full."
)]
#[allow(dead_code)]
pub struct HeadersTooLarge(ErrorBody);

/// Adds the security schemes the operations refer to.
#[derive(Debug)]
struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER_JWT,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "An HS256 JWT with `sub` (the caller's id), `role` (`customer`, \
                         `courier`, `admin`) and `exp`, in `Authorization: Bearer <token>`.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            ACCESS_TOKEN,
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::with_description(
                ACCESS_TOKEN,
                "The same JWT as a query parameter, for clients that cannot send headers \
                 (browsers opening a WebSocket). The header wins when both are given.",
            ))),
        );
    }
}

/// Adds `429` and `431` to every operation that does not document them already: the
/// per-API-key limit and the header size limit apply to every route.
#[derive(Debug)]
struct ApiKeyLimits;

impl Modify for ApiKeyLimits {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for item in openapi.paths.paths.values_mut() {
            for operation in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.options,
                &mut item.head,
                &mut item.patch,
                &mut item.trace,
            ]
            .into_iter()
            .flatten()
            {
                let responses = &mut operation.responses.responses;
                responses
                    .entry("429".to_owned())
                    .or_insert_with(|| RefOr::Ref(Ref::from_response_name("RateLimited")));
                responses
                    .entry("431".to_owned())
                    .or_insert_with(|| RefOr::Ref(Ref::from_response_name("HeadersTooLarge")));
            }
        }
    }
}

/// The serialized document, built at the first request.
static DOCUMENT: LazyLock<Result<String, String>> = LazyLock::new(|| {
    ApiDoc::openapi()
        .to_json()
        .map_err(|error| error.to_string())
});

/// The routes of this module.
pub fn router() -> Router<AppState> {
    Router::new().route("/openapi.json", get(openapi_json))
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapiDocument",
    tag = "meta",
    summary = "This OpenAPI document",
    responses((status = 200, description = "The OpenAPI 3.1 document of every route.", body = Object))
)]
async fn openapi_json() -> Result<Response, ApiError> {
    match &*DOCUMENT {
        Ok(json) => Ok(([(CONTENT_TYPE, "application/json")], json.as_str()).into_response()),
        Err(error) => Err(ApiError::Internal(
            format!("the OpenAPI document cannot be serialized: {error}").into(),
        )),
    }
}
