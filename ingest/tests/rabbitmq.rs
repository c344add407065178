//! The RabbitMQ source against the real broker (`RABBITMQ_URL`, default the local one).
//!
//! Each test declares its own exchange and queues ([`unique_config`]) and deletes them at the
//! end ([`TopologyGuard`], also on a panic), so the tests run in parallel and leave nothing
//! behind. Messages are published with
//! lapin, as any producer would; waits are bounded timeouts on conditions, not sleeps.
//!
//! Losses come two ways: a [`TcpProxy`] cut (the network gone, nothing said), and the broker
//! itself closing the source's connection or one of its channels, with a reply code — the
//! former through `rabbitmqctl close_connection` on the connection found by its name
//! ([`Rabbitmqctl`]; a test that needs it and cannot find it says on stderr that it was
//! skipped), the latter over a protocol error the broker answers by closing the channel.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use delivertrack_dataflow::lifecycle::Status;
use delivertrack_dataflow::{EventId, EventKind, RejectReason, Rejection};
use delivertrack_ingest::rabbitmq::dead_letter::{
    HEADER_DETAIL, HEADER_EVENT_ID, HEADER_INDEX, HEADER_REASON, HEADER_REJECTED_AT,
    HEADER_ROUTING_KEY, HEADER_STAGE,
};
use delivertrack_ingest::rabbitmq::rabbitmqctl::Rabbitmqctl;
use delivertrack_ingest::testing::{
    TcpProxy, TopologyGuard, broker_addr, ready_messages, unique_config, url_via,
};
use delivertrack_ingest::{
    EpochPolicy, IngestMetrics, RabbitAck, RabbitConfig, RabbitSource, Source, SourceBatch,
    SourceError, SourceHealth,
};
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::{Value, json};
use tokio::time::{Instant, timeout};
use uuid::Uuid;

/// The longest any awaited condition may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(30);

/// How soon a loss the broker announces (a closed connection or channel) must have been
/// noticed and healed: far below the patience, so that a source that only finds out by
/// chance (at its next acknowledgement, or a heartbeat later) fails.
const PROMPTLY: Duration = Duration::from_secs(15);

/// A producer: its own connection and a channel in confirm mode.
struct Publisher {
    _connection: Connection,
    channel: Channel,
    exchange: String,
}

impl Publisher {
    async fn new(config: &RabbitConfig) -> Self {
        let connection = Connection::connect(&config.url, ConnectionProperties::default())
            .await
            .expect("RabbitMQ must be reachable at RABBITMQ_URL");
        let channel = connection.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        Self {
            _connection: connection,
            channel,
            exchange: config.exchange.clone(),
        }
    }

