//! The shapes the MongoDB sink stores and asks for, as BSON: pure functions, no I/O, so
//! that every document, index and pipeline is tested without a server.
//!
//! # `courier_locations`: one document per accepted fix
//! ```text
//! { _id: UUID(event_id), courier_id: UUID(courier_id),
//!   location: { type: "Point", coordinates: [lon, lat] },
//!   occurred_at: Date, speed_mps?: double, heading_deg?: double, accuracy_m?: double,
//!   epoch: long }
//! ```
//! Ids are BSON UUIDs (binary subtype 4), not strings: 16 bytes instead of 36 in every
//! document and index entry, `UUID("...")` in the shell, and — what the query of
//! [`couriers_in_zone_pipeline`] relies on — MongoDB orders them byte by byte, exactly as
//! the dataflow orders [`EventId`]s, so "latest by `(occurred_at, event_id)`" means the same
//! in both. `_id` = event id is the uniqueness: a redelivered fix is a duplicate key and is
//! not stored again. Optional device readings are left out when the device sent none, as
//! on the wire. `epoch` is the dataflow's epoch that carried the fix, numbered from 0 in each
//! process: for tracing a document back to a commit, not for ordering.
//!
//! # `delivery_zones`: one document per live zone
//! ```text
//! { _id: UUID(zone_id), name, geometry: GeoJSON Polygon | MultiPolygon,
//!   dwell_seconds: double, updated_at: Date, event_id: UUID }
//! ```
//! `geometry` is the wire contract's own encoding of the zone (a Polygon when there is one,
//! a MultiPolygon otherwise), produced by [`contract::encode_event`], so the store never
//! disagrees with what was published. `(updated_at, event_id)` is the zone's version, the
//! dataflow's last-writer-wins key; writes are guarded by it (see [`ZoneWrites`]).

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use delivertrack_dataflow::contract;
use delivertrack_dataflow::event::{Event, EventBody, LocationUpdated, ZoneUpserted};
use delivertrack_dataflow::geometry::GeoPoint;
use delivertrack_dataflow::model::ZoneState;
use delivertrack_dataflow::{
    Change, CourierId, Epoch, EpochOutput, EventId, RejectReason, UnixMillis, ZoneId,
};
use mongodb::IndexModel;
use mongodb::bson::spec::BinarySubtype;
use mongodb::bson::{self, Binary, Bson, DateTime as BsonDateTime, Document, doc};
use mongodb::options::IndexOptions;
use uuid::Uuid;

/// Name of the 2dsphere index on `courier_locations.location`.
pub const LOCATION_INDEX: &str = "location_2dsphere";
/// Name of the per-courier history index on `courier_locations`.
pub const LATEST_INDEX: &str = "courier_id_1_occurred_at_-1__id_-1";
/// Name of the 2dsphere index on `delivery_zones.geometry`.
pub const GEOMETRY_INDEX: &str = "geometry_2dsphere";

/// A UUID as BSON binary subtype 4.
pub fn uuid_bson(id: Uuid) -> Bson {
    Bson::Binary(Binary {
        subtype: BinarySubtype::Uuid,
        bytes: id.as_bytes().to_vec(),
    })
}

/// A UUID back from BSON binary subtype 4; `None` for anything else.
pub fn uuid_from_bson(value: &Bson) -> Option<Uuid> {
    match value {
        Bson::Binary(Binary {
            subtype: BinarySubtype::Uuid,
            bytes,
        }) => Uuid::from_slice(bytes).ok(),
        _ => None,
    }
}

fn date(millis: UnixMillis) -> Bson {
    Bson::DateTime(BsonDateTime::from_millis(millis))
}

// ---------------------------------------------------------------------------------------
// courier_locations
// ---------------------------------------------------------------------------------------

