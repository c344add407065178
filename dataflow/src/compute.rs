//! The dataflow: from a stream of validated events to every maintained collection.
//!
//! ```text
//! events ─┬─ zone events ───────► upsert_zones ──► zones ──────────────┬──────────┐
//!         ├─ location events ───► track_couriers (zones broadcast) ──► couriers, inside
//!         └─ delivery events ───► upsert_deliveries ──► deliveries    │          │
//!                                   deliveries.dropoff ──► dropoff_zones (zones) ◄┘
//!   active deliveries ⋈ couriers ──► eta
//!   deliveries ⊕ (deliveries ⋈ dropoff_zones) ⊕ couriers ──explode by scope──► count_total ──► metrics
//! ```
//!
//! The aggregates are sums carried in the *difference* of a collection ([`Tally`] is a
//! semigroup): a delivery contributes its tally to each of its scopes, so a status change or a
//! late rating is one retraction and one insertion per scope, never a rescan of the scope.

use chrono::{DateTime, Datelike, Timelike};
use differential_dataflow::VecCollection;
use differential_dataflow::difference::{IsZero, Multiply, Semigroup};
use differential_dataflow::operators::CountTotal;
use timely::dataflow::StreamVec;
use timely::dataflow::operators::vec::Partition;

use crate::eta::{EtaConfig, EtaInput, estimate};
use crate::event::{EventBody, UnixMillis};
use crate::ids::{CourierId, DeliveryId, ZoneId};
use crate::lifecycle::Status;
use crate::model::{Change, CourierState, DeliveryState, Eta, Rejection, Scope, Tally, ZoneState};
use crate::operators::couriers::track_couriers;
use crate::operators::deliveries::upsert_deliveries;
use crate::operators::dropoffs::dropoff_zones;
use crate::operators::zones::upsert_zones;
use crate::restore::{Input, Restore};

/// What the computation needs to know.
#[derive(Clone, Copy, Debug)]
pub struct ComputeConfig {
    /// ETA speeds.
    pub eta: EtaConfig,
    /// Fixes in the speed estimate window.
    pub speed_window: usize,
    /// The fastest a courier moves between two fixes, mm/s; a faster fix is refused as an
    /// implausible jump.
    pub max_courier_speed_mm_s: u32,
}

impl Default for ComputeConfig {
    fn default() -> Self {
        Self {
            eta: EtaConfig::default(),
            speed_window: 0,
            max_courier_speed_mm_s: crate::pipeline::mps_to_mm_s(
                crate::pipeline::DEFAULT_MAX_COURIER_SPEED_MPS,
            ),
        }
    }
}

/// Every collection the dataflow maintains.
#[allow(missing_debug_implementations)] // collections are handles into a running dataflow
pub struct Collections<'scope> {
    /// `couriers(courier, state)`.
    pub couriers: VecCollection<'scope, u64, (CourierId, CourierState)>,
    /// `zones(zone, state)`.
    pub zones: VecCollection<'scope, u64, (ZoneId, ZoneState)>,
    /// `inside(courier, zone)`: geofence entries (+1) and exits (−1).
    pub inside: VecCollection<'scope, u64, (CourierId, ZoneId)>,
    /// `deliveries(delivery, state)`.
    pub deliveries: VecCollection<'scope, u64, (DeliveryId, DeliveryState)>,
    /// `dropoff_zone(delivery, zone)`.
    pub dropoff_zones: VecCollection<'scope, u64, (DeliveryId, ZoneId)>,
    /// `eta(delivery, eta)`.
    pub etas: VecCollection<'scope, u64, (DeliveryId, Eta)>,
    /// `metrics(scope, tally)`.
    pub metrics: VecCollection<'scope, u64, (Scope, Tally)>,
    /// Events refused in context (only `+1`s: a stream of refusals, not state).
    pub rejections: VecCollection<'scope, u64, Rejection>,
}

impl<'scope> Collections<'scope> {
    /// All records as one collection of [`Change`]s.
    pub fn changes(
        self,
    ) -> (
        VecCollection<'scope, u64, Change>,
        VecCollection<'scope, u64, Rejection>,
    ) {
        let changes = self
            .couriers
            .map(|(id, state)| Change::Courier(id, state))
            .concat(self.zones.map(|(id, state)| Change::Zone(id, state)))
            .concat(
                self.inside
                    .map(|(courier, zone)| Change::Inside(courier, zone)),
            )
            .concat(
                self.deliveries
                    .map(|(id, state)| Change::Delivery(id, state)),
            )
            .concat(
                self.dropoff_zones
                    .map(|(id, zone)| Change::DropoffZone(id, zone)),
            )
            .concat(self.etas.map(|(id, eta)| Change::Eta(id, eta)))
            .concat(
                self.metrics
                    .map(|(scope, tally)| Change::Metric(scope, tally)),
            );
        (changes, self.rejections)
    }
}

