//! One epoch's output, reshaped into the rows the tables take: one column vector per
//! column, so that each table is written by one `UNNEST` statement, whatever the number of
//! rows.
//!
//! This is pure (no I/O), so that what goes where is tested without a database. The rules:
//! - a keyed collection (couriers, zones, deliveries, ETAs, metrics) whose key has a `+1`
//!   is an upsert with the new state; a key with only a `-1` is a delete;
//! - a set collection (inside, dropoff zones) inserts its `+1`s and deletes its `-1`s;
//! - `inside` also appends a geofence transition: `+1` entered, `-1` exited;
//! - the event log takes every event of the epoch except those refused for a reason other
//!   than `stale` (those are dead-lettered by the source instead): location fixes in
//!   `location_fixes`, the other kinds in `delivery_events`;
//! - a fix is *new* when the dataflow accepted it as newer than the courier's state before
//!   the epoch (the courier's retracted record, if any): no earlier epoch can have stored
//!   it, so it may be appended by COPY without a conflict check. Stale fixes and replays of
//!   the courier's latest fix may be stored already (a redelivery after a crash between
//!   commit and acknowledgement) and are inserted only where their key is missing.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use chrono::{DateTime, Utc};
use delivertrack_dataflow::contract::encode_event;
use delivertrack_dataflow::event::LocationUpdated;
use delivertrack_dataflow::geometry::ZoneShape;
use delivertrack_dataflow::model::{
    CourierState, DeliveryState, Eta, RejectReason, Scope, Tally, ZoneState,
};
use delivertrack_dataflow::{
    Change, CourierId, CustomerId, DeliveryId, EpochOutput, Event, EventBody, EventId, UnixMillis,
    ZoneId,
};
use serde_json::Value;
use uuid::Uuid;

/// A value of the epoch that the tables cannot hold; the epoch is refused as a whole.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// A time outside the range PostgreSQL and chrono share.
    #[error("{what} {millis} ms is not a representable time")]
    Time {
        /// Which field.
        what: &'static str,
        /// The value.
        millis: UnixMillis,
    },
    /// A counter beyond its column's integer type.
    #[error("{what} {value} does not fit its column")]
    TooLarge {
        /// Which field.
        what: &'static str,
        /// The value.
        value: u64,
    },
}

/// Every row one epoch writes, by table.
#[derive(Debug, Default)]
pub struct EpochBatch {
    /// The durable epoch number (see `pipeline_progress`).
    pub epoch: i64,
    /// `delivery_events`: every logged event but the location fixes.
    pub events: EventRows,
    /// `location_fixes` that no earlier epoch can have stored.
    pub fixes: FixRows,
    /// `location_fixes` that may be stored already: stale fixes and replays.
    pub fixes_seen: FixRows,
    /// Customer ids that new deliveries refer to (bare rows, inserted if new).
    pub customers: Vec<Uuid>,
    /// Courier ids that deliveries newly refer to (bare rows, inserted if new).
    pub courier_refs: Vec<Uuid>,
    /// `couriers`, the tracked columns, of couriers the dataflow did not track before the
    /// epoch.
    pub couriers: CourierRows,
    /// `couriers` whose tracked record the epoch replaced. Their rows were written by an
    /// earlier epoch, so a plain `UPDATE` suffices (see `service::apply`).
    pub couriers_changed: CourierRows,
    /// Couriers the dataflow no longer tracks: their tracked columns are cleared, their
    /// profile stays.
    pub couriers_untracked: Vec<Uuid>,
    /// `zones`.
    pub zones: ZoneRows,
    /// Deleted zones.
    pub zones_deleted: Vec<Uuid>,
    /// `deliveries`.
    pub deliveries: DeliveryRows,
    /// Deliveries that disappeared.
    pub deliveries_deleted: Vec<Uuid>,
    /// `ratings`.
    pub ratings: RatingRows,
    /// Ratings that disappeared (the delivery's new state has none).
    pub ratings_deleted: Vec<Uuid>,
    /// `etas`.
    pub etas: EtaRows,
    /// ETAs that ended (the delivery is no longer active).
    pub etas_deleted: Vec<Uuid>,
    /// `delivery_dropoff_zones` gained.
    pub dropoffs_added: PairRows,
    /// `delivery_dropoff_zones` lost.
    pub dropoffs_removed: PairRows,
    /// `zone_occupancy` gained: `(courier, zone)`.
    pub inside_added: PairRows,
    /// `zone_occupancy` lost.
    pub inside_removed: PairRows,
    /// `geofence_transitions`.
    pub transitions: TransitionRows,
    /// `metrics` of scopes that had no tally before the epoch.
    pub metrics: MetricRows,
    /// `metrics` whose tally the epoch replaced (rows an earlier epoch wrote).
    pub metrics_changed: MetricRows,
    /// Scopes whose tally went back to zero: `(scope, scope_key)`.
    pub metrics_deleted: (Vec<String>, Vec<String>),
}

