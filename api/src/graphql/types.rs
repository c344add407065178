//! The GraphQL object types and enums, and how they are built from the read model's
//! records.
//!
//! Every figure is computed by the same [`Tally`] methods (through [`MetricSummary`]) that
//! the REST snapshot uses, so the two APIs cannot disagree. Times are `DateTime` scalars
//! (RFC 3339, UTC); distances kilometres or metres as named; rates fractions in `[0, 1]`;
//! a figure that has no denominator yet (a success rate before anything ended) is `null`.

use std::cmp::Ordering;

use async_graphql::{Enum, ID, SimpleObject};
use chrono::{DateTime, Utc};
use delivertrack_dataflow::model::{Scope, Tally};
use delivertrack_dataflow::{CourierId, Epoch, Status, UnixMillis};
use delivertrack_sinks::read_model::{
    DeliveryView, EtaView, LatLon, MetricSummary, RatingView, ReadState,
};

/// Which family of aggregates a query or a subscription is about.
#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
pub enum MetricScope {
    /// Everything: one row.
    Overall,
    /// Per dropoff zone (every zone holding the dropoff point).
    Zone,
    /// Per assigned courier.
    Courier,
    /// Per hour of the day of creation (0–23, UTC).
    Hour,
    /// Per weekday (0 = Monday) and hour of creation (UTC).
    WeekdayHour,
}

impl MetricScope {
    /// The family of a dataflow scope.
    pub fn of(scope: &Scope) -> Self {
        match scope {
            Scope::Overall => MetricScope::Overall,
            Scope::DropoffZone(_) => MetricScope::Zone,
            Scope::Courier(_) => MetricScope::Courier,
            Scope::HourOfDay(_) => MetricScope::Hour,
            Scope::WeekdayHour(..) => MetricScope::WeekdayHour,
        }
    }
}

/// The group a row is for: its family, its key and, for zones, the zone's name.
#[derive(Clone, Debug, PartialEq)]
pub struct ScopeKey {
    /// The family.
    pub scope: MetricScope,
    /// `null` for `OVERALL`; the zone's or courier's id; the hour (`"13"`); or weekday and
    /// hour (`"0-13"`, 0 = Monday).
    pub key: Option<String>,
    /// The zone's current name, when the scope is a zone that still exists.
    pub name: Option<String>,
}

impl ScopeKey {
    /// The key of `scope`, with the zone's name looked up in `state`.
    pub fn new(scope: &Scope, state: &ReadState) -> Self {
        let (key, name) = match scope {
            Scope::Overall => (None, None),
            Scope::DropoffZone(zone) => (
                Some(zone.to_string()),
                state.zones.get(zone).map(|z| z.name.clone()),
            ),
            Scope::Courier(courier) => (Some(courier.to_string()), None),
            Scope::HourOfDay(hour) => (Some(hour.to_string()), None),
            Scope::WeekdayHour(weekday, hour) => (Some(format!("{weekday}-{hour}")), None),
        };
        Self {
            scope: MetricScope::of(scope),
            key,
            name,
        }
    }
}

/// Success rates of one group: how many deliveries ended delivered, failed or cancelled.
#[derive(SimpleObject, Clone, Debug, PartialEq)]
pub struct SuccessRate {
    /// The read model's epoch these figures are as of.
    pub epoch: Option<Epoch>,
    /// The family of the group.
    pub scope: MetricScope,
    /// The group within the family (see `MetricScope`); `null` for `OVERALL`.
    pub key: Option<String>,
    /// The zone's name, for zones.
    pub name: Option<String>,
    /// Deliveries counted.
    pub deliveries: i64,
    /// ... delivered.
    pub delivered: i64,
    /// ... failed.
    pub failed: i64,
    /// ... cancelled.
    pub cancelled: i64,
    /// ... still active (assigned, picked up, in transit).
    pub active: i64,
    /// delivered / (delivered + failed + cancelled); `null` before anything ended.
    pub success_rate: Option<f64>,
    /// Delivered on time / delivered with a promise.
    pub on_time_rate: Option<f64>,
    /// Mean created → delivered, seconds.
    pub mean_delivery_seconds: Option<f64>,
}

impl SuccessRate {
    /// The row of one group.
    pub fn new(epoch: Option<Epoch>, key: ScopeKey, tally: &Tally) -> Self {
        let m = MetricSummary::from(tally);
        Self {
            epoch,
            scope: key.scope,
            key: key.key,
            name: key.name,
            deliveries: m.deliveries,
            delivered: m.delivered,
            failed: m.failed,
            cancelled: m.cancelled,
            active: m.active,
            success_rate: m.success_rate,
            on_time_rate: m.on_time_rate,
            mean_delivery_seconds: m.mean_delivery_seconds,
        }
    }
}

