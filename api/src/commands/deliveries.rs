//! `POST /deliveries`, `PUT /deliveries/{id}/status`, `POST /deliveries/{id}/rating`.
//!
//! Who may do what (the token's `sub` is the customer's or courier's id):
//!
//! | route | customer | courier | admin |
//! |---|---|---|---|
//! | `POST /deliveries` | for themselves (`customer_id` absent or their own) | `403` | for any `customer_id` (required) |
//! | `PUT /deliveries/{id}/status` | `cancelled`, on their own deliveries | `picked_up`, `in_transit`, `delivered`, `failed`, on deliveries assigned to them | any legal step |
//! | `POST /deliveries/{id}/rating` | their own deliveries | `403` | any delivery |
//!
//! A customer asking about someone else's delivery gets `404`, as if it did not exist; a
//! courier acting on a delivery not assigned to them gets `403`. Assigning is an
//! operator's decision (admin); cancelling is the customer's or an operator's. The status
//! is checked against the read model with [`Status::can_become`] before publishing:
//! `409 illegal_transition`; a rating needs a delivered or failed delivery:
//! `409 not_rateable`. How often a delivery was rated is known only to the pipeline: a
//! rating beyond the fifth is published, refused by the dataflow, and answered
//! `409 too_many_ratings` once the read model reports the refusal.

use axum::Router;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{post, put};
use delivertrack_dataflow::{DeliveryId, Event, EventBody, EventKind, Status};
use delivertrack_sinks::read_model::DeliveryView;
use serde::Deserialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::build::{self, point};
use super::settle::{Applied, Pending, publish, settle};
use crate::auth::{Principal, Role};
use crate::error::{ApiError, ApiJson, ErrorBody};
use crate::id;
use crate::openapi::schemas::DeliveryWritten;
use crate::rate_limit::Limit;
use crate::state::AppState;

/// The routes of this module.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/deliveries", post(create))
        .route("/deliveries/{id}/status", put(change_status))
        .route("/deliveries/{id}/rating", post(rate))
}

/// A position in a request body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Position {
    /// Latitude, degrees (-90 to 90).
    #[schema(minimum = -90, maximum = 90)]
    lat: f64,
    /// Longitude, degrees (-180 to 180).
    #[schema(minimum = -180, maximum = 180)]
    lon: f64,
}

/// The body of `POST /deliveries`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateDelivery {
    /// Collection point.
    pickup: Position,
    /// Destination.
    dropoff: Position,
    /// The promised delivery time, RFC 3339.
    #[serde(default)]
    #[schema(format = DateTime)]
    promised_by: Option<String>,
    /// Whose delivery: required of an admin; a customer may only name themselves.
    #[serde(default)]
    #[schema(format = Uuid)]
    customer_id: Option<String>,
}

/// The body of `PUT /deliveries/{id}/status`, as the document gives it: one of two shapes,
/// since `courier_id` goes with `assigned` and with nothing else (schema only; the handler
/// reads [`ChangeStatus`] and answers the codes of its own checks).
#[derive(serde::Serialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub(crate) enum ChangeStatusBody {
    /// Assign the delivery to a courier.
    Assign(AssignCourier),
    /// Any other step.
    Step(NextStep),
}

/// `{"status": "assigned", "courier_id": ...}`.
#[derive(serde::Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub(crate) struct AssignCourier {
    /// `assigned`.
    #[schema(value_type = String, pattern = "^assigned$", example = "assigned")]
    status: String,
    /// The courier.
    #[schema(value_type = uuid::Uuid)]
    courier_id: String,
}

/// `{"status": ...}` for every status but `assigned`.
#[derive(serde::Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub(crate) struct NextStep {
    /// The new status.
    status: NextStatus,
}

/// The statuses set without a courier.
#[derive(serde::Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
pub(crate) enum NextStatus {
    /// Picked up at the pickup point.
    PickedUp,
    /// On the way.
    InTransit,
    /// Handed over.
    Delivered,
    /// Could not be delivered.
    Failed,
    /// Called off.
    Cancelled,
}

/// The body of `PUT /deliveries/{id}/status` as the handler reads it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ChangeStatus {
    /// The new status.
    status: String,
    /// The courier: given exactly with `assigned`.
    #[serde(default)]
    courier_id: Option<String>,
}

