//! `GET /ws/track/{delivery_id}`: live tracking of one delivery, over a WebSocket.
//!
//! Authenticated like every protected route (the token in the `Authorization` header or,
//! for browsers, the `access_token` query parameter), and open to the delivery's customer,
//! its courier and admins. Anyone else, and an unknown delivery, gets `404 not_found`
//! before the upgrade, so that ids cannot be probed.
//!
//! Server → client, text frames of JSON, each tagged by `"type"` and carrying the `epoch`
//! it reflects (epochs only grow within a session):
//! - `{"type": "snapshot", "reason": "connected" | "lagged" | "courier_changed", "epoch": N,
//!   "delivery": {...}, "courier": {...} | null}`: the delivery as `GET /deliveries/{id}`
//!   shows it (status, ETA, ...) and its courier's position; first on connect, again when
//!   the client fell behind, and when a courier is assigned;
//! - `{"type": "status", "epoch": N, "status": "picked_up", "previous_status": "assigned",
//!   "courier_id": "...", "version": 4}`;
//! - `{"type": "courier_moved", "epoch": N, "courier_id": "...", "position": {"lat", "lon"},
//!   "at_ms", "speed_mps", "heading_deg", "odometer_m"}`: the delivery's current courier;
//! - `{"type": "geofence_entered" | "geofence_exited", "epoch": N, "courier_id", "zone_id"}`;
//! - `{"type": "eta", "epoch": N, "courier_id", "status", "eta_ms", "remaining_m",
//!   "speed_mps", "as_of_ms"}` and `{"type": "eta_cleared", "epoch": N}`.
//!
//! Within an epoch the order is status, courier, geofence, ETA. When the delivery reaches
//! `delivered`, `failed` or `cancelled` the session sends that final `status` and closes
//! with code 1000 and reason `delivery ended` (at once, with the snapshot, for a delivery
//! that had already ended). At server shutdown it closes with 1001.
//!
//! A session lasts only as long as the right that opened it: it closes with
//! [`CLOSE_TOKEN_EXPIRED`] (4401, `the token has expired`) at the token's `exp`, and a
//! courier's with [`CLOSE_REASSIGNED`] (4403, [`REASSIGNED`]) as soon as the delivery is
//! assigned to another courier — without the status message that names the new one. A
//! page of another origin is refused `403 origin_not_allowed` ([`crate::origin`]).
//!
//! Client → server: nothing is expected; pongs and any message are signs of life.
//!
//! Each session filters the read model's per-epoch broadcast: the publisher never waits
//! for it, its buffer is the broadcast's bounded capacity, and a session that falls behind
//! gets a fresh snapshot instead of the epochs it missed. Pings, the send timeout and the
//! dead-peer rule are those of [`live`](crate::live).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::PathRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::get;
use delivertrack_dataflow::{CourierId, DeliveryId, Epoch, Status, UnixMillis, ZoneId};
use delivertrack_sinks::read_model::{
    CourierView, DeliveryView, EpochUpdate, EtaView, LatLon, LiveChange,
};
use futures::StreamExt;
use futures::stream::SplitSink;
use serde::Serialize;
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::auth::{CLOSE_TOKEN_EXPIRED, Grant, Principal, Role, TOKEN_EXPIRED_REASON};
use crate::error::{ApiError, ErrorBody};
use crate::id;
use crate::live::{
    MESSAGE_TOO_BIG, bounded, duration_millis, end_after_receive, millis_since, receive_loop, send,
};
use crate::origin::OriginAllowed;
use crate::reads::access::may_see_delivery;
use crate::state::AppState;

/// The close reason once the delivery has reached a terminal status.
pub const DELIVERY_ENDED: &str = "delivery ended";

/// Close code of a courier's session once the delivery is assigned to another courier
/// (mirrors HTTP's 403: the right to watch it has ended).
pub const CLOSE_REASSIGNED: u16 = 4403;
/// The close reason that goes with [`CLOSE_REASSIGNED`].
pub const REASSIGNED: &str = "the delivery was assigned to another courier";

/// The routes of this module.
pub fn router() -> Router<AppState> {
    Router::new().route("/ws/track/{delivery_id}", get(upgrade))
}

