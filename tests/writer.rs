//! One writer per database (ARCHITECTURE rule 10), end to end: two real `delivertrack run`
//! processes on one database and one queue, against the real RabbitMQ, PostgreSQL and
//! Redis on localhost.
//!
//! - [`two_runs_started_together_are_one_writer_and_one_standby_and_lose_nothing`] — before
//!   the writer lock, both consumed and half the deliveries were lost (their epochs judged
//!   "already committed" by the other's progress and acknowledged); now one writes, the
//!   other waits, and all 3 000 are there.
//! - [`a_standby_takes_over_within_seconds_when_the_writer_is_killed`]: the writer is
//!   `kill -9`ed mid-stream; the standby takes the lock, hydrates and consumes, `/readyz`
//!   turns 200 within the bound, and every event is in the log exactly once.
//!
//! Each test has its own exchange and queues, its own database (created by the binaries,
//! dropped at the end) and its own Redis key prefix.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use delivertrack_dataflow::event::{DeliveryCreated, Event, EventBody};
use delivertrack_dataflow::geometry::GeoPoint;
use delivertrack_dataflow::{CustomerId, DeliveryId, EventId};
use delivertrack_ingest::rabbitmq::RabbitConfig;
use delivertrack_ingest::testing::{delete_topology, unique_config};
use serde_json::Value;
use sqlx::postgres::PgPool;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Child;
use tokio::sync::mpsc;
use tokio::time::timeout;
use uuid::Uuid;

use support::{Database, delete_keys, eventually, now_ms, publisher, ready_messages};

/// How long any awaited condition may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(120);

/// How long a standby may take, from the writer's death to serving as the writer
/// (`/readyz` 200): the lock poll (250 ms), hydration, RabbitMQ.
const TAKEOVER_BOUND: Duration = Duration::from_secs(15);

/// The events of both tests: new deliveries, each its own.
fn deliveries(count: usize) -> Vec<Event> {
    let at = now_ms() - 60_000;
    (0..count)
        .map(|_| Event {
            event_id: EventId(Uuid::new_v4()),
            occurred_at: at,
            body: EventBody::DeliveryCreated(DeliveryCreated {
                delivery_id: DeliveryId(Uuid::new_v4()),
                customer_id: CustomerId(Uuid::new_v4()),
                pickup: GeoPoint::from_degrees(52.52, 13.40),
                dropoff: GeoPoint::from_degrees(52.53, 13.41),
                promised_by: None,
            }),
        })
        .collect()
}

/// What a started binary said first on stdout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Writer,
    Standby,
}

/// A running `delivertrack run`, its stdout lines as they come and its log so far.
struct Process {
    child: Child,
    addr: SocketAddr,
    role: Role,
    lines: mpsc::UnboundedReceiver<String>,
    log: Arc<Mutex<String>>,
}

/// The scene both tests share: a topology, a database and a key prefix of their own.
struct Scene {
    rabbit: RabbitConfig,
    database: Database,
    prefix: String,
    derived: String,
}

impl Scene {
    fn new(test: &str) -> Self {
        let rabbit = unique_config(test);
        let derived = format!("{}.derived", rabbit.exchange);
        Self {
            rabbit,
            database: Database::new(test),
            prefix: format!("dt-test-{}:", Uuid::new_v4().simple()),
            derived,
        }
    }

