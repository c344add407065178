//! Hydration: the state a restarting pipeline needs, read back from PostgreSQL as
//! [`Restore`] records (see `delivertrack_dataflow::restore`).
//!
//! What [`restore::from_history`](delivertrack_dataflow::restore::from_history) computes
//! from the maintained records and the accepted events, this reads from the tables that
//! hold them: `zones`, `couriers` (presence included), `deliveries` with `ratings`, and the
//! non-stale rows of `delivery_events` and `location_fixes` (the speed windows). A handful
//! of set-based queries, none per entity.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use delivertrack_dataflow::geometry::{GeoPoint, ZoneShape};
use delivertrack_dataflow::lifecycle::StatusStep;
use delivertrack_dataflow::model::{CourierState, DeliveryState, Rating, ZoneState};
use delivertrack_dataflow::restore::Restore;
use delivertrack_dataflow::{
    CourierId, CustomerId, DeliveryId, EventId, Status, UnixMillis, ZoneId,
};
use serde_json::Value;
use sqlx::FromRow;
use sqlx::postgres::PgPool;
use uuid::Uuid;

use super::service::PostgresError;

/// Reads everything a restarting pipeline restores: every zone's register (live zones and
/// tombstones), every tracked courier with its presence and its last `speed_window`
/// accepted fixes, and every delivery with the events applied to it. Submit the result
/// with `EpochSender::restore` as the pipeline's first epoch.
///
/// # Errors
/// [`PostgresError::Query`] when a query fails, [`PostgresError::Restore`] when a stored
/// row does not decode into the dataflow's state.
pub async fn load_restore(
    pool: &PgPool,
    speed_window: usize,
) -> Result<Vec<Restore>, PostgresError> {
    let mut restores = load_zones(pool).await?;
    restores.extend(load_couriers(pool, speed_window).await?);
    restores.extend(load_deliveries(pool).await?);
    Ok(restores)
}

/// Live zones, from `zones` (the stored GeoJSON is the dataflow's shape at full precision),
/// and tombstones: zones no longer live, versioned by their latest accepted zone event
/// (their deletion).
async fn load_zones(pool: &PgPool) -> Result<Vec<Restore>, PostgresError> {
    let live: Vec<(Uuid, String, Value, i64, DateTime<Utc>, Uuid)> =
        sqlx::query_as("SELECT id, name, geometry, dwell_ms, updated_at, event_id FROM zones")
            .fetch_all(pool)
            .await
            .map_err(PostgresError::Query)?;
    let mut restores = Vec::with_capacity(live.len());
    for (id, name, geometry, dwell_ms, updated_at, event_id) in live {
        let updated_at = updated_at.timestamp_millis();
        restores.push(Restore::Zone {
            zone_id: ZoneId(id),
            version: (updated_at, EventId(event_id)),
            state: Some(ZoneState {
                name,
                shape: shape(id, geometry)?,
                dwell_ms,
                updated_at,
                event_id: EventId(event_id),
            }),
        });
    }

    let tombstones: Vec<(Uuid, DateTime<Utc>, Uuid)> = sqlx::query_as(
        "SELECT DISTINCT ON (e.zone_id) e.zone_id, e.occurred_at, e.event_id
         FROM delivery_events e
         WHERE e.kind IN ('zone.upserted', 'zone.deleted') AND NOT e.stale
           AND NOT EXISTS (SELECT 1 FROM zones z WHERE z.id = e.zone_id)
         ORDER BY e.zone_id, e.occurred_at DESC, e.event_id DESC",
    )
    .fetch_all(pool)
    .await
    .map_err(PostgresError::Query)?;
    restores.extend(
        tombstones
            .into_iter()
            .map(|(id, at, event_id)| Restore::Zone {
                zone_id: ZoneId(id),
                version: (at.timestamp_millis(), EventId(event_id)),
                state: None,
            }),
    );
    Ok(restores)
}

