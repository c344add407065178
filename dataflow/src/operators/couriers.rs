//! Courier positions and the geofence join.
//!
//! Per courier: the latest fix wins by `(occurred_at, event_id)` (an older fix is reported as
//! stale and changes nothing, so a replay cannot move a courier back or double its odometer);
//! a newer fix that lies further from the latest accepted one than the maximum courier speed
//! covers in the event time between them is refused as an implausible jump and changes
//! nothing either; the odometer sums the steps between accepted fixes; the speed is the
//! reported one or the path speed over the last few fixes.
//!
//! Both rules compare a fix with the latest accepted fix at the moment it is applied, and
//! fixes are applied in one order — epoch by epoch, within an epoch by
//! [`Event::apply_order`] (event time, then event id) — so every worker count, the sequential
//! reference and a restored pipeline refuse the same fixes. A fix that arrives in a later
//! epoch than a newer one is stale, whatever its position.
//!
//! The geofence join is incremental in both inputs. A fix re-tests its courier against the
//! zones whose bounding boxes hold it. A zone change re-tests only the couriers inside the
//! zone's old and new bounding boxes. A courier is *present* in a zone from the first fix (or
//! zone change) that puts it inside; it counts as *inside* once it has been present for the
//! zone's dwell time, measured in event time at its fixes. Zone changes of an epoch apply
//! before its fixes.

use std::collections::{HashMap, VecDeque};

use differential_dataflow::VecCollection;
use timely::dataflow::StreamVec;

use super::{
    Emitted, Freshness, ZoneJoin, freshness, net_changes, rejection, select, stamped, zone_join,
};
use crate::eta::{hour_bucket, step_mm, window_speed_mm_s};
use crate::event::{Event, EventBody, UnixMillis};
use crate::geometry::GeoPoint;
use crate::ids::{CourierId, ZoneId};
use crate::model::{CourierState, RejectReason, Rejection, ZoneState};
use crate::restore::{Input, Restore, split};
use crate::spatial::{PointIndex, ZoneIndex};

/// A courier's presence in a zone.
#[derive(Debug, Clone, Copy)]
struct Presence {
    zone_id: ZoneId,
    /// Event time at which the courier was first seen inside, without interruption.
    since: UnixMillis,
    /// Present for at least the zone's dwell time: a member of `inside`.
    confirmed: bool,
}

/// Everything known about one courier.
#[derive(Debug, Clone)]
struct Track {
    state: CourierState,
    /// The last accepted fixes, oldest first, for the speed estimate.
    window: VecDeque<(UnixMillis, GeoPoint)>,
    /// Zones the courier is in (a handful).
    presence: Vec<Presence>,
}

impl Track {
    /// Mirrors the presence into the courier's record, sorted by zone.
    fn sync_presence(&mut self) {
        let mut presence: Vec<(ZoneId, UnixMillis)> =
            self.presence.iter().map(|p| (p.zone_id, p.since)).collect();
        presence.sort();
        self.state.presence = presence;
    }
}

/// A record the tracker maintains.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum TrackerRecord {
    /// `couriers(courier, state)`.
    Courier(CourierId, CourierState),
    /// `inside(courier, zone)`.
    Inside(CourierId, ZoneId),
}

/// The couriers of one worker's share, and every zone.
#[derive(Debug)]
pub struct CourierTracker {
    zones: ZoneIndex,
    /// Every live zone's dwell time and the `occurred_at` of its current version.
    timing: HashMap<ZoneId, ZoneTiming>,
    couriers: HashMap<CourierId, Track>,
    positions: PointIndex<CourierId>,
    speed_window: usize,
    /// The fastest a courier can move between two fixes, mm/s: a faster fix is a jump.
    max_speed_mm_s: u32,
}

/// What presence in a zone depends on besides its shape.
#[derive(Clone, Copy, Debug)]
struct ZoneTiming {
    dwell_ms: i64,
    /// `occurred_at` of the zone's current version: nobody is present before it.
    since: UnixMillis,
}

impl ZoneTiming {
    /// A zone that is gone (or unknown) holds nobody back.
    const NONE: ZoneTiming = ZoneTiming {
        dwell_ms: 0,
        since: UnixMillis::MIN,
    };

    /// Does presence since `since` make a member at `now`?
    fn confirmed(self, now: UnixMillis, since: UnixMillis) -> bool {
        self.dwell_ms <= 0 || now - since >= self.dwell_ms
    }
}

