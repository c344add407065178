//! `GET /api/couriers/{id}`: one courier's position, zones, aggregates and deliveries.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use delivertrack_dataflow::CourierId;
use delivertrack_sinks::read_model::CourierDetail;

use crate::error::ApiError;
use crate::id;
use crate::state::AppState;

/// The routes of this module.
pub fn router() -> Router<AppState> {
    Router::new().route("/api/couriers/{id}", get(courier))
}

/// `200` with the [`CourierDetail`]; `400 invalid_id`; `404 not_found`.
async fn courier(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<CourierDetail>, ApiError> {
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