/// The stored document of one fix.
pub fn location_document(
    event_id: EventId,
    occurred_at: UnixMillis,
    fix: &LocationUpdated,
    epoch: Epoch,
) -> Document {
    let mut document = doc! {
        "_id": uuid_bson(event_id.0),
        "courier_id": uuid_bson(fix.courier_id.0),
        "location": {
            "type": "Point",
            "coordinates": [fix.position.lon(), fix.position.lat()],
        },
        "occurred_at": date(occurred_at),
    };
    // The same units and conversions as the wire contract.
    if let Some(speed) = fix.speed_mm_s {
        document.insert("speed_mps", f64::from(speed) / 1_000.0);
    }
    if let Some(heading) = fix.heading_ddeg {
        document.insert("heading_deg", f64::from(heading) / 10.0);
    }
    if let Some(accuracy) = fix.accuracy_cm {
        document.insert("accuracy_m", f64::from(accuracy) / 100.0);
    }
    // An epoch past i64::MAX would take longer than the universe has existed at one epoch
    // per nanosecond; saturating keeps the mapping total.
    document.insert("epoch", i64::try_from(epoch).unwrap_or(i64::MAX));
    document
}

/// The location documents of an epoch: every `location.updated` of its input, once, except
/// those the dataflow refused for a reason other than `stale`.
///
/// Stale fixes are kept. A stale fix is older than the courier's newest, so it must not
/// move the courier's *current* position — and it does not here either, since
/// [`couriers_in_zone_pipeline`] takes each courier's latest by `occurred_at` — but it is
/// still a real position the device reported at that time, and this collection is the
/// location *history*: dropping late points would leave holes in a courier's track
/// depending on network delays. The PostgreSQL event log keeps them for the same reason.
/// Refusals for other reasons (none exists for fixes today) mean the event contradicts the
/// state and is dead-lettered: it is not history.
///
/// An event that appears twice in the epoch (a redelivery within one batch) gives one
/// document, so that the insert meets no duplicate of its own making.
pub fn location_documents(output: &EpochOutput) -> Vec<Document> {
    let refused: BTreeSet<EventId> = output
        .rejections
        .iter()
        .filter(|r| r.reason != RejectReason::Stale)
        .map(|r| r.event_id)
        .collect();
    let mut seen = BTreeSet::new();
    output
        .events
        .iter()
        .filter_map(|event| match &event.body {
            EventBody::LocationUpdated(fix)
                if !refused.contains(&event.event_id) && seen.insert(event.event_id) =>
            {
                Some(location_document(
                    event.event_id,
                    event.occurred_at,
                    fix,
                    output.epoch,
                ))
            }
            _ => None,
        })
        .collect()
}

/// The indexes of `courier_locations`.
///
/// - `location: "2dsphere"`: spatial queries over the history (`$geoWithin`, `$near`).
/// - `{courier_id: 1, occurred_at: -1, _id: -1}`: a courier's track, newest first, and the
///   "latest fix per courier" of [`couriers_in_zone_pipeline`], whose `$sort` it matches
///   key for key so that the server walks the index instead of sorting the history in
///   memory. `_id` is the third key because the dataflow breaks ties of `occurred_at` by
///   event id; without it that sort could not use the index.
///
/// Uniqueness needs no index of its own: `_id` is the event id.
pub fn location_indexes() -> Vec<IndexModel> {
    vec![
        index(doc! { "location": "2dsphere" }, LOCATION_INDEX),
        index(
            doc! { "courier_id": 1, "occurred_at": -1, "_id": -1 },
            LATEST_INDEX,
        ),
    ]
}

/// The indexes of `delivery_zones`: `geometry: "2dsphere"`, for "which zones hold this
/// point" (`$geoIntersects`). It also makes MongoDB validate every stored polygon.
pub fn zone_indexes() -> Vec<IndexModel> {
    vec![index(doc! { "geometry": "2dsphere" }, GEOMETRY_INDEX)]
}

/// Named explicitly, so that `createIndexes` at every start recognises them.
fn index(keys: Document, name: &str) -> IndexModel {
    IndexModel::builder()
        .keys(keys)
        .options(IndexOptions::builder().name(name.to_owned()).build())
        .build()
}

// ---------------------------------------------------------------------------------------
// delivery_zones
// ---------------------------------------------------------------------------------------

