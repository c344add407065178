//! Validated events, as the dataflow consumes them.
//!
//! These are the domain form of the wire contract (see [`crate::contract`] for decoding and
//! `docs/events.md` for the JSON): identifiers are typed, times are Unix milliseconds,
//! positions are fixed point. Everything here has passed validation; what can only be judged
//! against state (a status transition, a rating of an unknown delivery) is judged inside the
//! dataflow and reported as a [`crate::model::Rejection`].

use serde::{Deserialize, Serialize};

use crate::geometry::{GeoPoint, ZoneShape};
use crate::ids::{CourierId, CustomerId, DeliveryId, EventId, ZoneId};
use crate::lifecycle::Status;

/// Milliseconds since the Unix epoch, UTC.
pub type UnixMillis = i64;

/// The six event kinds; each is also the RabbitMQ routing key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum EventKind {
    /// `location.updated`
    #[serde(rename = "location.updated")]
    LocationUpdated,
    /// `delivery.created`
    #[serde(rename = "delivery.created")]
    DeliveryCreated,
    /// `status.changed`
    #[serde(rename = "status.changed")]
    StatusChanged,
    /// `delivery.rated`
    #[serde(rename = "delivery.rated")]
    DeliveryRated,
    /// `zone.upserted`
    #[serde(rename = "zone.upserted")]
    ZoneUpserted,
    /// `zone.deleted`
    #[serde(rename = "zone.deleted")]
    ZoneDeleted,
}

impl EventKind {
    /// Every kind, in the order of the contract table.
    pub const ALL: [EventKind; 6] = [
        EventKind::LocationUpdated,
        EventKind::DeliveryCreated,
        EventKind::StatusChanged,
        EventKind::DeliveryRated,
        EventKind::ZoneUpserted,
        EventKind::ZoneDeleted,
    ];

    /// The wire name, which is also the routing key.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::LocationUpdated => "location.updated",
            EventKind::DeliveryCreated => "delivery.created",
            EventKind::StatusChanged => "status.changed",
            EventKind::DeliveryRated => "delivery.rated",
            EventKind::ZoneUpserted => "zone.upserted",
            EventKind::ZoneDeleted => "zone.deleted",
        }
    }

    /// Parses a wire name.
    pub fn from_wire(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == name)
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One validated event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Unique per event; a redelivered message carries the same id.
    pub event_id: EventId,
    /// When it happened at the source (event time), Unix milliseconds.
    pub occurred_at: UnixMillis,
    /// What happened.
    pub body: EventBody,
}

/// The kind-specific part of an event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventBody {
    /// A courier's GPS fix.
    LocationUpdated(LocationUpdated),
    /// A new delivery order.
    DeliveryCreated(DeliveryCreated),
    /// A lifecycle step of a delivery.
    StatusChanged(StatusChanged),
    /// A customer's rating of a delivery.
    DeliveryRated(DeliveryRated),
    /// A zone created or edited.
    ZoneUpserted(ZoneUpserted),
    /// A zone removed.
    ZoneDeleted(ZoneDeleted),
}

/// `location.updated`
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocationUpdated {
    /// Who moved.
    pub courier_id: CourierId,
    /// Where the courier is.
    pub position: GeoPoint,
    /// Ground speed reported by the device, mm/s.
    pub speed_mm_s: Option<u32>,
    /// Heading reported by the device, tenths of a degree clockwise from north (0..3600).
    pub heading_ddeg: Option<u16>,
    /// Horizontal accuracy reported by the device, centimetres.
    pub accuracy_cm: Option<u32>,
}

/// `delivery.created`
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryCreated {
    /// The new delivery.
    pub delivery_id: DeliveryId,
    /// Who ordered it.
    pub customer_id: CustomerId,
    /// Where the courier collects the parcel.
    pub pickup: GeoPoint,
    /// Where the parcel goes.
    pub dropoff: GeoPoint,
    /// The promised delivery time, if any.
    pub promised_by: Option<UnixMillis>,
}

/// `status.changed`
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusChanged {
    /// Which delivery.
    pub delivery_id: DeliveryId,
    /// The new status (never `created`: that is `delivery.created`).
    pub status: Status,
    /// The courier; present exactly when `status` is `assigned` (optional otherwise).
    pub courier_id: Option<CourierId>,
}

/// `delivery.rated`
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryRated {
    /// Which delivery.
    pub delivery_id: DeliveryId,
    /// 1 to 5.
    pub score: u8,
    /// Free text from the customer.
    pub comment: Option<String>,
}

/// `zone.upserted`
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZoneUpserted {
    /// Which zone.
    pub zone_id: ZoneId,
    /// Display name.
    pub name: String,
    /// The zone's area.
    pub shape: ZoneShape,
    /// How long a courier must stay inside before it counts as inside, ms (0 = at once).
    pub dwell_ms: i64,
}

/// `zone.deleted`
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZoneDeleted {
    /// Which zone.
    pub zone_id: ZoneId,
}

impl Event {
    /// The kind of this event.
    pub fn kind(&self) -> EventKind {
        match &self.body {
            EventBody::LocationUpdated(_) => EventKind::LocationUpdated,
            EventBody::DeliveryCreated(_) => EventKind::DeliveryCreated,
            EventBody::StatusChanged(_) => EventKind::StatusChanged,
            EventBody::DeliveryRated(_) => EventKind::DeliveryRated,
            EventBody::ZoneUpserted(_) => EventKind::ZoneUpserted,
            EventBody::ZoneDeleted(_) => EventKind::ZoneDeleted,
        }
    }

    /// The order in which events of one epoch are applied: event time first; at equal times a
    /// delivery's creation before its status changes before its rating; then the event id, so
    /// that every worker and the reference agree.
    pub fn apply_order(&self) -> (UnixMillis, u8, EventId) {
        let rank = match &self.body {
            EventBody::ZoneUpserted(_) | EventBody::ZoneDeleted(_) => 0,
            EventBody::DeliveryCreated(_) => 1,
            EventBody::StatusChanged(s) => 2 + s.status as u8,
            EventBody::DeliveryRated(_) => 10,
            EventBody::LocationUpdated(_) => 11,
        };
        (self.occurred_at, rank, self.event_id)
    }
}