/// A zone's stored GeoJSON back as its shape, coordinate for coordinate (the column holds
/// the shape the dataflow had, at full precision).
fn shape(zone: Uuid, geometry: Value) -> Result<ZoneShape, PostgresError> {
    let bad = |detail: String| corrupt(format!("zone {zone}: geometry {detail}"));
    let geometry =
        geojson::Geometry::from_json_value(geometry).map_err(|error| bad(error.to_string()))?;
    let multi = match geometry.value {
        geojson::Value::Polygon(rings) => geojson::Value::MultiPolygon(vec![rings]),
        multi @ geojson::Value::MultiPolygon(_) => multi,
        _ => return Err(bad("is neither a Polygon nor a MultiPolygon".to_owned())),
    };
    multi
        .try_into()
        .map(ZoneShape)
        .map_err(|error: geojson::Error| bad(error.to_string()))
}

/// A tracked courier's row.
#[derive(FromRow)]
struct CourierRow {
    id: Uuid,
    current_lat: f64,
    current_lon: f64,
    last_fix_at: DateTime<Utc>,
    last_event_id: Uuid,
    speed_mm_s: Option<i64>,
    heading_ddeg: Option<i32>,
    odometer_mm: i64,
    active_hours: i64,
    presence: Option<Value>,
}

/// Tracked couriers, and the last `speed_window` accepted fixes of each (one window query).
async fn load_couriers(pool: &PgPool, speed_window: usize) -> Result<Vec<Restore>, PostgresError> {
    let rows: Vec<CourierRow> = sqlx::query_as(
        "SELECT id, current_lat, current_lon, last_fix_at, last_event_id, speed_mm_s,
                heading_ddeg, odometer_mm, active_hours, presence
         FROM couriers WHERE last_fix_at IS NOT NULL AND last_event_id IS NOT NULL",
    )
    .fetch_all(pool)
    .await
    .map_err(PostgresError::Query)?;

    // Per tracked courier, its key in `location_fixes` walked backwards from the newest fix:
    // the cost follows the couriers and the window, not the length of the history.
    let window = i64::try_from(speed_window).unwrap_or(i64::MAX);
    let fixes: Vec<(Uuid, DateTime<Utc>, f64, f64)> = sqlx::query_as(
        "SELECT c.id, f.occurred_at, f.lat, f.lon
         FROM couriers c
         CROSS JOIN LATERAL (
             SELECT x.occurred_at, x.event_id, x.lat, x.lon
             FROM location_fixes x
             WHERE x.courier_id = c.id AND NOT x.stale
             ORDER BY x.occurred_at DESC, x.event_id DESC
             LIMIT $1) f
         WHERE c.last_fix_at IS NOT NULL
         ORDER BY c.id, f.occurred_at, f.event_id",
    )
    .bind(window)
    .fetch_all(pool)
    .await
    .map_err(PostgresError::Query)?;
    let mut windows: HashMap<Uuid, Vec<(UnixMillis, GeoPoint)>> = HashMap::new();
    for (courier, at, lat, lon) in fixes {
        windows
            .entry(courier)
            .or_default()
            .push((at.timestamp_millis(), GeoPoint::from_degrees(lat, lon)));
    }

    rows.into_iter()
        .map(|row| {
            let state = CourierState {
                position: GeoPoint::from_degrees(row.current_lat, row.current_lon),
                at: row.last_fix_at.timestamp_millis(),
                event_id: EventId(row.last_event_id),
                speed_mm_s: row.speed_mm_s.map(|v| int("speed_mm_s", v)).transpose()?,
                heading_ddeg: row
                    .heading_ddeg
                    .map(|v| int("heading_ddeg", i64::from(v)))
                    .transpose()?,
                odometer_mm: int("odometer_mm", row.odometer_mm)?,
                active_hours: int("active_hours", row.active_hours)?,
                presence: presence(row.id, row.presence.as_ref())?,
            };
            Ok(Restore::Courier {
                courier_id: CourierId(row.id),
                state,
                window: windows.remove(&row.id).unwrap_or_default(),
            })
        })
        .collect()
}

/// `couriers.presence` back as `(zone, since)` pairs; NULL is no presence.
fn presence(
    courier: Uuid,
    stored: Option<&Value>,
) -> Result<Vec<(ZoneId, UnixMillis)>, PostgresError> {
    let bad = || corrupt(format!("courier {courier}: malformed presence"));
    let Some(stored) = stored else {
        return Ok(Vec::new());
    };
    let pairs = stored.as_array().ok_or_else(bad)?;
    pairs
        .iter()
        .map(|pair| match pair.as_array().map(Vec::as_slice) {
            Some([zone, since]) => {
                let zone = zone
                    .as_str()
                    .and_then(|z| Uuid::parse_str(z).ok())
                    .ok_or_else(bad)?;
                let since = since.as_i64().ok_or_else(bad)?;
                Ok((ZoneId(zone), since))
            }
            _ => Err(bad()),
        })
        .collect()
}

