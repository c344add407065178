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

use super::build;
use super::settle::{Applied, Pending, Written, publish, settle};
use crate::auth::Principal;
use crate::error::{ApiError, ApiJson};
use crate::id;
use crate::state::AppState;

/// The routes of this module.
pub fn router() -> Router<AppState> {
    Router::new().route("/zones/{id}", put(upsert).delete(delete))
}

/// The body of `PUT /zones/{id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpsertZone {
    name: String,
    /// GeoJSON Polygon or MultiPolygon; the contract validates it.
    geometry: Value,
    #[serde(default)]
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
    let event = build::event(EventKind::ZoneUpserted, None, fields)?;
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
        Some(Some(view)) => Applied {
            status: if existed {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            },
            location: location(id),
            body: Written {
                id: id.0,
                event_id,
                view,
            },
        }
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
    let event = build::event(EventKind::ZoneDeleted, None, fields)?;
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
