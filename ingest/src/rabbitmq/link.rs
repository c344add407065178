//! The connection to the broker and the task that keeps it alive.
//!
//! One task owns the connection and its consumer. It forwards every delivery, tagged with
//! the *generation* of the channel it came on, to the source through a bounded channel, and
//! when the connection or channel is lost it reconnects with capped exponential backoff,
//! redeclares the topology and consumes again under a new generation. Delivery tags are
//! per channel, so an ack token of an older generation means nothing on the new channel:
//! the source drops it, and the broker redelivers what that channel left unacknowledged.
//!
//! A loss is noticed three ways: the consumer stream reports the error of its channel or
//! connection (a broker restart, `rabbitmqctl close_connection`, a channel the broker closed
//! over a protocol error); the stream ends (the broker cancelled the consumer, as when the
//! queue is deleted); or, every [`LINK_CHECK`], the connection or either channel is found
//! no longer open. The last covers what the stream cannot report: the dead-letter channel
//! closed while idle, and a loss while the task waits for room to hand a delivery over
//! (the pipeline not reading under backpressure, with deliveries of an older channel
//! still queued), so that `/readyz` says so within about a second.
//!
//! The task ends when the source is dropped (its receiver closes): it then closes the
//! connection cleanly.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, Consumer};
use tokio::sync::{mpsc, watch};

use super::config::RabbitConfig;
use super::metrics::IngestMetrics;
use super::source::SourceHealth;
use super::topology::declare_topology;

/// AMQP reply code of a normal close.
const REPLY_SUCCESS: u16 = 200;

/// How often the connection task checks that the connection and both channels are still
/// open, besides what the consumer stream reports.
pub(crate) const LINK_CHECK: Duration = Duration::from_secs(1);

/// One live connection with its two channels.
#[derive(Debug)]
pub(crate) struct Link {
    /// Counts connections since the source started; the first is 1.
    pub generation: u64,
    pub connection: Connection,
    /// Consumes the queue and acknowledges; `basic_qos(prefetch)` is set on it.
    pub consume: Channel,
    /// Publishes dead letters, in confirm mode. Separate from `consume` so that a refused
    /// publish (which closes its channel) cannot take the consumer and its unacked
    /// deliveries down with it.
    pub publish: Channel,
}

impl Link {
    /// Why the link is no longer usable, if it is not: the connection or a channel is no
    /// longer open (closed by the broker, by a protocol error, or by the source itself after
    /// a failed acknowledgement).
    pub(crate) fn lost(&self) -> Option<&'static str> {
        if !self.connection.status().connected() {
            Some("the RabbitMQ connection was closed")
        } else if !self.consume.status().connected() {
            Some("the broker closed the consuming channel")
        } else if !self.publish.status().connected() {
            Some("the broker closed the dead-letter channel")
        } else {
            None
        }
    }

    /// Closes the connection (and so its channels) with a normal reply, within `timeout`.
    pub(crate) async fn close(&self, reason: &str, timeout: Duration) {
        let closing = self.connection.close(REPLY_SUCCESS, reason.into());
        if let Ok(Err(error)) = tokio::time::timeout(timeout, closing).await {
            tracing::debug!(%error, "Closing the RabbitMQ connection failed; it was probably gone already.");
        }
    }
}

/// A delivery and the generation of the channel it came on.
#[derive(Debug)]
pub(crate) struct Incoming {
    pub generation: u64,
    pub delivery: Delivery,
}

/// What the task and the source share: the current link, and the deliveries of its
/// generation not yet acknowledged. A std mutex: it is held for a few instructions and
/// never across an await.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    pub link: Option<Arc<Link>>,
    pub in_flight: usize,
}

pub(crate) type SharedState = Arc<Mutex<Shared>>;

/// Locks the shared state; a poisoned lock is taken over, since every update leaves the
/// state consistent.
pub(crate) fn lock(shared: &SharedState) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Why a connection attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// TCP, TLS, authentication or the AMQP handshake failed.
    #[error("could not connect to RabbitMQ at {url}")]
    Connect {
        /// The broker, password redacted.
        url: String,
        /// What lapin reported.
        #[source]
        source: lapin::Error,
    },
    /// Connected, but declaring the topology, setting QoS or consuming failed.
    #[error("could not set up the RabbitMQ topology and consumer at {url}")]
    Setup {
        /// The broker, password redacted.
        url: String,
        /// What lapin reported.
        #[source]
        source: lapin::Error,
    },
    /// The attempt took longer than the configured connect timeout.
    #[error("connecting to RabbitMQ at {url} took longer than {timeout:?}")]
    Timeout {
        /// The broker, password redacted.
        url: String,
        /// The limit.
        timeout: Duration,
    },
}

