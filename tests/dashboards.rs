//! The Grafana dashboards against a real Prometheus scraping a real `delivertrack run`.
//!
//! The binary runs on its own RabbitMQ topology, PostgreSQL database and Redis prefix
//! under a short synthetic load (a simulated fleet published through RabbitMQ, a few API
//! requests, a WebSocket client); Prometheus (Debian's `prometheus`, which
//! `scripts/test.sh` installs) scrapes it every second. Then every PromQL expression of
//! every dashboard in `grafana/dashboards/` is evaluated through Prometheus's HTTP API: the
//! test fails on any expression Prometheus refuses or that returns no series, naming the
//! panel.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use delivertrack_ingest::rabbitmq::declare_topology;
use delivertrack_ingest::testing::{delete_topology, unique_config};
use delivertrack_ingest::{FleetSimulator, SimulatorConfig};
use delivertrack_load_tests::Publisher;
use serde_json::Value;
use sqlx::Connection;
use sqlx::postgres::PgConnection;
use tokio::time::{Instant, sleep, timeout};
use uuid::Uuid;

use support::{admin_url, delete_keys, now_ms};

const PATIENCE: Duration = Duration::from_secs(120);

/// Where Prometheus is: `PROMETHEUS_BIN`, else Debian's.
fn prometheus_bin() -> PathBuf {
    let path = std::env::var_os("PROMETHEUS_BIN")
        .map_or_else(|| PathBuf::from("/usr/bin/prometheus"), PathBuf::from);
    assert!(
        path.exists(),
        "Prometheus is not installed at {} (scripts/test.sh installs Debian's `prometheus`; \
         or set PROMETHEUS_BIN)",
        path.display()
    );
    path
}

/// `(dashboard file, panel title, expression)` of every target, with Grafana's interval
/// variables replaced as Grafana would for a short range.
fn expressions() -> Vec<(String, String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("grafana/dashboards");
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let dashboard: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let mut panels: Vec<&Value> = dashboard["panels"].as_array().unwrap().iter().collect();
        while let Some(panel) = panels.pop() {
            if let Some(nested) = panel["panels"].as_array() {
                panels.extend(nested);
            }
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    let expr = expr
                        .replace("$__rate_interval", "1m")
                        .replace("$__interval", "15s");
                    assert!(
                        !expr.contains('$'),
                        "{file}: {:?} uses a template variable the test cannot fill: {expr}",
                        panel["title"]
                    );
                    found.push((
                        file.clone(),
                        panel["title"].as_str().unwrap_or("").to_owned(),
                        expr,
                    ));
                }
            }
        }
    }
    assert!(!found.is_empty(), "no expression in {}", dir.display());
    found
}

