//! The source seam: where epochs of events come from and where their acknowledgements go.
//!
//! The driver loop asks a [`Source`] for the next batch, submits its events to the dataflow as
//! one epoch, and hands the batch's [`SourceBatch::ack`] back through [`Source::ack`] only
//! when every enabled sink has committed that epoch. A source whose transport redelivers
//! unacknowledged input (RabbitMQ) therefore loses nothing in a crash; one that cannot
//! redeliver (the in-process channel) uses `()` as its token.

use std::future::Future;
use std::time::Duration;

use std::borrow::Cow;

use delivertrack_dataflow::{Event, EventId, EventKind, Rejection};

/// A batch of events read from a source, with the token to acknowledge it once its epoch is
/// committed by every sink.
#[derive(Debug)]
pub struct SourceBatch<A> {
    /// The events, in the order the source received them (the dataflow orders each epoch by
    /// [`Event::apply_order`] itself, so no order is promised here).
    pub events: Vec<Event>,
    /// What [`Source::ack`] needs to acknowledge exactly these events (for RabbitMQ, the
    /// highest delivery tag; for the in-process channel, nothing).
    pub ack: A,
    /// When the batch's first event arrived at the source: the start of its epoch's
    /// latency (first receipt → committed by every sink).
    pub first_received: std::time::Instant,
    /// How long the source spent turning the batch's messages into events (decoding and
    /// validating them); zero for a source that receives events already decoded. The
    /// driver reports it as the `decode` stage of the epoch.
    pub decode_time: Duration,
}

/// When to close an epoch: whichever bound comes first.
///
/// The size bound keeps an epoch's work and memory predictable under load; the time bound
/// keeps latency low when input trickles in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EpochPolicy {
    /// At most this many events per batch. `0` is treated as `1`, so a batch always makes
    /// progress.
    pub max_events: usize,
    /// A batch is returned at the latest this long after its first event arrived at the
    /// source; the clock starts with the first event, not with the call, so an idle source
    /// does not produce empty epochs. [`Duration::MAX`] (see
    /// [`size_bound_only`](Self::size_bound_only)): no time bound.
    pub max_wait: Duration,
}

impl Default for EpochPolicy {
    /// 10 000 events or 100 ms.
    fn default() -> Self {
        Self {
            max_events: 10_000,
            max_wait: Duration::from_millis(100),
        }
    }
}

impl EpochPolicy {
    /// The size bound actually applied: `max_events`, at least 1.
    pub fn batch_limit(&self) -> usize {
        self.max_events.max(1)
    }

    /// The same size bound without a time bound. A driver that cannot take a batch yet
    /// (its commits are behind) asks with this one: the batch being gathered then keeps
    /// growing instead of closing at `max_wait`, and once the driver has room it asks with
    /// the full policy again, which closes the batch at once if its time is up. A backlog
    /// is so absorbed in fewer, larger epochs, each paying a commit's fixed cost once.
    #[must_use]
    pub fn size_bound_only(&self) -> Self {
        Self {
            max_events: self.max_events,
            max_wait: Duration::MAX,
        }
    }

    /// When a batch whose first event arrived at `first` is due by the time bound; `None`
    /// when there is none (`max_wait` reaches beyond what an instant can hold).
    pub fn deadline(&self, first: tokio::time::Instant) -> Option<tokio::time::Instant> {
        first.checked_add(self.max_wait)
    }
}

/// Where batches of events come from.
///
/// `next_batch` is called again only after the previous batch was handed on, and `ack` is
/// called for batches in the order they were returned (batches with no events included),
/// each only after every batch before it was committed. Implementations should make
/// `next_batch` cancel safe (a batch being gathered survives the future being dropped), so
/// that a driver can `select!` it against a shutdown signal, and then close what was being
/// gathered with [`take_gathered`](Source::take_gathered).
pub trait Source: Send {
    /// The token that acknowledges one batch.
    type Ack: Send + 'static;

    /// The next batch (at most `policy.max_events`, returned at the latest `policy.max_wait`
    /// after its first event arrived); waits while nothing arrives. `Ok(None)` when the
    /// source has ended.
    fn next_batch(
        &mut self,
        policy: &EpochPolicy,
    ) -> impl Future<Output = Result<Option<SourceBatch<Self::Ack>>, SourceError>> + Send;

