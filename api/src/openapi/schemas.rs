//! Schemas of what the API answers with but does not define itself: the read model's views
//! (crate `delivertrack-sinks`), the dataflow's enums, and the write routes' answers.
//!
//! The views live in crates that must not know about HTTP documentation (the dataflow is
//! pure, the sinks know nothing of the API), so their schemas are written here, one type
//! per view with the same name, fields and JSON shape, and never constructed: only their
//! [`ToSchema`] implementations are used. The tests of [`crate::openapi`] serialize fully
//! populated real views and check each against its schema here, key for key, so a field
//! added to a view without its schema fails the suite.
//!
//! Times are Unix milliseconds (fields ending in `_ms`), positions degrees, speeds metres
//! per second, distances metres or kilometres as named.

// Schema-only types: their fields describe JSON and are never read.
#![allow(dead_code)]

use std::collections::BTreeMap;

use utoipa::ToSchema;
use uuid::Uuid;

/// The status of a delivery.
///
/// `created → assigned → picked_up → in_transit → delivered | failed`; any status before
/// delivery may become `cancelled`. `delivered`, `failed` and `cancelled` are terminal.
#[derive(Debug, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Ordered, no courier yet.
    Created,
    /// A courier is on the way to the pickup point.
    Assigned,
    /// The courier has the parcel.
    PickedUp,
    /// The courier is on the way to the dropoff point.
    InTransit,
    /// Handed over. Terminal.
    Delivered,
    /// Given up after pickup. Terminal.
    Failed,
    /// Called off before delivery. Terminal.
    Cancelled,
}

/// The kind of an event of the contract (also its RabbitMQ routing key).
#[derive(Debug, ToSchema)]
pub enum EventKind {
    /// A courier's GPS fix.
    #[serde(rename = "location.updated")]
    LocationUpdated,
    /// A new delivery.
    #[serde(rename = "delivery.created")]
    DeliveryCreated,
    /// A delivery's status changed.
    #[serde(rename = "status.changed")]
    StatusChanged,
    /// A customer rated a delivery.
    #[serde(rename = "delivery.rated")]
    DeliveryRated,
    /// A zone was created or replaced.
    #[serde(rename = "zone.upserted")]
    ZoneUpserted,
    /// A zone was removed.
    #[serde(rename = "zone.deleted")]
    ZoneDeleted,
}

/// A position in degrees.
#[derive(Debug, ToSchema)]
pub struct LatLon {
    /// Latitude, degrees.
    lat: f64,
    /// Longitude, degrees.
    lon: f64,
}

/// The derived figures of one aggregate.
#[derive(Debug, ToSchema)]
pub struct MetricSummary {
    /// Deliveries counted.
    deliveries: i64,
    /// ... of which active (assigned, picked up, in transit).
    active: i64,
    /// ... delivered.
    delivered: i64,
    /// ... failed.
    failed: i64,
    /// ... cancelled.
    cancelled: i64,
    /// delivered / (delivered + failed + cancelled); `null` before anything ended.
    success_rate: Option<f64>,
    /// Mean created → delivered, seconds.
    mean_delivery_seconds: Option<f64>,
    /// Mean picked up → delivered, seconds.
    mean_pickup_to_delivery_seconds: Option<f64>,
    /// Delivered on time / delivered with a promise.
    on_time_rate: Option<f64>,
    /// Rated deliveries.
    rated: i64,
    /// Mean rating score (1–5).
    mean_rating: Option<f64>,
    /// Ratings with score 1, 2, 3, 4, 5.
    #[schema(min_items = 5, max_items = 5)]
    rating_histogram: Vec<i64>,
    /// Courier scope: distance travelled, km.
    distance_km: f64,
    /// Courier scope: distinct active hours.
    active_hours: i64,
    /// Courier scope: delivered per active hour.
    deliveries_per_active_hour: Option<f64>,
}

