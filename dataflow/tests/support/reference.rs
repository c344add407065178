//! A plain sequential reference for the dataflow: the same semantics, computed the obvious
//! way. Every zone is tested against every courier (no index), every aggregate is recomputed
//! from scratch after every epoch, and the output is the full set of current records.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use chrono::{DateTime, Datelike, Timelike};
use delivertrack_dataflow::eta::EtaConfig;
use delivertrack_dataflow::event::{Event, EventBody, UnixMillis};
use delivertrack_dataflow::geometry::GeoPoint;
use delivertrack_dataflow::model::{CourierState, DeliveryState, Rating, Scope, Tally, ZoneState};
use delivertrack_dataflow::{
    Change, CourierId, DeliveryId, EventId, RejectReason, Rejection, Status, ZoneId,
};

type Version = (UnixMillis, EventId);

struct Courier {
    state: CourierState,
    /// Every accepted fix, oldest first.
    fixes: Vec<(UnixMillis, GeoPoint)>,
    /// zone → (present since, confirmed)
    presence: BTreeMap<ZoneId, (UnixMillis, bool)>,
}

struct Delivery {
    /// The delivery as `delivery.created` made it.
    created: DeliveryState,
    created_by: EventId,
    /// Every accepted status event, keyed by its version (event time, then id).
    history: BTreeMap<Version, (Status, Option<CourierId>)>,
    /// The latest accepted rating.
    rating: Option<(Version, Rating)>,
    /// How many ratings were accepted.
    ratings: usize,
    applied: HashSet<EventId>,
}

/// The lifecycle, spelled out once more.
fn legal(from: Status, to: Status) -> bool {
    matches!(
        (from, to),
        (Status::Created, Status::Assigned)
            | (Status::Assigned, Status::PickedUp)
            | (Status::PickedUp, Status::InTransit)
            | (Status::InTransit, Status::Delivered)
            | (Status::InTransit, Status::Failed)
            | (Status::Created, Status::Cancelled)
            | (Status::Assigned, Status::Cancelled)
            | (Status::PickedUp, Status::Cancelled)
            | (Status::InTransit, Status::Cancelled)
    )
}

impl Delivery {
    /// The record: the history replayed in event time from creation, skipping every step
    /// that is not a legal transition where it stands.
    fn state(&self) -> DeliveryState {
        let mut state = self.created.clone();
        for ((at, _), (status, courier_id)) in &self.history {
            if !legal(state.status, *status) {
                continue;
            }
            state.status = *status;
            match status {
                Status::Assigned => {
                    state.courier_id = *courier_id;
                    state.assigned_at = Some(*at);
                }
                Status::PickedUp => state.picked_up_at = Some(*at),
                Status::Delivered | Status::Failed | Status::Cancelled => {
                    state.ended_at = Some(*at)
                }
                _ => {}
            }
        }
        if matches!(state.status, Status::Delivered | Status::Failed) {
            state.rating = self.rating.as_ref().map(|(_, rating)| rating.clone());
        }
        state.version = 1 + self.applied.len() as u32;
        state
    }

    /// The status after the steps whose version satisfies `include`.
    fn status_after(&self, include: impl Fn(&Version) -> bool) -> Status {
        let mut status = Status::Created;
        for (version, (next, _)) in &self.history {
            if include(version) && legal(status, *next) {
                status = *next;
            }
        }
        status
    }
}

pub struct Reference {
    zones: BTreeMap<ZoneId, (Version, Option<ZoneState>)>,
    couriers: BTreeMap<CourierId, Courier>,
    deliveries: BTreeMap<DeliveryId, Delivery>,
    speed_window: usize,
    /// The fastest a courier moves between accepted fixes, mm/s.
    max_speed_mm_s: u32,
    eta: EtaConfig,
}

fn reject(event: &Event, reason: RejectReason) -> Rejection {
    Rejection {
        event_id: event.event_id,
        kind: event.kind(),
        reason,
    }
}

