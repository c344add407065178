//! The PostgreSQL queries of the read routes: a delivery the read model does not hold, and
//! the courier and customer records that only the system of record has.
//!
//! The profile columns are the API's to write: the PostgreSQL sink inserts bare
//! `customers (id)` and `couriers (id)` rows (`ON CONFLICT DO NOTHING`) and updates only
//! the couriers' tracking columns, so the upserts here set only `name`, `vehicle_type`
//! (couriers) and `name`, `address`, `contact` (customers) and never fight the sink.

use chrono::{DateTime, Utc};
use delivertrack_dataflow::geometry::GeoPoint;
use delivertrack_dataflow::{CourierId, CustomerId, DeliveryId, Status, UnixMillis, ZoneId};
use delivertrack_sinks::postgres::{Failure, classify};
use delivertrack_sinks::read_model::{DeliveryDetails, DeliveryView, EtaView, LatLon, RatingView};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::ApiError;
use crate::state::AppState;

/// A read or write of the system of record that failed.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The database cannot be reached now (connection lost, pool exhausted, server
    /// shutting down): answered `503 store_unavailable`.
    #[error("PostgreSQL cannot be reached: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// The query failed for another reason (a bug, a schema that does not match).
    #[error("a PostgreSQL query failed: {0}")]
    Query(#[source] sqlx::Error),
    /// A stored row does not decode (a status the code does not know, a negative version).
    #[error("a stored {table} row is invalid: {detail}")]
    Corrupt {
        /// Which table.
        table: &'static str,
        /// What is wrong.
        detail: String,
    },
}

impl From<sqlx::Error> for RecordError {
    fn from(error: sqlx::Error) -> Self {
        match classify(&error) {
            Failure::Transient | Failure::Closed => RecordError::Unavailable(error),
            Failure::Permanent => RecordError::Query(error),
        }
    }
}

impl From<RecordError> for ApiError {
    fn from(error: RecordError) -> Self {
        match error {
            RecordError::Unavailable(cause) => {
                tracing::warn!(error = %cause, "A read of PostgreSQL failed; answering 503.");
                ApiError::StoreUnavailable {
                    reason: "the system of record (PostgreSQL) cannot be reached now".to_owned(),
                }
            }
            other => ApiError::Internal(Box::new(other)),
        }
    }
}

/// The pool of the system of record.
///
/// # Errors
/// [`ApiError::StoreUnavailable`] when this process has none.
pub fn pool(state: &AppState) -> Result<&PgPool, ApiError> {
    state
        .records
        .as_ref()
        .ok_or_else(|| ApiError::StoreUnavailable {
            reason: "this API has no system of record (PostgreSQL) configured".to_owned(),
        })
}

// ---------------------------------------------------------------------------------------
// Deliveries
// ---------------------------------------------------------------------------------------

/// A `deliveries` row with its rating, its ETA and its dropoff zones.
#[derive(sqlx::FromRow)]
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
    rating_score: Option<i16>,
    rating_comment: Option<String>,
    rated_at: Option<DateTime<Utc>>,
    eta_courier_id: Option<Uuid>,
    eta_status: Option<String>,
    eta_remaining_m: Option<i64>,
    eta_speed_mm_s: Option<i64>,
    eta_at: Option<DateTime<Utc>>,
    eta_as_of: Option<DateTime<Utc>>,
    dropoff_zones: Vec<Uuid>,
}

/// One delivery from the system of record, as the read model would show it; `None` when
/// there is no such delivery.
///
/// # Errors
/// [`RecordError`].
pub async fn delivery(pool: &PgPool, id: DeliveryId) -> Result<Option<DeliveryView>, RecordError> {
    let row: Option<DeliveryRow> = sqlx::query_as(
        "SELECT d.id, d.customer_id, d.courier_id, d.status, d.pickup_lat, d.pickup_lon,
                d.dropoff_lat, d.dropoff_lon, d.promised_by, d.created_at, d.assigned_at,
                d.picked_up_at, d.ended_at, d.version,
                r.score AS rating_score, r.comment AS rating_comment, r.rated_at,
                e.courier_id AS eta_courier_id, e.status AS eta_status,
                e.remaining_m AS eta_remaining_m, e.speed_mm_s AS eta_speed_mm_s, e.eta_at,
                e.as_of AS eta_as_of,
                ARRAY(SELECT z.zone_id FROM delivery_dropoff_zones z
                      WHERE z.delivery_id = d.id ORDER BY z.zone_id) AS dropoff_zones
         FROM deliveries d
         LEFT JOIN ratings r ON r.delivery_id = d.id
         LEFT JOIN etas e ON e.delivery_id = d.id
         WHERE d.id = $1",
    )
    .bind(id.0)
    .fetch_optional(pool)
    .await?;
    row.map(DeliveryRow::into_view).transpose()
}

