//! A smoke run of every scenario of the harness against the real `delivertrack run`.
//!
//! The service runs on its own RabbitMQ topology, PostgreSQL database and Redis prefix,
//! with a JWT secret of its own; the `load-tests` binary is run against it as a user
//! would, once per scenario, with small numbers for a few seconds:
//! `fleet` through RabbitMQ (one `/ws/changes` observer), `trackers` on `/ws/track`,
//! `analysts` with the GraphQL-against-SQL baseline, `mixed` with fixes through
//! `POST /locations`, and `baselines` (broker ceiling and geofence, small). Each must exit
//! 0 and write a JSON report that parses and says what the scenario is for — events
//! achieved, latencies recorded, connections held, baselines measured — and a PNG. The
//! refusals are checked too: a non-loopback target, and a target that is not up.
//!
//! The service binary is the workspace's `target/<profile>/delivertrack`, which
//! `cargo nextest run --workspace` (scripts/test.sh) builds beside `load-tests`; set
//! `DELIVERTRACK_BIN` to use another.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use sqlx::Connection;
use sqlx::postgres::PgConnection;
use tokio::io::{AsyncBufReadExt, BufReader};
use uuid::Uuid;

const SECRET: &str = "a-secret-for-the-load-tests-smoke-run-only";

fn load_tests() -> &'static str {
    env!("CARGO_BIN_EXE_load-tests")
}

fn delivertrack() -> PathBuf {
    if let Some(path) = std::env::var_os("DELIVERTRACK_BIN") {
        return PathBuf::from(path);
    }
    let path = Path::new(load_tests()).with_file_name("delivertrack");
    assert!(
        path.exists(),
        "{} is missing: build the service first (`cargo build -p delivertrack`, which \
         `cargo nextest run --workspace` does), or set DELIVERTRACK_BIN",
        path.display()
    );
    path
}

fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

fn rabbitmq_url() -> String {
    std::env::var("RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// The service on resources of its own; everything removed on drop of [`Service::clean`].
struct Service {
    child: tokio::process::Child,
    addr: SocketAddr,
    name: String,
    database: String,
    database_url: String,
}

impl Service {
    async fn start() -> Self {
        let name = format!("lt-smoke-{}", Uuid::new_v4().simple());
        let database = name.replace('-', "_");
        let admin = admin_url();
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
        let database_url = format!("{base}/{database}");
        let mut child = tokio::process::Command::new(delivertrack())
            .args(["run", "--listen", "127.0.0.1:0", "--no-mongo"])
            .args(["--exchange", &format!("{name}.events")])
            .args(["--queue", &format!("{name}.ingest")])
            .args(["--dead-letter-exchange", &format!("{name}.dead")])
            .args(["--dead-letter-queue", &format!("{name}.dead")])
            .args(["--derived-exchange", &format!("{name}.derived")])
            .args(["--database-url", &database_url])
            .args(["--redis-prefix", &format!("{name}:")])
            .args(["--epoch-max-ms", "50"])
            .env("RABBITMQ_URL", rabbitmq_url())
            .env("JWT_SECRET", SECRET)
            .env_remove("DATABASE_URL")
            .env_remove("MONGO_URI")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let banner = tokio::time::timeout(Duration::from_secs(120), stdout.next_line())
            .await
            .expect("the service starts")
            .unwrap()
            .expect("a banner");
        let addr: SocketAddr = banner
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("no address in {banner:?}"));
        Self {
            child,
            addr,
            name,
            database,
            database_url,
        }
    }

    /// The harness's flags that point it at this service.
    fn flags(&self) -> Vec<String> {
        vec![
            "--target".into(),
            format!("http://{}", self.addr),
            "--exchange".into(),
            format!("{}.events", self.name),
            "--database-url".into(),
            self.database_url.clone(),
        ]
    }

    async fn clean(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        if let Ok(connection) =
            lapin::Connection::connect(&rabbitmq_url(), lapin::ConnectionProperties::default())
                .await
        {
            for queue in ["ingest", "dead"] {
                if let Ok(channel) = connection.create_channel().await {
                    let _ = channel
                        .queue_delete(
                            format!("{}.{queue}", self.name).as_str().into(),
                            lapin::options::QueueDeleteOptions::default(),
                        )
                        .await;
                }
            }
            for exchange in ["events", "dead", "derived"] {
                if let Ok(channel) = connection.create_channel().await {
                    let _ = channel
                        .exchange_delete(
                            format!("{}.{exchange}", self.name).as_str().into(),
                            lapin::options::ExchangeDeleteOptions::default(),
                        )
                        .await;
                }
            }
            let _ = connection.close(200, "done".into()).await;
        }
        let mut admin = PgConnection::connect(&admin_url()).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.database
        )))
        .execute(&mut admin)
        .await
        .unwrap();
        let mut redis = redis::Client::open(format!(
            "redis://{}:{}/",
            std::env::var("REDIS_HOST").unwrap_or_else(|_| "127.0.0.1".into()),
            std::env::var("REDIS_PORT").unwrap_or_else(|_| "6379".into())
        ))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.name))
            .query_async(&mut redis)
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL")
                .arg(keys)
                .query_async(&mut redis)
                .await
                .unwrap();
        }
    }
}