/// The body of `POST /deliveries/{id}/rating`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Rate {
    /// An integer from 1 to 5 (any JSON number is taken here, the contract judges it;
    /// `5.0` is the integer 5, as JSON Schema has it).
    #[schema(value_type = i32, minimum = 1, maximum = 5)]
    score: serde_json::Number,
    /// Free text: at most 2 000 characters, no control character but line feed,
    /// carriage return and tab.
    #[serde(default)]
    #[schema(
        max_length = 2000,
        pattern = "^[^\\u0000-\\u0008\\u000B\\u000C\\u000E-\\u001F\\u007F-\\u009F]*$"
    )]
    comment: Option<String>,
}

/// `n` as an integer when it is one written with a fraction (`5.0`): JSON Schema, and so
/// the OpenAPI document, counts `5.0` as the integer 5, while the event contract wants
/// integers written as such. Anything else is left for the contract to judge.
fn integral(n: serde_json::Number) -> serde_json::Number {
    match n.as_f64() {
        // Within ±2^53 every integer-valued f64 converts to i64 exactly.
        Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() <= 9_007_199_254_740_992.0 => {
            serde_json::Number::from(f as i64)
        }
        _ => n,
    }
}

/// What the checks need of a delivery, read under the lock in one go.
#[derive(Clone, Copy, Debug)]
struct Current {
    customer: uuid::Uuid,
    courier: Option<uuid::Uuid>,
    status: Status,
    version: u32,
}

fn forbidden(reason: impl Into<String>) -> ApiError {
    ApiError::Forbidden {
        reason: reason.into(),
    }
}

fn not_found(id: DeliveryId) -> ApiError {
    ApiError::NotFound {
        resource: "delivery",
        id: id.to_string(),
    }
}

fn location(id: DeliveryId) -> String {
    format!("/deliveries/{id}")
}

/// The delivery as the read model holds it, if `ready` says the write is visible.
fn view_if(
    id: DeliveryId,
    ready: impl Fn(&delivertrack_dataflow::model::DeliveryState) -> bool,
) -> impl Fn(&delivertrack_sinks::read_model::ReadState) -> Option<DeliveryView> {
    move |state| {
        state
            .deliveries
            .get(&id)
            .filter(|delivery| ready(delivery))
            .and_then(|_| state.delivery(id))
    }
}

/// The delivery's owner and state, or `404` — also for a customer's look at someone
/// else's delivery, which must not reveal that it exists.
fn current(state: &AppState, principal: &Principal, id: DeliveryId) -> Result<Current, ApiError> {
    let current = state.read_model.with_state(|s| {
        s.deliveries.get(&id).map(|d| Current {
            customer: d.customer_id.0,
            courier: d.courier_id.map(|c| c.0),
            status: d.status,
            version: d.version,
        })
    });
    match current {
        Some(current) if principal.role == Role::Customer && current.customer != principal.sub => {
            Err(not_found(id))
        }
        Some(current) => Ok(current),
        None => Err(not_found(id)),
    }
}

/// Answers a published write on delivery `id`: `status` with the view once `ready` holds,
/// else `202`.
async fn answer(
    state: &AppState,
    id: DeliveryId,
    event: &Event,
    status: StatusCode,
    ready: impl Fn(&delivertrack_dataflow::model::DeliveryState) -> bool,
) -> Response {
    match settle(state, view_if(id, ready)).await {
        Some(view) => Applied::new(status, id.0, event, location(id), view).into_response(),
        None => Pending::new(id.0, event, location(id), state.config.command_wait).into_response(),
    }
}