impl Reference {
    pub fn new(speed_window: usize, max_speed_mm_s: u32, eta: EtaConfig) -> Self {
        Self {
            zones: BTreeMap::new(),
            couriers: BTreeMap::new(),
            deliveries: BTreeMap::new(),
            speed_window,
            max_speed_mm_s,
            eta,
        }
    }

    fn live_zones(&self) -> BTreeMap<ZoneId, ZoneState> {
        self.zones
            .iter()
            .filter_map(|(id, (_, state))| state.clone().map(|s| (*id, s)))
            .collect()
    }

    /// Applies one epoch; returns the refusals, sorted.
    pub fn epoch(&mut self, events: &[Event]) -> Vec<Rejection> {
        let mut events = events.to_vec();
        events.sort_by_key(Event::apply_order);
        let mut rejections = Vec::new();

        // 1. Zones, last writer wins; then every courier re-tested against every changed zone.
        let zones_before = self.live_zones();
        for event in &events {
            let (zone_id, state) = match &event.body {
                EventBody::ZoneUpserted(z) => (
                    z.zone_id,
                    Some(ZoneState {
                        name: z.name.clone(),
                        shape: z.shape.clone(),
                        dwell_ms: z.dwell_ms,
                        updated_at: event.occurred_at,
                        event_id: event.event_id,
                    }),
                ),
                EventBody::ZoneDeleted(z) => (z.zone_id, None),
                _ => continue,
            };
            let version = (event.occurred_at, event.event_id);
            match self.zones.get(&zone_id) {
                Some((current, _)) if *current == version => {}
                Some((current, _)) if *current > version => {
                    rejections.push(reject(event, RejectReason::Stale))
                }
                _ => {
                    self.zones.insert(zone_id, (version, state));
                }
            }
        }
        let zones_after = self.live_zones();
        let changed: BTreeSet<ZoneId> = zones_before
            .keys()
            .chain(zones_after.keys())
            .filter(|id| zones_before.get(id) != zones_after.get(id))
            .copied()
            .collect();
        for zone_id in &changed {
            let courier_ids: Vec<CourierId> = self.couriers.keys().copied().collect();
            for courier_id in courier_ids {
                self.evaluate(courier_id, *zone_id, &zones_after);
            }
        }

        // 2. Fixes, last writer wins per courier.
        for event in &events {
            let EventBody::LocationUpdated(fix) = &event.body else {
                continue;
            };
            let version = (event.occurred_at, event.event_id);
            if let Some(courier) = self.couriers.get(&fix.courier_id) {
                let current = (courier.state.at, courier.state.event_id);
                if version == current {
                    continue;
                }
                if version < current {
                    rejections.push(reject(event, RejectReason::Stale));
                    continue;
                }
                // Faster than a courier moves from the latest accepted fix: refused.
                let distance_mm = (super::eta::great_circle_m(courier.state.position, fix.position)
                    * 1000.0)
                    .round() as u64;
                let elapsed_ms = event.occurred_at - courier.state.at;
                // mm per ms, compared without division: distance × 1000 > speed × time.
                if i128::from(distance_mm) * 1000
                    > i128::from(self.max_speed_mm_s) * i128::from(elapsed_ms)
                {
                    let reason = RejectReason::ImplausibleJump {
                        distance_mm,
                        elapsed_ms,
                        max_speed_mm_s: self.max_speed_mm_s,
                    };
                    rejections.push(reject(event, reason));
                    continue;
                }
            }
            let window = self.speed_window;
            let courier = self
                .couriers
                .entry(fix.courier_id)
                .or_insert_with(|| Courier {
                    state: CourierState {
                        position: fix.position,
                        at: event.occurred_at,
                        event_id: event.event_id,
                        speed_mm_s: None,
                        heading_ddeg: None,
                        odometer_mm: 0,
                        active_hours: 0,
                        presence: Vec::new(),
                    },
                    fixes: Vec::new(),
                    presence: BTreeMap::new(),
                });
            courier.fixes.push((event.occurred_at, fix.position));
            let odometer: u64 = courier
                .fixes
                .windows(2)
                .map(|w| (super::eta::great_circle_m(w[0].1, w[1].1) * 1000.0).round() as u64)
                .sum();
            let hours: BTreeSet<i64> = courier
                .fixes
                .iter()
                .map(|(at, _)| at.div_euclid(3_600_000))
                .collect();
            let recent = &courier.fixes[courier.fixes.len().saturating_sub(window)..];
            courier.state = CourierState {
                position: fix.position,
                at: event.occurred_at,
                event_id: event.event_id,
                speed_mm_s: fix
                    .speed_mm_s
                    .or_else(|| super::eta::window_speed_mm_s(recent)),
                heading_ddeg: fix.heading_ddeg,
                odometer_mm: odometer,
                active_hours: hours.len() as u32,
                presence: Vec::new(),
            };
            for zone_id in zones_after.keys() {
                self.evaluate(fix.courier_id, *zone_id, &zones_after);
            }
        }

        // 3. Deliveries through the lifecycle.
        for event in &events {
            if let Err(reason) = self.apply_delivery_event(event) {
                rejections.push(reject(event, reason));
            }
        }
        rejections.sort();
        rejections
    }

