//! The records of couriers and customers, kept in the system of record:
//!
//! - `GET /couriers/{id}` (admins): the courier's profile (`name`, `vehicle_type`) joined
//!   with its live state from the read model (position, odometer, zones, aggregates,
//!   active deliveries) and the position PostgreSQL last stored;
//! - `PUT /couriers/{id}` (admins): sets the profile, creating the record if needed;
//! - `GET /customers/{id}` (admins, and the customer themself);
//! - `PUT /customers/{id}` (admins): sets `name`, `address`, `contact`.
//!
//! A `PUT` replaces the whole profile: a field left out or `null` is cleared. It answers
//! `201` when it created the record, `200` when it updated it. Without PostgreSQL these
//! routes answer `503 store_unavailable`.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use delivertrack_dataflow::{CourierId, CustomerId};
use delivertrack_sinks::read_model::CourierDetail;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::access::require_admin;
use super::records::{self, CourierRecord, CustomerProfile, CustomerRecord, StoredPosition};
use crate::auth::{Principal, Role};
use crate::error::{ApiError, ApiJson, ErrorBody};
use crate::id;
use crate::state::AppState;

/// Longest name accepted, characters.
const MAX_NAME: usize = 200;
/// Longest vehicle type accepted, characters.
const MAX_VEHICLE_TYPE: usize = 50;
/// Longest address accepted, characters.
const MAX_ADDRESS: usize = 500;
/// Longest contact accepted, characters.
const MAX_CONTACT: usize = 200;

/// The routes of this module.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/couriers/{id}", get(get_courier).put(put_courier))
        .route("/customers/{id}", get(get_customer).put(put_customer))
}

/// A courier: the record joined with the live state.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CourierProfile {
    /// Profile.
    #[serde(flatten)]
    record: CourierRecord,
    /// The read model's state of the courier; `null` when the pipeline has no fix of it.
    #[schema(value_type = Option<crate::openapi::schemas::CourierDetail>)]
    live: Option<CourierDetail>,
    /// The last position the system of record stored; `null` before the first fix.
    stored: Option<StoredPosition>,
}

/// `200` with the [`CourierProfile`]; `400 invalid_id`; `401`; `403` unless admin;
/// `404 not_found` when neither PostgreSQL nor the read model knows the courier;
/// `503 store_unavailable`.
#[utoipa::path(
    get,
    path = "/couriers/{id}",
    operation_id = "getCourier",
    tag = "records",
    summary = "A courier's record",
    description = "Admins only. The profile from PostgreSQL joined with the live state from the \
        read model and the position PostgreSQL last stored.",
    security(("bearer_jwt" = []), ("access_token" = [])),
    params(("id" = Uuid, Path, description = "The courier.")),
    responses(
        (status = 200, description = "The courier.", body = CourierProfile),
        (status = 400, description = "`invalid_id`: the id is not a UUID.", body = ErrorBody),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, description = "`forbidden`: admins only.", body = ErrorBody),
        (status = 404, description = "`not_found`: neither PostgreSQL nor the read model knows the courier.", body = ErrorBody),
        (status = 503, description = "`store_unavailable`: no PostgreSQL, or it cannot be reached.", body = ErrorBody),
    )
)]
async fn get_courier(
    State(state): State<AppState>,
    principal: Principal,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<CourierProfile>, ApiError> {
    require_admin(&principal)?;
    let id: CourierId = id::parse("courier", path)?;
    let pool = records::pool(&state)?;
    let row = records::courier(pool, id).await?;
    let live = state.read_model.courier(id);
    let (record, stored) = match row {
        Some(row) => row,
        None if live.is_some() => (
            CourierRecord {
                courier_id: id.0,
                name: None,
                vehicle_type: None,
            },
            None,
        ),
        None => {
            return Err(ApiError::NotFound {
                resource: "courier",
                id: id.to_string(),
            });
        }
    };
    Ok(Json(CourierProfile {
        record,
        live,
        stored,
    }))
}

/// The body of `PUT /couriers/{id}`: the whole profile (a field left out or `null` is
/// cleared).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CourierBody {
    /// Display name (at most 200 characters).
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*[^\\u0000-\\u0020\\u007F-\\u00A0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000\\uFEFF][^\\u0000-\\u001F\\u007F-\\u009F]*$"
    )]
    name: Option<String>,
    /// Vehicle, free text (`bicycle`, `scooter`, `car`, ...; at most 50 characters).
    #[schema(
        min_length = 1,
        max_length = 50,
        pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*[^\\u0000-\\u0020\\u007F-\\u00A0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000\\uFEFF][^\\u0000-\\u001F\\u007F-\\u009F]*$"
    )]
    vehicle_type: Option<String>,
}

