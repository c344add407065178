//! Restoring the dataflow's state when a pipeline starts again (hydration).
//!
//! PostgreSQL holds every maintained record and the log of accepted events; from them a
//! restarting pipeline rebuilds each operator's state as [`Restore`] records, submitted as
//! its first epoch ([`crate::pipeline::EpochSender::restore`]) before any new input. The
//! restored state is the *whole* state the operators keep — not only the records, but what
//! they remember to recognise replays (applied event ids, versions, zone tombstones) and to
//! estimate speed (the last fixes) — so a restarted pipeline computes exactly what one that
//! never stopped computes.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::event::{Event, EventBody, UnixMillis};
use crate::geometry::GeoPoint;
use crate::ids::{CourierId, DeliveryId, EventId, ZoneId};
use crate::lifecycle::StatusStep;
use crate::model::{Change, CourierState, DeliveryState, Rating, ZoneState};

/// One entity's state, as an operator keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Restore {
    /// A zone's register: its version, and its state (`None`: deleted, a tombstone).
    Zone {
        /// The zone.
        zone_id: ZoneId,
        /// `(occurred_at, event_id)` of the upsert or delete that made this version.
        version: (UnixMillis, EventId),
        /// The live zone, or `None` once deleted.
        state: Option<ZoneState>,
    },
    /// A courier: its state (presence included) and its last accepted fixes.
    Courier {
        /// The courier.
        courier_id: CourierId,
        /// The record of `couriers`.
        state: CourierState,
        /// The last accepted fixes, oldest first (at most the speed window).
        window: Vec<(UnixMillis, GeoPoint)>,
    },
    /// A delivery and its history.
    Delivery {
        /// The delivery.
        delivery_id: DeliveryId,
        /// The record of `deliveries`.
        state: DeliveryState,
        /// The `delivery.created` event.
        created_by: EventId,
        /// The accepted status events, in event time (superseded ones included).
        steps: Vec<StatusStep>,
        /// The latest accepted rating with its `(occurred_at, event_id)`, whether or not the
        /// delivery's current status shows it.
        rating: Option<((UnixMillis, EventId), Rating)>,
        /// The status and rating events accepted.
        applied: Vec<EventId>,
    },
}

/// What the dataflow consumes: events, or restored state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Input {
    /// A validated event.
    Event(Event),
    /// A restored entity (only in a pipeline's first epoch; boxed, so that it does not
    /// widen the events of every other epoch).
    Restore(Box<Restore>),
}

/// An epoch's input split into its restored state and its events, the events in
/// [`Event::apply_order`]. Operators apply the restored state first.
pub(crate) fn split(inputs: Vec<Input>) -> (Vec<Restore>, Vec<Event>) {
    let mut restores = Vec::new();
    let mut events = Vec::with_capacity(inputs.len());
    for input in inputs {
        match input {
            Input::Event(event) => events.push(event),
            Input::Restore(restore) => restores.push(*restore),
        }
    }
    events.sort_by_key(Event::apply_order);
    (restores, events)
}

/// The restore records of a pipeline whose maintained records are `records` and whose
/// accepted events (those the dataflow did not refuse, in any order, duplicates allowed) are
/// `accepted`. This is what hydration needs, stated once: a store that keeps the records and
/// the accepted events can rebuild the state from them.
pub fn from_history(
    records: impl IntoIterator<Item = Change>,
    accepted: impl IntoIterator<Item = Event>,
    speed_window: usize,
) -> Vec<Restore> {
    let mut zone_versions: BTreeMap<ZoneId, (UnixMillis, EventId)> = BTreeMap::new();
    let mut fixes: HashMap<CourierId, Vec<(UnixMillis, EventId, GeoPoint)>> = HashMap::new();
    let mut created_by: HashMap<DeliveryId, EventId> = HashMap::new();
    let mut applied: HashMap<DeliveryId, Vec<EventId>> = HashMap::new();
    let mut steps: HashMap<DeliveryId, Vec<StatusStep>> = HashMap::new();
    let mut ratings: BTreeMap<DeliveryId, ((UnixMillis, EventId), Rating)> = BTreeMap::new();
    for event in accepted {
        let version = (event.occurred_at, event.event_id);
        match &event.body {
            EventBody::ZoneUpserted(zone) => keep_max(&mut zone_versions, zone.zone_id, version),
            EventBody::ZoneDeleted(zone) => keep_max(&mut zone_versions, zone.zone_id, version),
            EventBody::LocationUpdated(fix) => {
                fixes.entry(fix.courier_id).or_default().push((
                    event.occurred_at,
                    event.event_id,
                    fix.position,
                ));
            }
            EventBody::DeliveryCreated(created) => {
                created_by.insert(created.delivery_id, event.event_id);
            }
            EventBody::StatusChanged(change) => {
                applied
                    .entry(change.delivery_id)
                    .or_default()
                    .push(event.event_id);
                steps
                    .entry(change.delivery_id)
                    .or_default()
                    .push(StatusStep {
                        at: event.occurred_at,
                        event_id: event.event_id,
                        status: change.status,
                        courier_id: change.courier_id,
                    });
            }
            EventBody::DeliveryRated(rated) => {
                applied
                    .entry(rated.delivery_id)
                    .or_default()
                    .push(event.event_id);
                let rating = Rating {
                    score: rated.score,
                    comment: rated.comment.clone(),
                    at: event.occurred_at,
                };
                let latest = ratings
                    .entry(rated.delivery_id)
                    .or_insert_with(|| (version, rating.clone()));
                if version > latest.0 {
                    *latest = (version, rating);
                }
            }
        }
    }

    let mut restores = Vec::new();
    let mut live_zones = BTreeMap::new();
    for record in records {
        match record {
            Change::Zone(zone_id, state) => {
                live_zones.insert(zone_id, state);
            }
            Change::Courier(courier_id, state) => {
                let mut window = fixes.remove(&courier_id).unwrap_or_default();
                window.sort();
                window.dedup();
                let start = window.len().saturating_sub(speed_window);
                let window = window[start..]
                    .iter()
                    .map(|(at, _, point)| (*at, *point))
                    .collect();
                restores.push(Restore::Courier {
                    courier_id,
                    state,
                    window,
                });
            }
            Change::Delivery(delivery_id, state) => {
                let mut ids = applied.remove(&delivery_id).unwrap_or_default();
                ids.sort();
                ids.dedup();
                let mut history = steps.remove(&delivery_id).unwrap_or_default();
                history.sort();
                history.dedup();
                restores.push(Restore::Delivery {
                    delivery_id,
                    created_by: created_by
                        .get(&delivery_id)
                        .copied()
                        .unwrap_or(EventId(uuid::Uuid::nil())),
                    steps: history,
                    rating: ratings.remove(&delivery_id),
                    applied: ids,
                    state,
                });
            }
            _ => {}
        }
    }
    for (zone_id, version) in zone_versions {
        let state = live_zones.remove(&zone_id);
        let version = state
            .as_ref()
            .map_or(version, |zone| (zone.updated_at, zone.event_id));
        restores.push(Restore::Zone {
            zone_id,
            version,
            state,
        });
    }
    restores
}

/// Keeps the latest version seen for `key`.
fn keep_max<K: Ord>(
    map: &mut BTreeMap<K, (UnixMillis, EventId)>,
    key: K,
    version: (UnixMillis, EventId),
) {
    let latest = map.entry(key).or_insert(version);
    *latest = (*latest).max(version);
}