/// The group an aggregate is for, tagged by `kind`.
#[derive(Debug, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ScopeView {
    /// Everything.
    Overall,
    /// One courier.
    Courier {
        /// The courier.
        courier_id: Uuid,
    },
    /// Deliveries whose dropoff lies in a zone.
    DropoffZone {
        /// The zone.
        zone_id: Uuid,
    },
    /// Deliveries created in an hour of the day (UTC).
    HourOfDay {
        /// 0–23.
        #[schema(maximum = 23)]
        hour: u8,
    },
    /// Deliveries created on a weekday in an hour of the day (UTC).
    WeekdayHour {
        /// 0 = Monday.
        #[schema(maximum = 6)]
        weekday: u8,
        /// 0–23.
        #[schema(maximum = 23)]
        hour: u8,
    },
}

/// The aggregates of one scope.
#[derive(Debug, ToSchema)]
pub struct ScopedMetrics {
    /// Which group.
    scope: ScopeView,
    /// Its figures.
    #[serde(flatten)]
    metrics: MetricSummary,
}

/// Sizes of the maintained collections.
#[derive(Debug, ToSchema)]
pub struct Counts {
    /// Couriers with a known position.
    couriers: u64,
    /// Live zones.
    zones: u64,
    /// Deliveries, any status.
    deliveries: u64,
    /// Deliveries assigned, picked up or in transit.
    active_deliveries: u64,
    /// Deliveries per status (the keys are statuses, `picked_up`, ...).
    deliveries_by_status: BTreeMap<String, u64>,
    /// `(courier, zone)` pairs currently inside.
    inside: u64,
    /// Active deliveries with an ETA.
    etas: u64,
}

/// A courier on the map.
#[derive(Debug, ToSchema)]
pub struct CourierView {
    /// The courier.
    courier_id: Uuid,
    /// Latest position.
    position: LatLon,
    /// When that position was taken.
    at_ms: i64,
    /// Current speed, m/s, when known.
    speed_mps: Option<f64>,
    /// Heading, degrees clockwise from north, when reported.
    heading_deg: Option<f64>,
    /// Distance travelled, metres.
    odometer_m: f64,
    /// Distinct clock hours with a fix.
    active_hours: u32,
    /// Zones the courier is inside.
    inside: Vec<Uuid>,
}

/// One courier with its aggregates and work.
#[derive(Debug, ToSchema)]
pub struct CourierDetail {
    /// Position and zones.
    #[serde(flatten)]
    courier: CourierView,
    /// The courier's aggregates, once it has any.
    metrics: Option<MetricSummary>,
    /// Deliveries assigned to the courier and not yet ended.
    active_deliveries: Vec<Uuid>,
}

/// A delivery zone (geofence).
#[derive(Debug, ToSchema)]
pub struct ZoneView {
    /// The zone.
    zone_id: Uuid,
    /// Display name.
    name: String,
    /// Required stay before a courier counts as inside, ms.
    dwell_ms: i64,
    /// Polygons; each a list of rings (exterior first), each ring a list of `[lon, lat]`.
    polygons: Vec<Vec<Vec<Vec<f64>>>>,
}

/// A customer's rating.
#[derive(Debug, ToSchema)]
pub struct RatingView {
    /// 1 to 5.
    #[schema(minimum = 1, maximum = 5)]
    score: u8,
    /// Free text.
    comment: Option<String>,
    /// When it was given.
    at_ms: i64,
}

/// The estimated arrival of an active delivery.
#[derive(Debug, ToSchema)]
pub struct EtaView {
    /// The courier doing it.
    courier_id: Uuid,
    /// The status the estimate is for.
    status: Status,
    /// Estimated arrival at the dropoff.
    eta_ms: i64,
    /// Distance still to cover, metres.
    remaining_m: u32,
    /// Speed assumed, m/s.
    speed_mps: f64,
    /// The courier fix the estimate was computed from.
    as_of_ms: i64,
}