/// Columns of `delivery_events`.
#[derive(Debug, Default)]
pub struct EventRows {
    pub event_id: Vec<Uuid>,
    pub kind: Vec<String>,
    pub occurred_at: Vec<DateTime<Utc>>,
    pub delivery_id: Vec<Option<Uuid>>,
    pub courier_id: Vec<Option<Uuid>>,
    pub zone_id: Vec<Option<Uuid>>,
    pub payload: Vec<Value>,
    pub stale: Vec<bool>,
}

/// Columns of `location_fixes` (`epoch` and `recorded_at` excepted).
#[derive(Debug, Default)]
pub struct FixRows {
    pub courier_id: Vec<Uuid>,
    pub occurred_at: Vec<DateTime<Utc>>,
    pub event_id: Vec<Uuid>,
    pub lat: Vec<f64>,
    pub lon: Vec<f64>,
    pub speed_mm_s: Vec<Option<i32>>,
    pub accuracy_cm: Vec<Option<i32>>,
    pub heading_ddeg: Vec<Option<i16>>,
    pub stale: Vec<bool>,
}

impl FixRows {
    /// Rows held.
    pub fn len(&self) -> usize {
        self.event_id.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.event_id.is_empty()
    }

    fn push(
        &mut self,
        event: &Event,
        fix: &LocationUpdated,
        stale: bool,
    ) -> Result<(), BatchError> {
        self.courier_id.push(fix.courier_id.0);
        self.occurred_at
            .push(time("location_fixes.occurred_at", event.occurred_at)?);
        self.event_id.push(event.event_id.0);
        self.lat.push(fix.position.lat());
        self.lon.push(fix.position.lon());
        self.speed_mm_s.push(
            fix.speed_mm_s
                .map(|v| int("location_fixes.speed_mm_s", v))
                .transpose()?,
        );
        self.accuracy_cm.push(
            fix.accuracy_cm
                .map(|v| int("location_fixes.accuracy_cm", v))
                .transpose()?,
        );
        self.heading_ddeg.push(
            fix.heading_ddeg
                .map(|v| int("location_fixes.heading_ddeg", u32::from(v)))
                .transpose()?,
        );
        self.stale.push(stale);
        Ok(())
    }
}

/// The tracked columns of `couriers`.
#[derive(Debug, Default)]
pub struct CourierRows {
    pub id: Vec<Uuid>,
    pub lat: Vec<f64>,
    pub lon: Vec<f64>,
    pub last_fix_at: Vec<DateTime<Utc>>,
    pub last_event_id: Vec<Uuid>,
    pub speed_mm_s: Vec<Option<i64>>,
    pub heading_ddeg: Vec<Option<i32>>,
    pub odometer_mm: Vec<i64>,
    pub active_hours: Vec<i64>,
    /// `[[zone_id, since_ms], ...]`, sorted by zone.
    pub presence: Vec<Value>,
}

/// Columns of `zones`.
#[derive(Debug, Default)]
pub struct ZoneRows {
    pub id: Vec<Uuid>,
    pub name: Vec<String>,
    pub geometry: Vec<Value>,
    pub dwell_ms: Vec<i64>,
    pub updated_at: Vec<DateTime<Utc>>,
    pub event_id: Vec<Uuid>,
}

/// Columns of `deliveries`.
#[derive(Debug, Default)]
pub struct DeliveryRows {
    pub id: Vec<Uuid>,
    pub customer_id: Vec<Uuid>,
    pub courier_id: Vec<Option<Uuid>>,
    pub status: Vec<String>,
    pub pickup_lat: Vec<f64>,
    pub pickup_lon: Vec<f64>,
    pub dropoff_lat: Vec<f64>,
    pub dropoff_lon: Vec<f64>,
    pub promised_by: Vec<Option<DateTime<Utc>>>,
    pub created_at: Vec<DateTime<Utc>>,
    pub assigned_at: Vec<Option<DateTime<Utc>>>,
    pub picked_up_at: Vec<Option<DateTime<Utc>>>,
    pub ended_at: Vec<Option<DateTime<Utc>>>,
    pub rating: Vec<Option<i16>>,
    pub version: Vec<i64>,
}

/// Columns of `ratings`.
#[derive(Debug, Default)]
pub struct RatingRows {
    pub delivery_id: Vec<Uuid>,
    pub customer_id: Vec<Uuid>,
    pub courier_id: Vec<Option<Uuid>>,
    pub score: Vec<i16>,
    pub comment: Vec<Option<String>>,
    pub rated_at: Vec<DateTime<Utc>>,
}

/// Columns of `etas`.
#[derive(Debug, Default)]
pub struct EtaRows {
    pub delivery_id: Vec<Uuid>,
    pub courier_id: Vec<Uuid>,
    pub status: Vec<String>,
    pub remaining_m: Vec<i64>,
    pub speed_mm_s: Vec<i64>,
    pub eta_at: Vec<DateTime<Utc>>,
    pub as_of: Vec<DateTime<Utc>>,
}

/// Two id columns: `(delivery, zone)` or `(courier, zone)`.
#[derive(Debug, Default)]
pub struct PairRows {
    pub left: Vec<Uuid>,
    pub zone: Vec<Uuid>,
}