/// Why a zone could not be turned into BSON.
#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    /// The contract's encoding of the zone has no `geometry` (cannot happen for a decoded
    /// zone; checked rather than assumed).
    #[error("zone {0} has no GeoJSON geometry")]
    NoGeometry(ZoneId),
    /// The GeoJSON did not convert to BSON.
    #[error("the geometry of zone {zone} does not convert to BSON")]
    Bson {
        /// The zone.
        zone: ZoneId,
        /// The converter's error (boxed: it is large, and rare).
        #[source]
        source: Box<bson::ser::Error>,
    },
}

/// The zone's geometry as the wire contract encodes it, in BSON.
///
/// The state is turned back into the upsert that produced it (same id, time, name, shape,
/// dwell) and encoded by [`contract::encode_event`]: one GeoJSON encoder for the wire and
/// the store.
///
/// # Errors
/// [`MappingError`] when the encoding has no geometry or it does not convert.
pub fn zone_geometry(zone_id: ZoneId, state: &ZoneState) -> Result<Document, MappingError> {
    let event = Event {
        event_id: state.event_id,
        occurred_at: state.updated_at,
        body: EventBody::ZoneUpserted(ZoneUpserted {
            zone_id,
            name: state.name.clone(),
            shape: state.shape.clone(),
            dwell_ms: state.dwell_ms,
        }),
    };
    let mut json = contract::encode_event(&event);
    let geometry = json
        .get_mut("geometry")
        .map(serde_json::Value::take)
        .ok_or(MappingError::NoGeometry(zone_id))?;
    match bson::to_bson(&geometry) {
        Ok(Bson::Document(document)) => Ok(document),
        Ok(_) => Err(MappingError::NoGeometry(zone_id)),
        Err(source) => Err(MappingError::Bson {
            zone: zone_id,
            source: Box::new(source),
        }),
    }
}

/// The stored document of a zone's current version.
///
/// # Errors
/// [`MappingError`] from [`zone_geometry`].
pub fn zone_document(zone_id: ZoneId, state: &ZoneState) -> Result<Document, MappingError> {
    Ok(doc! {
        "_id": uuid_bson(zone_id.0),
        "name": state.name.as_str(),
        "geometry": zone_geometry(zone_id, state)?,
        "dwell_seconds": state.dwell_ms as f64 / 1_000.0,
        "updated_at": date(state.updated_at),
        "event_id": uuid_bson(state.event_id.0),
    })
}

/// Matches a stored zone whose version `(updated_at, event_id)` is at most `state`'s.
fn version_at_most(state: &ZoneState) -> Document {
    doc! {
        "$or": [
            { "updated_at": { "$lt": date(state.updated_at) } },
            { "updated_at": date(state.updated_at), "event_id": { "$lte": uuid_bson(state.event_id.0) } },
        ]
    }
}

/// One zone to replace (or insert): `replace_one(filter, replacement, upsert)`.
#[derive(Debug, Clone, PartialEq)]
pub struct ZoneUpsert {
    /// The zone.
    pub zone_id: ZoneId,
    /// `_id` = the zone and the stored version no newer than this one.
    pub filter: Document,
    /// The whole new document.
    pub replacement: Document,
}

/// What an epoch does to `delivery_zones`.
///
/// A zone with a `+1` is upserted to the new version; a zone with a `-1` alone is deleted.
/// Both are guarded by the version: an upsert replaces only a stored version no newer than
/// its own — when a newer one is stored, the filter misses, the upsert's insert meets the
/// existing `_id` and fails with a duplicate key, which the writer takes as "already
/// newer" — and a delete removes only the version it retracts or an older one. So
/// committing an epoch again changes nothing, and neither does committing an older one
/// after a newer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ZoneWrites {
    /// One replacement per upserted zone, in zone order.
    pub upserts: Vec<ZoneUpsert>,
    /// One `delete_many` filter for every deleted zone, `None` when none is.
    pub delete: Option<Document>,
    /// How many zones `delete` covers.
    pub deleted: usize,
}

impl ZoneWrites {
    /// Nothing to write.
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.delete.is_none()
    }
}

