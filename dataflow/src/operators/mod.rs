//! The stateful timely operators the dataflow is built from.
//!
//! Each operator holds its inputs until every input frontier has passed their epoch, then
//! applies the epoch's input to per-entity state in one deterministic order and emits the
//! epoch's *net* change of each entity it touched as `(record, epoch, ±1)`. Because the
//! emitted records are differential updates, everything downstream (joins, aggregates) is
//! ordinary differential dataflow.
//!
//! # Layout
//! - `stash`: holding input by epoch until the frontiers pass it.
//! - [`zones`]: zone upserts, last-writer-wins per zone.
//! - [`deliveries`]: delivery upserts through the lifecycle, plus ratings.
//! - [`couriers`]: courier positions (last-writer-wins), odometer, speed, and the geofence
//!   join with dwell times.
//! - [`dropoffs`]: a plain points-in-zones join, for dropoff points.
//! - [`output`]: gathers each worker's share of an epoch's changes for the pipeline.

pub mod couriers;
pub mod deliveries;
pub mod dropoffs;
pub mod output;
pub(crate) mod stash;
pub mod zones;

use differential_dataflow::VecCollection;
use differential_dataflow::collection::AsCollection;
use timely::dataflow::StreamVec;
use timely::dataflow::operators::vec::Map;

use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::vec::Broadcast;

use self::stash::Stash;
use crate::event::{EventKind, UnixMillis};
use crate::ids::{EventId, ZoneId};
use crate::model::{RejectReason, Rejection, ZoneState};
use crate::restore::Input;

/// The version of an upsert register: later `(occurred_at, event_id)` wins; an equal
/// version is a replay of the same event.
pub type Version = (UnixMillis, EventId);

/// How an upsert compares with the register it targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Newer than the register: apply it.
    Newer,
    /// The very event the register holds: a replay, changes nothing.
    Replay,
    /// Older: ignore, report as stale.
    Stale,
}

/// Compares an incoming version with the register's current one.
pub fn freshness(incoming: Version, current: Option<Version>) -> Freshness {
    match current {
        None => Freshness::Newer,
        Some(current) if incoming > current => Freshness::Newer,
        Some(current) if incoming == current => Freshness::Replay,
        Some(_) => Freshness::Stale,
    }
}

/// Per-entity state that applies a whole epoch of events at once.
pub trait EpochState: Default + 'static {
    /// The maintained record, `(key, state)`.
    type Record: Clone + Ord + std::fmt::Debug + 'static;

    /// Applies one epoch: its restored state first, then its events in
    /// [`Event::apply_order`](crate::event::Event::apply_order); returns the net change of every record touched and the events
    /// refused.
    fn apply_epoch(&mut self, inputs: Vec<Input>) -> (Vec<(Self::Record, isize)>, Vec<Rejection>);
}

/// What a stateful operator emits: records of its collection(s), or refusals.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Emitted<R> {
    Record(R),
    Rejected(Rejection),
}

/// Maintains a collection of per-entity state from an event stream: events are routed to
/// workers by `route` (the entity key), held until their epoch is complete, then applied.
pub(crate) fn upsert<'scope, S: EpochState>(
    events: StreamVec<'scope, u64, Input>,
    name: &str,
    route: fn(&Input) -> u64,
) -> (
    VecCollection<'scope, u64, S::Record>,
    VecCollection<'scope, u64, Rejection>,
) {
    let emitted = events
        .unary_frontier::<CapacityContainerBuilder<Vec<(Emitted<S::Record>, u64, isize)>>, _, _, _>(
            Exchange::new(move |input: &Input| route(input)),
            name,
            |_cap, _info| {
                let mut stash: Stash<Input, ()> = Stash::default();
                let mut state = S::default();
                move |(input, frontier), output| {
                    input.for_each_stamp(|cap, containers| {
                        if let Some(&epoch) = cap.least() {
                            stash.first(
                                epoch,
                                || cap.delayed(&epoch, 0),
                                containers.flat_map(|c| c.drain(..)),
                            );
                        }
                    });
                    for (epoch, pending) in stash.ready(&[frontier]) {
                        let (changes, rejections) = state.apply_epoch(pending.first);
                        let mut session = output.session(&pending.cap);
                        session.give_iterator(
                            changes
                                .into_iter()
                                .map(|(record, diff)| (Emitted::Record(record), epoch, diff)),
                        );
                        session.give_iterator(
                            rejections
                                .into_iter()
                                .map(|refused| (Emitted::Rejected(refused), epoch, 1)),
                        );
                    }
                }
            },
        );
    let records = select(&emitted, |emitted| match emitted {
        Emitted::Record(record) => Some(record),
        Emitted::Rejected(_) => None,
    });
    let rejections = select(&emitted, |emitted| match emitted {
        Emitted::Rejected(refused) => Some(refused),
        Emitted::Record(_) => None,
    });
    (records, rejections)
}

/// A change of the zones collection: `((zone, state), diff)`.
pub type ZoneChange = ((ZoneId, ZoneState), isize);