/// A delivery's row with its rating and what the log says about its events.
#[derive(FromRow)]
struct DeliveryRow {
    id: Uuid,
    customer_id: Uuid,
    courier_id: Option<Uuid>,
    status: String,
    pickup_lat: f64,
    pickup_lon: f64,
    dropoff_lat: f64,
    dropoff_lon: f64,
    promised_by: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    assigned_at: Option<DateTime<Utc>>,
    picked_up_at: Option<DateTime<Utc>>,
    ended_at: Option<DateTime<Utc>>,
    version: i64,
    score: Option<i16>,
    comment: Option<String>,
    rated_at: Option<DateTime<Utc>>,
    created_by: Option<Uuid>,
    applied: Option<Vec<Uuid>>,
    step_ids: Option<Vec<Uuid>>,
    step_at: Option<Vec<DateTime<Utc>>>,
    step_status: Option<Vec<String>>,
    step_courier: Option<Vec<Option<Uuid>>>,
    rating_at: Option<DateTime<Utc>>,
    rating_event: Option<Uuid>,
    rating_score: Option<i16>,
    rating_comment: Option<String>,
}

/// Deliveries with their ratings, creating events, status histories, applied events and
/// latest accepted ratings: one query, the log grouped once per delivery.
async fn load_deliveries(pool: &PgPool) -> Result<Vec<Restore>, PostgresError> {
    let rows: Vec<DeliveryRow> = sqlx::query_as(
        "SELECT d.id, d.customer_id, d.courier_id, d.status, d.pickup_lat, d.pickup_lon,
                d.dropoff_lat, d.dropoff_lon, d.promised_by, d.created_at, d.assigned_at,
                d.picked_up_at, d.ended_at, d.version, r.score, r.comment, r.rated_at,
                l.created_by, l.applied, l.step_ids, l.step_at, l.step_status, l.step_courier,
                l.rating_at, l.rating_event, l.rating_score, l.rating_comment
         FROM deliveries d
         LEFT JOIN ratings r ON r.delivery_id = d.id
         LEFT JOIN (
             SELECT e.delivery_id,
                    (array_agg(e.event_id ORDER BY e.occurred_at, e.event_id)
                        FILTER (WHERE e.kind = 'delivery.created'))[1] AS created_by,
                    array_agg(e.event_id ORDER BY e.event_id)
                        FILTER (WHERE e.kind IN ('status.changed', 'delivery.rated'))
                        AS applied,
                    array_agg(e.event_id ORDER BY e.occurred_at, e.event_id)
                        FILTER (WHERE e.kind = 'status.changed') AS step_ids,
                    array_agg(e.occurred_at ORDER BY e.occurred_at, e.event_id)
                        FILTER (WHERE e.kind = 'status.changed') AS step_at,
                    array_agg(e.payload ->> 'status' ORDER BY e.occurred_at, e.event_id)
                        FILTER (WHERE e.kind = 'status.changed') AS step_status,
                    array_agg((e.payload ->> 'courier_id')::uuid
                              ORDER BY e.occurred_at, e.event_id)
                        FILTER (WHERE e.kind = 'status.changed') AS step_courier,
                    (array_agg(e.occurred_at ORDER BY e.occurred_at DESC, e.event_id DESC)
                        FILTER (WHERE e.kind = 'delivery.rated'))[1] AS rating_at,
                    (array_agg(e.event_id ORDER BY e.occurred_at DESC, e.event_id DESC)
                        FILTER (WHERE e.kind = 'delivery.rated'))[1] AS rating_event,
                    (array_agg((e.payload ->> 'score')::smallint
                               ORDER BY e.occurred_at DESC, e.event_id DESC)
                        FILTER (WHERE e.kind = 'delivery.rated'))[1] AS rating_score,
                    (array_agg(e.payload ->> 'comment' ORDER BY e.occurred_at DESC, e.event_id DESC)
                        FILTER (WHERE e.kind = 'delivery.rated'))[1] AS rating_comment
             FROM delivery_events e
             WHERE e.delivery_id IS NOT NULL AND NOT e.stale
             GROUP BY e.delivery_id
         ) l ON l.delivery_id = d.id",
    )
    .fetch_all(pool)
    .await
    .map_err(PostgresError::Query)?;

    rows.into_iter().map(delivery).collect()
}

