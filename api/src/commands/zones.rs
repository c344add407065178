//! `PUT /zones/{id}` and `DELETE /zones/{id}`: delivery zones (geofences), admin only.
//!
//! `PUT` creates or replaces a zone (`zone.upserted`): its `name`, its `geometry` as a
//! GeoJSON Polygon or MultiPolygon (`[lon, lat]` positions, closed rings, a valid simple
//! feature) and its `dwell_seconds` (how long a courier must stay inside before counting as
//! inside; 0 when absent). `DELETE` removes one the read model holds (`zone.deleted`).

use axum::Router;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::put;
use delivertrack_dataflow::{EventKind, ZoneId};
use delivertrack_sinks::read_model::ZoneView;
use serde::Deserialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::build;
use super::settle::{Applied, Pending, publish, settle};
use crate::auth::Principal;
use crate::error::{ApiError, ApiJson, ErrorBody};
use crate::id;
use crate::openapi::schemas::ZoneWritten;
use crate::state::AppState;

/// The routes of this module.
pub fn router() -> Router<AppState> {
    Router::new().route("/zones/{id}", put(upsert).delete(delete))
}

/// The body of `PUT /zones/{id}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpsertZone {
    /// Display name: at most 200 characters, not blank, no control character.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*[^\\u0000-\\u0020\\u007F-\\u00A0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000\\uFEFF][^\\u0000-\\u001F\\u007F-\\u009F]*$"
    )]
    name: String,
    /// GeoJSON Polygon or MultiPolygon (`[lon, lat]` positions, closed rings, a valid simple
    /// feature); the contract validates it.
    #[schema(value_type = Object, example = json!({"type": "Polygon", "coordinates": [[[13.38, 52.51], [13.42, 52.51], [13.42, 52.53], [13.38, 52.53], [13.38, 52.51]]]}))]
    geometry: Value,
    /// How long a courier must stay inside before counting as inside, seconds; 0 when absent.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 86400)]
    dwell_seconds: Option<f64>,
}

fn location(id: ZoneId) -> String {
    format!("/zones/{id}")
}

fn admin_only(principal: &Principal) -> Result<(), ApiError> {
    if principal.is_admin() {
        Ok(())
    } else {
        Err(ApiError::Forbidden {
            reason: "only an admin may change zones".into(),
        })
    }
}

