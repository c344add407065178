//! Latency of `GET /deliveries/{id}` at a fixed request rate, over loopback.
//!
//! Builds a read model from the fleet simulator through the real dataflow (200 couriers,
//! 20 simulated minutes), serves the API on `127.0.0.1:0`, and sends requests open-loop at
//! `--rate` per second for `--seconds` (after a one-second warm-up that is not recorded),
//! each for a delivery taken in turn from all of them, as an admin. A request's latency is
//! measured from the moment it was due, not from when it was sent, so that a stalled
//! server shows up in the figures instead of silently lowering the rate (no coordinated
//! omission). Client and server share the process and its runtime.
//!
//! ```sh
//! cargo run -p delivertrack-api --example read_latency -- --rate 1000 --seconds 10
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

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

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} takes a number"))
        })
        .unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rate = arg("--rate", 1_000).max(1);
    let seconds = arg("--seconds", 10).max(1);

    let model = read_model(20);
    let ids: Vec<Uuid> = model.with_state(|read| read.deliveries.keys().map(|id| id.0).collect());
    let state = AppState::new(model, CancellationToken::new());
    let admin = state.auth.issue(Role::Admin, Uuid::new_v4()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = state.shutdown.clone();
    let server = tokio::spawn(delivertrack_api::serve(listener, state));
    println!(
        "{} deliveries in the read model; {rate} requests/s for {seconds} s (+1 s warm-up) on http://{addr}",
        ids.len()
    );

    let client = reqwest::Client::new();
    let histogram = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap(),
    ));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut shed = 0u64;
    let period = Duration::from_nanos(1_000_000_000 / rate);
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let warm_up = rate;
    let total = rate * (seconds + 1);
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
    let mut measured_from = started;
    let mut cpu_from = cpu_time();
    for n in 0..total {
        let due = ticks.tick().await;
        if n == warm_up {
            measured_from = due;
            cpu_from = cpu_time();
        }
        let Ok(permit) = Arc::clone(&in_flight).try_acquire_owned() else {
            shed += 1;
            continue;
        };
        let url = format!("http://{addr}/deliveries/{}", ids[n as usize % ids.len()]);
        let request = client.get(url).bearer_auth(&admin);
        let histogram = Arc::clone(&histogram);
        let errors = Arc::clone(&errors);
        tasks.spawn(async move {
            let ok = match request.send().await {
                Ok(response) => response.status().is_success() && response.bytes().await.is_ok(),
                Err(_) => false,
            };
            let latency = due.elapsed();
            drop(permit);
            if !ok {
                errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            if n >= warm_up {
                let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
                histogram.lock().unwrap().saturating_record(micros.max(1));
            }
        });
        // Reap finished tasks as we go, so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = measured_from.elapsed();
    let cpu = cpu_time()
        .zip(cpu_from)
        .map(|(to, from)| to.saturating_sub(from));
    shutdown.cancel();
    let _ = server.await;

    let histogram = histogram.lock().unwrap();
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "measured {} requests in {:.2} s ({:.0}/s achieved), {} errors, {} shed",
        histogram.len(),
        elapsed.as_secs_f64(),
        histogram.len() as f64 / elapsed.as_secs_f64(),
        errors.load(std::sync::atomic::Ordering::Relaxed),
        shed
    );
    println!(
        "GET /deliveries/{{id}} latency: p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms",
        ms(0.50),
        ms(0.90),
        ms(0.99),
        ms(0.999),
        histogram.max() as f64 / 1000.0
    );
    if let Some(cpu) = cpu {
        println!(
            "CPU (client and server together): {:.2} s, {:.3} ms per request, {:.0}% of one core",
            cpu.as_secs_f64(),
            cpu.as_secs_f64() * 1000.0 / histogram.len().max(1) as f64,
            cpu.as_secs_f64() * 100.0 / elapsed.as_secs_f64()
        );
    }
}
