//! An in-process source: a bounded channel of already validated events.
//!
//! `delivertrack demo` and the tests feed the dataflow through it, without a broker. The
//! channel is bounded, so a producer that outruns the dataflow waits in
//! [`InProcessSender::send`] instead of growing memory (ARCHITECTURE rule 6). Nothing can be
//! redelivered, so the acknowledgement token is `()`. Given [`IngestMetrics`]
//! ([`InProcessSource::counted_in`]), it counts what it hands on and what the pipeline
//! refused, as the RabbitMQ source does, so that `demo` reports refusals as `run` does.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{Instant, timeout_at};

use delivertrack_dataflow::Event;

use crate::rabbitmq::IngestMetrics;
use crate::source::{EpochPolicy, Refusal, Source, SourceBatch, SourceError};

/// Creates a connected sender and source. `capacity` bounds the events in flight between
/// them (`0` is treated as `1`, the smallest channel tokio allows).
pub fn in_process(capacity: usize) -> (InProcessSender, InProcessSource) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (
        InProcessSender { tx },
        InProcessSource {
            rx,
            pending: Vec::new(),
            first: None,
            metrics: IngestMetrics::unregistered(),
        },
    )
}

/// The producing half of [`in_process`]. Clone it for every producer; the source ends once
/// all clones are dropped.
#[derive(Clone, Debug)]
pub struct InProcessSender {
    tx: mpsc::Sender<Event>,
}

impl InProcessSender {
    /// Sends one event, waiting while the channel is full (backpressure).
    ///
    /// # Errors
    /// [`SourceError::Closed`] when the source was dropped.
    pub async fn send(&self, event: Event) -> Result<(), SourceError> {
        self.tx.send(event).await.map_err(|_| SourceError::Closed)
    }

    /// Sends events in order, waiting while the channel is full. When the source is dropped
    /// part-way, the events not yet sent are discarded.
    ///
    /// # Errors
    /// [`SourceError::Closed`] when the source was dropped.
    pub async fn send_batch(
        &self,
        events: impl IntoIterator<Item = Event>,
    ) -> Result<(), SourceError> {
        for event in events {
            self.send(event).await?;
        }
        Ok(())
    }

    /// Resolves once the source is dropped, so that a producer can stop even while it has
    /// nothing to send.
    pub async fn closed(&self) {
        self.tx.closed().await;
    }

    /// Has the source been dropped?
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// The consuming half of [`in_process`]: a [`Source`] whose batches need no acknowledgement.
///
/// [`next_batch`](Source::next_batch) is cancel safe: the batch being gathered, and the
/// arrival of its first event, are kept in the source when the future is dropped and
/// the next call continues it.
#[derive(Debug)]
pub struct InProcessSource {
    rx: mpsc::Receiver<Event>,
    /// Events of the batch being gathered; kept here rather than in the future so that
    /// dropping the future loses nothing.
    pending: Vec<Event>,
    /// When the first event of the batch being gathered arrived: its time bound counts
    /// from here, by the policy of the call that is running.
    first: Option<Instant>,
    /// `delivertrack_events_ingested_total{kind}` (each event handed on) and
    /// `delivertrack_events_rejected_total{reason}` (each refusal acknowledged); counted
    /// nowhere unless [`counted_in`](Self::counted_in) was called.
    metrics: IngestMetrics,
}

impl InProcessSource {
    /// Counts the events this source hands on, by kind, and the refusals it is
    /// acknowledged with (the dataflow's, the sinks'), by reason, in `metrics`: the
    /// counters `run`'s RabbitMQ source keeps. An in-process event needs no decoding, so
    /// refusals are the pipeline's only.
    #[must_use]
    pub fn counted_in(mut self, metrics: IngestMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    fn count_handed_on(&self, events: &[Event]) {
        for event in events {
            self.metrics.event_ingested(event.kind().as_str());
        }
    }
    async fn gather(&mut self, policy: &EpochPolicy) -> Option<SourceBatch<()>> {
        let limit = policy.batch_limit();
        if self.pending.is_empty() {
            // Wait, without a deadline, for the first event: an idle source makes no epochs.
            if self.rx.recv_many(&mut self.pending, limit).await == 0 {
                return None;
            }
            self.first = Some(Instant::now());
        }
        let first = *self.first.get_or_insert_with(Instant::now);
        // From the first event and this call's policy: a call without a time bound (the
        // driver cannot take the batch yet) lets the batch grow to its size bound.
        let deadline = policy.deadline(first);
        while self.pending.len() < limit {
            let room = limit - self.pending.len();
            let received = self.rx.recv_many(&mut self.pending, room);
            let received = match deadline {
                Some(deadline) => match timeout_at(deadline, received).await {
                    Ok(received) => received,
                    Err(_elapsed) => break,
                },
                None => received.await,
            };
            if received == 0 {
                // Every sender is gone: return what is left; the next call ends the source.
                break;
            }
        }
        let events = if self.pending.len() > limit {
            // Only after a cancelled call with a larger policy: the rest keeps its clock.
            let rest = self.pending.split_off(limit);
            std::mem::replace(&mut self.pending, rest)
        } else {
            self.first = None;
            std::mem::take(&mut self.pending)
        };
        Some(SourceBatch {
            events,
            ack: (),
            first_received: first.into_std(),
            decode_time: Duration::ZERO,
        })
    }
}

impl Source for InProcessSource {
    type Ack = ();

