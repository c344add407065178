//! [`Recorder`]: what every scenario task writes its measurements into.
//!
//! Counters are atomics; latencies go to `hdrhistogram`s (microseconds, 3 significant
//! digits), one for the whole run and one for the current interval, so that the sampler
//! ([`Recorder::sample`], once a second) can chart percentiles over time without keeping
//! every value. Errors are counted by kind (`http_429`, `ws_connect`, `graphql_error`, ...).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// The latencies the harness measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Series {
    /// A fix published (AMQP publish or HTTP request sent) → its position change received
    /// by a WebSocket tracker.
    PublishToWebSocket,
    /// A status change published → the same status answered by GraphQL.
    PublishToGraphql,
    /// One GraphQL metrics query, request → full answer.
    GraphqlQuery,
    /// One `POST /locations`, request → answer (the route answers once the fix is applied).
    HttpCommand,
}

impl Series {
    /// Every series, in report order.
    pub const ALL: [Series; 4] = [
        Series::PublishToWebSocket,
        Series::PublishToGraphql,
        Series::GraphqlQuery,
        Series::HttpCommand,
    ];

    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Series::PublishToWebSocket => "publish_to_websocket",
            Series::PublishToGraphql => "publish_to_graphql",
            Series::GraphqlQuery => "graphql_query",
            Series::HttpCommand => "http_location_command",
        }
    }
}

/// Percentiles of one series, milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    /// Values recorded.
    pub count: u64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest.
    pub max_ms: f64,
    /// Mean.
    pub mean_ms: f64,
}

impl LatencySummary {
    /// The summary of a histogram of microseconds.
    pub fn of(histogram: &Histogram<u64>) -> Self {
        if histogram.is_empty() {
            return Self::default();
        }
        let ms = |us: u64| us as f64 / 1_000.0;
        Self {
            count: histogram.len(),
            p50_ms: ms(histogram.value_at_quantile(0.50)),
            p90_ms: ms(histogram.value_at_quantile(0.90)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            max_ms: ms(histogram.max()),
            mean_ms: histogram.mean() / 1_000.0,
        }
    }
}

/// One second of the run, as charted.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Sample {
    /// Seconds since the run started (end of the interval).
    pub t_s: f64,
    /// Events due per second in the interval.
    pub offered_per_s: f64,
    /// Events accepted (broker confirm, or HTTP 2xx) per second.
    pub achieved_per_s: f64,
    /// Events the server ingested per second (its `/metrics`), when it was read.
    pub processed_per_s: Option<f64>,
    /// Publish → WebSocket, median of the interval, ms.
    pub ws_p50_ms: Option<f64>,
    /// Publish → WebSocket, 99th percentile of the interval, ms.
    pub ws_p99_ms: Option<f64>,
    /// GraphQL query, 99th percentile of the interval, ms.
    pub graphql_p99_ms: Option<f64>,
    /// GraphQL requests answered per second.
    pub graphql_per_s: f64,
    /// WebSocket connections open at the end of the interval.
    pub ws_connections: i64,
    /// The server's resident memory, MiB.
    pub server_rss_mib: Option<f64>,
}

/// Counters of what trackers saw of the fleet's fixes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct LossCounts {
    /// Fixes received by a tracker that follows their courier.
    pub received: u64,
    /// Sequence numbers skipped between two received fixes of a courier.
    pub gaps: u64,
    /// Fixes received again or after a later one.
    pub duplicates: u64,
    /// Fixes published but never received by the end (after the drain).
    pub unseen_at_end: u64,
    /// Position changes that match no published fix (another producer's, or evicted).
    pub unmatched: u64,
    /// Fresh snapshots sent to a tracker that fell behind.
    pub resyncs: u64,
}

#[derive(Debug)]
struct Hist {
    total: Histogram<u64>,
    interval: Histogram<u64>,
}

