//! The ingest counters, in Prometheus form.
//!
//! Operator-visible outcomes of consuming — a message received, an event accepted, refused,
//! dead-lettered, a reconnection — each bump a counter here, so that a dashboard shows what
//! the logs would only tell one line at a time.

use std::sync::Arc;

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// The ingest metrics. Cloning shares the same counters.
#[derive(Clone, Debug)]
pub struct IngestMetrics {
    /// `None` only if creating the metrics failed, which constant names and help texts rule
    /// out (a unit test proves it); it keeps [`IngestMetrics::unregistered`] free of a panic.
    inner: Option<Arc<Metrics>>,
}

#[derive(Debug)]
struct Metrics {
    /// Deliveries taken from the queue, redeliveries included.
    messages_received: IntCounter,
    /// Events that passed decoding, by `kind`.
    events_ingested: IntCounterVec,
    /// Events (or whole messages) refused by decoding or by the dataflow, by `reason`;
    /// `stale` included although it is not dead-lettered. Each is counted once, when the
    /// delivery that carried it is acknowledged, so a redelivery does not count it again.
    events_rejected: IntCounterVec,
    /// Dead letters whose publication the broker confirmed, by `reason`.
    events_dead_lettered: IntCounterVec,
    /// Connections re-established after a loss.
    reconnects: IntCounter,
    /// Deliveries received and not yet acknowledged; never above the prefetch.
    in_flight: IntGauge,
}

impl IngestMetrics {
    /// Creates the metrics and registers them:
    /// `delivertrack_messages_received_total`, `delivertrack_events_ingested_total{kind}`,
    /// `delivertrack_events_rejected_total{reason}`,
    /// `delivertrack_events_dead_lettered_total{reason}`,
    /// `delivertrack_source_reconnects_total`, `delivertrack_messages_in_flight`.
    ///
    /// # Errors
    /// A metric of the same name is already registered in `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let metrics = Metrics::create()?;
        registry.register(Box::new(metrics.messages_received.clone()))?;
        registry.register(Box::new(metrics.events_ingested.clone()))?;
        registry.register(Box::new(metrics.events_rejected.clone()))?;
        registry.register(Box::new(metrics.events_dead_lettered.clone()))?;
        registry.register(Box::new(metrics.reconnects.clone()))?;
        registry.register(Box::new(metrics.in_flight.clone()))?;
        Ok(Self {
            inner: Some(Arc::new(metrics)),
        })
    }

    /// Metrics that count but are exported nowhere: for tests, and for a source whose
    /// numbers nobody scrapes.
    pub fn unregistered() -> Self {
        Self {
            inner: Metrics::create().ok().map(Arc::new),
        }
    }

    pub(crate) fn message_received(&self) {
        if let Some(m) = &self.inner {
            m.messages_received.inc();
        }
    }

    pub(crate) fn event_ingested(&self, kind: &str) {
        if let Some(m) = &self.inner {
            m.events_ingested.with_label_values(&[kind]).inc();
        }
    }

    pub(crate) fn event_rejected(&self, reason: &str) {
        if let Some(m) = &self.inner {
            m.events_rejected.with_label_values(&[reason]).inc();
        }
    }

    pub(crate) fn event_dead_lettered(&self, reason: &str) {
        if let Some(m) = &self.inner {
            m.events_dead_lettered.with_label_values(&[reason]).inc();
        }
    }

    pub(crate) fn reconnected(&self) {
        if let Some(m) = &self.inner {
            m.reconnects.inc();
        }
    }

    pub(crate) fn set_in_flight(&self, deliveries: usize) {
        if let Some(m) = &self.inner {
            m.in_flight
                .set(i64::try_from(deliveries).unwrap_or(i64::MAX));
        }
    }

    /// Deliveries received so far.
    pub fn messages_received(&self) -> u64 {
        self.inner.as_ref().map_or(0, |m| m.messages_received.get())
    }

    /// Events of `kind` (wire name) that passed decoding so far.
    pub fn events_ingested(&self, kind: &str) -> u64 {
        self.inner
            .as_ref()
            .map_or(0, |m| m.events_ingested.with_label_values(&[kind]).get())
    }

    /// Events refused with `reason` (a code) so far.
    pub fn events_rejected(&self, reason: &str) -> u64 {
        self.inner
            .as_ref()
            .map_or(0, |m| m.events_rejected.with_label_values(&[reason]).get())
    }

    /// Dead letters with `reason` confirmed by the broker so far.
    pub fn events_dead_lettered(&self, reason: &str) -> u64 {
        self.inner.as_ref().map_or(0, |m| {
            m.events_dead_lettered.with_label_values(&[reason]).get()
        })
    }

    /// Reconnections so far.
    pub fn reconnects(&self) -> u64 {
        self.inner.as_ref().map_or(0, |m| m.reconnects.get())
    }
}

impl Metrics {
    fn create() -> Result<Self, prometheus::Error> {
        Ok(Self {
            messages_received: IntCounter::with_opts(Opts::new(
                "delivertrack_messages_received_total",
                "RabbitMQ deliveries received by the ingest, redeliveries included.",
            ))?,
            events_ingested: IntCounterVec::new(
                Opts::new(
                    "delivertrack_events_ingested_total",
                    "Events that passed decoding and validation, by kind.",
                ),
                &["kind"],
            )?,
            events_rejected: IntCounterVec::new(
                Opts::new(
                    "delivertrack_events_rejected_total",
                    "Events or messages refused at decoding or by the dataflow, by reason code.",
                ),
                &["reason"],
            )?,
            events_dead_lettered: IntCounterVec::new(
                Opts::new(
                    "delivertrack_events_dead_lettered_total",
                    "Refused events published to the dead-letter exchange and confirmed, by reason code.",
                ),
                &["reason"],
            )?,
            reconnects: IntCounter::with_opts(Opts::new(
                "delivertrack_source_reconnects_total",
                "Times the RabbitMQ connection was re-established after a loss.",
            ))?,
            in_flight: IntGauge::with_opts(Opts::new(
                "delivertrack_messages_in_flight",
                "RabbitMQ deliveries received and not yet acknowledged.",
            ))?,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use prometheus::Encoder;

    #[test]
    fn every_metric_is_exported_under_its_name() {
        assert!(Metrics::create().is_ok(), "the definitions are valid");
        let registry = Registry::new();
        let metrics = IngestMetrics::register(&registry).unwrap();
        metrics.message_received();
        metrics.event_ingested("location.updated");
        metrics.event_rejected("stale");
        metrics.event_dead_lettered("bad_json");
        metrics.reconnected();
        metrics.set_in_flight(3);
        let mut text = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&registry.gather(), &mut text)
            .unwrap();
        let text = String::from_utf8(text).unwrap();
        for line in [
            "delivertrack_messages_received_total 1",
            "delivertrack_events_ingested_total{kind=\"location.updated\"} 1",
            "delivertrack_events_rejected_total{reason=\"stale\"} 1",
            "delivertrack_events_dead_lettered_total{reason=\"bad_json\"} 1",
            "delivertrack_source_reconnects_total 1",
            "delivertrack_messages_in_flight 3",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert_eq!(metrics.events_dead_lettered("bad_json"), 1);
        // Registering twice in one registry is refused, not silently doubled.
        assert!(IngestMetrics::register(&registry).is_err());
        let unregistered = IngestMetrics::unregistered();
        unregistered.reconnected();
        assert_eq!(unregistered.reconnects(), 1);
    }
}
