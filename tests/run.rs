//! `delivertrack run` end to end against the real RabbitMQ on localhost.
//!
//! Every test declares its own exchange and queues (`unique_config`), publishes with a real
//! client (lapin, through the load-tests publisher), runs the pipeline in-process on
//! `127.0.0.1:0` through [`start`] (or the real binary, through [`spawn_binary`]), and
//! deletes its topology when it ends, also when it fails ([`TopologyGuard`]). Waits are
//! bounded polls on conditions, never fixed sleeps; where a test shows that something does
//! *not* happen, it samples the state for a while.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use delivertrack::{DriveReport, PipelineConfig, RunConfig, RunHooks, run_pipeline_on};
use delivertrack_api::Role;
use delivertrack_dataflow::{CourierId, EpochOutput, Event, EventBody};
use delivertrack_ingest::rabbitmq::RabbitConfig;
use delivertrack_ingest::rabbitmq::dead_letter::{HEADER_REASON, HEADER_ROUTING_KEY, HEADER_STAGE};
use delivertrack_ingest::rabbitmq::rabbitmqctl::Rabbitmqctl;
use delivertrack_ingest::testing::{TcpProxy, TopologyGuard, broker_addr, unique_config, url_via};
use delivertrack_load_tests::Publisher;
use delivertrack_load_tests::fleet::location_events;
use delivertrack_sinks::{Sink, SinkFuture};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};

use support::{
    Database, JWT_SECRET, auth_config, eventually, now_ms, publisher, ready_messages, scrape,
    take_dead_letters, token,
};

/// How long any awaited condition may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

/// A pipeline running in this process.
struct Running {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<DriveReport>>,
}

impl Running {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Stops it (as Ctrl-C would) and returns what the driver did.
    async fn stop(mut self) -> DriveReport {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        timeout(PATIENCE, self.task)
            .await
            .expect("the pipeline stops within the bound")
            .expect("the pipeline task did not panic")
            .expect("the pipeline stopped cleanly")
    }
}

/// Small epochs, so that a stream of a few thousand events spans many of them.
fn run_config(rabbit: RabbitConfig) -> RunConfig {
    RunConfig {
        pipeline: PipelineConfig {
            workers: 2,
            epoch_max_events: 100,
            epoch_max_wait: Duration::from_millis(20),
            ..PipelineConfig::default()
        },
        rabbit,
        shutdown_timeout: Duration::from_secs(30),
        auth: Some(auth_config()),
        ..RunConfig::default()
    }
}

/// The one way tests start the pipeline: on `127.0.0.1:0`, returning once it is connected
/// and serving.
async fn start(config: RunConfig, extra_sinks: Vec<Box<dyn Sink>>) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (started_tx, started_rx) = oneshot::channel();
    let hooks = RunHooks {
        extra_sinks,
        started: Some(started_tx),
    };
    let task = tokio::spawn(run_pipeline_on(listener, config, hooks, async {
        let _ = stop_rx.await;
    }));
    let started = timeout(PATIENCE, started_rx)
        .await
        .expect("the pipeline starts in time")
        .expect("the pipeline started (or it failed: see the task's error)");
    assert_eq!(started.addr, addr);
    Running {
        addr,
        stop: Some(stop_tx),
        task,
    }
}

