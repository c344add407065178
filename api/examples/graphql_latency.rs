//! Latency of one GraphQL metrics query (`successRates(scope: OVERALL)`) at fixed request
//! rates, over loopback.
//!
//! Builds a read model from the fleet simulator through the real dataflow (200 couriers,
//! 60 simulated minutes), serves the whole API on `127.0.0.1:0`, and for each rate of
//! `--rates` sends `POST /graphql` open-loop for `--seconds` (after a one-second warm-up
//! that is not recorded), as an admin. Latency is measured from the moment a request was
//! due, not from when it was sent, so a stalled server shows in the figures instead of
//! silently lowering the rate. Client and server share the process and its two runtime
//! threads, so the figures are an upper bound of the server's own share; the CPU time the
//! process spent per request (from `/proc/self/stat`) is printed too, a figure other load
//! on the machine does not inflate the way it does latency.
//!
//! ```sh
//! cargo run -p delivertrack-api --example graphql_latency -- --rates 500,1000 --seconds 10
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use delivertrack_api::{AppState, Role};
use hdrhistogram::Histogram;
use tokio::sync::Semaphore;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use support::{cpu_time, read_model};

/// Requests in flight at most; beyond, a due request is counted as shed, not sent.
const MAX_IN_FLIGHT: usize = 2_000;

const QUERY: &str = "{ successRates(scope: OVERALL) { epoch deliveries delivered failed \
                     cancelled successRate onTimeRate meanDeliverySeconds } }";

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// What one run at one rate measured.
struct Outcome {
    histogram: Histogram<u64>,
    elapsed: Duration,
    errors: u64,
    shed: u64,
    /// CPU time of the whole process (client and server) during the measured part.
    cpu: Option<Duration>,
}

async fn run(addr: SocketAddr, token: &str, rate: u64, seconds: u64) -> Outcome {
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/graphql");
    let body = serde_json::json!({ "query": QUERY });
    let histogram = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap(),
    ));
    let errors = Arc::new(AtomicU64::new(0));
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut shed = 0;
    let mut ticks = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
    ticks.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let warm_up = rate;
    let mut tasks = tokio::task::JoinSet::new();
    let mut measured_from = Instant::now();
    let mut cpu_from = None;
    for n in 0..rate * (seconds + 1) {
        let due = ticks.tick().await;
        if n == warm_up {
            measured_from = due;
            cpu_from = cpu_time();
        }
        let Ok(permit) = Arc::clone(&in_flight).try_acquire_owned() else {
            shed += 1;
            continue;
        };
        let request = client.post(&url).bearer_auth(token).json(&body);
        let histogram = Arc::clone(&histogram);
        let errors = Arc::clone(&errors);
        tasks.spawn(async move {
            let ok = match request.send().await {
                Ok(response) => {
                    response.status().is_success()
                        && response
                            .bytes()
                            .await
                            .is_ok_and(|b| !b.windows(8).any(|w| w == b"\"errors\""))
                }
                Err(_) => false,
            };
            let latency = due.elapsed();
            drop(permit);
            if !ok {
                errors.fetch_add(1, Ordering::Relaxed);
            }
            if n >= warm_up {
                let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
                histogram.lock().unwrap().saturating_record(micros.max(1));
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = measured_from.elapsed();
    let cpu = cpu_time()
        .zip(cpu_from)
        .map(|(end, start)| end.saturating_sub(start));
    let histogram = Arc::try_unwrap(histogram).unwrap().into_inner().unwrap();
    Outcome {
        histogram,
        elapsed,
        errors: errors.load(Ordering::Relaxed),
        shed,
        cpu,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rates: Vec<u64> = arg("--rates")
        .unwrap_or_else(|| "500,1000".into())
        .split(',')
        .map(|r| {
            r.trim()
                .parse::<u64>()
                .expect("--rates takes numbers")
                .max(1)
        })
        .collect();
    let seconds: u64 =
        arg("--seconds").map_or(10, |s| s.parse().expect("--seconds takes a number"));

    let built = Instant::now();
    let model = tokio::task::spawn_blocking(|| read_model(60))
        .await
        .unwrap();
    let (scopes, deliveries) = model.with_state(|s| (s.metrics.len(), s.deliveries.len()));
    let state = AppState::new(model, CancellationToken::new());
    let admin = state.auth.issue(Role::Admin, Uuid::new_v4()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = state.shutdown.clone();
    let server = tokio::spawn(delivertrack_api::serve(listener, state));
    println!(
        "read model: {deliveries} deliveries, {scopes} metric scopes (built in {:.1} s); \
         query: {QUERY}",
        built.elapsed().as_secs_f64()
    );

    for rate in rates {
        let outcome = run(addr, &admin, rate, seconds).await;
        let h = &outcome.histogram;
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        let cpu = outcome.cpu.map_or_else(
            || "unknown".to_owned(),
            |cpu| {
                format!(
                    "{:.2} ms",
                    cpu.as_secs_f64() * 1000.0 / h.len().max(1) as f64
                )
            },
        );
        println!(
            "{rate}/s for {seconds} s: {} measured ({:.0}/s achieved), {} errors, {} shed, \
             {cpu} CPU per request (client and server); \
             p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms",
            h.len(),
            h.len() as f64 / outcome.elapsed.as_secs_f64(),
            outcome.errors,
            outcome.shed,
            ms(0.5),
            ms(0.9),
            ms(0.99),
            ms(0.999),
            h.max() as f64 / 1000.0,
        );
    }
    shutdown.cancel();
    let _ = server.await;
}
