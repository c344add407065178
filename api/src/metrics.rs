//! `GET /metrics`: every metric registered in the state's Prometheus registry, in the text
//! exposition format.
//!
//! The API does not own the metrics: the source, the driver and later the sinks register
//! theirs in the one [`prometheus::Registry`] the binary puts in [`AppState`], and this
//! route only renders it, so a new metric needs no change here.
//!
//! The API's own metrics are the fields of [`ApiMetrics`], which [`AppState`] holds and
//! registers in its registry.

use axum::Router;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use prometheus::{Encoder, HistogramOpts, HistogramVec, IntGauge, Registry, TextEncoder};

use crate::error::ApiError;
use crate::state::AppState;

/// The routes of this module.
pub fn router() -> Router<AppState> {
    Router::new().route("/metrics", get(metrics))
}

/// Serves `GET /metrics` alone on `listener` (`--metrics-listen`: an address of its own,
/// which can be kept off the network the API faces) until `state.shutdown` fires; every
/// other path is `404 route_not_found`. Set [`ApiConfig::metrics_on_api`] to `false` so
/// that the API's address does not serve it too.
///
/// [`ApiConfig::metrics_on_api`]: crate::ApiConfig::metrics_on_api
///
/// # Errors
/// The I/O error that stopped the server.
pub async fn serve(listener: tokio::net::TcpListener, state: AppState) -> std::io::Result<()> {
    let shutdown = state.shutdown.clone();
    let config = state.config.clone();
    let app = router()
        .fallback(|| async { ApiError::RouteNotFound })
        .with_state(state);
    crate::server::serve_router(listener, app, config, shutdown).await
}

/// `200` with the text format (`text/plain; version=0.0.4`).
#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "metrics",
    tag = "health",
    summary = "Prometheus metrics",
    description = "Every metric of the process's registry (source, driver, sinks, API), in the \
        Prometheus text exposition format.",
    responses((status = 200, description = "The metrics.", body = String,
        content_type = "text/plain; version=0.0.4"))
)]
async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let encoder = TextEncoder::new();
    let mut body = Vec::new();
    encoder
        .encode(&state.registry.gather(), &mut body)
        .map_err(|error| ApiError::Internal(Box::new(error)))?;
    Ok(([(CONTENT_TYPE, encoder.format_type().to_owned())], body).into_response())
}

/// The API's own metrics. A plain struct of metric handles (cheap clones of shared
/// counters): add a field here, create it in [`ApiMetrics::new`] and list it in
/// [`ApiMetrics::register`].
#[derive(Clone, Debug)]
pub struct ApiMetrics {
    /// `delivertrack_websocket_connections`: open WebSocket sessions, `/ws/changes` and
    /// `/ws/track/{id}` together.
    pub websocket_connections: IntGauge,
    /// `delivertrack_http_request_duration_seconds{route, method, status}`: every answered
    /// request, by its route pattern (`/deliveries/{id}`, never the id itself, so the
    /// series stay few; `unmatched` for what no route serves).
    pub http_request_duration: HistogramVec,
}

impl ApiMetrics {
    /// Fresh metrics, all zero, registered nowhere yet.
    #[allow(clippy::expect_used)]
    pub fn new() -> Self {
        Self {
            // The name and help are constants that the metric accepts: this cannot fail.
            websocket_connections: IntGauge::new(
                "delivertrack_websocket_connections",
                "Open WebSocket sessions (/ws/changes and /ws/track).",
            )
            .expect("a valid metric name"),
            http_request_duration: HistogramVec::new(
                HistogramOpts::new(
                    "delivertrack_http_request_duration_seconds",
                    "Time to answer an HTTP request, by route pattern, method and status.",
                )
                .buckets(vec![
                    0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                    1.0, 2.5, 5.0, 10.0,
                ]),
                &["route", "method", "status"],
            )
            .expect("a valid metric name"),
        }
    }

    /// Registers every metric in `registry`.
    ///
    /// # Errors
    /// The registry refused one (a metric of the same name is there already).
    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.websocket_connections.clone()))?;
        registry.register(Box::new(self.http_request_duration.clone()))
    }

    /// Counts one open WebSocket session until the returned guard is dropped, so that a
    /// session ending any way (close, error, panic, abort) is uncounted.
    pub fn websocket_session(&self) -> WebSocketSession {
        self.websocket_connections.inc();
        WebSocketSession {
            gauge: self.websocket_connections.clone(),
        }
    }
}

impl Default for ApiMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// One open WebSocket session, counted in `delivertrack_websocket_connections` while it
/// lives.
#[derive(Debug)]
pub struct WebSocketSession {
    gauge: IntGauge,
}

impl Drop for WebSocketSession {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Middleware timing every request into
/// [`http_request_duration`](ApiMetrics::http_request_duration). A WebSocket session is
/// timed until its upgrade is answered, not for its whole life.
pub async fn track_requests(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let method = request.method().as_str().to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    state
        .metrics
        .http_request_duration
        .with_label_values(&[route.as_str(), method.as_str(), response.status().as_str()])
        .observe(started.elapsed().as_secs_f64());
    response
}