/// `GET url` as an admin (the read model is theirs; public routes ignore the token).
async fn get_json(client: &reqwest::Client, url: &str) -> (u16, Value) {
    let response = client
        .get(url)
        .bearer_auth(token(Role::Admin))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// One sample of `/metrics`, by series (`name{labels}` → value).
async fn metrics(client: &reqwest::Client, running: &Running) -> BTreeMap<String, f64> {
    scrape(client, &running.url("/metrics")).await
}

/// Waits until `queue` is empty and nothing is in flight: everything the pipeline read was
/// committed and acknowledged.
async fn all_acknowledged(
    client: &reqwest::Client,
    running: &Running,
    publisher: &Publisher,
    queue: &str,
    what: &str,
) {
    eventually(what, PATIENCE, || async {
        let series = metrics(client, running).await;
        let in_flight = series.get("delivertrack_messages_in_flight").copied();
        let ready = ready_messages(publisher, queue).await;
        (ready == 0 && in_flight == Some(0.0)).then_some(())
    })
    .await;
}

/// `delivertrack_events_rejected_total`, every reason together.
fn rejected(series: &BTreeMap<String, f64>) -> f64 {
    series
        .iter()
        .filter(|(name, _)| name.starts_with("delivertrack_events_rejected_total"))
        .map(|(_, value)| value)
        .sum()
}

// ---------------------------------------------------------------------------------------
// The expected final state of a stream of location fixes
// ---------------------------------------------------------------------------------------

/// Per courier: the last fix (time, lat, lon) and the odometer over all fixes in order.
#[derive(Debug)]
struct Expected {
    couriers: BTreeMap<CourierId, (i64, f64, f64, f64)>,
}

fn expected(events: &[Event]) -> Expected {
    let mut fixes: BTreeMap<CourierId, Vec<&Event>> = BTreeMap::new();
    for event in events {
        if let EventBody::LocationUpdated(fix) = &event.body {
            fixes.entry(fix.courier_id).or_default().push(event);
        }
    }
    let couriers = fixes
        .into_iter()
        .map(|(courier, mut list)| {
            list.sort_by_key(|e| e.occurred_at);
            let position = |e: &Event| match &e.body {
                EventBody::LocationUpdated(fix) => fix.position,
                _ => unreachable!(),
            };
            let odometer: f64 = list
                .windows(2)
                .map(|w| position(w[0]).distance_m(&position(w[1])))
                .sum();
            let last = list[list.len() - 1];
            let p = position(last);
            (courier, (last.occurred_at, p.lat(), p.lon(), odometer))
        })
        .collect();
    Expected { couriers }
}

/// Whether the read model (its snapshot) holds exactly `expected`: every courier, each at
/// its last fix, with the odometer of every fix applied once.
fn holds(snapshot: &Value, expected: &Expected) -> bool {
    let Some(couriers) = snapshot["couriers"].as_array() else {
        return false;
    };
    if couriers.len() != expected.couriers.len() {
        return false;
    }
    couriers.iter().all(|courier| {
        let Some(id) = courier["courier_id"]
            .as_str()
            .and_then(|id| id.parse().ok())
            .map(CourierId)
        else {
            return false;
        };
        let Some(&(at, lat, lon, odometer)) = expected.couriers.get(&id) else {
            return false;
        };
        courier["at_ms"].as_i64() == Some(at)
            && (courier["position"]["lat"].as_f64().unwrap_or(f64::NAN) - lat).abs() < 1e-6
            && (courier["position"]["lon"].as_f64().unwrap_or(f64::NAN) - lon).abs() < 1e-6
            // A lost zigzag fix shortens the path by metres, a doubled one is a no-op only
            // if replays are: per-step rounding to millimetres stays far below this.
            && (courier["odometer_m"].as_f64().unwrap_or(f64::NAN) - odometer).abs() < 0.5
    })
}

async fn wait_for_state(client: &reqwest::Client, running: &Running, expected: &Expected) {
    let url = running.url("/api/snapshot");
    eventually(
        "the read model holds every published fix",
        PATIENCE,
        || async {
            let (status, body) = get_json(client, &url).await;
            (status == 200 && holds(&body, expected)).then_some(())
        },
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// Test sinks
// ---------------------------------------------------------------------------------------

/// Blocks every commit until the gate opens.
struct GateSink {
    open: watch::Receiver<bool>,
    /// Counts the commits that reached the gate.
    entered: watch::Sender<u32>,
}

/// A closed gate: the sender that opens it, the count of commits it holds or let through,
/// and the sink.
fn gate() -> (watch::Sender<bool>, watch::Receiver<u32>, GateSink) {
    let (gate, open) = watch::channel(false);
    let (entered, entries) = watch::channel(0);
    (gate, entries, GateSink { open, entered })
}

impl Sink for GateSink {
    fn name(&self) -> &'static str {
        "gate"
    }

    fn commit(&mut self, _output: Arc<EpochOutput>) -> SinkFuture<'_> {
        Box::pin(async move {
            self.entered.send_modify(|entered| *entered += 1);
            // A dropped sender opens the gate too: the test is over.
            let _ = self.open.wait_for(|open| *open).await;
            Ok(())
        })
    }
}

/// Takes a while for every epoch, so that a stream is still flowing when a test acts.
struct SlowSink(Duration);

impl Sink for SlowSink {
    fn name(&self) -> &'static str {
        "slow"
    }

    fn commit(&mut self, _output: Arc<EpochOutput>) -> SinkFuture<'_> {
        let delay = self.0;
        Box::pin(async move {
            sleep(delay).await;
            Ok(())
        })
    }
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_valid_event_reaches_the_read_model_and_is_acknowledged() {
    let config = unique_config("valid");
    let _cleanup = TopologyGuard::new(&config);
    let publisher = publisher(&config).await;
    let running = start(run_config(config.clone()), Vec::new()).await;
    let client = reqwest::Client::new();

    // Single-event messages and arrays, interleaved.
    let singles = location_events(20, 600, now_ms());
    let arrays = location_events(15, 900, now_ms());
    publisher
        .publish_events(&config.exchange, &singles, 1)
        .await
        .unwrap();
    publisher
        .publish_events(&config.exchange, &arrays, 25)
        .await
        .unwrap();
    let all: Vec<Event> = singles.iter().chain(&arrays).cloned().collect();
    wait_for_state(&client, &running, &expected(&all)).await;

    all_acknowledged(
        &client,
        &running,
        &publisher,
        &config.queue,
        "every message is acknowledged",
    )
    .await;
    let series = metrics(&client, &running).await;
    assert_eq!(
        series.get("delivertrack_events_ingested_total{kind=\"location.updated\"}"),
        Some(&1500.0),
        "{series:?}"
    );
    assert_eq!(
        series.get("delivertrack_messages_received_total"),
        Some(&(600.0 + 900.0 / 25.0))
    );
    assert!(series["delivertrack_epochs_committed_total"] >= 1.0);
    assert!(series["delivertrack_epoch_commit_duration_seconds_count"] >= 1.0);
    // Where the time goes, per epoch: every stage is there (the system of record's at 0,
    // there is none), and every event counts once in the size of its epoch.
    let stage = |stage: &str, part: &str| {
        series[&format!("delivertrack_epoch_stage_duration_seconds_{part}{{stage=\"{stage}\"}}")]
    };
    for name in ["decode", "dataflow", "ack_wait"] {
        assert!(stage(name, "count") >= 1.0, "{name}: {series:?}");
    }
    assert!(
        stage("decode", "sum") > 0.0,
        "RabbitMQ's messages are decoded"
    );
    assert_eq!(stage("record_commit", "count"), 0.0);
    assert_eq!(series["delivertrack_epoch_events_sum"], 1500.0);
    assert_eq!(
        series["delivertrack_epoch_events_count"],
        series["delivertrack_epochs_committed_total"]
    );
    let (status, body) = get_json(&client, &running.url("/readyz")).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ready")));

    let report = running.stop().await;
    assert_eq!(report.events, 1500);
    assert_eq!(ready_messages(&publisher, &config.queue).await, 0);
    assert_eq!(
        ready_messages(&publisher, &config.dead_letter_queue).await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_malformed_message_is_dead_lettered_with_its_reason() {
    let config = unique_config("malformed");
    let _cleanup = TopologyGuard::new(&config);
    let publisher = publisher(&config).await;
    let running = start(run_config(config.clone()), Vec::new()).await;
    let client = reqwest::Client::new();

    let good = location_events(1, 2, now_ms());
    let good_json = |i: usize| delivertrack_dataflow::contract::encode_event(&good[i]);
    let mut unknown_field = good_json(0);
    unknown_field["altitude_m"] = Value::from(30);
    let mut off_the_map = good_json(0);
    off_the_map["lat"] = Value::from(123.0);
    let unknown_delivery = serde_json::json!({
        "v": 1, "kind": "status.changed", "event_id": uuid::Uuid::new_v4(),
        "occurred_at": good_json(0)["occurred_at"], "delivery_id": uuid::Uuid::new_v4(),
        "status": "cancelled"
    });
    // (routing key, payload, the reason expected in the dead letter)
    let bad: Vec<(&str, Vec<u8>, &str)> = vec![
        ("location.updated", b"{not json".to_vec(), "bad_json"),
        (
            "zone.deleted",
            serde_json::to_vec(&good_json(0)).unwrap(),
            "kind_mismatch",
        ),
        (
            "location.updated",
            serde_json::to_vec(&unknown_field).unwrap(),
            "unknown_field",
        ),
        (
            "location.updated",
            serde_json::to_vec(&off_the_map).unwrap(),
            "coordinate_out_of_range",
        ),
        // Refused by the dataflow, not by the contract: no such delivery.
        (
            "status.changed",
            serde_json::to_vec(&unknown_delivery).unwrap(),
            "unknown_delivery",
        ),
    ];
    for (key, payload, _) in &bad {
        publisher
            .publish_raw(&config.exchange, key, payload)
            .await
            .unwrap();
    }
    // An array with one bad element: only that one is dead-lettered, the good one goes on.
    let mut bad_element = good_json(0);
    bad_element["speed_mps"] = Value::from(-4.0);
    let mixed = serde_json::to_vec(&Value::Array(vec![bad_element, good_json(1)])).unwrap();
    publisher
        .publish_raw(&config.exchange, "location.updated", &mixed)
        .await
        .unwrap();

    let dead = eventually("every refused event is dead-lettered", PATIENCE, || async {
        let ready = ready_messages(&publisher, &config.dead_letter_queue).await;
        (ready >= 6).then_some(ready)
    })
    .await;
    assert_eq!(dead, 6, "five bad messages and one bad element");

    let reasons: Vec<(String, String, String)> =
        take_dead_letters(&publisher, &config.dead_letter_queue, dead as usize)
            .await
            .into_iter()
            .map(|letter| {
                (
                    letter[HEADER_REASON].clone(),
                    letter[HEADER_ROUTING_KEY].clone(),
                    letter[HEADER_STAGE].clone(),
                )
            })
            .collect();
    for (key, _, reason) in &bad {
        assert!(
            reasons.iter().any(|(r, k, _)| r == reason && k == key),
            "no dead letter with reason {reason} for {key}: {reasons:?}"
        );
    }
    assert!(
        reasons
            .iter()
            .any(|(r, _, stage)| r == "unknown_delivery" && stage == "dataflow"),
        "{reasons:?}"
    );
    assert_eq!(
        reasons
            .iter()
            .filter(|(r, _, _)| r == "value_out_of_range")
            .count()
            + reasons
                .iter()
                .filter(|(r, _, _)| r == "invalid_value")
                .count(),
        1,
        "the array's bad element: {reasons:?}"
    );

    // The array's good element reached the read model; the pipeline never stopped.
    wait_for_state(&client, &running, &expected(&good[1..])).await;
    eventually("the ingest queue is drained", PATIENCE, || async {
        (ready_messages(&publisher, &config.queue).await == 0).then_some(())
    })
    .await;
    // Refusals are counted as their deliveries are acknowledged, just after the dead
    // letters are confirmed.
    eventually("every refusal is counted", PATIENCE, || async {
        let series = metrics(&client, &running).await;
        (rejected(&series) >= 6.0).then_some(())
    })
    .await;
    let series = metrics(&client, &running).await;
    assert_eq!(
        rejected(&series),
        6.0,
        "four bad messages, one bad element, one refused by the dataflow: {series:?}"
    );
    running.stop().await;
}

/// The bounds of the contract (control characters, lone surrogates, long strings, old
/// timestamps) and of the dataflow (an implausible jump, a sixth rating) are dead-lettered
/// with their reasons and counted, and the pipeline goes on: the jump moved nothing, the
/// fixes after it are applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_stores_cannot_hold_and_what_no_courier_does_are_dead_lettered() {
    use delivertrack_dataflow::contract::encode_event;
    use delivertrack_dataflow::geometry::GeoPoint;
    use serde_json::json;

    let config = unique_config("bounds");
    let _cleanup = TopologyGuard::new(&config);
    let publisher = publisher(&config).await;
    // Events up to an hour old (`--max-event-age-secs 3600`), to see the flag's limit
    // reach the source.
    let mut run = run_config(config.clone());
    run.pipeline.api.contract =
        delivertrack_dataflow::contract::ContractLimits::with_max_event_age_ms(3_600_000);
    let running = start(run, Vec::new()).await;
    let client = reqwest::Client::new();
    let publish = |key: &'static str, payload: Vec<u8>| {
        let publisher = &publisher;
        let exchange = config.exchange.clone();
        async move {
            publisher
                .publish_raw(&exchange, key, &payload)
                .await
                .unwrap();
        }
    };
    let json = |value: Value| serde_json::to_vec(&value).unwrap();
    let stamp = |ms: i64| {
        let at = std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap());
        humantime::format_rfc3339_millis(at).to_string()
    };
    let now = now_ms();

    // A courier's two fixes, a jump 25 km away one second later, and a fix 11 m from the
    // last good one a second after that.
    let mut fixes = location_events(1, 2, now - 1_000);
    let jump = Event {
        event_id: delivertrack_dataflow::EventId(uuid::Uuid::new_v4()),
        occurred_at: now,
        body: match &fixes[1].body {
            EventBody::LocationUpdated(fix) => {
                EventBody::LocationUpdated(delivertrack_dataflow::event::LocationUpdated {
                    position: GeoPoint::from_degrees(52.70, 13.65),
                    ..fix.clone()
                })
            }
            _ => unreachable!(),
        },
    };
    let after = Event {
        event_id: delivertrack_dataflow::EventId(uuid::Uuid::new_v4()),
        occurred_at: now + 1_000,
        body: match &fixes[1].body {
            EventBody::LocationUpdated(fix) => {
                EventBody::LocationUpdated(delivertrack_dataflow::event::LocationUpdated {
                    position: GeoPoint::from_degrees(
                        fix.position.lat() + 0.0001,
                        fix.position.lon(),
                    ),
                    ..fix.clone()
                })
            }
            _ => unreachable!(),
        },
    };
    publish(
        "location.updated",
        json(json!([encode_event(&fixes[0]), encode_event(&fixes[1])])),
    )
    .await;
    publish("location.updated", json(encode_event(&jump))).await;
    publish("location.updated", json(encode_event(&after))).await;
    fixes.push(after);

    // A delivery that ends delivered, rated six times.
    let delivery = uuid::Uuid::new_v4();
    let event = |kind: &str, n: i64, fields: Value| {
        let mut event = json!({"v": 1, "kind": kind, "event_id": uuid::Uuid::new_v4(),
            "occurred_at": stamp(now - 10_000 + n * 10), "delivery_id": delivery});
        event
            .as_object_mut()
            .unwrap()
            .extend(fields.as_object().unwrap().clone());
        event
    };
    publish(
        "delivery.created",
        json(event(
            "delivery.created",
            0,
            json!({"customer_id": uuid::Uuid::new_v4(),
            "pickup": {"lat": 52.5, "lon": 13.4}, "dropoff": {"lat": 52.51, "lon": 13.41}}),
        )),
    )
    .await;
    for (n, status) in ["assigned", "picked_up", "in_transit", "delivered"]
        .into_iter()
        .enumerate()
    {
        let mut fields = json!({"status": status});
        if status == "assigned" {
            fields["courier_id"] = json!(uuid::Uuid::new_v4());
        }
        publish(
            "status.changed",
            json(event("status.changed", 1 + n as i64, fields)),
        )
        .await;
    }
    for n in 0..6 {
        publish(
            "delivery.rated",
            json(event("delivery.rated", 10 + n, json!({"score": 1 + n % 5}))),
        )
        .await;
    }

    // What the contract refuses: (routing key, payload, reason).
    let contract: Vec<(&'static str, Vec<u8>, &str)> = vec![
        (
            "delivery.rated",
            json(event(
                "delivery.rated",
                20,
                json!({"score": 5, "comment": "a\u{0}b"}),
            )),
            "control_character",
        ),
        (
            "zone.deleted",
            serde_json::to_string(&json!({"v": 1, "kind": "zone.deleted",
                "event_id": uuid::Uuid::new_v4(), "occurred_at": stamp(now),
                "zone_id": "@@@"}))
            .unwrap()
            .replace("@@@", "\\ud800")
            .into_bytes(),
            "invalid_unicode",
        ),
        (
            "location.updated",
            {
                let mut fix = encode_event(&fixes[0]);
                fix["courier_id"] = json!("x".repeat(1 << 20));
                json(fix)
            },
            "string_too_long",
        ),
        (
            "zone.deleted",
            json(
                json!({"v": 1, "kind": "zone.deleted", "event_id": uuid::Uuid::new_v4(),
                "occurred_at": "0001-01-01T00:00:00Z", "zone_id": uuid::Uuid::new_v4()}),
            ),
            "timestamp_too_old",
        ),
        (
            "zone.deleted",
            json(
                json!({"v": 1, "kind": "zone.deleted", "event_id": uuid::Uuid::new_v4(),
                "occurred_at": stamp(now - 2 * 3_600_000), "zone_id": uuid::Uuid::new_v4()}),
            ),
            "timestamp_too_old",
        ),
    ];
    for (key, payload, _) in &contract {
        publish(key, payload.clone()).await;
    }

    let dead = eventually("every refused event is dead-lettered", PATIENCE, || async {
        let ready = ready_messages(&publisher, &config.dead_letter_queue).await;
        (ready >= 7).then_some(ready)
    })
    .await;
    let mut reasons: Vec<(String, String)> =
        take_dead_letters(&publisher, &config.dead_letter_queue, dead as usize)
            .await
            .into_iter()
            .map(|letter| (letter[HEADER_REASON].clone(), letter[HEADER_STAGE].clone()))
            .collect();
    reasons.sort();
    let mut expected_reasons: Vec<(String, String)> = contract
        .iter()
        .map(|(_, _, reason)| ((*reason).to_owned(), "decode".to_owned()))
        .chain([
            ("implausible_jump".to_owned(), "dataflow".to_owned()),
            ("too_many_ratings".to_owned(), "dataflow".to_owned()),
        ])
        .collect();
    expected_reasons.sort();
    assert_eq!(reasons, expected_reasons);

    // The pipeline went on: the courier is at the fix after the jump, with the distance of
    // the good fixes only.
    wait_for_state(&client, &running, &expected(&fixes)).await;
    all_acknowledged(
        &client,
        &running,
        &publisher,
        &config.queue,
        "everything is acknowledged",
    )
    .await;
    assert_eq!(
        ready_messages(&publisher, &config.dead_letter_queue).await,
        0,
        "no dead letter beyond the expected ones"
    );
    eventually("every refusal is counted by reason", PATIENCE, || async {
        let series = metrics(&client, &running).await;
        let count = |reason: &str| {
            series
                .get(&format!(
                    "delivertrack_events_rejected_total{{reason=\"{reason}\"}}"
                ))
                .copied()
                .unwrap_or(0.0)
        };
        expected_reasons
            .iter()
            .all(|(reason, _)| {
                let expected = expected_reasons.iter().filter(|(r, _)| r == reason).count();
                count(reason) == expected as f64
            })
            .then_some(())
    })
    .await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_sink_bounds_in_flight_deliveries_to_the_prefetch() {
    const PREFETCH: u16 = 20;
    const MESSAGES: usize = 400;
    let config = RabbitConfig {
        prefetch: PREFETCH,
        ..unique_config("stall")
    };
    let _cleanup = TopologyGuard::new(&config);
    let publisher = publisher(&config).await;
    let (gate, _entered, sink) = gate();
    let running = start(run_config(config.clone()), vec![Box::new(sink)]).await;
    let client = reqwest::Client::new();

    let events = location_events(10, MESSAGES, now_ms());
    publisher
        .publish_events(&config.exchange, &events, 1)
        .await
        .unwrap();

    // The sink holds the first epoch: acks stop, the broker stops at the prefetch, and the
    // queue keeps the rest.
    let expected_ready = u32::try_from(MESSAGES).unwrap() - u32::from(PREFETCH);
    eventually(
        "the source holds exactly the prefetch",
        PATIENCE,
        || async {
            let in_flight = metrics(&client, &running).await["delivertrack_messages_in_flight"];
            let ready = ready_messages(&publisher, &config.queue).await;
            (in_flight == f64::from(PREFETCH) && ready == expected_ready).then_some(())
        },
    )
    .await;
    // ... and stays there while the sink is stalled.
    for _ in 0..10 {
        sleep(Duration::from_millis(100)).await;
        let in_flight = metrics(&client, &running).await["delivertrack_messages_in_flight"];
        assert!(in_flight <= f64::from(PREFETCH), "{in_flight} in flight");
        assert_eq!(
            ready_messages(&publisher, &config.queue).await,
            expected_ready
        );
    }

    gate.send_replace(true);
    wait_for_state(&client, &running, &expected(&events)).await;
    all_acknowledged(
        &client,
        &running,
        &publisher,
        &config.queue,
        "everything is acknowledged",
    )
    .await;
    let report = running.stop().await;
    assert_eq!(report.events, MESSAGES as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_refused_messages_is_acknowledged_only_after_the_epochs_before_it() {
    let config = unique_config("refused-order");
    let _cleanup = TopologyGuard::new(&config);
    let publisher = publisher(&config).await;
    let (gate, mut entered, sink) = gate();
    let running = start(run_config(config.clone()), vec![Box::new(sink)]).await;
    let client = reqwest::Client::new();

    // A good message: its epoch reaches the sinks, and the gate holds it there.
    let good = location_events(1, 1, now_ms());
    publisher
        .publish_events(&config.exchange, &good, 1)
        .await
        .unwrap();
    timeout(PATIENCE, entered.wait_for(|entered| *entered >= 1))
        .await
        .expect("the good message's epoch reaches the gate")
        .unwrap();
    // Then a lone malformed message: a batch of its own, with no event in it. Its
    // acknowledgement is a multiple-ack of a higher delivery tag, which would take the
    // good message with it.
    publisher
        .publish_raw(&config.exchange, "location.updated", b"{not json")
        .await
        .unwrap();
    eventually("the malformed message is received", PATIENCE, || async {
        let series = metrics(&client, &running).await;
        (series.get("delivertrack_messages_received_total") == Some(&2.0)).then_some(())
    })
    .await;
    // While the good epoch is held, neither delivery is acknowledged, and the malformed one
    // is dead-lettered only in its turn.
    for _ in 0..10 {
        sleep(Duration::from_millis(100)).await;
        let in_flight = metrics(&client, &running).await["delivertrack_messages_in_flight"];
        assert_eq!(in_flight, 2.0, "both deliveries stay unacknowledged");
        assert_eq!(ready_messages(&publisher, &config.queue).await, 0);
        assert_eq!(
            ready_messages(&publisher, &config.dead_letter_queue).await,
            0,
            "nothing is dead-lettered before the epochs read before it are committed"
        );
    }

    gate.send_replace(true);
    wait_for_state(&client, &running, &expected(&good)).await;
    eventually(
        "both are committed or dead-lettered, and acknowledged",
        PATIENCE,
        || async {
            let in_flight = metrics(&client, &running).await["delivertrack_messages_in_flight"];
            let ready = ready_messages(&publisher, &config.queue).await;
            let dead = ready_messages(&publisher, &config.dead_letter_queue).await;
            (in_flight == 0.0 && ready == 0 && dead == 1).then_some(())
        },
    )
    .await;
    // No acknowledgement was refused (acking a tag twice closes the channel, and the
    // reconnection would redeliver what it held): no reconnection, one dead letter.
    for _ in 0..10 {
        sleep(Duration::from_millis(100)).await;
        let series = metrics(&client, &running).await;
        assert_eq!(series["delivertrack_source_reconnects_total"], 0.0);
        assert_eq!(series["delivertrack_messages_in_flight"], 0.0);
        assert_eq!(
            series.get("delivertrack_messages_received_total"),
            Some(&2.0),
            "nothing is redelivered"
        );
        assert_eq!(
            ready_messages(&publisher, &config.dead_letter_queue).await,
            1
        );
    }
    let series = metrics(&client, &running).await;
    assert_eq!(
        series.get("delivertrack_events_rejected_total{reason=\"bad_json\"}"),
        Some(&1.0),
        "{series:?}"
    );
    assert_eq!(rejected(&series), 1.0, "{series:?}");
    let report = running.stop().await;
    assert_eq!(report.events, 1);
    assert_eq!(ready_messages(&publisher, &config.queue).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutting_the_connection_mid_stream_loses_nothing() {
    let mut config = unique_config("cut");
    // The topology is deleted on the broker itself, not through the proxy.
    let _cleanup = TopologyGuard::new(&config);
    let publisher = publisher(&config).await;
    let proxy = TcpProxy::start(broker_addr(&config.url).await.unwrap())
        .await
        .unwrap();
    config.url = url_via(&config.url, proxy.addr());
    let direct = RabbitConfig {
        url: delivertrack_ingest::testing::rabbitmq_url(),
        ..config.clone()
    };
    // The stream waits in the queue before the pipeline starts, so that the pipeline is
    // surely mid-stream when the test cuts it (at most the prefetch is in flight).
    let first = location_events(25, 2_500, now_ms() - 60_000);
    publisher
        .publish_events(&direct.exchange, &first, 1)
        .await
        .unwrap();
    let running = start(
        run_config(config.clone()),
        vec![Box::new(SlowSink(Duration::from_millis(20)))],
    )
    .await;
    let client = reqwest::Client::new();

    // Mid-stream: some epochs committed, many messages still in the queue or in flight.
    eventually("the stream is flowing", PATIENCE, || async {
        let committed = metrics(&client, &running).await["delivertrack_epochs_committed_total"];
        (committed >= 3.0).then_some(())
    })
    .await;
    assert!(
        ready_messages(&publisher, &direct.queue).await > 0,
        "still mid-stream"
    );

    proxy.cut();
    let (_, reason) = eventually("/readyz reports the lost connection", PATIENCE, || async {
        let (status, body) = get_json(&client, &running.url("/readyz")).await;
        (status == 503 && body["error"]["code"] == "source_unavailable").then_some((status, body))
    })
    .await;
    assert!(
        reason["error"]["message"]
            .as_str()
            .unwrap()
            .contains("RabbitMQ")
    );
    // More input arrives while the pipeline is cut off; the broker keeps it.
    let second = location_events(5, 500, now_ms());
    publisher
        .publish_events(&direct.exchange, &second, 10)
        .await
        .unwrap();
    let (status, _) = get_json(&client, &running.url("/readyz")).await;
    assert_eq!(status, 503, "still cut");

    proxy.restore();
    eventually("/readyz recovers", PATIENCE, || async {
        let (status, _) = get_json(&client, &running.url("/readyz")).await;
        (status == 200).then_some(())
    })
    .await;
    let all: Vec<Event> = first.iter().chain(&second).cloned().collect();
    wait_for_state(&client, &running, &expected(&all)).await;
    all_acknowledged(
        &client,
        &running,
        &publisher,
        &direct.queue,
        "everything is acknowledged",
    )
    .await;
    let series = metrics(&client, &running).await;
    assert!(series["delivertrack_source_reconnects_total"] >= 1.0);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_closing_the_connection_mid_stream_loses_nothing_and_doubles_nothing() {
    let Some(ctl) = Rabbitmqctl::find() else {
        eprintln!(
            "SKIPPED the_broker_closing_the_connection_mid_stream_loses_nothing_and_doubles_nothing: \
             rabbitmqctl was not found (on the PATH, in /usr/sbin, or named by RABBITMQCTL), so \
             the broker cannot be made to close a connection"
        );
        return;
    };
    let config = unique_config("broker-close");
    let prefetch = f64::from(config.prefetch);
    let _cleanup = TopologyGuard::new(&config);
    let publisher = publisher(&config).await;
    let first = location_events(25, 2_500, now_ms() - 60_000);
    publisher
        .publish_events(&config.exchange, &first, 1)
        .await
        .unwrap();
    // A sink that holds every commit until the test opens it: the pipeline is surely
    // mid-stream, with the prefetch delivered and not acknowledged, when the broker closes
    // its connection (rabbitmqctl takes seconds; an unheld stream would be over by then).
    let (gate, _entered, sink) = gate();
    let running = start(run_config(config.clone()), vec![Box::new(sink)]).await;
    let client = reqwest::Client::new();
    eventually(
        "the prefetch is in flight and the queue keeps the rest",
        PATIENCE,
        || async {
            let in_flight = metrics(&client, &running).await["delivertrack_messages_in_flight"];
            let ready = ready_messages(&publisher, &config.queue).await;
            (in_flight == prefetch && f64::from(ready) == 2_500.0 - prefetch).then_some(())
        },
    )
    .await;

    // The broker closes the source's connection — found by its name, so no other test's
    // (and not the pipeline's command publisher, `<name>-commands`).
    let closed = eventually(
        "the broker lists the source's connection",
        PATIENCE,
        || async {
            match ctl
                .connections_named(&config.connection_name)
                .await
                .expect("rabbitmqctl lists the connections")
                .as_slice()
            {
                [pid] => Some(pid.clone()),
                _ => None,
            }
        },
    )
    .await;
    let closed_at = Instant::now();
    ctl.close_connection(&closed, "closed by the test")
        .await
        .expect("rabbitmqctl closes the connection");
    eventually("the source notices and reconnects", PATIENCE, || async {
        let reconnects = metrics(&client, &running).await["delivertrack_source_reconnects_total"];
        (reconnects >= 1.0).then_some(())
    })
    .await;
    assert!(
        closed_at.elapsed() < Duration::from_secs(15),
        "the close was noticed and healed promptly, not after {:?}",
        closed_at.elapsed()
    );
    eventually("/readyz is ready again", PATIENCE, || async {
        let (status, _) = get_json(&client, &running.url("/readyz")).await;
        (status == 200).then_some(())
    })
    .await;
    // The sinks commit again; the epochs read on the closed connection cannot be
    // acknowledged on it, and their deliveries come back. More input after the reconnection.
    gate.send_replace(true);
    let second = location_events(5, 500, now_ms());
    publisher
        .publish_events(&config.exchange, &second, 10)
        .await
        .unwrap();

    // Nothing lost, nothing counted twice: every courier at its last fix with the odometer of
    // every fix applied once, although the deliveries in flight at the close came back.
    let all: Vec<Event> = first.iter().chain(&second).cloned().collect();
    wait_for_state(&client, &running, &expected(&all)).await;
    all_acknowledged(
        &client,
        &running,
        &publisher,
        &config.queue,
        "everything is acknowledged",
    )
    .await;
    let series = metrics(&client, &running).await;
    let source_series: BTreeMap<&String, &f64> = series
        .iter()
        .filter(|(name, _)| {
            name.starts_with("delivertrack_messages") || name.starts_with("delivertrack_events")
        })
        .collect();
    assert_eq!(series["delivertrack_source_reconnects_total"], 1.0);
    // 2 550 messages were published; more were received: the redeliveries.
    assert!(
        series["delivertrack_messages_received_total"] > 2_550.0,
        "{source_series:?}"
    );
    // A redelivered fix is recognised: the very fix a courier holds is a replay, an older
    // one is `stale` (counted, acknowledged, never dead-lettered). No other refusal.
    let stale = series
        .get("delivertrack_events_rejected_total{reason=\"stale\"}")
        .copied()
        .unwrap_or(0.0);
    assert_eq!(rejected(&series), stale, "{source_series:?}");
    assert_eq!(
        ready_messages(&publisher, &config.dead_letter_queue).await,
        0
    );
    let report = running.stop().await;
    assert!(report.events >= 3_000, "{report:?}");
    assert_eq!(ready_messages(&publisher, &config.queue).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_drains_and_exits_zero_on_sigterm() {
    const EVENTS: u64 = 6_000;
    let config = unique_config("sigterm");
    let _cleanup = TopologyGuard::new(&config);
    let publisher = publisher(&config).await;
    // The stream waits in the queue, so that the binary is mid-stream when it is stopped.
    let events = location_events(50, EVENTS as usize, now_ms());
    publisher
        .publish_events(&config.exchange, &events, 1)
        .await
        .unwrap();
    let (child, addr) = spawn_binary(
        &config,
        &[
            "--prefetch",
            "200",
            "--epoch-max-events",
            "100",
            "--epoch-max-ms",
            "20",
            "--shutdown-timeout-secs",
            "10",
            // The stores have their own end-to-end tests (tests/recovery.rs).
            "--no-postgres",
            "--no-redis",
            "--no-mongo",
            "--no-derived",
        ],
    )
    .await;
    let client = reqwest::Client::new();

    // Mid-stream: the pipeline has committed an epoch and is still reading.
    eventually("the binary is consuming", PATIENCE, || async {
        let (status, body) = get_json(&client, &format!("http://{addr}/readyz")).await;
        (status == 200 && body["epoch"].is_u64()).then_some(())
    })
    .await;
    let (status, stderr, took) = terminate(child).await;
    assert!(status.success(), "exit {status:?}; stderr:\n{stderr}");
    assert!(took < Duration::from_secs(12), "{took:?}");
    assert!(log_line(&stderr, "SIGTERM received.").is_some(), "{stderr}");

    // The first process processed and acknowledged some events; everything else is still
    // in the queue (nothing acknowledged unprocessed, nothing processed twice), and a
    // restarted pipeline drains exactly that.
    let first = drained_events(&stderr);
    assert!(first > 0, "the first process committed something");
    eprintln!("the first process committed {first} of {EVENTS} events before it stopped");
    let running = start(run_config(config.clone()), Vec::new()).await;
    // Drained: everything left was received (a delivery the client library holds but the
    // source has not taken yet is neither ready in the queue nor in flight, so the queue and
    // the in-flight gauge alone would end the wait too early) and acknowledged.
    let rest = (EVENTS - first) as f64;
    eventually(
        "the restarted pipeline drains the queue",
        PATIENCE,
        || async {
            let series = metrics(&client, &running).await;
            let received = series
                .get("delivertrack_events_ingested_total{kind=\"location.updated\"}")
                .copied()
                .unwrap_or(0.0);
            let in_flight = series["delivertrack_messages_in_flight"];
            let ready = ready_messages(&publisher, &config.queue).await;
            (received >= rest && in_flight == 0.0 && ready == 0).then_some(())
        },
    )
    .await;
    let second = running.stop().await;
    assert_eq!(
        first + second.events,
        EVENTS,
        "every event processed exactly once (first process: {first})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_commits_and_acknowledges_its_open_epoch_on_sigterm() {
    const MESSAGES: usize = 300;
    let config = unique_config("open-epoch");
    let _cleanup = TopologyGuard::new(&config);
    let publisher = publisher(&config).await;
    let database = Database::new("open_epoch");
    let url = database.url();
    // An epoch that would stay open for a minute and hold 100 000 events: everything
    // published sits in it when the binary is stopped.
    let (child, addr) = spawn_binary(
        &config,
        &[
            "--prefetch",
            "1000",
            "--epoch-max-events",
            "100000",
            "--epoch-max-ms",
            "60000",
            "--shutdown-timeout-secs",
            "10",
            "--database-url",
            &url,
            "--no-redis",
            "--no-mongo",
            "--no-derived",
        ],
    )
    .await;
    let client = reqwest::Client::new();
    let events = location_events(10, MESSAGES, now_ms());
    publisher
        .publish_events(&config.exchange, &events, 1)
        .await
        .unwrap();
    eventually(
        "every message is received into the open epoch",
        PATIENCE,
        || async {
            let series = scrape(&client, &format!("http://{addr}/metrics")).await;
            (series.get("delivertrack_messages_received_total") == Some(&(MESSAGES as f64)))
                .then_some(())
        },
    )
    .await;
    let series = scrape(&client, &format!("http://{addr}/metrics")).await;
    assert_eq!(
        series["delivertrack_messages_in_flight"], MESSAGES as f64,
        "none acknowledged yet"
    );
    let pool = database.pool().await;
    let logged = |pool: sqlx::PgPool| async move {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM event_log")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    assert_eq!(logged(pool.clone()).await, 0, "the epoch is still open");

    let (status, stderr, took) = terminate(child).await;
    assert!(status.success(), "exit {status:?}; stderr:\n{stderr}");
    assert!(
        took < Duration::from_secs(12),
        "the drain does not wait for the epoch's time bound: {took:?}"
    );
    // The open epoch went through every sink: PostgreSQL logged every event ...
    assert_eq!(drained_events(&stderr), MESSAGES as u64, "{stderr}");
    assert_eq!(logged(pool.clone()).await, MESSAGES as i64);
    pool.close().await;
    // ... and it was acknowledged: nothing came back to the queue when the binary's
    // connection closed.
    assert_eq!(ready_messages(&publisher, &config.queue).await, 0);

    // A second start gets nothing again: a marker published after it is the only message
    // it receives (anything left unacknowledged would be delivered before it).
    let running = start(run_config(config.clone()), Vec::new()).await;
    let marker = location_events(1, 1, now_ms());
    publisher
        .publish_events(&config.exchange, &marker, 1)
        .await
        .unwrap();
    wait_for_state(&client, &running, &expected(&marker)).await;
    all_acknowledged(
        &client,
        &running,
        &publisher,
        &config.queue,
        "the marker is acknowledged",
    )
    .await;
    let series = metrics(&client, &running).await;
    assert_eq!(
        series.get("delivertrack_messages_received_total"),
        Some(&1.0),
        "nothing was redelivered"
    );
    let report = running.stop().await;
    assert_eq!(report.events, 1);
    database.drop_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_model_is_for_admins_only() {
    let config = unique_config("admin-only");
    let _cleanup = TopologyGuard::new(&config);
    let publisher = publisher(&config).await;
    let running = start(run_config(config.clone()), Vec::new()).await;
    let client = reqwest::Client::new();
    let events = location_events(3, 3, now_ms());
    publisher
        .publish_events(&config.exchange, &events, 1)
        .await
        .unwrap();
    wait_for_state(&client, &running, &expected(&events)).await;
    let courier = match &events[0].body {
        EventBody::LocationUpdated(fix) => fix.courier_id,
        other => panic!("a location update, not {other:?}"),
    };

    let get = |path: String, token: Option<String>| {
        let client = client.clone();
        let url = running.url(&path);
        async move {
            let mut request = client.get(url);
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            (status, body["error"]["code"].as_str().map(str::to_owned))
        }
    };
    for path in [
        "/api/snapshot".to_owned(),
        format!("/api/couriers/{courier}"),
        format!("/api/deliveries/{}", uuid::Uuid::new_v4()),
    ] {
        assert_eq!(
            get(path.clone(), None).await,
            (401, Some("unauthorized".into())),
            "{path}"
        );
        for role in [Role::Customer, Role::Courier] {
            assert_eq!(
                get(path.clone(), Some(token(role))).await,
                (403, Some("forbidden".into())),
                "{path} as {role:?}"
            );
        }
    }
    assert_eq!(
        get("/api/snapshot".into(), Some(token(Role::Admin)))
            .await
            .0,
        200
    );
    assert_eq!(
        get(format!("/api/couriers/{courier}"), Some(token(Role::Admin)))
            .await
            .0,
        200
    );
    // The change stream, as the map page opens it.
    let refused = tokio_tungstenite::connect_async(format!("ws://{}/ws/changes", running.addr))
        .await
        .err();
    assert!(
        matches!(&refused, Some(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 401),
        "{refused:?}"
    );
    let admin = token(Role::Admin);
    tokio_tungstenite::connect_async(format!(
        "ws://{}/ws/changes?access_token={admin}",
        running.addr
    ))
    .await
    .expect("an admin opens the change stream");
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(get(path.into(), None).await.0, 200, "{path} stays public");
    }
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_listen_serves_the_metrics_apart_from_the_api() {
    let config = unique_config("metrics-listen");
    let _cleanup = TopologyGuard::new(&config);
    let _publisher = publisher(&config).await;
    // A free port for the metrics (the binary's banner names the API's).
    let metrics_addr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let (child, addr) = spawn_binary(
        &config,
        &[
            "--metrics-listen",
            &metrics_addr.to_string(),
            "--no-postgres",
            "--no-redis",
            "--no-mongo",
            "--no-derived",
        ],
    )
    .await;
    let client = reqwest::Client::new();
    let answer = |url: String| {
        let client = client.clone();
        async move {
            let response = client.get(url).send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.text().await.unwrap())
        }
    };
    let (status, text) = answer(format!("http://{metrics_addr}/metrics")).await;
    assert_eq!(status, 200, "{text}");
    assert!(
        text.contains("delivertrack_messages_in_flight")
            && text.contains("delivertrack_websocket_connections"),
        "the pipeline's and the API's metrics: {text}"
    );
    let (status, text) = answer(format!("http://{addr}/metrics")).await;
    assert_eq!(status, 404, "not on the API's address: {text}");
    assert!(text.contains("route_not_found"), "{text}");
    // The metrics address serves nothing else.
    let (status, _) = answer(format!("http://{metrics_addr}/api/snapshot")).await;
    assert_eq!(status, 404);
    let (status, _) = answer(format!("http://{addr}/healthz")).await;
    assert_eq!(status, 200);
    let (status, stderr, _) = terminate(child).await;
    assert!(status.success(), "exit {status:?}; stderr:\n{stderr}");
}

/// Starts the real binary on this test's topology with `args` added, and returns it once
/// its banner says where it listens.
async fn spawn_binary(config: &RabbitConfig, args: &[&str]) -> (tokio::process::Child, SocketAddr) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_delivertrack"))
        .args(["run", "--listen", "127.0.0.1:0"])
        .args(["--exchange", &config.exchange, "--queue", &config.queue])
        .args(["--dead-letter-exchange", &config.dead_letter_exchange])
        .args(["--dead-letter-queue", &config.dead_letter_queue])
        .args(args)
        .args(["--log-format", "json"])
        .env("RABBITMQ_URL", &config.url)
        .env("JWT_SECRET", JWT_SECRET)
        .env("RUST_LOG", "info")
        .env_remove("DATABASE_URL")
        .env_remove("MONGO_URI")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let addr = support::banner_address(&mut child, PATIENCE).await;
    (child, addr)
}

/// Sends SIGTERM to the binary and waits (15 s at most) for it to exit; returns its status,
/// its log and how long the exit took.
async fn terminate(mut child: tokio::process::Child) -> (ExitStatus, String, Duration) {
    let pid = child.id().expect("the child is running").to_string();
    // The shell's own `kill`: present wherever `sh` is, unlike a procps binary.
    let killed = std::process::Command::new("sh")
        .args(["-c", &format!("kill -TERM {pid}")])
        .status()
        .unwrap();
    assert!(killed.success());
    let started = Instant::now();
    let status = timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("the binary exits within the shutdown bound")
        .unwrap();
    let took = started.elapsed();
    let mut stderr = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr)
        .await
        .unwrap();
    (status, stderr, took)
}

/// The fields of the binary's JSON log line with this message.
fn log_line(stderr: &str, message: &str) -> Option<Value> {
    stderr
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|line| line["fields"]["message"] == message)
        .map(|line| line["fields"].clone())
}

/// The event count of the binary's "The pipeline drained." log line.
fn drained_events(stderr: &str) -> u64 {
    log_line(stderr, "The pipeline drained.")
        .and_then(|fields| fields["events"].as_u64())
        .unwrap_or_else(|| panic!("no drain line with an event count in:\n{stderr}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_at_start_is_an_error_naming_it() {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_delivertrack"))
        .args(["run", "--listen", "127.0.0.1:0"])
        .args(["--no-postgres", "--no-redis", "--no-mongo", "--no-derived"])
        .env("RABBITMQ_URL", "amqp://guest:secret@127.0.0.1:1/%2f")
        .env("JWT_SECRET", JWT_SECRET)
        .output();
    let output = timeout(PATIENCE, output).await.unwrap().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("RabbitMQ at amqp://"), "{stderr}");
    assert!(stderr.contains("127.0.0.1:1"), "{stderr}");
    assert!(
        !stderr.contains("secret"),
        "the password is never shown: {stderr}"
    );
}