/// Columns of `geofence_transitions`.
#[derive(Debug, Default)]
pub struct TransitionRows {
    pub courier_id: Vec<Uuid>,
    pub zone_id: Vec<Uuid>,
    pub direction: Vec<String>,
    pub occurred_at: Vec<Option<DateTime<Utc>>>,
}

/// Columns of `metrics` (the generated ones excepted).
#[derive(Debug, Default)]
pub struct MetricRows {
    pub scope: Vec<String>,
    pub scope_key: Vec<String>,
    pub courier_id: Vec<Option<Uuid>>,
    pub zone_id: Vec<Option<Uuid>>,
    pub weekday: Vec<Option<i16>>,
    pub hour: Vec<Option<i16>>,
    pub deliveries: Vec<i64>,
    pub active: Vec<i64>,
    pub delivered: Vec<i64>,
    pub failed: Vec<i64>,
    pub cancelled: Vec<i64>,
    pub promised: Vec<i64>,
    pub on_time: Vec<i64>,
    pub created_to_delivered_ms: Vec<i64>,
    pub picked_up_delivered: Vec<i64>,
    pub picked_up_to_delivered_ms: Vec<i64>,
    pub rated: Vec<i64>,
    pub score_sum: Vec<i64>,
    pub score_1: Vec<i64>,
    pub score_2: Vec<i64>,
    pub score_3: Vec<i64>,
    pub score_4: Vec<i64>,
    pub score_5: Vec<i64>,
    pub distance_mm: Vec<i64>,
    pub active_hours: Vec<i64>,
}

/// A keyed collection's changes in one epoch: the new state of every key that has one, and
/// the keys whose record went away without a successor.
struct Keyed<K, V> {
    upserts: BTreeMap<K, V>,
    retracted: BTreeMap<K, V>,
}

impl<K: Ord + Copy, V> Keyed<K, V> {
    fn new() -> Self {
        Self {
            upserts: BTreeMap::new(),
            retracted: BTreeMap::new(),
        }
    }

    fn push(&mut self, key: K, value: V, diff: i64) {
        if diff > 0 {
            self.upserts.insert(key, value);
        } else if diff < 0 {
            self.retracted.insert(key, value);
        }
    }

    /// Keys with a `-1` and no `+1`.
    fn deleted(&self) -> impl Iterator<Item = (&K, &V)> {
        self.retracted
            .iter()
            .filter(|(key, _)| !self.upserts.contains_key(key))
    }
}

/// The changes of one epoch, sorted by collection.
struct Sorted<'a> {
    couriers: Keyed<CourierId, &'a CourierState>,
    zones: Keyed<ZoneId, &'a ZoneState>,
    deliveries: Keyed<DeliveryId, &'a DeliveryState>,
    etas: Keyed<DeliveryId, &'a Eta>,
    metrics: Keyed<Scope, &'a Tally>,
    inside: Vec<(CourierId, ZoneId, i64)>,
    dropoffs: Vec<(DeliveryId, ZoneId, i64)>,
}

impl<'a> Sorted<'a> {
    fn new(output: &'a EpochOutput) -> Self {
        let mut sorted = Sorted {
            couriers: Keyed::new(),
            zones: Keyed::new(),
            deliveries: Keyed::new(),
            etas: Keyed::new(),
            metrics: Keyed::new(),
            inside: Vec::new(),
            dropoffs: Vec::new(),
        };
        for (change, diff) in &output.changes {
            let diff = *diff;
            match change {
                Change::Courier(id, state) => sorted.couriers.push(*id, state, diff),
                Change::Zone(id, state) => sorted.zones.push(*id, state, diff),
                Change::Delivery(id, state) => sorted.deliveries.push(*id, state, diff),
                Change::Eta(id, eta) => sorted.etas.push(*id, eta, diff),
                Change::Metric(scope, tally) => sorted.metrics.push(*scope, tally, diff),
                Change::Inside(courier, zone) => sorted.inside.push((*courier, *zone, diff)),
                Change::DropoffZone(delivery, zone) => {
                    sorted.dropoffs.push((*delivery, *zone, diff));
                }
            }
        }
        sorted
    }
}

impl EpochBatch {
    /// The rows of `output`, to be written as epoch `epoch`.
    ///
    /// # Errors
    /// [`BatchError`] when a value cannot be stored (a time beyond the representable range,
    /// a counter beyond `bigint`); validated input never produces one.
    pub fn new(output: &EpochOutput, epoch: i64) -> Result<Self, BatchError> {
        let sorted = Sorted::new(output);
        let mut batch = EpochBatch {
            epoch,
            ..EpochBatch::default()
        };
        (batch.events, batch.fixes, batch.fixes_seen) = event_rows(output, &sorted.couriers)?;
        batch.add_couriers(&sorted)?;
        batch.add_zones(&sorted)?;
        batch.add_deliveries(&sorted)?;
        batch.add_etas(&sorted)?;
        batch.add_metrics(&sorted)?;
        for (delivery, zone, diff) in &sorted.dropoffs {
            let rows = if *diff > 0 {
                &mut batch.dropoffs_added
            } else {
                &mut batch.dropoffs_removed
            };
            rows.left.push(delivery.0);
            rows.zone.push(zone.0);
        }
        batch.add_inside(output, &sorted)?;
        Ok(batch)
    }

