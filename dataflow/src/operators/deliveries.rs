//! Delivery upserts: creation, the lifecycle (one transition table, [`Status::can_become`]),
//! and ratings, partitioned by delivery.
//!
//! A replayed event is recognised by its id and changes nothing; an event the state refuses
//! is reported as a [`Rejection`] so the source can dead-letter it.

use std::collections::HashMap;

use differential_dataflow::VecCollection;
use timely::dataflow::StreamVec;

use super::{EpochState, Freshness, Version, freshness, net_changes, rejection, upsert};
use crate::event::{Event, EventBody};
use crate::ids::{DeliveryId, EventId};
use crate::lifecycle::Status;
use crate::model::{DeliveryState, Rating, RejectReason, Rejection};
use crate::restore::{Input, Restore, split};

/// One delivery and the events already applied to it.
#[derive(Debug, Clone)]
struct Entry {
    state: DeliveryState,
    /// The `delivery.created` event, to recognise its replay.
    created_by: EventId,
    /// Status and rating events applied, to recognise their replays (a handful per delivery).
    applied: Vec<EventId>,
    /// Version of the current rating.
    rating_version: Option<Version>,
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
                applied,
                rating_version,
            } = restore
            {
                let entry = Entry {
                    state,
                    created_by,
                    applied,
                    rating_version,
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
    /// Applies one event: `Ok(true)` if it changed the delivery, `Ok(false)` for a replay.
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
                    applied: Vec::new(),
                    rating_version: None,
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
                let state = &mut entry.state;
                if !state.status.can_become(change.status) {
                    return Err(RejectReason::IllegalTransition {
                        from: state.status,
                        to: change.status,
                    });
                }
                state.status = change.status;
                match change.status {
                    Status::Assigned => {
                        state.courier_id = change.courier_id;
                        state.assigned_at = Some(at);
                    }
                    Status::PickedUp => state.picked_up_at = Some(at),
                    status if status.is_terminal() => state.ended_at = Some(at),
                    _ => {}
                }
                state.version += 1;
                entry.applied.push(event_id);
                Ok(true)
            }
            (EventBody::DeliveryRated(rated), Some(entry)) => {
                let state = &mut entry.state;
                if !matches!(state.status, Status::Delivered | Status::Failed) {
                    return Err(RejectReason::NotRateable {
                        status: state.status,
                    });
                }
                match freshness((at, event_id), entry.rating_version) {
                    Freshness::Newer => {}
                    Freshness::Replay => return Ok(false),
                    Freshness::Stale => return Err(RejectReason::Stale),
                }
                state.rating = Some(Rating {
                    score: rated.score,
                    comment: rated.comment,
                    at,
                });
                state.version += 1;
                entry.rating_version = Some((at, event_id));
                entry.applied.push(event_id);
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
        Input::Restore(Restore::Delivery { delivery_id, .. }) => delivery_id.route(),
        Input::Restore(_) => 0,
    })
}
