//! Crash recovery and store outages, end to end against the real RabbitMQ, PostgreSQL and
//! Redis on localhost.
//!
//! - [`a_killed_process_restarts_from_postgres_and_loses_or_doubles_nothing`]: the real
//!   binary is `kill -9`ed mid-stream and started again; afterwards every event is in the
//!   log exactly once (`event_log`: `delivery_events` and `location_fixes`), and every
//!   aggregate equals both the dataflow's state of an uninterrupted run and a recomputation
//!   in SQL over `delivery_events`.
//! - [`a_postgres_outage_pauses_the_pipeline_and_it_resumes_alone`]: the pipeline's
//!   connection to PostgreSQL goes through a proxy that the test cuts: nothing is
//!   acknowledged meanwhile, consumption stops at the prefetch, and everything is committed
//!   once the proxy lets connections through again.
//!
//! Every test has its own exchange and queues, its own database (created by the binary
//! itself, dropped at the end) and its own Redis key prefix, so tests run in parallel and
//! leave nothing behind.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use delivertrack::{DriveReport, PipelineConfig, RunConfig, RunHooks, StoresConfig};
use delivertrack_dataflow::model::{Scope, Tally};
use delivertrack_dataflow::pipeline::{self, DataflowConfig};
use delivertrack_dataflow::{EpochOutput, Event, RejectReason, Status};
use delivertrack_ingest::rabbitmq::RabbitConfig;
use delivertrack_ingest::testing::{TcpProxy, delete_topology, unique_config};
use delivertrack_ingest::{FleetSimulator, SimulatorConfig};
use delivertrack_load_tests::Publisher;
use delivertrack_sinks::PostgresConfig;
use delivertrack_sinks::postgres::ScopeKey;
use delivertrack_sinks::read_model::ReadState;
use delivertrack_sinks::redis::Keys;
use sqlx::Row;
use sqlx::postgres::PgPool;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::Child;
use tokio::sync::oneshot;
use tokio::time::{sleep, timeout};
use uuid::Uuid;

use support::{
    Database, delete_keys, eventually, now_ms, postgres_addr, publisher, ready_messages, redis,
    url_of,
};

/// How long any awaited condition may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------
// Services
// ---------------------------------------------------------------------------------------

async fn delete_exchange(publisher: &Publisher, exchange: &str) {
    let _ = publisher
        .channel()
        .exchange_delete(
            exchange.into(),
            lapin::options::ExchangeDeleteOptions::default(),
        )
        .await;
}