/// Net changes of one epoch.
#[derive(Default)]
struct Changes {
    couriers_before: HashMap<CourierId, Option<CourierState>>,
    inside: HashMap<(CourierId, ZoneId), isize>,
}

impl CourierTracker {
    /// A tracker that estimates speed over `speed_window` fixes and refuses a fix implying
    /// more than `max_speed_mm_s` from the previous one.
    pub fn new(speed_window: usize, max_speed_mm_s: u32) -> Self {
        Self {
            zones: ZoneIndex::new(),
            timing: HashMap::new(),
            couriers: HashMap::new(),
            positions: PointIndex::new(),
            speed_window: speed_window.max(2),
            max_speed_mm_s,
        }
    }

    /// Applies a zone's net change and re-tests the couriers near its old and new shapes.
    fn apply_zone(&mut self, zone_id: ZoneId, new: Option<ZoneState>, changes: &mut Changes) {
        let mut candidates = Vec::new();
        if let Some(old) = self.zones.get(zone_id) {
            candidates.extend(self.positions.candidates_for(old));
        }
        match new {
            Some(state) => {
                candidates.extend(self.positions.candidates_for(&state.shape));
                let timing = ZoneTiming {
                    dwell_ms: state.dwell_ms,
                    since: state.updated_at,
                };
                self.timing.insert(zone_id, timing);
                self.zones.upsert(zone_id, state.shape);
            }
            None => {
                self.timing.remove(&zone_id);
                self.zones.remove(zone_id);
            }
        }
        candidates.sort();
        candidates.dedup();
        for courier_id in candidates {
            self.retest(courier_id, zone_id, changes);
        }
    }

    /// Re-evaluates one courier's membership of one zone at its latest fix.
    fn retest(&mut self, courier_id: CourierId, zone_id: ZoneId, changes: &mut Changes) {
        let Some(position) = self
            .couriers
            .get(&courier_id)
            .map(|track| track.state.position)
        else {
            return;
        };
        let inside = self.zones.zone_contains(zone_id, position);
        self.set_presence(courier_id, zone_id, inside, changes);
    }

    /// Records whether a courier's latest fix is inside a zone, and whether that makes it a
    /// member of `inside` (present for the zone's dwell time).
    fn set_presence(
        &mut self,
        courier_id: CourierId,
        zone_id: ZoneId,
        inside: bool,
        changes: &mut Changes,
    ) {
        let Some(track) = self.couriers.get_mut(&courier_id) else {
            return;
        };
        let now = track.state.at;
        let timing = self
            .timing
            .get(&zone_id)
            .copied()
            .unwrap_or(ZoneTiming::NONE);
        let index = track.presence.iter().position(|p| p.zone_id == zone_id);
        if index.is_some() != inside {
            // The set of zones the courier is in changes, and with it the courier's record.
            changes
                .couriers_before
                .entry(courier_id)
                .or_insert_with(|| Some(track.state.clone()));
        }
        match (index, inside) {
            (Some(i), true) => {
                let presence = &mut track.presence[i];
                let confirmed = timing.confirmed(now, presence.since);
                if confirmed != presence.confirmed {
                    presence.confirmed = confirmed;
                    *changes.inside.entry((courier_id, zone_id)).or_default() +=
                        if confirmed { 1 } else { -1 };
                }
            }
            (None, true) => {
                // Present from this fix, or from the zone version that put the courier
                // inside, whichever is later.
                let since = now.max(timing.since);
                let confirmed = timing.confirmed(now, since);
                track.presence.push(Presence {
                    zone_id,
                    since,
                    confirmed,
                });
                if confirmed {
                    *changes.inside.entry((courier_id, zone_id)).or_default() += 1;
                }
            }
            (Some(i), false) => {
                if track.presence.swap_remove(i).confirmed {
                    *changes.inside.entry((courier_id, zone_id)).or_default() -= 1;
                }
            }
            (None, false) => {}
        }
        track.sync_presence();
    }

