//! The HTTP and WebSocket face of DeliverTrack, served by axum.
//!
//! [`router`] builds the whole application from one [`AppState`]; [`serve`] runs it on a
//! listener until the state's shutdown token fires. Reads come from the in-memory
//! [`ReadModel`](delivertrack_sinks::ReadModel); live changes from its broadcast stream.
//!
//! Routes so far (each resource module exposes its own `router()`):
//!
//! | route | module | |
//! |---|---|---|
//! | `GET /` | [`map`] | the operations map page (it signs in with an admin token) |
//! | `GET /healthz`, `GET /readyz` | [`health`] | liveness; readiness (the source is connected; the last epoch applied) |
//! | `GET /metrics` | [`metrics`] | Prometheus text format of the state's registry (or on an address of its own: [`metrics::serve`]) |
//! | `GET /api/snapshot` | [`snapshot`] | aggregates, counts, positions, zones (admins) |
//! | `GET /api/couriers/{id}` | [`couriers`] | one courier (admins) |
//! | `GET /api/deliveries/{id}` | [`deliveries`] | one delivery (admins) |
//! | `GET /ws/changes` | [`live`] | WebSocket: a snapshot, then one message per epoch (admins) |
//! | `POST /graphql`, `GET /graphql`, `GET /graphql/ws` | [`graphql`] | analytics queries (admins), deliveries by role, GraphiQL, metric subscriptions |
//! | `GET /deliveries`, `GET /deliveries/{id}`, `GET /zones[/{id}]`, `GET`/`PUT /couriers/{id}`, `GET`/`PUT /customers/{id}` | [`reads`] | authenticated reads, by role and ownership |
//! | `GET /ws/track/{delivery_id}` | [`track`] | WebSocket: one delivery's status, courier and ETA |
//!
//! Every WebSocket upgrade checks the `Origin` against the allow-list ([`origin`]); every
//! HTML page is sent with a Content-Security-Policy of its own ([`page`]).
//!
//! Every error is JSON of one shape, `{"error": {"code": "...", "message": "..."}}`
//! ([`ApiError`]).
//!
//! # Layout
//! - [`state`] — [`AppState`] and [`ApiConfig`].
//! - [`readiness`] — [`Readiness`], the source's status as `/readyz` sees it.
//! - [`error`] — [`ApiError`], the one error type of every handler.
//! - [`rate_limit`] — [`RateLimiter`]: per-courier, per-customer and per-API-key limits
//!   (Redis or in-process), and the `X-API-Key` middleware every route goes through.
//! - [`id`] — parsing typed ids out of paths.
//! - [`origin`] — [`AllowedOrigins`]: which web pages may open the WebSockets.
//! - [`page`] — the HTML pages' Content-Security-Policy and security headers.
//! - [`health`], [`metrics`], [`snapshot`], [`couriers`], [`deliveries`], [`live`],
//!   [`map`]: the resources.
//! - [`server`] — [`serve`]: the accept loop, with the connection cap, the header and idle
//!   timeouts, and graceful shutdown.

pub mod auth;
pub mod commands;
pub mod couriers;
pub mod deliveries;
pub mod error;
pub mod graphql;
pub mod health;
pub mod id;
pub mod live;
pub mod map;
pub mod metrics;
pub mod openapi;
pub mod origin;
pub mod page;
pub mod rate_limit;
pub mod readiness;
pub mod reads;
pub mod server;
pub mod snapshot;
pub mod state;
pub mod track;

use axum::Router;
use axum::http::StatusCode;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

pub use auth::{AuthConfig, Authenticator, Grant, Principal, Role};
pub use commands::{EventPublisher, PublishError};
pub use error::{ApiError, ApiJson};
pub use origin::AllowedOrigins;
pub use rate_limit::{Limit, Quota, RateLimitConfig, RateLimiter};
pub use readiness::{Readiness, SourceProbe, SourceStatus};
pub use server::serve;
pub use state::{ApiConfig, AppState};