/// The zone writes of an epoch, from its `Change::Zone` records.
///
/// # Errors
/// [`MappingError`] when a zone's geometry does not map.
pub fn zone_writes(output: &EpochOutput) -> Result<ZoneWrites, MappingError> {
    let mut zones: BTreeMap<ZoneId, (Option<&ZoneState>, Option<&ZoneState>)> = BTreeMap::new();
    for (change, diff) in &output.changes {
        if let Change::Zone(zone_id, state) = change {
            let entry = zones.entry(*zone_id).or_default();
            if *diff > 0 {
                entry.1 = Some(state);
            } else if *diff < 0 {
                entry.0 = Some(state);
            }
        }
    }
    let mut writes = ZoneWrites::default();
    let mut deletes = Vec::new();
    for (zone_id, (old, new)) in zones {
        match (old, new) {
            (_, Some(new)) => {
                let mut filter = doc! { "_id": uuid_bson(zone_id.0) };
                filter.extend(version_at_most(new));
                writes.upserts.push(ZoneUpsert {
                    zone_id,
                    filter,
                    replacement: zone_document(zone_id, new)?,
                });
            }
            (Some(old), None) => {
                let mut filter = doc! { "_id": uuid_bson(zone_id.0) };
                filter.extend(version_at_most(old));
                deletes.push(Bson::Document(filter));
            }
            (None, None) => {}
        }
    }
    writes.deleted = deletes.len();
    if !deletes.is_empty() {
        writes.delete = Some(doc! { "$or": deletes });
    }
    Ok(writes)
}

// ---------------------------------------------------------------------------------------
// The query: couriers whose latest position lies in a zone
// ---------------------------------------------------------------------------------------

/// The aggregation behind `couriers_in_zone`: couriers whose *latest* fix (since `since`,
/// when given) lies within `geometry`.
///
/// 1. `$match` the fixes since `since` (all when `None`);
/// 2. `$sort` by courier, newest first (`occurred_at`, then event id, the dataflow's order),
///    which walks the `{courier_id, occurred_at, _id}` index;
/// 3. `$group` by courier taking the `$first`, i.e. each courier's latest fix;
/// 4. only then `$match` `$geoWithin` the zone;
/// 5. `$sort` by courier, for a stable answer.
///
/// The order of 3 and 4 is the point: `$geoWithin` first would keep, for every courier who
/// was *ever* in the zone, its latest point inside it — a courier who left an hour ago
/// would still be listed. Grouping first asks where each courier is *now*. The geometry is
/// a constant of the pipeline because `$geoWithin`'s `$geometry` cannot refer to another
/// collection; the caller reads it from `delivery_zones` first.
///
/// MongoDB tests containment on the sphere (polygon edges are great-circle arcs) while the
/// dataflow tests it in the longitude/latitude plane; for city-sized zones the two edges
/// lie within about a centimetre of each other, the resolution of a fix.
pub fn couriers_in_zone_pipeline(
    geometry: &Document,
    since: Option<DateTime<Utc>>,
) -> Vec<Document> {
    let mut pipeline = Vec::with_capacity(5);
    if let Some(since) = since {
        pipeline
            .push(doc! { "$match": { "occurred_at": { "$gte": date(since.timestamp_millis()) } } });
    }
    pipeline.extend([
        doc! { "$sort": { "courier_id": 1, "occurred_at": -1, "_id": -1 } },
        doc! { "$group": {
            "_id": "$courier_id",
            "location": { "$first": "$location" },
            "occurred_at": { "$first": "$occurred_at" },
            "event_id": { "$first": "$_id" },
        } },
        doc! { "$match": { "location": { "$geoWithin": { "$geometry": geometry.clone() } } } },
        doc! { "$sort": { "_id": 1 } },
    ]);
    pipeline
}

/// A courier's latest stored position, as `couriers_in_zone` answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CourierPosition {
    /// The courier.
    pub courier_id: CourierId,
    /// Where its latest fix put it.
    pub position: GeoPoint,
    /// When that fix was taken.
    pub occurred_at: DateTime<Utc>,
    /// That fix's event.
    pub event_id: EventId,
}