    /// Rows written, all tables together (for logs and throughput figures).
    pub fn row_count(&self) -> usize {
        self.events.event_id.len()
            + self.fixes.len()
            + self.fixes_seen.len()
            + self.couriers.id.len()
            + self.couriers_changed.id.len()
            + self.couriers_untracked.len()
            + self.zones.id.len()
            + self.zones_deleted.len()
            + self.deliveries.id.len()
            + self.deliveries_deleted.len()
            + self.ratings.delivery_id.len()
            + self.ratings_deleted.len()
            + self.etas.delivery_id.len()
            + self.etas_deleted.len()
            + self.dropoffs_added.left.len()
            + self.dropoffs_removed.left.len()
            + self.inside_added.left.len()
            + self.inside_removed.left.len()
            + self.transitions.courier_id.len()
            + self.metrics.scope.len()
            + self.metrics_changed.scope.len()
            + self.metrics_deleted.0.len()
    }

    fn add_couriers(&mut self, sorted: &Sorted<'_>) -> Result<(), BatchError> {
        for (id, state) in &sorted.couriers.upserts {
            let rows = if sorted.couriers.retracted.contains_key(id) {
                &mut self.couriers_changed
            } else {
                &mut self.couriers
            };
            rows.id.push(id.0);
            rows.lat.push(state.position.lat());
            rows.lon.push(state.position.lon());
            rows.last_fix_at
                .push(time("couriers.last_fix_at", state.at)?);
            rows.last_event_id.push(state.event_id.0);
            rows.speed_mm_s.push(state.speed_mm_s.map(i64::from));
            rows.heading_ddeg.push(state.heading_ddeg.map(i32::from));
            rows.odometer_mm
                .push(bigint("couriers.odometer_mm", state.odometer_mm)?);
            rows.active_hours.push(i64::from(state.active_hours));
            rows.presence.push(presence_json(&state.presence));
        }
        self.couriers_untracked
            .extend(sorted.couriers.deleted().map(|(id, _)| id.0));
        Ok(())
    }

    fn add_zones(&mut self, sorted: &Sorted<'_>) -> Result<(), BatchError> {
        for (id, state) in &sorted.zones.upserts {
            let rows = &mut self.zones;
            rows.id.push(id.0);
            rows.name.push(state.name.clone());
            rows.geometry.push(geojson(&state.shape));
            rows.dwell_ms.push(state.dwell_ms);
            rows.updated_at
                .push(time("zones.updated_at", state.updated_at)?);
            rows.event_id.push(state.event_id.0);
        }
        self.zones_deleted
            .extend(sorted.zones.deleted().map(|(id, _)| id.0));
        Ok(())
    }

    fn add_deliveries(&mut self, sorted: &Sorted<'_>) -> Result<(), BatchError> {
        let mut customers = BTreeSet::<CustomerId>::new();
        let mut couriers = BTreeSet::<CourierId>::new();
        for (id, state) in &sorted.deliveries.upserts {
            // A reference is new only where the delivery is new or changed courier: the
            // rows its record referred to before were inserted with it (and are never
            // deleted), so the common epoch sends no reference statement.
            let before = sorted.deliveries.retracted.get(id);
            if before.is_none_or(|old| old.customer_id != state.customer_id) {
                customers.insert(state.customer_id);
            }
            if before.is_none_or(|old| old.courier_id != state.courier_id) {
                couriers.extend(state.courier_id);
            }
            let rows = &mut self.deliveries;
            rows.id.push(id.0);
            rows.customer_id.push(state.customer_id.0);
            rows.courier_id.push(state.courier_id.map(|c| c.0));
            rows.status.push(state.status.as_str().to_owned());
            rows.pickup_lat.push(state.pickup.lat());
            rows.pickup_lon.push(state.pickup.lon());
            rows.dropoff_lat.push(state.dropoff.lat());
            rows.dropoff_lon.push(state.dropoff.lon());
            rows.promised_by
                .push(optional_time("deliveries.promised_by", state.promised_by)?);
            rows.created_at
                .push(time("deliveries.created_at", state.created_at)?);
            rows.assigned_at
                .push(optional_time("deliveries.assigned_at", state.assigned_at)?);
            rows.picked_up_at.push(optional_time(
                "deliveries.picked_up_at",
                state.picked_up_at,
            )?);
            rows.ended_at
                .push(optional_time("deliveries.ended_at", state.ended_at)?);
            rows.rating
                .push(state.rating.as_ref().map(|r| i16::from(r.score)));
            rows.version.push(i64::from(state.version));

            match &state.rating {
                Some(rating) => {
                    let rows = &mut self.ratings;
                    rows.delivery_id.push(id.0);
                    rows.customer_id.push(state.customer_id.0);
                    rows.courier_id.push(state.courier_id.map(|c| c.0));
                    rows.score.push(i16::from(rating.score));
                    rows.comment.push(rating.comment.clone());
                    rows.rated_at.push(time("ratings.rated_at", rating.at)?);
                }
                None => {
                    let had_one = sorted
                        .deliveries
                        .retracted
                        .get(id)
                        .is_some_and(|old| old.rating.is_some());
                    if had_one {
                        self.ratings_deleted.push(id.0);
                    }
                }
            }
        }
        // Deleting a delivery deletes its rating, ETA and dropoff zones (ON DELETE CASCADE).
        self.deliveries_deleted
            .extend(sorted.deliveries.deleted().map(|(id, _)| id.0));
        self.customers = customers.into_iter().map(|c| c.0).collect();
        self.courier_refs = couriers.into_iter().map(|c| c.0).collect();
        Ok(())
    }