    /// The batch being gathered, closed now instead of at the policy's bounds, without
    /// waiting: for a driver that stops reading, so that what the source already holds is
    /// committed and acknowledged rather than abandoned. Called after the last
    /// `next_batch`, again and again until it returns `None`; each batch keeps to
    /// `policy.max_events`. `None` by default (nothing is held between calls).
    fn take_gathered(&mut self, policy: &EpochPolicy) -> Option<SourceBatch<Self::Ack>> {
        let _ = policy;
        None
    }

    /// Acknowledges a batch after every sink committed its epoch. `rejected` are the batch's
    /// events refused after decoding: by the dataflow in context (an illegal transition, a
    /// stale fix, ...) or by a sink for good ([`Refusal::Sink`], kept out of every store). A
    /// source that dead-letters does so for them before it acknowledges; this is the one
    /// way a refusal reaches the dead-letter queue.
    fn ack(
        &mut self,
        ack: Self::Ack,
        rejected: Vec<Refusal>,
    ) -> impl Future<Output = Result<(), SourceError>> + Send;

    /// Ends the source once the driver is done with it: everything acknowledged so far
    /// reaches the transport before this returns (a broker connection is closed cleanly,
    /// so no acknowledgement is lost to an exiting process). Nothing to do by default.
    fn close(self) -> impl Future<Output = ()> + Send
    where
        Self: Sized,
    {
        async {}
    }
}

/// An event refused after decoding, settled (dead-lettered, counted) with its batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The dataflow refused it against the state it met.
    Dataflow(Rejection),
    /// A sink's store refused it for good; the driver kept its effects out of every store.
    Sink(SinkRefusal),
}

impl From<Rejection> for Refusal {
    fn from(rejection: Rejection) -> Self {
        Refusal::Dataflow(rejection)
    }
}

impl Refusal {
    /// The refused event.
    pub fn event_id(&self) -> EventId {
        match self {
            Refusal::Dataflow(rejection) => rejection.event_id,
            Refusal::Sink(refusal) => refusal.event_id,
        }
    }

    /// Its kind.
    pub fn kind(&self) -> EventKind {
        match self {
            Refusal::Dataflow(rejection) => rejection.kind,
            Refusal::Sink(refusal) => refusal.kind,
        }
    }

    /// The stable reason code: the `reason` label of `delivertrack_events_rejected_total`
    /// and the `delivertrack-reason` header of the dead letter.
    pub fn reason(&self) -> Cow<'static, str> {
        match self {
            Refusal::Dataflow(rejection) => Cow::Borrowed(rejection.reason.code()),
            Refusal::Sink(refusal) => Cow::Owned(refusal.reason()),
        }
    }

    /// Why, in words.
    pub fn detail(&self) -> String {
        match self {
            Refusal::Dataflow(rejection) => rejection.reason.to_string(),
            Refusal::Sink(refusal) => refusal.detail.clone(),
        }
    }
}

/// An event that a sink's store refused for good (a constraint, a value it cannot hold).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SinkRefusal {
    /// The refused event.
    pub event_id: EventId,
    /// Its kind.
    pub kind: EventKind,
    /// The sink that refused it (`postgres`, `mongo`, ...).
    pub sink: &'static str,
    /// The store's own code for the refusal: a SQLSTATE (`23514`), a server error code.
    pub code: String,
    /// The store's message.
    pub detail: String,
}

impl SinkRefusal {
    /// `sink_refused:<sink>:<code>`, e.g. `sink_refused:postgres:22P05`: a bounded set of
    /// values (sinks × store codes), so it is fit for a metric label.
    pub fn reason(&self) -> String {
        format!("sink_refused:{}:{}", self.sink, self.code)
    }
}

/// Why a source (or a sender feeding one) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The other end of an in-process channel is gone: the source was dropped, so nothing
    /// sent now would ever be read. Producers treat this as the signal to stop.
    #[error("the source is closed")]
    Closed,
    /// A setting cannot work (a non-positive speed, ...); fixing the configuration is the
    /// only remedy, so this is not worth a retry.
    #[error("invalid source configuration: {0}")]
    Config(String),
    /// The transport under a source failed (a broker connection or channel). Reconnecting
    /// may help; unacknowledged input comes back on transports that redeliver.
    #[error("the source's transport failed")]
    Transport(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
}