/// Connects, declares the topology, opens both channels and starts consuming, within the
/// connect timeout.
pub(crate) async fn establish(
    config: &RabbitConfig,
    generation: u64,
) -> Result<(Link, Consumer), ConnectError> {
    let url = config.redacted_url();
    match tokio::time::timeout(config.connect_timeout, try_establish(config, generation)).await {
        Ok(result) => result,
        Err(_elapsed) => Err(ConnectError::Timeout {
            url,
            timeout: config.connect_timeout,
        }),
    }
}

async fn try_establish(
    config: &RabbitConfig,
    generation: u64,
) -> Result<(Link, Consumer), ConnectError> {
    let properties = ConnectionProperties::default()
        .with_connection_name(config.connection_name.as_str().into());
    let connection = Connection::connect(&super::normalize_url(&config.url), properties)
        .await
        .map_err(|source| ConnectError::Connect {
            url: config.redacted_url(),
            source,
        })?;
    match set_up(&connection, config).await {
        Ok((consume, publish, consumer)) => Ok((
            Link {
                generation,
                connection,
                consume,
                publish,
            },
            consumer,
        )),
        Err(source) => {
            let _ = connection
                .close(REPLY_SUCCESS, "set-up failed".into())
                .await;
            Err(ConnectError::Setup {
                url: config.redacted_url(),
                source,
            })
        }
    }
}

async fn set_up(
    connection: &Connection,
    config: &RabbitConfig,
) -> Result<(Channel, Channel, Consumer), lapin::Error> {
    let publish = connection.create_channel().await?;
    declare_topology(&publish, config).await?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let consume = connection.create_channel().await?;
    // Per consumer (not global): the bound on deliveries held unacknowledged.
    consume
        .basic_qos(config.prefetch, BasicQosOptions { global: false })
        .await?;
    let consumer = consume
        .basic_consume(
            config.queue.as_str().into(),
            // Let the broker name the consumer: unique per channel.
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((consume, publish, consumer))
}

/// Capped exponential backoff with jitter: each pause is drawn from the upper half of a
/// window that doubles from `min` up to `max`, so many clients of a restarted broker do not
/// reconnect in lockstep.
#[derive(Debug)]
pub(crate) struct Backoff {
    window: Duration,
    max: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Self {
            window: min.min(max),
            max,
        }
    }

    /// The next pause.
    pub(crate) fn next_pause(&mut self) -> Duration {
        let window = self.window;
        self.window = (self.window * 2).min(self.max);
        let half = window / 2;
        let jitter_ns = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(rand::random_range(0..=jitter_ns))
    }
}

/// Everything the connection task needs.
pub(crate) struct LinkTask {
    pub config: RabbitConfig,
    pub metrics: IngestMetrics,
    pub shared: SharedState,
    pub health: watch::Sender<SourceHealth>,
    pub deliveries: mpsc::Sender<Incoming>,
}

impl LinkTask {
    /// Runs until the source is dropped: forwards deliveries of `link`, and replaces it
    /// whenever it is lost.
    pub(crate) async fn run(self, mut link: Arc<Link>, mut consumer: Consumer) {
        loop {
            let cause = match self.forward(&link, &mut consumer).await {
                Some(cause) => cause,
                None => {
                    link.close("shutting down", self.config.connect_timeout)
                        .await;
                    {
                        let mut shared = lock(&self.shared);
                        shared.link = None;
                        shared.in_flight = 0;
                    }
                    self.metrics.set_in_flight(0);
                    tracing::debug!("The RabbitMQ source has closed its connection.");
                    return;
                }
            };
            tracing::warn!(error = %cause, generation = link.generation, "The RabbitMQ connection was lost; reconnecting.");
            {
                let mut shared = lock(&self.shared);
                shared.link = None;
                // The broker requeues whatever the lost channel had not seen acknowledged.
                shared.in_flight = 0;
            }
            self.metrics.set_in_flight(0);
            self.health.send_replace(SourceHealth::Reconnecting {
                attempts: 0,
                last_error: cause.clone(),
            });
            // Best effort: the old connection may be half open (a channel error only).
            link.close("replaced after an error", Duration::from_secs(1))
                .await;
            let generation = link.generation + 1;
            let Some((new_link, new_consumer)) = self.reconnect(generation).await else {
                return;
            };
            link = Arc::new(new_link);
            consumer = new_consumer;
            lock(&self.shared).link = Some(Arc::clone(&link));
            self.metrics.reconnected();
            self.health.send_replace(SourceHealth::Connected);
            tracing::info!(generation, "Reconnected to RabbitMQ; consuming again.");
        }
    }

