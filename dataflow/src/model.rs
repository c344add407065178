//! What the dataflow maintains, and the shape of its output.
//!
//! Every maintained collection is a set of typed records; an epoch's output is the set of
//! records that appeared (`+1`) and disappeared (`-1`) in that epoch, across all of them
//! ([`EpochOutput`]). An upsert is a `-1` of the old record and a `+1` of the new one, so a
//! sink that applies deletes before inserts always holds the current state.

use serde::{Deserialize, Serialize};

use crate::event::{Event, EventKind, UnixMillis};
use crate::geometry::{GeoPoint, ZoneShape};
use crate::ids::{CourierId, CustomerId, DeliveryId, EventId, ZoneId};
use crate::lifecycle::Status;

/// Epochs number the batches of input, from 0.
pub type Epoch = u64;

/// The latest known state of a courier.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CourierState {
    /// The newest fix's position (last-writer-wins by `occurred_at`).
    pub position: GeoPoint,
    /// The newest fix's `occurred_at`.
    pub at: UnixMillis,
    /// The newest fix's event, which identifies this version of the state.
    pub event_id: EventId,
    /// Current speed, mm/s: as reported with the newest fix, otherwise estimated from the
    /// recent fixes; `None` when neither is known.
    pub speed_mm_s: Option<u32>,
    /// Heading reported with the newest fix, tenths of a degree.
    pub heading_ddeg: Option<u16>,
    /// Distance travelled over all accepted fixes, metres (summed in millimetres).
    pub odometer_mm: u64,
    /// Number of distinct clock hours (UTC) with at least one accepted fix.
    pub active_hours: u32,
    /// The zones the newest fix is in, each with the event time since when the courier has
    /// been in it without interruption (sorted by zone). The courier is *inside* a zone (a
    /// member of `inside`) once this is at least the zone's dwell time before `at`. Kept in
    /// the record so that a restarted pipeline resumes dwell times where they were.
    pub presence: Vec<(ZoneId, UnixMillis)>,
}

/// The current version of a zone.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ZoneState {
    /// Display name.
    pub name: String,
    /// The area.
    pub shape: ZoneShape,
    /// Required stay before a courier counts as inside, ms.
    pub dwell_ms: i64,
    /// `occurred_at` of the upsert that produced this version.
    pub updated_at: UnixMillis,
    /// That upsert's event id.
    pub event_id: EventId,
}

/// A customer's rating of a delivery.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Rating {
    /// 1 to 5.
    pub score: u8,
    /// Free text.
    pub comment: Option<String>,
    /// When it was given.
    pub at: UnixMillis,
}

/// The current state of a delivery.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DeliveryState {
    /// Who ordered it.
    pub customer_id: CustomerId,
    /// The assigned courier, once assigned.
    pub courier_id: Option<CourierId>,
    /// Collection point.
    pub pickup: GeoPoint,
    /// Destination.
    pub dropoff: GeoPoint,
    /// Promised delivery time.
    pub promised_by: Option<UnixMillis>,
    /// Current status.
    pub status: Status,
    /// `occurred_at` of `delivery.created`.
    pub created_at: UnixMillis,
    /// When it was assigned.
    pub assigned_at: Option<UnixMillis>,
    /// When it was picked up.
    pub picked_up_at: Option<UnixMillis>,
    /// When it reached a terminal status.
    pub ended_at: Option<UnixMillis>,
    /// The latest rating.
    pub rating: Option<Rating>,
    /// Number of events applied to this delivery (its version).
    pub version: u32,
}

/// The estimated arrival of an active delivery.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Eta {
    /// The courier doing it.
    pub courier_id: CourierId,
    /// The status the estimate is for.
    pub status: Status,
    /// Great-circle distance still to cover (via the pickup when not yet picked up), metres.
    pub remaining_m: u32,
    /// The speed assumed, mm/s.
    pub speed_mm_s: u32,
    /// The estimated arrival at the dropoff.
    pub eta_at: UnixMillis,
    /// The courier fix the estimate was computed from.
    pub as_of: UnixMillis,
}

/// The group an aggregate is kept for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Scope {
    /// Everything.
    Overall,
    /// Deliveries assigned to one courier, plus that courier's movement.
    Courier(CourierId),
    /// Deliveries whose dropoff lies in a zone.
    DropoffZone(ZoneId),
    /// Deliveries created in an hour of the day (0–23, UTC).
    HourOfDay(u8),
    /// Deliveries created on a weekday (0 = Monday) in an hour of the day (UTC).
    WeekdayHour(u8, u8),
}

