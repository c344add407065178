//! `GET /openapi.json`: the OpenAPI 3.1 document of every route, generated with utoipa.
//!
//! Each handler carries its own `#[utoipa::path(...)]` (method, path, parameters, body,
//! every answer with its status); [`ApiDoc`] lists them all, with the request and response
//! schemas, the reusable error answers and the security schemes. The document is built and
//! serialized once, at the first request.
//!
//! The tests below hold the document to the router: every documented operation is served
//! (requested through the real router, none answers `405` or `404 route_not_found`), every
//! route of the router is documented, and every schema of a read-model view matches what
//! the view serializes to.
//!
//! # Layout
//! - [`schemas`] — the schemas of the read model's views and the write routes' answers,
//!   which other crates define.

pub mod schemas;

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
    components(responses(Unauthorized, PayloadTooLarge, UnsupportedMediaType, RateLimited)),
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

/// Adds `429` to every operation that does not document it already: the per-API-key limit
/// applies to every route.
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
                operation
                    .responses
                    .responses
                    .entry("429".to_owned())
                    .or_insert_with(|| RefOr::Ref(Ref::from_response_name("RateLimited")));
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::collections::BTreeSet;

    use axum::body::Body;
    use axum::http::Request;
    use delivertrack_sinks::ReadModel;
    use serde_json::Value;
    use tokio_util::sync::CancellationToken;
    use tower::ServiceExt;

    use super::*;

    /// Every route the router serves, written out by hand from the modules' `router()`s:
    /// `(method, path)` with axum's `{param}` syntax, which is OpenAPI's too.
    const ROUTES: &[(&str, &str)] = &[
        ("GET", "/"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
        ("GET", "/api/snapshot"),
        ("GET", "/api/couriers/{id}"),
        ("GET", "/api/deliveries/{id}"),
        ("GET", "/ws/changes"),
        ("GET", "/ws/track/{delivery_id}"),
        ("POST", "/graphql"),
        ("GET", "/graphql"),
        ("GET", "/graphql/ws"),
        ("GET", "/deliveries"),
        ("POST", "/deliveries"),
        ("GET", "/deliveries/{id}"),
        ("PUT", "/deliveries/{id}/status"),
        ("POST", "/deliveries/{id}/rating"),
        ("POST", "/locations"),
        ("GET", "/zones"),
        ("GET", "/zones/{id}"),
        ("PUT", "/zones/{id}"),
        ("DELETE", "/zones/{id}"),
        ("GET", "/couriers/{id}"),
        ("PUT", "/couriers/{id}"),
        ("GET", "/customers/{id}"),
        ("PUT", "/customers/{id}"),
    ];

    /// The methods an operation can be documented under, as the document spells them.
    const METHODS: [&str; 5] = ["get", "post", "put", "delete", "patch"];

    fn app() -> Router {
        crate::router(AppState::new(
            ReadModel::default(),
            CancellationToken::new(),
        ))
    }

    /// The document as `GET /openapi.json` serves it.
    async fn served_document() -> Value {
        let response = app()
            .oneshot(Request::get("/openapi.json").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 22)
            .await
            .unwrap();
        serde_json::from_slice(&bytes).expect("the document is JSON")
    }

    /// `(METHOD, path)` of every documented operation.
    fn operations(document: &Value) -> BTreeSet<(String, String)> {
        let mut found = BTreeSet::new();
        for (path, item) in document["paths"].as_object().unwrap() {
            for method in METHODS {
                if item.get(method).is_some() {
                    found.insert((method.to_uppercase(), path.clone()));
                }
            }
        }
        found
    }

    /// `path` with every `{param}` replaced by a fresh UUID.
    fn concrete(path: &str) -> String {
        let mut out = String::new();
        let mut rest = path;
        while let Some(start) = rest.find('{') {
            let end = rest[start..].find('}').unwrap() + start;
            out.push_str(&rest[..start]);
            out.push_str(&uuid::Uuid::new_v4().to_string());
            rest = &rest[end + 1..];
        }
        out.push_str(rest);
        out
    }

    /// The status and error code (if any) of `method path` on a fresh router.
    async fn answer(method: &str, path: &str) -> (u16, Option<String>) {
        let request = Request::builder()
            .method(method)
            .uri(concrete(path))
            .body(Body::empty())
            .unwrap();
        let response = app().oneshot(request).await.unwrap();
        let status = response.status().as_u16();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 22)
            .await
            .unwrap();
        let code = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|body| body["error"]["code"].as_str().map(str::to_owned));
        (status, code)
    }

    /// Every `$ref` in `value`.
    fn refs<'a>(value: &'a Value, found: &mut Vec<&'a str>) {
        match value {
            Value::Object(map) => {
                for (key, inner) in map {
                    match (key.as_str(), inner) {
                        ("$ref", Value::String(target)) => found.push(target),
                        _ => refs(inner, found),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|inner| refs(inner, found)),
            _ => {}
        }
    }

    #[tokio::test]
    async fn the_document_is_openapi_3_1_with_the_bearer_scheme() {
        let document = served_document().await;
        let version = document["openapi"].as_str().unwrap();
        assert!(version.starts_with("3.1"), "{version}");
        assert_eq!(
            document["components"]["securitySchemes"][BEARER_JWT],
            serde_json::json!({
                "type": "http",
                "scheme": "bearer",
                "bearerFormat": "JWT",
                "description": document["components"]["securitySchemes"][BEARER_JWT]["description"],
            })
        );
        // Operation ids are unique, as OpenAPI requires.
        let mut ids = BTreeSet::new();
        for (method, path) in operations(&document) {
            let operation = &document["paths"][&path][method.to_lowercase()];
            let id = operation["operationId"].as_str().unwrap();
            assert!(ids.insert(id.to_owned()), "{id} twice");
            // Every operation documents at least one success and its error answers refer
            // to the one error shape.
            let responses = operation["responses"].as_object().unwrap();
            assert!(
                responses
                    .keys()
                    .any(|status| status.starts_with('1') || status.starts_with('2')),
                "{method} {path}"
            );
            for (status, response) in responses {
                if status.starts_with('4') || status.starts_with('5') {
                    let schema = &response["content"]["application/json"]["schema"]["$ref"];
                    let shared = response["$ref"].as_str().is_some();
                    assert!(
                        shared
                            || schema == "#/components/schemas/ErrorBody"
                            || path == "/ws/changes",
                        "{method} {path} {status}: {response}"
                    );
                }
            }
        }
        // Every reference resolves.
        let mut found = Vec::new();
        refs(&document, &mut found);
        assert!(!found.is_empty());
        for target in found {
            let pointer = target.strip_prefix('#').unwrap();
            assert!(
                document.pointer(pointer).is_some(),
                "{target} does not resolve"
            );
        }
    }

    #[tokio::test]
    async fn every_route_is_documented_and_nothing_else() {
        let document = served_document().await;
        let routes: BTreeSet<(String, String)> = ROUTES
            .iter()
            .map(|(method, path)| ((*method).to_owned(), (*path).to_owned()))
            .collect();
        let documented = operations(&document);
        let missing: Vec<_> = routes.difference(&documented).collect();
        let extra: Vec<_> = documented.difference(&routes).collect();
        assert!(missing.is_empty(), "routes not documented: {missing:?}");
        assert!(extra.is_empty(), "documented, not in ROUTES: {extra:?}");
    }

    #[tokio::test]
    async fn every_documented_operation_is_served_and_no_other_method() {
        let document = served_document().await;
        let documented = operations(&document);
        assert_eq!(documented.len(), ROUTES.len());
        for (method, path) in &documented {
            let (status, code) = answer(method, path).await;
            assert_ne!(status, 405, "{method} {path} is documented but not served");
            assert_ne!(
                code.as_deref(),
                Some("route_not_found"),
                "{method} {path} is documented but not routed"
            );
        }
        // On a documented path, a method the document does not list is not served either.
        for path in document["paths"].as_object().unwrap().keys() {
            for method in METHODS.map(str::to_uppercase) {
                if !documented.contains(&(method.clone(), path.clone())) {
                    let (status, code) = answer(&method, path).await;
                    assert_eq!(
                        status, 405,
                        "{method} {path} is served ({status} {code:?}) but not documented"
                    );
                }
            }
        }
        // The router's fallback still answers what no route serves.
        assert_eq!(
            answer("GET", "/no/such/route").await,
            (404, Some("route_not_found".to_owned()))
        );
    }
}
