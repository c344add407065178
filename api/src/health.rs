//! `GET /healthz` (the process is up) and `GET /readyz` (results are being served).

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use delivertrack_dataflow::Epoch;
use serde::Serialize;

use crate::error::{ApiError, ErrorBody};
use crate::readiness::SourceStatus;
use crate::state::AppState;

/// The routes of this module.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

/// The answer of `/healthz`.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct Health {
    /// Always `ok`.
    #[schema(value_type = String, example = "ok")]
    status: &'static str,
}

/// The answer of `/readyz` while ready.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct Ready {
    /// Always `ready`.
    #[schema(value_type = String, example = "ready")]
    status: &'static str,
    /// The last epoch applied; `null` while nothing has arrived yet.
    #[schema(value_type = Option<u64>)]
    epoch: Option<Epoch>,
}

/// Always `200 {"status": "ok"}` while the server answers.
#[utoipa::path(
    get,
    path = "/healthz",
    operation_id = "healthz",
    tag = "health",
    summary = "Liveness",
    description = "Always `200 {\"status\": \"ok\"}` while the server answers.",
    responses((status = 200, description = "The process is up.", body = Health))
)]
async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// `200 {"status": "ready", "epoch": N}` while the source is connected (`epoch` is the last
/// one applied, `null` before any input arrived: an idle pipeline on an empty queue is
/// ready); `503 source_unavailable` with the reason while it is not. A pipeline that lost
/// RabbitMQ still holds results, but they are going stale, and a load balancer should know.
#[utoipa::path(
    get,
    path = "/readyz",
    operation_id = "readyz",
    tag = "health",
    summary = "Readiness",
    description = "Ready while the pipeline's source is connected. `epoch` is the last epoch \
        applied, `null` before any input arrived (an idle pipeline on an empty queue is ready).",
    responses(
        (status = 200, description = "The source is connected.", body = Ready),
        (status = 503, description = "`source_unavailable`: the source (RabbitMQ) cannot deliver \
            input now; the message says why. Results are still served, but going stale.",
            body = ErrorBody),
    )
)]
async fn readyz(State(state): State<AppState>) -> Result<Json<Ready>, ApiError> {
    if let SourceStatus::Unavailable { reason } = state.readiness.source_status() {
        return Err(ApiError::SourceUnavailable { reason });
    }
    Ok(Json(Ready {
        status: "ready",
        epoch: state.read_model.epoch(),
    }))
}