/// Builds the dataflow over `events` (each event at its epoch).
pub fn delivery_tracking<'scope>(
    events: StreamVec<'scope, u64, Input>,
    config: ComputeConfig,
) -> Collections<'scope> {
    let mut parts = events
        .partition(3, |input| {
            let part = match &input {
                Input::Event(event) => match &event.body {
                    EventBody::ZoneUpserted(_) | EventBody::ZoneDeleted(_) => 0,
                    EventBody::LocationUpdated(_) => 1,
                    _ => 2,
                },
                Input::Restore(restore) => match **restore {
                    Restore::Zone { .. } => 0,
                    Restore::Courier { .. } => 1,
                    Restore::Delivery { .. } => 2,
                },
            };
            (part, input)
        })
        .into_iter();
    let (Some(zone_events), Some(locations), Some(delivery_events)) =
        (parts.next(), parts.next(), parts.next())
    else {
        unreachable!("partition(3) returns three streams")
    };

    let (zones, zone_rejections) = upsert_zones(zone_events);
    let tracked = track_couriers(
        locations,
        zones.clone(),
        config.speed_window,
        config.max_courier_speed_mm_s,
    );
    let (couriers, inside, location_rejections) =
        (tracked.couriers, tracked.inside, tracked.rejections);
    let (deliveries, delivery_rejections) = upsert_deliveries(delivery_events);
    let dropoff_zones = dropoff_zones(
        deliveries.clone().map(|(id, state)| (id, state.dropoff)),
        zones.clone(),
    );

    let eta_config = config.eta;
    let active = deliveries
        .clone()
        .flat_map(|(id, state)| match state.courier_id {
            Some(courier_id) if state.status.is_active() => {
                Some((courier_id, (id, state.status, state.pickup, state.dropoff)))
            }
            _ => None,
        });
    let fixes = couriers
        .clone()
        .map(|(courier_id, state)| (courier_id, (state.position, state.at, state.speed_mm_s)));
    let etas = active.join(fixes).map(
        move |(courier_id, ((id, status, pickup, dropoff), (position, at, speed_mm_s)))| {
            let input = EtaInput {
                courier_id,
                status,
                pickup,
                dropoff,
                position,
                at,
                speed_mm_s,
            };
            (id, estimate(&input, &eta_config))
        },
    );

    let by_delivery = deliveries.clone().explode(|(_, state)| {
        let tally = delivery_tally(&state);
        delivery_scopes(&state)
            .into_iter()
            .map(move |scope| (scope, tally))
    });
    let by_dropoff_zone = deliveries
        .clone()
        .map(|(id, state)| (id, delivery_tally(&state)))
        .join(dropoff_zones.clone())
        .explode(|(_, (tally, zone_id))| Some((Scope::DropoffZone(zone_id), tally)));
    let by_courier = couriers
        .clone()
        .explode(|(courier_id, state)| Some((Scope::Courier(courier_id), courier_tally(&state))));
    let metrics = by_delivery
        .concat(by_dropoff_zone)
        .concat(by_courier)
        .count_total()
        .map(|(scope, tally)| (scope, tally));

    let rejections = zone_rejections
        .concat(location_rejections)
        .concat(delivery_rejections);
    Collections {
        couriers,
        zones,
        inside,
        deliveries,
        dropoff_zones,
        etas,
        metrics,
        rejections,
    }
}

/// The scopes a delivery counts in (dropoff zones come from the spatial join).
pub fn delivery_scopes(state: &DeliveryState) -> Vec<Scope> {
    let mut scopes = vec![Scope::Overall];
    if let Some(courier_id) = state.courier_id {
        scopes.push(Scope::Courier(courier_id));
    }
    if let Some((weekday, hour)) = weekday_hour(state.created_at) {
        scopes.push(Scope::HourOfDay(hour));
        scopes.push(Scope::WeekdayHour(weekday, hour));
    }
    scopes
}

/// Weekday (0 = Monday) and hour of a time, UTC.
pub fn weekday_hour(at: UnixMillis) -> Option<(u8, u8)> {
    let time = DateTime::from_timestamp_millis(at)?;
    Some((
        time.weekday().num_days_from_monday() as u8,
        time.hour() as u8,
    ))
}

/// What one delivery contributes to each of its scopes.
pub fn delivery_tally(state: &DeliveryState) -> Tally {
    let mut tally = Tally {
        deliveries: 1,
        active: i64::from(state.status.is_active()),
        ..Tally::default()
    };
    match state.status {
        Status::Delivered => {
            tally.delivered = 1;
            let ended = state.ended_at.unwrap_or(state.created_at);
            tally.created_to_delivered_ms = (ended - state.created_at).max(0);
            if let Some(picked_up) = state.picked_up_at {
                tally.picked_up_delivered = 1;
                tally.picked_up_to_delivered_ms = (ended - picked_up).max(0);
            }
            if let Some(promised_by) = state.promised_by {
                tally.promised = 1;
                tally.on_time = i64::from(ended <= promised_by);
            }
        }
        Status::Failed => tally.failed = 1,
        Status::Cancelled => tally.cancelled = 1,
        _ => {}
    }
    if let Some(rating) = &state.rating {
        tally.rated = 1;
        tally.score_sum = i64::from(rating.score);
        if let Some(bucket) = tally
            .score_histogram
            .get_mut(usize::from(rating.score).wrapping_sub(1))
        {
            *bucket = 1;
        }
    }
    tally
}