/// The whole application: every resource's routes, a JSON 404 for anything else, request
/// tracing and a request timeout.
pub fn router(state: AppState) -> Router {
    let timeout = state.config.request_timeout;
    let metrics = if state.config.metrics_on_api {
        metrics::router()
    } else {
        Router::new()
    };
    Router::new()
        .merge(map::router())
        .merge(metrics)
        .merge(health::router())
        .merge(snapshot::router())
        .merge(couriers::router())
        .merge(deliveries::router())
        .merge(live::router())
        .merge(graphql::router())
        .merge(reads::router())
        .merge(track::router())
        .merge(commands::router())
        .merge(openapi::router())
        .fallback(|| async { ApiError::RouteNotFound })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            rate_limit::api_key_layer,
        ))
        // Outside the rate limit, so that refusals are timed too.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::track_requests,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(error::BODY_LIMIT))
        .layer(axum::middleware::from_fn(server::limit_headers))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout,
        ))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::{Request, Response};
    use delivertrack_dataflow::geometry::GeoPoint;
    use delivertrack_dataflow::ids::{CustomerId, EventId};
    use delivertrack_dataflow::model::{CourierState, DeliveryState};
    use delivertrack_dataflow::{Change, CourierId, DeliveryId, EpochOutput, Status};
    use delivertrack_sinks::ReadModel;
    use serde_json::Value;
    use tokio_util::sync::CancellationToken;
    use tower::ServiceExt;
    use uuid::Uuid;

    const COURIER: Uuid = Uuid::from_u128(1);
    const DELIVERY: Uuid = Uuid::from_u128(2);

    fn ready_model() -> ReadModel {
        let model = ReadModel::default();
        let courier = CourierState {
            position: GeoPoint::from_degrees(52.52, 13.40),
            at: 1_000,
            event_id: EventId(Uuid::from_u128(10)),
            speed_mm_s: None,
            heading_ddeg: None,
            odometer_mm: 0,
            active_hours: 1,
            presence: Vec::new(),
        };
        let delivery = DeliveryState {
            customer_id: CustomerId(Uuid::from_u128(3)),
            courier_id: Some(CourierId(COURIER)),
            pickup: GeoPoint::from_degrees(52.52, 13.41),
            dropoff: GeoPoint::from_degrees(52.50, 13.45),
            promised_by: None,
            status: Status::Assigned,
            created_at: 500,
            assigned_at: Some(600),
            picked_up_at: None,
            ended_at: None,
            rating: None,
            version: 2,
        };
        model.apply(&EpochOutput {
            restored: false,
            epoch: 0,
            changes: vec![
                (Change::Courier(CourierId(COURIER), courier), 1),
                (Change::Delivery(DeliveryId(DELIVERY), delivery), 1),
            ],
            rejections: Vec::new(),
            events: Vec::new(),
        });
        model
    }

    /// `GET uri` on a router over `model`, as an admin.
    async fn get(model: &ReadModel, uri: &str) -> (u16, Value) {
        let state = AppState::new(model.clone(), CancellationToken::new());
        let token = state.auth.issue(Role::Admin, Uuid::from_u128(5)).unwrap();
        let response = router(state)
            .oneshot(
                Request::get(uri)
                    .header("authorization", format!("Bearer {token}"))
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        body_of(response).await
    }

    async fn body_of(response: Response<Body>) -> (u16, Value) {
        let status = response.status().as_u16();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        let body = if bytes.starts_with(b"<!doctype") {
            Value::String(String::from_utf8_lossy(&bytes).into_owned())
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        (status, body)
    }

    async fn get_raw(state: AppState, uri: &str) -> Response<Body> {
        router(state)
            .oneshot(Request::get(uri).body(Body::empty()).unwrap())
            .await
            .unwrap()
    }

    async fn get_with(state: AppState, uri: &str) -> (u16, Value) {
        body_of(get_raw(state, uri).await).await
    }

    #[tokio::test]
    async fn health_and_readiness() {
        let empty = ReadModel::default();
        assert_eq!(
            get(&empty, "/healthz").await,
            (200, serde_json::json!({"status": "ok"}))
        );
        // Connected, nothing arrived yet: ready, with no epoch.
        let (status, body) = get(&empty, "/readyz").await;
        assert_eq!(
            (status, body),
            (200, serde_json::json!({"status": "ready", "epoch": null}))
        );
        let (status, body) = get(&ready_model(), "/readyz").await;
        assert_eq!((status, body["epoch"].as_u64()), (200, Some(0)));
    }

    #[tokio::test]
    async fn readiness_follows_the_source() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};

        let connected = Arc::new(AtomicBool::new(false));
        let probe = {
            let connected = Arc::clone(&connected);
            move || {
                if connected.load(Ordering::SeqCst) {
                    SourceStatus::Connected
                } else {
                    SourceStatus::Unavailable {
                        reason: "RabbitMQ is unreachable (attempt 2): connection refused".into(),
                    }
                }
            }
        };
        let state = AppState::new(ready_model(), CancellationToken::new())
            .with_readiness(Readiness::new(probe));

        // Results exist, but the source is gone: not ready, and the reason is shown.
        let (status, body) = get_with(state.clone(), "/readyz").await;
        assert_eq!(status, 503);
        assert_eq!(body["error"]["code"], "source_unavailable");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("connection refused"),
            "{body}"
        );

        connected.store(true, Ordering::SeqCst);
        let (status, body) = get_with(state, "/readyz").await;
        assert_eq!((status, body["status"].as_str()), (200, Some("ready")));
    }

    #[tokio::test]
    async fn metrics_render_the_registry_as_prometheus_text() {
        let registry = prometheus::Registry::new();
        let counter =
            prometheus::IntCounter::new("delivertrack_test_total", "A counter for the test.")
                .unwrap();
        registry.register(Box::new(counter.clone())).unwrap();
        counter.inc_by(3);
        let state =
            AppState::new(ReadModel::default(), CancellationToken::new()).with_registry(registry);

        let response = get_raw(state, "/metrics").await;
        assert_eq!(response.status().as_u16(), 200);
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(content_type.starts_with("text/plain"), "{content_type}");
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        let text = String::from_utf8(bytes.to_vec()).unwrap();
        assert!(
            text.contains("# TYPE delivertrack_test_total counter"),
            "{text}"
        );
        assert!(text.contains("delivertrack_test_total 3"), "{text}");
    }

    #[tokio::test]
    async fn requests_are_timed_by_route_pattern_method_and_status() {
        let state = AppState::new(ReadModel::default(), CancellationToken::new());
        let histogram = state.metrics.http_request_duration.clone();
        let id = Uuid::from_u128(77);
        assert_eq!(
            get_raw(state.clone(), &format!("/deliveries/{id}"))
                .await
                .status(),
            401
        );
        assert_eq!(get_raw(state.clone(), "/healthz").await.status(), 200);
        assert_eq!(get_raw(state, "/nowhere/at/all").await.status(), 404);
        let count = |labels: [&str; 3]| {
            histogram
                .get_metric_with_label_values(&labels)
                .map(|h| h.get_sample_count())
                .unwrap_or(0)
        };
        assert_eq!(count(["/deliveries/{id}", "GET", "401"]), 1);
        assert_eq!(count(["/healthz", "GET", "200"]), 1);
        assert_eq!(count(["unmatched", "GET", "404"]), 1);
    }

    #[tokio::test]
    async fn snapshot_and_lookups() {
        let model = ready_model();
        let (status, body) = get(&model, "/api/snapshot").await;
        assert_eq!(status, 200);
        assert_eq!(body["epoch"], 0);
        assert_eq!(body["counts"]["couriers"], 1);
        assert_eq!(body["counts"]["active_deliveries"], 1);

        let (status, body) = get(&model, &format!("/api/couriers/{COURIER}")).await;
        assert_eq!(status, 200);
        assert_eq!(body["active_deliveries"][0], DELIVERY.to_string());
        assert!((body["position"]["lat"].as_f64().unwrap() - 52.52).abs() < 1e-6);

        let (status, body) = get(&model, &format!("/api/deliveries/{DELIVERY}")).await;
        assert_eq!((status, body["status"].as_str()), (200, Some("assigned")));
    }

    #[tokio::test]
    async fn errors_are_json_with_stable_codes() {
        let model = ready_model();
        let (status, body) = get(&model, "/api/couriers/not-a-uuid").await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("invalid_id"))
        );
        let (status, body) = get(&model, "/api/deliveries/42").await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("invalid_id"))
        );
        let unknown = Uuid::from_u128(99);
        let (status, body) = get(&model, &format!("/api/deliveries/{unknown}")).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (404, Some("not_found"))
        );
        let (status, body) = get(&model, "/nowhere").await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (404, Some("route_not_found"))
        );
        assert!(body["error"]["message"].is_string());
        // A plain GET of a WebSocket route is refused in the same shape.
        let (status, body) = get(&model, "/ws/changes").await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("websocket_required"))
        );
    }

    #[tokio::test]
    async fn the_map_page_is_self_contained() {
        let (status, body) = get(&ReadModel::default(), "/").await;
        assert_eq!(status, 200);
        let page = body.as_str().unwrap();
        assert!(page.contains("/ws/changes") && page.contains("/api/snapshot"));
        assert!(!page.contains("<script src"), "no external scripts");
    }

    #[tokio::test]
    async fn metrics_can_leave_the_api_address() {
        let state =
            AppState::new(ReadModel::default(), CancellationToken::new()).with_config(ApiConfig {
                metrics_on_api: false,
                ..ApiConfig::default()
            });
        let (status, body) = get_with(state, "/metrics").await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (404, Some("route_not_found"))
        );
    }
}
