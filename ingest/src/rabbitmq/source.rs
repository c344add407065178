//! [`RabbitSource`]: the [`Source`] that consumes the ingest queue.
//!
//! ```text
//!  broker ──► link task (link.rs) ──Incoming{generation, delivery}──► RabbitSource::next_batch
//!  (prefetch)   reconnects, redeclares      bounded (prefetch)        decode, gather (batch.rs)
//!                                                                          │ SourceBatch + RabbitAck
//!                                                                          ▼
//!  broker ◄── basic_ack(last tag, multiple) ◄── dead letters confirmed ◄── RabbitSource::ack
//! ```
//!
//! Every delivery, good or bad, lands in exactly one batch's ack range; the batch's token is
//! the channel generation and its highest complete delivery tag. Acknowledging it first
//! publishes the batch's dead letters — decode refusals, and the dataflow's refusals except
//! `stale` — and waits for the broker's confirms, then multiple-acks the tag. So nothing is
//! acknowledged before it is either committed by every sink or safely dead-lettered.
//!
//! At a stop, [`Source::take_gathered`] hands out what the source already holds (the batch
//! being gathered and what the link task had passed on), so that the driver commits and
//! acknowledges the open epoch instead of leaving it to be redelivered.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use chrono::Utc;
use delivertrack_dataflow::EventId;
use delivertrack_dataflow::contract::decode_message;
use lapin::options::BasicAckOptions;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::batch::{Gathering, Taken};
use super::config::RabbitConfig;
use super::dead_letter::{self, DeadLetter, Origin, Wire};
use super::link::{self, Incoming, LinkTask, Shared, SharedState};
use super::metrics::IngestMetrics;
use crate::source::{EpochPolicy, Refusal, Source, SourceBatch, SourceError};

/// Whether the source has a live connection. Watched by `/readyz`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceHealth {
    /// Consuming.
    Connected,
    /// The connection was lost; the source is reconnecting with backoff. `attempts` counts
    /// the failed attempts since the loss (0 right after it), `last_error` is the latest
    /// cause.
    Reconnecting {
        /// Failed attempts since the loss.
        attempts: u32,
        /// The loss or the latest failed attempt, on one line.
        last_error: String,
    },
}

/// The acknowledgement of one batch: the channel generation and the highest delivery tag
/// it completes, with the dead letters to publish first and the origin of each event (so
/// that an event the dataflow refuses can be dead-lettered in its wire form).
#[derive(Debug)]
pub struct RabbitAck {
    generation: u64,
    last_tag: Option<u64>,
    deliveries: usize,
    dead_letters: Vec<DeadLetter>,
    origins: Vec<(EventId, Origin)>,
}

impl RabbitAck {
    /// The channel generation the batch was delivered on (1 for the first connection).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// How many deliveries this token acknowledges.
    pub fn deliveries(&self) -> usize {
        self.deliveries
    }
}

/// The RabbitMQ source. See the [module](self) documentation.
pub struct RabbitSource {
    config: RabbitConfig,
    metrics: IngestMetrics,
    /// Deliveries from the link task; bounded by the prefetch.
    incoming: mpsc::Receiver<Incoming>,
    /// Reused by `recv_many`; always empty between calls, so cancelling loses nothing.
    buffer: Vec<Incoming>,
    shared: SharedState,
    health: watch::Receiver<SourceHealth>,
    /// The batch being gathered; kept here, not in the `next_batch` future, for cancel
    /// safety.
    gathering: Gathering,
    /// When the batch being gathered began: its first delivery, or the hand-out of the
    /// previous batch when that left part of a message behind. Its deadline is this plus
    /// the policy's `max_wait` of the call that is running (none in a call without a time
    /// bound: the driver cannot take the batch yet, so it keeps growing).
    started: Option<Instant>,
    /// Time spent decoding the deliveries of the batch being gathered
    /// ([`SourceBatch::decode_time`]).
    decoding: std::time::Duration,
    /// Whether a stop has already taken what the link task had handed over
    /// ([`Source::take_gathered`]); it is taken once, so that a stop ends.
    stop_taken: bool,
    task: JoinHandle<()>,
}

impl fmt::Debug for RabbitSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitSource")
            .field("url", &self.config.redacted_url())
            .field("queue", &self.config.queue)
            .field("health", &*self.health.borrow())
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