    /// Spawns `delivertrack run` on this scene (its output is read as it comes, so that
    /// a full pipe never stalls it).
    fn spawn(&self) -> (Child, mpsc::UnboundedReceiver<String>, Arc<Mutex<String>>) {
        let rabbit = &self.rabbit;
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_delivertrack"))
            .args(["run", "--listen", "127.0.0.1:0", "--workers", "2"])
            .args(["--exchange", &rabbit.exchange, "--queue", &rabbit.queue])
            .args(["--dead-letter-exchange", &rabbit.dead_letter_exchange])
            .args(["--dead-letter-queue", &rabbit.dead_letter_queue])
            .args(["--prefetch", "200", "--epoch-max-events", "100"])
            .args(["--epoch-max-ms", "20", "--shutdown-timeout-secs", "20"])
            .args(["--database-url", &self.database.url()])
            .args(["--redis-prefix", &self.prefix])
            .args(["--derived-exchange", &self.derived])
            // No MongoDB server here; its sink has its own tests (sinks/tests/mongo.rs).
            .arg("--no-mongo")
            .args(["--log-format", "json"])
            .env("RABBITMQ_URL", &rabbit.url)
            .env("JWT_SECRET", "writer-test-jwt-secret-of-32-bytes-9c4e")
            .env_remove("DATABASE_URL")
            .env_remove("MONGO_URI")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let (line_tx, lines) = mpsc::unbounded_channel();
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = stdout.next_line().await {
                if line_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let log = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&log);
        let mut stderr = child.stderr.take().unwrap();
        tokio::spawn(async move {
            let mut buffer = [0u8; 8192];
            while let Ok(read) = stderr.read(&mut buffer).await {
                if read == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buffer[..read]));
            }
        });
        (child, lines, log)
    }

    /// Spawns `run` and waits for its first line: the banner of a writer, or a standby's.
    async fn start(&self) -> Process {
        let (child, lines, log) = self.spawn();
        Process::first_line(child, lines, log).await
    }

    async fn clean(self, pool: PgPool) {
        pool.close().await;
        self.database.drop_now().await;
        delete_topology(&self.rabbit).await;
        let publisher = publisher(&self.rabbit).await;
        let _ = publisher
            .channel()
            .exchange_delete(
                self.derived.as_str().into(),
                lapin::options::ExchangeDeleteOptions::default(),
            )
            .await;
        delete_keys(&self.prefix).await;
    }
}

