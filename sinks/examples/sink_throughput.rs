//! Rows per second of the PostgreSQL and Redis sinks, at several epoch sizes.
//!
//! The input is the fleet simulator's event stream run through the real dataflow, cut into
//! epochs of N events for each N asked for. The dataflow runs first, outside the
//! measurement; then each sink commits the resulting outputs one after the other, in epoch
//! order, and only the `Sink::commit` calls are timed.
//!
//! - PostgreSQL: a fresh database per epoch size (`dt_bench_<uuid>`, migrated, dropped with
//!   `WITH (FORCE)` at the end, also after an error). Rows are `EpochBatch::row_count()` of
//!   every applied epoch, as the sink reports it in the `rows` field of its "committed an
//!   epoch" debug event (the batch type is private to the crate; the figure is the same).
//! - Redis: a key prefix of its own per epoch size (`dt_bench:<uuid>:`, every key under it
//!   deleted at the end). Rows are the writes of each epoch (`EpochWrites::writes`: one SET
//!   or DEL per key, or one customer-history update: ZADD and/or ZREM, ZREMRANGEBYRANK and
//!   PEXPIRE on one sorted set), as the sink reports them in its `writes` debug field.
//!
//! ```sh
//! cargo run --release -p delivertrack-sinks --example sink_throughput -- \
//!     --epoch-sizes 500,5000,20000 --events 400000 --couriers 1000
//! ```
//!
//! Warnings go to stderr; `RUST_LOG` selects more (`RUST_LOG=sqlx::query=debug` shows every
//! statement with its duration).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use delivertrack_dataflow::pipeline::{self, DataflowConfig};
use delivertrack_dataflow::{EpochOutput, Event};
use delivertrack_ingest::{FleetSimulator, SimulatorConfig};
use delivertrack_sinks::postgres::{PostgresSink, migrate};
use delivertrack_sinks::redis::{RedisConfig, RedisSink};
use delivertrack_sinks::{Sink, SinkError};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use tracing::field::{Field, Visit};
use tracing::{Level, Subscriber};
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt as _};
use tracing_subscriber::util::SubscriberInitExt as _;
use uuid::Uuid;

/// Monday 2026-11-30, 08:00 UTC: the simulated start.
const START_MS: i64 = 1_796_025_600_000;
/// Simulated time per simulator step while the stream is generated.
const STEP_MS: i64 = 1_000;
const POSTGRES_SINK: &str = "delivertrack_sinks::postgres::sink";
const REDIS_SINK: &str = "delivertrack_sinks::redis::sink";