    /// Presence of one courier in one zone, at the courier's latest fix.
    fn evaluate(
        &mut self,
        courier_id: CourierId,
        zone_id: ZoneId,
        zones: &BTreeMap<ZoneId, ZoneState>,
    ) {
        let Some(courier) = self.couriers.get_mut(&courier_id) else {
            return;
        };
        let now = courier.state.at;
        match zones
            .get(&zone_id)
            .filter(|zone| zone.shape.contains(courier.state.position))
        {
            None => {
                courier.presence.remove(&zone_id);
            }
            Some(zone) => {
                // Nobody is present in a zone before its current version existed.
                let since = courier
                    .presence
                    .get(&zone_id)
                    .map_or(now.max(zone.updated_at), |(since, _)| *since);
                let member = zone.dwell_ms == 0 || now - since >= zone.dwell_ms;
                courier.presence.insert(zone_id, (since, member));
            }
        }
    }

    fn apply_delivery_event(&mut self, event: &Event) -> Result<(), RejectReason> {
        let at = event.occurred_at;
        let version = (at, event.event_id);
        match &event.body {
            EventBody::DeliveryCreated(created) => {
                match self.deliveries.get(&created.delivery_id) {
                    Some(existing) if existing.created_by == event.event_id => Ok(()),
                    Some(_) => Err(RejectReason::DeliveryExists),
                    None => {
                        let created_state = DeliveryState {
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
                        let delivery = Delivery {
                            created: created_state,
                            created_by: event.event_id,
                            history: BTreeMap::new(),
                            rating: None,
                            ratings: 0,
                            applied: HashSet::new(),
                        };
                        self.deliveries.insert(created.delivery_id, delivery);
                        Ok(())
                    }
                }
            }
            EventBody::StatusChanged(change) => {
                let delivery = self
                    .deliveries
                    .get_mut(&change.delivery_id)
                    .ok_or(RejectReason::UnknownDelivery)?;
                if delivery.applied.contains(&event.event_id) {
                    return Ok(());
                }
                // The status this event follows in event time, whatever arrived before it.
                let from = delivery.status_after(|key| *key < version);
                if !legal(from, change.status) {
                    return Err(RejectReason::IllegalTransition {
                        from,
                        to: change.status,
                    });
                }
                delivery
                    .history
                    .insert(version, (change.status, change.courier_id));
                delivery.applied.insert(event.event_id);
                Ok(())
            }
            EventBody::DeliveryRated(rated) => {
                let delivery = self
                    .deliveries
                    .get_mut(&rated.delivery_id)
                    .ok_or(RejectReason::UnknownDelivery)?;
                if delivery.applied.contains(&event.event_id) {
                    return Ok(());
                }
                let status = delivery.state().status;
                if status != Status::Delivered && status != Status::Failed {
                    return Err(RejectReason::NotRateable { status });
                }
                if delivery.ratings == 5 {
                    return Err(RejectReason::TooManyRatings { max: 5 });
                }
                if delivery
                    .rating
                    .as_ref()
                    .is_some_and(|(current, _)| *current > version)
                {
                    return Err(RejectReason::Stale);
                }
                let rating = Rating {
                    score: rated.score,
                    comment: rated.comment.clone(),
                    at,
                };
                delivery.rating = Some((version, rating));
                delivery.ratings += 1;
                delivery.applied.insert(event.event_id);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Every current record, computed from scratch.
    pub fn records(&self) -> BTreeSet<Change> {
        let mut records = BTreeSet::new();
        let zones = self.live_zones();
        for (id, zone) in &zones {
            records.insert(Change::Zone(*id, zone.clone()));
        }
        for (id, courier) in &self.couriers {
            let mut state = courier.state.clone();
            state.presence = courier
                .presence
                .iter()
                .map(|(zone_id, (since, _))| (*zone_id, *since))
                .collect();
            records.insert(Change::Courier(*id, state));
            for (zone_id, (_, confirmed)) in &courier.presence {
                if *confirmed {
                    records.insert(Change::Inside(*id, *zone_id));
                }
            }
        }
        let mut tallies: BTreeMap<Scope, Tally> = BTreeMap::new();
        for (id, courier) in &self.couriers {
            let tally = tallies.entry(Scope::Courier(*id)).or_default();
            tally.distance_mm += courier.state.odometer_mm as i64;
            tally.active_hours += i64::from(courier.state.active_hours);
        }
        for (id, delivery) in &self.deliveries {
            let state = &delivery.state();
            records.insert(Change::Delivery(*id, state.clone()));
            let dropoff_zones: Vec<ZoneId> = zones
                .iter()
                .filter(|(_, zone)| zone.shape.contains(state.dropoff))
                .map(|(zone_id, _)| *zone_id)
                .collect();
            for zone_id in &dropoff_zones {
                records.insert(Change::DropoffZone(*id, *zone_id));
            }
            let courier = state
                .courier_id
                .filter(|_| state.status.is_active())
                .and_then(|courier_id| self.couriers.get(&courier_id).map(|c| (courier_id, c)));
            if let Some((courier_id, courier)) = courier {
                let eta = super::eta::estimate(courier_id, &courier.state, state, &self.eta);
                records.insert(Change::Eta(*id, eta));
            }

            let mut scopes = vec![Scope::Overall];
            scopes.extend(state.courier_id.map(Scope::Courier));
            let created = DateTime::from_timestamp_millis(state.created_at).expect("valid time");
            let weekday = created.weekday().num_days_from_monday() as u8;
            let hour = created.hour() as u8;
            scopes.push(Scope::HourOfDay(hour));
            scopes.push(Scope::WeekdayHour(weekday, hour));
            scopes.extend(
                dropoff_zones
                    .iter()
                    .map(|zone_id| Scope::DropoffZone(*zone_id)),
            );
            for scope in scopes {
                let tally = tallies.entry(scope).or_default();
                tally.deliveries += 1;
                if state.status.is_active() {
                    tally.active += 1;
                }
                match state.status {
                    Status::Delivered => {
                        let ended = state.ended_at.expect("a delivered delivery has ended");
                        tally.delivered += 1;
                        tally.created_to_delivered_ms += (ended - state.created_at).max(0);
                        if let Some(picked_up) = state.picked_up_at {
                            tally.picked_up_delivered += 1;
                            tally.picked_up_to_delivered_ms += (ended - picked_up).max(0);
                        }
                        if let Some(promised_by) = state.promised_by {
                            tally.promised += 1;
                            if ended <= promised_by {
                                tally.on_time += 1;
                            }
                        }
                    }
                    Status::Failed => tally.failed += 1,
                    Status::Cancelled => tally.cancelled += 1,
                    _ => {}
                }
                if let Some(rating) = &state.rating {
                    tally.rated += 1;
                    tally.score_sum += i64::from(rating.score);
                    tally.score_histogram[usize::from(rating.score) - 1] += 1;
                }
            }
        }
        for (scope, tally) in tallies {
            if tally != Tally::default() {
                records.insert(Change::Metric(scope, tally));
            }
        }
        records
    }
}
