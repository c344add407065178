//! `POST /locations`: a courier's GPS fix.
//!
//! The courier is the token's `sub`: a courier reports only their own position (a body
//! naming another `courier_id` is `403`). An admin may report for any courier and must name
//! it with `courier_id` (an operator's correction, a device relayed by a back office). A
//! customer may not (`403`).

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use delivertrack_dataflow::{CourierId, EventBody, EventKind};
use serde::Deserialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::build;
use super::settle::{Applied, Pending, publish, settle};
use crate::auth::{Principal, Role};
use crate::error::{ApiError, ApiJson, ErrorBody};
use crate::openapi::schemas::CourierWritten;
use crate::rate_limit::Limit;
use crate::state::AppState;

/// The routes of this module.
pub fn router() -> Router<AppState> {
    Router::new().route("/locations", post(report))
}

/// The body of `POST /locations`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Report {
    /// Latitude, degrees (-90 to 90).
    #[schema(minimum = -90, maximum = 90)]
    lat: f64,
    /// Longitude, degrees (-180 to 180).
    #[schema(minimum = -180, maximum = 180)]
    lon: f64,
    /// When the fix was taken (RFC 3339); now when absent.
    #[serde(default)]
    #[schema(format = DateTime)]
    occurred_at: Option<String>,
    /// Speed, m/s (0 to 150).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 150)]
    speed_mps: Option<f64>,
    /// Heading, degrees clockwise from north (0 inclusive to 360 exclusive).
    #[serde(default)]
    #[schema(minimum = 0, exclusive_maximum = 360)]
    heading_deg: Option<f64>,
    /// Accuracy of the fix, metres (0 to 100 000).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 100000)]
    accuracy_m: Option<f64>,
    /// Required of an admin; a courier may only name themselves.
    #[serde(default)]
    #[schema(format = Uuid)]
    courier_id: Option<String>,
}

fn location(id: CourierId) -> String {
    format!("/api/couriers/{id}")
}

/// `201` with the courier (position, zones, aggregates, active deliveries) once the read
/// model holds this fix or a newer one; `202` if not within the bound (also when the fix is
/// older than what the courier already reported: it is kept as history, but never becomes
/// the current position).
#[utoipa::path(
    post,
    path = "/locations",
    operation_id = "reportLocation",
    tag = "commands",
    summary = "Report a courier's GPS fix",
    description = "Couriers report their own position (the token's `sub`); admins report for \
        any courier and name it with `courier_id`; customers may not. Counted against the \
        courier's `location_update` limit (1 per second by default). A fix older than the \
        courier's current one is kept as history and answered `202`.",
    security(("bearer_jwt" = []), ("access_token" = [])),
    request_body = Report,
    responses(
        (status = 201, description = "Applied: the courier (position, zones, aggregates, active deliveries).",
            body = CourierWritten, headers(("Location" = String, description = "`/api/couriers/{id}`"))),
        (status = 202, description = "Published and confirmed, not the current position within \
            the bound (not applied yet, or older than the courier's newest fix).",
            body = Pending, headers(("Location" = String, description = "`/api/couriers/{id}`"))),
        (status = 400, description = "`invalid_coordinates`, `value_out_of_range`, \
            `timestamp_in_future`, `invalid_value`, `missing_field` (an admin without \
            `courier_id`), `malformed_json`, `unknown_field`, ...", body = ErrorBody),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, description = "`forbidden`: a customer, or a courier naming another courier.", body = ErrorBody),
        (status = 413, response = crate::openapi::PayloadTooLarge),
        (status = 415, response = crate::openapi::UnsupportedMediaType),
        (status = 429, description = "`rate_limited`: the courier's `location_update` limit, or \
            the API key's; retry after `Retry-After` seconds.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until a retry would pass."))),
        (status = 503, description = "`commands_unavailable`: the event could not be published; nothing was accepted.", body = ErrorBody),
    )
)]
async fn report(
    State(state): State<AppState>,
    principal: Principal,
    body: Result<ApiJson<Report>, ApiError>,
) -> Result<Response, ApiError> {
    if principal.role == Role::Customer {
        return Err(ApiError::Forbidden {
            reason: "only couriers report locations".into(),
        });
    }
    let ApiJson(body) = body?;
    let courier = match (principal.role, body.courier_id) {
        (_, Some(courier)) => Value::from(courier),
        (Role::Admin, None) => {
            return Err(ApiError::BadRequest {
                code: "missing_field",
                message: "missing field `courier_id`: an admin names the courier".into(),
            });
        }
        (_, None) => Value::from(principal.sub.to_string()),
    };
    let mut fields = Map::new();
    fields.insert("courier_id".into(), courier);
    fields.insert("lat".into(), Value::from(body.lat));
    fields.insert("lon".into(), Value::from(body.lon));
    for (name, value) in [
        ("speed_mps", body.speed_mps),
        ("heading_deg", body.heading_deg),
        ("accuracy_m", body.accuracy_m),
    ] {
        if let Some(value) = value {
            fields.insert(name.into(), Value::from(value));
        }
    }
    let event = build::event(
        EventKind::LocationUpdated,
        body.occurred_at,
        fields,
        &state.config.contract,
    )?;
    let EventBody::LocationUpdated(fix) = &event.body else {
        return Err(ApiError::Internal(
            "a location.updated command decoded as another kind".into(),
        ));
    };
    let id = fix.courier_id;
    if principal.role == Role::Courier && id.0 != principal.sub {
        return Err(ApiError::Forbidden {
            reason: "a courier reports only their own location".into(),
        });
    }
    // Counted only for a fix that would be published: a refused one costs no quota.
    state
        .limiter
        .check(Limit::LocationUpdate, &id.to_string())
        .await?;
    publish(&state, &event).await?;
    let (event_id, at) = (event.event_id, event.occurred_at);
    // `Some(Some(view))`: this fix is the courier's current one; `Some(None)`: a newer fix
    // is, so this one never will be; `None`: not applied yet.
    let settled = settle(&state, |s| {
        let current = s.couriers.get(&id)?;
        if current.event_id == event_id {
            Some(s.courier(id))
        } else if current.at > at {
            Some(None)
        } else {
            None
        }
    })
    .await;
    Ok(match settled {
        Some(Some(view)) => {
            Applied::new(StatusCode::CREATED, id.0, &event, location(id), view).into_response()
        }
        Some(None) => {
            let mut pending = Pending::new(id.0, &event, location(id), state.config.command_wait);
            pending.message =
                "the fix is published and kept as history, but the courier has reported a newer one"
                    .into();
            pending.into_response()
        }
        None => Pending::new(id.0, &event, location(id), state.config.command_wait).into_response(),
    })
}