/// Rows/s of the PostgreSQL and Redis sinks at several epoch sizes.
#[derive(Debug, Parser)]
struct Args {
    /// Events per epoch; one run per value.
    #[arg(long, value_delimiter = ',', default_values_t = [500, 5_000, 20_000])]
    epoch_sizes: Vec<usize>,
    /// Events in the stream (the same stream for every epoch size; a last partial epoch is
    /// left out).
    #[arg(long, default_value_t = 400_000)]
    events: usize,
    /// Couriers of the simulated fleet.
    #[arg(long, default_value_t = 1_000)]
    couriers: usize,
    /// New deliveries per simulated minute (default: couriers / 13, the fleet's capacity).
    #[arg(long)]
    deliveries_per_minute: Option<f64>,
    /// Time between two fixes of one courier, ms.
    #[arg(long, default_value_t = 2_000)]
    fix_interval_ms: i64,
    /// Simulator seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Timely workers of the dataflow that produces the outputs.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Which sinks to measure.
    #[arg(long, value_delimiter = ',', default_values_t = [String::from("postgres"), String::from("redis")])]
    sinks: Vec<String>,
    /// A database on the server where the benchmark databases are created and dropped.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// Redis host.
    #[arg(long, env = "REDIS_HOST", default_value = "127.0.0.1")]
    redis_host: String,
    /// Redis port.
    #[arg(long, env = "REDIS_PORT", default_value_t = 6379)]
    redis_port: u16,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let reported = Arc::new(Reported::default());
    tracing_subscriber::registry()
        .with(
            Capture(Arc::clone(&reported)).with_filter(
                Targets::new()
                    .with_target(POSTGRES_SINK, Level::DEBUG)
                    .with_target(REDIS_SINK, Level::DEBUG),
            ),
        )
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(
                    EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| EnvFilter::new(LevelFilter::WARN.to_string())),
                ),
        )
        .init();
    for sink in &args.sinks {
        if sink != "postgres" && sink != "redis" {
            bail!("unknown sink {sink:?}: postgres or redis");
        }
    }
    if args.epoch_sizes.contains(&0) {
        bail!("an epoch size must be at least 1");
    }

    println!("load average at start: {}", support::load_average());
    let started = Instant::now();
    let (events, simulated_ms) = stream(&args);
    println!(
        "stream: {} events ({} couriers, {:.1} deliveries/min, a fix every {} ms, seed {}), \
         {:.0} simulated seconds, generated in {:.1} s",
        events.len(),
        args.couriers,
        deliveries_per_minute(&args),
        args.fix_interval_ms,
        args.seed,
        simulated_ms as f64 / 1000.0,
        started.elapsed().as_secs_f64()
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let admin_options: PgConnectOptions = args
        .database_url
        .parse()
        .context("DATABASE_URL is not a PostgreSQL url")?;

    let mut results = Vec::new();
    for &size in &args.epoch_sizes {
        let started = Instant::now();
        let outputs = through_dataflow(&events, size, args.workers)?;
        let changes: usize = outputs.iter().map(|o| o.changes.len()).sum();
        println!(
            "epoch size {size}: {} epochs through the dataflow ({} workers) in {:.1} s, \
             {changes} changes (not timed)",
            outputs.len(),
            args.workers,
            started.elapsed().as_secs_f64()
        );
        for sink in &args.sinks {
            let stats = match sink.as_str() {
                "postgres" => {
                    runtime.block_on(bench_postgres(&admin_options, &outputs, &reported))?
                }
                _ => runtime.block_on(bench_redis(&args, &outputs, &reported))?,
            };
            println!("  {}", stats.row(size));
            results.push((size, stats));
        }
    }

    println!();
    println!(
        "rows: postgres = EpochBatch::row_count() (the epoch's rows to insert, upsert or delete, all tables);"
    );
    println!(
        "      redis = EpochWrites::writes (SET/DEL of one key, or one customer-history update)"
    );
    println!();
    println!("{}", Stats::header());
    for (size, stats) in &results {
        println!("{}", stats.row(*size));
    }
    println!("load average at end: {}", support::load_average());
    Ok(())
}

fn deliveries_per_minute(args: &Args) -> f64 {
    args.deliveries_per_minute
        .unwrap_or(args.couriers as f64 / 13.0)
}

/// The simulator's stream, `args.events` events long, and the simulated time it spans.
fn stream(args: &Args) -> (Vec<Event>, i64) {
    let config = SimulatorConfig {
        couriers: args.couriers,
        seed: args.seed,
        deliveries_per_minute: deliveries_per_minute(args),
        fix_interval_ms: args.fix_interval_ms,
        ..SimulatorConfig::default()
    };
    let mut simulator = FleetSimulator::new(config, START_MS);
    let mut events = simulator.initial_events();
    while events.len() < args.events {
        events.extend(simulator.step(STEP_MS));
    }
    events.truncate(args.events);
    let simulated = events.last().map_or(0, |e| e.occurred_at - START_MS);
    (events, simulated)
}

/// The stream cut into epochs of `size` events, through the real dataflow.
fn through_dataflow(
    events: &[Event],
    size: usize,
    workers: usize,
) -> anyhow::Result<Vec<Arc<EpochOutput>>> {
    let (mut input, mut output) = pipeline::start(DataflowConfig {
        workers,
        ..DataflowConfig::default()
    })?;
    let epochs = events.len() / size;
    std::thread::scope(|scope| {
        let feeder = scope.spawn(move || {
            for chunk in events.chunks_exact(size) {
                if input.send(chunk.to_vec()).is_err() {
                    break;
                }
            }
            input.close();
        });
        let mut outputs = Vec::with_capacity(epochs);
        while let Some(out) = output.recv() {
            outputs.push(Arc::new(out));
        }
        if feeder.join().is_err() {
            bail!("the thread feeding the dataflow panicked");
        }
        if let Some(Err(failure)) = output.outcome() {
            bail!("the dataflow failed: {failure}");
        }
        if outputs.len() != epochs {
            bail!("the dataflow output {} epochs of {epochs}", outputs.len());
        }
        Ok(outputs)
    })
}