/// Additive counters kept per [`Scope`]. Every derived figure (rates, means) is a ratio of
/// two of them, so that a late correction is a subtraction and an addition, never a rescan.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Tally {
    /// Deliveries.
    pub deliveries: i64,
    /// ... of which active (assigned, picked up, in transit).
    pub active: i64,
    /// ... delivered.
    pub delivered: i64,
    /// ... failed.
    pub failed: i64,
    /// ... cancelled.
    pub cancelled: i64,
    /// Delivered deliveries that had a promise.
    pub promised: i64,
    /// ... of which delivered on or before it.
    pub on_time: i64,
    /// Sum over delivered deliveries of created → delivered, ms.
    pub created_to_delivered_ms: i64,
    /// Delivered deliveries with a pickup time.
    pub picked_up_delivered: i64,
    /// Sum over those of picked up → delivered, ms.
    pub picked_up_to_delivered_ms: i64,
    /// Rated deliveries.
    pub rated: i64,
    /// Sum of their scores.
    pub score_sum: i64,
    /// Number of ratings with score 1, 2, 3, 4, 5.
    pub score_histogram: [i64; 5],
    /// Courier scope only: distance travelled, mm.
    pub distance_mm: i64,
    /// Courier scope only: distinct active hours.
    pub active_hours: i64,
}

impl Tally {
    /// delivered / (delivered + failed + cancelled), `None` before anything ended.
    pub fn success_rate(&self) -> Option<f64> {
        let ended = self.delivered + self.failed + self.cancelled;
        (ended > 0).then(|| self.delivered as f64 / ended as f64)
    }

    /// Mean created → delivered, seconds.
    pub fn mean_delivery_seconds(&self) -> Option<f64> {
        (self.delivered > 0)
            .then(|| self.created_to_delivered_ms as f64 / 1000.0 / self.delivered as f64)
    }

    /// Mean picked up → delivered, seconds.
    pub fn mean_pickup_to_delivery_seconds(&self) -> Option<f64> {
        (self.picked_up_delivered > 0).then(|| {
            self.picked_up_to_delivered_ms as f64 / 1000.0 / self.picked_up_delivered as f64
        })
    }

    /// on time / promised.
    pub fn on_time_rate(&self) -> Option<f64> {
        (self.promised > 0).then(|| self.on_time as f64 / self.promised as f64)
    }

    /// Mean rating score.
    pub fn mean_rating(&self) -> Option<f64> {
        (self.rated > 0).then(|| self.score_sum as f64 / self.rated as f64)
    }

    /// Delivered per active hour (courier scope).
    pub fn deliveries_per_active_hour(&self) -> Option<f64> {
        (self.active_hours > 0).then(|| self.delivered as f64 / self.active_hours as f64)
    }

    /// `self += other * factor`.
    pub fn add_scaled(&mut self, other: &Tally, factor: i64) {
        self.deliveries += other.deliveries * factor;
        self.active += other.active * factor;
        self.delivered += other.delivered * factor;
        self.failed += other.failed * factor;
        self.cancelled += other.cancelled * factor;
        self.promised += other.promised * factor;
        self.on_time += other.on_time * factor;
        self.created_to_delivered_ms += other.created_to_delivered_ms * factor;
        self.picked_up_delivered += other.picked_up_delivered * factor;
        self.picked_up_to_delivered_ms += other.picked_up_to_delivered_ms * factor;
        self.rated += other.rated * factor;
        self.score_sum += other.score_sum * factor;
        for (mine, theirs) in self.score_histogram.iter_mut().zip(other.score_histogram) {
            *mine += theirs * factor;
        }
        self.distance_mm += other.distance_mm * factor;
        self.active_hours += other.active_hours * factor;
    }

    /// All counters zero.
    pub fn is_empty(&self) -> bool {
        *self == Tally::default()
    }
}

/// How many ratings a delivery takes: a customer may change their mind, but a client that
/// re-rates in a loop must not grow the delivery's history (and every store's rating log)
/// without bound. The next one is refused as [`RejectReason::TooManyRatings`].
pub const MAX_RATINGS_PER_DELIVERY: usize = 5;

