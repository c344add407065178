//! Delivery upserts: creation, the lifecycle (one transition table, [`Status::can_become`]),
//! and ratings, partitioned by delivery.
//!
//! A delivery's status is its history of accepted `status.changed` events folded in event
//! time ([`StatusStep`]), so a status that arrives late still lands where it happened: a
//! `cancelled` stamped before a `delivered` that arrived first ends the delivery as
//! cancelled, the `delivered` step is superseded, and every aggregate derived from the
//! delivery is retracted and re-derived. A late step is accepted when it is a legal
//! transition from the status at its place in the history, and refused otherwise.
//!
//! A delivered or failed delivery takes ratings, a later one replacing an earlier one, up
//! to [`MAX_RATINGS_PER_DELIVERY`]; the next is refused as `too_many_ratings`.
//!
//! A replayed event is recognised by its id and changes nothing; an event the state refuses
//! is reported as a [`Rejection`] so the source can dead-letter it.

use std::collections::HashMap;

use differential_dataflow::VecCollection;
use timely::dataflow::StreamVec;

use super::{EpochState, Freshness, Version, freshness, net_changes, rejection, upsert};
use crate::event::{Event, EventBody};
use crate::ids::{DeliveryId, EventId};
use crate::lifecycle::{Status, StatusStep};
use crate::model::{DeliveryState, MAX_RATINGS_PER_DELIVERY, Rating, RejectReason, Rejection};
use crate::restore::{Input, Restore, split};

/// One delivery, its history, and the record folded from it.
#[derive(Debug, Clone)]
struct Entry {
    /// The record of `deliveries`: the creation's fields and [`Entry::refold`]'s result.
    state: DeliveryState,
    /// The `delivery.created` event, to recognise its replay.
    created_by: EventId,
    /// The accepted status events, in event time.
    steps: Vec<StatusStep>,
    /// The latest accepted rating and its version. Kept while a correction makes the
    /// delivery unrateable (cancelled), shown again if a further correction undoes that.
    rating: Option<(Version, Rating)>,
    /// Status and rating events accepted, to recognise their replays (a handful per delivery:
    /// the lifecycle bounds the status steps, [`MAX_RATINGS_PER_DELIVERY`] the ratings).
    applied: Vec<EventId>,
}

/// The lifecycle part of a delivery's record after the `steps`, from creation on.
fn replay<'a>(state: &mut DeliveryState, steps: impl IntoIterator<Item = &'a StatusStep>) {
    state.status = Status::Created;
    state.courier_id = None;
    state.assigned_at = None;
    state.picked_up_at = None;
    state.ended_at = None;
    for step in steps {
        if !state.status.can_become(step.status) {
            continue;
        }
        state.status = step.status;
        match step.status {
            Status::Assigned => {
                state.courier_id = step.courier_id;
                state.assigned_at = Some(step.at);
            }
            Status::PickedUp => state.picked_up_at = Some(step.at),
            status if status.is_terminal() => state.ended_at = Some(step.at),
            _ => {}
        }
    }
}

/// Only a delivery that reached its customer or was given up can be rated.
fn rateable(status: Status) -> bool {
    matches!(status, Status::Delivered | Status::Failed)
}

impl Entry {
    /// Recomputes the record from the history: the status fold, the rating if the
    /// delivery is rateable, the version (one per accepted event, creation included).
    fn refold(&mut self) {
        replay(&mut self.state, &self.steps);
        self.state.rating = self
            .rating
            .as_ref()
            .filter(|_| rateable(self.state.status))
            .map(|(_, rating)| rating.clone());
        self.state.version =
            u32::try_from(self.applied.len()).map_or(u32::MAX, |applied| applied.saturating_add(1));
    }

    /// Ratings accepted so far: every applied event that is not a status step. (Counted
    /// from what a restore carries, so a restarted pipeline keeps the count.)
    fn ratings(&self) -> usize {
        self.applied.len().saturating_sub(self.steps.len())
    }

    /// The status the history has reached just before `step`.
    fn status_before(&self, step: &StatusStep) -> Status {
        self.steps
            .iter()
            .take_while(|earlier| *earlier < step)
            .fold(Status::Created, |status, earlier| {
                if status.can_become(earlier.status) {
                    earlier.status
                } else {
                    status
                }
            })
    }
}

/// The deliveries of one worker's share.
#[derive(Debug, Default)]
pub struct DeliveryRegisters {
    deliveries: HashMap<DeliveryId, Entry>,
}

impl EpochState for DeliveryRegisters {
    type Record = (DeliveryId, DeliveryState);

