//! Gathering deliveries into batches, in delivery-tag order.
//!
//! A batch is acknowledged with one multiple-ack of its highest delivery tag, which also
//! acknowledges every lower tag. So a batch must cover a *prefix* of the deliveries not yet
//! covered: every delivery, good or bad, belongs to exactly one batch's ack range, in
//! order. A message whose events do not fit into the batch's size bound is split: its
//! first events go into this batch, the rest into the next, and the delivery is
//! acknowledged with the batch that holds its last event.
//!
//! This module is pure bookkeeping (no I/O), so its rules are unit-tested here.

use std::collections::VecDeque;

use delivertrack_dataflow::{Event, EventId};

use super::dead_letter::{DeadLetter, Origin};

/// A delivery received and not yet put into a batch's ack range.
#[derive(Debug)]
struct Pending {
    tag: u64,
    /// Its events still waiting in [`Gathering::events`].
    remaining: usize,
    /// Its refused events, published before its batch is acknowledged.
    dead_letters: Vec<DeadLetter>,
}

/// The deliveries of one channel generation that no batch has covered yet.
#[derive(Debug, Default)]
pub(crate) struct Gathering {
    /// The channel generation they were delivered on.
    generation: u64,
    /// Events not yet handed out, in delivery order.
    events: VecDeque<(Event, Origin)>,
    /// Deliveries not yet covered, in tag order.
    deliveries: VecDeque<Pending>,
}

/// What one batch takes out of a [`Gathering`].
#[derive(Debug, Default)]
pub(crate) struct Taken {
    pub generation: u64,
    pub events: Vec<Event>,
    /// Where each event came from, for dead-lettering refusals of the dataflow.
    pub origins: Vec<(EventId, Origin)>,
    /// The highest tag whose delivery is complete in this batch; `None` when the batch holds
    /// only part of one delivery.
    pub last_tag: Option<u64>,
    /// How many deliveries `last_tag` acknowledges.
    pub deliveries: usize,
    /// The decode refusals of those deliveries.
    pub dead_letters: Vec<DeadLetter>,
}

impl Gathering {
    /// The generation of what is gathered.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// Forgets everything and starts gathering for `generation`: the old channel is gone,
    /// and the broker redelivers what it had not seen acknowledged.
    pub(crate) fn reset(&mut self, generation: u64) {
        self.generation = generation;
        self.events.clear();
        self.deliveries.clear();
    }

    /// No delivery is waiting.
    pub(crate) fn is_empty(&self) -> bool {
        self.deliveries.is_empty()
    }

    /// Events waiting.
    pub(crate) fn event_count(&self) -> usize {
        self.events.len()
    }

    /// Deliveries waiting.
    pub(crate) fn delivery_count(&self) -> usize {
        self.deliveries.len()
    }

    /// Adds one delivery (of the current generation) with its valid events and its
    /// refusals.
    pub(crate) fn push(
        &mut self,
        tag: u64,
        events: Vec<(Event, Origin)>,
        dead_letters: Vec<DeadLetter>,
    ) {
        self.deliveries.push_back(Pending {
            tag,
            remaining: events.len(),
            dead_letters,
        });
        self.events.extend(events);
    }

    /// Takes at most `limit` events (at least one when any is waiting) and every delivery
    /// that is complete once they are taken, in tag order.
    pub(crate) fn take(&mut self, limit: usize) -> Taken {
        let count = self.events.len().min(limit.max(1));
        let mut taken = Taken {
            generation: self.generation,
            events: Vec::with_capacity(count),
            origins: Vec::with_capacity(count),
            ..Taken::default()
        };
        for (event, origin) in self.events.drain(..count) {
            taken.origins.push((event.event_id, origin));
            taken.events.push(event);
        }
        let mut left = count;
        while let Some(front) = self.deliveries.front_mut() {
            let share = front.remaining.min(left);
            front.remaining -= share;
            left -= share;
            if front.remaining > 0 {
                break;
            }
            if let Some(done) = self.deliveries.pop_front() {
                taken.last_tag = Some(done.tag);
                taken.deliveries += 1;
                taken.dead_letters.extend(done.dead_letters);
            }
        }
        taken
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::Arc;

    use delivertrack_dataflow::event::{EventBody, ZoneDeleted};
    use delivertrack_dataflow::ids::ZoneId;
    use uuid::Uuid;

    use super::super::dead_letter::Wire;
    use super::*;

    fn events(from: u64, n: u64) -> Vec<(Event, Origin)> {
        let wire = Arc::new(Wire {
            routing_key: "zone.deleted".into(),
            payload: Vec::new(),
        });
        (from..from + n)
            .map(|i| {
                let event = Event {
                    event_id: EventId(Uuid::from_u64_pair(0, i)),
                    occurred_at: 0,
                    body: EventBody::ZoneDeleted(ZoneDeleted {
                        zone_id: ZoneId(Uuid::from_u64_pair(1, i)),
                    }),
                };
                let origin = Origin {
                    wire: Arc::clone(&wire),
                    index: Some(usize::try_from(i - from).unwrap()),
                };
                (event, origin)
            })
            .collect()
    }

    fn bad() -> Vec<DeadLetter> {
        DeadLetter::decoded(
            "zone.deleted",
            b"nope",
            &delivertrack_dataflow::contract::decode_message(None, b"nope", 0, &Default::default())
                .errors,
        )
    }

    #[test]
    fn a_batch_covers_a_prefix_of_the_tags_and_splits_a_large_message() {
        let mut g = Gathering::default();
        g.reset(7);
        g.push(1, events(0, 2), Vec::new());
        g.push(2, events(2, 5), Vec::new());
        g.push(3, Vec::new(), bad());
        g.push(4, events(7, 1), Vec::new());

        // 4 events: delivery 1 is complete, delivery 2 is not.
        let first = g.take(4);
        assert_eq!(first.generation, 7);
        assert_eq!(first.events.len(), 4);
        assert_eq!((first.last_tag, first.deliveries), (Some(1), 1));
        assert!(first.dead_letters.is_empty());

        // 2 more: still inside delivery 2; nothing may be acknowledged.
        let second = g.take(2);
        assert_eq!(second.events.len(), 2);
        assert_eq!((second.last_tag, second.deliveries), (None, 0));

        // The rest: delivery 2 ends, the all-bad delivery 3 follows, then 4.
        let third = g.take(10);
        assert_eq!(third.events.len(), 2);
        assert_eq!((third.last_tag, third.deliveries), (Some(4), 3));
        assert_eq!(third.dead_letters.len(), 1);
        assert!(g.is_empty());
    }

    #[test]
    fn bad_only_deliveries_are_covered_without_events() {
        let mut g = Gathering::default();
        g.push(5, Vec::new(), bad());
        g.push(6, Vec::new(), bad());
        assert_eq!(g.delivery_count(), 2);
        assert_eq!(g.event_count(), 0);
        let taken = g.take(10);
        assert!(taken.events.is_empty());
        assert_eq!((taken.last_tag, taken.deliveries), (Some(6), 2));
        assert_eq!(taken.dead_letters.len(), 2);
    }

    #[test]
    fn a_reset_forgets_the_old_generation() {
        let mut g = Gathering::default();
        g.push(1, events(0, 3), Vec::new());
        g.reset(2);
        assert!(g.is_empty());
        assert_eq!(g.generation(), 2);
        assert_eq!(g.take(10).last_tag, None);
    }
}