    async fn next_batch(
        &mut self,
        policy: &EpochPolicy,
    ) -> Result<Option<SourceBatch<()>>, SourceError> {
        let batch = self.gather(policy).await;
        if let Some(batch) = &batch {
            self.count_handed_on(&batch.events);
        }
        Ok(batch)
    }

    /// Nothing to acknowledge; counts the refusals, once each, as the RabbitMQ source does
    /// when it acknowledges.
    async fn ack(&mut self, _ack: (), rejected: Vec<Refusal>) -> Result<(), SourceError> {
        for refusal in &rejected {
            self.metrics.event_rejected(&refusal.reason());
        }
        Ok(())
    }

    /// The events of the batch being gathered (kept by a cancelled `next_batch`), at most
    /// `policy.max_events` at a time. What is still in the channel stays there: the
    /// producers are stopping too.
    fn take_gathered(&mut self, policy: &EpochPolicy) -> Option<SourceBatch<()>> {
        if self.pending.is_empty() {
            return None;
        }
        let limit = policy.batch_limit();
        let events = if self.pending.len() > limit {
            let rest = self.pending.split_off(limit);
            std::mem::replace(&mut self.pending, rest)
        } else {
            std::mem::take(&mut self.pending)
        };
        let first_received = self
            .first
            .map_or_else(std::time::Instant::now, Instant::into_std);
        if self.pending.is_empty() {
            self.first = None;
        }
        self.count_handed_on(&events);
        Some(SourceBatch {
            events,
            ack: (),
            first_received,
            decode_time: Duration::ZERO,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::Duration;

    use delivertrack_dataflow::event::{EventBody, ZoneDeleted};
    use delivertrack_dataflow::ids::{EventId, ZoneId};
    use uuid::Uuid;

    use super::*;

    fn event(n: u64) -> Event {
        Event {
            event_id: EventId(Uuid::from_u64_pair(0, n)),
            occurred_at: n as i64,
            body: EventBody::ZoneDeleted(ZoneDeleted {
                zone_id: ZoneId(Uuid::from_u64_pair(1, n)),
            }),
        }
    }

    fn ids(batch: &SourceBatch<()>) -> Vec<i64> {
        batch.events.iter().map(|e| e.occurred_at).collect()
    }

    fn policy(max_events: usize, max_wait_ms: u64) -> EpochPolicy {
        EpochPolicy {
            max_events,
            max_wait: Duration::from_millis(max_wait_ms),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_is_returned_at_once_without_waiting() {
        let (tx, mut source) = in_process(64);
        tx.send_batch((0..25).map(event)).await.unwrap();
        let start = Instant::now();
        let policy = policy(10, 100);

        let first = source.next_batch(&policy).await.unwrap().unwrap();
        let second = source.next_batch(&policy).await.unwrap().unwrap();
        assert_eq!(ids(&first), (0..10).collect::<Vec<_>>());
        assert_eq!(ids(&second), (10..20).collect::<Vec<_>>());
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "full batches must not wait"
        );

        // Five are left and the sender is alive: the time bound closes the batch.
        let third = source.next_batch(&policy).await.unwrap().unwrap();
        assert_eq!(ids(&third), (20..25).collect::<Vec<_>>());
        assert_eq!(start.elapsed(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn the_time_bound_counts_from_the_first_event() {
        let (tx, mut source) = in_process(64);
        let start = Instant::now();
        let producer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            tx.send(event(1)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(60)).await;
            tx.send(event(2)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(60)).await;
            tx.send(event(3)).await.unwrap();
        });

        let policy = policy(100, 100);
        let first = source.next_batch(&policy).await.unwrap().unwrap();
        // Waited 5 s idle for the first event, then at most 100 ms more.
        assert_eq!(ids(&first), vec![1, 2]);
        assert_eq!(start.elapsed(), Duration::from_millis(5_100));

        let second = source.next_batch(&policy).await.unwrap().unwrap();
        assert_eq!(ids(&second), vec![3]);
        producer.await.unwrap();
        // The sender is gone now: the source ends.
        assert!(source.next_batch(&policy).await.unwrap().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn the_source_ends_after_returning_what_is_left() {
        let (tx, mut source) = in_process(8);
        let other = tx.clone();
        tx.send_batch((0..3).map(event)).await.unwrap();
        other.send(event(3)).await.unwrap();
        drop(tx);
        drop(other);
        let start = Instant::now();
        let policy = policy(100, 1_000);

        let last = source.next_batch(&policy).await.unwrap().unwrap();
        assert_eq!(ids(&last), vec![0, 1, 2, 3]);
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "an ended source must not wait"
        );
        assert!(source.next_batch(&policy).await.unwrap().is_none());
        assert!(source.next_batch(&policy).await.unwrap().is_none());
        source.ack((), Vec::new()).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_call_loses_nothing_and_keeps_its_deadline() {
        let (tx, mut source) = in_process(8);
        tx.send(event(1)).await.unwrap();
        let start = Instant::now();
        let policy = policy(10, 100);

        let cancelled =
            tokio::time::timeout(Duration::from_millis(40), source.next_batch(&policy)).await;
        assert!(cancelled.is_err(), "the batch is not due yet");
        tx.send(event(2)).await.unwrap();

        let batch = source.next_batch(&policy).await.unwrap().unwrap();
        assert_eq!(ids(&batch), vec![1, 2]);
        assert_eq!(start.elapsed(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn without_its_time_bound_a_batch_grows_and_closes_once_asked_with_it() {
        let (tx, mut source) = in_process(64);
        let policy = policy(10, 100);
        tx.send_batch((0..3).map(event)).await.unwrap();
        let start = Instant::now();
        // The driver cannot take a batch yet: the open one outlives its time bound.
        let held = tokio::time::timeout(
            Duration::from_millis(500),
            source.next_batch(&policy.size_bound_only()),
        )
        .await;
        assert!(held.is_err(), "only the size bound closes it");
        tx.send_batch((3..5).map(event)).await.unwrap();
        // Room again: its time is long up, so it closes at once, with all it gathered.
        let grown = source.next_batch(&policy).await.unwrap().unwrap();
        assert_eq!(ids(&grown), (0..5).collect::<Vec<_>>());
        assert_eq!(start.elapsed(), Duration::from_millis(500));
        // The size bound holds without the time bound.
        tx.send_batch((5..17).map(event)).await.unwrap();
        let full = source
            .next_batch(&policy.size_bound_only())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ids(&full), (5..15).collect::<Vec<_>>());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_takes_the_batch_being_gathered_without_waiting() {
        let (tx, mut source) = in_process(8);
        let policy = policy(2, 10_000);
        assert!(source.take_gathered(&policy).is_none(), "nothing gathered");
        tx.send_batch((0..3).map(event)).await.unwrap();
        let full = source.next_batch(&policy).await.unwrap().unwrap();
        assert_eq!(ids(&full), vec![0, 1]);
        // The third is being gathered when the driver stops reading.
        let open =
            tokio::time::timeout(Duration::from_millis(40), source.next_batch(&policy)).await;
        assert!(open.is_err(), "the batch is not due for 10 s");
        let start = Instant::now();
        let last = source.take_gathered(&policy).expect("the open batch");
        assert_eq!(ids(&last), vec![2]);
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert!(source.take_gathered(&policy).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_are_counted_when_acknowledged_and_events_when_handed_on() {
        use delivertrack_dataflow::{RejectReason, Rejection};

        let metrics = IngestMetrics::unregistered();
        let (tx, source) = in_process(8);
        let mut source = source.counted_in(metrics.clone());
        tx.send_batch((0..3).map(event)).await.unwrap();
        let batch = source.next_batch(&policy(10, 10)).await.unwrap().unwrap();
        assert_eq!(metrics.events_ingested("zone.deleted"), 3);

        let refusal = |reason| {
            Refusal::Dataflow(Rejection {
                event_id: batch.events[0].event_id,
                kind: batch.events[0].kind(),
                reason,
            })
        };
        assert_eq!(metrics.events_rejected("illegal_transition"), 0);
        source
            .ack(
                (),
                vec![
                    refusal(RejectReason::Stale),
                    refusal(RejectReason::UnknownDelivery),
                    refusal(RejectReason::UnknownDelivery),
                ],
            )
            .await
            .unwrap();
        assert_eq!(metrics.events_rejected("stale"), 1);
        assert_eq!(metrics.events_rejected("unknown_delivery"), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_size_bound_still_makes_progress() {
        let (tx, mut source) = in_process(0);
        let producer = tokio::spawn(async move { tx.send_batch((0..3).map(event)).await });
        let policy = policy(0, 100);
        let mut seen = Vec::new();
        while let Some(batch) = source.next_batch(&policy).await.unwrap() {
            assert_eq!(batch.events.len(), 1);
            seen.extend(ids(&batch));
        }
        assert_eq!(seen, vec![0, 1, 2]);
        producer.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_channel_holds_the_sender_back_and_a_dropped_source_stops_it() {
        let (tx, source) = in_process(2);
        tx.send_batch((0..2).map(event)).await.unwrap();
        let blocked = tokio::time::timeout(Duration::from_secs(1), tx.send(event(2))).await;
        assert!(blocked.is_err(), "a full channel must make the sender wait");

        assert!(!tx.is_closed());
        drop(source);
        tx.closed().await;
        assert!(matches!(tx.send(event(3)).await, Err(SourceError::Closed)));
    }
}
