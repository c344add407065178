//! The I/O of the PostgreSQL sink: connecting, migrating, writing one epoch in one
//! transaction, and deciding which failures are worth a retry.

use std::time::Duration;

use sqlx::migrate::{MigrateError, Migrator};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Postgres, Transaction};

use super::batch::{CourierRows, EpochBatch, MetricRows};
use super::config::PostgresConfig;
use super::fixes;
use super::leader::{self, Fence, Fenced};

/// The schema, embedded at build time from `migrations/` (no database is needed to build).
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// The key of this pipeline's row in `pipeline_progress` and `pipeline_leader`.
pub(super) const PIPELINE: &str = "delivertrack";

/// What went wrong talking to PostgreSQL outside an epoch's commit.
#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    /// `DATABASE_URL` is not a PostgreSQL url.
    #[error("DATABASE_URL {url} is not a valid PostgreSQL url")]
    InvalidUrl {
        /// The url, password redacted.
        url: String,
        /// Why sqlx refused it.
        #[source]
        source: sqlx::Error,
    },
    /// The database did not answer, refused the login, or timed out.
    #[error("cannot connect to PostgreSQL at {target}")]
    Unreachable {
        /// `user@host:port/db`.
        target: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// The schema is not there (or not readable): `delivertrack migrate` has not run.
    #[error(
        "the DeliverTrack schema is missing in PostgreSQL at {target}; run `delivertrack migrate`"
    )]
    NotMigrated {
        /// `user@host:port/db`.
        target: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// Applying the migrations failed.
    #[error("migrating the PostgreSQL schema failed")]
    Migrate(#[source] MigrateError),
    /// A query outside an epoch's commit failed.
    #[error("a PostgreSQL query failed")]
    Query(#[source] sqlx::Error),
    /// A stored row cannot be turned back into the dataflow's state (hydration).
    #[error("the stored state cannot be restored: {0}")]
    Restore(String),
}

/// Opens a pool and makes sure one connection works, within `connect_timeout`.
///
/// # Errors
/// [`PostgresError::InvalidUrl`] or [`PostgresError::Unreachable`], naming the database.
pub async fn connect_pool(config: &PostgresConfig) -> Result<PgPool, PostgresError> {
    let options = config.connect_options()?;
    let unreachable = |source| PostgresError::Unreachable {
        target: config.target(),
        source,
    };
    let connect = PgPoolOptions::new()
        .max_connections(config.max_connections.max(1))
        .acquire_timeout(config.connect_timeout)
        .connect_with(options);
    // The pool's acquire timeout bounds each attempt; this bounds the whole start, since a
    // host that drops packets can hold a TCP connect far longer.
    match tokio::time::timeout(config.connect_timeout + Duration::from_secs(1), connect).await {
        Ok(Ok(pool)) => Ok(pool),
        Ok(Err(source)) => Err(unreachable(source)),
        Err(_) => Err(unreachable(sqlx::Error::PoolTimedOut)),
    }
}

/// Creates the configured database when the server does not have it yet (connecting to the
/// server's `postgres` maintenance database to do so), so that a fresh server needs no
/// manual step before `delivertrack migrate` or `run`. Returns whether it created it.
///
/// A server that refuses the maintenance connection or the `CREATE DATABASE` (a user
/// without the right) is not an error here: the connection to the database itself then
/// reports what is wrong.
///
/// # Errors
/// [`PostgresError::InvalidUrl`] when the configuration is not a PostgreSQL url.
pub async fn ensure_database(config: &PostgresConfig) -> Result<bool, PostgresError> {
    use sqlx::ConnectOptions;

    let options = config.connect_options()?;
    let Some(database) = options.get_database().map(str::to_owned) else {
        return Ok(false);
    };
    let maintenance = options.clone().database("postgres");
    let attempt = async {
        let mut connection = maintenance.connect().await?;
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(&database)
                .fetch_one(&mut connection)
                .await?;
        if exists {
            return Ok::<_, sqlx::Error>(false);
        }
        // An identifier cannot be a bind parameter: quote it as PostgreSQL does.
        let quoted = format!("\"{}\"", database.replace('"', "\"\""));
        let created = sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {quoted}")))
            .execute(&mut connection)
            .await;
        match created {
            Ok(_) => Ok(true),
            // Another process created it meanwhile.
            Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("42P04") => {
                Ok(false)
            }
            Err(error) => Err(error),
        }
    };
    match tokio::time::timeout(config.connect_timeout + Duration::from_secs(1), attempt).await {
        Ok(Ok(created)) => {
            if created {
                tracing::info!(database = %config.target(), "Created the database.");
            }
            Ok(created)
        }
        Ok(Err(error)) => {
            tracing::debug!(%error, database = %config.target(), "Could not check for or create the database; connecting to it as it is.");
            Ok(false)
        }
        Err(_) => Ok(false),
    }
}

/// Applies the migrations in `migrations/` that the database has not seen yet. Safe to run
/// at every start and from several processes: sqlx takes an advisory lock.
///
/// # Errors
/// [`PostgresError::Migrate`] when a migration fails or the database holds a migration
/// that differs from ours.
pub async fn migrate(pool: &PgPool) -> Result<(), PostgresError> {
    MIGRATOR.run(pool).await.map_err(PostgresError::Migrate)
}

/// The last epoch committed to this database (numbered across restarts), `None` before the
/// first.
///
/// # Errors
/// [`PostgresError::Query`] when it cannot be read (for instance before the migrations).
pub async fn last_committed_epoch(pool: &PgPool) -> Result<Option<u64>, PostgresError> {
    let epoch: Option<i64> =
        sqlx::query_scalar("SELECT epoch FROM pipeline_progress WHERE pipeline = $1")
            .bind(PIPELINE)
            .fetch_optional(pool)
            .await
            .map_err(PostgresError::Query)?;
    Ok(epoch.and_then(|e| u64::try_from(e).ok()))
}

/// What a commit did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// The epoch was applied: this many rows went in, out or changed.
    Applied {
        /// Rows in the batch.
        rows: usize,
    },
    /// The database had this epoch already, committed by this same writer (a retry after a
    /// lost reply, or a replay).
    AlreadyCommitted,
    /// This writer may not commit: another one took over, or its lock is gone. Nothing was
    /// written; the epoch must not be acknowledged.
    Fenced(Fenced),
}

/// Writes one epoch in one transaction: nothing of it is visible until all of it is.
///
/// The transaction first checks `fence` ([`leader`]): a writer that is no longer the
/// writer writes nothing. Then the progress guard moves `pipeline_progress` forward only if
/// this epoch is newer; an epoch at or behind the recorded one is skipped only when the
/// recorded one is this writer's own (a retry), never when another writer recorded it.
///
/// # Errors
/// The driver's error, from whichever statement failed; the transaction is rolled back.
pub async fn write_epoch(
    pool: &PgPool,
    batch: &EpochBatch,
    fence: Fence,
) -> Result<Written, sqlx::Error> {
    let mut tx = pool.begin().await?;
    if let Err(fenced) = leader::check_fence(&mut tx, fence).await? {
        tx.rollback().await?;
        return Ok(Written::Fenced(fenced));
    }
    // The guard: it moves the progress row forward only if this epoch is newer, and holds
    // the row's lock to the end.
    let claimed: Option<i64> = sqlx::query_scalar(
        "INSERT INTO pipeline_progress AS p (pipeline, epoch, generation) VALUES ($1, $2, $3)
         ON CONFLICT (pipeline) DO UPDATE
             SET epoch = EXCLUDED.epoch, generation = EXCLUDED.generation, committed_at = now()
             WHERE p.epoch < EXCLUDED.epoch
         RETURNING epoch",
    )
    .bind(PIPELINE)
    .bind(batch.epoch)
    .bind(fence.generation)
    .fetch_optional(&mut *tx)
    .await?;
    if claimed.is_none() {
        let own = leader::own_progress(&mut tx, fence).await?;
        tx.rollback().await?;
        return Ok(match own {
            Ok(()) => Written::AlreadyCommitted,
            Err(fenced) => Written::Fenced(fenced),
        });
    }
    apply(&mut tx, batch).await?;
    tx.commit().await?;
    Ok(Written::Applied {
        rows: batch.row_count(),
    })
}

/// Every statement of an epoch. Each one is idempotent on its own (upserts to the new
/// state, deletes by key, inserts that skip what is there), so that applying the same batch
/// twice leaves the same tables even without the progress guard; a statement whose rows are
/// all empty is not sent.
///
/// Order: the log (`delivery_events`, then `location_fixes`); the referenced customers and
/// couriers; deletions (dependents before what they reference); upserts (referenced before
/// dependents); transitions.
pub(super) async fn apply(
    tx: &mut Transaction<'static, Postgres>,
    batch: &EpochBatch,
) -> Result<(), sqlx::Error> {
    let epoch = batch.epoch;
    let events = &batch.events;
    if !events.event_id.is_empty() {
        sqlx::query(
            "INSERT INTO delivery_events
                 (event_id, kind, occurred_at, delivery_id, courier_id, zone_id, payload, stale,
                  epoch)
             SELECT e.*, $9 FROM UNNEST($1::uuid[], $2::text[], $3::timestamptz[], $4::uuid[],
                                        $5::uuid[], $6::uuid[], $7::jsonb[], $8::bool[]) AS e
             ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(&events.event_id)
        .bind(&events.kind)
        .bind(&events.occurred_at)
        .bind(&events.delivery_id)
        .bind(&events.courier_id)
        .bind(&events.zone_id)
        .bind(&events.payload)
        .bind(&events.stale)
        .bind(epoch)
        .execute(&mut **tx)
        .await?;
    }
    fixes::write(tx, &batch.fixes, &batch.fixes_seen, epoch).await?;

    if !batch.customers.is_empty() {
        sqlx::query(
            "INSERT INTO customers (id) SELECT * FROM UNNEST($1::uuid[])
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(&batch.customers)
        .execute(&mut **tx)
        .await?;
    }

    if !update_couriers(tx, &batch.couriers_changed, epoch).await? {
        upsert_couriers(tx, &batch.couriers_changed, epoch).await?;
    }
    upsert_couriers(tx, &batch.couriers, epoch).await?;
    if !batch.courier_refs.is_empty() {
        sqlx::query(
            "INSERT INTO couriers (id) SELECT * FROM UNNEST($1::uuid[])
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(&batch.courier_refs)
        .execute(&mut **tx)
        .await?;
    }

    delete_pairs(
        tx,
        "DELETE FROM zone_occupancy WHERE (courier_id, zone_id) IN
             (SELECT * FROM UNNEST($1::uuid[], $2::uuid[]))",
        &batch.inside_removed.left,
        &batch.inside_removed.zone,
    )
    .await?;
    delete_pairs(
        tx,
        "DELETE FROM delivery_dropoff_zones WHERE (delivery_id, zone_id) IN
             (SELECT * FROM UNNEST($1::uuid[], $2::uuid[]))",
        &batch.dropoffs_removed.left,
        &batch.dropoffs_removed.zone,
    )
    .await?;
    delete_ids(
        tx,
        "DELETE FROM etas WHERE delivery_id = ANY($1)",
        &batch.etas_deleted,
    )
    .await?;
    delete_ids(
        tx,
        "DELETE FROM ratings WHERE delivery_id = ANY($1)",
        &batch.ratings_deleted,
    )
    .await?;
    delete_ids(
        tx,
        "DELETE FROM deliveries WHERE id = ANY($1)",
        &batch.deliveries_deleted,
    )
    .await?;
    delete_ids(
        tx,
        "DELETE FROM zones WHERE id = ANY($1)",
        &batch.zones_deleted,
    )
    .await?;
    delete_ids(
        tx,
        "UPDATE couriers SET current_lat = NULL, current_lon = NULL, last_fix_at = NULL,
                last_event_id = NULL, speed_mm_s = NULL, heading_ddeg = NULL, odometer_mm = 0,
                active_hours = 0, presence = NULL
         WHERE id = ANY($1) AND last_fix_at IS NOT NULL",
        &batch.couriers_untracked,
    )
    .await?;
    if !batch.metrics_deleted.0.is_empty() {
        sqlx::query(
            "DELETE FROM metrics WHERE (scope, scope_key) IN
                 (SELECT * FROM UNNEST($1::text[], $2::text[]))",
        )
        .bind(&batch.metrics_deleted.0)
        .bind(&batch.metrics_deleted.1)
        .execute(&mut **tx)
        .await?;
    }

    let zones = &batch.zones;
    if !zones.id.is_empty() {
        sqlx::query(
            "INSERT INTO zones AS z (id, name, geometry, dwell_ms, updated_at, event_id,
                                     updated_epoch)
             SELECT u.*, $7 FROM UNNEST($1::uuid[], $2::text[], $3::jsonb[], $4::int8[],
                                        $5::timestamptz[], $6::uuid[]) AS u
             ON CONFLICT (id) DO UPDATE SET
                 name = EXCLUDED.name, geometry = EXCLUDED.geometry,
                 dwell_ms = EXCLUDED.dwell_ms, updated_at = EXCLUDED.updated_at,
                 event_id = EXCLUDED.event_id, updated_epoch = EXCLUDED.updated_epoch
             WHERE z.event_id IS DISTINCT FROM EXCLUDED.event_id",
        )
        .bind(&zones.id)
        .bind(&zones.name)
        .bind(&zones.geometry)
        .bind(&zones.dwell_ms)
        .bind(&zones.updated_at)
        .bind(&zones.event_id)
        .bind(epoch)
        .execute(&mut **tx)
        .await?;
    }

    let d = &batch.deliveries;
    if !d.id.is_empty() {
        sqlx::query(
            "INSERT INTO deliveries AS d (id, customer_id, courier_id, status, pickup_lat,
                                          pickup_lon, dropoff_lat, dropoff_lon, promised_by,
                                          created_at, assigned_at, picked_up_at, ended_at,
                                          rating, version, updated_epoch)
             SELECT u.*, $16 FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::text[],
                                         $5::float8[], $6::float8[], $7::float8[], $8::float8[],
                                         $9::timestamptz[], $10::timestamptz[],
                                         $11::timestamptz[], $12::timestamptz[],
                                         $13::timestamptz[], $14::int2[], $15::int8[]) AS u
             ON CONFLICT (id) DO UPDATE SET
                 customer_id = EXCLUDED.customer_id, courier_id = EXCLUDED.courier_id,
                 status = EXCLUDED.status, pickup_lat = EXCLUDED.pickup_lat,
                 pickup_lon = EXCLUDED.pickup_lon, dropoff_lat = EXCLUDED.dropoff_lat,
                 dropoff_lon = EXCLUDED.dropoff_lon, promised_by = EXCLUDED.promised_by,
                 created_at = EXCLUDED.created_at, assigned_at = EXCLUDED.assigned_at,
                 picked_up_at = EXCLUDED.picked_up_at, ended_at = EXCLUDED.ended_at,
                 rating = EXCLUDED.rating, version = EXCLUDED.version,
                 updated_epoch = EXCLUDED.updated_epoch
             WHERE (d.customer_id, d.courier_id, d.status, d.pickup_lat, d.pickup_lon,
                    d.dropoff_lat, d.dropoff_lon, d.promised_by, d.created_at, d.assigned_at,
                    d.picked_up_at, d.ended_at, d.rating, d.version)
                IS DISTINCT FROM
                   (EXCLUDED.customer_id, EXCLUDED.courier_id, EXCLUDED.status,
                    EXCLUDED.pickup_lat, EXCLUDED.pickup_lon, EXCLUDED.dropoff_lat,
                    EXCLUDED.dropoff_lon, EXCLUDED.promised_by, EXCLUDED.created_at,
                    EXCLUDED.assigned_at, EXCLUDED.picked_up_at, EXCLUDED.ended_at,
                    EXCLUDED.rating, EXCLUDED.version)",
        )
        .bind(&d.id)
        .bind(&d.customer_id)
        .bind(&d.courier_id)
        .bind(&d.status)
        .bind(&d.pickup_lat)
        .bind(&d.pickup_lon)
        .bind(&d.dropoff_lat)
        .bind(&d.dropoff_lon)
        .bind(&d.promised_by)
        .bind(&d.created_at)
        .bind(&d.assigned_at)
        .bind(&d.picked_up_at)
        .bind(&d.ended_at)
        .bind(&d.rating)
        .bind(&d.version)
        .bind(epoch)
        .execute(&mut **tx)
        .await?;
    }

    let r = &batch.ratings;
    if !r.delivery_id.is_empty() {
        sqlx::query(
            "INSERT INTO ratings AS r (delivery_id, customer_id, courier_id, score, comment,
                                       rated_at)
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::int2[], $5::text[],
                                  $6::timestamptz[])
             ON CONFLICT (delivery_id) DO UPDATE SET
                 customer_id = EXCLUDED.customer_id, courier_id = EXCLUDED.courier_id,
                 score = EXCLUDED.score, comment = EXCLUDED.comment, rated_at = EXCLUDED.rated_at
             WHERE (r.customer_id, r.courier_id, r.score, r.comment, r.rated_at)
                IS DISTINCT FROM (EXCLUDED.customer_id, EXCLUDED.courier_id, EXCLUDED.score,
                                  EXCLUDED.comment, EXCLUDED.rated_at)",
        )
        .bind(&r.delivery_id)
        .bind(&r.customer_id)
        .bind(&r.courier_id)
        .bind(&r.score)
        .bind(&r.comment)
        .bind(&r.rated_at)
        .execute(&mut **tx)
        .await?;
    }

    let e = &batch.etas;
    if !e.delivery_id.is_empty() {
        sqlx::query(
            "INSERT INTO etas AS t (delivery_id, courier_id, status, remaining_m, speed_mm_s,
                                    eta_at, as_of, updated_epoch)
             SELECT u.*, $8 FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::int8[],
                                        $5::int8[], $6::timestamptz[], $7::timestamptz[]) AS u
             ON CONFLICT (delivery_id) DO UPDATE SET
                 courier_id = EXCLUDED.courier_id, status = EXCLUDED.status,
                 remaining_m = EXCLUDED.remaining_m, speed_mm_s = EXCLUDED.speed_mm_s,
                 eta_at = EXCLUDED.eta_at, as_of = EXCLUDED.as_of,
                 updated_epoch = EXCLUDED.updated_epoch
             WHERE (t.courier_id, t.status, t.remaining_m, t.speed_mm_s, t.eta_at, t.as_of)
                IS DISTINCT FROM (EXCLUDED.courier_id, EXCLUDED.status, EXCLUDED.remaining_m,
                                  EXCLUDED.speed_mm_s, EXCLUDED.eta_at, EXCLUDED.as_of)",
        )
        .bind(&e.delivery_id)
        .bind(&e.courier_id)
        .bind(&e.status)
        .bind(&e.remaining_m)
        .bind(&e.speed_mm_s)
        .bind(&e.eta_at)
        .bind(&e.as_of)
        .bind(epoch)
        .execute(&mut **tx)
        .await?;
    }

    if !batch.dropoffs_added.left.is_empty() {
        sqlx::query(
            "INSERT INTO delivery_dropoff_zones (delivery_id, zone_id)
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[])
             ON CONFLICT DO NOTHING",
        )
        .bind(&batch.dropoffs_added.left)
        .bind(&batch.dropoffs_added.zone)
        .execute(&mut **tx)
        .await?;
    }
    if !batch.inside_added.left.is_empty() {
        sqlx::query(
            "INSERT INTO zone_occupancy (courier_id, zone_id, since_epoch)
             SELECT u.*, $3 FROM UNNEST($1::uuid[], $2::uuid[]) AS u
             ON CONFLICT DO NOTHING",
        )
        .bind(&batch.inside_added.left)
        .bind(&batch.inside_added.zone)
        .bind(epoch)
        .execute(&mut **tx)
        .await?;
    }

    if !update_metrics(tx, &batch.metrics_changed, epoch).await? {
        upsert_metrics(tx, &batch.metrics_changed, epoch).await?;
    }
    upsert_metrics(tx, &batch.metrics, epoch).await?;

    let t = &batch.transitions;
    if !t.courier_id.is_empty() {
        sqlx::query(
            "INSERT INTO geofence_transitions (courier_id, zone_id, direction, occurred_at, epoch)
             SELECT u.*, $5 FROM UNNEST($1::uuid[], $2::uuid[], $3::text[],
                                        $4::timestamptz[]) AS u
             ON CONFLICT (courier_id, zone_id, epoch, direction) DO NOTHING",
        )
        .bind(&t.courier_id)
        .bind(&t.zone_id)
        .bind(&t.direction)
        .bind(&t.occurred_at)
        .bind(epoch)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Rewrites the tracked columns of couriers whose rows an earlier epoch wrote: a plain
/// `UPDATE` joined on the key, about half the cost of the upsert's per-row conflict check
/// and row lock. Every row is rewritten (the record changed, or else the courier would not
/// be in the batch); only an identical row — the same batch applied again past the progress
/// guard — keeps its `updated_epoch`, so that applying a batch twice still changes nothing.
/// Returns `false` when some row was missing after all (the caller then upserts them).
async fn update_couriers(
    tx: &mut Transaction<'static, Postgres>,
    couriers: &CourierRows,
    epoch: i64,
) -> Result<bool, sqlx::Error> {
    if couriers.id.is_empty() {
        return Ok(true);
    }
    let updated = sqlx::query(
        "UPDATE couriers AS c SET
             current_lat = u.lat, current_lon = u.lon, last_fix_at = u.last_fix_at,
             last_event_id = u.last_event_id, speed_mm_s = u.speed_mm_s,
             heading_ddeg = u.heading_ddeg, odometer_mm = u.odometer_mm,
             active_hours = u.active_hours, presence = u.presence,
             updated_epoch = CASE
                 WHEN (c.current_lat, c.current_lon, c.last_fix_at, c.last_event_id,
                       c.speed_mm_s, c.heading_ddeg, c.odometer_mm, c.active_hours, c.presence)
                      IS DISTINCT FROM
                      (u.lat, u.lon, u.last_fix_at, u.last_event_id, u.speed_mm_s,
                       u.heading_ddeg, u.odometer_mm, u.active_hours, u.presence)
                 THEN $11 ELSE c.updated_epoch END
         FROM UNNEST($1::uuid[], $2::float8[], $3::float8[], $4::timestamptz[], $5::uuid[],
                     $6::int8[], $7::int4[], $8::int8[], $9::int8[], $10::jsonb[])
              AS u (id, lat, lon, last_fix_at, last_event_id, speed_mm_s, heading_ddeg,
                    odometer_mm, active_hours, presence)
         WHERE c.id = u.id",
    )
    .bind(&couriers.id)
    .bind(&couriers.lat)
    .bind(&couriers.lon)
    .bind(&couriers.last_fix_at)
    .bind(&couriers.last_event_id)
    .bind(&couriers.speed_mm_s)
    .bind(&couriers.heading_ddeg)
    .bind(&couriers.odometer_mm)
    .bind(&couriers.active_hours)
    .bind(&couriers.presence)
    .bind(epoch)
    .execute(&mut **tx)
    .await?;
    Ok(updated.rows_affected() == couriers.id.len() as u64)
}

/// Inserts or updates the tracked columns of `couriers`.
async fn upsert_couriers(
    tx: &mut Transaction<'static, Postgres>,
    couriers: &CourierRows,
    epoch: i64,
) -> Result<(), sqlx::Error> {
    if couriers.id.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO couriers AS c (id, current_lat, current_lon, last_fix_at, last_event_id,
                                    speed_mm_s, heading_ddeg, odometer_mm, active_hours,
                                    presence, updated_epoch)
         SELECT u.*, $11 FROM UNNEST($1::uuid[], $2::float8[], $3::float8[],
                                     $4::timestamptz[], $5::uuid[], $6::int8[], $7::int4[],
                                     $8::int8[], $9::int8[], $10::jsonb[]) AS u
         ON CONFLICT (id) DO UPDATE SET
             current_lat = EXCLUDED.current_lat, current_lon = EXCLUDED.current_lon,
             last_fix_at = EXCLUDED.last_fix_at, last_event_id = EXCLUDED.last_event_id,
             speed_mm_s = EXCLUDED.speed_mm_s, heading_ddeg = EXCLUDED.heading_ddeg,
             odometer_mm = EXCLUDED.odometer_mm, active_hours = EXCLUDED.active_hours,
             presence = EXCLUDED.presence, updated_epoch = EXCLUDED.updated_epoch
         WHERE (c.current_lat, c.current_lon, c.last_fix_at, c.last_event_id, c.speed_mm_s,
                c.heading_ddeg, c.odometer_mm, c.active_hours, c.presence)
            IS DISTINCT FROM
               (EXCLUDED.current_lat, EXCLUDED.current_lon, EXCLUDED.last_fix_at,
                EXCLUDED.last_event_id, EXCLUDED.speed_mm_s, EXCLUDED.heading_ddeg,
                EXCLUDED.odometer_mm, EXCLUDED.active_hours, EXCLUDED.presence)",
    )
    .bind(&couriers.id)
    .bind(&couriers.lat)
    .bind(&couriers.lon)
    .bind(&couriers.last_fix_at)
    .bind(&couriers.last_event_id)
    .bind(&couriers.speed_mm_s)
    .bind(&couriers.heading_ddeg)
    .bind(&couriers.odometer_mm)
    .bind(&couriers.active_hours)
    .bind(&couriers.presence)
    .bind(epoch)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Rewrites the counters of scopes whose rows an earlier epoch wrote ([`update_couriers`]
/// says why). Returns `false` when some row was missing after all.
async fn update_metrics(
    tx: &mut Transaction<'static, Postgres>,
    m: &MetricRows,
    epoch: i64,
) -> Result<bool, sqlx::Error> {
    if m.scope.is_empty() {
        return Ok(true);
    }
    let updated = sqlx::query(
        "UPDATE metrics AS m SET
             deliveries = u.deliveries, active = u.active, delivered = u.delivered,
             failed = u.failed, cancelled = u.cancelled, promised = u.promised,
             on_time = u.on_time, created_to_delivered_ms = u.created_to_delivered_ms,
             picked_up_delivered = u.picked_up_delivered,
             picked_up_to_delivered_ms = u.picked_up_to_delivered_ms, rated = u.rated,
             score_sum = u.score_sum, score_1 = u.score_1, score_2 = u.score_2,
             score_3 = u.score_3, score_4 = u.score_4, score_5 = u.score_5,
             distance_mm = u.distance_mm, active_hours = u.active_hours,
             updated_epoch = CASE
                 WHEN (m.deliveries, m.active, m.delivered, m.failed, m.cancelled, m.promised,
                       m.on_time, m.created_to_delivered_ms, m.picked_up_delivered,
                       m.picked_up_to_delivered_ms, m.rated, m.score_sum, m.score_1, m.score_2,
                       m.score_3, m.score_4, m.score_5, m.distance_mm, m.active_hours)
                      IS DISTINCT FROM
                      (u.deliveries, u.active, u.delivered, u.failed, u.cancelled, u.promised,
                       u.on_time, u.created_to_delivered_ms, u.picked_up_delivered,
                       u.picked_up_to_delivered_ms, u.rated, u.score_sum, u.score_1, u.score_2,
                       u.score_3, u.score_4, u.score_5, u.distance_mm, u.active_hours)
                 THEN $22 ELSE m.updated_epoch END
         FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::int8[], $5::int8[], $6::int8[],
                     $7::int8[], $8::int8[], $9::int8[], $10::int8[], $11::int8[], $12::int8[],
                     $13::int8[], $14::int8[], $15::int8[], $16::int8[], $17::int8[],
                     $18::int8[], $19::int8[], $20::int8[], $21::int8[])
              AS u (scope, scope_key, deliveries, active, delivered, failed, cancelled,
                    promised, on_time, created_to_delivered_ms, picked_up_delivered,
                    picked_up_to_delivered_ms, rated, score_sum, score_1, score_2, score_3,
                    score_4, score_5, distance_mm, active_hours)
         WHERE m.scope = u.scope AND m.scope_key = u.scope_key",
    )
    .bind(&m.scope)
    .bind(&m.scope_key)
    .bind(&m.deliveries)
    .bind(&m.active)
    .bind(&m.delivered)
    .bind(&m.failed)
    .bind(&m.cancelled)
    .bind(&m.promised)
    .bind(&m.on_time)
    .bind(&m.created_to_delivered_ms)
    .bind(&m.picked_up_delivered)
    .bind(&m.picked_up_to_delivered_ms)
    .bind(&m.rated)
    .bind(&m.score_sum)
    .bind(&m.score_1)
    .bind(&m.score_2)
    .bind(&m.score_3)
    .bind(&m.score_4)
    .bind(&m.score_5)
    .bind(&m.distance_mm)
    .bind(&m.active_hours)
    .bind(epoch)
    .execute(&mut **tx)
    .await?;
    Ok(updated.rows_affected() == m.scope.len() as u64)
}

/// Inserts or updates rows of `metrics`.
async fn upsert_metrics(
    tx: &mut Transaction<'static, Postgres>,
    m: &MetricRows,
    epoch: i64,
) -> Result<(), sqlx::Error> {
    if m.scope.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO metrics AS m (scope, scope_key, courier_id, zone_id, weekday, hour,
             deliveries, active, delivered, failed, cancelled, promised, on_time,
             created_to_delivered_ms, picked_up_delivered, picked_up_to_delivered_ms,
             rated, score_sum, score_1, score_2, score_3, score_4, score_5,
             distance_mm, active_hours, updated_epoch)
         SELECT u.*, $26 FROM UNNEST($1::text[], $2::text[], $3::uuid[], $4::uuid[],
             $5::int2[], $6::int2[], $7::int8[], $8::int8[], $9::int8[], $10::int8[],
             $11::int8[], $12::int8[], $13::int8[], $14::int8[], $15::int8[], $16::int8[],
             $17::int8[], $18::int8[], $19::int8[], $20::int8[], $21::int8[], $22::int8[],
             $23::int8[], $24::int8[], $25::int8[]) AS u
         ON CONFLICT (scope, scope_key) DO UPDATE SET
             deliveries = EXCLUDED.deliveries, active = EXCLUDED.active,
             delivered = EXCLUDED.delivered, failed = EXCLUDED.failed,
             cancelled = EXCLUDED.cancelled, promised = EXCLUDED.promised,
             on_time = EXCLUDED.on_time,
             created_to_delivered_ms = EXCLUDED.created_to_delivered_ms,
             picked_up_delivered = EXCLUDED.picked_up_delivered,
             picked_up_to_delivered_ms = EXCLUDED.picked_up_to_delivered_ms,
             rated = EXCLUDED.rated, score_sum = EXCLUDED.score_sum,
             score_1 = EXCLUDED.score_1, score_2 = EXCLUDED.score_2,
             score_3 = EXCLUDED.score_3, score_4 = EXCLUDED.score_4,
             score_5 = EXCLUDED.score_5, distance_mm = EXCLUDED.distance_mm,
             active_hours = EXCLUDED.active_hours, updated_epoch = EXCLUDED.updated_epoch
         WHERE (m.deliveries, m.active, m.delivered, m.failed, m.cancelled, m.promised,
                m.on_time, m.created_to_delivered_ms, m.picked_up_delivered,
                m.picked_up_to_delivered_ms, m.rated, m.score_sum, m.score_1, m.score_2,
                m.score_3, m.score_4, m.score_5, m.distance_mm, m.active_hours)
            IS DISTINCT FROM
               (EXCLUDED.deliveries, EXCLUDED.active, EXCLUDED.delivered, EXCLUDED.failed,
                EXCLUDED.cancelled, EXCLUDED.promised, EXCLUDED.on_time,
                EXCLUDED.created_to_delivered_ms, EXCLUDED.picked_up_delivered,
                EXCLUDED.picked_up_to_delivered_ms, EXCLUDED.rated, EXCLUDED.score_sum,
                EXCLUDED.score_1, EXCLUDED.score_2, EXCLUDED.score_3, EXCLUDED.score_4,
                EXCLUDED.score_5, EXCLUDED.distance_mm, EXCLUDED.active_hours)",
    )
    .bind(&m.scope)
    .bind(&m.scope_key)
    .bind(&m.courier_id)
    .bind(&m.zone_id)
    .bind(&m.weekday)
    .bind(&m.hour)
    .bind(&m.deliveries)
    .bind(&m.active)
    .bind(&m.delivered)
    .bind(&m.failed)
    .bind(&m.cancelled)
    .bind(&m.promised)
    .bind(&m.on_time)
    .bind(&m.created_to_delivered_ms)
    .bind(&m.picked_up_delivered)
    .bind(&m.picked_up_to_delivered_ms)
    .bind(&m.rated)
    .bind(&m.score_sum)
    .bind(&m.score_1)
    .bind(&m.score_2)
    .bind(&m.score_3)
    .bind(&m.score_4)
    .bind(&m.score_5)
    .bind(&m.distance_mm)
    .bind(&m.active_hours)
    .bind(epoch)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn delete_ids(
    tx: &mut Transaction<'static, Postgres>,
    sql: &'static str,
    ids: &[uuid::Uuid],
) -> Result<(), sqlx::Error> {
    if !ids.is_empty() {
        sqlx::query(sql).bind(ids).execute(&mut **tx).await?;
    }
    Ok(())
}

async fn delete_pairs(
    tx: &mut Transaction<'static, Postgres>,
    sql: &'static str,
    left: &[uuid::Uuid],
    right: &[uuid::Uuid],
) -> Result<(), sqlx::Error> {
    if !left.is_empty() {
        sqlx::query(sql)
            .bind(left)
            .bind(right)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// Whether a failed commit is worth repeating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The database or the way to it failed, or the transaction lost a race: the same
    /// epoch may well commit on a later attempt.
    Transient,
    /// The database refused the data or the statement: the same epoch fails the same way.
    Permanent,
    /// The pool was closed by us.
    Closed,
}

/// Sorts a driver error into [`Failure`].
///
/// Transient: I/O, TLS, a pool timeout, a crashed connection worker, a protocol error (a
/// connection cut mid-message), and the SQLSTATE classes that describe the server's or the
/// connection's state rather than the data: `08` connection exception, `40` transaction
/// rollback (serialization failure, deadlock), `53` insufficient resources, `57` operator
/// intervention (shutdown, `pg_terminate_backend`, statement timeout), `58` system error,
/// and `55P03` lock not available. Everything else, constraint (`23`) and data (`22`)
/// errors first, is permanent, and so is an error this code does not know: retrying a bug
/// forever would hide it.
pub fn classify(error: &sqlx::Error) -> Failure {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_)
        | sqlx::Error::BeginFailed => Failure::Transient,
        sqlx::Error::PoolClosed => Failure::Closed,
        sqlx::Error::Database(db) => match db.code() {
            Some(code) => classify_sqlstate(&code),
            None => Failure::Permanent,
        },
        _ => Failure::Permanent,
    }
}

