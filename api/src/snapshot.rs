//! `GET /api/snapshot`: the current aggregates, counts, courier positions and zones.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use delivertrack_sinks::read_model::Snapshot;

use crate::state::AppState;

/// The routes of this module.
pub fn router() -> Router<AppState> {
    Router::new().route("/api/snapshot", get(snapshot))
}

/// The [`Snapshot`] as of the last applied epoch (`"epoch": null` before the first).
#[utoipa::path(
    get,
    path = "/api/snapshot",
    operation_id = "getSnapshot",
    tag = "read model",
    summary = "The current aggregates, counts, courier positions and zones",
    description = "As of the last applied epoch (`\"epoch\": null` before the first). Also the \
        first message of `/ws/changes`.",
    responses((status = 200, description = "The snapshot.", body = crate::openapi::schemas::Snapshot))
)]
async fn snapshot(State(state): State<AppState>) -> Json<Snapshot> {
    Json(state.read_model.snapshot())
}
