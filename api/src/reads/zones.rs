//! `GET /zones` and `GET /zones/{id}`: the live zones (geofences), for admins.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use delivertrack_dataflow::ZoneId;
use delivertrack_sinks::read_model::ZoneView;
use serde::Serialize;

use super::access::require_admin;
use crate::auth::Principal;
use crate::error::{ApiError, ErrorBody};
use crate::id;
use crate::state::AppState;

/// The routes of this module.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/zones", get(list))
        .route("/zones/{id}", get(one))
}

/// Every live zone.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct Zones {
    /// By zone id.
    #[schema(value_type = Vec<crate::openapi::schemas::ZoneView>)]
    zones: Vec<ZoneView>,
}

/// `200` with every live zone, by id; `401`; `403` for customers and couriers.
#[utoipa::path(
    get,
    path = "/zones",
    operation_id = "listZones",
    tag = "zones",
    summary = "Every live zone",
    security(("bearer_jwt" = []), ("access_token" = [])),
    responses(
        (status = 200, description = "The zones, by id.", body = Zones),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, description = "`forbidden`: admins only.", body = ErrorBody),
    )
)]
async fn list(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Json<Zones>, ApiError> {
    require_admin(&principal)?;
    let zones = state.read_model.with_state(|read| {
        read.zones
            .iter()
            .map(|(id, zone)| ZoneView::new(*id, zone))
            .collect()
    });
    Ok(Json(Zones { zones }))
}

/// `200` with the [`ZoneView`]; `400 invalid_id`; `401`; `403` for customers and couriers;
/// `404 not_found` when no live zone has this id (a deleted one included).
#[utoipa::path(
    get,
    path = "/zones/{id}",
    operation_id = "getZone",
    tag = "zones",
    summary = "One zone",
    security(("bearer_jwt" = []), ("access_token" = [])),
    params(("id" = Uuid, Path, description = "The zone.")),
    responses(
        (status = 200, description = "The zone.", body = crate::openapi::schemas::ZoneView),
        (status = 400, description = "`invalid_id`: the id is not a UUID.", body = ErrorBody),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, description = "`forbidden`: admins only.", body = ErrorBody),
        (status = 404, description = "`not_found`: no live zone has this id (a deleted one included).", body = ErrorBody),
    )
)]
async fn one(
    State(state): State<AppState>,
    principal: Principal,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<ZoneView>, ApiError> {
    require_admin(&principal)?;
    let id: ZoneId = id::parse("zone", path)?;
    state
        .read_model
        .with_state(|read| read.zones.get(&id).map(|zone| ZoneView::new(id, zone)))
        .map(Json)
        .ok_or_else(|| ApiError::NotFound {
            resource: "zone",
            id: id.to_string(),
        })
}
