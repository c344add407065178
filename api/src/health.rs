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
    epoch: Epoch,
}

/// Always `200 {"status": "ok"}` while the server answers.
async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// `200 {"status": "ready", "epoch": N}` while the source is connected and once the first
/// epoch was applied; `503 source_unavailable` (with the reason) while the source is not
/// connected, `503 not_ready` before the first epoch. The source is asked first: a pipeline
/// that lost RabbitMQ still holds results, but they are going stale, and a load balancer
/// should know.
async fn readyz(State(state): State<AppState>) -> Result<Json<Ready>, ApiError> {
    if let SourceStatus::Unavailable { reason } = state.readiness.source_status() {
        return Err(ApiError::SourceUnavailable { reason });
    }
    let epoch = state.read_model.epoch().ok_or(ApiError::NotReady)?;
    Ok(Json(Ready {
        status: "ready",
        epoch,
    }))
}