/// How well one courier works.
#[derive(SimpleObject, Clone, Debug, PartialEq)]
pub struct CourierEfficiency {
    /// The read model's epoch these figures are as of.
    pub epoch: Option<Epoch>,
    /// The courier.
    pub courier_id: ID,
    /// Deliveries assigned to the courier.
    pub deliveries: i64,
    /// ... delivered.
    pub delivered: i64,
    /// delivered / ended.
    pub success_rate: Option<f64>,
    /// Mean created → delivered, seconds.
    pub mean_delivery_seconds: Option<f64>,
    /// Mean picked up → delivered, seconds.
    pub mean_pickup_to_delivery_seconds: Option<f64>,
    /// Delivered on time / delivered with a promise.
    pub on_time_rate: Option<f64>,
    /// Distance travelled, km.
    pub distance_km: f64,
    /// Distinct clock hours (UTC) with a position report.
    pub active_hours: i64,
    /// Delivered per active hour.
    pub deliveries_per_active_hour: Option<f64>,
    /// Mean rating (1–5) of the courier's rated deliveries.
    pub mean_rating: Option<f64>,
}

impl CourierEfficiency {
    /// The row of one courier.
    pub fn new(epoch: Option<Epoch>, courier: CourierId, tally: &Tally) -> Self {
        let m = MetricSummary::from(tally);
        Self {
            epoch,
            courier_id: ID(courier.to_string()),
            deliveries: m.deliveries,
            delivered: m.delivered,
            success_rate: m.success_rate,
            mean_delivery_seconds: m.mean_delivery_seconds,
            mean_pickup_to_delivery_seconds: m.mean_pickup_to_delivery_seconds,
            on_time_rate: m.on_time_rate,
            distance_km: m.distance_km,
            active_hours: m.active_hours,
            deliveries_per_active_hour: m.deliveries_per_active_hour,
            mean_rating: m.mean_rating,
        }
    }

    /// The order of `order`: best first, ties by courier id.
    pub fn compare(order: CourierOrder, a: &Self, b: &Self) -> Ordering {
        // Higher is better, a missing figure last.
        fn desc(a: Option<f64>, b: Option<f64>) -> Ordering {
            match (a, b) {
                (Some(a), Some(b)) => b.total_cmp(&a),
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (None, None) => Ordering::Equal,
            }
        }
        let by = match order {
            CourierOrder::Delivered => b.delivered.cmp(&a.delivered),
            CourierOrder::DeliveriesPerActiveHour => {
                desc(a.deliveries_per_active_hour, b.deliveries_per_active_hour)
            }
            CourierOrder::OnTimeRate => desc(a.on_time_rate, b.on_time_rate),
            // Faster is better: ascending, by descending the negation.
            CourierOrder::MeanDeliverySeconds => desc(
                a.mean_delivery_seconds.map(|s| -s),
                b.mean_delivery_seconds.map(|s| -s),
            ),
            CourierOrder::MeanRating => desc(a.mean_rating, b.mean_rating),
            CourierOrder::Distance => b.distance_km.total_cmp(&a.distance_km),
        };
        by.then_with(|| a.courier_id.as_str().cmp(b.courier_id.as_str()))
    }
}

/// The order of `courierEfficiency`: best first, ties by courier id.
#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
pub enum CourierOrder {
    /// Most deliveries delivered first.
    Delivered,
    /// Most delivered per active hour first.
    DeliveriesPerActiveHour,
    /// Highest on-time rate first.
    OnTimeRate,
    /// Fastest mean created → delivered first.
    MeanDeliverySeconds,
    /// Best mean rating first.
    MeanRating,
    /// Longest distance first.
    Distance,
}

/// Deliveries created in one hour of one weekday (UTC).
#[derive(SimpleObject, Clone, Debug, PartialEq)]
pub struct PeakTime {
    /// The read model's epoch these figures are as of.
    pub epoch: Option<Epoch>,
    /// 0 = Monday ... 6 = Sunday.
    pub weekday: u8,
    /// `Monday` ... `Sunday`.
    pub weekday_name: String,
    /// 0–23.
    pub hour: u8,
    /// Deliveries created in that hour.
    pub deliveries: i64,
    /// ... delivered.
    pub delivered: i64,
    /// delivered / ended.
    pub success_rate: Option<f64>,
    /// This hour's share of all deliveries.
    pub share: Option<f64>,
}

