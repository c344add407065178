//! `WS /ws/track/{delivery_id}` over a real WebSocket: who may track, the snapshot, the
//! delivery's changes epoch by epoch (produced by sending events for it through the real
//! dataflow), the resync of a client that fell behind, the close when the delivery ends
//! and at shutdown, and the gauge of open sessions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fleet;

use std::net::SocketAddr;
use std::time::Duration;

use delivertrack_api::{ApiConfig, AppState, Role};
use delivertrack_dataflow::event::StatusChanged;
use delivertrack_dataflow::geometry::GeoPoint;
use delivertrack_dataflow::{CourierId, DeliveryId, EventBody, Status};
use delivertrack_sinks::read_model::DeliveryView;
use fleet::{CUSTOMER, Fleet, code, get, serve, token};
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How the token travels.
#[derive(Clone, Copy)]
enum Via {
    Header,
    Query,
}

/// Opens a tracking socket; the HTTP status of a refused upgrade otherwise.
async fn track(
    addr: SocketAddr,
    delivery: &str,
    token: Option<&str>,
    via: Via,
) -> Result<Socket, u16> {
    let mut url = format!("ws://{addr}/ws/track/{delivery}");
    if let (Some(token), Via::Query) = (token, via) {
        url.push_str(&format!("?access_token={token}"));
    }
    let mut request = url.into_client_request().unwrap();
    if let (Some(token), Via::Header) = (token, via) {
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((socket, _)) => Ok(socket),
        Err(WsError::Http(response)) => Err(response.status().as_u16()),
        Err(other) => panic!("the upgrade failed: {other}"),
    }
}

/// What the server sent next, pings and pongs skipped: a JSON message, or the close frame.
#[derive(Debug)]
enum Received {
    Json(Value),
    Close(Option<(CloseCode, String)>),
}

