//! Serializable views of the read model: what the API returns as JSON.
//!
//! Times are Unix milliseconds (fields ending in `_ms`), positions are degrees, speeds
//! metres per second, distances metres or kilometres as named.

use std::collections::BTreeMap;

use delivertrack_dataflow::geometry::{GeoPoint, ZoneShape};
use delivertrack_dataflow::model::{
    CourierState, DeliveryState, Eta, Rating, Scope, Tally, ZoneState,
};
use delivertrack_dataflow::{CourierId, CustomerId, DeliveryId, Epoch, Status, UnixMillis, ZoneId};
use serde::Serialize;

/// A position in degrees.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct LatLon {
    /// Latitude, degrees.
    pub lat: f64,
    /// Longitude, degrees.
    pub lon: f64,
}

impl From<GeoPoint> for LatLon {
    fn from(point: GeoPoint) -> Self {
        Self {
            lat: point.lat(),
            lon: point.lon(),
        }
    }
}

/// The derived figures of one [`Tally`], as the API shows them.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MetricSummary {
    /// Deliveries counted.
    pub deliveries: i64,
    /// ... of which active (assigned, picked up, in transit).
    pub active: i64,
    /// ... delivered.
    pub delivered: i64,
    /// ... failed.
    pub failed: i64,
    /// ... cancelled.
    pub cancelled: i64,
    /// delivered / (delivered + failed + cancelled); `null` before anything ended.
    pub success_rate: Option<f64>,
    /// Mean created → delivered, seconds.
    pub mean_delivery_seconds: Option<f64>,
    /// Mean picked up → delivered, seconds.
    pub mean_pickup_to_delivery_seconds: Option<f64>,
    /// Delivered on time / delivered with a promise.
    pub on_time_rate: Option<f64>,
    /// Rated deliveries.
    pub rated: i64,
    /// Mean rating score (1–5).
    pub mean_rating: Option<f64>,
    /// Ratings with score 1, 2, 3, 4, 5.
    pub rating_histogram: [i64; 5],
    /// Courier scope: distance travelled, km.
    pub distance_km: f64,
    /// Courier scope: distinct active hours.
    pub active_hours: i64,
    /// Courier scope: delivered per active hour.
    pub deliveries_per_active_hour: Option<f64>,
}

impl From<&Tally> for MetricSummary {
    fn from(tally: &Tally) -> Self {
        Self {
            deliveries: tally.deliveries,
            active: tally.active,
            delivered: tally.delivered,
            failed: tally.failed,
            cancelled: tally.cancelled,
            success_rate: tally.success_rate(),
            mean_delivery_seconds: tally.mean_delivery_seconds(),
            mean_pickup_to_delivery_seconds: tally.mean_pickup_to_delivery_seconds(),
            on_time_rate: tally.on_time_rate(),
            rated: tally.rated,
            mean_rating: tally.mean_rating(),
            rating_histogram: tally.score_histogram,
            distance_km: tally.distance_mm as f64 / 1e6,
            active_hours: tally.active_hours,
            deliveries_per_active_hour: tally.deliveries_per_active_hour(),
        }
    }
}

/// The group an aggregate is for, as JSON: `{"kind": "courier", "courier_id": "..."}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ScopeView {
    /// Everything.
    Overall,
    /// One courier.
    Courier {
        /// The courier.
        courier_id: CourierId,
    },
    /// Deliveries whose dropoff lies in a zone.
    DropoffZone {
        /// The zone.
        zone_id: ZoneId,
    },
    /// Deliveries created in an hour of the day (UTC).
    HourOfDay {
        /// 0–23.
        hour: u8,
    },
    /// Deliveries created on a weekday in an hour of the day (UTC).
    WeekdayHour {
        /// 0 = Monday.
        weekday: u8,
        /// 0–23.
        hour: u8,
    },
}

impl From<Scope> for ScopeView {
    fn from(scope: Scope) -> Self {
        match scope {
            Scope::Overall => ScopeView::Overall,
            Scope::Courier(courier_id) => ScopeView::Courier { courier_id },
            Scope::DropoffZone(zone_id) => ScopeView::DropoffZone { zone_id },
            Scope::HourOfDay(hour) => ScopeView::HourOfDay { hour },
            Scope::WeekdayHour(weekday, hour) => ScopeView::WeekdayHour { weekday, hour },
        }
    }
}