/// `POST /deliveries`: `201` with the delivery (`"id"`, `"status": "created"`, ...) once the
/// pipeline has applied it, `202` if not within the bound.
#[utoipa::path(
    post,
    path = "/deliveries",
    operation_id = "createDelivery",
    tag = "commands",
    summary = "Create a delivery",
    description = "Customers create deliveries for themselves (`customer_id` absent or their \
        own), admins for any customer (`customer_id` required); couriers may not. Counted \
        against the customer's `delivery_creation` limit (10 per hour by default).",
    security(("bearer_jwt" = []), ("access_token" = [])),
    request_body = CreateDelivery,
    responses(
        (status = 201, description = "Created and applied: the delivery as the read model holds it.",
            body = DeliveryWritten, headers(("Location" = String, description = "`/deliveries/{id}`"))),
        (status = 202, description = "Published and confirmed, not applied within the bound.",
            body = Pending, headers(("Location" = String, description = "`/deliveries/{id}`"))),
        (status = 400, description = "`malformed_json`, `unknown_field`, `missing_field` (an \
            admin without `customer_id`), `invalid_coordinates`, `invalid_value`, \
            `timestamp_in_future`, ...: the event contract's codes.", body = ErrorBody),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, description = "`forbidden`: a courier, or a customer naming another customer.", body = ErrorBody),
        (status = 413, response = crate::openapi::PayloadTooLarge),
        (status = 415, response = crate::openapi::UnsupportedMediaType),
        (status = 429, description = "`rate_limited`: the customer's `delivery_creation` limit, \
            or the API key's; retry after `Retry-After` seconds.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until a retry would pass."))),
        (status = 503, description = "`commands_unavailable`: the event could not be published; nothing was accepted.", body = ErrorBody),
    )
)]
async fn create(
    State(state): State<AppState>,
    principal: Principal,
    body: Result<ApiJson<CreateDelivery>, ApiError>,
) -> Result<Response, ApiError> {
    if principal.role == Role::Courier {
        return Err(forbidden("a courier cannot create deliveries"));
    }
    let ApiJson(body) = body?;
    let customer = match (principal.role, body.customer_id) {
        (_, Some(customer)) => Value::from(customer),
        (Role::Admin, None) => {
            return Err(ApiError::BadRequest {
                code: "missing_field",
                message: "missing field `customer_id`: an admin names the customer".into(),
            });
        }
        (_, None) => Value::from(principal.sub.to_string()),
    };
    let id = DeliveryId::new_random();
    let mut fields = Map::new();
    fields.insert("delivery_id".into(), Value::from(id.to_string()));
    fields.insert("customer_id".into(), customer);
    fields.insert("pickup".into(), point(body.pickup.lat, body.pickup.lon));
    fields.insert("dropoff".into(), point(body.dropoff.lat, body.dropoff.lon));
    if let Some(promised_by) = body.promised_by {
        fields.insert("promised_by".into(), Value::from(promised_by));
    }
    let event = build::event(
        EventKind::DeliveryCreated,
        None,
        fields,
        &state.config.contract,
    )?;
    let EventBody::DeliveryCreated(created) = &event.body else {
        return Err(ApiError::Internal(
            "a delivery.created command decoded as another kind".into(),
        ));
    };
    if principal.role == Role::Customer && created.customer_id.0 != principal.sub {
        return Err(forbidden(
            "a customer creates deliveries only for themselves",
        ));
    }
    // Counted only for a creation that would be published: a refused one costs no quota.
    state
        .limiter
        .check(Limit::DeliveryCreation, &created.customer_id.to_string())
        .await?;
    publish(&state, &event).await?;
    Ok(answer(&state, id, &event, StatusCode::CREATED, |_| true).await)
}

