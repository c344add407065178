//! The write routes: every command becomes one event of the contract, validated as ingest
//! validates it, published with a confirm, and answered once the read model shows it.
//!
//! | route | event | answer |
//! |---|---|---|
//! | `POST /deliveries` | `delivery.created` | `201` with the delivery |
//! | `PUT /deliveries/{id}/status` | `status.changed` | `200` with the delivery |
//! | `POST /deliveries/{id}/rating` | `delivery.rated` | `201` with the delivery |
//! | `POST /locations` | `location.updated` | `201` with the courier |
//! | `PUT /zones/{id}` | `zone.upserted` | `201` (new) or `200` with the zone |
//! | `DELETE /zones/{id}` | `zone.deleted` | `204` |
//!
//! Each applied answer carries `"id"` (the entity), `"event_id"` and the entity's view as
//! the read model holds it, and a `Location` to read it again. A request goes through, in
//! order: the token (`401`), the path's id (`400 invalid_id`), the role (`403`), the body
//! (`400`, `413`, `415`), the event contract (`400` with the codes of
//! [`build::reason_code`]), the read model (`404`, `403` for someone else's delivery, `409`
//! for an illegal step), the publisher (`503 commands_unavailable`), and finally
//! read-your-writes ([`settle`]): within [`ApiConfig::command_wait`](crate::ApiConfig::command_wait)
//! the answer is the applied view, after it `202 Accepted` with the event id.
//!
//! # Layout
//! - [`publisher`] — [`EventPublisher`], the seam to RabbitMQ or the demo's channel, and
//!   [`PublishError`].
//! - [`build`] — a command's event through the contract, and the `400` codes.
//! - [`settle`] — publishing within a bound; waiting for the read model; the answers.
//! - [`deliveries`], [`locations`], [`zones`] — the routes, with who may do what.

pub mod build;
pub mod deliveries;
pub mod locations;
pub mod publisher;
pub mod settle;
pub mod zones;

use axum::Router;

pub use publisher::{EventPublisher, PublishError};

use crate::state::AppState;

/// Every write route.
pub fn router() -> Router<AppState> {
    Router::new()
        .merge(deliveries::router())
        .merge(locations::router())
        .merge(zones::router())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use axum::body::Body;
    use axum::http::Request;
    use delivertrack_dataflow::{Event, EventBody};
    use delivertrack_sinks::ReadModel;
    use futures::FutureExt;
    use futures::future::BoxFuture;
    use serde_json::{Value, json};
    use tokio_util::sync::CancellationToken;
    use tower::ServiceExt;
    use uuid::Uuid;

    use super::*;
    use crate::{ApiConfig, Role};

    /// Keeps what it is given; no pipeline ever applies it.
    #[derive(Debug, Default)]
    struct Recorder(Mutex<Vec<Event>>);

    impl EventPublisher for Recorder {
        fn publish<'a>(&'a self, event: &'a Event) -> BoxFuture<'a, Result<(), PublishError>> {
            self.0.lock().unwrap().push(event.clone());
            async { Ok(()) }.boxed()
        }
    }

    async fn send(
        state: AppState,
        method: &str,
        uri: &str,
        role: Role,
        body: Value,
    ) -> (u16, Value, Option<String>) {
        let token = state.auth.issue(role, Uuid::new_v4()).unwrap();
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap();
        let response = crate::router(state).oneshot(request).await.unwrap();
        let status = response.status().as_u16();
        let location = response
            .headers()
            .get("location")
            .map(|l| l.to_str().unwrap().to_owned());
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            location,
        )
    }

    fn delivery() -> Value {
        json!({"pickup": {"lat": 52.52, "lon": 13.40}, "dropoff": {"lat": 52.50, "lon": 13.45}})
    }

    #[tokio::test]
    async fn without_a_publisher_a_valid_command_is_503_and_an_invalid_one_still_400() {
        let state = AppState::new(ReadModel::default(), CancellationToken::new());
        let (status, body, _) = send(
            state.clone(),
            "POST",
            "/deliveries",
            Role::Customer,
            delivery(),
        )
        .await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (503, Some("commands_unavailable"))
        );
        let bad =
            json!({"pickup": {"lat": 95.0, "lon": 13.40}, "dropoff": {"lat": 52.50, "lon": 13.45}});
        let (status, body, _) = send(state, "POST", "/deliveries", Role::Customer, bad).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("invalid_coordinates"))
        );
    }

    #[tokio::test]
    async fn a_write_the_pipeline_does_not_apply_in_time_is_202_with_its_event() {
        let recorder = Arc::new(Recorder::default());
        let state = AppState::new(ReadModel::default(), CancellationToken::new())
            .with_config(ApiConfig {
                command_wait: Duration::from_millis(50),
                ..ApiConfig::default()
            })
            .with_commands(recorder.clone());
        let (status, body, location) =
            send(state, "POST", "/deliveries", Role::Customer, delivery()).await;
        assert_eq!(status, 202, "{body}");
        let events = recorder.0.lock().unwrap().clone();
        assert_eq!(events.len(), 1);
        let EventBody::DeliveryCreated(created) = &events[0].body else {
            panic!("{events:?}")
        };
        assert_eq!(body["event_id"], json!(events[0].event_id));
        assert_eq!(body["kind"], "delivery.created");
        assert_eq!(body["id"], json!(created.delivery_id));
        assert_eq!(
            location.as_deref(),
            Some(format!("/deliveries/{}", created.delivery_id).as_str())
        );
    }

    #[tokio::test]
    async fn the_write_routes_share_their_paths_with_the_read_routes() {
        let state = AppState::new(ReadModel::default(), CancellationToken::new());
        let zone = Uuid::new_v4();
        // DELETE of an unknown zone: the write route answers (404 from the read model) ...
        let (status, body, _) = send(
            state.clone(),
            "DELETE",
            &format!("/zones/{zone}"),
            Role::Admin,
            Value::Null,
        )
        .await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (404, Some("not_found"))
        );
        assert!(body["error"]["message"].as_str().unwrap().contains("zone"));
        // ... GET on the same path is the read route's, not a 405 of the write router ...
        let (status, _, _) = send(
            state.clone(),
            "GET",
            &format!("/zones/{zone}"),
            Role::Admin,
            Value::Null,
        )
        .await;
        assert_ne!(status, 405);
        // ... and a method on neither is 405.
        let (status, _, _) = send(
            state,
            "PATCH",
            &format!("/zones/{zone}"),
            Role::Admin,
            Value::Null,
        )
        .await;
        assert_eq!(status, 405);
    }
}