impl RabbitSource {
    /// Connects, declares the topology idempotently and starts consuming. An unreachable
    /// broker at start is an error naming it (ARCHITECTURE rule 8); later drops are healed
    /// by reconnecting.
    ///
    /// # Errors
    /// [`SourceError::Config`] for settings no retry can fix; [`SourceError::Transport`]
    /// (with a [`ConnectError`](super::ConnectError) naming the broker) when the broker
    /// cannot be reached or refuses the topology.
    pub async fn connect(
        config: RabbitConfig,
        metrics: IngestMetrics,
    ) -> Result<Self, SourceError> {
        config.validate()?;
        let (link, consumer) = link::establish(&config, 1)
            .await
            .map_err(|error| SourceError::Transport(Box::new(error)))?;
        let link = Arc::new(link);
        tracing::info!(url = %config.redacted_url(), queue = %config.queue, prefetch = config.prefetch, "Consuming from RabbitMQ.");
        let shared: SharedState = Arc::new(Mutex::new(Shared {
            link: Some(Arc::clone(&link)),
            in_flight: 0,
        }));
        metrics.set_in_flight(0);
        let (health_tx, health) = watch::channel(SourceHealth::Connected);
        let (tx, incoming) = mpsc::channel(usize::from(config.prefetch));
        let task = LinkTask {
            config: config.clone(),
            metrics: metrics.clone(),
            shared: Arc::clone(&shared),
            health: health_tx,
            deliveries: tx,
        };
        let task = tokio::spawn(task.run(link, consumer));
        Ok(Self {
            config,
            metrics,
            incoming,
            buffer: Vec::new(),
            shared,
            health,
            gathering: Gathering::default(),
            started: None,
            decoding: std::time::Duration::ZERO,
            stop_taken: false,
            task,
        })
    }

    /// Watches the connection's health (for `/readyz`).
    pub fn health(&self) -> watch::Receiver<SourceHealth> {
        self.health.clone()
    }

    /// Deliveries received and not yet acknowledged (for tests and the in-flight gauge).
    pub fn in_flight(&self) -> usize {
        link::lock(&self.shared).in_flight
    }

    /// Stops consuming and closes the connection cleanly. Deliveries not acknowledged by
    /// then are requeued by the broker. Dropping the source does the same in the
    /// background.
    pub async fn close(self) {
        let Self {
            incoming,
            task,
            config,
            ..
        } = self;
        drop(incoming);
        // The task closes the connection within the connect timeout; give it a margin.
        let limit = config.connect_timeout + config.connect_timeout;
        if tokio::time::timeout(limit, task).await.is_err() {
            tracing::warn!("The RabbitMQ connection did not close in time.");
        }
    }