#[allow(clippy::expect_used)]
fn histogram() -> Histogram<u64> {
    // 1 µs to 10 min, 3 significant digits: constant bounds that hdrhistogram accepts, so
    // no input can make this fail.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("constant, valid bounds")
}

/// Shared by every task of a run.
#[derive(Debug)]
pub struct Recorder {
    started: Instant,
    /// Events due (offered).
    pub offered: AtomicU64,
    /// Events accepted by the broker or the API (achieved).
    pub achieved: AtomicU64,
    /// GraphQL requests answered.
    pub graphql_requests: AtomicU64,
    /// WebSocket connections open now.
    pub ws_open: AtomicI64,
    /// The most open at once.
    pub ws_peak: AtomicI64,
    /// WebSocket messages received.
    pub ws_messages: AtomicU64,
    histograms: Mutex<BTreeMap<Series, Hist>>,
    errors: Mutex<BTreeMap<String, u64>>,
    loss: Mutex<LossCounts>,
    last: Mutex<(Instant, u64, u64, u64)>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    /// A recorder whose clock starts now.
    pub fn new() -> Self {
        let now = Instant::now();
        Self {
            started: now,
            offered: AtomicU64::new(0),
            achieved: AtomicU64::new(0),
            graphql_requests: AtomicU64::new(0),
            ws_open: AtomicI64::new(0),
            ws_peak: AtomicI64::new(0),
            ws_messages: AtomicU64::new(0),
            histograms: Mutex::new(
                Series::ALL
                    .into_iter()
                    .map(|s| {
                        (
                            s,
                            Hist {
                                total: histogram(),
                                interval: histogram(),
                            },
                        )
                    })
                    .collect(),
            ),
            errors: Mutex::new(BTreeMap::new()),
            loss: Mutex::new(LossCounts::default()),
            last: Mutex::new((now, 0, 0, 0)),
        }
    }

    /// Time since the recorder was made.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Records one latency.
    pub fn latency(&self, series: Series, latency: Duration) {
        let us = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        if let Ok(mut all) = self.histograms.lock()
            && let Some(h) = all.get_mut(&series)
        {
            h.total.saturating_record(us);
            h.interval.saturating_record(us);
        }
    }

    /// Records many latencies of one series at once (one lock).
    pub fn latencies(&self, series: Series, latencies: &[Duration]) {
        if latencies.is_empty() {
            return;
        }
        if let Ok(mut all) = self.histograms.lock()
            && let Some(h) = all.get_mut(&series)
        {
            for latency in latencies {
                let us = u64::try_from(latency.as_micros())
                    .unwrap_or(u64::MAX)
                    .max(1);
                h.total.saturating_record(us);
                h.interval.saturating_record(us);
            }
        }
    }

    /// Counts one error of `kind`.
    pub fn error(&self, kind: impl Into<String>) {
        if let Ok(mut errors) = self.errors.lock() {
            *errors.entry(kind.into()).or_insert(0) += 1;
        }
    }

    /// Adds to the loss counters.
    pub fn loss(&self, f: impl FnOnce(&mut LossCounts)) {
        if let Ok(mut loss) = self.loss.lock() {
            f(&mut loss);
        }
    }

    /// A WebSocket connection opened.
    pub fn ws_opened(&self) {
        let open = self.ws_open.fetch_add(1, Ordering::Relaxed) + 1;
        self.ws_peak.fetch_max(open, Ordering::Relaxed);
    }

    /// A WebSocket connection closed.
    pub fn ws_closed(&self) {
        self.ws_open.fetch_sub(1, Ordering::Relaxed);
    }

    /// The whole run's summary of `series`.
    pub fn summary(&self, series: Series) -> LatencySummary {
        self.histograms
            .lock()
            .ok()
            .and_then(|all| all.get(&series).map(|h| LatencySummary::of(&h.total)))
            .unwrap_or_default()
    }