impl DeliveryRow {
    fn into_view(self) -> Result<DeliveryView, RecordError> {
        let corrupt = |detail: String| RecordError::Corrupt {
            table: "deliveries",
            detail: format!("delivery {}: {detail}", self.id),
        };
        let status: Status = self
            .status
            .parse()
            .map_err(|error| corrupt(format!("{error}")))?;
        let version = u32::try_from(self.version)
            .map_err(|_| corrupt(format!("version {} out of range", self.version)))?;
        let rating = match (self.rating_score, self.rated_at) {
            (Some(score), Some(at)) => Some(RatingView {
                score: u8::try_from(score)
                    .map_err(|_| corrupt(format!("rating {score} out of range")))?,
                comment: self.rating_comment.clone(),
                at_ms: at.timestamp_millis(),
            }),
            _ => None,
        };
        let eta = match (
            self.eta_courier_id,
            &self.eta_status,
            self.eta_remaining_m,
            self.eta_speed_mm_s,
            self.eta_at,
            self.eta_as_of,
        ) {
            (Some(courier), Some(eta_status), Some(remaining), Some(speed), Some(at), Some(of)) => {
                Some(EtaView {
                    courier_id: CourierId(courier),
                    status: eta_status
                        .parse()
                        .map_err(|error| corrupt(format!("eta: {error}")))?,
                    eta_ms: at.timestamp_millis(),
                    remaining_m: u32::try_from(remaining)
                        .map_err(|_| corrupt(format!("eta distance {remaining} out of range")))?,
                    // The read model's conversion, from the same integer.
                    speed_mps: f64::from(
                        u32::try_from(speed)
                            .map_err(|_| corrupt(format!("eta speed {speed} out of range")))?,
                    ) / 1000.0,
                    as_of_ms: of.timestamp_millis(),
                })
            }
            _ => None,
        };
        Ok(DeliveryView {
            details: DeliveryDetails {
                delivery_id: DeliveryId(self.id),
                customer_id: CustomerId(self.customer_id),
                courier_id: self.courier_id.map(CourierId),
                status,
                // Through the dataflow's fixed point, as the read model holds them.
                pickup: degrees(self.pickup_lat, self.pickup_lon),
                dropoff: degrees(self.dropoff_lat, self.dropoff_lon),
                promised_by_ms: self.promised_by.map(|t| t.timestamp_millis()),
                created_at_ms: self.created_at.timestamp_millis(),
                assigned_at_ms: self.assigned_at.map(|t| t.timestamp_millis()),
                picked_up_at_ms: self.picked_up_at.map(|t| t.timestamp_millis()),
                ended_at_ms: self.ended_at.map(|t| t.timestamp_millis()),
                rating,
                version,
                eta,
            },
            dropoff_zones: self.dropoff_zones.into_iter().map(ZoneId).collect(),
        })
    }
}

fn degrees(lat: f64, lon: f64) -> LatLon {
    GeoPoint::from_degrees(lat, lon).into()
}

// ---------------------------------------------------------------------------------------
// Couriers
// ---------------------------------------------------------------------------------------

/// A courier's profile.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct CourierRecord {
    /// The courier.
    #[sqlx(rename = "id")]
    pub courier_id: Uuid,
    /// Display name; `null` until the fleet management (or an admin) sets it.
    pub name: Option<String>,
    /// Vehicle (`bicycle`, `scooter`, `car`, ...), free text.
    pub vehicle_type: Option<String>,
}

/// The tracking columns of a courier's row that [`StoredPosition`] shows.
#[derive(sqlx::FromRow)]
struct TrackedRow {
    current_lat: Option<f64>,
    current_lon: Option<f64>,
    last_fix_at: Option<DateTime<Utc>>,
    odometer_mm: i64,
}

/// The position stored for a courier: where and when its last fix was, and its odometer.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct StoredPosition {
    /// Where.
    #[schema(value_type = crate::openapi::schemas::LatLon)]
    pub position: LatLon,
    /// When.
    #[schema(value_type = i64)]
    pub at_ms: UnixMillis,
    /// Distance travelled, metres.
    pub odometer_m: f64,
}

/// A courier's record with its stored position.
pub type CourierRow = (CourierRecord, Option<StoredPosition>);

/// A `couriers` row: the profile and the tracking columns read here.
#[derive(sqlx::FromRow)]
struct CourierColumns {
    #[sqlx(flatten)]
    record: CourierRecord,
    #[sqlx(flatten)]
    tracked: TrackedRow,
}

impl From<CourierColumns> for CourierRow {
    fn from(row: CourierColumns) -> Self {
        let tracked = row.tracked;
        let stored = match (
            tracked.current_lat,
            tracked.current_lon,
            tracked.last_fix_at,
        ) {
            (Some(lat), Some(lon), Some(at)) => Some(StoredPosition {
                position: degrees(lat, lon),
                at_ms: at.timestamp_millis(),
                odometer_m: tracked.odometer_mm as f64 / 1000.0,
            }),
            _ => None,
        };
        (row.record, stored)
    }
}

