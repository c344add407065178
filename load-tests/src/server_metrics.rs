//! The service's own view of a run, from its Prometheus `/metrics`.
//!
//! Two readings (when sending starts and when it ends) give what the pipeline did in
//! between: events ingested, epochs committed, how long an epoch took to commit (the
//! slowest sink) and each sink's commit time. These say where an end-to-end figure comes
//! from: a pipeline whose cores are idle while its throughput is capped is waiting on
//! something, and the sinks' commit times say which.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::Serialize;

use crate::target::Target;

/// One reading: every sample of the text format, by series (`name{labels}`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Reading(HashMap<String, f64>);

impl Reading {
    /// Parses the Prometheus text format (comments and malformed lines are skipped).
    pub fn parse(text: &str) -> Self {
        let mut samples = HashMap::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            if let Some((series, value)) = line.rsplit_once(' ')
                && let Ok(value) = value.parse::<f64>()
            {
                samples.insert(series.to_owned(), value);
            }
        }
        Self(samples)
    }

    /// Reads the target's `/metrics`; `None` when it does not answer in time.
    pub async fn read(http: &reqwest::Client, target: &Target) -> Option<Self> {
        let text = http
            .get(target.http("/metrics"))
            .timeout(Duration::from_millis(800))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        Some(Self::parse(&text))
    }

    /// The sum of every series of the family `name` (all label sets); `None` if absent.
    pub fn total(&self, name: &str) -> Option<f64> {
        let mut total = None;
        for (series, value) in &self.0 {
            let family = series.split('{').next().unwrap_or(series);
            if family == name {
                *total.get_or_insert(0.0) += value;
            }
        }
        total
    }

    /// The series of family `name` by the value of `label`.
    pub fn by_label(&self, name: &str, label: &str) -> BTreeMap<String, f64> {
        let needle = format!("{label}=\"");
        self.0
            .iter()
            .filter_map(|(series, value)| {
                let (family, labels) = series.split_once('{')?;
                if family != name {
                    return None;
                }
                let start = labels.find(&needle)? + needle.len();
                let end = labels[start..].find('"')? + start;
                Some((labels[start..end].to_owned(), *value))
            })
            .collect()
    }
}

/// What the service did between two readings.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ServerFigures {
    /// Events ingested.
    pub events: f64,
    /// Epochs committed by every sink.
    pub epochs: f64,
    /// Events per epoch, on average.
    pub events_per_epoch: Option<f64>,
    /// Mean time from an epoch's output reaching the sinks until the slowest committed, ms.
    pub epoch_commit_mean_ms: Option<f64>,
    /// Mean time from an epoch's first event until every sink committed it, ms.
    pub epoch_latency_mean_ms: Option<f64>,
    /// Mean commit time of one epoch, per sink, ms.
    pub sink_commit_mean_ms: BTreeMap<String, f64>,
    /// Mean time of one epoch in each stage of the pipeline (`decode`, `dataflow`,
    /// `record_commit`, `ack_wait`), ms.
    pub stage_mean_ms: BTreeMap<String, f64>,
    /// Events refused by reason (`stale`, ...).
    pub rejected: BTreeMap<String, f64>,
}

impl ServerFigures {
    /// The difference `after − before`.
    pub fn between(before: &Reading, after: &Reading) -> Self {
        let delta =
            |name: &str| after.total(name).unwrap_or(0.0) - before.total(name).unwrap_or(0.0);
        let mean_ms = |name: &str| {
            let count = delta(&format!("{name}_count"));
            (count > 0.0).then(|| delta(&format!("{name}_sum")) / count * 1_000.0)
        };
        let events = delta("delivertrack_events_ingested_total");
        let epochs = delta("delivertrack_epochs_committed_total");
        let sink_commit_mean_ms = mean_ms_by_label(
            before,
            after,
            "delivertrack_sink_commit_duration_seconds",
            "sink",
        );
        let stage_mean_ms = mean_ms_by_label(
            before,
            after,
            "delivertrack_epoch_stage_duration_seconds",
            "stage",
        );
        let rejected_before = before.by_label("delivertrack_events_rejected_total", "reason");
        let rejected = after
            .by_label("delivertrack_events_rejected_total", "reason")
            .into_iter()
            .map(|(reason, n)| {
                let d = n - rejected_before.get(&reason).unwrap_or(&0.0);
                (reason, d)
            })
            .filter(|(_, n)| *n > 0.0)
            .collect();
        Self {
            events,
            epochs,
            events_per_epoch: (epochs > 0.0).then(|| events / epochs),
            epoch_commit_mean_ms: mean_ms("delivertrack_epoch_commit_duration_seconds"),
            epoch_latency_mean_ms: mean_ms("delivertrack_epoch_latency_seconds"),
            sink_commit_mean_ms,
            stage_mean_ms,
            rejected,
        }
    }
}