    /// Puts a restored courier back, with its presence as it was.
    fn restore(
        &mut self,
        courier_id: CourierId,
        mut state: CourierState,
        window: Vec<(UnixMillis, GeoPoint)>,
        changes: &mut Changes,
    ) {
        let previous = self
            .couriers
            .get(&courier_id)
            .map(|track| track.state.clone());
        changes
            .couriers_before
            .entry(courier_id)
            .or_insert(previous);
        if let Some(old) = self.couriers.get(&courier_id) {
            for presence in old.presence.iter().filter(|p| p.confirmed) {
                *changes
                    .inside
                    .entry((courier_id, presence.zone_id))
                    .or_default() -= 1;
            }
        }
        state
            .presence
            .retain(|(zone_id, _)| self.zones.get(*zone_id).is_some());
        let presence: Vec<Presence> = state
            .presence
            .iter()
            .map(|&(zone_id, since)| {
                let timing = self
                    .timing
                    .get(&zone_id)
                    .copied()
                    .unwrap_or(ZoneTiming::NONE);
                Presence {
                    zone_id,
                    since,
                    confirmed: timing.confirmed(state.at, since),
                }
            })
            .collect();
        for p in presence.iter().filter(|p| p.confirmed) {
            *changes.inside.entry((courier_id, p.zone_id)).or_default() += 1;
        }
        self.positions.set(courier_id, state.position);
        let mut window: VecDeque<_> = window.into_iter().collect();
        while window.len() > self.speed_window {
            window.pop_front();
        }
        self.couriers.insert(
            courier_id,
            Track {
                state,
                window,
                presence,
            },
        );
    }

    /// Applies one fix; `Err(Stale)` if older than the courier's latest, `Err(ImplausibleJump)`
    /// if reaching it from the latest is faster than the maximum speed.
    fn apply_fix(&mut self, event: &Event, changes: &mut Changes) -> Result<(), RejectReason> {
        let EventBody::LocationUpdated(fix) = &event.body else {
            return Ok(());
        };
        let (courier_id, at) = (fix.courier_id, event.occurred_at);
        let current = self.couriers.get(&courier_id);
        match freshness(
            (at, event.event_id),
            current.map(|t| (t.state.at, t.state.event_id)),
        ) {
            Freshness::Newer => {}
            Freshness::Replay => return Ok(()),
            Freshness::Stale => return Err(RejectReason::Stale),
        }
        if let Some(track) = current {
            jump_check(
                (track.state.at, track.state.position),
                (at, fix.position),
                self.max_speed_mm_s,
            )?;
        }
        changes
            .couriers_before
            .entry(courier_id)
            .or_insert_with(|| current.map(|track| track.state.clone()));
        let window_len = self.speed_window;
        let track = self.couriers.entry(courier_id).or_insert_with(|| Track {
            state: CourierState {
                position: fix.position,
                at,
                event_id: event.event_id,
                speed_mm_s: None,
                heading_ddeg: None,
                odometer_mm: 0,
                active_hours: 1,
                presence: Vec::new(),
            },
            window: VecDeque::with_capacity(window_len),
            presence: Vec::new(),
        });
        let state = &mut track.state;
        if let Some(&(last_at, last_position)) = track.window.back() {
            state.odometer_mm += step_mm(last_position, fix.position);
            if hour_bucket(at) != hour_bucket(last_at) {
                state.active_hours += 1;
            }
        }
        track.window.push_back((at, fix.position));
        while track.window.len() > window_len {
            track.window.pop_front();
        }
        state.position = fix.position;
        state.at = at;
        state.event_id = event.event_id;
        state.heading_ddeg = fix.heading_ddeg;
        state.speed_mm_s = fix
            .speed_mm_s
            .or_else(|| window_speed_mm_s(track.window.make_contiguous()));
        self.positions.set(courier_id, fix.position);

        // Leave the zones the courier is no longer in, then (re)enter those it is in.
        let containing: Vec<ZoneId> = self.zones.containing(fix.position).collect();
        let left: Vec<ZoneId> = track
            .presence
            .iter()
            .map(|p| p.zone_id)
            .filter(|zone_id| !containing.contains(zone_id))
            .collect();
        for zone_id in left {
            self.set_presence(courier_id, zone_id, false, changes);
        }
        for zone_id in containing {
            self.set_presence(courier_id, zone_id, true, changes);
        }
        Ok(())
    }
}

impl ZoneJoin for CourierTracker {
    type Input = Input;
    type Record = TrackerRecord;

