//! The stores `run` writes besides its read model, opened in the order that makes a
//! restart safe (ARCHITECTURE rules 3 and 4):
//!
//! 1. PostgreSQL, the system of record: the database is created if the server lacks it,
//!    migrated, and read back — **hydration** — so that the dataflow restarts from the state
//!    the last committed epoch left, before a single new event is read;
//! 2. Redis (the caches), MongoDB (location history, zones for `$geoWithin`) and the
//!    derived-event feed on RabbitMQ.
//!
//! Every configured store must answer at start: one that is down is an error naming it,
//! never a silent start without it (rule 8). Leaving a store out is a decision made in the
//! configuration (`--no-postgres`, ...), and leaving PostgreSQL out means starting from
//! nothing, since there is no record to hydrate from.

use std::time::Instant;

use anyhow::Context;
use delivertrack_dataflow::restore::Restore;
use delivertrack_sinks::postgres::{connect_pool, ensure_database, load_restore, migrate};
use delivertrack_sinks::{
    DerivedConfig, DerivedSink, MongoConfig, MongoSink, PostgresConfig, PostgresSink, RedisConfig,
    RedisSink, Sink,
};
use sqlx::PgPool;

use crate::metrics::DriverMetrics;

/// Which stores `run` writes, and where they are; `None` leaves one out.
#[derive(Clone, Debug, Default)]
pub struct StoresConfig {
    /// The system of record, and where hydration reads from.
    pub postgres: Option<PostgresConfig>,
    /// The caches of the seed's caching strategy.
    pub redis: Option<RedisConfig>,
    /// Location history and zones as GeoJSON.
    pub mongo: Option<MongoConfig>,
    /// The notification feed on `delivertrack.derived`.
    pub derived: Option<DerivedConfig>,
}

/// The opened stores: their sinks, in commit order, and the state to restore.
#[derive(Default)]
pub struct Stores {
    /// PostgreSQL, Redis, MongoDB, derived events: those configured.
    pub sinks: Vec<Box<dyn Sink>>,
    /// The dataflow's state read back from PostgreSQL (empty without it, or on a new
    /// database).
    pub restore: Vec<Restore>,
    /// A pool of its own on the same database, for the API's reads of the records
    /// (deliveries the read model does not hold, courier and customer profiles); the
    /// sink's pool closes when the sink does, before the API stops.
    pub records: Option<PgPool>,
}

impl std::fmt::Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stores")
            .field(
                "sinks",
                &self.sinks.iter().map(|s| s.name()).collect::<Vec<_>>(),
            )
            .field("restore", &self.restore.len())
            .field("records", &self.records.is_some())
            .finish()
    }
}

/// Opens every configured store, PostgreSQL first with its migrations and hydration.
/// `speed_window` is the dataflow's (how many recent fixes per courier it keeps).
///
/// # Errors
/// A configured store cannot be reached or used; the error names it.
pub async fn open_stores(
    config: &StoresConfig,
    speed_window: usize,
    metrics: &DriverMetrics,
) -> anyhow::Result<Stores> {
    let mut stores = Stores::default();
    if let Some(postgres) = &config.postgres {
        let (sink, restore) = open_postgres(postgres, speed_window, metrics).await?;
        stores.sinks.push(Box::new(sink));
        stores.restore = restore;
        stores.records = Some(connect_pool(postgres).await?);
    } else {
        tracing::warn!(
            "PostgreSQL is left out: nothing is recorded and a restart begins from nothing."
        );
    }
    if let Some(redis) = &config.redis {
        let sink = RedisSink::connect(redis)
            .await
            .with_context(|| format!("Redis at {} cannot be used", redis.target()))?
            .with_error_counter(metrics.sink_errors.with_label_values(&["redis"]));
        stores.sinks.push(Box::new(sink));
    }
    if let Some(mongo) = &config.mongo {
        let sink = MongoSink::connect(mongo)
            .await
            .with_context(|| format!("MongoDB at {} cannot be used", mongo.target()))?;
        stores.sinks.push(Box::new(sink));
    }
    if let Some(derived) = &config.derived {
        let target = derived.redacted_url();
        let sink = DerivedSink::connect(derived.clone())
            .await
            .with_context(|| format!("the derived-event feed on {target} cannot be used"))?;
        stores.sinks.push(Box::new(sink));
    }
    Ok(stores)
}

/// Creates and migrates the database if needed, reads the state to restore, and opens the
/// sink on the same pool (continuing after the last committed epoch).
async fn open_postgres(
    config: &PostgresConfig,
    speed_window: usize,
    metrics: &DriverMetrics,
) -> anyhow::Result<(PostgresSink, Vec<Restore>)> {
    let target = config.target();
    ensure_database(config).await?;
    // The errors name the database.
    let pool = connect_pool(config).await?;
    migrate(&pool)
        .await
        .with_context(|| format!("the migrations could not be applied to {target}"))?;
    let started = Instant::now();
    let restore = load_restore(&pool, speed_window)
        .await
        .with_context(|| format!("the state could not be read back from {target}"))?;
    let read = started.elapsed();
    // The dataflow's rebuild is added when the restored epoch is committed (the driver).
    metrics.hydration_duration.set(read.as_secs_f64());
    tracing::info!(
        database = %target,
        records = restore.len(),
        read_ms = read.as_millis() as u64,
        "Read the state to restore from PostgreSQL."
    );
    let sink = PostgresSink::with_pool(pool)
        .await
        .with_context(|| format!("PostgreSQL at {target} cannot be used"))?;
    Ok((sink, restore))
}