    async fn publish(&self, routing_key: &str, body: &[u8]) {
        let confirm = self
            .channel
            .basic_publish(
                self.exchange.as_str().into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
        assert!(
            confirm.take_message().is_none(),
            "the queue is bound to {routing_key}"
        );
    }

    async fn publish_json(&self, routing_key: &str, body: &Value) {
        self.publish(routing_key, &serde_json::to_vec(body).unwrap())
            .await;
    }

    /// Messages ready (not delivered) in `queue`.
    async fn ready(&self, queue: &str) -> u32 {
        ready_messages(&self.channel, queue).await.unwrap()
    }

    /// Waits until `queue` holds exactly `count` ready messages.
    async fn wait_ready(&self, queue: &str, count: u32) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let ready = self.ready(queue).await;
            if ready == count {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{queue} holds {ready} messages, expected {count}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn now_minus(seconds: i64) -> String {
    (Utc::now() - chrono::Duration::seconds(seconds)).to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn location(lat: f64) -> Value {
    json!({
        "v": 1, "kind": "location.updated", "event_id": Uuid::new_v4().to_string(),
        "occurred_at": now_minus(60), "courier_id": Uuid::new_v4().to_string(),
        "lat": lat, "lon": 13.405,
    })
}

fn zone_deleted() -> Value {
    json!({
        "v": 1, "kind": "zone.deleted", "event_id": Uuid::new_v4().to_string(),
        "occurred_at": now_minus(60), "zone_id": Uuid::new_v4().to_string(),
    })
}

fn id_of(event: &Value) -> EventId {
    EventId(event["event_id"].as_str().unwrap().parse().unwrap())
}

fn policy(max_events: usize, max_wait_ms: u64) -> EpochPolicy {
    EpochPolicy {
        max_events,
        max_wait: Duration::from_millis(max_wait_ms),
    }
}

async fn connect(config: &RabbitConfig) -> (RabbitSource, IngestMetrics) {
    let metrics = IngestMetrics::unregistered();
    let source = RabbitSource::connect(config.clone(), metrics.clone())
        .await
        .expect("RabbitMQ must be reachable at RABBITMQ_URL");
    (source, metrics)
}

async fn next(source: &mut RabbitSource, policy: &EpochPolicy) -> SourceBatch<RabbitAck> {
    timeout(PATIENCE, source.next_batch(policy))
        .await
        .expect("a batch within the patience")
        .unwrap()
        .expect("the source does not end")
}

/// Reads batches, acknowledging each, until `count` distinct events were seen.
async fn drain(source: &mut RabbitSource, count: usize) -> BTreeSet<EventId> {
    let policy = policy(1_000, 50);
    let mut seen = BTreeSet::new();
    while seen.len() < count {
        let batch = next(source, &policy).await;
        seen.extend(batch.events.iter().map(|e| e.event_id));
        source.ack(batch.ack, Vec::new()).await.unwrap();
    }
    seen
}

/// Reads batches, acknowledging each, until `deliveries` deliveries of channel generation
/// `generation` — the current one — were acknowledged; returns the events seen. Once the
/// source is connected on that channel, it hands out nothing of an older one (it would
/// come back anyway): every batch must be of `generation`.
async fn drain_generation(
    source: &mut RabbitSource,
    generation: u64,
    deliveries: usize,
) -> BTreeSet<EventId> {
    let policy = policy(1_000, 50);
    let mut seen = BTreeSet::new();
    let mut acknowledged = 0;
    while acknowledged < deliveries {
        let batch = next(source, &policy).await;
        assert_eq!(
            batch.ack.generation(),
            generation,
            "nothing of a closed channel is handed out once the source is connected again"
        );
        seen.extend(batch.events.iter().map(|e| e.event_id));
        acknowledged += batch.ack.deliveries();
        source.ack(batch.ack, Vec::new()).await.unwrap();
    }
    seen
}

/// Checks for a while that the source hands out nothing more.
async fn nothing_more(source: &mut RabbitSource) {
    let extra = timeout(
        Duration::from_millis(500),
        source.next_batch(&policy(1_000, 50)),
    )
    .await;
    assert!(extra.is_err(), "nothing else is delivered: {extra:?}");
}

/// Closes the source and checks that nothing was left unacknowledged: closing would
/// requeue it.
async fn close_with_nothing_unacknowledged(
    source: RabbitSource,
    publisher: &Publisher,
    queue: &str,
) {
    timeout(PATIENCE, source.close())
        .await
        .expect("close is bounded");
    for _ in 0..5 {
        assert_eq!(publisher.ready(queue).await, 0, "nothing was requeued");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `rabbitmqctl`, or `None` after saying plainly on stderr that `test` is skipped.
fn rabbitmqctl(test: &str) -> Option<Rabbitmqctl> {
    let found = Rabbitmqctl::find();
    if found.is_none() {
        eprintln!(
            "SKIPPED {test}: rabbitmqctl was not found (on the PATH, in /usr/sbin, or named by \
             RABBITMQCTL), so the broker cannot be made to close a connection"
        );
    }
    found
}

/// The one open connection named `name`, as the broker lists it (its Erlang pid); waits
/// until there is exactly one, so a connection being replaced is not taken for it.
async fn connection_named(ctl: &Rabbitmqctl, name: &str) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let pids = ctl
            .connections_named(name)
            .await
            .expect("rabbitmqctl can list the broker's connections");
        if let [pid] = pids.as_slice() {
            return pid.clone();
        }
        assert!(
            Instant::now() < deadline,
            "expected one connection named {name}, the broker lists {pids:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the source has reconnected `count` times in all, within [`PROMPTLY`] of
/// `since`.
async fn reconnected(metrics: &IngestMetrics, count: u64, since: Instant, what: &str) {
    let deadline = since + PROMPTLY;
    while metrics.reconnects() < count {
        assert!(
            Instant::now() < deadline,
            "{what}: not noticed and healed within {PROMPTLY:?} ({} reconnections)",
            metrics.reconnects()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One dead letter: its headers (as strings or integers) and body.
#[derive(Debug)]
struct Letter {
    headers: FieldTable,
    body: Vec<u8>,
}

impl Letter {
    fn text(&self, name: &str) -> Option<String> {
        match self.headers.inner().get(name)? {
            AMQPValue::LongString(s) => Some(s.to_string()),
            AMQPValue::ShortString(s) => Some(s.to_string()),
            other => panic!("{name} is {other:?}"),
        }
    }

    fn int(&self, name: &str) -> Option<i64> {
        match self.headers.inner().get(name)? {
            AMQPValue::LongLongInt(n) => Some(*n),
            other => panic!("{name} is {other:?}"),
        }
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// Takes `count` dead letters from the dead-letter queue, then checks that no more come.
async fn dead_letters(config: &RabbitConfig, count: usize) -> Vec<Letter> {
    let connection = Connection::connect(&config.url, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let mut consumer = channel
        .basic_consume(
            config.dead_letter_queue.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut letters = Vec::new();
    while letters.len() < count {
        let delivery = timeout(PATIENCE, consumer.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {count} dead letters", letters.len()))
            .unwrap()
            .unwrap();
        letters.push(Letter {
            headers: delivery.properties.headers().clone().unwrap_or_default(),
            body: delivery.data,
        });
    }
    let extra = timeout(Duration::from_millis(300), consumer.next()).await;
    assert!(extra.is_err(), "no other dead letter: {extra:?}");
    let _ = connection.close(200, "done".into()).await;
    letters
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_events_come_out_of_next_batch_from_single_and_array_messages() {
    let config = unique_config("valid");
    let _cleanup = TopologyGuard::new(&config);
    let (mut source, metrics) = connect(&config).await;
    let publisher = Publisher::new(&config).await;

    let singles: Vec<Value> = (0..3)
        .map(|i| location(52.0 + f64::from(i) / 100.0))
        .collect();
    for event in &singles {
        publisher.publish_json("location.updated", event).await;
    }
    let array: Vec<Value> = (0..4).map(|_| zone_deleted()).collect();
    publisher
        .publish_json("zone.deleted", &Value::Array(array.clone()))
        .await;

    let seen = drain(&mut source, 7).await;
    let expected: BTreeSet<EventId> = singles.iter().chain(&array).map(id_of).collect();
    assert_eq!(seen, expected);
    assert_eq!(metrics.messages_received(), 4);
    assert_eq!(metrics.events_ingested("location.updated"), 3);
    assert_eq!(metrics.events_ingested("zone.deleted"), 4);
    // Acknowledged: nothing is in flight and nothing comes back.
    publisher.wait_ready(&config.queue, 0).await;
    assert_eq!(source.in_flight(), 0);
    assert_eq!(*source.health().borrow(), SourceHealth::Connected);

    source.close().await;
    publisher.wait_ready(&config.queue, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_dead_lettered_with_their_reason_and_only_the_bad_events() {
    let config = unique_config("malformed");
    let _cleanup = TopologyGuard::new(&config);
    let (mut source, metrics) = connect(&config).await;
    let publisher = Publisher::new(&config).await;

    publisher
        .publish("location.updated", b"{\"v\":1, \"kind\":")
        .await;
    let mut unknown = location(52.0);
    unknown["kind"] = json!("zone.renamed");
    publisher.publish_json("location.updated", &unknown).await;
    let mismatch = zone_deleted();
    publisher.publish_json("location.updated", &mismatch).await;
    let out_of_range = location(91.0);
    publisher
        .publish_json("location.updated", &out_of_range)
        .await;
    let good = [location(52.1), location(52.2)];
    let bad_element = location(-90.5);
    publisher
        .publish_json(
            "location.updated",
            &json!([good[0].clone(), bad_element.clone(), good[1].clone()]),
        )
        .await;

    // Only the two good events of the array come out; every delivery is in the ack range.
    let mut events = Vec::new();
    let mut deliveries = 0;
    while deliveries < 5 {
        let batch = next(&mut source, &policy(100, 200)).await;
        events.extend(batch.events.iter().map(|e| e.event_id));
        deliveries += batch.ack.deliveries();
        source.ack(batch.ack, Vec::new()).await.unwrap();
    }
    assert_eq!(events, vec![id_of(&good[0]), id_of(&good[1])]);

    let letters = dead_letters(&config, 5).await;
    let by_reason = |reason: &str| {
        letters
            .iter()
            .find(|l| l.text(HEADER_REASON).as_deref() == Some(reason))
            .unwrap_or_else(|| panic!("a dead letter with reason {reason}"))
    };
    let bad_json = by_reason("bad_json");
    assert_eq!(bad_json.body, b"{\"v\":1, \"kind\":");
    assert_eq!(bad_json.text(HEADER_EVENT_ID), None);
    assert_eq!(bad_json.int(HEADER_INDEX), None);

    let unknown_kind = by_reason("unknown_kind");
    assert_eq!(unknown_kind.json(), unknown);
    assert_eq!(
        unknown_kind.text(HEADER_EVENT_ID),
        Some(id_of(&unknown).to_string())
    );

    let kind_mismatch = by_reason("kind_mismatch");
    assert_eq!(kind_mismatch.json(), mismatch);

    // Two coordinates out of range: the single event and the array's element 1.
    let ranges: Vec<&Letter> = letters
        .iter()
        .filter(|l| l.text(HEADER_REASON).as_deref() == Some("coordinate_out_of_range"))
        .collect();
    assert_eq!(ranges.len(), 2);
    let element = ranges
        .iter()
        .find(|l| l.int(HEADER_INDEX).is_some())
        .expect("the array's bad element");
    assert_eq!(element.int(HEADER_INDEX), Some(1));
    assert_eq!(element.json(), bad_element);
    let single = ranges
        .iter()
        .find(|l| l.int(HEADER_INDEX).is_none())
        .unwrap();
    assert_eq!(single.json(), out_of_range);

    for letter in &letters {
        assert_eq!(
            letter.text(HEADER_ROUTING_KEY).as_deref(),
            Some("location.updated")
        );
        assert_eq!(letter.text(HEADER_STAGE).as_deref(), Some("decode"));
        assert!(!letter.text(HEADER_DETAIL).unwrap().is_empty());
        let at = letter.text(HEADER_REJECTED_AT).unwrap();
        let at = chrono::DateTime::parse_from_rfc3339(&at).expect("RFC 3339");
        assert!((Utc::now() - at.to_utc()).num_seconds().abs() < 120);
    }
    for (reason, count) in [
        ("bad_json", 1),
        ("unknown_kind", 1),
        ("kind_mismatch", 1),
        ("coordinate_out_of_range", 2),
    ] {
        assert_eq!(metrics.events_rejected(reason), count, "{reason}");
        assert_eq!(metrics.events_dead_lettered(reason), count, "{reason}");
    }
    publisher.wait_ready(&config.queue, 0).await;
    source.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_refused_by_the_dataflow_are_dead_lettered_at_ack_except_stale_ones() {
    let config = unique_config("refused");
    let _cleanup = TopologyGuard::new(&config);
    let (mut source, metrics) = connect(&config).await;
    let publisher = Publisher::new(&config).await;
    let illegal = json!({
        "v": 1, "kind": "status.changed", "event_id": Uuid::new_v4().to_string(),
        "occurred_at": now_minus(30), "delivery_id": Uuid::new_v4().to_string(),
        "status": "delivered",
    });
    let late = location(52.3);
    let fine = location(52.4);
    publisher
        .publish_json("status.changed", &json!([illegal.clone()]))
        .await;
    publisher
        .publish_json("location.updated", &json!([late.clone(), fine.clone()]))
        .await;

    // Each batch's token with the events it carries.
    let mut batches = Vec::new();
    let mut events = 0;
    while events < 3 {
        let batch = next(&mut source, &policy(100, 200)).await;
        events += batch.events.len();
        let ids: BTreeSet<EventId> = batch.events.iter().map(|e| e.event_id).collect();
        batches.push((batch.ack, ids));
    }
    let mut rejected = vec![
        Rejection {
            event_id: id_of(&illegal),
            kind: EventKind::StatusChanged,
            reason: RejectReason::IllegalTransition {
                from: Status::Created,
                to: Status::Delivered,
            },
        },
        Rejection {
            event_id: id_of(&late),
            kind: EventKind::LocationUpdated,
            reason: RejectReason::Stale,
        },
    ];
    // As the driver does: each batch's token goes back, in order, with the refusals of its
    // own events, whichever batch each event landed in.
    for (ack, ids) in batches {
        let (own, rest) = rejected
            .into_iter()
            .partition(|rejection| ids.contains(&rejection.event_id));
        rejected = rest;
        let own: Vec<Rejection> = own;
        source
            .ack(ack, own.into_iter().map(Into::into).collect())
            .await
            .unwrap();
    }
    assert!(
        rejected.is_empty(),
        "every refused event was read: {rejected:?}"
    );

    let letters = dead_letters(&config, 1).await;
    let letter = &letters[0];
    assert_eq!(
        letter.text(HEADER_REASON).as_deref(),
        Some("illegal_transition")
    );
    assert_eq!(letter.text(HEADER_STAGE).as_deref(), Some("dataflow"));
    assert_eq!(
        letter.text(HEADER_ROUTING_KEY).as_deref(),
        Some("status.changed")
    );
    assert_eq!(
        letter.text(HEADER_EVENT_ID),
        Some(id_of(&illegal).to_string())
    );
    assert_eq!(letter.int(HEADER_INDEX), Some(0));
    assert_eq!(letter.json(), illegal);
    assert_eq!(metrics.events_rejected("stale"), 1);
    assert_eq!(metrics.events_dead_lettered("stale"), 0);
    assert_eq!(metrics.events_dead_lettered("illegal_transition"), 1);
    publisher.wait_ready(&config.queue, 0).await;
    source.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_closes_at_its_size_bound_or_its_time_bound() {
    let config = unique_config("bounds");
    let _cleanup = TopologyGuard::new(&config);
    let (mut source, _metrics) = connect(&config).await;
    let publisher = Publisher::new(&config).await;

    // Size: 10 single-event messages, at most 4 events a batch, a long time bound.
    let events: Vec<Value> = (0..10).map(|_| zone_deleted()).collect();
    for event in &events {
        publisher.publish_json("zone.deleted", event).await;
    }
    let size_bound = policy(4, 10_000);
    let started = Instant::now();
    let mut sizes = Vec::new();
    let mut seen = Vec::new();
    while seen.len() < 8 {
        let batch = next(&mut source, &size_bound).await;
        sizes.push(batch.events.len());
        seen.extend(batch.events.iter().map(|e| e.event_id));
        source.ack(batch.ack, Vec::new()).await.unwrap();
    }
    assert_eq!(sizes, vec![4, 4]);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "full batches do not wait for the time bound: {:?}",
        started.elapsed()
    );
    // Time: the last two are already here (the batch's clock started when the previous
    // batch was handed out); the batch still waits for its time bound.
    let time_bound = policy(100, 400);
    let started = Instant::now();
    let batch = next(&mut source, &time_bound).await;
    assert_eq!(batch.events.len(), 2);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    seen.extend(batch.events.iter().map(|e| e.event_id));
    source.ack(batch.ack, Vec::new()).await.unwrap();
    assert_eq!(seen, events.iter().map(id_of).collect::<Vec<_>>());

    // A message larger than the size bound is split; only the batch with its last event
    // acknowledges it.
    let array: Vec<Value> = (0..10).map(|_| zone_deleted()).collect();
    publisher
        .publish_json("zone.deleted", &Value::Array(array.clone()))
        .await;
    let mut split = Vec::new();
    let mut covered = Vec::new();
    while split.len() < 10 {
        let batch = next(&mut source, &size_bound).await;
        split.extend(batch.events.iter().map(|e| e.event_id));
        covered.push((batch.events.len(), batch.ack.deliveries()));
        source.ack(batch.ack, Vec::new()).await.unwrap();
    }
    assert_eq!(covered, vec![(4, 0), (4, 0), (2, 1)]);
    assert_eq!(split, array.iter().map(id_of).collect::<Vec<_>>());
    publisher.wait_ready(&config.queue, 0).await;
    assert_eq!(source.in_flight(), 0);
    source.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_deliveries_never_exceed_the_prefetch() {
    let config = RabbitConfig {
        prefetch: 10,
        ..unique_config("prefetch")
    };
    let _cleanup = TopologyGuard::new(&config);
    let (mut source, metrics) = connect(&config).await;
    let publisher = Publisher::new(&config).await;
    let events: Vec<Value> = (0..50).map(|_| location(52.5)).collect();
    for event in &events {
        publisher.publish_json("location.updated", event).await;
    }

    // A stalled pipeline: batches are taken and never acknowledged.
    let mut held = Vec::new();
    let mut received = 0;
    let stalled = policy(1_000, 50);
    // Until nothing more comes for a second: nothing does while nothing is acknowledged.
    while let Ok(batch) = timeout(Duration::from_secs(1), source.next_batch(&stalled)).await {
        let batch = batch.unwrap().unwrap();
        received += batch.events.len();
        held.push(batch.ack);
        assert!(source.in_flight() <= 10, "{}", source.in_flight());
    }
    assert_eq!(received, 10);
    assert_eq!(source.in_flight(), 10);
    assert_eq!(metrics.messages_received(), 10);
    publisher.wait_ready(&config.queue, 40).await;

    // Acknowledging lets the rest flow.
    for ack in held {
        source.ack(ack, Vec::new()).await.unwrap();
    }
    let rest = drain(&mut source, 40).await;
    assert_eq!(rest.len(), 40);
    publisher.wait_ready(&config.queue, 0).await;
    source.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_is_healed_and_unacknowledged_deliveries_come_back() {
    let direct = unique_config("reconnect");
    let _cleanup = TopologyGuard::new(&direct);
    let proxy = TcpProxy::start(broker_addr(&direct.url).await.unwrap())
        .await
        .unwrap();
    let config = RabbitConfig {
        url: url_via(&direct.url, proxy.addr()),
        ..direct.clone()
    };
    let (mut source, metrics) = connect(&config).await;
    let mut health = source.health();
    let publisher = Publisher::new(&direct).await;

    let first: Vec<Value> = (0..20).map(|_| location(52.6)).collect();
    for event in &first {
        publisher.publish_json("location.updated", event).await;
    }
    // Take some of them and hold the token: the channel will be gone when it comes back.
    let batch = next(&mut source, &policy(5, 50)).await;
    assert_eq!(batch.events.len(), 5);
    let stale_token = batch.ack;
    assert_eq!(stale_token.generation(), 1);

    proxy.cut();
    timeout(
        PATIENCE,
        health.wait_for(|h| matches!(h, SourceHealth::Reconnecting { .. })),
    )
    .await
    .expect("the loss is noticed")
    .unwrap();
    // While the broker is unreachable, next_batch waits instead of failing.
    let waiting = timeout(
        Duration::from_millis(300),
        source.next_batch(&policy(100, 50)),
    )
    .await;
    match waiting {
        Err(_elapsed) => {}
        // Events of the lost channel already received may still be handed out; they are
        // redelivered later anyway.
        Ok(Ok(Some(_))) => {}
        Ok(other) => panic!("next_batch must keep waiting, got {other:?}"),
    }
    let second: Vec<Value> = (0..20).map(|_| location(52.7)).collect();
    for event in &second {
        publisher.publish_json("location.updated", event).await;
    }
    timeout(
        PATIENCE,
        health.wait_for(
            |h| matches!(h, SourceHealth::Reconnecting { attempts, .. } if *attempts >= 1),
        ),
    )
    .await
    .expect("failed attempts are reported")
    .unwrap();

    proxy.restore();
    timeout(PATIENCE, health.wait_for(|h| *h == SourceHealth::Connected))
        .await
        .expect("the source reconnects")
        .unwrap();
    assert!(metrics.reconnects() >= 1);
    // The old generation's token is dropped without error.
    source.ack(stale_token, Vec::new()).await.unwrap();

    // Everything arrives, the five taken before the cut included (redelivered).
    let seen = drain(&mut source, 40).await;
    let expected: BTreeSet<EventId> = first.iter().chain(&second).map(id_of).collect();
    assert_eq!(seen, expected);
    publisher.wait_ready(&config.queue, 0).await;
    assert_eq!(source.in_flight(), 0);
    source.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_broker_closes_mid_stream_is_healed_and_nothing_is_lost() {
    let Some(ctl) = rabbitmqctl("a_connection_the_broker_closes_mid_stream_is_healed") else {
        return;
    };
    let config = unique_config("broker-close");
    let _cleanup = TopologyGuard::new(&config);
    let (mut source, metrics) = connect(&config).await;
    let mut health = source.health();
    let publisher = Publisher::new(&config).await;

    let first: Vec<Value> = (0..20).map(|_| location(52.6)).collect();
    for event in &first {
        publisher.publish_json("location.updated", event).await;
    }
    // One batch settled before the close: acknowledged, it must not come back.
    let settled = next(&mut source, &policy(5, 50)).await;
    let settled_ids: BTreeSet<EventId> = settled.events.iter().map(|e| e.event_id).collect();
    assert_eq!(settled_ids.len(), 5);
    source.ack(settled.ack, Vec::new()).await.unwrap();
    // One batch held, as a pipeline holds an epoch its sinks have not committed yet.
    let held = next(&mut source, &policy(5, 50)).await;
    let held_ids: BTreeSet<EventId> = held.events.iter().map(|e| e.event_id).collect();
    assert_eq!(held_ids.len(), 5);
    let stale_token = held.ack;
    assert_eq!(stale_token.generation(), 1);

    // The broker knows the connection by the name the source gave it, and closes it.
    let closed = connection_named(&ctl, &config.connection_name).await;
    let closed_at = Instant::now();
    ctl.close_connection(&closed, "closed by the test")
        .await
        .expect("rabbitmqctl closes the connection");
    reconnected(&metrics, 1, closed_at, "the broker closed the connection").await;
    timeout(PATIENCE, health.wait_for(|h| *h == SourceHealth::Connected))
        .await
        .expect("the source is connected again")
        .unwrap();
    // Seen from the broker: a new connection under the same name.
    let replacement = connection_named(&ctl, &config.connection_name).await;
    assert_ne!(
        replacement, closed,
        "a new connection replaced the closed one"
    );
    // The closed channel's token is dropped without error.
    source.ack(stale_token, Vec::new()).await.unwrap();

    // New input reaches the consumer on the redeclared topology.
    let second: Vec<Value> = (0..10).map(|_| location(52.7)).collect();
    for event in &second {
        publisher.publish_json("location.updated", event).await;
    }
    // Everything not settled arrives, the held batch included (redelivered); the settled
    // batch does not come back.
    let expected: BTreeSet<EventId> = first
        .iter()
        .chain(&second)
        .map(id_of)
        .filter(|id| !settled_ids.contains(id))
        .collect();
    let seen = drain_generation(&mut source, 2, expected.len()).await;
    assert_eq!(seen, expected);
    assert!(held_ids.is_subset(&seen));
    nothing_more(&mut source).await;
    assert_eq!(source.in_flight(), 0);
    // The 15 unsettled deliveries of the first 20 came twice: received again, as such.
    assert!(
        metrics.messages_received() >= 10 + 15 + 10,
        "{} received",
        metrics.messages_received()
    );
    assert_eq!(metrics.reconnects(), 1, "one close, one reconnection");
    assert_eq!(*source.health().borrow(), SourceHealth::Connected);
    close_with_nothing_unacknowledged(source, &publisher, &config.queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consuming_channel_the_broker_closes_is_noticed_and_healed() {
    let config = unique_config("channel-close");
    let _cleanup = TopologyGuard::new(&config);
    let (mut source, metrics) = connect(&config).await;
    let mut health = source.health();
    let publisher = Publisher::new(&config).await;
    let events: Vec<Value> = (0..30).map(|_| zone_deleted()).collect();
    for event in &events {
        publisher.publish_json("zone.deleted", event).await;
    }
    let mut batches = Vec::new();
    for _ in 0..3 {
        let batch = next(&mut source, &policy(10, 50)).await;
        assert_eq!(batch.ack.deliveries(), 10);
        let ids: BTreeSet<EventId> = batch.events.iter().map(|e| e.event_id).collect();
        batches.push((batch.ack, ids));
    }
    let (c, c_ids) = batches.pop().unwrap();
    let (b, _) = batches.pop().unwrap();
    let (a, _) = batches.pop().unwrap();

    // Out of order: b's multiple-ack settles a's deliveries too, so a's own ack names a
    // delivery tag the channel no longer has. The broker answers by closing the consuming
    // channel (406 PRECONDITION_FAILED, unknown delivery tag); the connection stays open.
    source.ack(b, Vec::new()).await.unwrap();
    let closed_at = Instant::now();
    source.ack(a, Vec::new()).await.unwrap();
    reconnected(
        &metrics,
        1,
        closed_at,
        "the broker closed the consuming channel",
    )
    .await;
    timeout(PATIENCE, health.wait_for(|h| *h == SourceHealth::Connected))
        .await
        .expect("the source is connected again")
        .unwrap();

    // c was held when the channel closed: its token is dropped, its deliveries come back,
    // and nothing of a and b does.
    source.ack(c, Vec::new()).await.unwrap();
    let seen = drain_generation(&mut source, 2, 10).await;
    assert_eq!(seen, c_ids);
    nothing_more(&mut source).await;
    assert_eq!(source.in_flight(), 0);
    assert_eq!(metrics.reconnects(), 1);
    close_with_nothing_unacknowledged(source, &publisher, &config.queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_channel_the_broker_closes_is_replaced_on_a_redeclared_topology() {
    let config = unique_config("dead-channel");
    let _cleanup = TopologyGuard::new(&config);
    let (mut source, metrics) = connect(&config).await;
    let publisher = Publisher::new(&config).await;
    // The dead-letter exchange disappears under the running source.
    publisher
        .channel
        .exchange_delete(
            config.dead_letter_exchange.as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await
        .unwrap();
    let good = location(52.8);
    let bad = location(91.0);
    publisher
        .publish_json("location.updated", &json!([good.clone(), bad.clone()]))
        .await;

    // Settling the delivery publishes the refused element to an exchange that is gone: the
    // broker closes the dead-letter channel (404 NOT_FOUND), the source replaces the
    // connection, and nothing is acknowledged.
    let batch = next(&mut source, &policy(100, 50)).await;
    assert_eq!(batch.ack.generation(), 1);
    assert_eq!(batch.ack.deliveries(), 1);
    assert_eq!(
        batch.events.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        vec![id_of(&good)]
    );
    let settled_at = Instant::now();
    source.ack(batch.ack, Vec::new()).await.unwrap();
    reconnected(
        &metrics,
        1,
        settled_at,
        "the broker closed the dead-letter channel",
    )
    .await;
    assert_eq!(metrics.events_dead_lettered("coordinate_out_of_range"), 0);
    assert_eq!(
        metrics.events_rejected("coordinate_out_of_range"),
        0,
        "not settled"
    );

    // It comes back; the reconnection declared the exchange and its binding again, so the
    // dead letter now lands in the dead-letter queue, once.
    let seen = drain_generation(&mut source, 2, 1).await;
    assert_eq!(seen, BTreeSet::from([id_of(&good)]));
    let letters = dead_letters(&config, 1).await;
    assert_eq!(
        letters[0].text(HEADER_REASON).as_deref(),
        Some("coordinate_out_of_range")
    );
    assert_eq!(letters[0].int(HEADER_INDEX), Some(1));
    assert_eq!(letters[0].json(), bad);
    assert_eq!(metrics.events_dead_lettered("coordinate_out_of_range"), 1);
    assert_eq!(metrics.events_rejected("coordinate_out_of_range"), 1);
    assert_eq!(metrics.reconnects(), 1);
    nothing_more(&mut source).await;
    close_with_nothing_unacknowledged(source, &publisher, &config.queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loss_is_noticed_while_the_pipeline_is_not_reading() {
    let Some(ctl) = rabbitmqctl("a_loss_is_noticed_while_the_pipeline_is_not_reading") else {
        return;
    };
    let config = RabbitConfig {
        prefetch: 10,
        ..unique_config("not-reading")
    };
    let _cleanup = TopologyGuard::new(&config);
    let (mut source, metrics) = connect(&config).await;
    let mut health = source.health();
    let publisher = Publisher::new(&config).await;
    let events: Vec<Value> = (0..10).map(|_| zone_deleted()).collect();
    for event in &events {
        publisher.publish_json("zone.deleted", event).await;
    }
    // The pipeline is stalled (its sinks hold it back) and does not read: the connection
    // task hands the prefetch over to the source and waits.
    let deadline = Instant::now() + PATIENCE;
    while source.in_flight() < 10 {
        assert!(
            Instant::now() < deadline,
            "{} in flight",
            source.in_flight()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A first close: the ten come back on a new channel while the ten of the closed one
    // still wait to be read, so the connection task has no room to hand them over.
    let first = connection_named(&ctl, &config.connection_name).await;
    let closed_at = Instant::now();
    ctl.close_connection(&first, "closed by the test")
        .await
        .unwrap();
    reconnected(&metrics, 1, closed_at, "the first close").await;
    publisher.wait_ready(&config.queue, 0).await;
    let second = connection_named(&ctl, &config.connection_name).await;
    assert_ne!(first, second);

    // A second close while it waits for room: noticed all the same, and reported.
    let closed_at = Instant::now();
    ctl.close_connection(&second, "closed by the test")
        .await
        .unwrap();
    reconnected(
        &metrics,
        2,
        closed_at,
        "a close while the source is not reading",
    )
    .await;
    timeout(PATIENCE, health.wait_for(|h| *h == SourceHealth::Connected))
        .await
        .expect("the source is connected again")
        .unwrap();

    // Reading again: every event, acknowledged on the third channel.
    let seen = drain_generation(&mut source, 3, 10).await;
    assert_eq!(seen, events.iter().map(id_of).collect());
    nothing_more(&mut source).await;
    assert_eq!(source.in_flight(), 0);
    assert_eq!(metrics.reconnects(), 2);
    close_with_nothing_unacknowledged(source, &publisher, &config.queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_returns_unacknowledged_deliveries_to_the_queue() {
    let config = unique_config("close");
    let _cleanup = TopologyGuard::new(&config);
    let (mut source, _metrics) = connect(&config).await;
    let publisher = Publisher::new(&config).await;
    for _ in 0..5 {
        publisher
            .publish_json("zone.deleted", &zone_deleted())
            .await;
    }
    let mut taken = 0;
    while taken < 5 {
        taken += next(&mut source, &policy(100, 50)).await.events.len();
    }
    publisher.wait_ready(&config.queue, 0).await;
    timeout(PATIENCE, source.close())
        .await
        .expect("close is bounded");
    publisher.wait_ready(&config.queue, 5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_takes_the_open_batch_and_what_was_handed_over() {
    let config = unique_config("stop");
    let _cleanup = TopologyGuard::new(&config);
    let (mut source, metrics) = connect(&config).await;
    let publisher = Publisher::new(&config).await;
    // A batch that would close only after a minute or 100 events.
    let open = policy(100, 60_000);
    let gathered: Vec<Value> = (0..3).map(|_| zone_deleted()).collect();
    for event in &gathered {
        publisher.publish_json("zone.deleted", event).await;
    }
    // Being gathered: each call is cut short (as a driver's stop does), the batch stays.
    while metrics.messages_received() < 3 {
        let call = timeout(Duration::from_millis(100), source.next_batch(&open)).await;
        assert!(call.is_err(), "the batch is not due for a minute");
    }
    // Two more reach the source but are not read yet, and a malformed one.
    let handed_over: Vec<Value> = (0..2).map(|_| zone_deleted()).collect();
    for event in &handed_over {
        publisher.publish_json("zone.deleted", event).await;
    }
    publisher.publish("zone.deleted", b"[").await;
    let deadline = Instant::now() + PATIENCE;
    while source.in_flight() < 6 {
        assert!(
            Instant::now() < deadline,
            "{} in flight",
            source.in_flight()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metrics.messages_received(), 3);

    // The stop: everything held comes out at once, in batches within the size bound.
    let stop = policy(4, 60_000);
    let started = Instant::now();
    let mut taken = Vec::new();
    let mut sizes = Vec::new();
    while let Some(batch) = source.take_gathered(&stop) {
        sizes.push((batch.events.len(), batch.ack.deliveries()));
        taken.extend(batch.events.iter().map(|e| e.event_id));
        source.ack(batch.ack, Vec::new()).await.unwrap();
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(sizes, vec![(4, 4), (1, 2)]);
    let expected: Vec<EventId> = gathered.iter().chain(&handed_over).map(id_of).collect();
    assert_eq!(taken, expected);
    assert_eq!(source.in_flight(), 0);
    assert!(source.take_gathered(&stop).is_none());
    assert_eq!(
        dead_letters(&config, 1).await[0]
            .text(HEADER_REASON)
            .as_deref(),
        Some("bad_json")
    );

    // All of it was acknowledged: closing requeues nothing.
    timeout(PATIENCE, source.close())
        .await
        .expect("close is bounded");
    assert_eq!(publisher.ready(&config.queue).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_message_is_counted_once_however_often_it_is_delivered() {
    let config = unique_config("count-once");
    let _cleanup = TopologyGuard::new(&config);
    // One process's counters, over two connections.
    let metrics = IngestMetrics::unregistered();
    let publisher = Publisher::new(&config).await;
    let mut first = RabbitSource::connect(config.clone(), metrics.clone())
        .await
        .unwrap();
    publisher.publish("location.updated", b"{not json").await;
    publisher
        .publish_json("location.updated", &json!([location(52.0), location(91.0)]))
        .await;
    // Received, then dropped unacknowledged (the pipeline stopped before its epoch was
    // committed): both come back.
    let mut deliveries = 0;
    while deliveries < 2 {
        deliveries += next(&mut first, &policy(100, 50)).await.ack.deliveries();
    }
    assert_eq!(metrics.messages_received(), 2);
    assert_eq!(metrics.events_rejected("bad_json"), 0, "not settled yet");
    first.close().await;
    publisher.wait_ready(&config.queue, 2).await;

    let mut second = RabbitSource::connect(config.clone(), metrics.clone())
        .await
        .unwrap();
    let mut deliveries = 0;
    while deliveries < 2 {
        let batch = next(&mut second, &policy(100, 50)).await;
        deliveries += batch.ack.deliveries();
        second.ack(batch.ack, Vec::new()).await.unwrap();
    }
    assert_eq!(
        metrics.messages_received(),
        4,
        "redeliveries are received again"
    );
    assert_eq!(metrics.events_rejected("bad_json"), 1);
    assert_eq!(metrics.events_rejected("coordinate_out_of_range"), 1);
    assert_eq!(metrics.events_dead_lettered("bad_json"), 1);
    assert_eq!(dead_letters(&config, 2).await.len(), 2);
    publisher.wait_ready(&config.queue, 0).await;
    second.close().await;
}

#[tokio::test]
async fn an_unreachable_broker_at_start_is_an_error_naming_it() {
    // A port that nothing listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let config = RabbitConfig {
        url: format!("amqp://guest:secret@127.0.0.1:{port}/%2f"),
        ..unique_config("unreachable")
    };
    let error = RabbitSource::connect(config, IngestMetrics::unregistered())
        .await
        .expect_err("nothing listens there");
    assert!(matches!(error, SourceError::Transport(_)));
    let text = error_chain(&error);
    assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
    assert!(!text.contains("secret"), "the password is redacted: {text}");

    let zero = RabbitConfig {
        prefetch: 0,
        ..unique_config("unreachable")
    };
    let error = RabbitSource::connect(zero, IngestMetrics::unregistered())
        .await
        .expect_err("prefetch 0 is unbounded");
    assert!(matches!(error, SourceError::Config(_)));
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    text
}