    /// The errors by kind.
    pub fn errors(&self) -> BTreeMap<String, u64> {
        self.errors.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// The loss counters.
    pub fn loss_counts(&self) -> LossCounts {
        self.loss.lock().map(|l| *l).unwrap_or_default()
    }

    /// Closes the current interval: rates since the last sample, and the interval's
    /// percentiles (which then start afresh). The caller adds what it read from the
    /// server.
    pub fn sample(&self) -> Sample {
        let now = Instant::now();
        let offered = self.offered.load(Ordering::Relaxed);
        let achieved = self.achieved.load(Ordering::Relaxed);
        let graphql = self.graphql_requests.load(Ordering::Relaxed);
        let (seconds, d_offered, d_achieved, d_graphql) = match self.last.lock() {
            Ok(mut last) => {
                let seconds = now.duration_since(last.0).as_secs_f64().max(1e-3);
                let deltas = (
                    offered.saturating_sub(last.1),
                    achieved.saturating_sub(last.2),
                    graphql.saturating_sub(last.3),
                );
                *last = (now, offered, achieved, graphql);
                (seconds, deltas.0, deltas.1, deltas.2)
            }
            Err(_) => (1.0, 0, 0, 0),
        };
        let mut sample = Sample {
            t_s: now.duration_since(self.started).as_secs_f64(),
            offered_per_s: d_offered as f64 / seconds,
            achieved_per_s: d_achieved as f64 / seconds,
            graphql_per_s: d_graphql as f64 / seconds,
            ws_connections: self.ws_open.load(Ordering::Relaxed),
            ..Sample::default()
        };
        if let Ok(mut all) = self.histograms.lock() {
            let mut take = |series: Series, q: f64| {
                all.get_mut(&series).and_then(|h| {
                    (!h.interval.is_empty())
                        .then(|| h.interval.value_at_quantile(q) as f64 / 1_000.0)
                })
            };
            sample.ws_p50_ms = take(Series::PublishToWebSocket, 0.5);
            sample.ws_p99_ms = take(Series::PublishToWebSocket, 0.99);
            sample.graphql_p99_ms = take(Series::GraphqlQuery, 0.99);
            for h in all.values_mut() {
                h.interval.reset();
            }
        }
        sample
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_out_in_milliseconds() {
        let recorder = Recorder::new();
        for ms in 1..=100u64 {
            recorder.latency(Series::PublishToWebSocket, Duration::from_millis(ms));
        }
        let summary = recorder.summary(Series::PublishToWebSocket);
        assert_eq!(summary.count, 100);
        assert!((summary.p50_ms - 50.0).abs() < 0.1, "{summary:?}");
        assert!((summary.p99_ms - 99.0).abs() < 0.1, "{summary:?}");
        assert!((summary.max_ms - 100.0).abs() < 0.1, "{summary:?}");
        assert_eq!(recorder.summary(Series::GraphqlQuery).count, 0);
    }

    #[test]
    fn a_sample_closes_the_interval_but_not_the_run() {
        let recorder = Recorder::new();
        recorder.offered.fetch_add(100, Ordering::Relaxed);
        recorder.latency(Series::PublishToWebSocket, Duration::from_millis(7));
        recorder.error("http_429");
        recorder.error("http_429");
        let first = recorder.sample();
        assert!(first.offered_per_s > 0.0);
        assert!(first.ws_p99_ms.is_some());
        let second = recorder.sample();
        assert_eq!(second.ws_p99_ms, None);
        assert_eq!(second.offered_per_s, 0.0);
        assert_eq!(recorder.summary(Series::PublishToWebSocket).count, 1);
        assert_eq!(recorder.errors()["http_429"], 2);
    }

    #[test]
    fn connections_peak_is_kept() {
        let recorder = Recorder::new();
        recorder.ws_opened();
        recorder.ws_opened();
        recorder.ws_closed();
        assert_eq!(recorder.ws_open.load(Ordering::Relaxed), 1);
        assert_eq!(recorder.ws_peak.load(Ordering::Relaxed), 2);
    }
}