    fn add_etas(&mut self, sorted: &Sorted<'_>) -> Result<(), BatchError> {
        for (id, eta) in &sorted.etas.upserts {
            let rows = &mut self.etas;
            rows.delivery_id.push(id.0);
            rows.courier_id.push(eta.courier_id.0);
            rows.status.push(eta.status.as_str().to_owned());
            rows.remaining_m.push(i64::from(eta.remaining_m));
            rows.speed_mm_s.push(i64::from(eta.speed_mm_s));
            rows.eta_at.push(time("etas.eta_at", eta.eta_at)?);
            rows.as_of.push(time("etas.as_of", eta.as_of)?);
        }
        self.etas_deleted
            .extend(sorted.etas.deleted().map(|(id, _)| id.0));
        Ok(())
    }

    fn add_metrics(&mut self, sorted: &Sorted<'_>) -> Result<(), BatchError> {
        for (scope, tally) in &sorted.metrics.upserts {
            let key = ScopeKey::of(scope);
            let rows = if sorted.metrics.retracted.contains_key(scope) {
                &mut self.metrics_changed
            } else {
                &mut self.metrics
            };
            rows.scope.push(key.scope.to_owned());
            rows.scope_key.push(key.key);
            rows.courier_id.push(key.courier_id);
            rows.zone_id.push(key.zone_id);
            rows.weekday.push(key.weekday);
            rows.hour.push(key.hour);
            rows.deliveries.push(tally.deliveries);
            rows.active.push(tally.active);
            rows.delivered.push(tally.delivered);
            rows.failed.push(tally.failed);
            rows.cancelled.push(tally.cancelled);
            rows.promised.push(tally.promised);
            rows.on_time.push(tally.on_time);
            rows.created_to_delivered_ms
                .push(tally.created_to_delivered_ms);
            rows.picked_up_delivered.push(tally.picked_up_delivered);
            rows.picked_up_to_delivered_ms
                .push(tally.picked_up_to_delivered_ms);
            rows.rated.push(tally.rated);
            rows.score_sum.push(tally.score_sum);
            let [s1, s2, s3, s4, s5] = tally.score_histogram;
            rows.score_1.push(s1);
            rows.score_2.push(s2);
            rows.score_3.push(s3);
            rows.score_4.push(s4);
            rows.score_5.push(s5);
            rows.distance_mm.push(tally.distance_mm);
            rows.active_hours.push(tally.active_hours);
        }
        for (scope, _) in sorted.metrics.deleted() {
            let key = ScopeKey::of(scope);
            self.metrics_deleted.0.push(key.scope.to_owned());
            self.metrics_deleted.1.push(key.key);
        }
        Ok(())
    }

    /// Occupancy and transitions. A transition's time is the best the epoch tells: the
    /// courier's newest fix in it, else the zone's upsert or deletion in it, else the
    /// newest event of the epoch.
    fn add_inside(&mut self, output: &EpochOutput, sorted: &Sorted<'_>) -> Result<(), BatchError> {
        if sorted.inside.is_empty() {
            return Ok(());
        }
        let mut zone_times: BTreeMap<ZoneId, UnixMillis> = sorted
            .zones
            .upserts
            .iter()
            .map(|(id, state)| (*id, state.updated_at))
            .collect();
        for event in &output.events {
            if let EventBody::ZoneDeleted(body) = &event.body
                && !sorted.zones.upserts.contains_key(&body.zone_id)
            {
                let at = zone_times.entry(body.zone_id).or_insert(event.occurred_at);
                *at = (*at).max(event.occurred_at);
            }
        }
        let newest = output.events.iter().map(|e| e.occurred_at).max();
        for (courier, zone, diff) in &sorted.inside {
            let (rows, direction) = if *diff > 0 {
                (&mut self.inside_added, "entered")
            } else {
                (&mut self.inside_removed, "exited")
            };
            rows.left.push(courier.0);
            rows.zone.push(zone.0);
            let at = sorted
                .couriers
                .upserts
                .get(courier)
                .map(|state| state.at)
                .or_else(|| zone_times.get(zone).copied())
                .or(newest);
            let transitions = &mut self.transitions;
            transitions.courier_id.push(courier.0);
            transitions.zone_id.push(zone.0);
            transitions.direction.push(direction.to_owned());
            transitions
                .occurred_at
                .push(optional_time("geofence_transitions.occurred_at", at)?);
        }
        Ok(())
    }
}