impl PeakTime {
    /// The row of one weekday and hour; `total` is the overall number of deliveries.
    pub fn new(epoch: Option<Epoch>, weekday: u8, hour: u8, tally: &Tally, total: i64) -> Self {
        const NAMES: [&str; 7] = [
            "Monday",
            "Tuesday",
            "Wednesday",
            "Thursday",
            "Friday",
            "Saturday",
            "Sunday",
        ];
        Self {
            epoch,
            weekday,
            weekday_name: NAMES
                .get(usize::from(weekday))
                .copied()
                .unwrap_or("unknown")
                .to_owned(),
            hour,
            deliveries: tally.deliveries,
            delivered: tally.delivered,
            success_rate: tally.success_rate(),
            share: (total > 0).then(|| tally.deliveries as f64 / total as f64),
        }
    }
}

/// Customer satisfaction of one group: its ratings.
#[derive(SimpleObject, Clone, Debug, PartialEq)]
pub struct Satisfaction {
    /// The read model's epoch these figures are as of.
    pub epoch: Option<Epoch>,
    /// The family of the group.
    pub scope: MetricScope,
    /// The group within the family; `null` for `OVERALL`.
    pub key: Option<String>,
    /// The zone's name, for zones.
    pub name: Option<String>,
    /// Rated deliveries.
    pub rated: i64,
    /// Mean score (1–5); `null` before the first rating.
    pub mean_rating: Option<f64>,
    /// Ratings with score 1, 2, 3, 4, 5 (always five entries).
    pub histogram: Vec<i64>,
}

impl Satisfaction {
    /// The row of one group.
    pub fn new(epoch: Option<Epoch>, key: ScopeKey, tally: &Tally) -> Self {
        Self {
            epoch,
            scope: key.scope,
            key: key.key,
            name: key.name,
            rated: tally.rated,
            mean_rating: tally.mean_rating(),
            histogram: tally.score_histogram.to_vec(),
        }
    }
}

/// Every figure of one group, as the `metricChanged` subscription pushes it.
#[derive(SimpleObject, Clone, Debug, PartialEq)]
pub struct Metric {
    /// The family of the group.
    pub scope: MetricScope,
    /// The group within the family; `null` for `OVERALL`.
    pub key: Option<String>,
    /// The zone's name, for zones.
    pub name: Option<String>,
    /// Deliveries counted.
    pub deliveries: i64,
    /// ... still active.
    pub active: i64,
    /// ... delivered.
    pub delivered: i64,
    /// ... failed.
    pub failed: i64,
    /// ... cancelled.
    pub cancelled: i64,
    /// delivered / ended.
    pub success_rate: Option<f64>,
    /// Delivered on time / delivered with a promise.
    pub on_time_rate: Option<f64>,
    /// Mean created → delivered, seconds.
    pub mean_delivery_seconds: Option<f64>,
    /// Mean picked up → delivered, seconds.
    pub mean_pickup_to_delivery_seconds: Option<f64>,
    /// Rated deliveries.
    pub rated: i64,
    /// Mean rating (1–5).
    pub mean_rating: Option<f64>,
    /// Ratings with score 1, 2, 3, 4, 5.
    pub rating_histogram: Vec<i64>,
    /// Courier scope: distance travelled, km.
    pub distance_km: f64,
    /// Courier scope: distinct active hours.
    pub active_hours: i64,
    /// Courier scope: delivered per active hour.
    pub deliveries_per_active_hour: Option<f64>,
}

impl Metric {
    /// The row of one group from its summary.
    pub fn new(key: ScopeKey, m: &MetricSummary) -> Self {
        Self {
            scope: key.scope,
            key: key.key,
            name: key.name,
            deliveries: m.deliveries,
            active: m.active,
            delivered: m.delivered,
            failed: m.failed,
            cancelled: m.cancelled,
            success_rate: m.success_rate,
            on_time_rate: m.on_time_rate,
            mean_delivery_seconds: m.mean_delivery_seconds,
            mean_pickup_to_delivery_seconds: m.mean_pickup_to_delivery_seconds,
            rated: m.rated,
            mean_rating: m.mean_rating,
            rating_histogram: m.rating_histogram.to_vec(),
            distance_km: m.distance_km,
            active_hours: m.active_hours,
            deliveries_per_active_hour: m.deliveries_per_active_hour,
        }
    }
}

/// A group whose aggregates disappeared (nothing counts in it any more).
#[derive(SimpleObject, Clone, Debug, PartialEq)]
pub struct MetricKey {
    /// The family of the group.
    pub scope: MetricScope,
    /// The group within the family; `null` for `OVERALL`.
    pub key: Option<String>,
}