async fn logged_events(pool: &PgPool) -> i64 {
    // Before the binary created its schema the table is not there: count 0.
    sqlx::query_scalar("SELECT count(*) FROM event_log")
        .fetch_one(pool)
        .await
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// The stream and its reference
// ---------------------------------------------------------------------------------------

/// A simulated fleet's stream: 40 simulated minutes ending now, so that deliveries are
/// created, delivered, failed, cancelled and rated, couriers cross zones, and no timestamp
/// lies in the future.
fn stream(seed: u64) -> Vec<Event> {
    const MINUTES: i64 = 40;
    let config = SimulatorConfig {
        couriers: 20,
        zones: 6,
        seed,
        deliveries_per_minute: 3.0,
        fix_interval_ms: 10_000,
        rating_rate: 0.8,
        ..SimulatorConfig::default()
    };
    let start = now_ms() - MINUTES * 60_000 - 5_000;
    let mut simulator = FleetSimulator::new(config, start);
    let mut events = simulator.initial_events();
    for _ in 0..MINUTES {
        events.extend(simulator.step(60_000));
    }
    events
}

/// What an uninterrupted pipeline makes of `events`, in epochs of `epoch` events: its final
/// state, and the events it refused for a reason other than `stale` (those are
/// dead-lettered, never logged).
fn reference(events: &[Event], epoch: usize) -> (ReadState, BTreeSet<Uuid>) {
    let (mut input, mut output) = pipeline::start(DataflowConfig {
        workers: 2,
        ..DataflowConfig::default()
    })
    .unwrap();
    let mut state = ReadState::default();
    let mut refused = BTreeSet::new();
    for chunk in events.chunks(epoch) {
        input.send(chunk.to_vec()).unwrap();
        let out: EpochOutput = output.recv().unwrap();
        refused.extend(
            out.rejections
                .iter()
                .filter(|r| r.reason != RejectReason::Stale)
                .map(|r| r.event_id.0),
        );
        state.apply(&out);
    }
    input.close();
    (state, refused)
}

/// `metrics`' counters in the schema's column order.
const COUNTERS: [&str; 19] = [
    "deliveries",
    "active",
    "delivered",
    "failed",
    "cancelled",
    "promised",
    "on_time",
    "created_to_delivered_ms",
    "picked_up_delivered",
    "picked_up_to_delivered_ms",
    "rated",
    "score_sum",
    "score_1",
    "score_2",
    "score_3",
    "score_4",
    "score_5",
    "distance_mm",
    "active_hours",
];

fn counters(t: &Tally) -> Vec<i64> {
    let [s1, s2, s3, s4, s5] = t.score_histogram;
    vec![
        t.deliveries,
        t.active,
        t.delivered,
        t.failed,
        t.cancelled,
        t.promised,
        t.on_time,
        t.created_to_delivered_ms,
        t.picked_up_delivered,
        t.picked_up_to_delivered_ms,
        t.rated,
        t.score_sum,
        s1,
        s2,
        s3,
        s4,
        s5,
        t.distance_mm,
        t.active_hours,
    ]
}

type MetricRows = BTreeMap<(String, String), Vec<i64>>;

fn expected_metrics(state: &ReadState) -> MetricRows {
    state
        .metrics
        .iter()
        .map(|(scope, tally)| {
            let key = ScopeKey::of(scope);
            ((key.scope.to_owned(), key.key), counters(tally))
        })
        .collect()
}

async fn stored_metrics(pool: &PgPool) -> MetricRows {
    let rows = sqlx::query("SELECT * FROM metrics")
        .fetch_all(pool)
        .await
        .unwrap();
    rows.iter()
        .map(|row| {
            let key = (
                row.get::<String, _>("scope"),
                row.get::<String, _>("scope_key"),
            );
            let values = COUNTERS.iter().map(|c| row.get::<i64, _>(*c)).collect();
            (key, values)
        })
        .collect()
}

/// Every delivery-level counter of the overall, courier, hour-of-day and weekday×hour
/// scopes, recomputed from `delivery_events` alone: a delivery's state is its creation and
/// its latest logged status change and rating (the log keeps only accepted events, and a
/// lifecycle only moves forward, so the latest is the current one).
const RECOMPUTE: &str = "
WITH live AS (
    SELECT * FROM delivery_events WHERE NOT stale
), d AS (
    SELECT c.delivery_id,
           c.occurred_at AS created_at,
           (c.payload ->> 'promised_by')::timestamptz AS promised_by,
           coalesce(s.status, 'created') AS status,
           s.occurred_at AS status_at,
           (SELECT (a.payload ->> 'courier_id')::uuid FROM live a
             WHERE a.delivery_id = c.delivery_id AND a.kind = 'status.changed'
               AND a.payload ->> 'status' = 'assigned'
             ORDER BY a.occurred_at DESC, a.event_id DESC LIMIT 1) AS courier_id,
           (SELECT p.occurred_at FROM live p
             WHERE p.delivery_id = c.delivery_id AND p.kind = 'status.changed'
               AND p.payload ->> 'status' = 'picked_up'
             ORDER BY p.occurred_at DESC, p.event_id DESC LIMIT 1) AS picked_up_at,
           (SELECT (r.payload ->> 'score')::int FROM live r
             WHERE r.delivery_id = c.delivery_id AND r.kind = 'delivery.rated'
             ORDER BY r.occurred_at DESC, r.event_id DESC LIMIT 1) AS score
    FROM live c
    LEFT JOIN LATERAL (
        SELECT s.payload ->> 'status' AS status, s.occurred_at FROM live s
        WHERE s.delivery_id = c.delivery_id AND s.kind = 'status.changed'
        ORDER BY s.occurred_at DESC, s.event_id DESC LIMIT 1) s ON true
    WHERE c.kind = 'delivery.created'
), t AS (
    SELECT d.*,
           (status = 'delivered') AS is_delivered,
           (extract(epoch FROM status_at - created_at) * 1000)::int8 AS total_ms,
           (extract(epoch FROM status_at - picked_up_at) * 1000)::int8 AS leg_ms
    FROM d
), tally AS (
    SELECT scope, scope_key,
           count(*) AS deliveries,
           count(*) FILTER (WHERE status IN ('assigned', 'picked_up', 'in_transit')) AS active,
           count(*) FILTER (WHERE is_delivered) AS delivered,
           count(*) FILTER (WHERE status = 'failed') AS failed,
           count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
           count(*) FILTER (WHERE is_delivered AND promised_by IS NOT NULL) AS promised,
           count(*) FILTER (WHERE is_delivered AND status_at <= promised_by) AS on_time,
           coalesce(sum(greatest(total_ms, 0)) FILTER (WHERE is_delivered), 0)::int8
               AS created_to_delivered_ms,
           count(*) FILTER (WHERE is_delivered AND picked_up_at IS NOT NULL)
               AS picked_up_delivered,
           coalesce(sum(greatest(leg_ms, 0)) FILTER (WHERE is_delivered), 0)::int8
               AS picked_up_to_delivered_ms,
           count(score) AS rated,
           coalesce(sum(score), 0)::int8 AS score_sum,
           count(*) FILTER (WHERE score = 1) AS score_1,
           count(*) FILTER (WHERE score = 2) AS score_2,
           count(*) FILTER (WHERE score = 3) AS score_3,
           count(*) FILTER (WHERE score = 4) AS score_4,
           count(*) FILTER (WHERE score = 5) AS score_5
    FROM t
    CROSS JOIN LATERAL (VALUES
        ('overall', ''),
        ('courier', t.courier_id::text),
        ('hour_of_day', extract(hour FROM t.created_at AT TIME ZONE 'UTC')::int::text),
        ('weekday_hour', (extract(isodow FROM t.created_at AT TIME ZONE 'UTC')::int - 1)::text
            || ':' || extract(hour FROM t.created_at AT TIME ZONE 'UTC')::int::text)
    ) AS s(scope, scope_key)
    WHERE s.scope_key IS NOT NULL
    GROUP BY scope, scope_key
)
SELECT scope, scope_key, deliveries, active, delivered, failed, cancelled, promised,
       on_time, created_to_delivered_ms, picked_up_delivered, picked_up_to_delivered_ms,
       rated, score_sum, score_1, score_2, score_3, score_4, score_5
FROM tally";

/// The delivery-level counters (all but distance and active hours) per scope, as SQL
/// recomputes them from the log, and as `metrics` holds them (scopes with deliveries).
async fn recomputed_and_stored(pool: &PgPool) -> (MetricRows, MetricRows) {
    let delivery_counters = &COUNTERS[..17];
    let recomputed: MetricRows = sqlx::query(RECOMPUTE)
        .fetch_all(pool)
        .await
        .unwrap()
        .iter()
        .map(|row| {
            let key = (
                row.get::<String, _>("scope"),
                row.get::<String, _>("scope_key"),
            );
            let values = delivery_counters
                .iter()
                .map(|c| row.get::<i64, _>(*c))
                .collect();
            (key, values)
        })
        .collect();
    let stored: MetricRows = stored_metrics(pool)
        .await
        .into_iter()
        .filter(|((scope, _), values)| scope != "dropoff_zone" && values[0] > 0)
        .map(|(key, values)| (key, values[..17].to_vec()))
        .collect();
    (recomputed, stored)
}

// ---------------------------------------------------------------------------------------
// The binary
// ---------------------------------------------------------------------------------------

struct Binary {
    child: Child,
    addr: SocketAddr,
}

/// Starts `delivertrack run` on this test's topology, database and key prefix, and waits
/// for its banner (the stores are open, hydration done, RabbitMQ connected).
async fn start_binary(
    rabbit: &RabbitConfig,
    database: &Database,
    prefix: &str,
    derived: &str,
) -> Binary {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_delivertrack"))
        .args(["run", "--listen", "127.0.0.1:0", "--workers", "2"])
        .args(["--exchange", &rabbit.exchange, "--queue", &rabbit.queue])
        .args(["--dead-letter-exchange", &rabbit.dead_letter_exchange])
        .args(["--dead-letter-queue", &rabbit.dead_letter_queue])
        .args(["--prefetch", "100", "--epoch-max-events", "60"])
        .args(["--epoch-max-ms", "20", "--shutdown-timeout-secs", "20"])
        .args(["--database-url", &database.url()])
        .args(["--redis-prefix", prefix, "--derived-exchange", derived])
        // No MongoDB server here; its sink has its own tests (sinks/tests/mongo.rs).
        .arg("--no-mongo")
        .args(["--log-format", "json"])
        .env("RABBITMQ_URL", &rabbit.url)
        .env("JWT_SECRET", "recovery-test-jwt-key-3b8e-0c5d9a7f1e")
        .env_remove("DATABASE_URL")
        .env_remove("MONGO_URI")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let banner = match timeout(PATIENCE, stdout.next_line()).await {
        Ok(Ok(Some(line))) => line,
        other => {
            let _ = child.start_kill();
            let mut stderr = String::new();
            let _ = child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .await;
            panic!("no banner ({other:?}); stderr:\n{stderr}");
        }
    };
    let addr: SocketAddr = banner
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("no address in {banner:?}"));
    Binary { child, addr }
}