/// `201` (created) or `200` (updated) with the [`CourierProfile`]; `400` (`invalid_id`,
/// `invalid_field`, `malformed_json`, `unknown_field`); `401`; `403` unless admin; `415`;
/// `503 store_unavailable`.
#[utoipa::path(
    put,
    path = "/couriers/{id}",
    operation_id = "putCourier",
    tag = "records",
    summary = "Set a courier's profile",
    description = "Admins only. Replaces the whole profile (a field left out or `null` is \
        cleared), creating the record if needed; never touches the tracking columns.",
    security(("bearer_jwt" = []), ("access_token" = [])),
    params(("id" = Uuid, Path, description = "The courier.")),
    request_body = CourierBody,
    responses(
        (status = 200, description = "Updated: the courier.", body = CourierProfile),
        (status = 201, description = "Created: the courier.", body = CourierProfile),
        (status = 400, description = "`invalid_id`, `invalid_field` (blank, too long, control \
            characters), `malformed_json`, `unknown_field`.", body = ErrorBody),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, description = "`forbidden`: admins only.", body = ErrorBody),
        (status = 413, response = crate::openapi::PayloadTooLarge),
        (status = 415, response = crate::openapi::UnsupportedMediaType),
        (status = 503, description = "`store_unavailable`: no PostgreSQL, or it cannot be reached.", body = ErrorBody),
    )
)]
async fn put_courier(
    State(state): State<AppState>,
    principal: Principal,
    path: Result<Path<String>, PathRejection>,
    body: Result<ApiJson<CourierBody>, ApiError>,
) -> Result<(StatusCode, Json<CourierProfile>), ApiError> {
    require_admin(&principal)?;
    let id: CourierId = id::parse("courier", path)?;
    let ApiJson(body) = body?;
    let name = field("name", body.name.as_deref(), MAX_NAME)?;
    let vehicle_type = field(
        "vehicle_type",
        body.vehicle_type.as_deref(),
        MAX_VEHICLE_TYPE,
    )?;
    let pool = records::pool(&state)?;
    let ((record, stored), created) = records::upsert_courier(pool, id, name, vehicle_type).await?;
    Ok((
        created_or_ok(created),
        Json(CourierProfile {
            record,
            live: state.read_model.courier(id),
            stored,
        }),
    ))
}

/// `200` with the [`CustomerRecord`]; `400 invalid_id`; `401`; `403` for couriers;
/// `404 not_found` when there is no record, or for another customer's;
/// `503 store_unavailable`.
#[utoipa::path(
    get,
    path = "/customers/{id}",
    operation_id = "getCustomer",
    tag = "records",
    summary = "A customer's record",
    description = "For admins and the customer themself; another customer's record is answered \
        like a missing one.",
    security(("bearer_jwt" = []), ("access_token" = [])),
    params(("id" = Uuid, Path, description = "The customer.")),
    responses(
        (status = 200, description = "The customer.", body = CustomerRecord),
        (status = 400, description = "`invalid_id`: the id is not a UUID.", body = ErrorBody),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, description = "`forbidden`: couriers.", body = ErrorBody),
        (status = 404, description = "`not_found`: no record, or another customer's.", body = ErrorBody),
        (status = 503, description = "`store_unavailable`: no PostgreSQL, or it cannot be reached.", body = ErrorBody),
    )
)]
async fn get_customer(
    State(state): State<AppState>,
    principal: Principal,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<CustomerRecord>, ApiError> {
    if principal.role == Role::Courier {
        return Err(ApiError::Forbidden {
            reason: "customer records are for admins and the customer themself".to_owned(),
        });
    }
    let id: CustomerId = id::parse("customer", path)?;
    let not_found = || ApiError::NotFound {
        resource: "customer",
        id: id.to_string(),
    };
    if principal.role == Role::Customer && principal.sub != id.0 {
        return Err(not_found());
    }
    let pool = records::pool(&state)?;
    records::customer(pool, id)
        .await?
        .map(Json)
        .ok_or_else(not_found)
}

/// The body of `PUT /customers/{id}`: the whole profile (a field left out or `null` is
/// cleared).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CustomerBody {
    /// Display name (at most 200 characters).
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*[^\\u0000-\\u0020\\u007F-\\u00A0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000\\uFEFF][^\\u0000-\\u001F\\u007F-\\u009F]*$"
    )]
    name: Option<String>,
    /// Postal address (at most 500 characters).
    #[schema(
        min_length = 1,
        max_length = 500,
        pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*[^\\u0000-\\u0020\\u007F-\\u00A0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000\\uFEFF][^\\u0000-\\u001F\\u007F-\\u009F]*$"
    )]
    address: Option<String>,
    /// Phone, e-mail (at most 200 characters).
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*[^\\u0000-\\u0020\\u007F-\\u00A0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000\\uFEFF][^\\u0000-\\u001F\\u007F-\\u009F]*$"
    )]
    contact: Option<String>,
}

