//! The live stream: one [`EpochUpdate`] per applied epoch, with typed changes.
//!
//! A keyed record (courier, zone, delivery, ETA, metric) touched in an epoch appears once,
//! with its state after the epoch, or as removed; a geofence `+1`/`-1` of `inside` is an
//! entry/exit. As JSON each change is an object tagged by `"type"`.

use delivertrack_dataflow::{CourierId, DeliveryId, Epoch, Status, UnixMillis, ZoneId};
use serde::Serialize;

use super::view::{EtaView, LatLon, MetricSummary, ScopeView};

/// Everything one epoch changed, for live subscribers.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EpochUpdate {
    /// The epoch.
    pub epoch: Epoch,
    /// The typed changes: zones, then couriers, geofence transitions, deliveries, ETAs,
    /// metrics.
    pub changes: Vec<LiveChange>,
    /// Events the dataflow rejected in this epoch.
    pub rejected: usize,
}

/// One typed change.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LiveChange {
    /// A zone was created or edited.
    ZoneUpserted {
        /// The zone.
        zone_id: ZoneId,
        /// Display name.
        name: String,
        /// Rings of `[lon, lat]`, exterior first, per polygon.
        polygons: Vec<Vec<Vec<[f64; 2]>>>,
    },
    /// A zone was deleted.
    ZoneDeleted {
        /// The zone.
        zone_id: ZoneId,
    },
    /// A courier reported a newer position.
    CourierMoved {
        /// The courier.
        courier_id: CourierId,
        /// Where.
        position: LatLon,
        /// When the fix was taken.
        at_ms: UnixMillis,
        /// Current speed, m/s.
        speed_mps: Option<f64>,
        /// Heading, degrees.
        heading_deg: Option<f64>,
        /// Distance travelled, metres.
        odometer_m: f64,
    },
    /// A courier's state was withdrawn.
    CourierRemoved {
        /// The courier.
        courier_id: CourierId,
    },
    /// A courier entered a zone (`+1` of `inside`).
    GeofenceEntered {
        /// Who.
        courier_id: CourierId,
        /// Which zone.
        zone_id: ZoneId,
    },
    /// A courier left a zone, or the zone changed so that it is no longer inside (`-1`).
    GeofenceExited {
        /// Who.
        courier_id: CourierId,
        /// Which zone.
        zone_id: ZoneId,
    },
    /// A delivery was created or changed (status, courier, rating).
    DeliveryStatus {
        /// The delivery.
        delivery_id: DeliveryId,
        /// Its status now.
        status: Status,
        /// Its status before this epoch; `null` when it is new.
        previous_status: Option<Status>,
        /// The assigned courier.
        courier_id: Option<CourierId>,
        /// Its destination.
        dropoff: LatLon,
        /// Its version (events applied).
        version: u32,
    },
    /// A delivery's state was withdrawn.
    DeliveryRemoved {
        /// The delivery.
        delivery_id: DeliveryId,
    },
    /// A new or changed estimate.
    Eta {
        /// The delivery.
        delivery_id: DeliveryId,
        /// The estimate.
        #[serde(flatten)]
        eta: EtaView,
    },
    /// The delivery has no estimate any more (it ended, or its courier is unknown).
    EtaCleared {
        /// The delivery.
        delivery_id: DeliveryId,
    },
    /// An aggregate changed.
    Metric {
        /// Its group.
        scope: ScopeView,
        /// The figures now.
        metrics: MetricSummary,
    },
    /// An aggregate's group became empty.
    MetricCleared {
        /// Its group.
        scope: ScopeView,
    },
}
