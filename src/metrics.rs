//! [`DriverMetrics`]: what the driver loop tells Prometheus about epochs and sinks.
//!
//! The source registers its own metrics (messages received, events rejected, in flight);
//! these are the driver's share: how many epochs every sink committed, how long an epoch
//! takes from its first event's receipt to its commit, how long each sink takes and how
//! often it fails, how far the dataflow's output lags its input, and how long hydration
//! took. Together they answer "is the pipeline moving, and what is its brake?". Per epoch,
//! `delivertrack_epoch_stage_duration_seconds{stage}` splits the way into its [`Stage`]s and
//! `delivertrack_epoch_events` says how large epochs are, so that a run's `/metrics` show
//! where the time goes (their `_sum` ÷ `_count` is the mean per epoch).

use delivertrack_dataflow::model::Scope;
use delivertrack_dataflow::{Change, EpochOutput, EventBody, Status};
use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry,
};

/// Buckets for durations from a tenth of a millisecond to half a minute.
const SECONDS: [f64; 16] = [
    0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
    30.0,
];

/// Events per epoch, from a trickle to the largest epochs a backlog makes.
const EVENTS: [f64; 14] = [
    1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1_000.0, 2_500.0, 5_000.0, 10_000.0, 25_000.0, 50_000.0,
    100_000.0, 250_000.0,
];

/// A stage of an epoch's way through the pipeline: the `stage` label of
/// `delivertrack_epoch_stage_duration_seconds`. Each sink's commit has its own series,
/// `delivertrack_sink_commit_duration_seconds{sink}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// The source turning the epoch's messages into events (decoding, validating).
    Decode,
    /// From the epoch's submission to the dataflow until its output arrives.
    Dataflow,
    /// The system of record's commit of the epoch, retries included.
    RecordCommit,
    /// From the epoch's output arriving until its batch's token is handed back to the
    /// source: the commits of every sink, and the wait for the epochs before it.
    AckWait,
}

impl Stage {
    /// Every stage, in pipeline order.
    pub const ALL: [Stage; 4] = [
        Stage::Decode,
        Stage::Dataflow,
        Stage::RecordCommit,
        Stage::AckWait,
    ];

    /// Its label value.
    pub fn label(self) -> &'static str {
        match self {
            Stage::Decode => "decode",
            Stage::Dataflow => "dataflow",
            Stage::RecordCommit => "record_commit",
            Stage::AckWait => "ack_wait",
        }
    }
}