/// `201` (created) or `200` (updated) with the [`CustomerRecord`]; `400` (`invalid_id`,
/// `invalid_field`, `malformed_json`, `unknown_field`); `401`; `403` unless admin; `415`;
/// `503 store_unavailable`.
#[utoipa::path(
    put,
    path = "/customers/{id}",
    operation_id = "putCustomer",
    tag = "records",
    summary = "Set a customer's profile",
    description = "Admins only. Replaces `name`, `address` and `contact` (a field left out or \
        `null` is cleared), creating the record if needed.",
    security(("bearer_jwt" = []), ("access_token" = [])),
    params(("id" = Uuid, Path, description = "The customer.")),
    request_body = CustomerBody,
    responses(
        (status = 200, description = "Updated: the customer.", body = CustomerRecord),
        (status = 201, description = "Created: the customer.", body = CustomerRecord),
        (status = 400, description = "`invalid_id`, `invalid_field` (blank, too long, control \
            characters), `malformed_json`, `unknown_field`.", body = ErrorBody),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, description = "`forbidden`: admins only.", body = ErrorBody),
        (status = 413, response = crate::openapi::PayloadTooLarge),
        (status = 415, response = crate::openapi::UnsupportedMediaType),
        (status = 503, description = "`store_unavailable`: no PostgreSQL, or it cannot be reached.", body = ErrorBody),
    )
)]
async fn put_customer(
    State(state): State<AppState>,
    principal: Principal,
    path: Result<Path<String>, PathRejection>,
    body: Result<ApiJson<CustomerBody>, ApiError>,
) -> Result<(StatusCode, Json<CustomerRecord>), ApiError> {
    require_admin(&principal)?;
    let id: CustomerId = id::parse("customer", path)?;
    let ApiJson(body) = body?;
    let profile = CustomerProfile {
        name: field("name", body.name.as_deref(), MAX_NAME)?,
        address: field("address", body.address.as_deref(), MAX_ADDRESS)?,
        contact: field("contact", body.contact.as_deref(), MAX_CONTACT)?,
    };
    let pool = records::pool(&state)?;
    let (record, created) = records::upsert_customer(pool, id, profile).await?;
    Ok((created_or_ok(created), Json(record)))
}

/// A profile field: `None` stays `None`; blank, too long or holding a control character
/// anywhere is `400 invalid_field`; what is kept is trimmed. Judged on the text as sent,
/// as the document's `maxLength` and `pattern` judge it (the length was counted after
/// trimming, so 201 characters with a trailing space passed a `maxLength` of 200, and a
/// trailing line feed passed the control-character check).
fn field<'a>(
    name: &'static str,
    value: Option<&'a str>,
    max: usize,
) -> Result<Option<&'a str>, ApiError> {
    let Some(value) = value else {
        return Ok(None);
    };
    // The document's blank characters: Unicode White_Space and the byte-order mark.
    let blank = |c: char| c.is_whitespace() || c == '\u{feff}';
    let problem = if value.chars().all(blank) {
        Some("must not be blank (use null to clear it)".to_owned())
    } else if value.chars().count() > max {
        Some(format!("must be at most {max} characters"))
    } else if value.chars().any(char::is_control) {
        Some("must not contain control characters".to_owned())
    } else {
        None
    };
    match problem {
        Some(problem) => Err(ApiError::BadRequest {
            code: "invalid_field",
            message: format!("{name} {problem}"),
        }),
        None => Ok(Some(value.trim_matches(blank))),
    }
}

fn created_or_ok(created: bool) -> StatusCode {
    if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_fields_are_trimmed_and_bounded() {
        assert!(matches!(field("name", None, 5), Ok(None)));
        assert!(matches!(field("name", Some(" Ada "), 5), Ok(Some("Ada"))));
        // Judged as sent: a length over the limit before trimming, a control character at
        // either end, a byte-order mark alone.
        for bad in [
            "", "   ", "Adalbert", "A\nda", "Ada\n", "\tAda", "Ada   ", "\u{feff}",
        ] {
            assert!(
                matches!(
                    field("name", Some(bad), 5),
                    Err(ApiError::BadRequest {
                        code: "invalid_field",
                        ..
                    })
                ),
                "{bad:?}"
            );
        }
    }
}