/// [`classify`] for a server error, by its SQLSTATE.
pub fn classify_sqlstate(code: &str) -> Failure {
    let transient = ["08", "40", "53", "57", "58"]
        .iter()
        .any(|class| code.starts_with(class))
        || code == "55P03";
    if transient {
        Failure::Transient
    } else {
        Failure::Permanent
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::borrow::Cow;
    use std::error::Error as StdError;

    use sqlx::error::{DatabaseError, ErrorKind};

    use super::*;

    /// A server error with a given SQLSTATE, as the driver would hand it over.
    #[derive(Debug)]
    struct ServerError(&'static str);

    impl std::fmt::Display for ServerError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "server error {}", self.0)
        }
    }

    impl StdError for ServerError {}

    impl DatabaseError for ServerError {
        fn message(&self) -> &str {
            "server error"
        }

        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.0))
        }

        fn as_error(&self) -> &(dyn StdError + Send + Sync + 'static) {
            self
        }

        fn as_error_mut(&mut self) -> &mut (dyn StdError + Send + Sync + 'static) {
            self
        }

        fn into_error(self: Box<Self>) -> Box<dyn StdError + Send + Sync + 'static> {
            self
        }

        fn kind(&self) -> ErrorKind {
            ErrorKind::Other
        }
    }

    fn server(code: &'static str) -> sqlx::Error {
        sqlx::Error::Database(Box::new(ServerError(code)))
    }

    #[test]
    fn the_way_to_the_database_failing_is_transient() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(classify(&sqlx::Error::Io(refused)), Failure::Transient);
        assert_eq!(classify(&sqlx::Error::PoolTimedOut), Failure::Transient);
        assert_eq!(classify(&sqlx::Error::WorkerCrashed), Failure::Transient);
        assert_eq!(classify(&sqlx::Error::PoolClosed), Failure::Closed);
    }

    #[test]
    fn lost_races_and_server_state_are_transient() {
        for code in [
            "40001", // serialization_failure
            "40P01", // deadlock_detected
            "08006", // connection_failure
            "53300", // too_many_connections
            "57P01", // admin_shutdown (pg_terminate_backend)
            "57P03", // cannot_connect_now (starting up)
            "57014", // query_canceled (statement timeout)
            "55P03", // lock_not_available
        ] {
            assert_eq!(classify(&server(code)), Failure::Transient, "{code}");
        }
    }

    #[test]
    fn refused_data_and_broken_statements_are_permanent() {
        for code in [
            "23505", // unique_violation
            "23503", // foreign_key_violation
            "23514", // check_violation
            "23502", // not_null_violation
            "22003", // numeric_value_out_of_range
            "22P02", // invalid_text_representation
            "42P01", // undefined_table: the schema is missing, retrying will not create it
            "42703", // undefined_column
            "55000", // object_not_in_prerequisite_state
        ] {
            assert_eq!(classify(&server(code)), Failure::Permanent, "{code}");
        }
        let decode = sqlx::Error::Decode("bad".into());
        assert_eq!(classify(&decode), Failure::Permanent);
    }
}
