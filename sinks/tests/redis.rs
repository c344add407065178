//! The Redis sink against the real Redis (`REDIS_HOST`, `REDIS_PORT`; by default
//! `127.0.0.1:6379`). Every test writes under a key prefix of its own and deletes its keys
//! when it ends (also when it fails), so tests share the server without seeing each other.
//!
//! The input is real: the fleet simulator's stream through the real dataflow. The
//! reference is the dataflow's output accumulated by [`ReadState`], the read model's state;
//! the expected keys and values are derived from it here, independently of the sink's code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use delivertrack_dataflow::event::{DeliveryCreated, Event, EventBody, StatusChanged};
use delivertrack_dataflow::geometry::GeoPoint;
use delivertrack_dataflow::pipeline::{self, DataflowConfig};
use delivertrack_dataflow::{CustomerId, DeliveryId, EpochOutput, EventId, Status};
use delivertrack_ingest::testing::TcpProxy;
use delivertrack_ingest::{FleetSimulator, SimulatorConfig};
use delivertrack_sinks::read_model::ReadState;
use delivertrack_sinks::redis::{RedisConfig, RedisSink};
use delivertrack_sinks::{Sink, SinkError};
use redis::AsyncCommands;
use serde_json::{Value, json};
use uuid::Uuid;

/// Monday 2026-11-30, 08:00 UTC.
const START_MS: i64 = 1_796_025_600_000;
/// Simulated time per epoch.
const STEP_MS: i64 = 120_000;
/// Epochs per run: 24 simulated minutes, long enough for deliveries to end and be rated.
const EPOCHS: usize = 12;

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;

// ---------------------------------------------------------------------------------------
// The input: simulator → dataflow, once for all tests
// ---------------------------------------------------------------------------------------

/// What the run produced, epoch by epoch, with the reference state after each.
struct Run {
    outputs: Vec<Arc<EpochOutput>>,
    states: Vec<ReadState>,
}

/// Runs `EPOCHS` epochs of a 20-courier city through the dataflow (2 workers).
fn run() -> &'static Run {
    static RUN: OnceLock<Run> = OnceLock::new();
    RUN.get_or_init(|| {
        let config = SimulatorConfig {
            couriers: 20,
            seed: 42,
            deliveries_per_minute: 4.0,
            fix_interval_ms: 5_000,
            rating_rate: 0.9,
            ..SimulatorConfig::default()
        };
        let mut simulator = FleetSimulator::new(config, START_MS);
        let mut epochs = Vec::new();
        for epoch in 0..EPOCHS {
            let mut events = if epoch == 0 {
                simulator.initial_events()
            } else {
                Vec::new()
            };
            events.extend(simulator.step(STEP_MS));
            epochs.push(events);
        }
        let run = through_dataflow(epochs);
        let last = run.states.last().expect("epochs");
        assert!(
            last.deliveries.values().any(|d| d.status.is_terminal())
                && last.deliveries.values().any(|d| d.status.is_active())
                && !last.etas.is_empty(),
            "the run has active deliveries with ETAs and ended ones"
        );
        run
    })
}

fn through_dataflow(epochs: Vec<Vec<Event>>) -> Run {
    let (mut input, mut output) = pipeline::start(DataflowConfig::default()).unwrap();
    let mut state = ReadState::default();
    let mut run = Run {
        outputs: Vec::new(),
        states: Vec::new(),
    };
    for events in epochs {
        input.send(events).unwrap();
        let out = output.recv().expect("the dataflow outputs every epoch");
        state.apply(&out);
        run.outputs.push(Arc::new(out));
        run.states.push(state.clone());
    }
    input.close();
    run
}

// ---------------------------------------------------------------------------------------
// Redis: where it is, a prefix per test, reading keys back
// ---------------------------------------------------------------------------------------

fn redis_host() -> String {
    std::env::var("REDIS_HOST").unwrap_or_else(|_| "127.0.0.1".to_owned())
}

fn redis_port() -> u16 {
    std::env::var("REDIS_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(6379)
}

fn client() -> redis::Client {
    redis::Client::open(redis::ConnectionAddr::Tcp(redis_host(), redis_port())).unwrap()
}

/// A test's own key prefix; dropping it deletes every key under it.
struct Prefix(String);

impl Prefix {
    fn new(test: &str) -> Self {
        Prefix(format!("test:{test}:{}:", Uuid::new_v4()))
    }

    fn config(&self) -> RedisConfig {
        RedisConfig {
            key_prefix: self.0.clone(),
            ..RedisConfig::new(redis_host(), redis_port())
        }
    }
}

impl Drop for Prefix {
    fn drop(&mut self) {
        let Ok(mut conn) = client().get_connection() else {
            return;
        };
        let keys: Vec<String> = match redis::Commands::scan_match(&mut conn, format!("{}*", self.0))
        {
            Ok(iter) => iter.filter_map(Result::ok).collect(),
            Err(_) => return,
        };
        for chunk in keys.chunks(500) {
            let _: Result<i64, _> = redis::Commands::del(&mut conn, chunk);
        }
    }
}

/// One key as read back: its value and its remaining lifetime (ms; -1 without one).
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    value: Value,
    ttl_ms: i64,
}