/// The aggregates of one scope.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ScopedMetrics {
    /// Which group.
    pub scope: ScopeView,
    /// Its figures.
    #[serde(flatten)]
    pub metrics: MetricSummary,
}

/// Sizes of the maintained collections.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Counts {
    /// Couriers with a known position.
    pub couriers: usize,
    /// Live zones.
    pub zones: usize,
    /// Deliveries, any status.
    pub deliveries: usize,
    /// Deliveries assigned, picked up or in transit.
    pub active_deliveries: usize,
    /// Deliveries per status.
    pub deliveries_by_status: BTreeMap<Status, usize>,
    /// `(courier, zone)` pairs currently inside.
    pub inside: usize,
    /// Active deliveries with an ETA.
    pub etas: usize,
}

/// A courier on the map.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CourierView {
    /// The courier.
    pub courier_id: CourierId,
    /// Latest position.
    pub position: LatLon,
    /// When that position was taken.
    pub at_ms: UnixMillis,
    /// Current speed, m/s, when known.
    pub speed_mps: Option<f64>,
    /// Heading, degrees clockwise from north, when reported.
    pub heading_deg: Option<f64>,
    /// Distance travelled, metres.
    pub odometer_m: f64,
    /// Distinct clock hours with a fix.
    pub active_hours: u32,
    /// Zones the courier is inside.
    pub inside: Vec<ZoneId>,
}

impl CourierView {
    /// The view of one courier's state, with the zones it is inside.
    pub fn new(courier_id: CourierId, state: &CourierState, inside: Vec<ZoneId>) -> Self {
        Self {
            courier_id,
            position: state.position.into(),
            at_ms: state.at,
            speed_mps: state.speed_mm_s.map(|s| f64::from(s) / 1000.0),
            heading_deg: state.heading_ddeg.map(|h| f64::from(h) / 10.0),
            odometer_m: state.odometer_mm as f64 / 1000.0,
            active_hours: state.active_hours,
            inside,
        }
    }
}

/// One courier with its aggregates and work: `GET /api/couriers/{id}`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CourierDetail {
    /// Position and zones.
    #[serde(flatten)]
    pub courier: CourierView,
    /// The courier's aggregates, once it has any.
    pub metrics: Option<MetricSummary>,
    /// Deliveries assigned to the courier and not yet ended.
    pub active_deliveries: Vec<DeliveryId>,
}

/// A zone on the map.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ZoneView {
    /// The zone.
    pub zone_id: ZoneId,
    /// Display name.
    pub name: String,
    /// Required stay before a courier counts as inside, ms.
    pub dwell_ms: i64,
    /// Polygons; each a list of rings (exterior first), each ring a list of `[lon, lat]`.
    pub polygons: Vec<Vec<Vec<[f64; 2]>>>,
}

impl ZoneView {
    /// The view of one zone.
    pub fn new(zone_id: ZoneId, state: &ZoneState) -> Self {
        Self {
            zone_id,
            name: state.name.clone(),
            dwell_ms: state.dwell_ms,
            polygons: polygons(&state.shape),
        }
    }
}

/// The rings of a shape as `[lon, lat]` lists, exterior first.
pub fn polygons(shape: &ZoneShape) -> Vec<Vec<Vec<[f64; 2]>>> {
    shape
        .0
        .0
        .iter()
        .map(|polygon| {
            std::iter::once(polygon.exterior())
                .chain(polygon.interiors())
                .map(|ring| ring.0.iter().map(|c| [c.x, c.y]).collect())
                .collect()
        })
        .collect()
}

/// A customer's rating.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RatingView {
    /// 1 to 5.
    pub score: u8,
    /// Free text.
    pub comment: Option<String>,
    /// When it was given.
    pub at_ms: UnixMillis,
}

impl From<&Rating> for RatingView {
    fn from(rating: &Rating) -> Self {
        Self {
            score: rating.score,
            comment: rating.comment.clone(),
            at_ms: rating.at,
        }
    }
}

/// The estimated arrival of an active delivery.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EtaView {
    /// The courier doing it.
    pub courier_id: CourierId,
    /// The status the estimate is for.
    pub status: Status,
    /// Estimated arrival at the dropoff.
    pub eta_ms: UnixMillis,
    /// Distance still to cover, metres.
    pub remaining_m: u32,
    /// Speed assumed, m/s.
    pub speed_mps: f64,
    /// The courier fix the estimate was computed from.
    pub as_of_ms: UnixMillis,
}