async fn next(socket: &mut Socket) -> Received {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .expect("a message within 10 s")
            .expect("the socket is open")
            .expect("a valid frame");
        match message {
            Message::Text(text) => return Received::Json(serde_json::from_str(&text).unwrap()),
            Message::Close(frame) => {
                return Received::Close(frame.map(|f| (f.code, f.reason.to_string())));
            }
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

async fn next_json(socket: &mut Socket) -> Value {
    match next(socket).await {
        Received::Json(value) => value,
        Received::Close(frame) => panic!("closed early: {frame:?}"),
    }
}

fn epoch(message: &Value) -> u64 {
    message["epoch"].as_u64().unwrap()
}

/// Waits until the gauge of open sessions reads `expected`.
async fn gauge_reaches(state: &AppState, expected: i64) {
    for _ in 0..200 {
        if state.metrics.websocket_connections.get() == expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "the gauge stayed at {}, not {expected}",
        state.metrics.websocket_connections.get()
    );
}

/// Where the courier of an active delivery is heading: the pickup until it has the
/// parcel, then the dropoff. Moving there shortens the distance the ETA is for.
fn next_stop(delivery: &DeliveryView) -> GeoPoint {
    let stop = if delivery.details.picked_up_at_ms.is_none() {
        delivery.details.pickup
    } else {
        delivery.details.dropoff
    };
    GeoPoint::from_degrees(stop.lat, stop.lon)
}

fn state(fleet: &Fleet) -> AppState {
    AppState::new(fleet.model.clone(), CancellationToken::new())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tracker_sees_its_delivery_and_nothing_else() {
    let mut fleet = Fleet::new(11, 10, 64);
    let state = state(&fleet);
    let addr = serve(state.clone()).await;
    let tracked = fleet.tracked_delivery();
    let id = tracked.details.delivery_id;
    let courier = tracked.details.courier_id.unwrap();
    let owner = token(&state, Role::Customer, tracked.details.customer_id.0);
    let mut socket = track(addr, &id.to_string(), Some(&owner), Via::Header)
        .await
        .unwrap();

    let snapshot = next_json(&mut socket).await;
    assert_eq!(snapshot["type"], "snapshot");
    assert_eq!(snapshot["reason"], "connected");
    assert_eq!(epoch(&snapshot), fleet.model.epoch().unwrap());
    assert_eq!(
        snapshot["delivery"],
        serde_json::to_value(fleet.model.delivery(id).unwrap()).unwrap()
    );
    assert!(snapshot["delivery"]["eta"]["eta_ms"].is_i64());
    assert_eq!(snapshot["courier"]["courier_id"], courier.to_string());
    let located = fleet.model.courier(courier).unwrap();
    assert_eq!(
        snapshot["courier"]["position"],
        serde_json::to_value(located.courier.position).unwrap()
    );
    let mut last = epoch(&snapshot);

    // Two epochs in which the courier moves towards the dropoff (and another courier
    // moves too): each brings this courier's move and a new ETA, in increasing epochs.
    let other = fleet
        .model
        .with_state(|read| read.couriers.keys().copied().find(|c| *c != courier))
        .unwrap();
    let dropoff = next_stop(&tracked);
    let mut etas = Vec::new();
    for _ in 0..2 {
        let events = vec![
            fleet.move_towards(courier, dropoff, 0.3),
            fleet.move_towards(other, dropoff, 0.3),
        ];
        let output = fleet.apply(events);
        let (mut moved, mut eta) = (None, None);
        while moved.is_none() || eta.is_none() {
            let message = next_json(&mut socket).await;
            assert_eq!(epoch(&message), output.epoch, "{message}");
            assert!(epoch(&message) > last);
            match message["type"].as_str().unwrap() {
                "courier_moved" => {
                    assert_eq!(
                        message["courier_id"],
                        courier.to_string(),
                        "only its courier"
                    );
                    moved = Some(message);
                }
                "eta" => eta = Some(message),
                "geofence_entered" | "geofence_exited" => {
                    assert_eq!(message["courier_id"], courier.to_string());
                }
                other => panic!("unexpected {other}: {message}"),
            }
        }
        let moved = moved.unwrap();
        let eta = eta.unwrap();
        let now = fleet.model.courier(courier).unwrap();
        assert_eq!(
            moved["position"],
            serde_json::to_value(now.courier.position).unwrap()
        );
        assert_eq!(
            eta["eta_ms"],
            serde_json::to_value(
                fleet
                    .model
                    .delivery(id)
                    .unwrap()
                    .details
                    .eta
                    .unwrap()
                    .eta_ms
            )
            .unwrap()
        );
        assert_eq!(eta["courier_id"], courier.to_string());
        etas.push((
            eta["remaining_m"].as_u64().unwrap(),
            eta["as_of_ms"].as_i64().unwrap(),
        ));
        last = output.epoch;
    }
    assert!(etas[1].0 < etas[0].0, "closer to the dropoff: {etas:?}");
    assert!(etas[1].1 > etas[0].1, "{etas:?}");

    // An epoch that does not concern the delivery sends nothing: the next message is the
    // one of the epoch after it.
    fleet.apply(vec![fleet.move_towards(other, dropoff, 0.1)]);
    let output = fleet.apply(vec![fleet.move_towards(courier, dropoff, 0.1)]);
    let message = next_json(&mut socket).await;
    assert_eq!(epoch(&message), output.epoch, "{message}");

    socket.close(None).await.unwrap();
    gauge_reaches(&state, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_customer_the_courier_and_admins_may_track() {
    let fleet = Fleet::new(12, 10, 64);
    let state = state(&fleet);
    let addr = serve(state.clone()).await;
    let tracked = fleet.tracked_delivery();
    let id = tracked.details.delivery_id.to_string();
    let courier = tracked.details.courier_id.unwrap().0;
    let customer = tracked.details.customer_id.0;

    // Allowed: header or query parameter alike.
    let allowed = [
        (Role::Customer, customer, Via::Header),
        (Role::Customer, customer, Via::Query),
        (Role::Courier, courier, Via::Header),
        (Role::Admin, Uuid::new_v4(), Via::Query),
    ];
    for (role, sub, via) in allowed {
        let mut socket = track(addr, &id, Some(&token(&state, role, sub)), via)
            .await
            .unwrap_or_else(|status| panic!("{role:?} refused with {status}"));
        assert_eq!(next_json(&mut socket).await["type"], "snapshot");
    }
    // Refused before the upgrade.
    let stranger = token(&state, Role::Customer, Uuid::new_v4());
    let other_courier = token(&state, Role::Courier, Uuid::new_v4());
    let admin = token(&state, Role::Admin, Uuid::new_v4());
    let unknown = Uuid::new_v4().to_string();
    let refused = [
        (id.as_str(), Some(stranger.as_str()), 404),
        (id.as_str(), Some(other_courier.as_str()), 404),
        (unknown.as_str(), Some(admin.as_str()), 404),
        (id.as_str(), None, 401),
        (id.as_str(), Some("not.a.token"), 401),
        ("42", Some(admin.as_str()), 400),
    ];
    for (delivery, token, expected) in refused {
        for via in [Via::Header, Via::Query] {
            let refused = track(addr, delivery, token, via).await;
            assert_eq!(refused.err(), Some(expected), "{delivery} {token:?}");
        }
    }
    // A delivery not yet assigned: its customer may track it, no courier may.
    let own = DeliveryId(Uuid::from_u128(0xd0_0000));
    let own_view = fleet.model.delivery(own).unwrap();
    let mine = token(&state, Role::Customer, CUSTOMER);
    assert!(
        track(addr, &own.to_string(), Some(&mine), Via::Header)
            .await
            .is_ok()
    );
    if own_view.details.courier_id.is_none() {
        let refused = track(
            addr,
            &own.to_string(),
            Some(&token(&state, Role::Courier, courier)),
            Via::Header,
        )
        .await;
        assert_eq!(refused.err(), Some(404));
    }
    // Not a WebSocket request: a JSON error, not a plain-text one.
    let (status, body) = get(addr, &format!("/ws/track/{id}"), Some(&admin)).await;
    assert_eq!((status, code(&body)), (400, "websocket_required"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_closes_once_the_delivery_ends() {
    let mut fleet = Fleet::new(13, 10, 64);
    let state = state(&fleet);
    let addr = serve(state.clone()).await;
    let tracked = fleet.tracked_delivery();
    let id = tracked.details.delivery_id;
    let admin = token(&state, Role::Admin, Uuid::new_v4());
    let mut socket = track(addr, &id.to_string(), Some(&admin), Via::Header)
        .await
        .unwrap();
    let snapshot = next_json(&mut socket).await;
    assert_eq!(state.metrics.websocket_connections.get(), 1);

    let output = fleet.apply(vec![fleet.status(id, Status::Cancelled)]);
    let message = next_json(&mut socket).await;
    assert_eq!(message["type"], "status", "{message}");
    assert_eq!(message["status"], "cancelled");
    assert_eq!(message["previous_status"], snapshot["delivery"]["status"]);
    assert_eq!(epoch(&message), output.epoch);
    assert!(epoch(&message) > epoch(&snapshot));
    match next(&mut socket).await {
        Received::Close(Some((code, reason))) => {
            assert_eq!(
                (code, reason.as_str()),
                (CloseCode::Normal, "delivery ended")
            );
        }
        other => panic!("expected the close frame, got {other:?}"),
    }
    gauge_reaches(&state, 0).await;

    // Tracking a delivery that has already ended: its snapshot, then the same close.
    let mut socket = track(addr, &id.to_string(), Some(&admin), Via::Header)
        .await
        .unwrap();
    let snapshot = next_json(&mut socket).await;
    assert_eq!(snapshot["delivery"]["status"], "cancelled");
    assert!(matches!(
        next(&mut socket).await,
        Received::Close(Some((CloseCode::Normal, reason))) if reason == "delivery ended"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_with_going_away() {
    let fleet = Fleet::new(14, 8, 64);
    let state = state(&fleet);
    let addr = serve(state.clone()).await;
    let tracked = fleet.tracked_delivery();
    let admin = token(&state, Role::Admin, Uuid::new_v4());
    let mut socket = track(
        addr,
        &tracked.details.delivery_id.to_string(),
        Some(&admin),
        Via::Header,
    )
    .await
    .unwrap();
    next_json(&mut socket).await;
    state.shutdown.cancel();
    match next(&mut socket).await {
        Received::Close(Some((code, _))) => assert_eq!(code, CloseCode::Away),
        other => panic!("expected the close frame, got {other:?}"),
    }
    gauge_reaches(&state, 0).await;
}

/// One thread: while the test applies epochs, the session cannot run, so the broadcast
/// (two epochs deep) overflows for it exactly as for a client that cannot keep up.
#[tokio::test(flavor = "current_thread")]
async fn a_tracker_that_falls_behind_gets_a_fresh_snapshot() {
    let mut fleet = Fleet::new(15, 10, 2);
    let state = state(&fleet);
    let addr = serve(state.clone()).await;
    let tracked = fleet.tracked_delivery();
    let id = tracked.details.delivery_id;
    let courier = tracked.details.courier_id.unwrap();
    let owner = token(&state, Role::Customer, tracked.details.customer_id.0);
    let mut socket = track(addr, &id.to_string(), Some(&owner), Via::Query)
        .await
        .unwrap();
    let first = next_json(&mut socket).await;
    let dropoff = next_stop(&tracked);
    for _ in 0..6 {
        let event = fleet.move_towards(courier, dropoff, 0.1);
        fleet.apply(vec![event]);
    }
    let resync = next_json(&mut socket).await;
    assert_eq!(
        (&resync["type"], &resync["reason"]),
        (&"snapshot".into(), &"lagged".into())
    );
    assert_eq!(epoch(&resync), fleet.model.epoch().unwrap());
    assert!(epoch(&resync) >= epoch(&first) + 6);
    assert_eq!(
        resync["delivery"],
        serde_json::to_value(fleet.model.delivery(id).unwrap()).unwrap()
    );
    assert_eq!(
        resync["courier"]["position"],
        serde_json::to_value(fleet.model.courier(courier).unwrap().courier.position).unwrap()
    );
    // And it goes on from there.
    let output = fleet.apply(vec![fleet.move_towards(courier, dropoff, 0.1)]);
    let message = next_json(&mut socket).await;
    assert_eq!(
        (message["type"].as_str(), epoch(&message)),
        (Some("courier_moved"), output.epoch)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gauge_counts_both_websockets_and_silent_peers_are_pinged() {
    let fleet = Fleet::new(16, 8, 64);
    let config = ApiConfig {
        ws_ping_interval: Duration::from_millis(100),
        ..ApiConfig::default()
    };
    let registry = prometheus::Registry::new();
    let state = state(&fleet)
        .with_config(config)
        .with_registry(registry.clone());
    let addr = serve(state.clone()).await;
    let tracked = fleet.tracked_delivery();
    let admin = token(&state, Role::Admin, Uuid::new_v4());

    let mut tracker = track(
        addr,
        &tracked.details.delivery_id.to_string(),
        Some(&admin),
        Via::Header,
    )
    .await
    .unwrap();
    let (mut changes, _) =
        tokio_tungstenite::connect_async(format!("ws://{addr}/ws/changes?access_token={admin}"))
            .await
            .unwrap();
    gauge_reaches(&state, 2).await;
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    assert!(
        text.contains("delivertrack_websocket_connections 2"),
        "the gauge is registered in the state's registry: {text}"
    );

    // A ping arrives (the client library answers it).
    next_json(&mut tracker).await;
    let ping = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(Ok(Message::Ping(_))) = tracker.next().await {
                return;
            }
        }
    })
    .await;
    assert!(ping.is_ok(), "no ping within 5 s");

    changes.close(None).await.unwrap();
    gauge_reaches(&state, 1).await;
    tracker.send(Message::Close(None)).await.unwrap();
    gauge_reaches(&state, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tracker_follows_the_courier_once_one_is_assigned() {
    let mut fleet = Fleet::new(17, 6, 64);
    let state = state(&fleet);
    let addr = serve(state.clone()).await;
    // One of our customer's own deliveries: no dispatcher assigns it.
    let id = DeliveryId(Uuid::from_u128(0xd0_0001));
    assert_eq!(
        fleet.model.delivery(id).unwrap().details.status,
        Status::Created
    );
    let mine = token(&state, Role::Customer, CUSTOMER);
    let mut socket = track(addr, &id.to_string(), Some(&mine), Via::Header)
        .await
        .unwrap();
    let snapshot = next_json(&mut socket).await;
    assert_eq!(snapshot["courier"], Value::Null);

    // Couriers move, none of them this delivery's: nothing is sent.
    let courier: CourierId = fleet
        .model
        .with_state(|read| read.couriers.keys().next().copied())
        .unwrap();
    let pickup = fleet.model.delivery(id).unwrap().details.pickup;
    let pickup = GeoPoint::from_degrees(pickup.lat, pickup.lon);
    fleet.apply(vec![fleet.move_towards(courier, pickup, 0.2)]);

    let assigned = fleet.apply(vec![fleet::event(
        fleet.simulator.now() + 2_000,
        EventBody::StatusChanged(StatusChanged {
            delivery_id: id,
            status: Status::Assigned,
            courier_id: Some(courier),
        }),
    )]);
    let message = next_json(&mut socket).await;
    assert_eq!(
        message["type"], "status",
        "the move before was not sent: {message}"
    );
    assert_eq!(
        (&message["status"], &message["previous_status"]),
        (&"assigned".into(), &"created".into())
    );
    assert_eq!(message["courier_id"], courier.to_string());
    assert_eq!(epoch(&message), assigned.epoch);
    let resync = next_json(&mut socket).await;
    assert_eq!(resync["reason"], "courier_changed", "{resync}");
    assert_eq!(resync["courier"]["courier_id"], courier.to_string());
    assert_eq!(
        resync["courier"]["position"],
        serde_json::to_value(fleet.model.courier(courier).unwrap().courier.position).unwrap()
    );

    // From now on the new courier's moves come, with the ETA they give.
    let moved = fleet.apply(vec![fleet.move_towards(courier, pickup, 0.2)]);
    let mut kinds = Vec::new();
    while !(kinds.contains(&"courier_moved".to_owned()) && kinds.contains(&"eta".to_owned())) {
        let message = next_json(&mut socket).await;
        assert_eq!(epoch(&message), moved.epoch, "{message}");
        kinds.push(message["type"].as_str().unwrap().to_owned());
    }
}