/// Every key under `prefix`: strings parsed as JSON, sorted sets as `[[member, score]]`
/// from the lowest score.
async fn dump(prefix: &str) -> BTreeMap<String, Entry> {
    let mut conn = client().get_multiplexed_async_connection().await.unwrap();
    let mut keys: Vec<String> = Vec::new();
    {
        let mut iter = conn
            .scan_match::<_, String>(format!("{prefix}*"))
            .await
            .unwrap();
        while let Some(key) = iter.next_item().await {
            keys.push(key.unwrap());
        }
    }
    keys.sort();
    keys.dedup();
    let mut entries = BTreeMap::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let ttl_ms: i64 = conn.pttl(&key).await.unwrap();
        let value = match kind.as_str() {
            "string" => {
                let raw: String = conn.get(&key).await.unwrap();
                serde_json::from_str(&raw).unwrap()
            }
            "zset" => {
                let members: Vec<(String, f64)> =
                    conn.zrange_withscores(&key, 0, -1).await.unwrap();
                json!(members)
            }
            "none" => continue, // expired between SCAN and TYPE
            other => panic!("{key} is a {other}"),
        };
        entries.insert(key, Entry { value, ttl_ms });
    }
    entries
}

// ---------------------------------------------------------------------------------------
// The expected cache, from the reference state
// ---------------------------------------------------------------------------------------

/// What a key should hold, and the range its lifetime must be in.
struct Expected {
    value: Value,
    ttl_ms: std::ops::RangeInclusive<i64>,
}

fn lat_lon(point: GeoPoint) -> Value {
    json!({"lat": point.lat(), "lon": point.lon()})
}

/// The keys of the documented layout for `state`, with the default lifetimes and a history
/// of `history_len` ids.
fn expected(prefix: &str, state: &ReadState, history_len: usize) -> BTreeMap<String, Expected> {
    let mut keys = BTreeMap::new();
    for (id, courier) in &state.couriers {
        keys.insert(
            format!("{prefix}courier:{id}:location"),
            Expected {
                value: json!({
                    "courier_id": id,
                    "lat": courier.position.lat(),
                    "lon": courier.position.lon(),
                    "at_ms": courier.at,
                    "speed_mps": courier.speed_mm_s.map(|s| f64::from(s) / 1000.0),
                    "heading_deg": courier.heading_ddeg.map(|h| f64::from(h) / 10.0),
                }),
                ttl_ms: 1..=15_000,
            },
        );
    }
    let mut histories: BTreeMap<CustomerId, Vec<(i64, String)>> = BTreeMap::new();
    for (id, delivery) in &state.deliveries {
        let eta = state.etas.get(id).map(|eta| {
            json!({
                "courier_id": eta.courier_id,
                "status": eta.status,
                "eta_ms": eta.eta_at,
                "remaining_m": eta.remaining_m,
                "speed_mps": f64::from(eta.speed_mm_s) / 1000.0,
                "as_of_ms": eta.as_of,
            })
        });
        let rating = delivery
            .rating
            .as_ref()
            .map(|r| json!({"score": r.score, "comment": r.comment, "at_ms": r.at}));
        let ttl_ms = if delivery.status.is_terminal() {
            1..=HOUR_MS
        } else {
            // Written within the test: close to the full day.
            DAY_MS - 120_000..=DAY_MS
        };
        keys.insert(
            format!("{prefix}delivery:{id}"),
            Expected {
                value: json!({
                    "delivery_id": id,
                    "customer_id": delivery.customer_id,
                    "courier_id": delivery.courier_id,
                    "status": delivery.status,
                    "pickup": lat_lon(delivery.pickup),
                    "dropoff": lat_lon(delivery.dropoff),
                    "promised_by_ms": delivery.promised_by,
                    "created_at_ms": delivery.created_at,
                    "assigned_at_ms": delivery.assigned_at,
                    "picked_up_at_ms": delivery.picked_up_at,
                    "ended_at_ms": delivery.ended_at,
                    "rating": rating,
                    "version": delivery.version,
                    "eta": eta,
                }),
                ttl_ms,
            },
        );
        histories
            .entry(delivery.customer_id)
            .or_default()
            .push((delivery.created_at, id.to_string()));
    }
    for (customer, mut ids) in histories {
        // Redis orders equal scores by member: do the same, then keep the newest.
        ids.sort();
        let newest: Vec<(String, f64)> = ids
            .iter()
            .skip(ids.len().saturating_sub(history_len))
            .map(|(at, id)| (id.clone(), *at as f64))
            .collect();
        keys.insert(
            format!("{prefix}customer:{customer}:deliveries"),
            Expected {
                value: json!(newest),
                ttl_ms: 30 * DAY_MS - 120_000..=30 * DAY_MS,
            },
        );
    }
    keys
}