impl Binary {
    /// `kill -9`: no drain, no acknowledgement, no goodbye.
    async fn kill(mut self) {
        self.child.start_kill().unwrap();
        let status = self.child.wait().await.unwrap();
        assert!(!status.success());
    }

    /// SIGTERM, then its exit status and log.
    async fn terminate(mut self) -> String {
        let pid = self.child.id().expect("running").to_string();
        let sent = std::process::Command::new("sh")
            .args(["-c", &format!("kill -TERM {pid}")])
            .status()
            .unwrap();
        assert!(sent.success());
        let status = timeout(PATIENCE, self.child.wait())
            .await
            .expect("the binary exits within the bound")
            .unwrap();
        let mut stderr = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .await
            .unwrap();
        assert!(status.success(), "exit {status:?}; stderr:\n{stderr}");
        stderr
    }
}

/// The fields of the binary's JSON log line with this message.
fn log_line(stderr: &str, message: &str) -> Option<serde_json::Value> {
    stderr
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|line| line["fields"]["message"] == message)
        .map(|line| line["fields"].clone())
}

// ---------------------------------------------------------------------------------------
// Crash recovery
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_process_restarts_from_postgres_and_loses_or_doubles_nothing() {
    const EPOCH: usize = 60;
    let events = stream(41);
    let (reference, refused) = reference(&events, EPOCH);
    let expected_ids: BTreeSet<Uuid> = events
        .iter()
        .map(|e| e.event_id.0)
        .filter(|id| !refused.contains(id))
        .collect();
    let expected_count = i64::try_from(expected_ids.len()).unwrap();
    assert!(
        reference.metrics[&Scope::Overall].delivered > 0
            && reference.metrics[&Scope::Overall].rated > 0,
        "the stream completes and rates deliveries"
    );

    let rabbit = unique_config("recovery");
    let derived = format!("{}.derived", rabbit.exchange);
    let database = Database::new("recovery");
    let prefix = format!("dt-test-{}:", Uuid::new_v4().simple());
    let publisher = publisher(&rabbit).await;

    // Two thirds of the stream waits in the queue; the first process is killed a third of
    // the way through it.
    let split = events.len() * 2 / 3;
    publisher
        .publish_events(&rabbit.exchange, &events[..split], 5)
        .await
        .unwrap();
    let first = start_binary(&rabbit, &database, &prefix, &derived).await;
    let pool = database.pool().await;
    let at_kill = eventually("the first process is mid-stream", PATIENCE, || async {
        let logged = logged_events(&pool).await;
        (logged >= expected_count / 3).then_some(logged)
    })
    .await;
    first.kill().await;
    let after_kill = logged_events(&pool).await;
    assert!(after_kill < expected_count, "killed mid-stream");
    eprintln!(
        "killed with {after_kill} of {expected_count} events logged ({at_kill} seen before the kill)"
    );

    // The second process hydrates, then the rest of the stream arrives while it runs.
    let second = start_binary(&rabbit, &database, &prefix, &derived).await;
    publisher
        .publish_events(&rabbit.exchange, &events[split..], 5)
        .await
        .unwrap();
    eventually("every event is logged", PATIENCE, || async {
        (logged_events(&pool).await >= expected_count).then_some(())
    })
    .await;
    eventually("the queue is drained", PATIENCE, || async {
        (ready_messages(&publisher, &rabbit.queue).await == 0).then_some(())
    })
    .await;
    let client = reqwest::Client::new();
    let readyz = client
        .get(format!("http://{}/readyz", second.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(readyz.status(), 200);
    let log = second.terminate().await;
    let hydrated = log_line(&log, "Read the state to restore from PostgreSQL.")
        .unwrap_or_else(|| panic!("the second process hydrated:\n{log}"));
    assert!(hydrated["records"].as_u64().unwrap() > 0, "{hydrated}");

    // Every event exactly once, none lost, none that should not be there.
    let logged: Vec<Uuid> = sqlx::query_scalar("SELECT event_id FROM event_log")
        .fetch_all(&pool)
        .await
        .unwrap();
    let logged_set: BTreeSet<Uuid> = logged.iter().copied().collect();
    assert_eq!(logged.len(), logged_set.len(), "no event logged twice");
    let missing: Vec<_> = expected_ids.difference(&logged_set).take(5).collect();
    let extra: Vec<_> = logged_set.difference(&expected_ids).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, extra {extra:?}"
    );

    // Every aggregate equals the uninterrupted run's ...
    let stored = stored_metrics(&pool).await;
    let expected = expected_metrics(&reference);
    for (key, values) in &expected {
        assert_eq!(stored.get(key), Some(values), "metrics {key:?}");
    }
    assert_eq!(stored.len(), expected.len(), "no extra metrics rows");
    // ... and a recomputation in SQL over the event log.
    let (recomputed, stored_delivery) = recomputed_and_stored(&pool).await;
    assert!(recomputed.len() > 3, "{recomputed:?}");
    assert_eq!(recomputed, stored_delivery);

    // The state tables too: every delivery's status as the reference has it.
    let statuses: BTreeMap<Uuid, String> =
        sqlx::query_as::<_, (Uuid, String)>("SELECT id, status FROM deliveries")
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let expected_statuses: BTreeMap<Uuid, String> = reference
        .deliveries
        .iter()
        .map(|(id, state)| (id.0, state.status.as_str().to_owned()))
        .collect();
    assert_eq!(statuses, expected_statuses);

    // The cache healed across the crash: every active delivery is in Redis.
    let keys = Keys::new(prefix.clone());
    let mut redis = redis().await;
    let active: Vec<_> = reference
        .deliveries
        .iter()
        .filter(|(_, state)| state.status.is_active() || state.status == Status::Created)
        .map(|(id, _)| keys.delivery(*id))
        .collect();
    assert!(!active.is_empty());
    for key in &active {
        let exists: bool = redis::cmd("EXISTS")
            .arg(key)
            .query_async(&mut redis)
            .await
            .unwrap();
        assert!(exists, "{key} is cached");
    }

    pool.close().await;
    delete_exchange(&publisher, &derived).await;
    delete_topology(&rabbit).await;
    delete_keys(&prefix).await;
    database.drop_now().await;
}

// ---------------------------------------------------------------------------------------
// PostgreSQL outage
// ---------------------------------------------------------------------------------------

/// A pipeline running in this process.
struct Running {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<DriveReport>>,
}

async fn start_in_process(config: RunConfig) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stop_rx) = oneshot::channel::<()>();
    let (started_tx, started_rx) = oneshot::channel();
    let hooks = RunHooks {
        started: Some(started_tx),
        ..RunHooks::default()
    };
    let task = tokio::spawn(delivertrack::run_pipeline_on(
        listener,
        config,
        hooks,
        async {
            let _ = stop_rx.await;
        },
    ));
    let started = timeout(PATIENCE, started_rx)
        .await
        .expect("the pipeline starts in time");
    if started.is_err() {
        // The pipeline ended before it started: say why.
        let ended = timeout(PATIENCE, task).await.expect("it has ended");
        panic!("the pipeline did not start: {ended:?}");
    }
    Running { addr, stop, task }
}