impl From<&Eta> for EtaView {
    fn from(eta: &Eta) -> Self {
        Self {
            courier_id: eta.courier_id,
            status: eta.status,
            eta_ms: eta.eta_at,
            remaining_m: eta.remaining_m,
            speed_mps: f64::from(eta.speed_mm_s) / 1000.0,
            as_of_ms: eta.as_of,
        }
    }
}

/// One delivery as it is tracked: its state and its ETA. The core of [`DeliveryView`], and
/// the value of the Redis cache's `delivery:{id}`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DeliveryDetails {
    /// The delivery.
    pub delivery_id: DeliveryId,
    /// Who ordered it.
    pub customer_id: CustomerId,
    /// The assigned courier, once assigned.
    pub courier_id: Option<CourierId>,
    /// Current status.
    pub status: Status,
    /// Collection point.
    pub pickup: LatLon,
    /// Destination.
    pub dropoff: LatLon,
    /// Promised delivery time.
    pub promised_by_ms: Option<UnixMillis>,
    /// Created.
    pub created_at_ms: UnixMillis,
    /// Assigned.
    pub assigned_at_ms: Option<UnixMillis>,
    /// Picked up.
    pub picked_up_at_ms: Option<UnixMillis>,
    /// Reached a terminal status.
    pub ended_at_ms: Option<UnixMillis>,
    /// The latest rating.
    pub rating: Option<RatingView>,
    /// Events applied to this delivery.
    pub version: u32,
    /// The current estimate, while active and the courier's position is known.
    pub eta: Option<EtaView>,
}

impl DeliveryDetails {
    /// The details of one delivery with its ETA.
    pub fn new(delivery_id: DeliveryId, state: &DeliveryState, eta: Option<&Eta>) -> Self {
        Self {
            delivery_id,
            customer_id: state.customer_id,
            courier_id: state.courier_id,
            status: state.status,
            pickup: state.pickup.into(),
            dropoff: state.dropoff.into(),
            promised_by_ms: state.promised_by,
            created_at_ms: state.created_at,
            assigned_at_ms: state.assigned_at,
            picked_up_at_ms: state.picked_up_at,
            ended_at_ms: state.ended_at,
            rating: state.rating.as_ref().map(RatingView::from),
            version: state.version,
            eta: eta.map(EtaView::from),
        }
    }
}

/// One delivery: `GET /api/deliveries/{id}` — its details and the zones holding its dropoff
/// point (one flat JSON object).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DeliveryView {
    /// State and ETA.
    #[serde(flatten)]
    pub details: DeliveryDetails,
    /// Zones containing the dropoff point.
    pub dropoff_zones: Vec<ZoneId>,
}

impl DeliveryView {
    /// The view of one delivery with its ETA and dropoff zones.
    pub fn new(
        delivery_id: DeliveryId,
        state: &DeliveryState,
        eta: Option<&Eta>,
        dropoff_zones: Vec<ZoneId>,
    ) -> Self {
        Self {
            details: DeliveryDetails::new(delivery_id, state, eta),
            dropoff_zones,
        }
    }
}

/// Everything a dashboard needs at once: `GET /api/snapshot`, and the first message of
/// `/ws/changes`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Snapshot {
    /// The last epoch applied; `null` before the first.
    pub epoch: Option<Epoch>,
    /// Collection sizes.
    pub counts: Counts,
    /// The overall aggregates.
    pub overall: MetricSummary,
    /// Per courier, by courier id.
    pub per_courier: Vec<ScopedMetrics>,
    /// Per dropoff zone, by zone id.
    pub per_zone: Vec<ScopedMetrics>,
    /// Per hour of day (UTC), by hour: success rates and peak hours.
    pub per_hour: Vec<ScopedMetrics>,
    /// Per weekday and hour (UTC): peak times.
    pub per_weekday_hour: Vec<ScopedMetrics>,
    /// Every courier's position, by courier id.
    pub couriers: Vec<CourierView>,
    /// Every zone, by zone id.
    pub zones: Vec<ZoneView>,
    /// Events the dataflow rejected since start, by reason code.
    pub rejections: BTreeMap<&'static str, u64>,
}