    fn apply_epoch(
        &mut self,
        zone_changes: Vec<((ZoneId, ZoneState), isize)>,
        input: Vec<(Input, isize)>,
    ) -> (Vec<(TrackerRecord, isize)>, Vec<Rejection>) {
        let mut changes = Changes::default();
        for (zone_id, new) in net_zone_changes(zone_changes) {
            self.apply_zone(zone_id, new, &mut changes);
        }
        let (restores, fixes) = split(input.into_iter().map(|(input, _)| input).collect());
        for restore in restores {
            if let Restore::Courier {
                courier_id,
                state,
                window,
            } = restore
            {
                self.restore(courier_id, state, window, &mut changes);
            }
        }
        let mut rejections = Vec::new();
        for event in &fixes {
            if let Err(reason) = self.apply_fix(event, &mut changes) {
                rejections.push(rejection(event.event_id, event.kind(), reason));
            }
        }
        let mut records: Vec<(TrackerRecord, isize)> =
            net_changes(changes.couriers_before, |courier_id| {
                self.couriers
                    .get(courier_id)
                    .map(|track| track.state.clone())
            })
            .into_iter()
            .map(|((courier_id, state), diff)| (TrackerRecord::Courier(courier_id, state), diff))
            .collect();
        for ((courier_id, zone_id), diff) in changes.inside {
            if diff != 0 {
                records.push((TrackerRecord::Inside(courier_id, zone_id), diff));
            }
        }
        records.sort();
        (records, rejections)
    }
}

/// Refuses a move from `from` to `to` (event time, position) faster than `max_speed_mm_s`.
/// Exact in integers: distance (mm) × 1000 against speed (mm/s) × elapsed (ms); at the same
/// instant any distance at all is a jump.
pub fn jump_check(
    (from_at, from): (UnixMillis, GeoPoint),
    (to_at, to): (UnixMillis, GeoPoint),
    max_speed_mm_s: u32,
) -> Result<(), RejectReason> {
    let distance_mm = step_mm(from, to);
    let elapsed_ms = to_at.saturating_sub(from_at).max(0);
    let covered = u128::from(max_speed_mm_s) * u128::from(elapsed_ms.unsigned_abs());
    if u128::from(distance_mm) * 1_000 > covered {
        Err(RejectReason::ImplausibleJump {
            distance_mm,
            elapsed_ms,
            max_speed_mm_s,
        })
    } else {
        Ok(())
    }
}

/// The state each changed zone ends the epoch in (`None`: deleted), in zone order.
pub(crate) fn net_zone_changes(
    changes: Vec<((ZoneId, ZoneState), isize)>,
) -> Vec<(ZoneId, Option<ZoneState>)> {
    let mut by_zone: HashMap<ZoneId, Option<ZoneState>> = HashMap::new();
    for ((zone_id, state), diff) in changes {
        let entry = by_zone.entry(zone_id).or_default();
        if diff > 0 {
            *entry = Some(state);
        }
    }
    let mut net: Vec<_> = by_zone.into_iter().collect();
    net.sort_by_key(|(zone_id, _)| *zone_id);
    net
}

/// Maintains `couriers(courier, state)` and `inside(courier, zone)` from location events
/// and the zones, partitioned by courier.
pub fn track_couriers<'scope>(
    locations: StreamVec<'scope, u64, Input>,
    zones: VecCollection<'scope, u64, (ZoneId, ZoneState)>,
    speed_window: usize,
    max_speed_mm_s: u32,
) -> Tracked<'scope> {
    let emitted = zone_join(
        CourierTracker::new(speed_window, max_speed_mm_s),
        "TrackCouriers",
        stamped(locations),
        |input: &Input| match input {
            Input::Event(Event {
                body: EventBody::LocationUpdated(fix),
                ..
            }) => fix.courier_id.route(),
            Input::Restore(restore) => match **restore {
                Restore::Courier { courier_id, .. } => courier_id.route(),
                _ => 0,
            },
            Input::Event(_) => 0,
        },
        zones,
    );
    let couriers = select(&emitted, |emitted| match emitted {
        Emitted::Record(TrackerRecord::Courier(courier_id, state)) => Some((courier_id, state)),
        _ => None,
    });
    let inside = select(&emitted, |emitted| match emitted {
        Emitted::Record(TrackerRecord::Inside(courier_id, zone_id)) => Some((courier_id, zone_id)),
        _ => None,
    });
    let rejections = select(&emitted, |emitted| match emitted {
        Emitted::Rejected(refused) => Some(refused),
        Emitted::Record(_) => None,
    });
    Tracked {
        couriers,
        inside,
        rejections,
    }
}

/// The collections [`track_couriers`] maintains.
#[allow(missing_debug_implementations)] // handles into a running dataflow
pub struct Tracked<'scope> {
    /// `couriers(courier, state)`.
    pub couriers: VecCollection<'scope, u64, (CourierId, CourierState)>,
    /// `inside(courier, zone)`.
    pub inside: VecCollection<'scope, u64, (CourierId, ZoneId)>,
    /// Stale fixes and implausible jumps.
    pub rejections: VecCollection<'scope, u64, Rejection>,
}