/// A message to the client.
#[derive(Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum TrackMessage {
    /// The delivery and its courier now.
    Snapshot {
        /// `connected`, `lagged` or `courier_changed`.
        reason: &'static str,
        /// The epoch the snapshot is consistent with.
        epoch: Option<Epoch>,
        /// The delivery, as `GET /deliveries/{id}` shows it.
        delivery: Box<DeliveryView>,
        /// Its courier's position, once assigned and located.
        courier: Option<CourierView>,
    },
    /// The delivery's status (or courier, or rating) changed.
    Status {
        /// The epoch of the change.
        epoch: Epoch,
        /// The status now.
        status: Status,
        /// Before this epoch.
        previous_status: Option<Status>,
        /// The assigned courier.
        courier_id: Option<CourierId>,
        /// Events applied to the delivery.
        version: u32,
    },
    /// The courier reported a newer position.
    CourierMoved {
        /// The epoch of the fix.
        epoch: Epoch,
        /// The courier.
        courier_id: CourierId,
        /// Where.
        position: LatLon,
        /// When the fix was taken.
        at_ms: UnixMillis,
        /// Speed, m/s.
        speed_mps: Option<f64>,
        /// Heading, degrees.
        heading_deg: Option<f64>,
        /// Distance travelled, metres.
        odometer_m: f64,
    },
    /// The courier entered a zone.
    GeofenceEntered {
        /// The epoch of the entry.
        epoch: Epoch,
        /// The courier.
        courier_id: CourierId,
        /// The zone.
        zone_id: ZoneId,
    },
    /// The courier left a zone.
    GeofenceExited {
        /// The epoch of the exit.
        epoch: Epoch,
        /// The courier.
        courier_id: CourierId,
        /// The zone.
        zone_id: ZoneId,
    },
    /// A new estimate.
    Eta {
        /// The epoch of the estimate.
        epoch: Epoch,
        /// The estimate.
        #[serde(flatten)]
        eta: EtaView,
    },
    /// No estimate any more.
    EtaCleared {
        /// The epoch it was withdrawn in.
        epoch: Epoch,
    },
}

/// `101` into a tracking session; `400 invalid_id`; `400 websocket_required` for a request
/// that is not a WebSocket upgrade; `401`; `404 not_found` for an unknown delivery or one
/// the caller may not see.
#[utoipa::path(
    get,
    path = "/ws/track/{delivery_id}",
    operation_id = "trackDelivery",
    tag = "live",
    summary = "Track one delivery (WebSocket)",
    description = "A WebSocket for the delivery's customer, its courier and admins. Text \
        frames of JSON tagged by `type`: `snapshot` first (and after falling behind, and when \
        a courier is assigned), then `status`, `courier_moved`, `geofence_entered`, \
        `geofence_exited`, `eta` and `eta_cleared`, each with its `epoch`. Closed with 1000 \
        `delivery ended` once the delivery is delivered, failed or cancelled, 1001 at \
        shutdown, 4401 when the token expires, 4403 for a courier when the delivery is \
        assigned to another. Browsers pass the token as `access_token`.",
    security(("bearer_jwt" = []), ("access_token" = [])),
    params(("delivery_id" = Uuid, Path, description = "The delivery.")),
    responses(
        (status = 101, description = "Switching to the WebSocket session."),
        (status = 400, description = "`invalid_id`, or `websocket_required`: not a WebSocket upgrade request.", body = ErrorBody),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, description = "`origin_not_allowed`: a page of an origin not on the allow-list.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such delivery, or not the caller's.", body = ErrorBody),
    )
)]
async fn upgrade(
    State(state): State<AppState>,
    _origin: OriginAllowed,
    grant: Grant,
    path: Result<Path<String>, PathRejection>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let principal = grant.principal;
    let id: DeliveryId = id::parse("delivery", path)?;
    let visible = state
        .read_model
        .delivery(id)
        .is_some_and(|view| may_see_delivery(&principal, &view.details));
    if !visible {
        return Err(ApiError::NotFound {
            resource: "delivery",
            id: id.to_string(),
        });
    }
    let ws = ws.map_err(|rejection| ApiError::BadRequest {
        code: "websocket_required",
        message: rejection.body_text(),
    })?;
    Ok(bounded(ws, &state.config).on_upgrade(move |socket| session(socket, state, id, grant)))
}

