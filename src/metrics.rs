//! [`DriverMetrics`]: what the driver loop tells Prometheus about epochs and sinks.
//!
//! The source registers its own metrics (messages received, events rejected, in flight);
//! these are the driver's share: how many epochs every sink committed, how long an epoch
//! takes from its first event's receipt to its commit, how long each sink takes and how
//! often it fails, how far the dataflow's output lags its input, and how long hydration
//! took. Together they answer "is the pipeline moving, and what is its brake?".

use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
};

/// Buckets for durations from a tenth of a millisecond to half a minute.
const SECONDS: [f64; 16] = [
    0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
    30.0,
];

/// The driver's metrics, registered once per registry; clones share the same series.
#[derive(Clone, Debug)]
pub struct DriverMetrics {
    /// `delivertrack_epochs_committed_total`: epochs committed by every sink.
    pub epochs_committed: IntCounter,
    /// `delivertrack_epoch_commit_duration_seconds`: from handing an epoch's output to the
    /// sinks until the slowest of them committed it (retries included).
    pub epoch_commit_duration: Histogram,
    /// `delivertrack_epoch_latency_seconds`: from the receipt of an epoch's first event
    /// until every sink committed the epoch (what a client waits, at most, to see it).
    pub epoch_latency: Histogram,
    /// `delivertrack_sink_commit_duration_seconds{sink}`: one sink's commit of one epoch,
    /// retries included.
    pub sink_commit_duration: HistogramVec,
    /// `delivertrack_sink_errors_total{sink}`: failed commit attempts (each retry counts),
    /// and for a sink that goes on without its store (Redis), the writes it lost.
    pub sink_errors: IntCounterVec,
    /// `delivertrack_dataflow_frontier_lag_seconds`: how long the oldest epoch submitted to
    /// the dataflow and not yet committed has been waiting; 0 when nothing waits.
    pub frontier_lag: Gauge,
    /// `delivertrack_hydration_duration_seconds`: how long the start-up restore from
    /// PostgreSQL took (reading and rebuilding the dataflow's state); 0 without one.
    pub hydration_duration: Gauge,
}

impl DriverMetrics {
    /// Creates the metrics and registers them in `registry`.
    ///
    /// # Errors
    /// A metric of the same name is already registered there.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let epochs_committed = IntCounter::new(
            "delivertrack_epochs_committed_total",
            "Epochs committed by every enabled sink.",
        )?;
        let epoch_commit_duration = Histogram::with_opts(
            HistogramOpts::new(
                "delivertrack_epoch_commit_duration_seconds",
                "Time from an epoch's output reaching the sinks until every sink committed it.",
            )
            .buckets(SECONDS.to_vec()),
        )?;
        let epoch_latency = Histogram::with_opts(
            HistogramOpts::new(
                "delivertrack_epoch_latency_seconds",
                "Time from the receipt of an epoch's first event until every sink committed the epoch.",
            )
            .buckets(SECONDS.to_vec()),
        )?;
        let sink_commit_duration = HistogramVec::new(
            HistogramOpts::new(
                "delivertrack_sink_commit_duration_seconds",
                "Time one sink took to commit one epoch, retries included.",
            )
            .buckets(SECONDS.to_vec()),
            &["sink"],
        )?;
        let sink_errors = IntCounterVec::new(
            Opts::new(
                "delivertrack_sink_errors_total",
                "Failed epoch commits per sink (each retry counts), and writes a cache sink lost.",
            ),
            &["sink"],
        )?;
        let frontier_lag = Gauge::new(
            "delivertrack_dataflow_frontier_lag_seconds",
            "Age of the oldest epoch submitted to the dataflow and not yet committed by every sink.",
        )?;
        let hydration_duration = Gauge::new(
            "delivertrack_hydration_duration_seconds",
            "Duration of the start-up restore of the dataflow's state from PostgreSQL.",
        )?;
        registry.register(Box::new(epochs_committed.clone()))?;
        registry.register(Box::new(epoch_commit_duration.clone()))?;
        registry.register(Box::new(epoch_latency.clone()))?;
        registry.register(Box::new(sink_commit_duration.clone()))?;
        registry.register(Box::new(sink_errors.clone()))?;
        registry.register(Box::new(frontier_lag.clone()))?;
        registry.register(Box::new(hydration_duration.clone()))?;
        Ok(Self {
            epochs_committed,
            epoch_commit_duration,
            epoch_latency,
            sink_commit_duration,
            sink_errors,
            frontier_lag,
            hydration_duration,
        })
    }

    /// Makes every sink's series visible at 0 before its first commit, so that dashboards
    /// and alerts see each enabled sink from the start.
    pub fn declare_sinks<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        for name in names {
            self.sink_errors.with_label_values(&[name]);
            self.sink_commit_duration.with_label_values(&[name]);
        }
    }
}