/// A `couriers` row an upsert returned, and whether it inserted it.
#[derive(sqlx::FromRow)]
struct UpsertedCourier {
    #[sqlx(flatten)]
    row: CourierColumns,
    created: bool,
}

/// One courier's record and stored position; `None` when there is no row.
///
/// # Errors
/// [`RecordError`].
pub async fn courier(pool: &PgPool, id: CourierId) -> Result<Option<CourierRow>, RecordError> {
    let row: Option<CourierColumns> = sqlx::query_as(
        "SELECT id, name, vehicle_type, current_lat, current_lon, last_fix_at, odometer_mm
         FROM couriers WHERE id = $1",
    )
    .bind(id.0)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(CourierRow::from))
}

/// Creates or updates a courier's profile, leaving its tracking columns alone. Returns the
/// record with its stored position, and whether it was created.
///
/// # Errors
/// [`RecordError`].
pub async fn upsert_courier(
    pool: &PgPool,
    id: CourierId,
    name: Option<&str>,
    vehicle_type: Option<&str>,
) -> Result<(CourierRow, bool), RecordError> {
    // `xmax = 0` holds for a row this statement inserted, not for one it updated.
    let upserted: UpsertedCourier = sqlx::query_as(
        "INSERT INTO couriers AS c (id, name, vehicle_type) VALUES ($1, $2, $3)
         ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name,
                                        vehicle_type = EXCLUDED.vehicle_type
         RETURNING c.id, c.name, c.vehicle_type, c.current_lat, c.current_lon, c.last_fix_at,
                   c.odometer_mm, (c.xmax = 0) AS created",
    )
    .bind(id.0)
    .bind(name)
    .bind(vehicle_type)
    .fetch_one(pool)
    .await?;
    Ok((upserted.row.into(), upserted.created))
}

// ---------------------------------------------------------------------------------------
// Customers
// ---------------------------------------------------------------------------------------

/// A customer's record.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct CustomerRecord {
    /// The customer.
    pub customer_id: Uuid,
    /// Display name.
    pub name: Option<String>,
    /// Postal address.
    pub address: Option<String>,
    /// How to reach them (phone, e-mail).
    pub contact: Option<String>,
    /// When the system first saw the customer (a delivery of theirs, or this record).
    #[schema(value_type = i64)]
    pub first_seen_at_ms: UnixMillis,
}

/// A `customers` row.
#[derive(sqlx::FromRow)]
struct CustomerRow {
    id: Uuid,
    name: Option<String>,
    address: Option<String>,
    contact: Option<String>,
    first_seen_at: DateTime<Utc>,
}

impl From<CustomerRow> for CustomerRecord {
    fn from(row: CustomerRow) -> Self {
        Self {
            customer_id: row.id,
            name: row.name,
            address: row.address,
            contact: row.contact,
            first_seen_at_ms: row.first_seen_at.timestamp_millis(),
        }
    }
}

/// A `customers` row an upsert returned, and whether it inserted it.
#[derive(sqlx::FromRow)]
struct UpsertedCustomer {
    #[sqlx(flatten)]
    row: CustomerRow,
    created: bool,
}

/// One customer's record; `None` when there is no row.
///
/// # Errors
/// [`RecordError`].
pub async fn customer(
    pool: &PgPool,
    id: CustomerId,
) -> Result<Option<CustomerRecord>, RecordError> {
    let row: Option<CustomerRow> = sqlx::query_as(
        "SELECT id, name, address, contact, first_seen_at FROM customers WHERE id = $1",
    )
    .bind(id.0)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(CustomerRecord::from))
}

/// The profile of a customer, as `PUT /customers/{id}` sets it.
#[derive(Clone, Copy, Debug)]
pub struct CustomerProfile<'a> {
    /// Display name.
    pub name: Option<&'a str>,
    /// Postal address.
    pub address: Option<&'a str>,
    /// How to reach them.
    pub contact: Option<&'a str>,
}

/// Creates or updates a customer's profile. Returns the record and whether it was created.
///
/// # Errors
/// [`RecordError`].
pub async fn upsert_customer(
    pool: &PgPool,
    id: CustomerId,
    profile: CustomerProfile<'_>,
) -> Result<(CustomerRecord, bool), RecordError> {
    // `xmax = 0` holds for a row this statement inserted, not for one it updated.
    let upserted: UpsertedCustomer = sqlx::query_as(
        "INSERT INTO customers AS c (id, name, address, contact) VALUES ($1, $2, $3, $4)
         ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, address = EXCLUDED.address,
                                        contact = EXCLUDED.contact
         RETURNING c.id, c.name, c.address, c.contact, c.first_seen_at, (c.xmax = 0) AS created",
    )
    .bind(id.0)
    .bind(profile.name)
    .bind(profile.address)
    .bind(profile.contact)
    .fetch_one(pool)
    .await?;
    Ok((upserted.row.into(), upserted.created))
}
