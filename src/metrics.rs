//! [`DriverMetrics`]: what the driver loop tells Prometheus about epochs.
//!
//! The source registers its own metrics (messages received, events rejected, in flight);
//! these are the driver's share: how many epochs every sink committed, and how long the
//! sinks took. Together they answer "is the pipeline moving, and is a sink the brake?".

use prometheus::{Histogram, HistogramOpts, IntCounter, Registry};

/// The driver's metrics, registered once per registry; clones share the same series.
#[derive(Clone, Debug)]
pub struct DriverMetrics {
    /// `delivertrack_epochs_committed_total`: epochs committed by every sink.
    pub epochs_committed: IntCounter,
    /// `delivertrack_epoch_commit_duration_seconds`: from handing an epoch's output to the
    /// sinks until the slowest of them committed it (retries included).
    pub epoch_commit_duration: Histogram,
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
            .buckets(vec![
                0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
        )?;
        registry.register(Box::new(epochs_committed.clone()))?;
        registry.register(Box::new(epoch_commit_duration.clone()))?;
        Ok(Self {
            epochs_committed,
            epoch_commit_duration,
        })
    }
}