// ---------------------------------------------------------------------------------------
// The sinks
// ---------------------------------------------------------------------------------------

async fn bench_postgres(
    admin_options: &PgConnectOptions,
    outputs: &[Arc<EpochOutput>],
    reported: &Reported,
) -> anyhow::Result<Stats> {
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(admin_options.clone())
        .await
        .context("cannot connect to PostgreSQL")?;
    let name = format!("dt_bench_{}", Uuid::new_v4().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await
        .with_context(|| format!("CREATE DATABASE {name}"))?;
    let result = async {
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .connect_with(admin_options.clone().database(&name))
            .await?;
        migrate(&pool).await?;
        let sink = PostgresSink::with_pool(pool.clone()).await?;
        let stats = commit_all(sink, "postgres", outputs, reported).await;
        pool.close().await;
        stats
    }
    .await;
    let dropped = drop_database(&admin, &name).await;
    admin.close().await;
    let stats = result?;
    dropped?;
    Ok(stats)
}

async fn drop_database(admin: &PgPool, name: &str) -> anyhow::Result<()> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(admin)
    .await
    .with_context(|| format!("DROP DATABASE {name}"))?;
    Ok(())
}

async fn bench_redis(
    args: &Args,
    outputs: &[Arc<EpochOutput>],
    reported: &Reported,
) -> anyhow::Result<Stats> {
    let prefix = format!("dt_bench:{}:", Uuid::new_v4().simple());
    let config = RedisConfig {
        key_prefix: prefix.clone(),
        ..RedisConfig::new(args.redis_host.clone(), args.redis_port)
    };
    let result = async {
        let sink = RedisSink::connect(&config).await?;
        let errors = sink.errors().clone();
        let stats = commit_all(sink, "redis", outputs, reported).await?;
        // A cache never fails a commit: a write that did not reach Redis is only counted.
        if errors.get() > 0 {
            bail!(
                "{} epochs did not reach Redis; the figures would be meaningless",
                errors.get()
            );
        }
        Ok(stats)
    }
    .await;
    let deleted = delete_keys(&config, &prefix).await;
    let stats = result?;
    deleted?;
    Ok(stats)
}

async fn delete_keys(config: &RedisConfig, prefix: &str) -> anyhow::Result<()> {
    let client = redis::Client::open(redis::ConnectionAddr::Tcp(config.host.clone(), config.port))?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let mut keys: Vec<String> = Vec::new();
    {
        let mut iter =
            redis::AsyncCommands::scan_match::<_, String>(&mut connection, format!("{prefix}*"))
                .await?;
        while let Some(key) = iter.next_item().await {
            keys.push(key?);
        }
    }
    for chunk in keys.chunks(1_000) {
        redis::cmd("UNLINK")
            .arg(chunk)
            .query_async::<i64>(&mut connection)
            .await?;
    }
    Ok(())
}

/// Commits every output in order, timing each commit; rows come from the sink's report.
async fn commit_all<S: Sink>(
    mut sink: S,
    name: &'static str,
    outputs: &[Arc<EpochOutput>],
    reported: &Reported,
) -> anyhow::Result<Stats> {
    reported.reset();
    let mut commit_ms = Vec::with_capacity(outputs.len());
    let mut total = Duration::ZERO;
    for output in outputs {
        let started = Instant::now();
        sink.commit(Arc::clone(output))
            .await
            .map_err(|error: SinkError| anyhow::anyhow!(error))
            .with_context(|| format!("{name}: committing epoch {}", output.epoch))?;
        let elapsed = started.elapsed();
        total += elapsed;
        commit_ms.push(elapsed.as_secs_f64() * 1000.0);
    }
    sink.close()
        .await
        .map_err(|error: SinkError| anyhow::anyhow!(error))?;
    let (applied, rows) = reported.take(name);
    // Redis reports nothing for an epoch without writes; PostgreSQL reports every epoch.
    if name == "postgres" && applied != outputs.len() as u64 {
        bail!(
            "postgres: {applied} of {} epochs reported as applied",
            outputs.len()
        );
    }
    let events = outputs.iter().map(|o| o.events.len()).sum();
    Ok(Stats {
        sink: name,
        epochs: outputs.len(),
        events,
        rows,
        total,
        commit_ms,
    })
}

// ---------------------------------------------------------------------------------------
// Figures
// ---------------------------------------------------------------------------------------