/// `PUT /deliveries/{id}/status`: `200` with the delivery once the change is applied, `202`
/// if not within the bound.
#[utoipa::path(
    put,
    path = "/deliveries/{id}/status",
    operation_id = "changeDeliveryStatus",
    tag = "commands",
    summary = "Change a delivery's status",
    description = "Customers may cancel their own deliveries; couriers set `picked_up`, \
        `in_transit`, `delivered` or `failed` on deliveries assigned to them; admins take any \
        legal step (`assigned` with `courier_id`). The step is checked against the delivery's \
        current status.",
    security(("bearer_jwt" = []), ("access_token" = [])),
    params(("id" = Uuid, Path, description = "The delivery.")),
    request_body = ChangeStatusBody,
    responses(
        (status = 200, description = "Applied: the delivery as the read model holds it.",
            body = DeliveryWritten, headers(("Location" = String, description = "`/deliveries/{id}`"))),
        (status = 202, description = "Published and confirmed, not applied within the bound.",
            body = Pending, headers(("Location" = String, description = "`/deliveries/{id}`"))),
        (status = 400, description = "`invalid_id`, `invalid_status`, `courier_not_allowed` \
            (`courier_id` with another status), `courier_required`, `malformed_json`, \
            `unknown_field`, ...", body = ErrorBody),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, description = "`forbidden`: the role may not set this status, or the \
            delivery is not assigned to the calling courier.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such delivery (or another customer's).", body = ErrorBody),
        (status = 409, description = "`illegal_transition`: the delivery cannot go from its status to this one.", body = ErrorBody),
        (status = 413, response = crate::openapi::PayloadTooLarge),
        (status = 415, response = crate::openapi::UnsupportedMediaType),
        (status = 503, description = "`commands_unavailable`: the event could not be published; nothing was accepted.", body = ErrorBody),
    )
)]
async fn change_status(
    State(state): State<AppState>,
    principal: Principal,
    path: Result<Path<String>, PathRejection>,
    body: Result<ApiJson<ChangeStatus>, ApiError>,
) -> Result<Response, ApiError> {
    let id: DeliveryId = id::parse("delivery", path)?;
    let ApiJson(body) = body?;
    let status: Status = body.status.parse().map_err(|_| ApiError::BadRequest {
        code: "invalid_status",
        message: format!(
            "{:?} is not a status; one of assigned, picked_up, in_transit, delivered, failed, cancelled",
            body.status
        ),
    })?;
    if body.courier_id.is_some() && status != Status::Assigned {
        return Err(ApiError::BadRequest {
            code: "courier_not_allowed",
            message: "`courier_id` is given only with status assigned".into(),
        });
    }
    let mut fields = Map::new();
    fields.insert("delivery_id".into(), Value::from(id.to_string()));
    fields.insert("status".into(), Value::from(body.status));
    if let Some(courier) = body.courier_id {
        fields.insert("courier_id".into(), Value::from(courier));
    }
    let event = build::event(
        EventKind::StatusChanged,
        None,
        fields,
        &state.config.contract,
    )?;

    let current = current(&state, &principal, id)?;
    match principal.role {
        Role::Admin => {}
        Role::Customer if status == Status::Cancelled => {}
        Role::Customer => {
            return Err(forbidden(format!(
                "a customer may only cancel a delivery, not set it {status}"
            )));
        }
        Role::Courier if current.courier != Some(principal.sub) => {
            return Err(forbidden("this delivery is not assigned to you"));
        }
        Role::Courier
            if matches!(
                status,
                Status::PickedUp | Status::InTransit | Status::Delivered | Status::Failed
            ) => {}
        Role::Courier => {
            return Err(forbidden(format!(
                "a courier may not set a delivery {status} (assigning and cancelling are for operators and customers)"
            )));
        }
    }
    if !current.status.can_become(status) {
        return Err(ApiError::Conflict {
            code: "illegal_transition",
            message: format!("a delivery cannot go from {} to {status}", current.status),
        });
    }
    publish(&state, &event).await?;
    let before = current.version;
    // Visible: the delivery moved past the checked version to this status — or by more
    // than one event, so that a concurrent write that overtook this one does not hold the
    // answer until the bound.
    Ok(answer(&state, id, &event, StatusCode::OK, move |d| {
        d.version > before && (d.status == status || d.version > before + 1)
    })
    .await)
}