/// Redis holds exactly the expected keys, with the expected values and lifetimes.
async fn assert_cache_equals(prefix: &str, state: &ReadState, history_len: usize, label: &str) {
    let actual = dump(prefix).await;
    let expected = expected(prefix, state, history_len);
    let actual_keys: BTreeSet<&String> = actual.keys().collect();
    let expected_keys: BTreeSet<&String> = expected.keys().collect();
    let missing: Vec<_> = expected_keys.difference(&actual_keys).collect();
    let extra: Vec<_> = actual_keys.difference(&expected_keys).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{label}: missing keys {missing:?}, unexpected keys {extra:?}"
    );
    for (key, want) in &expected {
        let got = &actual[key];
        assert_eq!(got.value, want.value, "{label}: value of {key}");
        assert!(
            want.ttl_ms.contains(&got.ttl_ms),
            "{label}: lifetime of {key} is {} ms, expected {:?}",
            got.ttl_ms,
            want.ttl_ms
        );
    }
}

// ---------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn the_cache_equals_the_state_after_every_epoch() {
    let run = run();
    let prefix = Prefix::new("every-epoch");
    let mut sink = RedisSink::connect(&prefix.config()).await.unwrap();
    assert_eq!(sink.name(), "redis");
    for (output, state) in run.outputs.iter().zip(&run.states) {
        sink.commit(Arc::clone(output)).await.unwrap();
        assert_cache_equals(&prefix.0, state, 100, &format!("epoch {}", output.epoch)).await;
    }
    assert!(!sink.is_stale());
    assert_eq!(sink.errors().get(), 0);
    let ended = run.states[EPOCHS - 1]
        .deliveries
        .values()
        .filter(|d| d.status.is_terminal())
        .count();
    assert!(
        ended > 0,
        "some deliveries ended and were checked with the short lifetime"
    );
    sink.close().await.unwrap();
    let refused = sink.commit(Arc::clone(&run.outputs[0])).await.unwrap_err();
    assert!(matches!(refused, SinkError::Closed { sink: "redis" }));
}

#[tokio::test]
async fn recommitting_an_epoch_changes_nothing() {
    let run = run();
    let prefix = Prefix::new("recommit");
    let mut sink = RedisSink::connect(&prefix.config()).await.unwrap();
    let upto = 6;
    for output in &run.outputs[..upto] {
        sink.commit(Arc::clone(output)).await.unwrap();
    }
    let before = dump(&prefix.0).await;
    for again in [upto - 1, 3, 0] {
        sink.commit(Arc::clone(&run.outputs[again])).await.unwrap();
    }
    let after = dump(&prefix.0).await;
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    for (key, was) in &before {
        let now = &after[key];
        assert_eq!(now.value, was.value, "value of {key}");
        assert!(
            now.ttl_ms <= was.ttl_ms,
            "{key}: the replay renewed its lifetime ({} → {} ms)",
            was.ttl_ms,
            now.ttl_ms
        );
    }
    assert_cache_equals(&prefix.0, &run.states[upto - 1], 100, "after the replays").await;
    // And the next epoch goes on from there.
    sink.commit(Arc::clone(&run.outputs[upto])).await.unwrap();
    assert_cache_equals(&prefix.0, &run.states[upto], 100, "after the next epoch").await;
}

