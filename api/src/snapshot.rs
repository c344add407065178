//! `GET /api/snapshot`: the current aggregates, counts, courier positions and zones.
//! Admins only: it holds every courier's position and per-courier metrics.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use delivertrack_sinks::read_model::Snapshot;

use crate::auth::Principal;
use crate::error::{ApiError, ErrorBody};
use crate::reads::access::require_admin;
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
        first message of `/ws/changes`. Admins only.",
    security(("bearer_jwt" = [])),
    responses(
        (status = 200, description = "The snapshot.", body = crate::openapi::schemas::Snapshot),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, description = "`forbidden`: not an admin.", body = ErrorBody),
    )
)]
async fn snapshot(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Json<Snapshot>, ApiError> {
    require_admin(&principal)?;
    Ok(Json(state.read_model.snapshot()))
}