/// Runs one tracking session until either side ends it.
async fn session(socket: WebSocket, state: AppState, id: DeliveryId, grant: Grant) {
    let _counted = state.metrics.websocket_session();
    let started = Instant::now();
    // Milliseconds since `started` at which the peer last sent anything.
    let heard_from = Arc::new(AtomicU64::new(0));
    let oversized = CancellationToken::new();
    let (sink, stream) = socket.split();
    let mut send = tokio::spawn(send_loop(
        sink,
        state,
        id,
        grant,
        (started, Arc::clone(&heard_from)),
        oversized.clone(),
    ));
    let mut receive = tokio::spawn(receive_loop(stream, started, heard_from, oversized.clone()));
    tokio::select! {
        _ = &mut send => receive.abort(),
        _ = &mut receive => end_after_receive(send, &oversized).await,
    }
    tracing::debug!(delivery = %id, "A tracking WebSocket session ended.");
}

/// Why the send loop stopped.
#[derive(Debug)]
enum End {
    /// Close with this frame.
    Close(u16, &'static str),
    /// The peer is gone or stuck: drop the connection.
    Drop,
}

/// Sends the snapshot, then the delivery's changes, pings, and the final close frame.
async fn send_loop(
    mut sink: SplitSink<WebSocket, Message>,
    state: AppState,
    id: DeliveryId,
    grant: Grant,
    (started, heard_from): (Instant, Arc<AtomicU64>),
    oversized: CancellationToken,
) {
    let end = tokio::select! {
        end = track(&mut sink, &state, id, grant, started, &heard_from) => end,
        () = oversized.cancelled() => End::Close(close_code::SIZE, MESSAGE_TOO_BIG),
    };
    if let End::Close(code, reason) = end {
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        let _ = tokio::time::timeout(
            state.config.ws_send_timeout,
            futures::SinkExt::send(&mut sink, Message::Close(Some(frame))),
        )
        .await;
    }
}

/// What the session knows of the delivery it follows.
#[derive(Debug)]
struct Tracker {
    /// The delivery.
    id: DeliveryId,
    /// Who watches: a courier's session ends when the delivery is no longer theirs.
    viewer: Principal,
    /// Its courier now: whose moves and zone changes are sent.
    courier: Option<CourierId>,
    /// The last epoch sent (in a snapshot or a change); older updates are skipped.
    last: Option<Epoch>,
}

/// The session's protocol: the snapshot, then per epoch what concerns the delivery, pings,
/// resyncs; returns how the session ends.
async fn track(
    sink: &mut SplitSink<WebSocket, Message>,
    state: &AppState,
    id: DeliveryId,
    grant: Grant,
    started: Instant,
    heard_from: &AtomicU64,
) -> End {
    let viewer = grant.principal;
    let expired = grant.expired();
    tokio::pin!(expired);
    let timeout = state.config.ws_send_timeout;
    let ping_every = state.config.ws_ping_interval;
    // Subscribe before taking the snapshot: every later epoch is then either in the
    // snapshot or received below (those already in it are skipped by epoch).
    let mut updates = state.read_model.subscribe();
    let mut tracker = match resync(sink, state, id, viewer, "connected", timeout).await {
        Ok(tracker) => tracker,
        Err(end) => return end,
    };
    let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
    loop {
        tokio::select! {
            () = state.shutdown.cancelled() => {
                return End::Close(close_code::AWAY, "the server is shutting down");
            }
            () = &mut expired => {
                return End::Close(CLOSE_TOKEN_EXPIRED, TOKEN_EXPIRED_REASON);
            }
            _ = ping.tick() => {
                let silent = millis_since(started).saturating_sub(heard_from.load(Ordering::Relaxed));
                if silent > 2 * duration_millis(ping_every) + duration_millis(timeout) {
                    tracing::info!(silent_ms = silent, "A tracking WebSocket peer stopped answering pings; closing it.");
                    return End::Close(close_code::POLICY, "no answer to pings");
                }
                if !send(sink, Message::Ping(Default::default()), timeout).await {
                    return End::Drop;
                }
            }
            update = updates.recv() => match update {
                Ok(update) => {
                    if tracker.last.is_some_and(|last| update.epoch <= last) {
                        continue;
                    }
                    tracker.last = Some(update.epoch);
                    let step = step(&tracker, &update);
                    for message in &step.messages {
                        if !send_json(sink, message, timeout).await {
                            return End::Drop;
                        }
                    }
                    match step.then {
                        Then::Continue => {}
                        Then::Resync => {
                            tracker = match resync(sink, state, id, viewer, "courier_changed", timeout).await {
                                Ok(tracker) => tracker,
                                Err(end) => return end,
                            };
                        }
                        Then::Close(reason) => return End::Close(close_code::NORMAL, reason),
                        Then::Revoked => return End::Close(CLOSE_REASSIGNED, REASSIGNED),
                    }
                }
                Err(RecvError::Lagged(missed)) => {
                    tracing::info!(missed, delivery = %id, "A tracking WebSocket client fell behind; sending it a fresh snapshot.");
                    tracker = match resync(sink, state, id, viewer, "lagged", timeout).await {
                        Ok(tracker) => tracker,
                        Err(end) => return end,
                    };
                }
                Err(RecvError::Closed) => {
                    return End::Close(close_code::AWAY, "the pipeline has stopped");
                }
            },
        }
    }
}

/// Sends a fresh snapshot of the delivery and returns the tracker that follows from it;
/// the end of the session when the delivery is gone or has ended, the viewer may no longer
/// see it, or the peer is gone.
async fn resync(
    sink: &mut SplitSink<WebSocket, Message>,
    state: &AppState,
    id: DeliveryId,
    viewer: Principal,
    reason: &'static str,
    timeout: Duration,
) -> Result<Tracker, End> {
    let Some(current) = current(state, id) else {
        return Err(End::Close(close_code::NORMAL, "delivery removed"));
    };
    if !may_see_delivery(&viewer, &current.delivery.details) {
        return Err(End::Close(CLOSE_REASSIGNED, REASSIGNED));
    }
    let tracker = Tracker {
        id,
        viewer,
        courier: current.delivery.details.courier_id,
        last: current.epoch,
    };
    let ended = current.delivery.details.status.is_terminal();
    let message = TrackMessage::Snapshot {
        reason,
        epoch: current.epoch,
        delivery: Box::new(current.delivery),
        courier: current.courier,
    };
    if !send_json(sink, &message, timeout).await {
        return Err(End::Drop);
    }
    if ended {
        return Err(End::Close(close_code::NORMAL, DELIVERY_ENDED));
    }
    Ok(tracker)
}

/// The delivery and its courier as of one epoch.
struct Current {
    /// The epoch.
    epoch: Option<Epoch>,
    /// The delivery.
    delivery: DeliveryView,
    /// Its courier's position, once assigned and located.
    courier: Option<CourierView>,
}

/// The delivery now; `None` when the read model does not hold it.
fn current(state: &AppState, id: DeliveryId) -> Option<Current> {
    state.read_model.with_state(|read| {
        let delivery = read.delivery(id)?;
        let courier = delivery.details.courier_id.and_then(|courier| {
            let position = read.couriers.get(&courier)?;
            let inside = read
                .inside
                .range((courier, ZoneId(uuid::Uuid::nil()))..)
                .take_while(|(c, _)| *c == courier)
                .map(|(_, zone)| *zone)
                .collect();
            Some(CourierView::new(courier, position, inside))
        });
        Some(Current {
            epoch: read.epoch,
            delivery,
            courier,
        })
    })
}

/// What to do after sending an epoch's messages.
#[derive(Debug, PartialEq)]
enum Then {
    /// Wait for the next epoch.
    Continue,
    /// The courier changed: send a fresh snapshot (its position, its zones).
    Resync,
    /// Close normally with this reason.
    Close(&'static str),
    /// The viewer (a courier) lost the delivery to another courier: close with
    /// [`CLOSE_REASSIGNED`].
    Revoked,
}

/// One epoch, as far as the tracked delivery is concerned.
#[derive(Debug, PartialEq)]
struct Step {
    /// To send, in order.
    messages: Vec<TrackMessage>,
    /// Then.
    then: Then,
}

/// Picks out of one epoch's changes those of the tracked delivery and of its courier.
fn step(tracker: &Tracker, update: &EpochUpdate) -> Step {
    let epoch = update.epoch;
    let mut status = None;
    let mut courier = Vec::new();
    let mut geofence = Vec::new();
    let mut eta = None;
    for change in &update.changes {
        match change {
            LiveChange::DeliveryStatus {
                delivery_id,
                status: now,
                previous_status,
                courier_id,
                version,
                ..
            } if *delivery_id == tracker.id => {
                status = Some(TrackMessage::Status {
                    epoch,
                    status: *now,
                    previous_status: *previous_status,
                    courier_id: *courier_id,
                    version: *version,
                });
            }
            LiveChange::DeliveryRemoved { delivery_id } if *delivery_id == tracker.id => {
                return Step {
                    messages: Vec::new(),
                    then: Then::Close("delivery removed"),
                };
            }
            LiveChange::CourierMoved {
                courier_id,
                position,
                at_ms,
                speed_mps,
                heading_deg,
                odometer_m,
            } if Some(*courier_id) == tracker.courier => {
                courier.push(TrackMessage::CourierMoved {
                    epoch,
                    courier_id: *courier_id,
                    position: *position,
                    at_ms: *at_ms,
                    speed_mps: *speed_mps,
                    heading_deg: *heading_deg,
                    odometer_m: *odometer_m,
                });
            }
            LiveChange::GeofenceEntered {
                courier_id,
                zone_id,
            } if Some(*courier_id) == tracker.courier => {
                geofence.push(TrackMessage::GeofenceEntered {
                    epoch,
                    courier_id: *courier_id,
                    zone_id: *zone_id,
                });
            }
            LiveChange::GeofenceExited {
                courier_id,
                zone_id,
            } if Some(*courier_id) == tracker.courier => {
                geofence.push(TrackMessage::GeofenceExited {
                    epoch,
                    courier_id: *courier_id,
                    zone_id: *zone_id,
                });
            }
            LiveChange::Eta {
                delivery_id,
                eta: estimate,
            } if *delivery_id == tracker.id => {
                eta = Some(TrackMessage::Eta {
                    epoch,
                    eta: estimate.clone(),
                });
            }
            LiveChange::EtaCleared { delivery_id } if *delivery_id == tracker.id => {
                eta = Some(TrackMessage::EtaCleared { epoch });
            }
            _ => {}
        }
    }
    let then = match &status {
        Some(TrackMessage::Status { courier_id, .. })
            if tracker.viewer.role == Role::Courier
                && courier_id.is_none_or(|courier| courier.0 != tracker.viewer.sub) =>
        {
            // Not theirs any more: not even the status that names the new courier, also when
            // the same epoch ended the delivery.
            return Step {
                messages: Vec::new(),
                then: Then::Revoked,
            };
        }
        Some(TrackMessage::Status { status: now, .. }) if now.is_terminal() => {
            // The final word: the rest of the epoch (the ETA withdrawn) is implied by it.
            return Step {
                messages: status.into_iter().collect(),
                then: Then::Close(DELIVERY_ENDED),
            };
        }
        Some(TrackMessage::Status { courier_id, .. }) if *courier_id != tracker.courier => {
            // The new courier's position and zones come with the fresh snapshot.
            return Step {
                messages: status.into_iter().collect(),
                then: Then::Resync,
            };
        }
        _ => Then::Continue,
    };
    Step {
        messages: status
            .into_iter()
            .chain(courier)
            .chain(geofence)
            .chain(eta)
            .collect(),
        then,
    }
}

async fn send_json(
    sink: &mut SplitSink<WebSocket, Message>,
    message: &TrackMessage,
    timeout: Duration,
) -> bool {
    match serde_json::to_string(message) {
        Ok(text) => send(sink, Message::Text(text.into()), timeout).await,
        Err(error) => {
            tracing::error!(%error, "A tracking message could not be serialized.");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    const DELIVERY: DeliveryId = DeliveryId(Uuid::from_u128(1));
    const COURIER: CourierId = CourierId(Uuid::from_u128(2));
    const OTHER: CourierId = CourierId(Uuid::from_u128(3));
    const ZONE: ZoneId = ZoneId(Uuid::from_u128(4));

    fn tracker(courier: Option<CourierId>) -> Tracker {
        Tracker {
            id: DELIVERY,
            viewer: Principal {
                sub: Uuid::from_u128(99),
                role: Role::Admin,
            },
            courier,
            last: Some(1),
        }
    }

    fn moved(courier_id: CourierId) -> LiveChange {
        LiveChange::CourierMoved {
            courier_id,
            position: LatLon {
                lat: 52.5,
                lon: 13.4,
            },
            at_ms: 1_000,
            speed_mps: None,
            heading_deg: None,
            odometer_m: 10.0,
        }
    }

    fn status(status: Status, courier_id: Option<CourierId>) -> LiveChange {
        LiveChange::DeliveryStatus {
            delivery_id: DELIVERY,
            status,
            previous_status: Some(Status::Assigned),
            courier_id,
            dropoff: LatLon {
                lat: 52.5,
                lon: 13.4,
            },
            version: 3,
        }
    }

    fn update(changes: Vec<LiveChange>) -> EpochUpdate {
        EpochUpdate {
            epoch: 2,
            changes,
            rejected: 0,
        }
    }

    fn types(step: &Step) -> Vec<String> {
        step.messages
            .iter()
            .map(|m| {
                serde_json::to_value(m)
                    .map(|v| v["type"].to_string())
                    .unwrap_or_default()
            })
            .collect()
    }

    #[test]
    fn only_the_delivery_and_its_courier_pass_in_a_fixed_order() {
        let step = step(
            &tracker(Some(COURIER)),
            &update(vec![
                moved(OTHER),
                moved(COURIER),
                LiveChange::GeofenceEntered {
                    courier_id: COURIER,
                    zone_id: ZONE,
                },
                LiveChange::GeofenceExited {
                    courier_id: OTHER,
                    zone_id: ZONE,
                },
                status(Status::PickedUp, Some(COURIER)),
                LiveChange::EtaCleared {
                    delivery_id: DeliveryId(Uuid::from_u128(9)),
                },
                LiveChange::EtaCleared {
                    delivery_id: DELIVERY,
                },
            ]),
        );
        assert_eq!(step.then, Then::Continue);
        assert_eq!(
            types(&step),
            [
                "\"status\"",
                "\"courier_moved\"",
                "\"geofence_entered\"",
                "\"eta_cleared\""
            ]
        );
        assert!(
            step.messages
                .iter()
                .all(|m| { serde_json::to_value(m).is_ok_and(|v| v["epoch"] == 2) })
        );
    }

    #[test]
    fn an_end_a_new_courier_and_a_removal_are_told_apart() {
        let ended = step(
            &tracker(Some(COURIER)),
            &update(vec![
                moved(COURIER),
                status(Status::Delivered, Some(COURIER)),
            ]),
        );
        assert_eq!(ended.then, Then::Close(DELIVERY_ENDED));
        assert_eq!(types(&ended), ["\"status\""]);

        let assigned = step(
            &tracker(None),
            &update(vec![
                moved(COURIER),
                status(Status::Assigned, Some(COURIER)),
            ]),
        );
        assert_eq!(assigned.then, Then::Resync);
        assert_eq!(types(&assigned), ["\"status\""]);

        let removed = step(
            &tracker(Some(COURIER)),
            &update(vec![LiveChange::DeliveryRemoved {
                delivery_id: DELIVERY,
            }]),
        );
        assert_eq!(removed.then, Then::Close("delivery removed"));

        let nothing = step(&tracker(None), &update(vec![moved(COURIER), moved(OTHER)]));
        assert_eq!((nothing.messages.len(), nothing.then), (0, Then::Continue));
    }

    #[test]
    fn a_courier_loses_the_stream_when_the_delivery_goes_to_another() {
        let as_courier = |courier: CourierId| Tracker {
            viewer: Principal {
                sub: courier.0,
                role: Role::Courier,
            },
            ..tracker(Some(courier))
        };
        let reassigned = step(
            &as_courier(COURIER),
            &update(vec![moved(OTHER), status(Status::Assigned, Some(OTHER))]),
        );
        assert_eq!(reassigned.then, Then::Revoked);
        assert!(
            reassigned.messages.is_empty(),
            "the new courier is not named"
        );
        // Reassigned and ended in the same epoch: the final status names the new courier too.
        let reassigned_and_ended = step(
            &as_courier(COURIER),
            &update(vec![
                status(Status::Assigned, Some(OTHER)),
                status(Status::Cancelled, Some(OTHER)),
            ]),
        );
        assert_eq!(reassigned_and_ended.then, Then::Revoked);
        assert!(reassigned_and_ended.messages.is_empty());
        // Their own delivery's end still closes as ended.
        let ended = step(
            &as_courier(COURIER),
            &update(vec![status(Status::Delivered, Some(COURIER))]),
        );
        assert_eq!(ended.then, Then::Close(DELIVERY_ENDED));
        // Their own progress goes on as before.
        let own = step(
            &as_courier(COURIER),
            &update(vec![status(Status::PickedUp, Some(COURIER))]),
        );
        assert_eq!((own.messages.len(), own.then), (1, Then::Continue));
        // Customers and admins follow the new courier.
        let customer = Tracker {
            viewer: Principal {
                sub: Uuid::from_u128(7),
                role: Role::Customer,
            },
            ..tracker(Some(COURIER))
        };
        let followed = step(
            &customer,
            &update(vec![status(Status::Assigned, Some(OTHER))]),
        );
        assert_eq!(followed.then, Then::Resync);
    }
}
