//! The derived-event sink against the real RabbitMQ (`RABBITMQ_URL`, by default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`).
//!
//! Every test publishes to an exchange of its own (a random suffix) and reads what arrived
//! from a queue of its own bound with `#`; both are deleted at the end, also when the test
//! fails. The epochs are real: the fleet simulator's stream, or hand-made events for the
//! precise cases, run through the real dataflow.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use delivertrack_dataflow::event::{
    DeliveryCreated, DeliveryRated, Event, EventBody, LocationUpdated, StatusChanged,
};
use delivertrack_dataflow::geometry::GeoPoint;
use delivertrack_dataflow::model::DeliveryState;
use delivertrack_dataflow::pipeline::{self, DataflowConfig};
use delivertrack_dataflow::{
    Change, CourierId, CustomerId, DeliveryId, EpochOutput, EventId, Status,
};
use delivertrack_ingest::testing::{
    TcpProxy, TopologyGuard, broker_addr, rabbitmq_url, unique_config, url_via,
};
use delivertrack_ingest::{FleetSimulator, SimulatorConfig};
use delivertrack_sinks::derived::{DerivedConfig, DerivedSink};
use delivertrack_sinks::{Sink, SinkError};
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use serde_json::Value;
use uuid::Uuid;

/// Monday 2026-11-30, 08:00 UTC.
const START_MS: i64 = 1_796_025_600_000;

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

/// A test's own exchange and the queue that sees everything published to it.
struct Feed {
    config: DerivedConfig,
    queue: String,
    _connection: Connection,
    channel: Channel,
    _cleanup: TopologyGuard,
}

/// One message as it arrived.
#[derive(Debug, Clone)]
struct Received {
    routing_key: String,
    body: Value,
}

impl Received {
    fn kind(&self) -> &str {
        self.body["kind"].as_str().unwrap()
    }
    fn event_id(&self) -> &str {
        self.body["event_id"].as_str().unwrap()
    }
    fn str(&self, key: &str) -> &str {
        self.body[key]
            .as_str()
            .unwrap_or_else(|| panic!("{key} in {}", self.body))
    }
}

impl Feed {
    /// Names the exchange and queue, with `eta_threshold`; the cleanup guard is armed before
    /// anything exists.
    fn names(test: &str, eta_threshold: Duration) -> (DerivedConfig, TopologyGuard, String) {
        let names = unique_config(&format!("derived.{test}"));
        let config = DerivedConfig {
            url: rabbitmq_url(),
            exchange: names.exchange.clone(),
            eta_threshold,
            confirm_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            connection_name: names.connection_name.clone(),
        };
        (config, TopologyGuard::new(&names), names.queue.clone())
    }