/// One sink at one epoch size.
#[derive(Debug)]
struct Stats {
    sink: &'static str,
    epochs: usize,
    events: usize,
    rows: u64,
    total: Duration,
    commit_ms: Vec<f64>,
}

impl Stats {
    fn header() -> String {
        format!(
            "{:<9} {:>7} {:>7} {:>10} {:>9} {:>9} {:>10} {:>10} {:>8} {:>8} {:>8} {:>8}",
            "sink",
            "events",
            "epochs",
            "rows",
            "rows/ep",
            "commit_s",
            "rows/s",
            "events/s",
            "mean_ms",
            "p50_ms",
            "p95_ms",
            "max_ms"
        )
    }

    fn row(&self, size: usize) -> String {
        let seconds = self.total.as_secs_f64();
        let per_second = |n: f64| if seconds > 0.0 { n / seconds } else { 0.0 };
        let mut sorted = self.commit_ms.clone();
        sorted.sort_by(f64::total_cmp);
        let mean = if sorted.is_empty() {
            0.0
        } else {
            sorted.iter().sum::<f64>() / sorted.len() as f64
        };
        format!(
            "{:<9} {:>7} {:>7} {:>10} {:>9.0} {:>9.2} {:>10.0} {:>10.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
            self.sink,
            size,
            self.epochs,
            self.rows,
            self.rows as f64 / self.epochs.max(1) as f64,
            seconds,
            per_second(self.rows as f64),
            per_second(self.events as f64),
            mean,
            percentile(&sorted, 0.50),
            percentile(&sorted, 0.95),
            sorted.last().copied().unwrap_or(0.0),
        )
    }
}

/// The nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

// ---------------------------------------------------------------------------------------
// What the sinks report
// ---------------------------------------------------------------------------------------

/// Totals of the sinks' "committed an epoch" debug events since the last reset. Sinks are
/// measured one at a time, so a reset between them is enough.
#[derive(Debug, Default)]
struct Reported {
    postgres_epochs: AtomicU64,
    postgres_rows: AtomicU64,
    redis_epochs: AtomicU64,
    redis_writes: AtomicU64,
}

impl Reported {
    fn reset(&self) {
        for counter in [
            &self.postgres_epochs,
            &self.postgres_rows,
            &self.redis_epochs,
            &self.redis_writes,
        ] {
            counter.store(0, Ordering::SeqCst);
        }
    }

    /// `(epochs reported, rows)` of one sink.
    fn take(&self, sink: &str) -> (u64, u64) {
        let (epochs, rows) = if sink == "postgres" {
            (&self.postgres_epochs, &self.postgres_rows)
        } else {
            (&self.redis_epochs, &self.redis_writes)
        };
        (epochs.load(Ordering::SeqCst), rows.load(Ordering::SeqCst))
    }
}

/// A tracing layer that adds up the `rows` (PostgreSQL) and `writes` (Redis) fields of the
/// sinks' per-epoch debug events.
struct Capture(Arc<Reported>);

#[derive(Default)]
struct Counts {
    rows: Option<u64>,
    writes: Option<u64>,
}

impl Visit for Counts {
    fn record_u64(&mut self, field: &Field, value: u64) {
        match field.name() {
            "rows" => self.rows = Some(value),
            "writes" => self.writes = Some(value),
            _ => {}
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if let Ok(value) = u64::try_from(value) {
            self.record_u64(field, value);
        }
    }

    fn record_debug(&mut self, _field: &Field, _value: &dyn std::fmt::Debug) {}
}

impl<S: Subscriber> Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let metadata = event.metadata();
        if *metadata.level() != Level::DEBUG {
            return;
        }
        let mut counts = Counts::default();
        event.record(&mut counts);
        match (metadata.target(), counts) {
            (
                POSTGRES_SINK,
                Counts {
                    rows: Some(rows), ..
                },
            ) => {
                self.0.postgres_epochs.fetch_add(1, Ordering::SeqCst);
                self.0.postgres_rows.fetch_add(rows, Ordering::SeqCst);
            }
            (
                REDIS_SINK,
                Counts {
                    writes: Some(writes),
                    ..
                },
            ) => {
                self.0.redis_epochs.fetch_add(1, Ordering::SeqCst);
                self.0.redis_writes.fetch_add(writes, Ordering::SeqCst);
            }
            _ => {}
        }
    }
}