/// What a courier's movement contributes to its scope.
pub fn courier_tally(state: &CourierState) -> Tally {
    Tally {
        distance_mm: i64::try_from(state.odometer_mm).unwrap_or(i64::MAX),
        active_hours: i64::from(state.active_hours),
        ..Tally::default()
    }
}

impl IsZero for Tally {
    fn is_zero(&self) -> bool {
        self.is_empty()
    }
}

impl Semigroup for Tally {
    fn plus_equals(&mut self, rhs: &Self) {
        self.add_scaled(rhs, 1);
    }
}

impl Multiply<isize> for Tally {
    type Output = Tally;

    fn multiply(self, rhs: &isize) -> Tally {
        let mut product = Tally::default();
        product.add_scaled(&self, *rhs as i64);
        product
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::GeoPoint;
    use crate::ids::CustomerId;
    use crate::model::Rating;
    use uuid::Uuid;

    const HOUR: i64 = 3_600_000;

    fn delivered(
        created_at: i64,
        picked_up_at: i64,
        ended_at: i64,
        promised_by: Option<i64>,
    ) -> DeliveryState {
        DeliveryState {
            customer_id: CustomerId(Uuid::from_u128(1)),
            courier_id: Some(CourierId(Uuid::from_u128(2))),
            pickup: GeoPoint::from_degrees(52.5, 13.4),
            dropoff: GeoPoint::from_degrees(52.6, 13.4),
            promised_by,
            status: Status::Delivered,
            created_at,
            assigned_at: Some(created_at + 1),
            picked_up_at: Some(picked_up_at),
            ended_at: Some(ended_at),
            rating: None,
            version: 5,
        }
    }

    #[test]
    fn a_delivery_on_the_promised_minute_is_on_time_and_a_later_one_is_not() {
        let exactly = delivery_tally(&delivered(0, 10, 100, Some(100)));
        assert_eq!((exactly.promised, exactly.on_time), (1, 1));
        let late = delivery_tally(&delivered(0, 10, 101, Some(100)));
        assert_eq!((late.promised, late.on_time), (1, 0));
        let unpromised = delivery_tally(&delivered(0, 10, 101, None));
        assert_eq!((unpromised.promised, unpromised.on_time), (0, 0));
    }

    #[test]
    fn durations_are_measured_from_creation_and_from_pickup() {
        let tally = delivery_tally(&delivered(1_000, 4_000, 10_000, None));
        assert_eq!(tally.created_to_delivered_ms, 9_000);
        assert_eq!(
            (tally.picked_up_delivered, tally.picked_up_to_delivered_ms),
            (1, 6_000)
        );
        assert_eq!(tally.mean_delivery_seconds(), Some(9.0));
        // Timestamps out of order never make a negative duration.
        let skewed = delivery_tally(&delivered(10_000, 12_000, 9_000, None));
        assert_eq!(
            (
                skewed.created_to_delivered_ms,
                skewed.picked_up_to_delivered_ms
            ),
            (0, 0)
        );
    }

    #[test]
    fn ratings_fill_the_histogram_and_outcomes_are_exclusive() {
        let mut state = delivered(0, 1, 2, None);
        state.rating = Some(Rating {
            score: 4,
            comment: None,
            at: 3,
        });
        let tally = delivery_tally(&state);
        assert_eq!(
            (tally.rated, tally.score_sum, tally.score_histogram),
            (1, 4, [0, 0, 0, 1, 0])
        );
        state.status = Status::Failed;
        let failed = delivery_tally(&state);
        assert_eq!(
            (
                failed.delivered,
                failed.failed,
                failed.cancelled,
                failed.active
            ),
            (0, 1, 0, 0)
        );
        state.status = Status::PickedUp;
        assert_eq!(delivery_tally(&state).active, 1);
    }

    #[test]
    fn a_delivery_counts_overall_for_its_courier_and_at_its_creation_hour() {
        // 2026-11-30 was a Monday; 13:00 UTC.
        let monday_1pm = DateTime::parse_from_rfc3339("2026-11-30T13:05:00Z")
            .map(|t| t.timestamp_millis())
            .unwrap_or(0);
        let state = delivered(monday_1pm, monday_1pm + HOUR, monday_1pm + 2 * HOUR, None);
        let scopes = delivery_scopes(&state);
        assert_eq!(
            scopes,
            vec![
                Scope::Overall,
                Scope::Courier(CourierId(Uuid::from_u128(2))),
                Scope::HourOfDay(13),
                Scope::WeekdayHour(0, 13)
            ]
        );
    }

    #[test]
    fn tallies_add_and_cancel_as_differences() {
        let a = delivery_tally(&delivered(0, 10, 100, Some(100)));
        let mut sum = a;
        sum.plus_equals(&a.multiply(&-1));
        assert!(sum.is_zero());
        let doubled = a.multiply(&2);
        assert_eq!(doubled.delivered, 2);
        assert_eq!(doubled.created_to_delivered_ms, 200);
    }
}