    /// Binds the test queue (the sink declared the exchange when it connected).
    async fn bind(config: DerivedConfig, cleanup: TopologyGuard, queue: String) -> Feed {
        let connection = Connection::connect(&rabbitmq_url(), ConnectionProperties::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_bind(
                queue.as_str().into(),
                config.exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        Feed {
            config,
            queue,
            _connection: connection,
            channel,
            _cleanup: cleanup,
        }
    }

    /// A sink on this feed's exchange and its queue bound.
    async fn start(test: &str, eta_threshold: Duration) -> (Feed, DerivedSink) {
        let (config, cleanup, queue) = Feed::names(test, eta_threshold);
        let sink = DerivedSink::connect(config.clone()).await.unwrap();
        (Feed::bind(config, cleanup, queue).await, sink)
    }

    /// Everything in the queue now. A commit returns only after the broker confirmed its
    /// messages, and a confirmed message is in every queue it was routed to: nothing is
    /// still on its way.
    async fn drain(&self) -> Vec<Received> {
        let mut received = Vec::new();
        while let Some(message) = self
            .channel
            .basic_get(self.queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            let delivery = message.delivery;
            let properties = &delivery.properties;
            assert_eq!(
                properties.content_type().as_ref().map(|s| s.as_str()),
                Some("application/json")
            );
            assert_eq!(*properties.delivery_mode(), Some(2), "persistent");
            let body: Value = serde_json::from_slice(&delivery.data).unwrap();
            assert_eq!(
                properties.message_id().as_ref().map(|s| s.to_string()),
                body["event_id"].as_str().map(str::to_owned),
                "message_id carries the event id"
            );
            let routing_key = delivery.routing_key.to_string();
            assert_eq!(body["kind"].as_str(), Some(routing_key.as_str()));
            assert_eq!(body["v"], 1);
            received.push(Received { routing_key, body });
        }
        received
    }
}

fn id(n: u128) -> Uuid {
    Uuid::from_u128(0xd0e1_0000_0000_0000_0000_0000_0000_0000 | n)
}

fn event(n: u128, occurred_at: i64, body: EventBody) -> Event {
    Event {
        event_id: EventId(id(n)),
        occurred_at,
        body,
    }
}

fn rfc3339(millis: i64) -> String {
    chrono::DateTime::from_timestamp_millis(millis)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

fn millis(text: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(text)
        .unwrap()
        .timestamp_millis()
}

/// `(courier, zone)` of every `inside` change of `output` with sign `sign`.
fn inside(output: &EpochOutput, sign: i64) -> BTreeSet<(String, String)> {
    output
        .changes
        .iter()
        .filter_map(|(change, diff)| match change {
            Change::Inside(c, z) if diff.signum() == sign => Some((c.to_string(), z.to_string())),
            _ => None,
        })
        .collect()
}

/// `(courier_id, zone_id)` of the received messages of `kind`.
fn transitions(received: &[Received], kind: &str) -> Vec<(String, String)> {
    received
        .iter()
        .filter(|m| m.kind() == kind)
        .map(|m| (m.str("courier_id").to_owned(), m.str("zone_id").to_owned()))
        .collect()
}

/// The deliveries that reached a terminal status in `output`, with their new state.
fn ended(output: &EpochOutput) -> BTreeMap<String, DeliveryState> {
    let mut old = BTreeMap::new();
    let mut new = BTreeMap::new();
    for (change, diff) in &output.changes {
        if let Change::Delivery(id, state) = change {
            let side = if *diff > 0 { &mut new } else { &mut old };
            side.insert(id.to_string(), state.clone());
        }
    }
    new.into_iter()
        .filter(|(id, state): &(String, DeliveryState)| {
            state.status.is_terminal()
                && old
                    .get(id)
                    .is_none_or(|o: &DeliveryState| !o.status.is_terminal())
        })
        .collect()
}

/// The simulator's city through the dataflow: one epoch per `step_ms` of simulated time.
fn simulated_epochs(seed: u64, epochs: usize, step_ms: i64) -> Vec<Arc<EpochOutput>> {
    let config = SimulatorConfig {
        couriers: 20,
        seed,
        deliveries_per_minute: 3.0,
        rating_rate: 0.8,
        ..SimulatorConfig::default()
    };
    let mut simulator = FleetSimulator::new(config, START_MS);
    let (mut input, mut output) = pipeline::start(DataflowConfig::default()).unwrap();
    let mut outputs = Vec::new();
    for epoch in 0..epochs {
        let mut events = if epoch == 0 {
            simulator.initial_events()
        } else {
            Vec::new()
        };
        events.extend(simulator.step(step_ms));
        input.send(events).unwrap();
        outputs.push(Arc::new(output.recv().unwrap()));
    }
    input.close();
    outputs
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

/// A simulated city: every `inside` ±1 is exactly one entered/exited message, every
/// delivery that ends is one `delivery.completed` with its duration and on-time flag, every
/// `eta.updated` moved beyond the threshold from the one before it, and no id repeats.
#[tokio::test]
async fn a_simulated_city_publishes_one_message_per_transition_and_completion() {
    let threshold = Duration::from_secs(60);
    let outputs = tokio::task::spawn_blocking(|| simulated_epochs(7, 25, 60_000))
        .await
        .unwrap();
    let (feed, mut sink) = Feed::start("simulated", threshold).await;

    let mut all = Vec::new();
    let mut eta_changes = 0;
    let mut last_published: BTreeMap<String, i64> = BTreeMap::new();
    for output in &outputs {
        sink.commit(Arc::clone(output)).await.unwrap();
        let received = feed.drain().await;

        let entered = transitions(&received, "geofence.entered");
        let exited = transitions(&received, "geofence.exited");
        assert_eq!(
            entered.len(),
            inside(output, 1).len(),
            "epoch {}",
            output.epoch
        );
        assert_eq!(
            exited.len(),
            inside(output, -1).len(),
            "epoch {}",
            output.epoch
        );
        assert_eq!(
            entered.into_iter().collect::<BTreeSet<_>>(),
            inside(output, 1)
        );
        assert_eq!(
            exited.into_iter().collect::<BTreeSet<_>>(),
            inside(output, -1)
        );

        let ended = ended(output);
        let completed: Vec<&Received> = received
            .iter()
            .filter(|m| m.kind() == "delivery.completed" && m.str("reason") == "ended")
            .collect();
        assert_eq!(completed.len(), ended.len(), "epoch {}", output.epoch);
        for message in completed {
            let state = &ended[message.str("delivery_id")];
            let ended_at = state.ended_at.unwrap();
            assert_eq!(message.str("status"), state.status.as_str());
            assert_eq!(message.str("ended_at"), rfc3339(ended_at));
            assert_eq!(
                message.body["duration_seconds"].as_f64().unwrap(),
                (ended_at - state.created_at) as f64 / 1000.0
            );
            let on_time = match (state.status, state.promised_by) {
                (Status::Delivered, Some(p)) => Value::from(ended_at <= p),
                _ => Value::Null,
            };
            assert_eq!(message.body["on_time"], on_time);
            assert_eq!(
                message.body["customer_id"].as_str(),
                Some(state.customer_id.to_string().as_str())
            );
        }

        eta_changes += output
            .changes
            .iter()
            .filter(|(c, d)| matches!(c, Change::Eta(..)) && *d > 0)
            .count();
        for message in received.iter().filter(|m| m.kind() == "eta.updated") {
            let delivery = message.str("delivery_id").to_owned();
            let eta_at = millis(message.str("eta_at"));
            match last_published.get(&delivery) {
                None => assert_eq!(message.body["previous_eta_at"], Value::Null),
                Some(&previous) => {
                    assert_eq!(millis(message.str("previous_eta_at")), previous);
                    assert!(
                        (eta_at - previous).unsigned_abs() > 60_000,
                        "{}",
                        message.body
                    );
                }
            }
            last_published.insert(delivery, eta_at);
        }
        for message in received.iter().filter(|m| m.kind() == "delivery.delayed") {
            assert!(millis(message.str("eta_at")) > millis(message.str("promised_by")));
        }
        // Ended deliveries are forgotten: a consumer's view follows the sink's.
        for id in ended.keys() {
            last_published.remove(id);
        }
        all.extend(received);
    }
    sink.close().await.unwrap();

    let count = |kind: &str| all.iter().filter(|m| m.kind() == kind).count();
    eprintln!(
        "{} messages: {} entered, {} exited, {} eta.updated of {} ETA changes, {} completed, {} delayed",
        all.len(),
        count("geofence.entered"),
        count("geofence.exited"),
        count("eta.updated"),
        eta_changes,
        count("delivery.completed"),
        count("delivery.delayed"),
    );
    assert!(count("geofence.entered") > 0 && count("geofence.exited") > 0);
    assert!(count("delivery.completed") > 0);
    assert!(count("eta.updated") > 0);
    assert!(
        count("eta.updated") < eta_changes,
        "the threshold holds some back"
    );
    let ids: BTreeSet<&str> = all.iter().map(Received::event_id).collect();
    assert_eq!(ids.len(), all.len(), "every event id is unique");
    assert!(all.iter().all(|m| m.routing_key == m.kind()));
}

/// One delivery, by hand, through the dataflow: the ETA moves by 0, 145, 0, 45, 55 (drift:
/// 65 from the last published) seconds, then far past the promise and a bit more; then it
/// is delivered and rated.
#[tokio::test]
async fn eta_threshold_delay_completion_and_rating_of_one_delivery() {
    let delivery = DeliveryId(id(1));
    let courier = CourierId(id(2));
    let dropoff = GeoPoint::from_degrees(52.52, 13.405);
    let t = START_MS + 10_000;
    let promised_by = START_MS + 1_200_000;
    // A fix `metres` north of the dropoff at `at`, reporting `speed` m/s.
    let fix = |n: u128, at: i64, metres: f64, speed: f64| {
        event(
            n,
            at,
            EventBody::LocationUpdated(LocationUpdated {
                courier_id: courier,
                position: GeoPoint::from_degrees(52.52 + metres / 111_194.93, 13.405),
                speed_mm_s: Some((speed * 1000.0) as u32),
                heading_ddeg: None,
                accuracy_cm: None,
            }),
        )
    };
    let status = |n: u128, at: i64, status: Status| {
        event(
            n,
            at,
            EventBody::StatusChanged(StatusChanged {
                delivery_id: delivery,
                status,
                courier_id: (status == Status::Assigned).then_some(courier),
            }),
        )
    };
    let epochs: Vec<Vec<Event>> = vec![
        vec![
            event(
                10,
                START_MS,
                EventBody::DeliveryCreated(DeliveryCreated {
                    delivery_id: delivery,
                    customer_id: CustomerId(id(3)),
                    pickup: GeoPoint::from_degrees(52.53, 13.405),
                    dropoff,
                    promised_by: Some(promised_by),
                }),
            ),
            status(11, START_MS + 1_000, Status::Assigned),
            status(12, START_MS + 2_000, Status::PickedUp),
            status(13, START_MS + 3_000, Status::InTransit),
            fix(20, t, 3_000.0, 5.0), // ETA t + 600 s: first, published
        ],
        vec![fix(21, t + 10_000, 2_950.0, 5.0)], // t + 600: no move
        vec![fix(22, t + 20_000, 2_900.0, 4.0)], // t + 745: 145 s, published
        vec![fix(23, t + 30_000, 2_860.0, 4.0)], // t + 745: no move
        vec![fix(24, t + 40_000, 3_000.0, 4.0)], // t + 790: 45 s
        vec![fix(25, t + 50_000, 3_000.0, 4.0)], // t + 800: 55 s
        vec![fix(26, t + 60_000, 3_000.0, 4.0)], // t + 810: 65 s from 745, published
        vec![fix(27, t + 70_000, 3_000.0, 1.0)], // t + 3070: published, and late
        vec![fix(28, t + 80_000, 3_000.0, 1.0)], // t + 3080: 10 s, still late: nothing
        vec![status(14, t + 90_000, Status::Delivered)],
        vec![event(
            15,
            t + 200_000,
            EventBody::DeliveryRated(DeliveryRated {
                delivery_id: delivery,
                score: 5,
                comment: None,
            }),
        )],
    ];
    let outputs = tokio::task::spawn_blocking(move || {
        let (mut input, mut output) = pipeline::start(DataflowConfig::default()).unwrap();
        let outputs: Vec<Arc<EpochOutput>> = epochs
            .into_iter()
            .map(|events| {
                input.send(events).unwrap();
                Arc::new(output.recv().unwrap())
            })
            .collect();
        assert!(outputs.iter().all(|o| o.rejections.is_empty()));
        outputs
    })
    .await
    .unwrap();

    let (feed, mut sink) = Feed::start("one-delivery", Duration::from_secs(60)).await;
    let mut per_epoch = Vec::new();
    for output in &outputs {
        sink.commit(Arc::clone(output)).await.unwrap();
        per_epoch.push(feed.drain().await);
    }
    let kinds = |received: &Vec<Received>| -> Vec<String> {
        received.iter().map(|m| m.kind().to_owned()).collect()
    };
    let expected: Vec<Vec<&str>> = vec![
        vec!["eta.updated"],
        vec![],
        vec!["eta.updated"],
        vec![],
        vec![],
        vec![],
        vec!["eta.updated"],
        vec!["eta.updated", "delivery.delayed"],
        vec![],
        vec!["delivery.completed"],
        vec!["delivery.completed"],
    ];
    assert_eq!(
        per_epoch.iter().map(kinds).collect::<Vec<_>>(),
        expected
            .iter()
            .map(|e| e.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .collect::<Vec<_>>()
    );

    let eta_at = |epoch: usize| millis(per_epoch[epoch][0].str("eta_at"));
    let near = |a: i64, b: i64| (a - b).abs() < 1_000;
    assert!(near(eta_at(0), t + 600_000), "{}", eta_at(0) - t);
    assert_eq!(per_epoch[0][0].body["previous_eta_at"], Value::Null);
    assert_eq!(per_epoch[0][0].str("status"), "in_transit");
    assert!(near(eta_at(2), t + 745_000), "{}", eta_at(2) - t);
    assert_eq!(millis(per_epoch[2][0].str("previous_eta_at")), eta_at(0));
    assert!(near(eta_at(6), t + 810_000), "{}", eta_at(6) - t);
    assert_eq!(millis(per_epoch[6][0].str("previous_eta_at")), eta_at(2));
    let delayed = &per_epoch[7][1];
    assert_eq!(delayed.str("promised_by"), rfc3339(promised_by));
    assert_eq!(millis(delayed.str("eta_at")), eta_at(7));
    assert_eq!(delayed.str("delivery_id"), delivery.to_string());

    let completed = &per_epoch[9][0];
    assert_eq!(completed.str("status"), "delivered");
    assert_eq!(completed.str("reason"), "ended");
    assert_eq!(completed.body["duration_seconds"], 100.0);
    assert_eq!(completed.body["on_time"], true);
    assert_eq!(completed.body["rating"], Value::Null);
    assert_eq!(completed.str("courier_id"), courier.to_string());
    assert_eq!(completed.str("occurred_at"), rfc3339(t + 90_000));
    let rated = &per_epoch[10][0];
    assert_eq!(rated.str("reason"), "rated");
    assert_eq!(rated.body["rating"], 5);
    assert_eq!(rated.body["duration_seconds"], 100.0);
    assert_ne!(rated.event_id(), completed.event_id());
    assert_eq!(
        sink.tracked_deliveries(),
        0,
        "the ended delivery is forgotten"
    );
    sink.close().await.unwrap();
}

/// Committing an epoch again, retrying it after a lost connection, and a second sink (a
/// restarted process) replaying the same epochs all publish the same event ids.
#[tokio::test]
async fn recommitted_retried_and_replayed_epochs_publish_the_same_ids() {
    let outputs = tokio::task::spawn_blocking(|| simulated_epochs(11, 12, 60_000))
        .await
        .unwrap();
    let ids = |received: &[Received]| -> Vec<String> {
        received.iter().map(|m| m.event_id().to_owned()).collect()
    };

    // The reference run.
    let (feed, mut sink) = Feed::start("replay", Duration::from_secs(60)).await;
    let mut reference = Vec::new();
    for output in &outputs {
        sink.commit(Arc::clone(output)).await.unwrap();
        reference.push(ids(&feed.drain().await));
    }
    let busiest = (0..outputs.len())
        .max_by_key(|&i| reference[i].len())
        .unwrap();
    assert!(!reference[busiest].is_empty());

    // The last epoch again: the same messages.
    let last = outputs.len() - 1;
    sink.commit(Arc::clone(&outputs[last])).await.unwrap();
    assert_eq!(ids(&feed.drain().await), reference[last]);
    sink.close().await.unwrap();
    assert!(matches!(
        sink.commit(Arc::clone(&outputs[last])).await,
        Err(SinkError::Closed { .. })
    ));

    // A second sink through a proxy that is cut just before the busiest epoch: the commit
    // fails retryably, then succeeds once the broker is back, with the reference's ids.
    let proxy = TcpProxy::start(broker_addr(&rabbitmq_url()).await.unwrap())
        .await
        .unwrap();
    let config = DerivedConfig {
        url: url_via(&rabbitmq_url(), proxy.addr()),
        ..feed.config.clone()
    };
    let mut replay = DerivedSink::connect(config).await.unwrap();
    for (i, output) in outputs.iter().enumerate() {
        if i == busiest {
            proxy.cut();
            let error = replay.commit(Arc::clone(output)).await.unwrap_err();
            assert!(error.is_retryable(), "{error}");
            assert!(!replay.is_connected());
            proxy.restore();
        }
        replay.commit(Arc::clone(output)).await.unwrap();
        assert_eq!(ids(&feed.drain().await), reference[i], "epoch {i}");
    }
    replay.close().await.unwrap();
}

/// An epoch with nothing to say needs no broker; one with something to say fails retryably
/// while the broker is away.
#[tokio::test]
async fn an_epoch_with_nothing_to_publish_commits_without_the_broker() {
    let (feed, _sink) = Feed::start("quiet", Duration::from_secs(60)).await;
    let proxy = TcpProxy::start(broker_addr(&rabbitmq_url()).await.unwrap())
        .await
        .unwrap();
    let config = DerivedConfig {
        url: url_via(&rabbitmq_url(), proxy.addr()),
        ..feed.config.clone()
    };
    let mut sink = DerivedSink::connect(config).await.unwrap();
    proxy.cut();
    let quiet = Arc::new(EpochOutput {
        epoch: 0,
        ..EpochOutput::default()
    });
    sink.commit(quiet).await.unwrap();
    let busy = Arc::new(EpochOutput {
        epoch: 1,
        changes: vec![(
            Change::Inside(CourierId(id(1)), delivertrack_dataflow::ZoneId(id(2))),
            1,
        )],
        ..EpochOutput::default()
    });
    let error = sink.commit(Arc::clone(&busy)).await.unwrap_err();
    assert!(error.is_retryable());
    proxy.restore();
    sink.commit(busy).await.unwrap();
    assert_eq!(
        transitions(&feed.drain().await, "geofence.entered").len(),
        1
    );
}

/// A broker that is not there stops the start with an error naming it, password redacted.
#[tokio::test]
async fn an_unreachable_broker_is_named_without_its_password() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let config = DerivedConfig {
        url: format!("amqp://guest:s3cret-pw@127.0.0.1:{port}/%2f"),
        connect_timeout: Duration::from_secs(3),
        ..DerivedConfig::default()
    };
    let error = DerivedSink::connect(config).await.unwrap_err();
    assert!(error.is_retryable());
    let mut chain = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        chain.push_str(": ");
        chain.push_str(&cause.to_string());
        source = cause.source();
    }
    assert!(chain.contains(&format!("127.0.0.1:{port}")), "{chain}");
    assert!(chain.contains("guest:***@"), "{chain}");
    assert!(!chain.contains("s3cret-pw"), "{chain}");
}