/// The value of one series of the pipeline's `/metrics` (0 when absent).
async fn metric(client: &reqwest::Client, addr: SocketAddr, series: &str) -> f64 {
    let series_now = support::scrape(client, &format!("http://{addr}/metrics")).await;
    series_now.get(series).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_outage_pauses_the_pipeline_and_it_resumes_alone() {
    const PREFETCH: u16 = 40;
    let events = stream(7);
    let (_, refused) = reference(&events, 50);
    let expected = events
        .iter()
        .filter(|e| !refused.contains(&e.event_id.0))
        .count();
    let expected = i64::try_from(expected).unwrap();
    let (before, during) = events.split_at(events.len() / 3);

    let rabbit = unique_config("pg-outage");
    let database = Database::new("outage");
    let proxy = TcpProxy::start(postgres_addr()).await.unwrap();
    let postgres = PostgresConfig {
        connect_timeout: Duration::from_secs(2),
        ..PostgresConfig::from_url(url_of(&database.name, Some(proxy.addr())))
    };
    let config = RunConfig {
        pipeline: PipelineConfig {
            workers: 2,
            epoch_max_events: 50,
            epoch_max_wait: Duration::from_millis(20),
            ..PipelineConfig::default()
        },
        rabbit: RabbitConfig {
            prefetch: PREFETCH,
            ..rabbit.clone()
        },
        stores: StoresConfig {
            postgres: Some(postgres),
            ..StoresConfig::default()
        },
        shutdown_timeout: Duration::from_secs(30),
        ..RunConfig::default()
    };
    let publisher = publisher(&rabbit).await;
    let running = start_in_process(config).await;
    let pool = database.pool().await;
    let client = reqwest::Client::new();

    publisher
        .publish_events(&rabbit.exchange, before, 1)
        .await
        .unwrap();
    let logged_before = eventually("the first third is committed", PATIENCE, || async {
        let logged = logged_events(&pool).await;
        let ready = ready_messages(&publisher, &rabbit.queue).await;
        let in_flight = metric(&client, running.addr, "delivertrack_messages_in_flight").await;
        (ready == 0 && in_flight == 0.0 && logged > 0).then_some(logged)
    })
    .await;

    // PostgreSQL goes away for the pipeline (and only for it).
    proxy.cut();
    publisher
        .publish_events(&rabbit.exchange, during, 1)
        .await
        .unwrap();
    eventually("the sink reports its failures", PATIENCE, || async {
        let errors = metric(
            &client,
            running.addr,
            "delivertrack_sink_errors_total{sink=\"postgres\"}",
        )
        .await;
        (errors >= 2.0).then_some(())
    })
    .await;
    // Paused: for a few seconds nothing is committed, what was taken stays unacknowledged
    // (bounded by the prefetch), and the rest waits in the queue.
    for _ in 0..20 {
        let in_flight = metric(&client, running.addr, "delivertrack_messages_in_flight").await;
        assert!(
            in_flight > 0.0,
            "nothing is acknowledged while PostgreSQL is away"
        );
        assert!(in_flight <= f64::from(PREFETCH), "{in_flight} > prefetch");
        assert!(
            ready_messages(&publisher, &rabbit.queue).await > 0,
            "consumption paused"
        );
        assert_eq!(logged_events(&pool).await, logged_before);
        sleep(Duration::from_millis(150)).await;
    }
    let readyz = client
        .get(format!("http://{}/readyz", running.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(readyz.status(), 200, "the API still serves reads");

    // Back: the retries get through, and the rest of the stream with them.
    proxy.restore();
    eventually(
        "everything is committed and acknowledged",
        PATIENCE,
        || async {
            let logged = logged_events(&pool).await;
            let ready = ready_messages(&publisher, &rabbit.queue).await;
            let in_flight = metric(&client, running.addr, "delivertrack_messages_in_flight").await;
            (logged == expected && ready == 0 && in_flight == 0.0).then_some(())
        },
    )
    .await;
    let _ = running.stop.send(());
    let report = timeout(PATIENCE, running.task)
        .await
        .expect("stops in time")
        .unwrap()
        .expect("stops cleanly");
    assert_eq!(report.events, events.len() as u64);

    pool.close().await;
    drop(proxy);
    delete_topology(&rabbit).await;
    database.drop_now().await;
}

// ---------------------------------------------------------------------------------------
// Start-up
// ---------------------------------------------------------------------------------------

/// `delivertrack run` with these extra arguments, on a broker that is up; its stderr once
/// it has exited (it must fail).
async fn failed_start(args: &[&str]) -> String {
    let rabbit = unique_config("store-down");
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_delivertrack"))
        .args(["run", "--listen", "127.0.0.1:0"])
        .args(["--exchange", &rabbit.exchange, "--queue", &rabbit.queue])
        .args(["--dead-letter-exchange", &rabbit.dead_letter_exchange])
        .args(["--dead-letter-queue", &rabbit.dead_letter_queue])
        .args(["--no-derived"])
        .args(args)
        .env("RABBITMQ_URL", &rabbit.url)
        .env("JWT_SECRET", "recovery-test-jwt-key-3b8e-0c5d9a7f1e")
        .env_remove("DATABASE_URL")
        .env_remove("MONGO_URI")
        .output();
    let output = timeout(PATIENCE, output).await.unwrap().unwrap();
    delete_topology(&rabbit).await;
    assert!(!output.status.success());
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_store_at_start_is_an_error_naming_it() {
    let postgres = failed_start(&[
        "--database-url",
        "postgres://postgres:secret@127.0.0.1:1/delivertrack",
        "--no-redis",
        "--no-mongo",
    ])
    .await;
    assert!(postgres.contains("127.0.0.1:1/delivertrack"), "{postgres}");
    assert!(!postgres.contains("secret"), "{postgres}");

    let redis = failed_start(&["--no-postgres", "--redis-port", "1", "--no-mongo"]).await;
    assert!(redis.contains("Redis at 127.0.0.1:1"), "{redis}");

    // MongoDB is on by default, on localhost (where none runs in this suite's setting).
    let mongo = failed_start(&[
        "--no-postgres",
        "--no-redis",
        "--mongo-uri",
        "mongodb://127.0.0.1:1/?serverSelectionTimeoutMS=500",
    ])
    .await;
    assert!(mongo.contains("MongoDB at"), "{mongo}");
}