impl Process {
    async fn first_line(
        mut child: Child,
        mut lines: mpsc::UnboundedReceiver<String>,
        log: Arc<Mutex<String>>,
    ) -> Process {
        let line = match timeout(PATIENCE, lines.recv()).await {
            Ok(Some(line)) => line,
            other => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                panic!("no first line ({other:?}); log:\n{}", log.lock().unwrap());
            }
        };
        let role = if line.starts_with("DeliverTrack is running") {
            Role::Writer
        } else if line.starts_with("DeliverTrack is a standby") {
            Role::Standby
        } else {
            panic!("an unexpected first line {line:?}");
        };
        let addr = address(&line);
        Process {
            child,
            addr,
            role,
            lines,
            log,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// `/readyz`: its status and body.
    /// `0` when the request fails (a connection closed while the API takes the socket over).
    async fn readyz(&self, client: &reqwest::Client) -> (u16, Value) {
        let Ok(response) = client
            .get(format!("http://{}/readyz", self.addr))
            .send()
            .await
        else {
            return (0, Value::Null);
        };
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// The JSON log lines with this message.
    fn log_lines(&self, message: &str) -> Vec<Value> {
        self.log
            .lock()
            .unwrap()
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|line| line["fields"]["message"] == message)
            .map(|line| line["fields"].clone())
            .collect()
    }

    /// `kill -9`: no drain, no acknowledgement, no unlock.
    async fn kill(mut self) {
        self.child.start_kill().unwrap();
        let status = self.child.wait().await.unwrap();
        assert!(!status.success());
    }

    /// SIGTERM; asserts a clean exit and returns the log.
    async fn terminate(mut self) -> String {
        let pid = self.pid().to_string();
        let sent = std::process::Command::new("sh")
            .args(["-c", &format!("kill -TERM {pid}")])
            .status()
            .unwrap();
        assert!(sent.success());
        let status = timeout(PATIENCE, self.child.wait())
            .await
            .expect("the binary exits within the bound")
            .unwrap();
        // Let the log reader reach the end of the pipe.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let log = self.log.lock().unwrap().clone();
        assert!(status.success(), "exit {status:?}; log:\n{log}");
        log
    }
}

/// The address in a banner or standby line (`... http://127.0.0.1:PORT/ ...`).
fn address(line: &str) -> SocketAddr {
    line.split("http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
}

const STANDBY_LOG: &str = "This process is a standby: another process holds the writer lock of the database. It waits, serving /readyz 503, and takes over when that process stops.";
const LOCKED_LOG: &str =
    "This process holds the writer lock: it is the one writer of the database.";

async fn count(pool: &PgPool, table: &str) -> i64 {
    // Before the binary created its schema the table is not there: count 0.
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
        .fetch_one(pool)
        .await
        .unwrap_or(0)
}

/// Waits until `event_log` holds `expected` rows, or until `queue` is empty and the
/// count has not moved for two seconds; returns the count.
async fn settle(
    pool: &PgPool,
    publisher: &delivertrack_load_tests::Publisher,
    queue: &str,
    expected: usize,
) -> i64 {
    let deadline = Instant::now() + PATIENCE;
    let mut last = (-1, Instant::now());
    loop {
        let logged = count(pool, "event_log").await;
        if logged >= expected as i64 {
            return logged;
        }
        if logged != last.0 {
            last = (logged, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(2)
            && ready_messages(publisher, queue).await == 0
        {
            return logged;
        }
        assert!(
            Instant::now() < deadline,
            "timed out with {logged} events logged"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every published event is in the log (`event_log`) exactly once, nothing else is, and every
/// delivery is in `deliveries`.
async fn assert_each_event_once(pool: &PgPool, events: &[Event]) {
    let expected: BTreeSet<Uuid> = events.iter().map(|e| e.event_id.0).collect();
    let logged: Vec<Uuid> = sqlx::query_scalar("SELECT event_id FROM event_log")
        .fetch_all(pool)
        .await
        .unwrap();
    let logged_set: BTreeSet<Uuid> = logged.iter().copied().collect();
    assert_eq!(logged.len(), logged_set.len(), "an event logged twice");
    let missing: Vec<_> = expected.difference(&logged_set).take(5).collect();
    let extra: Vec<_> = logged_set.difference(&expected).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?} (of {}), extra {extra:?}",
        expected.len()
    );
    assert_eq!(count(pool, "deliveries").await, events.len() as i64);
}

/// A standby answers `/healthz` 200 and `/readyz` 503 `standby`, naming the writer.
async fn assert_standby(client: &reqwest::Client, standby: &Process, writer_pid: u32) {
    let health = client
        .get(format!("http://{}/healthz", standby.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let (status, body) = standby.readyz(client).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "standby", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(&format!("pid {writer_pid}")), "{message}");
    // Nothing else is served by a standby either.
    let other = client
        .get(format!("http://{}/api/snapshot", standby.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 503);
    // Said once in the log, naming whom it waits for.
    let said = standby.log_lines(STANDBY_LOG);
    assert_eq!(said.len(), 1, "{said:?}");
    assert!(
        said[0]["writer"]
            .as_str()
            .unwrap_or_default()
            .contains(&format!("pid {writer_pid}")),
        "{said:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runs_started_together_are_one_writer_and_one_standby_and_lose_nothing() {
    const EVENTS: usize = 3_000;
    let scene = Scene::new("writer_two");
    let publisher = publisher(&scene.rabbit).await;
    let events = deliveries(EVENTS);
    publisher
        .publish_events(&scene.rabbit.exchange, &events, 10)
        .await
        .unwrap();

    // Both at once, as `docker compose up --scale` or a rolling deploy would.
    let (a, b) = (scene.spawn(), scene.spawn());
    let (a, b) = tokio::join!(
        Process::first_line(a.0, a.1, a.2),
        Process::first_line(b.0, b.1, b.2)
    );
    let pool = scene.database.pool().await;
    // Until everything is logged, or the queue is drained and nothing moves any more (two
    // writers once acknowledged what they skipped: the queue emptied, half was missing).
    let settled = settle(&pool, &publisher, &scene.rabbit.queue, EVENTS).await;
    assert_eq!(
        (settled, count(&pool, "deliveries").await),
        (EVENTS as i64, EVENTS as i64),
        "(delivery_events, deliveries) of {EVENTS} published: events were lost"
    );
    eventually("the queue is drained", PATIENCE, || async {
        (ready_messages(&publisher, &scene.rabbit.queue).await == 0).then_some(())
    })
    .await;
    let mut roles = [a.role, b.role];
    roles.sort_by_key(|role| *role == Role::Standby);
    assert_eq!(roles, [Role::Writer, Role::Standby], "exactly one writer");
    let (writer, standby) = if a.role == Role::Writer {
        (a, b)
    } else {
        (b, a)
    };
    let client = reqwest::Client::new();
    assert_eq!(writer.readyz(&client).await.0, 200);
    assert_standby(&client, &standby, writer.pid()).await;
    assert_each_event_once(&pool, &events).await;

    // A clean stop of the writer hands over at once (the lock is released, not timed out).
    let stopped = Instant::now();
    writer.terminate().await;
    let mut standby = standby;
    let line = timeout(PATIENCE, standby.lines.recv())
        .await
        .expect("the standby takes over")
        .expect("a banner");
    assert!(line.starts_with("DeliverTrack is running"), "{line}");
    eprintln!(
        "after a clean stop the standby served as the writer {} ms later",
        stopped.elapsed().as_millis()
    );
    assert_eq!(standby.readyz(&client).await.0, 200);
    standby.terminate().await;
    assert_each_event_once(&pool, &events).await;
    scene.clean(pool).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_within_seconds_when_the_writer_is_killed() {
    const EVENTS: usize = 3_000;
    const BEFORE_KILL: usize = 2_000;
    let scene = Scene::new("writer_kill");
    let publisher = publisher(&scene.rabbit).await;
    let events = deliveries(EVENTS);

    let writer = scene.start().await;
    assert_eq!(writer.role, Role::Writer);
    let mut standby = scene.start().await;
    assert_eq!(standby.role, Role::Standby);
    let client = reqwest::Client::new();
    assert_standby(&client, &standby, writer.pid()).await;

    // Two thirds of the stream; the writer is killed once a quarter of it is logged.
    publisher
        .publish_events(&scene.rabbit.exchange, &events[..BEFORE_KILL], 10)
        .await
        .unwrap();
    let pool = scene.database.pool().await;
    eventually("the writer is mid-stream", PATIENCE, || async {
        (count(&pool, "event_log").await >= (EVENTS / 4) as i64).then_some(())
    })
    .await;
    writer.kill().await;
    let killed = Instant::now();
    let at_kill = count(&pool, "event_log").await;
    assert!(at_kill < EVENTS as i64, "killed mid-stream");

    // The standby takes over: its banner, then `/readyz` 200.
    let line = timeout(TAKEOVER_BOUND, standby.lines.recv())
        .await
        .expect("the standby takes over within the bound")
        .expect("a banner");
    assert!(line.starts_with("DeliverTrack is running"), "{line}");
    eventually("the standby is ready", TAKEOVER_BOUND, || async {
        (standby.readyz(&client).await.0 == 200).then_some(())
    })
    .await;
    let takeover = killed.elapsed();
    assert!(takeover < TAKEOVER_BOUND, "took {takeover:?}");
    eprintln!(
        "killed with {at_kill} of {EVENTS} events logged; the standby was ready {} ms after the kill",
        takeover.as_millis()
    );

    // The rest of the stream arrives while the new writer runs.
    publisher
        .publish_events(&scene.rabbit.exchange, &events[BEFORE_KILL..], 10)
        .await
        .unwrap();
    eventually("every event is logged", PATIENCE, || async {
        (count(&pool, "event_log").await >= EVENTS as i64).then_some(())
    })
    .await;
    eventually("the queue is drained", PATIENCE, || async {
        (ready_messages(&publisher, &scene.rabbit.queue).await == 0).then_some(())
    })
    .await;
    let took_over = standby.log_lines(LOCKED_LOG);
    assert_eq!(took_over.len(), 1, "{took_over:?}");
    assert_eq!(took_over[0]["took_over"], true, "{took_over:?}");
    standby.terminate().await;
    assert_each_event_once(&pool, &events).await;
    scene.clean(pool).await;
}