/// Runs `load-tests <args>`; `(success, stdout, stderr)`.
async fn harness(args: &[String]) -> (bool, String, String) {
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(load_tests())
            .args(args)
            .env("JWT_SECRET", SECRET)
            .env("RABBITMQ_URL", rabbitmq_url())
            .env_remove("DATABASE_URL")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the harness stops by itself")
    .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Runs one scenario into `out` and returns its parsed report, having checked the PNG;
/// `Err` says what went wrong (asserted only after the service is cleaned up).
async fn scenario(
    service: &Service,
    out: &Path,
    name: &str,
    extra: &[&str],
) -> Result<Value, String> {
    let mut args: Vec<String> = vec![name.to_owned()];
    args.extend(service.flags());
    args.extend([
        "--out".into(),
        out.display().to_string(),
        "--name".into(),
        name.into(),
    ]);
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let (ok, stdout, stderr) = harness(&args).await;
    if !ok || !stdout.contains("report:") {
        return Err(format!("load-tests {name} failed:\n{stdout}\n{stderr}"));
    }
    eprintln!("{stdout}");
    let report: Value = std::fs::read(out.join(format!("{name}.json")))
        .map_err(|e| format!("{name}: no report: {e}"))
        .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| format!("{name}: {e}")))?;
    if report["timeline"].as_array().is_some_and(|t| !t.is_empty()) {
        let png = std::fs::read(out.join(format!("{name}.png")))
            .map_err(|e| format!("{name}: no PNG: {e}"))?;
        if !png.starts_with(b"\x89PNG\r\n\x1a\n") {
            return Err(format!("{name}: the chart is not a PNG"));
        }
    }
    Ok(report)
}