    /// Decodes one delivery into the batch being gathered.
    fn receive(&mut self, incoming: Incoming) {
        let Incoming {
            generation,
            delivery,
        } = incoming;
        if generation < self.gathering.generation() || generation < self.current_generation() {
            // Delivered on a channel that is gone (queued for this source before the loss
            // was noticed); the broker redelivers it on the current one. Handing it out
            // would only make the pipeline do it twice.
            return;
        }
        if generation > self.gathering.generation() {
            self.gathering.reset(generation);
            self.started = None;
            self.decoding = std::time::Duration::ZERO;
        }
        self.metrics.message_received();
        let decoding = Instant::now();
        // Refusals are counted once, when their delivery is acknowledged (`ack`), so that
        // a delivery that comes back is not counted twice.
        let routing_key = delivery.routing_key.to_string();
        let payload = delivery.data;
        let decoded = decode_message(
            Some(&routing_key),
            &payload,
            Utc::now().timestamp_millis(),
            &self.config.limits,
        );
        for event in &decoded.events {
            self.metrics.event_ingested(event.kind().as_str());
        }
        for error in &decoded.errors {
            tracing::debug!(%error, routing_key, "An event was refused at decoding and will be dead-lettered.");
        }
        let dead_letters = if decoded.errors.is_empty() {
            Vec::new()
        } else {
            DeadLetter::decoded(&routing_key, &payload, &decoded.errors)
        };
        let is_array = payload
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|b| *b == b'[');
        let wire = Arc::new(Wire {
            routing_key,
            payload,
        });
        let events = if is_array {
            // The good events are the elements without an error, in order.
            let refused: std::collections::BTreeSet<usize> =
                decoded.errors.iter().filter_map(|e| e.index).collect();
            let indices = (0..).filter(|i| !refused.contains(i));
            decoded
                .events
                .into_iter()
                .zip(indices)
                .map(|(event, index)| {
                    let origin = Origin {
                        wire: Arc::clone(&wire),
                        index: Some(index),
                    };
                    (event, origin)
                })
                .collect()
        } else {
            decoded
                .events
                .into_iter()
                .map(|event| {
                    let origin = Origin {
                        wire: Arc::clone(&wire),
                        index: None,
                    };
                    (event, origin)
                })
                .collect()
        };
        if self.gathering.is_empty() {
            self.started = Some(Instant::now());
        }
        self.gathering
            .push(delivery.delivery_tag, events, dead_letters);
        self.decoding += decoding.elapsed();
    }

    /// Is the batch being gathered due, by size or because it cannot grow any more?
    fn is_full(&self, policy: &EpochPolicy) -> bool {
        self.gathering.event_count() >= policy.batch_limit()
            // The broker sends no more than the prefetch unacknowledged.
            || self.gathering.delivery_count() >= usize::from(self.config.prefetch)
    }

    fn take(&mut self, policy: &EpochPolicy) -> SourceBatch<RabbitAck> {
        let Taken {
            generation,
            events,
            origins,
            last_tag,
            deliveries,
            dead_letters,
        } = self.gathering.take(policy.batch_limit());
        let first_received = self
            .started
            .map_or_else(std::time::Instant::now, Instant::into_std);
        // What is left (the rest of a split message) starts the next batch's clock.
        self.started = (!self.gathering.is_empty()).then(Instant::now);
        SourceBatch {
            first_received,
            // A message split across batches counts in the first.
            decode_time: std::mem::take(&mut self.decoding),
            events,
            ack: RabbitAck {
                generation,
                last_tag,
                deliveries,
                dead_letters,
                origins,
            },
        }
    }

    async fn gather(
        &mut self,
        policy: &EpochPolicy,
    ) -> Result<SourceBatch<RabbitAck>, SourceError> {
        /// Deliveries taken from the link task at once.
        const RECEIVE_AT_ONCE: usize = 256;
        loop {
            let current = self.current_generation();
            if current > self.gathering.generation() {
                // What was gathered came on a channel that is gone: the broker redelivers it
                // on the current one.
                self.gathering.reset(current);
                self.started = None;
                self.decoding = std::time::Duration::ZERO;
            }
            let deadline = match self.started {
                Some(started) if !self.gathering.is_empty() => {
                    // None: a call without a time bound, made while the driver cannot take
                    // a batch; the batch grows until it is full or the driver asks again.
                    let deadline = policy.deadline(started);
                    if self.is_full(policy) || deadline.is_some_and(|due| Instant::now() >= due) {
                        return Ok(self.take(policy));
                    }
                    deadline
                }
                _ => None,
            };
            let received = match deadline {
                Some(deadline) => tokio::select! {
                    biased;
                    n = self.incoming.recv_many(&mut self.buffer, RECEIVE_AT_ONCE) => n,
                    () = tokio::time::sleep_until(deadline) => return Ok(self.take(policy)),
                },
                // Idle, or growing: wait without a deadline; an idle source makes no epochs.
                None => {
                    self.incoming
                        .recv_many(&mut self.buffer, RECEIVE_AT_ONCE)
                        .await
                }
            };
            if received == 0 {
                // The link task ends only when this source drops its receiver; if it is gone
                // otherwise, nothing can be received again.
                return Err(SourceError::Transport(
                    "the RabbitMQ connection task ended".into(),
                ));
            }
            let mut buffer = std::mem::take(&mut self.buffer);
            for incoming in buffer.drain(..) {
                self.receive(incoming);
            }
            self.buffer = buffer;
        }
    }

    /// Counts the refusals of a settled batch, each once.
    fn count_refusals(&self, reasons: &[Cow<'static, str>]) {
        for reason in reasons {
            self.metrics.event_rejected(reason);
        }
    }

    /// The generation of the current link; 0 while reconnecting.
    fn current_generation(&self) -> u64 {
        link::lock(&self.shared)
            .link
            .as_ref()
            .map_or(0, |link| link.generation)
    }

    /// The link of `generation`, if it is still the current one.
    fn current_link(&self, generation: u64) -> Option<Arc<link::Link>> {
        link::lock(&self.shared)
            .link
            .as_ref()
            .filter(|link| link.generation == generation)
            .map(Arc::clone)
    }
}

impl Source for RabbitSource {
    type Ack = RabbitAck;

    /// Waits for deliveries, decodes them and returns a batch by the policy's bounds. Keeps
    /// waiting through reconnections. Cancel safe.
    async fn next_batch(
        &mut self,
        policy: &EpochPolicy,
    ) -> Result<Option<SourceBatch<RabbitAck>>, SourceError> {
        self.gather(policy).await.map(Some)
    }