/// One delivery as it is tracked: its state and its ETA.
#[derive(Debug, ToSchema)]
pub struct DeliveryDetails {
    /// The delivery.
    delivery_id: Uuid,
    /// Who ordered it.
    customer_id: Uuid,
    /// The assigned courier, once assigned.
    courier_id: Option<Uuid>,
    /// Current status.
    status: Status,
    /// Collection point.
    pickup: LatLon,
    /// Destination.
    dropoff: LatLon,
    /// Promised delivery time.
    promised_by_ms: Option<i64>,
    /// Created.
    created_at_ms: i64,
    /// Assigned.
    assigned_at_ms: Option<i64>,
    /// Picked up.
    picked_up_at_ms: Option<i64>,
    /// Reached a terminal status.
    ended_at_ms: Option<i64>,
    /// The latest rating.
    rating: Option<RatingView>,
    /// Events applied to this delivery.
    version: u32,
    /// The current estimate, while active and the courier's position is known.
    eta: Option<EtaView>,
}

/// One delivery: its details and the zones holding its dropoff point (one flat object).
#[derive(Debug, ToSchema)]
pub struct DeliveryView {
    /// State and ETA.
    #[serde(flatten)]
    details: DeliveryDetails,
    /// Zones containing the dropoff point.
    dropoff_zones: Vec<Uuid>,
}

/// Everything a dashboard needs at once (also the first message of `/ws/changes`).
#[derive(Debug, ToSchema)]
pub struct Snapshot {
    /// The last epoch applied; `null` before the first.
    epoch: Option<u64>,
    /// Collection sizes.
    counts: Counts,
    /// The overall aggregates.
    overall: MetricSummary,
    /// Per courier, by courier id.
    per_courier: Vec<ScopedMetrics>,
    /// Per dropoff zone, by zone id.
    per_zone: Vec<ScopedMetrics>,
    /// Per hour of day (UTC), by hour.
    per_hour: Vec<ScopedMetrics>,
    /// Per weekday and hour (UTC).
    per_weekday_hour: Vec<ScopedMetrics>,
    /// Every courier's position, by courier id.
    couriers: Vec<CourierView>,
    /// Every zone, by zone id.
    zones: Vec<ZoneView>,
    /// Events the dataflow rejected since start, by reason code.
    rejections: BTreeMap<String, u64>,
}

/// An applied write on a delivery: its id, the event the command became, and the delivery
/// as the read model now holds it.
#[derive(Debug, ToSchema)]
pub struct DeliveryWritten {
    /// The delivery.
    id: Uuid,
    /// The event the command became.
    event_id: Uuid,
    /// The delivery.
    #[serde(flatten)]
    view: DeliveryView,
}

/// An applied location fix: the courier's id, the event, and the courier as the read model
/// now holds it.
#[derive(Debug, ToSchema)]
pub struct CourierWritten {
    /// The courier.
    id: Uuid,
    /// The event the command became.
    event_id: Uuid,
    /// The courier.
    #[serde(flatten)]
    view: CourierDetail,
}

/// An applied zone change: the zone's id, the event, and the zone as the read model now
/// holds it.
#[derive(Debug, ToSchema)]
pub struct ZoneWritten {
    /// The zone.
    id: Uuid,
    /// The event the command became.
    event_id: Uuid,
    /// The zone.
    #[serde(flatten)]
    view: ZoneView,
}

/// The answer of `POST /graphql`, as GraphQL over HTTP defines it.
#[derive(Debug, ToSchema)]
pub struct GraphQlResponse {
    /// The result; absent when the request failed before execution.
    #[schema(value_type = Option<Object>)]
    data: Option<serde_json::Value>,
    /// Errors, each with `message`, `locations`, `path` and `extensions.code`
    /// (`UNAUTHENTICATED`, `FORBIDDEN`, `BAD_USER_INPUT`, `QUERY_TOO_DEEP`,
    /// `QUERY_TOO_COMPLEX`).
    #[schema(value_type = Option<Vec<Object>>)]
    errors: Option<Vec<serde_json::Value>>,
}