#[tokio::test]
async fn an_outage_neither_fails_nor_stalls_commits_and_the_cache_heals() {
    let run = run();
    let prefix = Prefix::new("outage");
    let upstream: SocketAddr = tokio::net::lookup_host((redis_host(), redis_port()))
        .await
        .unwrap()
        .next()
        .unwrap();
    let proxy = TcpProxy::start(upstream).await.unwrap();
    let config = RedisConfig {
        host: proxy.addr().ip().to_string(),
        port: proxy.addr().port(),
        ..prefix.config()
    };
    let mut sink = RedisSink::connect(&config).await.unwrap();
    let registry = prometheus::Registry::new();
    sink.register(&registry).unwrap();

    let cut_at = 4;
    let back_at = 8;
    for output in &run.outputs[..cut_at] {
        sink.commit(Arc::clone(output)).await.unwrap();
    }
    assert_cache_equals(&prefix.0, &run.states[cut_at - 1], 100, "before the cut").await;

    proxy.cut();
    for output in &run.outputs[cut_at..back_at] {
        let started = Instant::now();
        sink.commit(Arc::clone(output)).await.unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "a commit during the outage took {:?}",
            started.elapsed()
        );
    }
    assert!(sink.is_stale());
    assert_eq!(sink.errors().get(), (back_at - cut_at) as u64);
    let metrics = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    assert!(
        metrics.contains(&format!(
            "delivertrack_sink_errors_total{{sink=\"redis\"}} {}",
            back_at - cut_at
        )),
        "{metrics}"
    );
    // Nothing reached Redis meanwhile: it still shows the state before the cut.
    assert_cache_equals(&prefix.0, &run.states[cut_at - 1], 100, "during the cut").await;

    proxy.restore();
    sink.commit(Arc::clone(&run.outputs[back_at]))
        .await
        .unwrap();
    assert!(
        !sink.is_stale(),
        "the first commit after the outage heals the cache"
    );
    assert_cache_equals(&prefix.0, &run.states[back_at], 100, "healed").await;
    assert_eq!(sink.errors().get(), (back_at - cut_at) as u64);

    for (output, state) in run.outputs.iter().zip(&run.states).skip(back_at + 1) {
        sink.commit(Arc::clone(output)).await.unwrap();
        assert_cache_equals(&prefix.0, state, 100, &format!("epoch {}", output.epoch)).await;
    }
}

#[tokio::test]
async fn an_unreachable_redis_is_an_error_at_start_that_names_it() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let started = Instant::now();
    let error = RedisSink::connect(&RedisConfig::new("127.0.0.1", port))
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(error.is_retryable());
    assert_eq!(error.sink(), "redis");
    let source = std::error::Error::source(&error).unwrap().to_string();
    assert_eq!(
        source,
        format!("cannot connect to Redis at 127.0.0.1:{port}")
    );
}

#[tokio::test]
async fn histories_keep_the_newest_deliveries_and_ended_ones_can_be_deleted_at_once() {
    let customer = CustomerId(Uuid::new_v4());
    let ids: Vec<DeliveryId> = (0..5).map(|_| DeliveryId(Uuid::new_v4())).collect();
    let event = |n: usize, at: i64, body: EventBody| Event {
        event_id: EventId(Uuid::from_u128(0xe000 + n as u128)),
        occurred_at: at,
        body,
    };
    let created = |n: usize| {
        event(
            n,
            START_MS + n as i64 * 60_000,
            EventBody::DeliveryCreated(DeliveryCreated {
                delivery_id: ids[n],
                customer_id: customer,
                pickup: GeoPoint::from_degrees(52.52, 13.40),
                dropoff: GeoPoint::from_degrees(52.53, 13.41),
                promised_by: None,
            }),
        )
    };
    let cancel = event(
        10,
        START_MS + 10 * 60_000,
        EventBody::StatusChanged(StatusChanged {
            delivery_id: ids[4],
            status: Status::Cancelled,
            courier_id: None,
        }),
    );
    let run = through_dataflow(vec![
        vec![created(0), created(1), created(2)],
        vec![created(3), created(4)],
        vec![cancel],
    ]);

    let prefix = Prefix::new("history");
    let config = RedisConfig {
        customer_history_len: 3,
        ended_delivery_ttl: Duration::ZERO,
        ..prefix.config()
    };
    let mut sink = RedisSink::connect(&config).await.unwrap();
    let history_key = format!("{}customer:{customer}:deliveries", prefix.0);
    let newest = |range: std::ops::Range<usize>| -> Value {
        json!(
            range
                .map(|n| (ids[n].to_string(), (START_MS + n as i64 * 60_000) as f64))
                .collect::<Vec<_>>()
        )
    };
    for (epoch, output) in run.outputs.iter().enumerate() {
        sink.commit(Arc::clone(output)).await.unwrap();
        let cache = dump(&prefix.0).await;
        let history = &cache[&history_key];
        match epoch {
            0 => assert_eq!(history.value, newest(0..3)),
            _ => assert_eq!(history.value, newest(2..5), "epoch {epoch}"),
        }
        let cancelled = format!("{}delivery:{}", prefix.0, ids[4]);
        assert_eq!(cache.contains_key(&cancelled), epoch == 1, "epoch {epoch}");
        // The other deliveries are there, not ended, with the long lifetime.
        let open = format!("{}delivery:{}", prefix.0, ids[0]);
        assert_eq!(cache[&open].value["status"], "created");
        assert!(cache[&open].ttl_ms > DAY_MS - 60_000);
    }
}