/// `POST /deliveries/{id}/rating`: `201` with the delivery (its `rating`) once applied,
/// `202` if not within the bound.
#[utoipa::path(
    post,
    path = "/deliveries/{id}/rating",
    operation_id = "rateDelivery",
    tag = "commands",
    summary = "Rate a delivery",
    description = "Customers rate their own deliveries, admins any; couriers may not. The \
        delivery must be delivered or failed. Counted against the delivery's customer's \
        `rating` limit (20 per hour by default).",
    security(("bearer_jwt" = []), ("access_token" = [])),
    params(("id" = Uuid, Path, description = "The delivery.")),
    request_body = Rate,
    responses(
        (status = 201, description = "Applied: the delivery, with its `rating`.",
            body = DeliveryWritten, headers(("Location" = String, description = "`/deliveries/{id}`"))),
        (status = 202, description = "Published and confirmed, not applied within the bound.",
            body = Pending, headers(("Location" = String, description = "`/deliveries/{id}`"))),
        (status = 400, description = "`invalid_id`, `invalid_score`, `string_too_long`, \
            `malformed_json`, `unknown_field`, ...", body = ErrorBody),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, description = "`forbidden`: couriers cannot rate deliveries.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such delivery (or another customer's).", body = ErrorBody),
        (status = 409, description = "`not_rateable`: the delivery is neither delivered nor \
            failed; `too_many_ratings`: it has been rated five times, the most it takes.", body = ErrorBody),
        (status = 413, response = crate::openapi::PayloadTooLarge),
        (status = 415, response = crate::openapi::UnsupportedMediaType),
        (status = 429, description = "`rate_limited`: the customer's `rating` limit, or the \
            API key's; retry after `Retry-After` seconds.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until a retry would pass."))),
        (status = 503, description = "`commands_unavailable`: the event could not be published; nothing was accepted.", body = ErrorBody),
    )
)]
async fn rate(
    State(state): State<AppState>,
    principal: Principal,
    path: Result<Path<String>, PathRejection>,
    body: Result<ApiJson<Rate>, ApiError>,
) -> Result<Response, ApiError> {
    let id: DeliveryId = id::parse("delivery", path)?;
    if principal.role == Role::Courier {
        return Err(forbidden("a courier cannot rate deliveries"));
    }
    let ApiJson(body) = body?;
    let mut fields = Map::new();
    fields.insert("delivery_id".into(), Value::from(id.to_string()));
    fields.insert("score".into(), Value::Number(integral(body.score)));
    if let Some(comment) = body.comment {
        fields.insert("comment".into(), Value::from(comment));
    }
    let event = build::event(
        EventKind::DeliveryRated,
        None,
        fields,
        &state.config.contract,
    )?;

    let current = current(&state, &principal, id)?;
    if !matches!(current.status, Status::Delivered | Status::Failed) {
        return Err(ApiError::Conflict {
            code: "not_rateable",
            message: format!(
                "a delivery can be rated once delivered or failed; this one is {}",
                current.status
            ),
        });
    }
    // Counted only for a rating that would be published, against the delivery's customer
    // (an admin's rating too: the bound is on how often one delivery history is re-rated).
    state
        .limiter
        .check(Limit::Rating, &current.customer.to_string())
        .await?;
    publish(&state, &event).await?;
    // Applied when the delivery shows a rating at least this recent; refused when the
    // pipeline says so (a sixth rating: `too_many_ratings`).
    let at = event.occurred_at;
    let applied = view_if(id, move |d| {
        d.rating.as_ref().is_some_and(|rating| rating.at >= at)
    });
    let event_id = event.event_id;
    let outcome = settle(&state, |s| match s.refusal(event_id) {
        Some(reason) => Some(Err(reason.clone())),
        None => applied(s).map(Ok),
    })
    .await;
    match outcome {
        Some(Ok(view)) => {
            Ok(Applied::new(StatusCode::CREATED, id.0, &event, location(id), view).into_response())
        }
        Some(Err(reason)) => Err(ApiError::Conflict {
            code: reason.code(),
            message: format!("the rating was refused: {reason}"),
        }),
        None => {
            Ok(Pending::new(id.0, &event, location(id), state.config.command_wait).into_response())
        }
    }
}

#[cfg(test)]
mod score_tests {
    use serde_json::{Number, json};

    use super::integral;

    #[test]
    fn an_integer_written_with_a_fraction_is_an_integer() {
        let number = |value: serde_json::Value| match value {
            serde_json::Value::Number(n) => n,
            other => panic!("{other} is not a number"),
        };
        assert_eq!(integral(number(json!(5.0))), Number::from(5));
        assert_eq!(integral(number(json!(-0.0))), Number::from(0));
        assert_eq!(integral(number(json!(3))), Number::from(3));
        // Not integers, or too large to be exact: left for the contract to refuse.
        assert!(integral(number(json!(4.5))).is_f64());
        assert!(integral(number(json!(1e300))).is_f64());
    }
}