/// One delivery's restore record.
fn delivery(row: DeliveryRow) -> Result<Restore, PostgresError> {
    let status: Status = row.status.parse().map_err(|_| {
        corrupt(format!(
            "delivery {}: unknown status {}",
            row.id, row.status
        ))
    })?;
    let millis = |t: Option<DateTime<Utc>>| t.map(|t| t.timestamp_millis());
    let steps = status_steps(&row)?;
    let rating = match (row.score, row.rated_at) {
        (Some(score), Some(at)) => Some(Rating {
            score: u8::try_from(score)
                .map_err(|_| corrupt(format!("delivery {}: score {score}", row.id)))?,
            comment: row.comment,
            at: at.timestamp_millis(),
        }),
        _ => None,
    };
    let latest_rating = match (row.rating_at, row.rating_event, row.rating_score) {
        (Some(at), Some(event), Some(score)) => {
            let at = at.timestamp_millis();
            let rating = Rating {
                score: u8::try_from(score)
                    .map_err(|_| corrupt(format!("delivery {}: logged score {score}", row.id)))?,
                comment: row.rating_comment,
                at,
            };
            Some(((at, EventId(event)), rating))
        }
        _ => None,
    };
    let created_by = row
        .created_by
        .ok_or_else(|| corrupt(format!("delivery {}: no delivery.created logged", row.id)))?;
    let mut applied: Vec<EventId> = row
        .applied
        .unwrap_or_default()
        .into_iter()
        .map(EventId)
        .collect();
    applied.sort();
    applied.dedup();
    Ok(Restore::Delivery {
        delivery_id: DeliveryId(row.id),
        state: DeliveryState {
            customer_id: CustomerId(row.customer_id),
            courier_id: row.courier_id.map(CourierId),
            pickup: GeoPoint::from_degrees(row.pickup_lat, row.pickup_lon),
            dropoff: GeoPoint::from_degrees(row.dropoff_lat, row.dropoff_lon),
            promised_by: millis(row.promised_by),
            status,
            created_at: row.created_at.timestamp_millis(),
            assigned_at: millis(row.assigned_at),
            picked_up_at: millis(row.picked_up_at),
            ended_at: millis(row.ended_at),
            rating,
            version: int("version", row.version)?,
        },
        created_by: EventId(created_by),
        steps,
        rating: latest_rating,
        applied,
    })
}

/// A delivery's logged `status.changed` events, in event time.
fn status_steps(row: &DeliveryRow) -> Result<Vec<StatusStep>, PostgresError> {
    let ids = row.step_ids.as_deref().unwrap_or_default();
    let at = row.step_at.as_deref().unwrap_or_default();
    let statuses = row.step_status.as_deref().unwrap_or_default();
    let couriers = row.step_courier.as_deref().unwrap_or_default();
    if at.len() != ids.len() || statuses.len() != ids.len() || couriers.len() != ids.len() {
        return Err(corrupt(format!(
            "delivery {}: status history columns disagree in length",
            row.id
        )));
    }
    ids.iter()
        .zip(at)
        .zip(statuses)
        .zip(couriers)
        .map(|(((id, at), status), courier)| {
            let status: Status = status
                .parse()
                .map_err(|_| corrupt(format!("delivery {}: logged status {status}", row.id)))?;
            Ok(StatusStep {
                at: at.timestamp_millis(),
                event_id: EventId(*id),
                status,
                courier_id: courier.map(CourierId),
            })
        })
        .collect()
}

/// A stored integer back into the dataflow's type.
fn int<T: TryFrom<i64>>(what: &str, value: i64) -> Result<T, PostgresError> {
    T::try_from(value).map_err(|_| corrupt(format!("{what} {value} is out of range")))
}

fn corrupt(detail: String) -> PostgresError {
    PostgresError::Restore(detail)
}