/// A courier's presence as stored in `couriers.presence`: `[[zone_id, since_ms], ...]`.
fn presence_json(presence: &[(ZoneId, UnixMillis)]) -> Value {
    Value::Array(
        presence
            .iter()
            .map(|(zone, since)| {
                Value::Array(vec![Value::from(zone.0.to_string()), Value::from(*since)])
            })
            .collect(),
    )
}

/// The event log's rows: every event except those refused for a reason other than
/// `stale`, once per event id; the location fixes apart, split into those no earlier epoch
/// can have stored and those that may be stored already.
///
/// A fix the dataflow accepted is newer than its courier's state at the moment it was
/// applied, so newer than the courier's state before the epoch — the record `couriers`
/// retracts, which an earlier epoch committed together with every fix up to it. A fix that
/// is not newer than that record is a replay of the courier's latest fix (the dataflow
/// accepts it as changing nothing) or stale; both may have been stored by an earlier epoch.
fn event_rows(
    output: &EpochOutput,
    couriers: &Keyed<CourierId, &CourierState>,
) -> Result<(EventRows, FixRows, FixRows), BatchError> {
    let (stale, refused): (Vec<_>, Vec<_>) = output
        .rejections
        .iter()
        .partition(|rejection| rejection.reason == RejectReason::Stale);
    let stale: HashSet<EventId> = stale.into_iter().map(|r| r.event_id).collect();
    let refused: HashSet<EventId> = refused.into_iter().map(|r| r.event_id).collect();
    let mut seen = HashSet::with_capacity(output.events.len());
    let mut rows = EventRows::default();
    let (mut fixes, mut fixes_seen) = (FixRows::default(), FixRows::default());
    for event in &output.events {
        if refused.contains(&event.event_id) || !seen.insert(event.event_id) {
            continue;
        }
        let is_stale = stale.contains(&event.event_id);
        let (delivery, courier, zone) = match &event.body {
            EventBody::LocationUpdated(fix) => {
                let version = (event.occurred_at, event.event_id);
                let new = !is_stale
                    && couriers.upserts.contains_key(&fix.courier_id)
                    && couriers
                        .retracted
                        .get(&fix.courier_id)
                        .is_none_or(|before| version > (before.at, before.event_id));
                let rows = if new { &mut fixes } else { &mut fixes_seen };
                rows.push(event, fix, is_stale)?;
                continue;
            }
            EventBody::DeliveryCreated(body) => (Some(body.delivery_id.0), None, None),
            EventBody::StatusChanged(body) => {
                (Some(body.delivery_id.0), body.courier_id.map(|c| c.0), None)
            }
            EventBody::DeliveryRated(body) => (Some(body.delivery_id.0), None, None),
            EventBody::ZoneUpserted(body) => (None, None, Some(body.zone_id.0)),
            EventBody::ZoneDeleted(body) => (None, None, Some(body.zone_id.0)),
        };
        rows.event_id.push(event.event_id.0);
        rows.kind.push(event.kind().as_str().to_owned());
        rows.occurred_at
            .push(time("delivery_events.occurred_at", event.occurred_at)?);
        rows.delivery_id.push(delivery);
        rows.courier_id.push(courier);
        rows.zone_id.push(zone);
        rows.payload.push(encode_event(event));
        rows.stale.push(is_stale);
    }
    Ok((rows, fixes, fixes_seen))
}

/// How a [`Scope`] is keyed in `metrics`.
#[derive(Debug, PartialEq, Eq)]
pub struct ScopeKey {
    /// The family: `overall`, `courier`, `dropoff_zone`, `hour_of_day`, `weekday_hour`.
    pub scope: &'static str,
    /// The key within the family, as text.
    pub key: String,
    /// The typed key columns.
    pub courier_id: Option<Uuid>,
    /// ...
    pub zone_id: Option<Uuid>,
    /// ...
    pub weekday: Option<i16>,
    /// ...
    pub hour: Option<i16>,
}

impl ScopeKey {
    /// The row key of a scope.
    pub fn of(scope: &Scope) -> Self {
        let blank = |scope, key| ScopeKey {
            scope,
            key,
            courier_id: None,
            zone_id: None,
            weekday: None,
            hour: None,
        };
        match *scope {
            Scope::Overall => blank("overall", String::new()),
            Scope::Courier(id) => ScopeKey {
                courier_id: Some(id.0),
                ..blank("courier", id.to_string())
            },
            Scope::DropoffZone(id) => ScopeKey {
                zone_id: Some(id.0),
                ..blank("dropoff_zone", id.to_string())
            },
            Scope::HourOfDay(hour) => ScopeKey {
                hour: Some(i16::from(hour)),
                ..blank("hour_of_day", hour.to_string())
            },
            Scope::WeekdayHour(weekday, hour) => ScopeKey {
                weekday: Some(i16::from(weekday)),
                hour: Some(i16::from(hour)),
                ..blank("weekday_hour", format!("{weekday}:{hour}"))
            },
        }
    }
}