/// The driver's metrics, registered once per registry; clones share the same series.
#[derive(Clone, Debug)]
pub struct DriverMetrics {
    /// `delivertrack_epochs_committed_total`: epochs committed by every sink.
    pub epochs_committed: IntCounter,
    /// `delivertrack_epoch_commit_duration_seconds`: from an epoch's output arriving for
    /// the sinks until the slowest of them committed it (retries, and the wait behind the
    /// epochs before it in each sink's queue, included).
    pub epoch_commit_duration: Histogram,
    /// `delivertrack_epoch_latency_seconds`: from the receipt of an epoch's first event
    /// until every sink committed the epoch (what a client waits, at most, to see it).
    pub epoch_latency: Histogram,
    /// `delivertrack_sink_commit_duration_seconds{sink}`: one sink's commit of one epoch,
    /// retries included.
    pub sink_commit_duration: HistogramVec,
    /// `delivertrack_epoch_stage_duration_seconds{stage}`: one epoch's time in one
    /// [`Stage`].
    pub epoch_stage_duration: HistogramVec,
    /// `delivertrack_epoch_events`: events per epoch committed (restored state excluded).
    pub epoch_events: Histogram,
    /// `delivertrack_sink_errors_total{sink}`: failed commit attempts (each retry counts),
    /// and for a sink that goes on without its store (Redis), the writes it lost.
    pub sink_errors: IntCounterVec,
    /// `delivertrack_dataflow_frontier_lag_seconds`: how long the oldest epoch submitted to
    /// the dataflow and not yet committed has been waiting; 0 when nothing waits.
    pub frontier_lag: Gauge,
    /// `delivertrack_hydration_duration_seconds`: how long the start-up restore from
    /// PostgreSQL took (reading and rebuilding the dataflow's state); 0 without one.
    pub hydration_duration: Gauge,
    /// `delivertrack_active_deliveries`: deliveries assigned, picked up or in transit, as
    /// of the last committed epoch.
    pub active_deliveries: IntGauge,
    /// `delivertrack_delivery_duration_seconds`: created → delivered of each delivery
    /// delivered (observed once, in the epoch that delivered it; the mean is
    /// `rate(_sum) / rate(_count)`).
    pub delivery_duration: Histogram,
    /// `delivertrack_location_updates_total`: courier fixes accepted by the dataflow
    /// (stale and refused ones excluded), for the location update rate.
    pub location_updates: IntCounter,
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
        let epoch_stage_duration = HistogramVec::new(
            HistogramOpts::new(
                "delivertrack_epoch_stage_duration_seconds",
                "Time one epoch spent in one stage: decode, dataflow, record_commit, ack_wait.",
            )
            .buckets(SECONDS.to_vec()),
            &["stage"],
        )?;
        for stage in Stage::ALL {
            epoch_stage_duration.with_label_values(&[stage.label()]);
        }
        let epoch_events = Histogram::with_opts(
            HistogramOpts::new(
                "delivertrack_epoch_events",
                "Events per epoch committed by every sink.",
            )
            .buckets(EVENTS.to_vec()),
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
        let active_deliveries = IntGauge::new(
            "delivertrack_active_deliveries",
            "Deliveries assigned, picked up or in transit.",
        )?;
        let delivery_duration = Histogram::with_opts(
            HistogramOpts::new(
                "delivertrack_delivery_duration_seconds",
                "Time from a delivery's creation to its delivery, observed when it is delivered.",
            )
            .buckets(vec![
                60.0, 300.0, 600.0, 900.0, 1200.0, 1800.0, 2700.0, 3600.0, 5400.0, 7200.0, 14400.0,
            ]),
        )?;
        let location_updates = IntCounter::new(
            "delivertrack_location_updates_total",
            "Courier location updates accepted by the dataflow.",
        )?;
        registry.register(Box::new(active_deliveries.clone()))?;
        registry.register(Box::new(delivery_duration.clone()))?;
        registry.register(Box::new(location_updates.clone()))?;
        registry.register(Box::new(epochs_committed.clone()))?;
        registry.register(Box::new(epoch_commit_duration.clone()))?;
        registry.register(Box::new(epoch_latency.clone()))?;
        registry.register(Box::new(sink_commit_duration.clone()))?;
        registry.register(Box::new(epoch_stage_duration.clone()))?;
        registry.register(Box::new(epoch_events.clone()))?;
        registry.register(Box::new(sink_errors.clone()))?;
        registry.register(Box::new(frontier_lag.clone()))?;
        registry.register(Box::new(hydration_duration.clone()))?;
        Ok(Self {
            epochs_committed,
            epoch_commit_duration,
            epoch_latency,
            sink_commit_duration,
            epoch_stage_duration,
            epoch_events,
            sink_errors,
            frontier_lag,
            hydration_duration,
            active_deliveries,
            delivery_duration,
            location_updates,
        })
    }

    /// Counts what a committed epoch says about the fleet: accepted location updates,
    /// deliveries delivered in it (their durations), and the active deliveries after it
    /// (from the overall aggregate, which every epoch that changes it restates).
    pub fn observe_epoch(&self, output: &EpochOutput) {
        if let Some(active) = overall_active(output) {
            self.active_deliveries.set(active);
        }
        if output.restored {
            // Restated state, not news: nothing was updated or delivered now.
            return;
        }
        let refused: std::collections::HashSet<_> =
            output.rejections.iter().map(|r| r.event_id).collect();
        let fixes = output
            .events
            .iter()
            .filter(|e| matches!(e.body, EventBody::LocationUpdated(_)))
            .filter(|e| !refused.contains(&e.event_id))
            .count();
        self.location_updates.inc_by(fixes as u64);
        // A delivery delivered in this epoch: a `+1` delivered record without a `-1`
        // delivered one (a later rating restates a delivered delivery as -1/+1).
        let was_delivered: std::collections::HashSet<_> = output
            .changes
            .iter()
            .filter_map(|(change, diff)| match change {
                Change::Delivery(id, state) if *diff < 0 && state.status == Status::Delivered => {
                    Some(*id)
                }
                _ => None,
            })
            .collect();
        for (change, diff) in &output.changes {
            if let Change::Delivery(id, state) = change
                && *diff > 0
                && state.status == Status::Delivered
                && !was_delivered.contains(id)
                && let Some(ended) = state.ended_at
            {
                let seconds = (ended - state.created_at).max(0) as f64 / 1000.0;
                self.delivery_duration.observe(seconds);
            }
        }
    }

