//! `GET /api/deliveries/{id}`: one delivery's state, ETA and dropoff zones. Admins only:
//! customers and couriers read their own through `GET /deliveries/{id}`.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use delivertrack_dataflow::DeliveryId;
use delivertrack_sinks::read_model::DeliveryView;

use crate::auth::Principal;
use crate::error::{ApiError, ErrorBody};
use crate::id;
use crate::reads::access::require_admin;
use crate::state::AppState;

/// The routes of this module.
pub fn router() -> Router<AppState> {
    Router::new().route("/api/deliveries/{id}", get(delivery))
}

/// `200` with the [`DeliveryView`]; `400 invalid_id`; `404 not_found`.
#[utoipa::path(
    get,
    path = "/api/deliveries/{id}",
    operation_id = "getReadModelDelivery",
    tag = "read model",
    summary = "One delivery from the read model",
    description = "Its state, ETA and dropoff zones, as the read model holds them (no \
        PostgreSQL fallback, the dashboard's view). Admins only: customers and couriers read theirs through \
        `GET /deliveries/{id}`.",
    security(("bearer_jwt" = [])),
    params(("id" = Uuid, Path, description = "The delivery.")),
    responses(
        (status = 200, description = "The delivery.", body = crate::openapi::schemas::DeliveryView),
        (status = 400, description = "`invalid_id`: the id is not a UUID.", body = ErrorBody),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, description = "`forbidden`: not an admin.", body = ErrorBody),
        (status = 404, description = "`not_found`: the read model holds no such delivery.", body = ErrorBody),
    )
)]
async fn delivery(
    State(state): State<AppState>,
    principal: Principal,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<DeliveryView>, ApiError> {
    require_admin(&principal)?;
    let id: DeliveryId = id::parse("delivery", path)?;
    state
        .read_model
        .delivery(id)
        .map(Json)
        .ok_or_else(|| ApiError::NotFound {
            resource: "delivery",
            id: id.to_string(),
        })
}