    /// At a stop: first takes in what the link task has already handed over (once, at most
    /// the prefetch), then hands out the batch being gathered, split by the size bound,
    /// until nothing is left. Deliveries the broker sends after that are not read; they
    /// are requeued when the connection closes.
    fn take_gathered(&mut self, policy: &EpochPolicy) -> Option<SourceBatch<RabbitAck>> {
        if !self.stop_taken {
            self.stop_taken = true;
            for _ in 0..usize::from(self.config.prefetch) {
                match self.incoming.try_recv() {
                    Ok(incoming) => self.receive(incoming),
                    Err(_) => break,
                }
            }
        }
        (!self.gathering.is_empty()).then(|| self.take(policy))
    }

    /// Dead-letters the batch's refusals (decode refusals, and `rejected` except `stale`:
    /// the dataflow's and the sinks' refusals),
    /// waits for the broker's confirms, then multiple-acks the batch's last delivery tag and
    /// counts the refusals. A token of a replaced channel is dropped: its deliveries come
    /// back (and are counted then). Failures of the connection are logged and healed by
    /// reconnecting, never returned.
    async fn ack(&mut self, ack: RabbitAck, rejected: Vec<Refusal>) -> Result<(), SourceError> {
        let RabbitAck {
            generation,
            last_tag,
            deliveries,
            mut dead_letters,
            origins,
        } = ack;
        let Some(link) = self.current_link(generation) else {
            tracing::debug!(
                generation,
                deliveries,
                "An acknowledgement of a replaced channel is dropped; its deliveries are redelivered."
            );
            return Ok(());
        };
        // Every refusal of the batch, by reason code: counted once the batch is settled.
        let refusals: Vec<Cow<'static, str>> = dead_letters
            .iter()
            .map(|letter| letter.reason.clone())
            .chain(rejected.iter().map(Refusal::reason))
            .collect();
        if !rejected.is_empty() {
            let origins: HashMap<EventId, &Origin> =
                origins.iter().map(|(id, origin)| (*id, origin)).collect();
            for rejection in &rejected {
                if dead_letter::is_dead_lettered(rejection) {
                    let origin = origins.get(&rejection.event_id()).copied();
                    dead_letters.push(DeadLetter::refused(rejection, origin));
                }
            }
        }
        if let Err(error) = dead_letter::publish(
            &link.publish,
            &self.config.dead_letter_exchange,
            &dead_letters,
            &self.metrics,
            self.config.confirm_timeout,
        )
        .await
        {
            // Not acknowledging on a live channel would strand the deliveries until the
            // channel closes, so replace the connection: the broker then redelivers them.
            tracing::warn!(error = %link::error_chain(&error), "Dead letters could not be published; reconnecting so that their deliveries come back.");
            link.close("dead-lettering failed", self.config.confirm_timeout)
                .await;
            return Ok(());
        }
        if !dead_letters.is_empty() {
            // One line per epoch, never one per event: the reasons with their counts and
            // the first one's detail; each event's own reason is in its headers.
            let mut reasons: std::collections::BTreeMap<&str, usize> =
                std::collections::BTreeMap::new();
            for letter in &dead_letters {
                *reasons.entry(&letter.reason).or_default() += 1;
            }
            tracing::warn!(
                dead_lettered = dead_letters.len(),
                reasons = ?reasons,
                first = %dead_letters[0].detail(),
                exchange = %self.config.dead_letter_exchange,
                "Refused events were dead-lettered with their reasons."
            );
        }
        let Some(tag) = last_tag else {
            // Only part of a message: nothing to acknowledge yet, and its refusals (a stale
            // fix) are settled all the same.
            self.count_refusals(&refusals);
            return Ok(());
        };
        let acked = tokio::time::timeout(
            self.config.confirm_timeout,
            link.consume
                .basic_ack(tag, BasicAckOptions { multiple: true }),
        )
        .await;
        match acked {
            Ok(Ok(())) => {
                let in_flight = {
                    let mut shared = link::lock(&self.shared);
                    if shared
                        .link
                        .as_ref()
                        .is_some_and(|current| current.generation == generation)
                    {
                        shared.in_flight = shared.in_flight.saturating_sub(deliveries);
                    }
                    shared.in_flight
                };
                self.metrics.set_in_flight(in_flight);
                self.count_refusals(&refusals);
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, generation, "An acknowledgement failed; the channel is being replaced and its deliveries come back.");
            }
            Err(_elapsed) => {
                tracing::warn!(generation, "An acknowledgement timed out; reconnecting.");
                link.close("acknowledgement timed out", self.config.confirm_timeout)
                    .await;
            }
        }
        Ok(())
    }

    async fn close(self) {
        RabbitSource::close(self).await;
    }
}
