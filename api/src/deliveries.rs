//! `GET /api/deliveries/{id}`: one delivery's state, ETA and dropoff zones.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use delivertrack_dataflow::DeliveryId;
use delivertrack_sinks::read_model::DeliveryView;

use crate::error::ApiError;
use crate::id;
use crate::state::AppState;

/// The routes of this module.
pub fn router() -> Router<AppState> {
    Router::new().route("/api/deliveries/{id}", get(delivery))
}

/// `200` with the [`DeliveryView`]; `400 invalid_id`; `404 not_found`.
async fn delivery(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<DeliveryView>, ApiError> {
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