    /// Applies one epoch of delivery events in apply order. Returns the net change of every
    /// delivery it touched and the events it refused.
    fn apply_epoch(
        &mut self,
        inputs: Vec<Input>,
    ) -> (Vec<((DeliveryId, DeliveryState), isize)>, Vec<Rejection>) {
        let (restores, events) = split(inputs);
        let mut before: HashMap<DeliveryId, Option<DeliveryState>> = HashMap::new();
        let mut rejections = Vec::new();
        for restore in restores {
            if let Restore::Delivery {
                delivery_id,
                state,
                created_by,
                mut steps,
                rating,
                applied,
            } = restore
            {
                steps.sort();
                let entry = Entry {
                    state,
                    created_by,
                    steps,
                    rating,
                    applied,
                };
                let previous = self.deliveries.insert(delivery_id, entry);
                before
                    .entry(delivery_id)
                    .or_insert_with(|| previous.map(|entry| entry.state));
            }
        }
        for event in events {
            let delivery_id = match &event.body {
                EventBody::DeliveryCreated(created) => created.delivery_id,
                EventBody::StatusChanged(change) => change.delivery_id,
                EventBody::DeliveryRated(rated) => rated.delivery_id,
                _ => continue,
            };
            let current = self
                .deliveries
                .get(&delivery_id)
                .map(|entry| entry.state.clone());
            let (event_id, kind) = (event.event_id, event.kind());
            match self.apply(delivery_id, event) {
                Ok(true) => {
                    before.entry(delivery_id).or_insert(current);
                }
                Ok(false) => {}
                Err(reason) => rejections.push(rejection(event_id, kind, reason)),
            }
        }
        let mut changes = net_changes(before, |delivery_id| {
            self.deliveries
                .get(delivery_id)
                .map(|entry| entry.state.clone())
        });
        changes.sort();
        (changes, rejections)
    }
}

impl DeliveryRegisters {
    /// Applies one event: `Ok(true)` if it changed the delivery's history, `Ok(false)` for
    /// a replay.
    fn apply(&mut self, delivery_id: DeliveryId, event: Event) -> Result<bool, RejectReason> {
        let at = event.occurred_at;
        let event_id = event.event_id;
        let entry = self.deliveries.get_mut(&delivery_id);
        match (event.body, entry) {
            (EventBody::DeliveryCreated(created), None) => {
                let state = DeliveryState {
                    customer_id: created.customer_id,
                    courier_id: None,
                    pickup: created.pickup,
                    dropoff: created.dropoff,
                    promised_by: created.promised_by,
                    status: Status::Created,
                    created_at: at,
                    assigned_at: None,
                    picked_up_at: None,
                    ended_at: None,
                    rating: None,
                    version: 1,
                };
                let entry = Entry {
                    state,
                    created_by: event_id,
                    steps: Vec::new(),
                    rating: None,
                    applied: Vec::new(),
                };
                self.deliveries.insert(delivery_id, entry);
                Ok(true)
            }
            (EventBody::DeliveryCreated(_), Some(entry)) if entry.created_by == event_id => {
                Ok(false)
            }
            (EventBody::DeliveryCreated(_), Some(_)) => Err(RejectReason::DeliveryExists),
            (_, None) => Err(RejectReason::UnknownDelivery),
            (_, Some(entry)) if entry.applied.contains(&event_id) => Ok(false),
            (EventBody::StatusChanged(change), Some(entry)) => {
                let step = StatusStep {
                    at,
                    event_id,
                    status: change.status,
                    courier_id: change.courier_id,
                };
                let from = entry.status_before(&step);
                if !from.can_become(step.status) {
                    return Err(RejectReason::IllegalTransition {
                        from,
                        to: step.status,
                    });
                }
                let place = entry.steps.partition_point(|earlier| *earlier < step);
                entry.steps.insert(place, step);
                entry.applied.push(event_id);
                entry.refold();
                Ok(true)
            }
            (EventBody::DeliveryRated(rated), Some(entry)) => {
                if !rateable(entry.state.status) {
                    return Err(RejectReason::NotRateable {
                        status: entry.state.status,
                    });
                }
                if entry.ratings() >= MAX_RATINGS_PER_DELIVERY {
                    return Err(RejectReason::TooManyRatings {
                        max: MAX_RATINGS_PER_DELIVERY,
                    });
                }
                match freshness((at, event_id), entry.rating.as_ref().map(|(v, _)| *v)) {
                    Freshness::Newer => {}
                    Freshness::Replay => return Ok(false),
                    Freshness::Stale => return Err(RejectReason::Stale),
                }
                let rating = Rating {
                    score: rated.score,
                    comment: rated.comment,
                    at,
                };
                entry.rating = Some(((at, event_id), rating));
                entry.applied.push(event_id);
                entry.refold();
                Ok(true)
            }
            (_, Some(_)) => Ok(false),
        }
    }
}

/// Maintains `deliveries(delivery, state)` from creation, status and rating events,
/// partitioned by delivery.
pub fn upsert_deliveries<'scope>(
    events: StreamVec<'scope, u64, Input>,
) -> (
    VecCollection<'scope, u64, (DeliveryId, DeliveryState)>,
    VecCollection<'scope, u64, Rejection>,
) {
    upsert::<DeliveryRegisters>(events, "UpsertDeliveries", |input: &Input| match input {
        Input::Event(event) => match &event.body {
            EventBody::DeliveryCreated(created) => created.delivery_id.route(),
            EventBody::StatusChanged(change) => change.delivery_id.route(),
            EventBody::DeliveryRated(rated) => rated.delivery_id.route(),
            _ => 0,
        },
        Input::Restore(restore) => match **restore {
            Restore::Delivery { delivery_id, .. } => delivery_id.route(),
            _ => 0,
        },
    })
}