fn count(report: &Value, series: &str) -> u64 {
    report["latency"][series]["count"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_runs_end_to_end_against_the_real_service() {
    let service = Service::start().await;
    let out = std::env::temp_dir().join(format!("lt-smoke-{}", Uuid::new_v4().simple()));
    let short = ["--ramp-up", "0.5", "--drain", "1.5", "--zones", "20"];

    // Two groups side by side, to stay within seconds; each run has its own couriers.
    let first = async {
        let fleet = scenario(
            &service,
            &out,
            "fleet",
            &[
                &short[..],
                &[
                    "--couriers",
                    "20",
                    "--rate",
                    "2",
                    "--seed",
                    "11",
                    "--duration",
                    "3",
                ],
            ]
            .concat(),
        )
        .await;
        let mixed = scenario(
            &service,
            &out,
            "mixed",
            &[
                &short[..],
                &[
                    "--couriers",
                    "10",
                    "--trackers",
                    "3",
                    "--analysts",
                    "1",
                    "--analyst-rate",
                    "10",
                    "--via",
                    "http",
                    "--seed",
                    "12",
                    "--duration",
                    "3",
                ],
            ]
            .concat(),
        )
        .await;
        (fleet, mixed)
    };
    let second = async {
        let trackers = scenario(
            &service,
            &out,
            "trackers",
            // Sessions open once deliveries are live: a little longer than the others.
            &[
                &short[..],
                &[
                    "--couriers",
                    "20",
                    "--trackers",
                    "8",
                    "--seed",
                    "13",
                    "--duration",
                    "5",
                ],
            ]
            .concat(),
        )
        .await;
        let analysts = scenario(
            &service,
            &out,
            "analysts",
            &[
                &short[..],
                &[
                    "--couriers",
                    "10",
                    "--analysts",
                    "2",
                    "--analyst-rate",
                    "20",
                    "--seed",
                    "14",
                    "--duration",
                    "3",
                    "--baselines",
                    "analytics",
                    "--analytics-requests",
                    "10",
                ],
            ]
            .concat(),
        )
        .await;
        let baselines = scenario(
            &service,
            &out,
            "baselines",
            &[
                "--baselines",
                "broker,geofence",
                "--broker-seconds",
                "2",
                "--geofence-zones",
                "300",
                "--geofence-points",
                "2000",
                "--geofence-rounds",
                "1",
            ],
        )
        .await;
        (trackers, analysts, baselines)
    };
    let ((fleet, mixed), (trackers, analysts, baselines)) = tokio::join!(first, second);
    let _ = std::fs::remove_dir_all(&out);
    service.clean().await;
    let (fleet, mixed, trackers, analysts, baselines) = (
        fleet.unwrap(),
        mixed.unwrap(),
        trackers.unwrap(),
        analysts.unwrap(),
        baselines.unwrap(),
    );

    // fleet: events achieved, seen on /ws/changes with their latency, nothing lost.
    assert!(fleet["events"]["achieved"].as_u64().unwrap() > 0, "{fleet}");
    assert_eq!(fleet["events"]["achieved"], fleet["events"]["offered"]);
    assert!(count(&fleet, "publish_to_websocket") > 0, "{fleet}");
    assert_eq!(fleet["websocket"]["mode"], "changes");
    assert!(fleet["loss"]["received"].as_u64().unwrap() > 0);
    assert_eq!(fleet["loss"]["unseen_at_end"], 0, "{}", fleet["loss"]);
    assert!(
        fleet["events"]["processed"].as_u64().unwrap_or(0) > 0,
        "{}",
        fleet["events"]
    );

    // trackers: sessions on /ws/track, held, with latencies.
    assert_eq!(trackers["websocket"]["mode"], "track");
    assert!(
        trackers["websocket"]["peak_connections"].as_i64().unwrap() > 0,
        "{}",
        trackers["websocket"]
    );
    assert!(count(&trackers, "publish_to_websocket") > 0, "{trackers}");

    // analysts: GraphQL answered, publish → GraphQL seen, and the SQL baseline beside it.
    assert!(count(&analysts, "graphql_query") > 0, "{analysts}");
    let analytics = &analysts["baselines"]["analytics"];
    assert!(
        analytics["sql"]["count"].as_u64().unwrap() > 0,
        "{}",
        analysts["baselines"]
    );
    assert!(analytics["graphql"]["count"].as_u64().unwrap() > 0);

    // mixed: fixes through POST /locations, answered once applied.
    assert!(count(&mixed, "http_location_command") > 0, "{mixed}");
    assert!(mixed["events"]["achieved"].as_u64().unwrap() > 0);

    // baselines: the broker moved messages; the index found what PostGIS found (or PostGIS
    // is missing here, which the report says).
    assert!(
        baselines["baselines"]["broker"]["consumed_per_s"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    let geofence = &baselines["baselines"]["geofence"];
    assert!(
        geofence["index"]["pairs"].as_u64().unwrap() > 0,
        "{geofence}"
    );
    match geofence["postgis_pairs"].as_u64() {
        Some(pairs) => assert_eq!(pairs, geofence["index"]["pairs"].as_u64().unwrap()),
        None => assert!(
            geofence["postgis_error"]
                .as_str()
                .unwrap()
                .contains("PostGIS"),
            "{geofence}"
        ),
    }

    // Refusals: not loopback, and not up.
    let (ok, _, stderr) = harness(&[
        "fleet".into(),
        "--target".into(),
        "http://192.0.2.10:8080".into(),
    ])
    .await;
    assert!(!ok && stderr.contains("loopback"), "{stderr}");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (ok, _, stderr) = harness(&[
        "fleet".into(),
        "--target".into(),
        format!("http://127.0.0.1:{closed}"),
    ])
    .await;
    assert!(!ok && stderr.contains("is not up"), "{stderr}");
}