/// Why the dataflow refused a well-formed event: it contradicts the state it meets.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum RejectReason {
    /// A status change or rating for a delivery that was never created.
    UnknownDelivery,
    /// A second `delivery.created` (another event id) for an existing delivery.
    DeliveryExists,
    /// The lifecycle forbids this step.
    IllegalTransition {
        /// The delivery's status.
        from: Status,
        /// The status asked for.
        to: Status,
    },
    /// A rating before the delivery ended (only delivered and failed deliveries are rated).
    NotRateable {
        /// The delivery's status.
        status: Status,
    },
    /// A rating of a delivery that took [`MAX_RATINGS_PER_DELIVERY`] ratings already.
    TooManyRatings {
        /// The bound.
        max: usize,
    },
    /// A fix further from the courier's previous accepted fix than the maximum courier
    /// speed covers in the event time between them: a GPS glitch or a forged position. It
    /// moves nothing and adds no distance.
    ImplausibleJump {
        /// Distance from the previous accepted fix, mm.
        distance_mm: u64,
        /// Event time since that fix, ms (0: the same instant).
        elapsed_ms: i64,
        /// The maximum speed, mm/s.
        max_speed_mm_s: u32,
    },
    /// Older than the state it would replace (a late fix, zone version or rating). Not an
    /// error: sources count these and acknowledge them without dead-lettering.
    Stale,
}

impl RejectReason {
    /// A stable snake_case code, for metric labels and dead-letter headers.
    pub fn code(&self) -> &'static str {
        match self {
            RejectReason::UnknownDelivery => "unknown_delivery",
            RejectReason::DeliveryExists => "delivery_exists",
            RejectReason::IllegalTransition { .. } => "illegal_transition",
            RejectReason::NotRateable { .. } => "not_rateable",
            RejectReason::TooManyRatings { .. } => "too_many_ratings",
            RejectReason::ImplausibleJump { .. } => "implausible_jump",
            RejectReason::Stale => "stale",
        }
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RejectReason::UnknownDelivery => f.write_str("the delivery does not exist"),
            RejectReason::DeliveryExists => f.write_str("the delivery already exists"),
            RejectReason::IllegalTransition { from, to } => {
                write!(f, "a delivery cannot go from {from} to {to}")
            }
            RejectReason::NotRateable { status } => {
                write!(f, "a delivery cannot be rated while {status}")
            }
            RejectReason::TooManyRatings { max } => {
                write!(
                    f,
                    "the delivery has been rated {max} times, the most it takes"
                )
            }
            RejectReason::ImplausibleJump {
                distance_mm,
                elapsed_ms,
                max_speed_mm_s,
            } => write!(
                f,
                "the fix lies {:.1} m from the previous one after {:.3} s, faster than {:.1} m/s",
                *distance_mm as f64 / 1_000.0,
                *elapsed_ms as f64 / 1_000.0,
                f64::from(*max_speed_mm_s) / 1_000.0
            ),
            RejectReason::Stale => f.write_str("older than the current state"),
        }
    }
}

/// An event the dataflow refused, with the reason.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Rejection {
    /// The refused event.
    pub event_id: EventId,
    /// Its kind.
    pub kind: EventKind,
    /// Why.
    pub reason: RejectReason,
}

/// One record of one maintained collection.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Change {
    /// `couriers(courier, state)`: the latest state of every courier.
    Courier(CourierId, CourierState),
    /// `zones(zone, state)`: every live zone.
    Zone(ZoneId, ZoneState),
    /// `inside(courier, zone)`: a `+1` is a geofence entry, a `-1` an exit.
    Inside(CourierId, ZoneId),
    /// `deliveries(delivery, state)`.
    Delivery(DeliveryId, DeliveryState),
    /// `dropoff_zone(delivery, zone)`: zones containing a delivery's dropoff point.
    DropoffZone(DeliveryId, ZoneId),
    /// `eta(delivery, eta)`: one per active delivery whose courier has reported a position.
    Eta(DeliveryId, Eta),
    /// `metrics(scope, tally)`: the aggregates.
    Metric(Scope, Tally),
}

/// Everything one closed epoch changed: consolidated (no record appears twice, no zero
/// diffs), sorted, with the events the dataflow rejected in it and the epoch's input.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochOutput {
    /// The epoch.
    pub epoch: Epoch,
    /// The epoch restored state ([`crate::pipeline::EpochSender::restore`]) rather than
    /// applying events: its changes are the restored records themselves. Sinks that already
    /// hold them (the store they were read from, a notification feed) skip it; in-memory
    /// sinks apply it.
    pub restored: bool,
    /// The epoch's input as it was submitted, refused events included: for sinks that keep
    /// the raw event log (an append-only table, a location history).
    pub events: Vec<Event>,
    /// `(record, diff)`, diff `+1` or `-1`.
    pub changes: Vec<(Change, i64)>,
    /// Refused events, sorted.
    pub rejections: Vec<Rejection>,
}
