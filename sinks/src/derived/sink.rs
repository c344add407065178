//! [`DerivedSink`]: the notification feed, published as part of every epoch's commit.

use std::sync::Arc;
use std::time::Instant;

use delivertrack_dataflow::{Epoch, EpochOutput};

use super::config::DerivedConfig;
use super::derive::{Derivation, Deriver};
use super::service::{DerivedError, Outgoing, Publisher};
use crate::sink::{Sink, SinkError, SinkFuture};

const NAME: &str = "derived";

/// Derives geofence, ETA, completion and delay events from every epoch and publishes them
/// to the `delivertrack.derived` topic exchange with publisher confirms.
///
/// A commit resolves `Ok` only once the broker confirmed every message of the epoch, so the
/// epoch's input is acknowledged only after its notifications are safe with the broker
/// (ARCHITECTURE rule 3). A nack, a confirm timeout or a lost connection is
/// [`SinkError::Unavailable`]: the driver retries the epoch, the sink reconnects, and
/// since the derivation's state moves on only after a confirmed commit, the retry publishes
/// the same messages with the same `event_id`s. Consumers dedupe on `event_id` (or the
/// AMQP `message_id`, which carries it): delivery to them is at least once.
///
/// Committing the epoch last committed again publishes its messages again, unchanged; an
/// older epoch (which the driver never sends) is skipped.
#[derive(Debug)]
pub struct DerivedSink {
    publisher: Publisher,
    deriver: Deriver,
    /// The last confirmed epoch and what it published, kept so that committing it again
    /// repeats exactly those messages although the state has moved past it.
    last: Option<(Epoch, Arc<[Outgoing]>)>,
    /// Set by [`close`](Sink::close); later commits are refused.
    closed: bool,
}

impl DerivedSink {
    /// Connects to the broker of `config` and declares the exchange (a no-op when it
    /// exists).
    ///
    /// # Errors
    /// [`SinkError::Unavailable`] whose source, a [`DerivedError`], names the broker with its
    /// password redacted: unreachable, refused login, a conflicting exchange, a timeout, or
    /// an invalid configuration.
    pub async fn connect(config: DerivedConfig) -> Result<Self, SinkError> {
        let deriver = Deriver::new(config.eta_threshold);
        let url = config.redacted_url();
        let exchange = config.exchange.clone();
        let publisher = Publisher::connect(config).await.map_err(unavailable)?;
        tracing::info!(url = %url, exchange = %exchange, "The derived-event sink is connected.");
        Ok(Self {
            publisher,
            deriver,
            last: None,
            closed: false,
        })
    }

    /// Deliveries whose ETA or promise the sink remembers.
    pub fn tracked_deliveries(&self) -> usize {
        self.deriver.tracked()
    }

    /// Is the connection to the broker open right now? (It is reopened at the next commit
    /// that has something to publish.)
    pub fn is_connected(&self) -> bool {
        self.publisher.is_connected()
    }

    async fn write(&mut self, output: &EpochOutput) -> Result<(), SinkError> {
        if let Some((last, messages)) = &self.last
            && output.epoch <= *last
        {
            if output.epoch < *last {
                tracing::debug!(
                    epoch = output.epoch,
                    last_committed = *last,
                    "The derived-event sink was given an epoch older than its last; it is skipped."
                );
                return Ok(());
            }
            let messages = Arc::clone(messages);
            return self.publisher.publish(&messages).await.map_err(unavailable);
        }
        let started = Instant::now();
        let derivation = self.deriver.derive(output);
        let messages = encode(&derivation);
        self.publisher
            .publish(&messages)
            .await
            .map_err(unavailable)?;
        tracing::debug!(
            epoch = output.epoch,
            published = messages.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "The derived events of an epoch were confirmed."
        );
        self.deriver.apply(derivation);
        self.last = Some((output.epoch, messages.into()));
        Ok(())
    }
}

impl Sink for DerivedSink {
    fn name(&self) -> &'static str {
        NAME
    }

    fn commit(&mut self, output: Arc<EpochOutput>) -> SinkFuture<'_> {
        Box::pin(async move {
            if self.closed {
                return Err(SinkError::Closed { sink: NAME });
            }
            self.write(&output).await
        })
    }

    fn close(&mut self) -> SinkFuture<'_> {
        Box::pin(async move {
            self.closed = true;
            self.publisher.close().await;
            Ok(())
        })
    }
}

/// The wire form of a derivation's events, in order.
fn encode(derivation: &Derivation) -> Vec<Outgoing> {
    derivation
        .events
        .iter()
        .map(|event| Outgoing {
            routing_key: event.kind().as_str(),
            event_id: event.event_id.to_string(),
            // A `Value` always serializes; the empty body is unreachable.
            body: serde_json::to_vec(&event.to_json()).unwrap_or_default(),
        })
        .collect()
}

fn unavailable(error: DerivedError) -> SinkError {
    SinkError::Unavailable {
        sink: NAME,
        source: Box::new(error),
    }
}