/// Prometheus's instant query of `expr`.
fn query_url(prometheus: &str, expr: &str) -> url::Url {
    url::Url::parse_with_params(&format!("{prometheus}/api/v1/query"), [("query", expr)]).unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The service's token secret; the load signs an admin token with it (the read model and
/// its change stream are the admins').
const JWT_SECRET: &str = "a-secret-for-the-dashboard-test-only";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_expression_is_valid_and_returns_series() {
    let prometheus = prometheus_bin();
    let expressions = expressions();

    // The service, on resources of its own.
    let rabbit = unique_config("dashboards");
    let database = format!("dt_dashboards_{}", Uuid::new_v4().simple());
    let admin = admin_url();
    let database_url = format!(
        "{}/{database}",
        admin
            .rsplit_once('/')
            .map_or(admin.as_str(), |(base, _)| base)
    );
    let prefix = format!("dt-test-{}:", Uuid::new_v4().simple());
    let derived = format!("{}.derived", rabbit.exchange);
    let mut service = tokio::process::Command::new(env!("CARGO_BIN_EXE_delivertrack"))
        .args(["run", "--listen", "127.0.0.1:0", "--no-mongo"])
        .args(["--exchange", &rabbit.exchange, "--queue", &rabbit.queue])
        .args(["--dead-letter-exchange", &rabbit.dead_letter_exchange])
        .args(["--dead-letter-queue", &rabbit.dead_letter_queue])
        .args(["--database-url", &database_url, "--redis-prefix", &prefix])
        .args(["--derived-exchange", &derived, "--epoch-max-ms", "50"])
        .env("RABBITMQ_URL", &rabbit.url)
        .env("JWT_SECRET", JWT_SECRET)
        .env_remove("DATABASE_URL")
        .env_remove("MONGO_URI")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let addr = support::banner_address(&mut service, PATIENCE).await;

    // Prometheus, scraping it every second.
    let dir = std::env::temp_dir().join(format!("dt-prometheus-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: delivertrack\n    static_configs:\n      - targets: ['{addr}']\n"
        ),
    )
    .unwrap();
    let prom_port = free_port();
    let mut prom = tokio::process::Command::new(&prometheus)
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    let prom_url = format!("http://127.0.0.1:{prom_port}");

    // Load: a simulated fleet through RabbitMQ, API requests, a WebSocket client.
    let publisher = Publisher::connect(&rabbit.url).await.unwrap();
    declare_topology(publisher.channel(), &rabbit)
        .await
        .unwrap();
    let admin_token = delivertrack_api::Authenticator::new(&delivertrack_api::AuthConfig {
        secret: JWT_SECRET.to_owned(),
        expiry: Duration::from_secs(3600),
    })
    .unwrap()
    .issue(delivertrack_api::Role::Admin, Uuid::new_v4())
    .unwrap();
    let (ws, _) = tokio_tungstenite::connect_async(format!(
        "ws://{addr}/ws/changes?access_token={admin_token}"
    ))
    .await
    .unwrap();
    let mut simulator = FleetSimulator::new(
        SimulatorConfig {
            couriers: 30,
            seed: 5,
            fix_interval_ms: 5_000,
            deliveries_per_minute: 6.0,
            ..SimulatorConfig::default()
        },
        now_ms() - 30 * 60_000,
    );
    let mut events = simulator.initial_events();
    for _ in 0..20 {
        events.extend(simulator.step(60_000));
    }
    let started = Instant::now();
    let mut sent = 0;
    let chunk = events.len().div_ceil(15);
    for part in events.chunks(chunk) {
        publisher
            .publish_events(&rabbit.exchange, part, 10)
            .await
            .unwrap();
        sent += part.len();
        for path in ["/healthz", "/readyz", "/api/snapshot", "/no-such-route"] {
            let _ = client
                .get(format!("http://{addr}{path}"))
                .bearer_auth(&admin_token)
                .send()
                .await;
        }
        sleep(Duration::from_millis(700)).await;
    }
    eprintln!("published {sent} events in {:?}", started.elapsed());

    // Enough samples for every rate over a minute.
    let up = timeout(PATIENCE, async {
        loop {
            let answer = client
                .get(query_url(
                    &prom_url,
                    "count_over_time(up{job=\"delivertrack\"}[1m])",
                ))
                .send()
                .await;
            if let Ok(answer) = answer
                && let Ok(body) = answer.json::<Value>().await
                && let Some(samples) = body["data"]["result"][0]["value"][1].as_str()
                && samples.parse::<f64>().unwrap_or(0.0) >= 8.0
            {
                return;
            }
            sleep(Duration::from_millis(500)).await;
        }
    })
    .await;
    assert!(
        up.is_ok(),
        "Prometheus never scraped the service eight times"
    );

    let mut failures = Vec::new();
    for (file, panel, expr) in &expressions {
        let body: Value = client
            .get(query_url(&prom_url, expr))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if body["status"] != "success" {
            failures.push(format!(
                "{file} / {panel}: refused: {expr}: {}",
                body["error"]
            ));
        } else if body["data"]["result"]
            .as_array()
            .is_none_or(|series| series.is_empty())
        {
            failures.push(format!("{file} / {panel}: no series: {expr}"));
        }
    }
    eprintln!(
        "{} expressions evaluated, {} failed",
        expressions.len(),
        failures.len()
    );

    drop(ws);
    let _ = prom.start_kill();
    let _ = prom.wait().await;
    let _ = service.start_kill();
    let _ = service.wait().await;
    let _ = std::fs::remove_dir_all(&dir);
    let _ = publisher
        .channel()
        .exchange_delete(
            derived.as_str().into(),
            lapin::options::ExchangeDeleteOptions::default(),
        )
        .await;
    delete_topology(&rabbit).await;
    let mut admin = PgConnection::connect(&admin_url()).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {database} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await
    .unwrap();
    delete_keys(&prefix).await;

    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