/// Why a `metricChanged` message was sent.
#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
pub enum ChangeReason {
    /// The full current set, first on subscribing.
    Snapshot,
    /// The rows an epoch changed.
    Changed,
    /// The full current set again: the subscriber fell behind and missed epochs.
    Resync,
}

/// One message of the `metricChanged` subscription.
#[derive(SimpleObject, Clone, Debug, PartialEq)]
pub struct MetricChange {
    /// The epoch after which these are the figures.
    pub epoch: Option<Epoch>,
    /// Full set or changes.
    pub reason: ChangeReason,
    /// The rows (all of them for `SNAPSHOT` and `RESYNC`, the changed ones for `CHANGED`).
    pub metrics: Vec<Metric>,
    /// Groups that became empty in this epoch (`CHANGED` only).
    pub cleared: Vec<MetricKey>,
}

/// The status of a delivery.
#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
pub enum DeliveryStatus {
    /// Ordered, no courier yet.
    Created,
    /// A courier is on the way to the pickup point.
    Assigned,
    /// The courier has the parcel.
    PickedUp,
    /// The courier is on the way to the dropoff point.
    InTransit,
    /// Handed over.
    Delivered,
    /// Given up after pickup.
    Failed,
    /// Called off before delivery.
    Cancelled,
}

impl From<Status> for DeliveryStatus {
    fn from(status: Status) -> Self {
        match status {
            Status::Created => DeliveryStatus::Created,
            Status::Assigned => DeliveryStatus::Assigned,
            Status::PickedUp => DeliveryStatus::PickedUp,
            Status::InTransit => DeliveryStatus::InTransit,
            Status::Delivered => DeliveryStatus::Delivered,
            Status::Failed => DeliveryStatus::Failed,
            Status::Cancelled => DeliveryStatus::Cancelled,
        }
    }
}

impl From<DeliveryStatus> for Status {
    fn from(status: DeliveryStatus) -> Self {
        match status {
            DeliveryStatus::Created => Status::Created,
            DeliveryStatus::Assigned => Status::Assigned,
            DeliveryStatus::PickedUp => Status::PickedUp,
            DeliveryStatus::InTransit => Status::InTransit,
            DeliveryStatus::Delivered => Status::Delivered,
            DeliveryStatus::Failed => Status::Failed,
            DeliveryStatus::Cancelled => Status::Cancelled,
        }
    }
}

/// A position in degrees.
#[derive(SimpleObject, Clone, Copy, Debug, PartialEq)]
pub struct Position {
    /// Latitude.
    pub lat: f64,
    /// Longitude.
    pub lon: f64,
}

impl From<LatLon> for Position {
    fn from(point: LatLon) -> Self {
        Self {
            lat: point.lat,
            lon: point.lon,
        }
    }
}

/// A customer's rating of a delivery.
#[derive(SimpleObject, Clone, Debug, PartialEq)]
pub struct Rating {
    /// 1 to 5.
    pub score: u8,
    /// Free text.
    pub comment: Option<String>,
    /// When it was given.
    pub at: DateTime<Utc>,
}

impl From<RatingView> for Rating {
    fn from(rating: RatingView) -> Self {
        Self {
            score: rating.score,
            comment: rating.comment,
            at: time(rating.at_ms),
        }
    }
}

/// The estimated arrival of an active delivery.
#[derive(SimpleObject, Clone, Debug, PartialEq)]
pub struct Eta {
    /// The courier doing it.
    pub courier_id: ID,
    /// The status the estimate is for.
    pub status: DeliveryStatus,
    /// Estimated arrival at the dropoff.
    pub eta_at: DateTime<Utc>,
    /// Distance still to cover, metres.
    pub remaining_m: u32,
    /// Speed assumed, m/s.
    pub speed_mps: f64,
    /// The courier fix the estimate was computed from.
    pub as_of: DateTime<Utc>,
}

impl From<EtaView> for Eta {
    fn from(eta: EtaView) -> Self {
        Self {
            courier_id: ID(eta.courier_id.to_string()),
            status: eta.status.into(),
            eta_at: time(eta.eta_ms),
            remaining_m: eta.remaining_m,
            speed_mps: eta.speed_mps,
            as_of: time(eta.as_of_ms),
        }
    }
}

