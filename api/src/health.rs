//! `GET /healthz` (the process is up) and `GET /readyz` (results are being served).

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use delivertrack_dataflow::Epoch;
use serde::Serialize;

use crate::error::ApiError;
use crate::readiness::SourceStatus;
use crate::state::AppState;

/// The routes of this module.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
}

#[derive(Serialize)]
struct Ready {
    status: &'static str,
    /// The last epoch applied; `null` while nothing has arrived yet.
    epoch: Option<Epoch>,
}

/// Always `200 {"status": "ok"}` while the server answers.
async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// `200 {"status": "ready", "epoch": N}` while the source is connected (`epoch` is the last
/// one applied, `null` before any input arrived: an idle pipeline on an empty queue is
/// ready); `503 source_unavailable` with the reason while it is not. A pipeline that lost
/// RabbitMQ still holds results, but they are going stale, and a load balancer should know.
async fn readyz(State(state): State<AppState>) -> Result<Json<Ready>, ApiError> {
    if let SourceStatus::Unavailable { reason } = state.readiness.source_status() {
        return Err(ApiError::SourceUnavailable { reason });
    }
    Ok(Json(Ready {
        status: "ready",
        epoch: state.read_model.epoch(),
    }))
}