    /// Counts `took` in `stage`.
    pub fn observe_stage(&self, stage: Stage, took: std::time::Duration) {
        self.epoch_stage_duration
            .with_label_values(&[stage.label()])
            .observe(took.as_secs_f64());
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

/// The overall aggregate's active count after this epoch, if the epoch changed it: the
/// `+1` record of `metrics(overall)` (absent when nothing changed it, or when the
/// aggregate vanished: then 0).
fn overall_active(output: &EpochOutput) -> Option<i64> {
    let mut retracted = false;
    for (change, diff) in &output.changes {
        if let Change::Metric(Scope::Overall, tally) = change {
            if *diff > 0 {
                return Some(tally.active);
            }
            retracted = true;
        }
    }
    retracted.then_some(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use delivertrack_dataflow::event::LocationUpdated;
    use delivertrack_dataflow::geometry::GeoPoint;
    use delivertrack_dataflow::model::{DeliveryState, Rating, Tally};
    use delivertrack_dataflow::{
        CourierId, CustomerId, DeliveryId, Event, EventId, EventKind, RejectReason, Rejection,
    };
    use uuid::Uuid;

    fn delivery(status: Status, rating: Option<Rating>) -> DeliveryState {
        DeliveryState {
            customer_id: CustomerId(Uuid::from_u128(1)),
            courier_id: None,
            pickup: GeoPoint::from_degrees(52.5, 13.4),
            dropoff: GeoPoint::from_degrees(52.51, 13.41),
            promised_by: None,
            status,
            created_at: 1_000_000,
            assigned_at: None,
            picked_up_at: None,
            ended_at: (status == Status::Delivered).then_some(1_600_000),
            rating,
            version: 3,
        }
    }

    fn fix(n: u128) -> Event {
        Event {
            event_id: EventId(Uuid::from_u128(n)),
            occurred_at: 1_000,
            body: EventBody::LocationUpdated(LocationUpdated {
                courier_id: CourierId(Uuid::from_u128(9)),
                position: GeoPoint::from_degrees(52.5, 13.4),
                speed_mm_s: None,
                heading_ddeg: None,
                accuracy_cm: None,
            }),
        }
    }

    #[test]
    fn an_epoch_counts_accepted_fixes_new_deliveries_and_the_active_total() {
        let metrics = DriverMetrics::register(&Registry::new()).unwrap();
        let delivered = DeliveryId(Uuid::from_u128(20));
        let rated = DeliveryId(Uuid::from_u128(21));
        let rating = Rating {
            score: 5,
            comment: None,
            at: 2_000_000,
        };
        let output = EpochOutput {
            epoch: 4,
            restored: false,
            events: vec![fix(1), fix(2), fix(3)],
            changes: vec![
                // Newly delivered: observed.
                (
                    Change::Delivery(delivered, delivery(Status::InTransit, None)),
                    -1,
                ),
                (
                    Change::Delivery(delivered, delivery(Status::Delivered, None)),
                    1,
                ),
                // Delivered earlier, rated now: not observed again.
                (
                    Change::Delivery(rated, delivery(Status::Delivered, None)),
                    -1,
                ),
                (
                    Change::Delivery(rated, delivery(Status::Delivered, Some(rating))),
                    1,
                ),
                (
                    Change::Metric(
                        Scope::Overall,
                        Tally {
                            active: 7,
                            ..Tally::default()
                        },
                    ),
                    -1,
                ),
                (
                    Change::Metric(
                        Scope::Overall,
                        Tally {
                            active: 6,
                            ..Tally::default()
                        },
                    ),
                    1,
                ),
            ],
            rejections: vec![Rejection {
                event_id: EventId(Uuid::from_u128(3)),
                kind: EventKind::LocationUpdated,
                reason: RejectReason::Stale,
            }],
        };
        metrics.observe_epoch(&output);
        assert_eq!(metrics.location_updates.get(), 2);
        assert_eq!(metrics.active_deliveries.get(), 6);
        assert_eq!(metrics.delivery_duration.get_sample_count(), 1);
        assert!((metrics.delivery_duration.get_sample_sum() - 600.0).abs() < 1e-9);

        // A restored epoch restates the total and counts nothing else.
        let restored = EpochOutput {
            restored: true,
            ..output
        };
        metrics.observe_epoch(&restored);
        assert_eq!(metrics.location_updates.get(), 2);
        assert_eq!(metrics.delivery_duration.get_sample_count(), 1);
    }
}