/// The zone's GeoJSON geometry as the contract writes it: a Polygon when the shape has one
/// part, a MultiPolygon otherwise.
fn geojson(shape: &ZoneShape) -> Value {
    let value = match shape.0.0.as_slice() {
        [polygon] => geojson::Value::from(polygon),
        _ => geojson::Value::from(&shape.0),
    };
    Value::Object(geojson::JsonObject::from(&value))
}

fn time(what: &'static str, millis: UnixMillis) -> Result<DateTime<Utc>, BatchError> {
    DateTime::from_timestamp_millis(millis).ok_or(BatchError::Time { what, millis })
}

fn optional_time(
    what: &'static str,
    millis: Option<UnixMillis>,
) -> Result<Option<DateTime<Utc>>, BatchError> {
    millis.map(|millis| time(what, millis)).transpose()
}

fn bigint(what: &'static str, value: u64) -> Result<i64, BatchError> {
    i64::try_from(value).map_err(|_| BatchError::TooLarge { what, value })
}

/// A device's integer field into its column's type.
fn int<T: TryFrom<u32>>(what: &'static str, value: u32) -> Result<T, BatchError> {
    T::try_from(value).map_err(|_| BatchError::TooLarge {
        what,
        value: u64::from(value),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use delivertrack_dataflow::event::{LocationUpdated, StatusChanged, ZoneDeleted};
    use delivertrack_dataflow::geometry::GeoPoint;
    use delivertrack_dataflow::model::Rejection;
    use delivertrack_dataflow::{EventKind, Status};
    use geo::{MultiPolygon, polygon};

    use super::*;

    const T: UnixMillis = 1_796_025_600_000;

    fn uuid(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    fn fix(n: u128, courier: u128, at: UnixMillis) -> Event {
        Event {
            event_id: EventId(uuid(n)),
            occurred_at: at,
            body: EventBody::LocationUpdated(LocationUpdated {
                courier_id: CourierId(uuid(courier)),
                position: GeoPoint::from_degrees(52.5, 13.4),
                speed_mm_s: None,
                heading_ddeg: None,
                accuracy_cm: None,
            }),
        }
    }

    fn zone(name: &str, at: UnixMillis) -> ZoneState {
        ZoneState {
            name: name.to_owned(),
            shape: ZoneShape(MultiPolygon(vec![polygon![
                (x: 13.0, y: 52.0), (x: 13.1, y: 52.0), (x: 13.1, y: 52.1), (x: 13.0, y: 52.0)
            ]])),
            dwell_ms: 0,
            updated_at: at,
            event_id: EventId(uuid(900)),
        }
    }

    fn courier(at: UnixMillis) -> CourierState {
        CourierState {
            position: GeoPoint::from_degrees(52.05, 13.05),
            at,
            event_id: EventId(uuid(1)),
            speed_mm_s: Some(4_200),
            heading_ddeg: Some(900),
            odometer_mm: 12_345,
            active_hours: 1,
            presence: Vec::new(),
        }
    }

    fn rejection(n: u128, reason: RejectReason) -> Rejection {
        Rejection {
            event_id: EventId(uuid(n)),
            kind: EventKind::LocationUpdated,
            reason,
        }
    }

    #[test]
    fn the_log_keeps_accepted_and_stale_events_once_and_drops_refused_ones() {
        let refused = Event {
            event_id: EventId(uuid(2)),
            occurred_at: T,
            body: EventBody::StatusChanged(StatusChanged {
                delivery_id: DeliveryId(uuid(77)),
                status: Status::Cancelled,
                courier_id: None,
            }),
        };
        let deleted = Event {
            event_id: EventId(uuid(4)),
            occurred_at: T,
            body: EventBody::ZoneDeleted(ZoneDeleted {
                zone_id: ZoneId(uuid(21)),
            }),
        };
        let output = EpochOutput {
            restored: false,
            epoch: 4,
            events: vec![
                fix(1, 10, T),
                refused,
                fix(3, 10, T - 5),
                fix(1, 10, T),
                deleted,
            ],
            changes: vec![(Change::Courier(CourierId(uuid(10)), courier(T)), 1)],
            rejections: vec![
                rejection(2, RejectReason::UnknownDelivery),
                rejection(3, RejectReason::Stale),
            ],
        };
        let batch = EpochBatch::new(&output, 40).unwrap();
        assert_eq!(batch.epoch, 40);
        assert_eq!(batch.events.event_id, vec![uuid(4)]);
        assert_eq!(batch.events.payload[0]["kind"], "zone.deleted");
        assert_eq!(batch.fixes.event_id, vec![uuid(1)]);
        assert_eq!(batch.fixes.courier_id, vec![uuid(10)]);
        assert_eq!(batch.fixes.stale, vec![false]);
        assert_eq!(batch.fixes_seen.event_id, vec![uuid(3)]);
        assert_eq!(batch.fixes_seen.stale, vec![true]);
    }

    #[test]
    fn only_fixes_newer_than_the_courier_before_the_epoch_count_as_new() {
        let moved = CourierId(uuid(10));
        let before = CourierState {
            event_id: EventId(uuid(5)),
            ..courier(T)
        };
        let after = CourierState {
            event_id: EventId(uuid(7)),
            ..courier(T + 20)
        };
        let output = EpochOutput {
            restored: false,
            epoch: 9,
            // The courier's latest fix again (a redelivery the dataflow accepts as a
            // replay), two newer ones, and a fix of a courier whose state did not change: a
            // replay too.
            events: vec![
                fix(5, 10, T),
                fix(6, 10, T + 10),
                fix(7, 10, T + 20),
                fix(8, 11, T),
            ],
            changes: vec![
                (Change::Courier(moved, before), -1),
                (Change::Courier(moved, after), 1),
            ],
            rejections: Vec::new(),
        };
        let batch = EpochBatch::new(&output, 9).unwrap();
        assert_eq!(batch.fixes.event_id, vec![uuid(6), uuid(7)]);
        assert_eq!(batch.fixes_seen.event_id, vec![uuid(5), uuid(8)]);
        assert_eq!(batch.fixes_seen.stale, vec![false, false]);
        assert_eq!(batch.row_count(), 5);
    }

    #[test]
    fn upserts_keep_the_new_state_and_lone_retractions_become_deletes() {
        let (z1, z2) = (ZoneId(uuid(21)), ZoneId(uuid(22)));
        let output = EpochOutput {
            restored: false,
            epoch: 0,
            events: Vec::new(),
            changes: vec![
                (Change::Zone(z1, zone("old", T - 10)), -1),
                (Change::Zone(z1, zone("new", T)), 1),
                (Change::Zone(z2, zone("gone", T - 10)), -1),
                (Change::Metric(Scope::Overall, Tally::default()), -1),
                (
                    Change::Metric(
                        Scope::Overall,
                        Tally {
                            deliveries: 2,
                            score_histogram: [0, 0, 0, 1, 0],
                            ..Tally::default()
                        },
                    ),
                    1,
                ),
                (
                    Change::Metric(Scope::WeekdayHour(0, 3), Tally::default()),
                    -1,
                ),
            ],
            rejections: Vec::new(),
        };
        let batch = EpochBatch::new(&output, 0).unwrap();
        assert_eq!(batch.zones.id, vec![z1.0]);
        assert_eq!(batch.zones.name, vec!["new".to_owned()]);
        assert_eq!(batch.zones.geometry[0]["type"], "Polygon");
        assert_eq!(batch.zones_deleted, vec![z2.0]);
        assert_eq!(batch.metrics_changed.scope, vec!["overall".to_owned()]);
        assert_eq!(batch.metrics_changed.scope_key, vec![String::new()]);
        assert_eq!(
            (
                batch.metrics_changed.deliveries[0],
                batch.metrics_changed.score_4[0]
            ),
            (2, 1)
        );
        assert_eq!(
            batch.metrics_deleted,
            (vec!["weekday_hour".to_owned()], vec!["0:3".to_owned()])
        );
    }

    #[test]
    fn transitions_take_the_best_time_the_epoch_tells() {
        let (moved, still) = (CourierId(uuid(10)), CourierId(uuid(11)));
        let (entered, deleted) = (ZoneId(uuid(21)), ZoneId(uuid(22)));
        let deletion = Event {
            event_id: EventId(uuid(5)),
            occurred_at: T + 7,
            body: EventBody::ZoneDeleted(ZoneDeleted { zone_id: deleted }),
        };
        let output = EpochOutput {
            restored: false,
            epoch: 0,
            events: vec![fix(4, 10, T + 3), deletion],
            changes: vec![
                (Change::Courier(moved, courier(T + 3)), 1),
                (Change::Inside(moved, entered), 1),
                (Change::Inside(still, deleted), -1),
                (Change::Zone(deleted, zone("gone", T - 10)), -1),
            ],
            rejections: Vec::new(),
        };
        let batch = EpochBatch::new(&output, 0).unwrap();
        let t = &batch.transitions;
        assert_eq!(t.direction, vec!["entered".to_owned(), "exited".to_owned()]);
        assert_eq!(
            t.occurred_at,
            vec![
                DateTime::from_timestamp_millis(T + 3),
                DateTime::from_timestamp_millis(T + 7)
            ]
        );
        assert_eq!(batch.inside_added.left, vec![moved.0]);
        assert_eq!(batch.inside_removed.zone, vec![deleted.0]);
        assert_eq!(batch.couriers.odometer_mm, vec![12_345]);
    }

    #[test]
    fn scope_keys_are_readable_and_typed() {
        let key = ScopeKey::of(&Scope::WeekdayHour(6, 23));
        assert_eq!((key.scope, key.key.as_str()), ("weekday_hour", "6:23"));
        assert_eq!((key.weekday, key.hour), (Some(6), Some(23)));
        let courier = ScopeKey::of(&Scope::Courier(CourierId(uuid(9))));
        assert_eq!(courier.courier_id, Some(uuid(9)));
        assert_eq!(courier.key, uuid(9).to_string());
    }
}
