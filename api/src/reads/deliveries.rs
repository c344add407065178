//! `GET /deliveries/{id}` and `GET /deliveries`: deliveries as their customer, their
//! courier or an admin may see them.
//!
//! One delivery is read from the read model, or, when the read model does not hold it
//! (an API without a pipeline, or one whose pipeline has not caught up), from the system
//! of record if the state has one. The list is read from the read model alone.

use std::collections::BinaryHeap;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::routing::get;
use axum::{Json, Router};
use delivertrack_dataflow::{DeliveryId, Status};
use delivertrack_sinks::read_model::DeliveryView;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::access::{may_see, may_see_delivery};
use super::cursor::PageKey;
use super::records;
use crate::auth::Principal;
use crate::error::{ApiError, ErrorBody};
use crate::id;
use crate::openapi::schemas::DeliveryView as DeliveryViewSchema;
use crate::state::AppState;

/// Deliveries per page when the client does not say.
pub const DEFAULT_LIMIT: usize = 50;
/// The largest page.
pub const MAX_LIMIT: usize = 200;

/// The routes of this module.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/deliveries", get(list))
        .route("/deliveries/{id}", get(one))
}

/// `200` with the [`DeliveryView`]; `400 invalid_id`; `401`; `404 not_found` when there is
/// no such delivery or the caller may not see it (the two are indistinguishable);
/// `503 store_unavailable` when the read model lacks it and PostgreSQL cannot be reached.
#[utoipa::path(
    get,
    path = "/deliveries/{id}",
    operation_id = "getDelivery",
    tag = "deliveries",
    summary = "One delivery",
    description = "For its customer, its courier and admins; from the read model, else from \
        PostgreSQL. Anyone else's delivery is answered exactly like a missing one.",
    security(("bearer_jwt" = []), ("access_token" = [])),
    params(("id" = Uuid, Path, description = "The delivery.")),
    responses(
        (status = 200, description = "The delivery.", body = DeliveryViewSchema),
        (status = 400, description = "`invalid_id`: the id is not a UUID.", body = ErrorBody),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 404, description = "`not_found`: no such delivery, or not the caller's.", body = ErrorBody),
        (status = 503, description = "`store_unavailable`: the read model lacks it and \
            PostgreSQL cannot be reached.", body = ErrorBody),
    )
)]
async fn one(
    State(state): State<AppState>,
    principal: Principal,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<DeliveryView>, ApiError> {
    let id: DeliveryId = id::parse("delivery", path)?;
    let view = match state.read_model.delivery(id) {
        Some(view) => Some(view),
        None => match &state.records {
            Some(pool) => records::delivery(pool, id).await?,
            None => None,
        },
    };
    view.filter(|view| may_see_delivery(&principal, &view.details))
        .map(Json)
        .ok_or_else(|| ApiError::NotFound {
            resource: "delivery",
            id: id.to_string(),
        })
}

/// The query of `GET /deliveries`. Every value is taken as text and checked here, so that
/// each mistake gets its own code.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// Only deliveries in this status.
    #[param(value_type = Option<crate::openapi::schemas::Status>)]
    status: Option<String>,
    /// Page size, 1 to 200 (50 when absent).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 200)]
    limit: Option<String>,
    /// The `next_cursor` of the previous page (opaque).
    #[param(pattern = "^A[Q-Za-f][A-Za-z0-9_-]{31}[AQgw]$")]
    cursor: Option<String>,
    /// The token, for clients that cannot send headers: read by the [`Principal`]
    /// extractor, allowed and ignored here (documented as a security scheme).
    #[serde(rename = "access_token")]
    #[param(ignore)]
    _access_token: Option<serde::de::IgnoredAny>,
}

/// One page.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Page {
    /// Newest first.
    #[schema(value_type = Vec<DeliveryViewSchema>)]
    deliveries: Vec<DeliveryView>,
    /// Pass as `cursor` for the next page; `null` on the last one.
    next_cursor: Option<String>,
}