/// Why a result document is not a [`CourierPosition`].
#[derive(Debug, thiserror::Error)]
#[error("a stored courier position is malformed: {0}")]
pub struct MalformedPosition(pub &'static str);

impl CourierPosition {
    /// Reads one result of [`couriers_in_zone_pipeline`].
    ///
    /// # Errors
    /// [`MalformedPosition`] naming the field that is missing or of the wrong type (a
    /// document written by something other than this sink).
    pub fn from_document(document: &Document) -> Result<Self, MalformedPosition> {
        let courier_id = document
            .get("_id")
            .and_then(uuid_from_bson)
            .ok_or(MalformedPosition("_id (courier id)"))?;
        let event_id = document
            .get("event_id")
            .and_then(uuid_from_bson)
            .ok_or(MalformedPosition("event_id"))?;
        let occurred_at = document
            .get_datetime("occurred_at")
            .ok()
            .and_then(|at| DateTime::from_timestamp_millis(at.timestamp_millis()))
            .ok_or(MalformedPosition("occurred_at"))?;
        let coordinates = document
            .get_document("location")
            .and_then(|location| location.get_array("coordinates"))
            .map_err(|_| MalformedPosition("location.coordinates"))?;
        let (lon, lat) = match coordinates.as_slice() {
            [Bson::Double(lon), Bson::Double(lat)] => (*lon, *lat),
            _ => return Err(MalformedPosition("location.coordinates")),
        };
        Ok(Self {
            courier_id: CourierId(courier_id),
            position: GeoPoint::from_degrees(lat, lon),
            occurred_at,
            event_id: EventId(event_id),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use delivertrack_dataflow::EventKind;
    use delivertrack_dataflow::event::StatusChanged;
    use delivertrack_dataflow::geometry::ZoneShape;
    use delivertrack_dataflow::model::Rejection;
    use delivertrack_dataflow::{DeliveryId, Status};
    use geo::{MultiPolygon, polygon};

    use super::*;

    /// 2026-11-30T12:00:00Z.
    const NOON: UnixMillis = 1_796_040_000_000;

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(0x0b9c_5f6e_3f1a_4c1e_9a43_0000_0000_0000 | n)
    }

    fn fix(n: u128, courier: u128, lat: f64, lon: f64) -> Event {
        Event {
            event_id: EventId(id(n)),
            occurred_at: NOON + n as i64,
            body: EventBody::LocationUpdated(LocationUpdated {
                courier_id: CourierId(id(courier)),
                position: GeoPoint::from_degrees(lat, lon),
                speed_mm_s: None,
                heading_ddeg: None,
                accuracy_cm: None,
            }),
        }
    }

    fn square() -> ZoneShape {
        ZoneShape(MultiPolygon(vec![polygon![
            (x: 13.0, y: 52.0), (x: 13.1, y: 52.0), (x: 13.1, y: 52.1), (x: 13.0, y: 52.1), (x: 13.0, y: 52.0)
        ]]))
    }

    fn zone(name: &str, shape: ZoneShape, updated_at: UnixMillis, event: u128) -> ZoneState {
        ZoneState {
            name: name.to_owned(),
            shape,
            dwell_ms: 30_000,
            updated_at,
            event_id: EventId(id(event)),
        }
    }

    fn bin(n: u128) -> Bson {
        Bson::Binary(Binary {
            subtype: BinarySubtype::Uuid,
            bytes: id(n).as_bytes().to_vec(),
        })
    }

    fn square_ring() -> Bson {
        bson::bson!([
            [13.0, 52.0],
            [13.1, 52.0],
            [13.1, 52.1],
            [13.0, 52.1],
            [13.0, 52.0]
        ])
    }

    #[test]
    fn a_fix_is_a_geojson_point_with_its_readings_in_si_units() {
        let fix = LocationUpdated {
            courier_id: CourierId(id(2)),
            position: GeoPoint::from_degrees(52.52, 13.405),
            speed_mm_s: Some(8_100),
            heading_ddeg: Some(1_805),
            accuracy_cm: Some(450),
        };
        let document = location_document(EventId(id(1)), NOON, &fix, 7);
        let expected = doc! {
            "_id": bin(1),
            "courier_id": bin(2),
            "location": { "type": "Point", "coordinates": [13.405, 52.52] },
            "occurred_at": BsonDateTime::from_millis(NOON),
            "speed_mps": 8.1,
            "heading_deg": 180.5,
            "accuracy_m": 4.5,
            "epoch": 7_i64,
        };
        assert_eq!(document, expected);
        // Field order too: the shape a reader sees in the shell.
        let keys: Vec<&str> = document.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "_id",
                "courier_id",
                "location",
                "occurred_at",
                "speed_mps",
                "heading_deg",
                "accuracy_m",
                "epoch"
            ]
        );
        assert_eq!(
            bson::to_document(&document)
                .unwrap()
                .get_datetime("occurred_at")
                .unwrap()
                .try_to_rfc3339_string()
                .unwrap(),
            "2026-11-30T12:00:00Z"
        );
    }

    #[test]
    fn readings_the_device_did_not_send_are_left_out() {
        let Event { body, .. } = fix(1, 2, 52.5, 13.4);
        let EventBody::LocationUpdated(fix) = body else {
            unreachable!()
        };
        let document = location_document(EventId(id(1)), NOON, &fix, 0);
        assert_eq!(
            document,
            doc! {
                "_id": bin(1),
                "courier_id": bin(2),
                "location": { "type": "Point", "coordinates": [13.4, 52.5] },
                "occurred_at": BsonDateTime::from_millis(NOON),
                "epoch": 0_i64,
            }
        );
    }

    #[test]
    fn stale_fixes_are_kept_refused_events_and_other_kinds_are_not() {
        let stale = fix(1, 9, 52.5, 13.4);
        let fresh = fix(2, 9, 52.6, 13.5);
        let refused = fix(3, 9, 52.7, 13.6);
        let status = Event {
            event_id: EventId(id(4)),
            occurred_at: NOON,
            body: EventBody::StatusChanged(StatusChanged {
                delivery_id: DeliveryId(id(5)),
                status: Status::Cancelled,
                courier_id: None,
            }),
        };
        let output = EpochOutput {
            epoch: 3,
            // `fresh` twice: a redelivery within one batch.
            events: vec![
                stale.clone(),
                fresh.clone(),
                refused.clone(),
                status,
                fresh.clone(),
            ],
            rejections: vec![
                Rejection {
                    event_id: stale.event_id,
                    kind: EventKind::LocationUpdated,
                    reason: RejectReason::Stale,
                },
                Rejection {
                    event_id: refused.event_id,
                    kind: EventKind::LocationUpdated,
                    reason: RejectReason::UnknownDelivery,
                },
                Rejection {
                    event_id: EventId(id(4)),
                    kind: EventKind::StatusChanged,
                    reason: RejectReason::UnknownDelivery,
                },
            ],
            ..EpochOutput::default()
        };
        let ids: Vec<Bson> = location_documents(&output)
            .iter()
            .map(|d| d.get("_id").cloned().unwrap())
            .collect();
        assert_eq!(ids, [bin(1), bin(2)]);
        assert!(
            location_documents(&output)
                .iter()
                .all(|d| d.get_i64("epoch") == Ok(3))
        );
    }

    #[test]
    fn the_location_indexes_are_a_2dsphere_and_the_latest_per_courier() {
        let indexes = location_indexes();
        assert_eq!(indexes.len(), 2);
        assert_eq!(indexes[0].keys, doc! { "location": "2dsphere" });
        assert_eq!(
            indexes[0].options.as_ref().and_then(|o| o.name.as_deref()),
            Some(LOCATION_INDEX)
        );
        assert_eq!(
            indexes[1].keys,
            doc! { "courier_id": 1, "occurred_at": -1, "_id": -1 }
        );
        // Key order matters in an index: compare it, not only the set.
        let keys: Vec<&str> = indexes[1].keys.keys().map(String::as_str).collect();
        assert_eq!(keys, ["courier_id", "occurred_at", "_id"]);
        assert_eq!(
            indexes[1].options.as_ref().and_then(|o| o.name.as_deref()),
            Some(LATEST_INDEX)
        );
        // No unique option anywhere: `_id` is the event id and unique by itself.
        assert!(
            indexes
                .iter()
                .all(|i| i.options.as_ref().and_then(|o| o.unique).is_none())
        );

        let zones = zone_indexes();
        assert_eq!(zones.len(), 1);
        assert_eq!(zones[0].keys, doc! { "geometry": "2dsphere" });
        assert_eq!(
            zones[0].options.as_ref().and_then(|o| o.name.as_deref()),
            Some(GEOMETRY_INDEX)
        );
    }

    #[test]
    fn a_zone_is_stored_with_the_contracts_geojson_polygon() {
        let state = zone("Mitte", square(), NOON, 40);
        let document = zone_document(ZoneId(id(30)), &state).unwrap();
        assert_eq!(
            document,
            doc! {
                "_id": bin(30),
                "name": "Mitte",
                "geometry": { "type": "Polygon", "coordinates": [square_ring()] },
                "dwell_seconds": 30.0,
                "updated_at": BsonDateTime::from_millis(NOON),
                "event_id": bin(40),
            }
        );
    }

    #[test]
    fn a_zone_of_several_polygons_is_a_multipolygon_and_equals_the_wire_geometry() {
        let mut shape = square();
        shape.0.0.push(polygon![
            (x: 14.0, y: 53.0), (x: 14.1, y: 53.0), (x: 14.0, y: 53.1), (x: 14.0, y: 53.0)
        ]);
        let state = zone("Two parts", shape.clone(), NOON, 40);
        let geometry = zone_geometry(ZoneId(id(30)), &state).unwrap();
        assert_eq!(
            geometry,
            doc! {
                "type": "MultiPolygon",
                "coordinates": [
                    [square_ring()],
                    [[[14.0, 53.0], [14.1, 53.0], [14.0, 53.1], [14.0, 53.0]]],
                ],
            }
        );
        // The same JSON the contract publishes for this zone.
        let wire = contract::encode_event(&Event {
            event_id: EventId(id(40)),
            occurred_at: NOON,
            body: EventBody::ZoneUpserted(ZoneUpserted {
                zone_id: ZoneId(id(30)),
                name: "Two parts".to_owned(),
                shape,
                dwell_ms: 30_000,
            }),
        });
        assert_eq!(
            serde_json::to_value(&geometry).unwrap(),
            wire["geometry"].clone()
        );
    }

    #[test]
    fn zone_changes_become_guarded_upserts_and_deletes() {
        let old = zone("Old", square(), NOON, 40);
        let new = zone("New", square(), NOON + 1_000, 41);
        let gone = zone("Gone", square(), NOON - 5_000, 42);
        let created = zone("Created", square(), NOON + 2_000, 43);
        let output = EpochOutput {
            epoch: 4,
            changes: vec![
                (Change::Zone(ZoneId(id(30)), old), -1),
                (Change::Zone(ZoneId(id(30)), new.clone()), 1),
                (Change::Zone(ZoneId(id(31)), gone), -1),
                (Change::Zone(ZoneId(id(32)), created.clone()), 1),
                (Change::Inside(CourierId(id(1)), ZoneId(id(30))), 1),
            ],
            ..EpochOutput::default()
        };
        let writes = zone_writes(&output).unwrap();
        assert_eq!(writes.upserts.len(), 2);
        assert_eq!(writes.upserts[0].zone_id, ZoneId(id(30)));
        assert_eq!(
            writes.upserts[0].filter,
            doc! {
                "_id": bin(30),
                "$or": [
                    { "updated_at": { "$lt": BsonDateTime::from_millis(NOON + 1_000) } },
                    { "updated_at": BsonDateTime::from_millis(NOON + 1_000), "event_id": { "$lte": bin(41) } },
                ],
            }
        );
        assert_eq!(
            writes.upserts[0].replacement,
            zone_document(ZoneId(id(30)), &new).unwrap()
        );
        assert_eq!(writes.upserts[1].zone_id, ZoneId(id(32)));
        assert_eq!(
            writes.upserts[1].replacement,
            zone_document(ZoneId(id(32)), &created).unwrap()
        );
        assert_eq!(writes.deleted, 1);
        assert_eq!(
            writes.delete,
            Some(doc! {
                "$or": [{
                    "_id": bin(31),
                    "$or": [
                        { "updated_at": { "$lt": BsonDateTime::from_millis(NOON - 5_000) } },
                        { "updated_at": BsonDateTime::from_millis(NOON - 5_000), "event_id": { "$lte": bin(42) } },
                    ],
                }],
            })
        );
        assert!(zone_writes(&EpochOutput::default()).unwrap().is_empty());
    }

    #[test]
    fn the_query_groups_to_the_latest_fix_before_it_tests_the_zone() {
        let geometry = doc! { "type": "Polygon", "coordinates": [square_ring()] };
        let since = DateTime::from_timestamp_millis(NOON).unwrap();
        let pipeline = couriers_in_zone_pipeline(&geometry, Some(since));
        assert_eq!(
            pipeline,
            vec![
                doc! { "$match": { "occurred_at": { "$gte": BsonDateTime::from_millis(NOON) } } },
                doc! { "$sort": { "courier_id": 1, "occurred_at": -1, "_id": -1 } },
                doc! { "$group": {
                    "_id": "$courier_id",
                    "location": { "$first": "$location" },
                    "occurred_at": { "$first": "$occurred_at" },
                    "event_id": { "$first": "$_id" },
                } },
                doc! { "$match": { "location": { "$geoWithin": { "$geometry": geometry.clone() } } } },
                doc! { "$sort": { "_id": 1 } },
            ]
        );
        // The sort walks the history index key for key.
        let sort = pipeline[1].get_document("$sort").unwrap();
        let index = &location_indexes()[1].keys;
        assert_eq!(
            sort.iter().collect::<Vec<_>>(),
            index.iter().collect::<Vec<_>>()
        );
        // Without `since`, the same pipeline minus the first stage.
        assert_eq!(
            couriers_in_zone_pipeline(&geometry, None),
            pipeline[1..].to_vec()
        );
    }

    #[test]
    fn a_result_reads_back_into_a_courier_position() {
        let document = doc! {
            "_id": bin(2),
            "location": { "type": "Point", "coordinates": [13.405, 52.52] },
            "occurred_at": BsonDateTime::from_millis(NOON),
            "event_id": bin(1),
        };
        let position = CourierPosition::from_document(&document).unwrap();
        assert_eq!(
            position,
            CourierPosition {
                courier_id: CourierId(id(2)),
                position: GeoPoint::from_degrees(52.52, 13.405),
                occurred_at: DateTime::from_timestamp_millis(NOON).unwrap(),
                event_id: EventId(id(1)),
            }
        );
        let mut broken = document.clone();
        broken.insert("_id", "not a uuid");
        assert!(
            CourierPosition::from_document(&broken)
                .unwrap_err()
                .to_string()
                .contains("_id")
        );
    }

    #[test]
    fn fixed_point_positions_survive_the_round_trip_through_degrees() {
        let point = GeoPoint {
            lat_e7: 525_200_083,
            lon_e7: -134_049_541,
        };
        let Event { body, .. } = fix(1, 2, 0.0, 0.0);
        let EventBody::LocationUpdated(mut fix) = body else {
            unreachable!()
        };
        fix.position = point;
        let stored = location_document(EventId(id(1)), NOON, &fix, 0);
        let result = doc! {
            "_id": bin(2),
            "location": stored.get_document("location").unwrap().clone(),
            "occurred_at": BsonDateTime::from_millis(NOON),
            "event_id": bin(1),
        };
        assert_eq!(
            CourierPosition::from_document(&result).unwrap().position,
            point
        );
    }
}