/// The mean of a histogram family per value of `label` between two readings, ms: what each
/// sink (or stage) took per epoch while the fleet was sent.
fn mean_ms_by_label(
    before: &Reading,
    after: &Reading,
    histogram: &str,
    label: &str,
) -> BTreeMap<String, f64> {
    let (sum, count) = (format!("{histogram}_sum"), format!("{histogram}_count"));
    let sums_before = before.by_label(&sum, label);
    let counts_before = before.by_label(&count, label);
    let counts_after = after.by_label(&count, label);
    after
        .by_label(&sum, label)
        .into_iter()
        .filter_map(|(key, sum)| {
            let count = counts_after.get(&key)? - counts_before.get(&key).unwrap_or(&0.0);
            let sum = sum - sums_before.get(&key).unwrap_or(&0.0);
            (count > 0.0).then(|| (key, sum / count * 1_000.0))
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const BEFORE: &str = r#"# HELP x
delivertrack_events_ingested_total{kind="location.updated"} 100
delivertrack_events_ingested_total{kind="status.changed"} 10
delivertrack_epochs_committed_total 5
delivertrack_epoch_commit_duration_seconds_sum 0.5
delivertrack_epoch_commit_duration_seconds_count 5
delivertrack_sink_commit_duration_seconds_sum{sink="postgres"} 0.4
delivertrack_sink_commit_duration_seconds_count{sink="postgres"} 5
"#;
    const AFTER: &str = r#"delivertrack_events_ingested_total{kind="location.updated"} 1100
delivertrack_events_ingested_total{kind="status.changed"} 110
delivertrack_epochs_committed_total 15
delivertrack_epoch_commit_duration_seconds_sum 2.5
delivertrack_epoch_commit_duration_seconds_count 15
delivertrack_sink_commit_duration_seconds_sum{sink="postgres"} 2.4
delivertrack_sink_commit_duration_seconds_count{sink="postgres"} 15
delivertrack_sink_commit_duration_seconds_sum{sink="redis"} 0.01
delivertrack_sink_commit_duration_seconds_count{sink="redis"} 10
delivertrack_events_rejected_total{reason="stale"} 3
delivertrack_epoch_stage_duration_seconds_sum{stage="decode"} 0.02
delivertrack_epoch_stage_duration_seconds_count{stage="decode"} 10
delivertrack_epoch_stage_duration_seconds_sum{stage="dataflow"} 0.3
delivertrack_epoch_stage_duration_seconds_count{stage="dataflow"} 10
"#;

    #[test]
    fn two_readings_give_rates_and_means() {
        let figures = ServerFigures::between(&Reading::parse(BEFORE), &Reading::parse(AFTER));
        assert_eq!(figures.events, 1_100.0);
        assert_eq!(figures.epochs, 10.0);
        assert_eq!(figures.events_per_epoch, Some(110.0));
        assert!((figures.epoch_commit_mean_ms.unwrap() - 200.0).abs() < 1e-9);
        assert!((figures.sink_commit_mean_ms["postgres"] - 200.0).abs() < 1e-9);
        assert!((figures.sink_commit_mean_ms["redis"] - 1.0).abs() < 1e-9);
        assert_eq!(figures.rejected["stale"], 3.0);
        assert_eq!(figures.epoch_latency_mean_ms, None);
        assert!((figures.stage_mean_ms["decode"] - 2.0).abs() < 1e-9);
        assert!((figures.stage_mean_ms["dataflow"] - 30.0).abs() < 1e-9);
        assert_eq!(figures.stage_mean_ms.len(), 2);
    }
}