/// State joined against the zones: a zone change re-tests the keys near it, an input change
/// re-tests that key.
pub trait ZoneJoin: 'static {
    /// The other input, as differential updates.
    type Input: timely::ExchangeData + Clone;
    /// The maintained record.
    type Record: Clone + Ord + std::fmt::Debug + 'static;

    /// Applies one epoch: first the net zone changes, then the input.
    fn apply_epoch(
        &mut self,
        zone_changes: Vec<ZoneChange>,
        input: Vec<(Self::Input, isize)>,
    ) -> (Vec<(Self::Record, isize)>, Vec<Rejection>);
}

/// Runs a [`ZoneJoin`]: `input` routed by `route`, every zone change broadcast to every worker.
pub(crate) fn zone_join<'scope, S: ZoneJoin>(
    mut state: S,
    name: &str,
    input: StreamVec<'scope, u64, (S::Input, u64, isize)>,
    route: fn(&S::Input) -> u64,
    zones: VecCollection<'scope, u64, (ZoneId, ZoneState)>,
) -> StreamVec<'scope, u64, (Emitted<S::Record>, u64, isize)> {
    let zone_changes = zones.inner.broadcast();
    input.binary_frontier::<_, CapacityContainerBuilder<Vec<(Emitted<S::Record>, u64, isize)>>, _, _, _, _>(
        zone_changes,
        Exchange::new(move |(item, _, _): &(S::Input, u64, isize)| route(item)),
        Pipeline,
        name,
        |_cap, _info| {
            let mut stash: Stash<(S::Input, isize), ZoneChange> = Stash::default();
            move |(input, input_frontier), (zones, zone_frontier), output| {
                input.for_each(|cap, data| {
                    for (item, epoch, diff) in data.drain(..) {
                        stash.first(epoch, || cap.delayed(&epoch, 0), [(item, diff)]);
                    }
                });
                zones.for_each(|cap, data| {
                    for (zone, epoch, diff) in data.drain(..) {
                        stash.second(epoch, || cap.delayed(&epoch, 0), [(zone, diff)]);
                    }
                });
                for (epoch, pending) in stash.ready(&[input_frontier, zone_frontier]) {
                    let (changes, rejections) = state.apply_epoch(pending.second, pending.first);
                    let mut session = output.session(&pending.cap);
                    session.give_iterator(changes.into_iter().map(|(record, diff)| (Emitted::Record(record), epoch, diff)));
                    session.give_iterator(rejections.into_iter().map(|refused| (Emitted::Rejected(refused), epoch, 1)));
                }
            }
        },
    )
}

/// Attaches its epoch to every event, as a differential update.
pub(crate) fn stamped<'scope>(
    events: StreamVec<'scope, u64, Input>,
) -> StreamVec<'scope, u64, (Input, u64, isize)> {
    events.unary::<CapacityContainerBuilder<Vec<(Input, u64, isize)>>, _, _, _>(
        Pipeline,
        "Stamp",
        |_cap, _info| {
            move |input, output| {
                input.for_each(|cap, data| {
                    if let Some(&epoch) = cap.least() {
                        output
                            .session(&cap)
                            .give_iterator(data.drain(..).map(|event| (event, epoch, 1)));
                    }
                });
            }
        },
    )
}

/// One of the records an operator emits, as a collection of its own.
pub(crate) fn select<'scope, E, D>(
    emitted: &StreamVec<'scope, u64, (E, u64, isize)>,
    pick: impl Fn(E) -> Option<D> + 'static,
) -> VecCollection<'scope, u64, D>
where
    E: Clone + 'static,
    D: Clone + 'static,
{
    emitted
        .clone()
        .flat_map(move |(emitted, epoch, diff)| pick(emitted).map(|record| (record, epoch, diff)))
        .as_collection()
}

/// The net change of every entity an epoch touched: `-old` and `+new` where they differ,
/// given each one's state before the epoch and a way to read its state now.
pub(crate) fn net_changes<K: Copy, V: PartialEq>(
    before: std::collections::HashMap<K, Option<V>>,
    now: impl Fn(&K) -> Option<V>,
) -> Vec<((K, V), isize)> {
    let mut changes = Vec::new();
    for (key, old) in before {
        let new = now(&key);
        if old != new {
            changes.extend(old.map(|state| ((key, state), -1)));
            changes.extend(new.map(|state| ((key, state), 1)));
        }
    }
    changes
}

pub(crate) fn rejection(event_id: EventId, kind: EventKind, reason: RejectReason) -> Rejection {
    Rejection {
        event_id,
        kind,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn later_versions_win_and_replays_are_recognised() {
        let a = EventId(Uuid::from_u128(1));
        let b = EventId(Uuid::from_u128(2));
        assert_eq!(freshness((10, a), None), Freshness::Newer);
        assert_eq!(freshness((11, a), Some((10, b))), Freshness::Newer);
        assert_eq!(freshness((10, b), Some((10, a))), Freshness::Newer);
        assert_eq!(freshness((10, a), Some((10, a))), Freshness::Replay);
        assert_eq!(freshness((9, b), Some((10, a))), Freshness::Stale);
    }
}