/// `201` (a new zone) or `200` (a replaced one) with the zone once the read model holds
/// this version; `202` if not within the bound, or when a newer version is already held.
#[utoipa::path(
    put,
    path = "/zones/{id}",
    operation_id = "upsertZone",
    tag = "commands",
    summary = "Create or replace a zone",
    description = "Admins only. The zone's name, GeoJSON geometry and dwell time.",
    security(("bearer_jwt" = []), ("access_token" = [])),
    params(("id" = Uuid, Path, description = "The zone.")),
    request_body = UpsertZone,
    responses(
        (status = 200, description = "Replaced and applied: the zone.",
            body = ZoneWritten, headers(("Location" = String, description = "`/zones/{id}`"))),
        (status = 201, description = "Created and applied: the zone.",
            body = ZoneWritten, headers(("Location" = String, description = "`/zones/{id}`"))),
        (status = 202, description = "Published and confirmed, not applied within the bound (or \
            a newer version of the zone is already held).",
            body = Pending, headers(("Location" = String, description = "`/zones/{id}`"))),
        (status = 400, description = "`invalid_id`, `invalid_geometry`, `value_out_of_range`, \
            `string_too_long`, `malformed_json`, `unknown_field`, ...", body = ErrorBody),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, description = "`forbidden`: only an admin may change zones.", body = ErrorBody),
        (status = 413, response = crate::openapi::PayloadTooLarge),
        (status = 415, response = crate::openapi::UnsupportedMediaType),
        (status = 503, description = "`commands_unavailable`: the event could not be published; nothing was accepted.", body = ErrorBody),
    )
)]
async fn upsert(
    State(state): State<AppState>,
    principal: Principal,
    path: Result<Path<String>, PathRejection>,
    body: Result<ApiJson<UpsertZone>, ApiError>,
) -> Result<Response, ApiError> {
    let id: ZoneId = id::parse("zone", path)?;
    admin_only(&principal)?;
    let ApiJson(body) = body?;
    let mut fields = Map::new();
    fields.insert("zone_id".into(), Value::from(id.to_string()));
    fields.insert("name".into(), Value::from(body.name));
    fields.insert("geometry".into(), body.geometry);
    if let Some(dwell) = body.dwell_seconds {
        fields.insert("dwell_seconds".into(), Value::from(dwell));
    }
    let event = build::event(
        EventKind::ZoneUpserted,
        None,
        fields,
        &state.config.contract,
    )?;
    let existed = state.read_model.with_state(|s| s.zones.contains_key(&id));
    publish(&state, &event).await?;
    let (event_id, at) = (event.event_id, event.occurred_at);
    let settled = settle(&state, |s| {
        let zone = s.zones.get(&id)?;
        if zone.event_id == event_id {
            Some(Some(ZoneView::new(id, zone)))
        } else if zone.updated_at > at {
            Some(None)
        } else {
            None
        }
    })
    .await;
    Ok(match settled {
        Some(Some(view)) => Applied::new(
            if existed {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            },
            id.0,
            &event,
            location(id),
            view,
        )
        .into_response(),
        Some(None) => {
            let mut pending = Pending::new(id.0, &event, location(id), state.config.command_wait);
            pending.message =
                "the zone is published, but a newer version of it is already held".into();
            pending.into_response()
        }
        None => Pending::new(id.0, &event, location(id), state.config.command_wait).into_response(),
    })
}

/// `204` once the read model no longer holds the zone; `404` when it holds no such zone;
/// `202` if not within the bound.
#[utoipa::path(
    delete,
    path = "/zones/{id}",
    operation_id = "deleteZone",
    tag = "commands",
    summary = "Delete a zone",
    description = "Admins only; the zone must be one the read model holds.",
    security(("bearer_jwt" = []), ("access_token" = [])),
    params(("id" = Uuid, Path, description = "The zone.")),
    responses(
        (status = 204, description = "Deleted and applied."),
        (status = 202, description = "Published and confirmed, not applied within the bound (or \
            a newer version of the zone is already held).",
            body = Pending, headers(("Location" = String, description = "`/zones/{id}`"))),
        (status = 400, description = "`invalid_id`: the id is not a UUID.", body = ErrorBody),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, description = "`forbidden`: only an admin may change zones.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such zone.", body = ErrorBody),
        (status = 503, description = "`commands_unavailable`: the event could not be published; nothing was accepted.", body = ErrorBody),
    )
)]
async fn delete(
    State(state): State<AppState>,
    principal: Principal,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id: ZoneId = id::parse("zone", path)?;
    admin_only(&principal)?;
    if !state.read_model.with_state(|s| s.zones.contains_key(&id)) {
        return Err(ApiError::NotFound {
            resource: "zone",
            id: id.to_string(),
        });
    }
    let mut fields = Map::new();
    fields.insert("zone_id".into(), Value::from(id.to_string()));
    let event = build::event(EventKind::ZoneDeleted, None, fields, &state.config.contract)?;
    publish(&state, &event).await?;
    let at = event.occurred_at;
    let settled = settle(&state, |s| match s.zones.get(&id) {
        None => Some(true),
        Some(zone) if zone.updated_at > at => Some(false),
        Some(_) => None,
    })
    .await;
    Ok(match settled {
        Some(true) => StatusCode::NO_CONTENT.into_response(),
        Some(false) => {
            let mut pending = Pending::new(id.0, &event, location(id), state.config.command_wait);
            pending.message =
                "the deletion is published, but a newer version of the zone is already held".into();
            pending.into_response()
        }
        None => Pending::new(id.0, &event, location(id), state.config.command_wait).into_response(),
    })
}
