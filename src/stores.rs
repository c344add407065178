//! The stores `run` writes besides its read model, opened in the order that makes a
//! restart safe (ARCHITECTURE rules 3 and 4):
//!
//! 1. PostgreSQL, the system of record: the database is created if the server lacks it,
//!    migrated, and read back — **hydration** — so that the dataflow restarts from the state
//!    the last committed epoch left, before a single new event is read;
//! 2. Redis (the caches), MongoDB (location history, zones for `$geoWithin`) and the
//!    derived-event feed on RabbitMQ.
//!
//! With PostgreSQL, step 1 first takes the **writer lock** of the database (ARCHITECTURE
//! rule 10, [`WriterLock`]): a second process on the same database waits there as a hot
//! standby, before it hydrates or reads a single event, and takes over when the writer
//! stops. The PostgreSQL sink commits under that lock and releases it when it closes.
//!
//! Every configured store must answer at start: one that is down is an error naming it,
//! never a silent start without it (rule 8). Leaving a store out is a decision made in the
//! configuration (`--no-postgres`, ...), and leaving PostgreSQL out means starting from
//! nothing, since there is no record to hydrate from.

use std::time::{Duration, Instant};

use anyhow::Context;
use delivertrack_dataflow::restore::Restore;
use delivertrack_sinks::postgres::{
    WriterLock, connect_pool, ensure_database, load_restore, migrate,
};
use delivertrack_sinks::{
    DerivedConfig, DerivedSink, MongoConfig, MongoSink, PostgresConfig, PostgresSink, RedisConfig,
    RedisSink, Sink,
};
use sqlx::PgPool;
use tokio::sync::watch;

use crate::metrics::DriverMetrics;
use crate::standby::Phase;

/// How often a standby tries the writer lock: the bound on its takeover delay, besides its
/// own hydration.
pub const WRITER_LOCK_POLL: Duration = Duration::from_millis(250);

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
    /// The writer lock the PostgreSQL sink commits under, for a watch that stops the
    /// pipeline when it is lost.
    pub writer_lock: Option<WriterLock>,
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
            .field("writer_lock", &self.writer_lock)
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
    let holder = format!("delivertrack (pid {})", std::process::id());
    let (phase, _) = watch::channel(Phase::Starting);
    open_stores_as(config, speed_window, metrics, &holder, &phase).await
}

/// [`open_stores`], waiting for the writer lock in the name of `holder` (a sentence naming
/// this process for operators and standbys) and telling `phase` when it has to wait.
///
/// # Errors
/// A configured store cannot be reached or used; the error names it.
pub async fn open_stores_as(
    config: &StoresConfig,
    speed_window: usize,
    metrics: &DriverMetrics,
    holder: &str,
    phase: &watch::Sender<Phase>,
) -> anyhow::Result<Stores> {
    let mut stores = Stores::default();
    if let Some(postgres) = &config.postgres {
        let (sink, restore, lock) =
            open_postgres(postgres, speed_window, metrics, holder, phase).await?;
        stores.sinks.push(Box::new(sink));
        stores.restore = restore;
        stores.writer_lock = Some(lock);
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

/// Creates and migrates the database if needed, takes the writer lock (waiting as a standby
/// while another process holds it), reads the state to restore, and opens the sink on the
/// same pool under the lock (continuing after the last committed epoch).
async fn open_postgres(
    config: &PostgresConfig,
    speed_window: usize,
    metrics: &DriverMetrics,
    holder: &str,
    phase: &watch::Sender<Phase>,
) -> anyhow::Result<(PostgresSink, Vec<Restore>, WriterLock)> {
    let target = config.target();
    ensure_database(config).await?;
    // The errors name the database.
    let pool = connect_pool(config).await?;
    migrate(&pool)
        .await
        .with_context(|| format!("the migrations could not be applied to {target}"))?;
    let asked = Instant::now();
    let mut waited = false;
    let lock = WriterLock::acquire(config, holder, WRITER_LOCK_POLL, |writer| {
        waited = true;
        tracing::warn!(
            database = %target,
            writer,
            "This process is a standby: another process holds the writer lock of the database. It waits, serving /readyz 503, and takes over when that process stops."
        );
        phase.send_replace(Phase::Standby {
            database: target.clone(),
            holder: writer.to_owned(),
        });
    })
    .await
    .with_context(|| format!("the writer lock of {target} could not be taken"))?;
    phase.send_replace(Phase::Starting);
    tracing::info!(
        database = %target,
        generation = lock.fence().generation,
        waited_ms = asked.elapsed().as_millis() as u64,
        took_over = waited,
        "This process holds the writer lock: it is the one writer of the database."
    );
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
    let sink = PostgresSink::with_writer_lock(pool, lock.clone())
        .await
        .with_context(|| format!("PostgreSQL at {target} cannot be used"))?;
    Ok((sink, restore, lock))
}