/// `200` with a [`Page`]: the caller's deliveries (all of them for an admin), newest first,
/// optionally of one status; `400 invalid_status` or `400 invalid_query` (a limit outside
/// 1–200, a cursor that is not one, an unknown or repeated parameter); `401`.
#[utoipa::path(
    get,
    path = "/deliveries",
    operation_id = "listDeliveries",
    tag = "deliveries",
    summary = "A page of deliveries",
    description = "The caller's deliveries (a customer's own, a courier's assigned ones, all of \
        them for an admin), newest first (then by id), optionally of one status. Walk the pages \
        with `next_cursor`: a walk returns every delivery that existed when it started exactly \
        once.",
    security(("bearer_jwt" = []), ("access_token" = [])),
    params(ListQuery),
    responses(
        (status = 200, description = "One page.", body = Page),
        (status = 400, description = "`invalid_status`, or `invalid_query` (a limit outside \
            1–200, a cursor this API did not issue, an unknown or repeated parameter).", body = ErrorBody),
        (status = 401, response = crate::openapi::Unauthorized),
    )
)]
async fn list(
    State(state): State<AppState>,
    principal: Principal,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Page>, ApiError> {
    let Query(query) = query.map_err(|rejection| ApiError::BadRequest {
        code: "invalid_query",
        message: rejection.body_text(),
    })?;
    let status = query
        .status
        .as_deref()
        .map(|text| {
            text.parse::<Status>().map_err(|_| ApiError::BadRequest {
                code: "invalid_status",
                message: format!(
                    "{text:?} is not a status; one of {}",
                    Status::ALL.map(Status::as_str).join(", ")
                ),
            })
        })
        .transpose()?;
    let limit = match query.limit.as_deref() {
        None => DEFAULT_LIMIT,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|limit| (1..=MAX_LIMIT).contains(limit))
            .ok_or_else(|| ApiError::BadRequest {
                code: "invalid_query",
                message: format!("limit must be an integer from 1 to {MAX_LIMIT}, not {text:?}"),
            })?,
    };
    let after = query
        .cursor
        .as_deref()
        .map(|text| {
            PageKey::decode(text).ok_or_else(|| ApiError::BadRequest {
                code: "invalid_query",
                message: "the cursor is not one this API issued".to_owned(),
            })
        })
        .transpose()?;
    Ok(Json(page(&state, &principal, status, limit, after)))
}

/// The `limit` first deliveries after `after` that `principal` may see, in page order.
///
/// One pass over the read model's deliveries under its read lock, keeping the `limit + 1`
/// smallest keys in a bounded heap (the extra one tells whether a next page exists); the
/// views are built for the kept ones only.
fn page(
    state: &AppState,
    principal: &Principal,
    status: Option<Status>,
    limit: usize,
    after: Option<PageKey>,
) -> Page {
    state.read_model.with_state(|read| {
        let mut kept: BinaryHeap<PageKey> = BinaryHeap::with_capacity(limit + 1);
        for (id, delivery) in &read.deliveries {
            if status.is_some_and(|status| delivery.status != status)
                || !may_see(principal, delivery.customer_id, delivery.courier_id)
            {
                continue;
            }
            let key = PageKey::new(delivery.created_at, *id);
            if after.is_some_and(|after| key <= after) {
                continue;
            }
            if kept.len() <= limit {
                kept.push(key);
            } else if kept.peek().is_some_and(|largest| key < *largest) {
                kept.pop();
                kept.push(key);
            }
        }
        let mut keys = kept.into_sorted_vec();
        let more = keys.len() > limit;
        keys.truncate(limit);
        let next_cursor = more.then(|| keys.last().map(PageKey::encode)).flatten();
        let deliveries = keys
            .iter()
            .filter_map(|key| read.delivery(key.id()))
            .collect();
        Page {
            deliveries,
            next_cursor,
        }
    })
}
