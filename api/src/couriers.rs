//! `GET /api/couriers/{id}`: one courier's position, zones, aggregates and deliveries.
//! Admins only (the read model's view, for the operations map and dashboards).

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use delivertrack_dataflow::CourierId;
use delivertrack_sinks::read_model::CourierDetail;

use crate::auth::Principal;
use crate::error::{ApiError, ErrorBody};
use crate::id;
use crate::reads::access::require_admin;
use crate::state::AppState;

/// The routes of this module.
pub fn router() -> Router<AppState> {
    Router::new().route("/api/couriers/{id}", get(courier))
}

/// `200` with the [`CourierDetail`]; `400 invalid_id`; `404 not_found`.
#[utoipa::path(
    get,
    path = "/api/couriers/{id}",
    operation_id = "getReadModelCourier",
    tag = "read model",
    summary = "One courier from the read model",
    description = "Position, zones, aggregates and active deliveries, as the read model holds them. Admins only.",
    security(("bearer_jwt" = [])),
    params(("id" = Uuid, Path, description = "The courier.")),
    responses(
        (status = 200, description = "The courier.", body = crate::openapi::schemas::CourierDetail),
        (status = 400, description = "`invalid_id`: the id is not a UUID.", body = ErrorBody),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, description = "`forbidden`: not an admin.", body = ErrorBody),
        (status = 404, description = "`not_found`: the read model has no fix of this courier.", body = ErrorBody),
    )
)]
async fn courier(
    State(state): State<AppState>,
    principal: Principal,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<CourierDetail>, ApiError> {
    require_admin(&principal)?;
    let id: CourierId = id::parse("courier", path)?;
    state
        .read_model
        .courier(id)
        .map(Json)
        .ok_or_else(|| ApiError::NotFound {
            resource: "courier",
            id: id.to_string(),
        })
}