    /// Forwards deliveries until the link is lost (`Some(cause)`) or the source is dropped
    /// (`None`). Waiting for the next delivery or for room to hand one over, it checks the
    /// link every [`LINK_CHECK`], so a loss is noticed while the source is not reading too.
    async fn forward(&self, link: &Link, consumer: &mut Consumer) -> Option<String> {
        let mut check = tokio::time::interval(LINK_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next = tokio::select! {
                () = self.deliveries.closed() => return None,
                next = consumer.next() => next,
                _ = check.tick() => match link.lost() {
                    Some(cause) => return Some(cause.to_owned()),
                    None => continue,
                },
            };
            let delivery = match next {
                Some(Ok(delivery)) => delivery,
                Some(Err(error)) => return Some(error.to_string()),
                // The stream ends without an error when the connection or channel is closed
                // normally, or when the broker cancels the consumer (its queue was deleted).
                None => {
                    return Some(
                        link.lost()
                            .unwrap_or("the broker cancelled the consumer")
                            .to_owned(),
                    );
                }
            };
            // The channel to the source holds as many deliveries as the prefetch; it is full
            // only when deliveries of a lost channel are still queued and the source is not
            // reading. Wait for room, but keep watching the link meanwhile: a delivery given
            // up here is redelivered on the next channel.
            let permit = loop {
                tokio::select! {
                    permit = self.deliveries.reserve() => match permit {
                        Ok(permit) => break permit,
                        Err(_closed) => return None,
                    },
                    _ = check.tick() => {
                        if let Some(cause) = link.lost() {
                            return Some(cause.to_owned());
                        }
                    }
                }
            };
            let in_flight = {
                let mut shared = lock(&self.shared);
                shared.in_flight += 1;
                shared.in_flight
            };
            self.metrics.set_in_flight(in_flight);
            permit.send(Incoming {
                generation: link.generation,
                delivery,
            });
        }
    }

    /// Tries to connect until it succeeds (`Some`) or the source is dropped (`None`),
    /// pausing between attempts.
    async fn reconnect(&self, generation: u64) -> Option<(Link, Consumer)> {
        let mut backoff = Backoff::new(self.config.reconnect_min, self.config.reconnect_max);
        let mut attempts = 0_u32;
        loop {
            attempts = attempts.saturating_add(1);
            let attempt = tokio::select! {
                () = self.deliveries.closed() => return None,
                attempt = establish(&self.config, generation) => attempt,
            };
            match attempt {
                Ok(established) => return Some(established),
                Err(error) => {
                    let pause = backoff.next_pause();
                    let last_error = error_chain(&error);
                    tracing::warn!(attempt = attempts, error = %last_error, pause_ms = pause.as_millis(), "Reconnecting to RabbitMQ failed; trying again after a pause.");
                    self.health.send_replace(SourceHealth::Reconnecting {
                        attempts,
                        last_error,
                    });
                    tokio::select! {
                        () = self.deliveries.closed() => return None,
                        () = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
    }
}

/// An error and its sources, `: `-separated, for a health report on one line.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_up_to_its_cap_with_jitter() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let pauses: Vec<Duration> = (0..8).map(|_| backoff.next_pause()).collect();
        let windows = [100, 200, 400, 800, 1000, 1000, 1000, 1000];
        for (pause, window) in pauses.iter().zip(windows) {
            let window = Duration::from_millis(window);
            assert!(
                *pause >= window / 2 && *pause <= window,
                "{pause:?} in {window:?}"
            );
        }
    }
}