/// One delivery, as `GET /api/deliveries/{id}` shows it.
#[derive(SimpleObject, Clone, Debug, PartialEq)]
pub struct Delivery {
    /// The delivery.
    pub id: ID,
    /// Who ordered it.
    pub customer_id: ID,
    /// The assigned courier, once assigned.
    pub courier_id: Option<ID>,
    /// Current status.
    pub status: DeliveryStatus,
    /// Collection point.
    pub pickup: Position,
    /// Destination.
    pub dropoff: Position,
    /// Promised delivery time.
    pub promised_by: Option<DateTime<Utc>>,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Assigned.
    pub assigned_at: Option<DateTime<Utc>>,
    /// Picked up.
    pub picked_up_at: Option<DateTime<Utc>>,
    /// Reached a terminal status.
    pub ended_at: Option<DateTime<Utc>>,
    /// The latest rating.
    pub rating: Option<Rating>,
    /// Events applied to this delivery.
    pub version: u32,
    /// The current estimate, while active and the courier's position is known.
    pub eta: Option<Eta>,
    /// Zones containing the dropoff point.
    pub dropoff_zones: Vec<ID>,
}

impl From<DeliveryView> for Delivery {
    fn from(view: DeliveryView) -> Self {
        let d = view.details;
        Self {
            id: ID(d.delivery_id.to_string()),
            customer_id: ID(d.customer_id.to_string()),
            courier_id: d.courier_id.map(|c| ID(c.to_string())),
            status: d.status.into(),
            pickup: d.pickup.into(),
            dropoff: d.dropoff.into(),
            promised_by: d.promised_by_ms.map(time),
            created_at: time(d.created_at_ms),
            assigned_at: d.assigned_at_ms.map(time),
            picked_up_at: d.picked_up_at_ms.map(time),
            ended_at: d.ended_at_ms.map(time),
            rating: d.rating.map(Rating::from),
            version: d.version,
            eta: d.eta.map(Eta::from),
            dropoff_zones: view
                .dropoff_zones
                .iter()
                .map(|z| ID(z.to_string()))
                .collect(),
        }
    }
}

/// One page of `deliveries`, in delivery-id order.
#[derive(SimpleObject, Clone, Debug, PartialEq)]
pub struct DeliveryPage {
    /// The deliveries of this page.
    pub nodes: Vec<Delivery>,
    /// The cursor of the last one: pass it as `after` for the next page.
    pub end_cursor: Option<String>,
    /// Whether more deliveries follow.
    pub has_next_page: bool,
}

/// A Unix time in milliseconds as a `DateTime`; one beyond chrono's range (hundreds of
/// thousands of years away) is clamped to it rather than failing the whole response.
fn time(millis: UnixMillis) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(millis).unwrap_or(if millis < 0 {
        DateTime::<Utc>::MIN_UTC
    } else {
        DateTime::<Utc>::MAX_UTC
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(courier: u128, delivered: i64, rate: Option<f64>) -> CourierEfficiency {
        CourierEfficiency {
            epoch: None,
            courier_id: ID(uuid::Uuid::from_u128(courier).to_string()),
            deliveries: delivered,
            delivered,
            success_rate: None,
            mean_delivery_seconds: rate.map(|r| 1000.0 * r),
            mean_pickup_to_delivery_seconds: None,
            on_time_rate: rate,
            distance_km: 0.0,
            active_hours: 0,
            deliveries_per_active_hour: None,
            mean_rating: None,
        }
    }

    #[test]
    fn couriers_order_best_first_missing_figures_last_ties_by_id() {
        let mut rows = [row(3, 1, None), row(1, 5, Some(0.5)), row(2, 5, Some(0.9))];
        rows.sort_by(|a, b| CourierEfficiency::compare(CourierOrder::Delivered, a, b));
        let ids: Vec<_> = rows.iter().map(|r| r.delivered).collect();
        assert_eq!(ids, [5, 5, 1]);
        assert!(rows[0].courier_id.as_str() < rows[1].courier_id.as_str());

        rows.sort_by(|a, b| CourierEfficiency::compare(CourierOrder::OnTimeRate, a, b));
        let rates: Vec<_> = rows.iter().map(|r| r.on_time_rate).collect();
        assert_eq!(rates, [Some(0.9), Some(0.5), None]);

        // Faster first: 500 s before 900 s, unknown last.
        rows.sort_by(|a, b| CourierEfficiency::compare(CourierOrder::MeanDeliverySeconds, a, b));
        let seconds: Vec<_> = rows.iter().map(|r| r.mean_delivery_seconds).collect();
        assert_eq!(seconds, [Some(500.0), Some(900.0), None]);
    }

    #[test]
    fn times_out_of_range_are_clamped() {
        assert_eq!(time(0), DateTime::<Utc>::UNIX_EPOCH);
        assert_eq!(time(i64::MAX), DateTime::<Utc>::MAX_UTC);
        assert_eq!(time(i64::MIN), DateTime::<Utc>::MIN_UTC);
    }
}
