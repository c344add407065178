//! A simulated fleet run through the real dataflow into a read model, and the API served
//! over loopback: the common ground of `tests/reads.rs` and `tests/track.rs`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;

use delivertrack_api::{AppState, Role};
use delivertrack_dataflow::event::{DeliveryCreated, LocationUpdated, StatusChanged};
use delivertrack_dataflow::geometry::GeoPoint;
use delivertrack_dataflow::pipeline::{self, DataflowConfig, EpochReceiver, EpochSender};
use delivertrack_dataflow::{
    CourierId, CustomerId, DeliveryId, EpochOutput, Event, EventBody, EventId, Status,
};
use delivertrack_ingest::{FleetSimulator, SimulatorConfig};
use delivertrack_sinks::read_model::DeliveryView;
use delivertrack_sinks::{ReadModel, ReadModelConfig};
use serde_json::Value;
use tokio::net::TcpListener;
use uuid::Uuid;

/// Monday 2026-11-30, 08:00 UTC.
pub const START_MS: i64 = 1_796_025_600_000;
/// Simulated time per epoch.
pub const STEP_MS: i64 = 120_000;
/// A customer of our own, with several deliveries.
pub const CUSTOMER: Uuid = Uuid::from_u128(0xc0ffee);
/// How many deliveries [`CUSTOMER`] orders.
pub const OWN_DELIVERIES: u128 = 6;

/// A fleet, the dataflow it feeds, and the read model that follows it.
pub struct Fleet {
    pub model: ReadModel,
    pub simulator: FleetSimulator,
    input: EpochSender,
    output: EpochReceiver,
    /// Every epoch's output so far, applied to the model or not.
    pub outputs: Vec<Arc<EpochOutput>>,
}

impl Fleet {
    /// `epochs` simulated epochs of a 20-courier city (a fix every 5 s, 3 orders a minute),
    /// plus [`OWN_DELIVERIES`] deliveries of [`CUSTOMER`] in the second epoch, applied to a
    /// read model whose live stream buffers `live_capacity` epochs.
    pub fn new(seed: u64, epochs: usize, live_capacity: usize) -> Self {
        let config = SimulatorConfig {
            couriers: 20,
            seed,
            deliveries_per_minute: 3.0,
            fix_interval_ms: 5_000,
            rating_rate: 0.9,
            ..SimulatorConfig::default()
        };
        let simulator = FleetSimulator::new(config, START_MS);
        let (input, output) = pipeline::start(DataflowConfig::default()).unwrap();
        let mut fleet = Self {
            model: ReadModel::new(ReadModelConfig { live_capacity }),
            simulator,
            input,
            output,
            outputs: Vec::new(),
        };
        for epoch in 0..epochs {
            let mut events = if epoch == 0 {
                fleet.simulator.initial_events()
            } else {
                Vec::new()
            };
            events.extend(fleet.simulator.step(STEP_MS));
            if epoch == 1 {
                let now = fleet.simulator.now();
                events.extend((0..OWN_DELIVERIES).map(|n| {
                    event(
                        now - 1_000 * n as i64,
                        EventBody::DeliveryCreated(DeliveryCreated {
                            delivery_id: DeliveryId(Uuid::from_u128(0xd0_0000 + n)),
                            customer_id: CustomerId(CUSTOMER),
                            pickup: GeoPoint::from_degrees(52.52, 13.40),
                            dropoff: GeoPoint::from_degrees(52.53, 13.41 + 0.001 * n as f64),
                            promised_by: Some(now + 3_600_000),
                        }),
                    )
                }));
            }
            let output = fleet.run(events);
            fleet.model.apply(&output);
        }
        fleet
    }

    /// Runs one epoch of `events` through the dataflow; the output is not applied.
    pub fn run(&mut self, events: Vec<Event>) -> Arc<EpochOutput> {
        self.input.send(events).unwrap();
        let output = Arc::new(
            self.output
                .recv()
                .expect("the dataflow outputs every epoch"),
        );
        self.outputs.push(Arc::clone(&output));
        output
    }

    /// One more simulated step, applied to the model.
    pub fn step(&mut self) -> Arc<EpochOutput> {
        let events = self.simulator.step(STEP_MS);
        let output = self.run(events);
        self.model.apply(&output);
        output
    }

    /// Runs `events` and applies the epoch to the model.
    pub fn apply(&mut self, events: Vec<Event>) -> Arc<EpochOutput> {
        let output = self.run(events);
        self.model.apply(&output);
        output
    }

    /// A fix of `courier` a step of `fraction` of the way from where it is towards
    /// `target`, a second after its newest fix.
    pub fn move_towards(&self, courier: CourierId, target: GeoPoint, fraction: f64) -> Event {
        let state = self
            .model
            .with_state(|read| read.couriers.get(&courier).cloned())
            .expect("a located courier");
        let from = state.position;
        let lat = from.lat() + (target.lat() - from.lat()) * fraction;
        let lon = from.lon() + (target.lon() - from.lon()) * fraction;
        let to = GeoPoint::from_degrees(lat, lon);
        // At least a second later, and never faster than 30 m/s: the dataflow refuses an
        // implausible jump.
        let after_ms = (from.distance_m(&to) / 30.0 * 1_000.0).ceil().max(1_000.0) as i64;
        event(
            state.at + after_ms,
            EventBody::LocationUpdated(LocationUpdated {
                courier_id: courier,
                position: to,
                speed_mm_s: Some(6_000),
                heading_ddeg: None,
                accuracy_cm: None,
            }),
        )
    }

    /// A status change of `delivery`, a second after the newest event so far.
    pub fn status(&self, delivery: DeliveryId, status: Status) -> Event {
        event(
            self.simulator.now() + 1_000,
            EventBody::StatusChanged(StatusChanged {
                delivery_id: delivery,
                status,
                courier_id: None,
            }),
        )
    }

    /// An active delivery (assigned, picked up, in transit) with an ETA and a located
    /// courier that has no other active delivery.
    pub fn tracked_delivery(&self) -> DeliveryView {
        self.model
            .with_state(|read| {
                read.deliveries
                    .iter()
                    .filter(|(id, d)| {
                        d.status.is_active()
                            && read.etas.contains_key(id)
                            && d.courier_id.is_some_and(|c| {
                                read.couriers.contains_key(&c)
                                    && read
                                        .deliveries
                                        .values()
                                        .filter(|o| o.courier_id == Some(c) && o.status.is_active())
                                        .count()
                                        == 1
                            })
                    })
                    .map(|(id, _)| *id)
                    .next()
            })
            .and_then(|id| self.model.delivery(id))
            .expect("an active delivery with an ETA")
    }
}

/// An event with a fresh id.
pub fn event(occurred_at: i64, body: EventBody) -> Event {
    Event {
        event_id: EventId(Uuid::new_v4()),
        occurred_at,
        body,
    }
}

/// Serves the whole API on a loopback port until the state's shutdown token fires.
pub async fn serve(state: AppState) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(delivertrack_api::serve(listener, state));
    addr
}

/// A token of `role` for `sub`.
pub fn token(state: &AppState, role: Role, sub: Uuid) -> String {
    state.auth.issue(role, sub).unwrap()
}

/// `GET` with an optional bearer token: the status and the JSON body.
pub async fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut request = reqwest::Client::new().get(format!("http://{addr}{path}"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body)
}

/// `PUT` of a JSON body with a bearer token: the status and the JSON body.
pub async fn put(addr: SocketAddr, path: &str, token: &str, body: &Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .put(format!("http://{addr}{path}"))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body)
}

/// The error code of an error body.
pub fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<no code>")
}
