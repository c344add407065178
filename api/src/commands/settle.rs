//! Publishing a command's event, and read-your-writes: waiting, within a bound, until the
//! read model shows it.
//!
//! After the publisher's confirm, a write route waits until the pipeline has applied its
//! event — watched through [`ReadModel::applied_epochs`](delivertrack_sinks::ReadModel::applied_epochs),
//! re-checking the entity after every applied epoch — and answers with the read model's
//! view of the entity. A `GET` right after that answer therefore returns the write. If the
//! event is not visible within [`ApiConfig::command_wait`](crate::ApiConfig::command_wait)
//! (a pipeline slowed by a stalled sink, a concurrent write that made this one moot), the
//! route answers `Pending`: `202 Accepted`, the event id, and a `Location` to poll.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use delivertrack_dataflow::{Event, EventId, EventKind};
use delivertrack_sinks::read_model::ReadState;
use serde::Serialize;
use tokio::time::{Instant, timeout, timeout_at};

use super::publisher::PublishError;
use crate::error::ApiError;
use crate::state::AppState;

/// Publishes `event` through the state's publisher, within
/// [`ApiConfig::command_publish_timeout`](crate::ApiConfig::command_publish_timeout).
///
/// # Errors
/// `503 commands_unavailable`: no publisher (this process takes no commands), the publisher
/// failed, or it did not finish in time.
pub(crate) async fn publish(state: &AppState, event: &Event) -> Result<(), ApiError> {
    let Some(publisher) = &state.commands else {
        return Err(ApiError::CommandsUnavailable {
            reason: "this process takes no commands (no event publisher is configured)".into(),
        });
    };
    let bound = state.config.command_publish_timeout;
    match timeout(bound, publisher.publish(event)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => {
            tracing::warn!(%error, kind = %event.kind(), event_id = %event.event_id, "A command's event could not be published.");
            Err(ApiError::CommandsUnavailable {
                reason: match error {
                    PublishError::Unavailable(reason) => {
                        format!("the event was not published: {reason}")
                    }
                    PublishError::Unconfirmed(reason) => format!(
                        "the event was not confirmed and may or may not be applied: {reason}"
                    ),
                },
            })
        }
        Err(_elapsed) => {
            tracing::warn!(kind = %event.kind(), event_id = %event.event_id, ?bound, "Publishing a command's event timed out.");
            Err(ApiError::CommandsUnavailable {
                reason: format!(
                    "publishing took longer than {} ms; the event may or may not be applied",
                    bound.as_millis()
                ),
            })
        }
    }
}

/// Waits until `check` finds what it looks for in the read model, for at most
/// [`ApiConfig::command_wait`](crate::ApiConfig::command_wait) (or until shutdown).
/// `check` runs under the read model's lock: keep it to lookups.
pub(crate) async fn settle<T>(
    state: &AppState,
    check: impl Fn(&ReadState) -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + state.config.command_wait;
    let mut applied = state.read_model.applied_epochs();
    loop {
        // Mark the current epoch as seen *before* looking: an epoch applied after the look
        // then wakes `changed` below, so none slips between the two.
        applied.borrow_and_update();
        if let Some(found) = state.read_model.with_state(&check) {
            return Some(found);
        }
        tokio::select! {
            changed = timeout_at(deadline, applied.changed()) => match changed {
                Ok(Ok(())) => {}
                // Timed out, or the read model is gone.
                Ok(Err(_)) | Err(_) => return None,
            },
            () = state.shutdown.cancelled() => return None,
        }
    }
}

/// A write the read model shows: `status`, `Location`, and the entity's view beside the
/// event's id.
#[derive(Debug)]
pub(crate) struct Applied<V> {
    /// `201` for a creation, `200` for a change.
    pub status: StatusCode,
    /// Where the entity is read.
    pub location: String,
    /// The body.
    pub body: Written<V>,
}

/// The body of an applied write: the entity's id, the event's id, and the entity as the
/// read model holds it (flattened).
#[derive(Debug, Serialize)]
pub(crate) struct Written<V> {
    /// The entity (delivery, courier, zone).
    pub id: uuid::Uuid,
    /// The event the command became.
    pub event_id: EventId,
    /// The entity's view.
    #[serde(flatten)]
    pub view: V,
}

impl<V> Applied<V> {
    /// The answer for entity `id`, changed by `event` into `view`, readable at `location`.
    pub(crate) fn new(
        status: StatusCode,
        id: uuid::Uuid,
        event: &Event,
        location: String,
        view: V,
    ) -> Self {
        Self {
            status,
            location,
            body: Written {
                id,
                event_id: event.event_id,
                view,
            },
        }
    }
}

impl<V: Serialize> IntoResponse for Applied<V> {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body)).into_response();
        if let Ok(location) = HeaderValue::from_str(&self.location) {
            response.headers_mut().insert(header::LOCATION, location);
        }
        response
    }
}

/// A write published and confirmed but not yet visible within the bound: `202 Accepted`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct Pending {
    /// The entity.
    pub id: uuid::Uuid,
    /// The event the command became.
    #[schema(value_type = uuid::Uuid)]
    pub event_id: EventId,
    /// Its kind.
    #[schema(value_type = crate::openapi::schemas::EventKind)]
    pub kind: EventKind,
    /// Where to read the entity once applied (also the `Location` header).
    pub location: String,
    /// For people.
    pub message: String,
}

impl Pending {
    /// The answer for `event` on entity `id`, readable at `location`, after waiting `waited`.
    pub(crate) fn new(id: uuid::Uuid, event: &Event, location: String, waited: Duration) -> Self {
        Self {
            id,
            event_id: event.event_id,
            kind: event.kind(),
            message: format!(
                "the event is published and confirmed, but the pipeline had not applied it after {} ms; read {location} shortly",
                waited.as_millis()
            ),
            location,
        }
    }
}

impl IntoResponse for Pending {
    fn into_response(self) -> Response {
        let location = HeaderValue::from_str(&self.location).ok();
        let mut response = (StatusCode::ACCEPTED, Json(self)).into_response();
        if let Some(location) = location {
            response.headers_mut().insert(header::LOCATION, location);
        }
        response
    }
}
