//! How long hydration takes at scale: 1 000 000 deliveries and 100 000 couriers.
//!
//! 1. A fresh database (`dt_bench_<uuid>`, migrated; dropped `WITH (FORCE)` at the end,
//!    also after an error).
//! 2. A small sample — the fleet simulator through the real dataflow, committed by the real
//!    `PostgresSink` — gives the shapes the sink writes (payload keys and JSON types per
//!    event kind, which id columns are set); then the tables are emptied again.
//! 3. The fill, set-based (`INSERT ... SELECT` over `generate_series`): zones (a grid of
//!    squares, every second one with a dwell time, plus a few deleted ones: tombstones),
//!    customers, couriers (their `couriers` rows with presence, and their last fixes in
//!    `location_fixes`), deliveries (their `delivery.created` and `status.changed` events,
//!    their `deliveries` rows, ratings with their `delivery.rated` events). Payloads are
//!    built as `contract::encode_event` encodes them; the check afterwards decodes a few
//!    thousand of each kind and encodes them again, which must give the stored JSON back,
//!    and compares their shapes with the sample's. The tables hydration does not read
//!    (`metrics`, `etas`, `zone_occupancy`, `delivery_dropoff_zones`,
//!    `geofence_transitions`) stay empty.
//! 4. Timed: `load_restore(&pool, 5)` (the reading), then `EpochSender::restore` of its
//!    result into a fresh dataflow until the restored epoch comes out (the rebuilding).
//!    Both are checked: the number of each kind of record, and the restored epoch's overall
//!    tally against the table's counts by status.
//!
//! ```sh
//! cargo run --release -p delivertrack-sinks --example hydration_scale -- \
//!     --deliveries 1000000 --couriers 100000 --zones 300
//! ```

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context as _, bail, ensure};
use chrono::{DateTime, Utc};
use clap::Parser;
use delivertrack_dataflow::contract::{ContractLimits, decode_event, encode_event};
use delivertrack_dataflow::model::{Scope, Tally};
use delivertrack_dataflow::pipeline::{self, DataflowConfig};
use delivertrack_dataflow::restore::Restore;
use delivertrack_dataflow::{Change, EpochOutput};
use delivertrack_ingest::{FleetSimulator, SimulatorConfig};
use delivertrack_sinks::Sink;
use delivertrack_sinks::postgres::{PostgresSink, load_restore, migrate};
use serde_json::Value;
use sqlx::Row as _;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use tokio::runtime::Runtime;
use tracing_subscriber::EnvFilter;
use uuid::Uuid;

/// Monday 2026-11-30, 08:00 UTC: "now" of the stored history, which spans the 30 days before.
const T_END: i64 = 1_796_025_600_000;
const HISTORY_MS: i64 = 30 * 24 * 3_600_000;
/// When the zones were defined (before the history), and deleted (for the tombstones).
const T_ZONES: i64 = T_END - HISTORY_MS - 7_200_000;
/// Stored epochs are numbered as if one closed every 200 ms since the zones were defined.
const EPOCH_MS: i64 = 200;
/// The grid of zones: its south-west corner and the size of one cell (about 1.1 km).
const LAT0: f64 = 52.40;
const LON0: f64 = 13.20;
const DLAT: f64 = 0.01;
const DLON: f64 = 0.0165;
/// Time between two fixes of one courier, ms.
const FIX_INTERVAL_MS: i64 = 2_000;
/// Events decoded and encoded again per kind by the check.
const CHECKED_PER_KIND: i64 = 2_000;

/// Hydration from PostgreSQL at scale.
#[derive(Debug, Parser)]
struct Args {
    /// Deliveries in the database.
    #[arg(long, default_value_t = 1_000_000)]
    deliveries: i64,
    /// Couriers in the database.
    #[arg(long, default_value_t = 100_000)]
    couriers: i64,
    /// Live zones.
    #[arg(long, default_value_t = 300)]
    zones: i64,
    /// Deleted zones (tombstones).
    #[arg(long, default_value_t = 10)]
    deleted_zones: i64,
    /// Customers the deliveries are spread over.
    #[arg(long, default_value_t = 200_000)]
    customers: i64,
    /// Fixes logged per courier (the last ones; hydration reads the last 5).
    #[arg(long, default_value_t = 10)]
    fixes_per_courier: i64,
    /// Timely workers of the restored dataflow.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// A database on the server where the benchmark database is created and dropped.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// Leave the filled database in place after a successful run (to look at query plans);
    /// its name is printed, and dropping it is then up to you.
    #[arg(long)]
    keep_database: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Warnings (sqlx's slow statements among them) to stderr; `RUST_LOG` selects more
    // (`RUST_LOG=sqlx::query=debug`: every statement with its duration).
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .init();
    ensure!(
        args.zones >= 1
            && args.couriers >= 1
            && args.deliveries >= 1
            && args.customers >= 1
            && args.fixes_per_courier >= 1,
        "every count must be at least 1"
    );
    println!("load average at start: {}", support::load_average());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let admin_options: PgConnectOptions = args
        .database_url
        .parse()
        .context("DATABASE_URL is not a PostgreSQL url")?;
    let admin = runtime.block_on(
        PgPoolOptions::new()
            .max_connections(1)
            .connect_with(admin_options.clone()),
    )?;
    let name = format!("dt_bench_{}", Uuid::new_v4().simple());
    runtime.block_on(
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&admin),
    )?;
    println!("database {name} created");

    let result = run(&runtime, &args, admin_options.database(&name));
    if result.is_ok() && args.keep_database {
        runtime.block_on(admin.close());
        println!("database {name} kept: DROP DATABASE {name} WITH (FORCE) when done");
        return Ok(());
    }

    let dropped = runtime.block_on(
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&admin),
    );
    runtime.block_on(admin.close());
    result?;
    dropped.with_context(|| format!("DROP DATABASE {name}"))?;
    println!("database {name} dropped");
    Ok(())
}

fn run(runtime: &Runtime, args: &Args, options: PgConnectOptions) -> anyhow::Result<()> {
    let pool = runtime.block_on(async {
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        migrate(&pool).await?;
        Ok::<_, anyhow::Error>(pool)
    })?;

    // The sample: what the real sink writes.
    let started = Instant::now();
    let sample = sample_outputs()?;
    let sample_shapes = runtime.block_on(async {
        let mut sink = PostgresSink::with_pool(pool.clone()).await?;
        for output in &sample {
            sink.commit(Arc::clone(output)).await?;
        }
        let shapes = stored_shapes(&pool, None).await?;
        sqlx::query(
            "TRUNCATE delivery_events, location_fixes, deliveries, ratings, etas, delivery_dropoff_zones,
                      zone_occupancy, geofence_transitions, metrics, couriers, zones, customers,
                      pipeline_progress",
        )
        .execute(&pool)
        .await?;
        Ok::<_, anyhow::Error>(shapes)
    })?;
    println!(
        "sample: {} epochs of the simulator through the dataflow and PostgresSink, {} event \
         shapes recorded, in {:.1} s",
        sample.len(),
        sample_shapes.len(),
        started.elapsed().as_secs_f64()
    );
    drop(sample);

    // The fill.
    let fill_started = Instant::now();
    let counts = runtime.block_on(async {
        let mut connection = pool.acquire().await?;
        fill(&mut connection, args).await
    })?;
    let fill_seconds = fill_started.elapsed().as_secs_f64();
    println!("fill: {fill_seconds:.1} s in all");
    println!("{counts}");

    // The fill's rows against the contract and the sample.
    let started = Instant::now();
    let checked = runtime.block_on(check_payloads(&pool, &sample_shapes))?;
    println!(
        "check: {checked} stored payloads decode and encode back to themselves and have the \
         sample's shapes ({:.1} s)",
        started.elapsed().as_secs_f64()
    );

    // Timed: the reading.
    let started = Instant::now();
    let cpu_before = cpu_seconds()?;
    let restores = runtime.block_on(load_restore(&pool, 5))?;
    let load_seconds = started.elapsed().as_secs_f64();
    let load_cpu = cpu_seconds()? - cpu_before;
    let hwm_after_load = peak_rss_kib()?;
    let kinds = RestoreCounts::of(&restores, 5);
    println!(
        "load_restore: {load_seconds:.2} s; {} records: {} zones ({} tombstones), {} couriers \
         (windows of 5: {}), {} deliveries ({} with a rating version, {} applied events); \
         this process used {load_cpu:.1} s of CPU meanwhile; peak RSS so far {} MiB",
        restores.len(),
        kinds.zones,
        kinds.tombstones,
        kinds.couriers,
        kinds.full_windows,
        kinds.deliveries,
        kinds.rated,
        kinds.applied,
        hwm_after_load / 1024
    );
    ensure!(
        kinds.deliveries == args.deliveries as usize,
        "restored {} deliveries, expected {}",
        kinds.deliveries,
        args.deliveries
    );
    ensure!(
        kinds.couriers == args.couriers as usize,
        "restored {} couriers, expected {}",
        kinds.couriers,
        args.couriers
    );
    ensure!(
        kinds.zones == (args.zones + args.deleted_zones) as usize
            && kinds.tombstones == args.deleted_zones as usize,
        "restored {} zones ({} tombstones)",
        kinds.zones,
        kinds.tombstones
    );
    ensure!(
        kinds.full_windows == kinds.couriers || args.fixes_per_courier < 5,
        "only {} of {} couriers have a full speed window",
        kinds.full_windows,
        kinds.couriers
    );
    ensure!(
        kinds.rated == counts.ratings as usize,
        "restored {} rating versions, {} ratings stored",
        kinds.rated,
        counts.ratings
    );
    ensure!(
        kinds.applied == (counts.status_events + counts.ratings) as usize,
        "restored {} applied events, {} status and rating events stored",
        kinds.applied,
        counts.status_events + counts.ratings
    );

    // Timed: the rebuilding.
    let cpu_before = cpu_seconds()?;
    let (restored, restore_seconds) = rebuild(restores, args.workers)?;
    let restore_cpu = cpu_seconds()? - cpu_before;
    let hwm_after_restore = peak_rss_kib()?;
    let changes = ChangeCounts::of(&restored);
    println!(
        "dataflow restore ({} workers): {restore_seconds:.2} s; restored epoch: {} changes \
         ({} deliveries, {} couriers, {} zones, {} ETAs, {} inside, {} dropoff zones, {} \
         metric scopes); {restore_cpu:.1} s of CPU; peak RSS {} MiB",
        args.workers,
        restored.changes.len(),
        changes.deliveries,
        changes.couriers,
        changes.zones,
        changes.etas,
        changes.inside,
        changes.dropoffs,
        changes.metrics,
        hwm_after_restore / 1024
    );
    ensure!(restored.restored, "the first epoch is not marked restored");
    let overall = changes
        .overall
        .context("the restored epoch has no overall tally")?;
    let expected = (
        args.deliveries,
        counts.active,
        counts.delivered,
        counts.failed,
        counts.cancelled,
        counts.ratings,
    );
    let got = (
        overall.deliveries,
        overall.active,
        overall.delivered,
        overall.failed,
        overall.cancelled,
        overall.rated,
    );
    ensure!(
        got == expected,
        "overall tally (deliveries, active, delivered, failed, cancelled, rated) {got:?}, \
         the tables say {expected:?}"
    );
    ensure!(
        changes.deliveries == args.deliveries as usize
            && changes.couriers == args.couriers as usize
            && changes.zones == args.zones as usize,
        "the restored epoch holds {} deliveries, {} couriers, {} zones",
        changes.deliveries,
        changes.couriers,
        changes.zones
    );
    println!(
        "verified: overall tally (deliveries, active, delivered, failed, cancelled, rated) = \
         {got:?}, as in the tables"
    );
    drop(restored);
    println!(
        "load average after the measurements: {}",
        support::load_average()
    );

    println!();
    println!("| step | wall s | CPU s of this process |");
    println!("|---|---|---|");
    println!("| fill (set-based SQL, indexes rebuilt, VACUUM ANALYZE) | {fill_seconds:.1} | |");
    println!("| `load_restore(&pool, 5)` | {load_seconds:.2} | {load_cpu:.1} |");
    println!(
        "| dataflow restore, {} workers (`EpochSender::restore` → restored epoch received) | \
         {restore_seconds:.2} | {restore_cpu:.1} |",
        args.workers
    );
    println!(
        "peak RSS (VmHWM): {} MiB after load_restore, {} MiB after the dataflow restore",
        hwm_after_load / 1024,
        hwm_after_restore / 1024
    );
    runtime.block_on(pool.close());
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The sample
// ---------------------------------------------------------------------------------------

/// 40 simulated minutes of a 40-courier city through the dataflow: deliveries are created,
/// delivered, failed, cancelled and rated.
fn sample_outputs() -> anyhow::Result<Vec<Arc<EpochOutput>>> {
    let config = SimulatorConfig {
        couriers: 40,
        seed: 3,
        deliveries_per_minute: 5.0,
        fix_interval_ms: 5_000,
        rating_rate: 0.9,
        fail_rate: 0.1,
        cancel_rate: 0.1,
        ..SimulatorConfig::default()
    };
    let mut simulator = FleetSimulator::new(config, T_END);
    let (mut input, mut output) = pipeline::start(DataflowConfig::default())?;
    let mut outputs = Vec::new();
    for epoch in 0..20 {
        let mut events = if epoch == 0 {
            simulator.initial_events()
        } else {
            Vec::new()
        };
        events.extend(simulator.step(120_000));
        input
            .send(events)
            .map_err(|_| anyhow::anyhow!("the dataflow closed"))?;
        let out = output.recv().context("the dataflow stopped")?;
        outputs.push(Arc::new(out));
    }
    input.close();
    Ok(outputs)
}

/// One feature of a stored event: a payload field with its JSON type (nested objects'
/// fields as `parent.field`), or which id columns are set.
type Shape = (String, String, String);

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn shapes_of(
    kind: &str,
    payload: &Value,
    ids: (bool, bool, bool),
    courier_in_payload: bool,
) -> Vec<Shape> {
    let mut shapes = Vec::new();
    if let Value::Object(fields) = payload {
        for (key, value) in fields {
            shapes.push((kind.to_owned(), key.clone(), json_type(value).to_owned()));
            if let Value::Object(inner) = value {
                for (inner_key, inner_value) in inner {
                    shapes.push((
                        kind.to_owned(),
                        format!("{key}.{inner_key}"),
                        json_type(inner_value).to_owned(),
                    ));
                }
            }
        }
    }
    shapes.push((
        kind.to_owned(),
        "(id columns: delivery, courier, zone; courier in payload)".to_owned(),
        format!("{:?} {courier_in_payload}", ids),
    ));
    shapes
}

/// The shapes of stored events: all of them, or `limit` per kind.
async fn stored_shapes(pool: &PgPool, limit: Option<i64>) -> anyhow::Result<BTreeSet<Shape>> {
    let rows = match limit {
        None => {
            sqlx::query(
                "SELECT kind, payload, delivery_id IS NOT NULL, courier_id IS NOT NULL,
                        zone_id IS NOT NULL FROM delivery_events",
            )
            .fetch_all(pool)
            .await?
        }
        Some(limit) => {
            sqlx::query(
                "SELECT e.kind, e.payload, e.delivery_id IS NOT NULL, e.courier_id IS NOT NULL,
                        e.zone_id IS NOT NULL
                 FROM unnest(ARRAY['delivery.created', 'status.changed', 'delivery.rated',
                                   'zone.upserted', 'zone.deleted']) k(kind),
                      LATERAL (SELECT * FROM delivery_events d WHERE d.kind = k.kind LIMIT $1) e",
            )
            .bind(limit)
            .fetch_all(pool)
            .await?
        }
    };
    let mut shapes = BTreeSet::new();
    for row in rows {
        let kind: String = row.try_get(0)?;
        let payload: Value = row.try_get(1)?;
        let ids = (row.try_get(2)?, row.try_get(3)?, row.try_get(4)?);
        let courier_in_payload = kind != "location.updated" && payload.get("courier_id").is_some();
        shapes.extend(shapes_of(&kind, &payload, ids, courier_in_payload));
    }
    Ok(shapes)
}

/// Decodes `CHECKED_PER_KIND` stored events of each kind, encodes them again and compares
/// with the stored JSON; compares their shapes with the sample's (for the kinds the sample
/// has: the simulator deletes no zones). Returns how many were checked.
async fn check_payloads(pool: &PgPool, sample: &BTreeSet<Shape>) -> anyhow::Result<usize> {
    let rows = sqlx::query(
        "SELECT e.kind, e.event_id, e.occurred_at, e.payload
         FROM unnest(ARRAY['delivery.created', 'status.changed', 'delivery.rated',
                           'zone.upserted', 'zone.deleted']) k(kind),
              LATERAL (SELECT * FROM delivery_events d WHERE d.kind = k.kind LIMIT $1) e",
    )
    .bind(CHECKED_PER_KIND)
    .fetch_all(pool)
    .await?;
    let mut kinds = BTreeMap::new();
    for row in &rows {
        let kind: String = row.try_get(0)?;
        let event_id: Uuid = row.try_get(1)?;
        let at: DateTime<Utc> = row.try_get(2)?;
        let payload: Value = row.try_get(3)?;
        let at = at.timestamp_millis();
        let event = decode_event(None, &payload, at, &ContractLimits::replay())
            .map_err(|error| anyhow::anyhow!("{kind} {event_id} does not decode: {error}"))?;
        ensure!(
            event.event_id.0 == event_id && event.occurred_at == at,
            "{kind} {event_id}: the columns differ from the payload"
        );
        ensure!(
            encode_event(&event) == payload,
            "{kind} {event_id}: encode(decode(payload)) != payload: {payload}"
        );
        *kinds.entry(kind).or_insert(0) += 1;
    }
    ensure!(
        kinds.len() == 5,
        "the fill lacks some event kinds: {kinds:?}"
    );
    let generated = stored_shapes(pool, Some(CHECKED_PER_KIND)).await?;
    let sampled_kinds: BTreeSet<&String> = sample.iter().map(|(kind, _, _)| kind).collect();
    let unknown: Vec<&Shape> = generated
        .iter()
        .filter(|shape| sampled_kinds.contains(&shape.0) && !sample.contains(*shape))
        .collect();
    ensure!(
        unknown.is_empty(),
        "shapes the sink never wrote in the sample: {unknown:?}"
    );
    Ok(rows.len())
}

// ---------------------------------------------------------------------------------------
// The fill
// ---------------------------------------------------------------------------------------

/// What the fill wrote.
#[derive(Debug, Default)]
struct Counts {
    deliveries: i64,
    active: i64,
    delivered: i64,
    failed: i64,
    cancelled: i64,
    ratings: i64,
    status_events: i64,
    events: i64,
    database_mib: i64,
    events_mib: i64,
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "filled: {} deliveries ({} active, {} delivered, {} failed, {} cancelled, {} rated), \
             {} rows in delivery_events ({} status.changed); database {} MiB, \
             delivery_events with its indexes {} MiB",
            self.deliveries,
            self.active,
            self.delivered,
            self.failed,
            self.cancelled,
            self.ratings,
            self.events,
            self.status_events,
            self.database_mib,
            self.events_mib
        )
    }
}

/// Runs one fill statement, printing how long it took; a helper table is analysed after
/// (autovacuum never analyses temporary tables, and the joins need its statistics).
async fn step(connection: &mut PgConnection, what: &str, sql: String) -> anyhow::Result<()> {
    let started = Instant::now();
    let done = sqlx::query(sqlx::AssertSqlSafe(sql))
        .execute(&mut *connection)
        .await
        .with_context(|| format!("fill: {what}"))?;
    if let Some(helper) = what.strip_suffix(" (helper)") {
        sqlx::query(sqlx::AssertSqlSafe(format!("ANALYZE {helper}")))
            .execute(&mut *connection)
            .await?;
    }
    println!(
        "  {what}: {} rows, {:.1} s",
        done.rows_affected(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The JSON of a GeoJSON Polygon, the square of a `bench_zone` row.
const ZONE_GEOMETRY: &str = "jsonb_build_object('type', 'Polygon', 'coordinates',
    jsonb_build_array(jsonb_build_array(
        jsonb_build_array(z.lon_min, z.lat_min), jsonb_build_array(z.lon_max, z.lat_min),
        jsonb_build_array(z.lon_max, z.lat_max), jsonb_build_array(z.lon_min, z.lat_max),
        jsonb_build_array(z.lon_min, z.lat_min))))";

async fn fill(connection: &mut PgConnection, args: &Args) -> anyhow::Result<Counts> {
    let zones = args.zones;
    let all_zones = args.zones + args.deleted_zones;
    let cols = (zones as f64).sqrt().ceil() as i64;
    let rows = (zones + cols - 1) / cols;
    let nc = args.couriers;
    let nd = args.deliveries;
    let ncu = args.customers;
    let fixes = args.fixes_per_courier;

    // Session settings for the bulk statements only (the measured reads use fresh
    // connections with the server's defaults), and helpers in pg_temp.
    for sql in [
        "SET work_mem = '256MB'".to_owned(),
        "SET maintenance_work_mem = '1GB'".to_owned(),
        "SELECT setseed(0.42)".to_owned(),
        "CREATE FUNCTION pg_temp.bench_at(ms bigint) RETURNS timestamptz
             LANGUAGE sql IMMUTABLE STRICT
             AS $$ SELECT timestamptz 'epoch' + ms * interval '1 millisecond' $$"
            .to_owned(),
        // As chrono's to_rfc3339_opts(AutoSi, true) writes a whole-millisecond time.
        "CREATE FUNCTION pg_temp.bench_ts(ms bigint) RETURNS text
             LANGUAGE sql IMMUTABLE STRICT
             AS $$ SELECT to_char((timestamptz 'epoch' + ms * interval '1 millisecond')
                                      AT TIME ZONE 'UTC',
                                  CASE WHEN ms % 1000 = 0 THEN 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'
                                       ELSE 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"' END) $$"
            .to_owned(),
        format!(
            "CREATE FUNCTION pg_temp.bench_epoch(ms bigint) RETURNS bigint
                 LANGUAGE sql IMMUTABLE STRICT
                 AS $$ SELECT greatest(0, (ms - {T_ZONES}) / {EPOCH_MS}) $$"
        ),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut *connection)
            .await?;
    }

    // Bulk load: the secondary indexes of the big tables are dropped and built again after
    // (the same definitions, read from the catalogue).
    let indexes: Vec<(String, String)> = sqlx::query_as(
        "SELECT indexname::text, indexdef FROM pg_indexes
         WHERE schemaname = 'public'
           AND tablename IN ('delivery_events', 'location_fixes', 'deliveries', 'ratings',
                             'couriers')
           AND indexname NOT LIKE '%_pkey'",
    )
    .fetch_all(&mut *connection)
    .await?;
    for (index, _) in &indexes {
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP INDEX {index}")))
            .execute(&mut *connection)
            .await?;
    }

    // Zones: a grid of squares (80 % of a cell each), every second one with a 30 s dwell;
    // the last `deleted_zones` were deleted an hour after they were defined.
    step(
        connection,
        "bench_zone (helper)",
        format!(
            "CREATE TEMP TABLE bench_zone AS
             SELECT z AS i, gen_random_uuid() AS id, gen_random_uuid() AS event_id,
                    gen_random_uuid() AS delete_event_id,
                    round(({LAT0} + (z / {cols}) * {DLAT} + 0.1 * {DLAT})::numeric, 7) AS lat_min,
                    round(({LAT0} + (z / {cols}) * {DLAT} + 0.9 * {DLAT})::numeric, 7) AS lat_max,
                    round(({LON0} + (z % {cols}) * {DLON} + 0.1 * {DLON})::numeric, 7) AS lon_min,
                    round(({LON0} + (z % {cols}) * {DLON} + 0.9 * {DLON})::numeric, 7) AS lon_max,
                    CASE WHEN z % 2 = 1 THEN 30000 ELSE 0 END AS dwell_ms,
                    z >= {zones} AS deleted
             FROM generate_series(0, {all_zones} - 1) z"
        ),
    )
    .await?;
    step(
        connection,
        "zones",
        format!(
            "INSERT INTO zones (id, name, geometry, dwell_ms, updated_at, event_id, updated_epoch)
             SELECT z.id, 'Zone ' || (z.i + 1), {ZONE_GEOMETRY}, z.dwell_ms,
                    pg_temp.bench_at({T_ZONES}), z.event_id, pg_temp.bench_epoch({T_ZONES})
             FROM bench_zone z WHERE NOT z.deleted"
        ),
    )
    .await?;
    step(
        connection,
        "delivery_events: zone.upserted, zone.deleted",
        format!(
            "INSERT INTO delivery_events
                 (event_id, kind, occurred_at, delivery_id, courier_id, zone_id, payload, stale,
                  epoch)
             SELECT z.event_id, 'zone.upserted', pg_temp.bench_at({T_ZONES}), NULL::uuid, NULL::uuid, z.id,
                    jsonb_build_object('v', 1, 'kind', 'zone.upserted',
                        'event_id', z.event_id::text, 'occurred_at', pg_temp.bench_ts({T_ZONES}),
                        'zone_id', z.id::text, 'name', 'Zone ' || (z.i + 1),
                        'geometry', {ZONE_GEOMETRY}, 'dwell_seconds', z.dwell_ms / 1000),
                    false, pg_temp.bench_epoch({T_ZONES})
             FROM bench_zone z
             UNION ALL
             SELECT z.delete_event_id, 'zone.deleted', pg_temp.bench_at({T_ZONES} + 3600000),
                    NULL::uuid, NULL::uuid, z.id,
                    jsonb_build_object('v', 1, 'kind', 'zone.deleted',
                        'event_id', z.delete_event_id::text,
                        'occurred_at', pg_temp.bench_ts({T_ZONES} + 3600000),
                        'zone_id', z.id::text),
                    false, pg_temp.bench_epoch({T_ZONES} + 3600000)
             FROM bench_zone z WHERE z.deleted"
        ),
    )
    .await?;

    step(
        connection,
        "bench_customer (helper)",
        format!(
            "CREATE TEMP TABLE bench_customer AS
             SELECT i, gen_random_uuid() AS id FROM generate_series(0, {ncu} - 1) i"
        ),
    )
    .await?;
    step(
        connection,
        "customers",
        "INSERT INTO customers (id) SELECT id FROM bench_customer".to_owned(),
    )
    .await?;

    // Couriers: a position in the grid, the last fix in the last 10 minutes, and presence
    // in the zone whose square holds the position (since up to 20 minutes before it).
    step(
        connection,
        "bench_courier (helper)",
        format!(
            "CREATE TEMP TABLE bench_courier AS
             SELECT b.*,
                    CASE WHEN b.zr >= 0 AND b.zc >= 0 AND b.zr < {rows} AND b.zc < {cols}
                              AND b.zr * {cols} + b.zc < {zones}
                              AND b.fr BETWEEN 0.1 AND 0.9 AND b.fc BETWEEN 0.1 AND 0.9
                         THEN b.zr * {cols} + b.zc END AS zone_i
             FROM (
                 SELECT a.*,
                        floor((a.lat - {LAT0}) / {DLAT})::int AS zr,
                        floor((a.lon - {LON0}) / {DLON})::int AS zc,
                        (a.lat - {LAT0}) / {DLAT} - floor((a.lat - {LAT0}) / {DLAT}) AS fr,
                        (a.lon - {LON0}) / {DLON} - floor((a.lon - {LON0}) / {DLON}) AS fc
                 FROM (
                     SELECT i, gen_random_uuid() AS id, gen_random_uuid() AS last_event_id,
                            round(({LAT0} + random() * {rows} * {DLAT})::numeric, 7) AS lat,
                            round(({LON0} + random() * {cols} * {DLON})::numeric, 7) AS lon,
                            CASE WHEN random() < 0.85
                                 THEN 500 + floor(random() * 11500)::bigint END AS speed_mm_s,
                            CASE WHEN random() < 0.9
                                 THEN floor(random() * 3600)::int END AS heading_ddeg,
                            CASE WHEN random() < 0.7
                                 THEN 300 + floor(random() * 900)::int END AS accuracy_cm,
                            {T_END} - floor(random() * 600000)::bigint AS last_at,
                            floor(random() * 150000000)::bigint AS odometer_mm,
                            1 + floor(random() * 200)::bigint AS active_hours,
                            floor(random() * 1200000)::bigint AS presence_age
                     FROM generate_series(0, {nc} - 1) i
                 ) a
             ) b"
        ),
    )
    .await?;
    step(
        connection,
        "couriers",
        "INSERT INTO couriers (id, current_lat, current_lon, last_fix_at, last_event_id,
                               speed_mm_s, heading_ddeg, odometer_mm, active_hours, presence,
                               updated_epoch)
         SELECT c.id, c.lat, c.lon, pg_temp.bench_at(c.last_at), c.last_event_id, c.speed_mm_s,
                c.heading_ddeg, c.odometer_mm, c.active_hours,
                CASE WHEN z.id IS NULL THEN '[]'::jsonb
                     ELSE jsonb_build_array(jsonb_build_array(z.id::text,
                                                              c.last_at - c.presence_age)) END,
                pg_temp.bench_epoch(c.last_at)
         FROM bench_courier c LEFT JOIN bench_zone z ON z.i = c.zone_i"
            .to_owned(),
    )
    .await?;
    // The fixes, oldest first: fix k before the last lies k intervals back along the
    // heading, at the courier's speed; the last one is the courier's row.
    step(
        connection,
        "location_fixes",
        format!(
            "INSERT INTO location_fixes
                 (courier_id, occurred_at, event_id, epoch, lat, lon, speed_mm_s, accuracy_cm,
                  heading_ddeg, stale)
             SELECT f.id, pg_temp.bench_at(f.at), f.e, pg_temp.bench_epoch(f.at), f.lat, f.lon,
                    f.speed_mm_s, f.accuracy_cm, f.heading_ddeg, false
             FROM (
                 SELECT CASE WHEN k = 0 THEN c.last_event_id ELSE gen_random_uuid() END AS e,
                        c.last_at - k * {FIX_INTERVAL_MS} AS at, c.id,
                        round((c.lat - k * coalesce(c.speed_mm_s, 0) * {FIX_INTERVAL_MS} / 1e6
                               * cos(radians(coalesce(c.heading_ddeg, 0) / 10.0)) / 111195.0
                              )::numeric, 7) AS lat,
                        round((c.lon - k * coalesce(c.speed_mm_s, 0) * {FIX_INTERVAL_MS} / 1e6
                               * sin(radians(coalesce(c.heading_ddeg, 0) / 10.0))
                               / (111195.0 * cos(radians(52.5))))::numeric, 7) AS lon,
                        c.speed_mm_s, c.heading_ddeg, c.accuracy_cm
                 FROM bench_courier c CROSS JOIN generate_series(0, {fixes} - 1) k
             ) f
             ORDER BY f.at"
        ),
    )
    .await?;

    // Deliveries: 1 % just created, 2 % in progress (created 20–30 minutes ago), the rest
    // ended over the 30 days: 2.5 % cancelled before and 2.5 % after assignment, 4 % failed,
    // 88 % delivered; 60 % of the delivered and failed ones rated.
    step(
        connection,
        "bench_delivery (helper)",
        format!(
            "CREATE TEMP TABLE bench_delivery AS
             WITH r AS (
                 SELECT i, gen_random_uuid() AS id, random() AS ro,
                        floor(random() * {ncu})::int AS cust_i,
                        floor(random() * {nc})::int AS courier_i,
                        random() AS r1, random() AS r2, random() AS r3, random() AS r4,
                        random() AS r5, random() AS r6, random() AS r7, random() AS rr,
                        random() AS rs, random() AS rc, random() AS plat, random() AS plon,
                        random() AS dang, random() AS ddist
                 FROM generate_series(0, {nd} - 1) i
             ), p AS (
                 SELECT r.*, CASE WHEN ro < 0.010 THEN 'created'
                                  WHEN ro < 0.017 THEN 'assigned'
                                  WHEN ro < 0.020 THEN 'picked_up'
                                  WHEN ro < 0.030 THEN 'in_transit'
                                  WHEN ro < 0.055 THEN 'cancelled_early'
                                  WHEN ro < 0.080 THEN 'cancelled_assigned'
                                  WHEN ro < 0.120 THEN 'failed'
                                  ELSE 'delivered' END AS path
                 FROM r
             ), c AS (
                 SELECT p.*, CASE
                     WHEN path = 'created' THEN {T_END} - floor(r1 * 300000)::bigint
                     WHEN path IN ('assigned', 'picked_up', 'in_transit')
                         THEN {T_END} - 1800000 + floor(r1 * 600000)::bigint
                     ELSE {T_END} - 7200000 - floor(r1 * {HISTORY_MS})::bigint
                     END AS created_at
                 FROM p
             ), a AS (
                 SELECT c.*, CASE WHEN path NOT IN ('created', 'cancelled_early')
                                  THEN created_at + 60000 + floor(r2 * 240000)::bigint
                             END AS assigned_at
                 FROM c
             ), b AS (
                 SELECT a.*, CASE WHEN path IN ('picked_up', 'in_transit', 'failed', 'delivered')
                                  THEN assigned_at + 180000 + floor(r3 * 420000)::bigint
                             END AS picked_up_at
                 FROM a
             ), t AS (
                 SELECT b.*, CASE WHEN path IN ('in_transit', 'failed', 'delivered')
                                  THEN picked_up_at + 30000 + floor(r4 * 90000)::bigint
                             END AS in_transit_at
                 FROM b
             ), e AS (
                 SELECT t.*, CASE
                     WHEN path IN ('failed', 'delivered')
                         THEN in_transit_at + 300000 + floor(r5 * 900000)::bigint
                     WHEN path = 'cancelled_early'
                         THEN created_at + 60000 + floor(r5 * 540000)::bigint
                     WHEN path = 'cancelled_assigned'
                         THEN assigned_at + 60000 + floor(r5 * 240000)::bigint
                     END AS ended_at,
                     path IN ('delivered', 'failed') AND rr < 0.6 AS rated
                 FROM t
             )
             SELECT e.i, e.id, cu.id AS customer_id,
                    CASE WHEN e.assigned_at IS NOT NULL THEN co.id END AS courier_id,
                    CASE WHEN e.path LIKE 'cancelled%' THEN 'cancelled' ELSE e.path END AS status,
                    e.created_at, e.assigned_at, e.picked_up_at, e.in_transit_at, e.ended_at,
                    CASE WHEN e.r7 < 0.7
                         THEN e.created_at + 1800000 + floor(e.r6 * 1800000)::bigint
                    END AS promised_by,
                    round(({LAT0} + e.plat * {rows} * {DLAT})::numeric, 7) AS pickup_lat,
                    round(({LON0} + e.plon * {cols} * {DLON})::numeric, 7) AS pickup_lon,
                    round(({LAT0} + e.plat * {rows} * {DLAT}
                           + e.ddist * 3000 * cos(e.dang * 2 * pi()) / 111195.0)::numeric, 7)
                        AS dropoff_lat,
                    round(({LON0} + e.plon * {cols} * {DLON}
                           + e.ddist * 3000 * sin(e.dang * 2 * pi())
                             / (111195.0 * cos(radians(52.5))))::numeric, 7) AS dropoff_lon,
                    CASE WHEN e.rated
                         THEN e.ended_at + 300000 + floor(e.r6 * 3300000)::bigint END AS rated_at,
                    CASE WHEN NOT e.rated THEN NULL
                         WHEN e.path = 'delivered' THEN CASE WHEN e.rs < 0.55 THEN 5
                                                             WHEN e.rs < 0.85 THEN 4
                                                             WHEN e.rs < 0.95 THEN 3
                                                             WHEN e.rs < 0.98 THEN 2 ELSE 1 END
                         ELSE CASE WHEN e.rs < 0.5 THEN 1 WHEN e.rs < 0.8 THEN 2
                                   WHEN e.rs < 0.95 THEN 3 ELSE 4 END
                    END::smallint AS score,
                    CASE WHEN e.rated AND e.rc < 0.25
                         THEN (ARRAY['Quick and friendly.', 'Left at the door as asked.',
                                     'Nobody rang the bell.', 'Much later than promised.'])
                              [1 + floor(e.rc * 16)::int]
                    END AS comment,
                    1 + CASE e.path WHEN 'created' THEN 0 WHEN 'assigned' THEN 1
                                    WHEN 'picked_up' THEN 2 WHEN 'in_transit' THEN 3
                                    WHEN 'cancelled_early' THEN 1
                                    WHEN 'cancelled_assigned' THEN 2 ELSE 4 END
                      + CASE WHEN e.rated THEN 1 ELSE 0 END AS version
             FROM e JOIN bench_customer cu ON cu.i = e.cust_i
                    JOIN bench_courier co ON co.i = e.courier_i"
        ),
    )
    .await?;
    step(
        connection,
        "deliveries",
        "INSERT INTO deliveries (id, customer_id, courier_id, status, pickup_lat, pickup_lon,
                                 dropoff_lat, dropoff_lon, promised_by, created_at, assigned_at,
                                 picked_up_at, ended_at, rating, version, updated_epoch)
         SELECT d.id, d.customer_id, d.courier_id, d.status, d.pickup_lat, d.pickup_lon,
                d.dropoff_lat, d.dropoff_lon, pg_temp.bench_at(d.promised_by),
                pg_temp.bench_at(d.created_at), pg_temp.bench_at(d.assigned_at),
                pg_temp.bench_at(d.picked_up_at), pg_temp.bench_at(d.ended_at), d.score,
                d.version,
                pg_temp.bench_epoch(greatest(d.created_at, d.ended_at, d.rated_at))
         FROM bench_delivery d ORDER BY d.created_at"
            .to_owned(),
    )
    .await?;
    step(
        connection,
        "ratings",
        "INSERT INTO ratings (delivery_id, customer_id, courier_id, score, comment, rated_at)
         SELECT d.id, d.customer_id, d.courier_id, d.score, d.comment,
                pg_temp.bench_at(d.rated_at)
         FROM bench_delivery d WHERE d.rated_at IS NOT NULL ORDER BY d.rated_at"
            .to_owned(),
    )
    .await?;
    // Every delivery's events, in time order as the log would hold them.
    step(
        connection,
        "delivery_events: delivery.created, status.changed, delivery.rated",
        "INSERT INTO delivery_events
             (event_id, kind, occurred_at, delivery_id, courier_id, zone_id, payload, stale,
              epoch)
         SELECT s.e, s.kind, pg_temp.bench_at(s.at), s.id, s.courier, NULL::uuid,
                CASE s.kind
                WHEN 'delivery.created' THEN jsonb_strip_nulls(jsonb_build_object(
                    'v', 1, 'kind', s.kind, 'event_id', s.e::text,
                    'occurred_at', pg_temp.bench_ts(s.at), 'delivery_id', s.id::text,
                    'customer_id', s.customer_id::text,
                    'pickup', jsonb_build_object('lat', s.pickup_lat, 'lon', s.pickup_lon),
                    'dropoff', jsonb_build_object('lat', s.dropoff_lat, 'lon', s.dropoff_lon),
                    'promised_by', pg_temp.bench_ts(s.promised_by)))
                WHEN 'status.changed' THEN jsonb_strip_nulls(jsonb_build_object(
                    'v', 1, 'kind', s.kind, 'event_id', s.e::text,
                    'occurred_at', pg_temp.bench_ts(s.at), 'delivery_id', s.id::text,
                    'status', s.status, 'courier_id', s.courier::text))
                ELSE jsonb_strip_nulls(jsonb_build_object(
                    'v', 1, 'kind', s.kind, 'event_id', s.e::text,
                    'occurred_at', pg_temp.bench_ts(s.at), 'delivery_id', s.id::text,
                    'score', s.score, 'comment', s.comment))
                END,
                false, pg_temp.bench_epoch(s.at)
         FROM (
             SELECT gen_random_uuid() AS e, d.id, d.customer_id, d.pickup_lat, d.pickup_lon,
                    d.dropoff_lat, d.dropoff_lon, d.promised_by, d.score, d.comment, x.*
             FROM bench_delivery d CROSS JOIN LATERAL (VALUES
                 ('delivery.created', d.created_at, NULL::text, NULL::uuid),
                 ('status.changed', d.assigned_at, 'assigned', d.courier_id),
                 ('status.changed', d.picked_up_at, 'picked_up', NULL),
                 ('status.changed', d.in_transit_at, 'in_transit', NULL),
                 ('status.changed', d.ended_at, d.status, NULL),
                 ('delivery.rated', d.rated_at, NULL, NULL)
             ) x(kind, at, status, courier)
             WHERE x.at IS NOT NULL
         ) s
         ORDER BY s.at"
            .to_owned(),
    )
    .await?;
    step(
        connection,
        "pipeline_progress",
        "INSERT INTO pipeline_progress (pipeline, epoch)
         SELECT 'delivertrack', max(epoch) FROM delivery_events"
            .to_owned(),
    )
    .await?;

    for (index, definition) in &indexes {
        step(connection, &format!("index {index}"), definition.clone()).await?;
    }
    for table in [
        "bench_delivery",
        "bench_courier",
        "bench_customer",
        "bench_zone",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {table}")))
            .execute(&mut *connection)
            .await?;
    }
    step(connection, "VACUUM ANALYZE", "VACUUM ANALYZE".to_owned()).await?;
    step(connection, "CHECKPOINT", "CHECKPOINT".to_owned()).await?;

    let by_status: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM deliveries GROUP BY status")
            .fetch_all(&mut *connection)
            .await?;
    let mut counts = Counts::default();
    for (status, n) in by_status {
        counts.deliveries += n;
        match status.as_str() {
            "assigned" | "picked_up" | "in_transit" => counts.active += n,
            "delivered" => counts.delivered = n,
            "failed" => counts.failed = n,
            "cancelled" => counts.cancelled = n,
            _ => {}
        }
    }
    counts.ratings = sqlx::query_scalar("SELECT count(*) FROM ratings")
        .fetch_one(&mut *connection)
        .await?;
    (counts.events, counts.status_events) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE kind = 'status.changed') FROM delivery_events",
    )
    .fetch_one(&mut *connection)
    .await?;
    (counts.database_mib, counts.events_mib) = sqlx::query_as(
        "SELECT pg_database_size(current_database()) / 1048576,
                pg_total_relation_size('delivery_events') / 1048576",
    )
    .fetch_one(&mut *connection)
    .await?;
    Ok(counts)
}

// ---------------------------------------------------------------------------------------
// Hydration
// ---------------------------------------------------------------------------------------

/// The restored records by kind.
#[derive(Debug, Default)]
struct RestoreCounts {
    zones: usize,
    tombstones: usize,
    couriers: usize,
    full_windows: usize,
    deliveries: usize,
    rated: usize,
    applied: usize,
}

impl RestoreCounts {
    fn of(restores: &[Restore], window: usize) -> Self {
        let mut counts = Self::default();
        for restore in restores {
            match restore {
                Restore::Zone { state, .. } => {
                    counts.zones += 1;
                    counts.tombstones += usize::from(state.is_none());
                }
                Restore::Courier { window: fixes, .. } => {
                    counts.couriers += 1;
                    counts.full_windows += usize::from(fixes.len() == window);
                }
                Restore::Delivery {
                    applied, rating, ..
                } => {
                    counts.deliveries += 1;
                    counts.rated += usize::from(rating.is_some());
                    counts.applied += applied.len();
                }
            }
        }
        counts
    }
}

/// Submits the records to a fresh dataflow as its first epoch and waits for that epoch's
/// output; returns it with the seconds from submitting to receiving.
fn rebuild(restores: Vec<Restore>, workers: usize) -> anyhow::Result<(EpochOutput, f64)> {
    let (mut input, mut output) = pipeline::start(DataflowConfig {
        workers,
        ..DataflowConfig::default()
    })?;
    let started = Instant::now();
    input
        .restore(restores)
        .map_err(|_| anyhow::anyhow!("the dataflow closed"))?;
    let restored = output.recv();
    let seconds = started.elapsed().as_secs_f64();
    input.close();
    while output.recv().is_some() {}
    if let Some(Err(failure)) = output.outcome() {
        bail!("the dataflow failed: {failure}");
    }
    let restored = restored.context("the dataflow output nothing")?;
    Ok((restored, seconds))
}

/// The restored epoch's changes by collection, and the overall tally.
#[derive(Debug, Default)]
struct ChangeCounts {
    couriers: usize,
    zones: usize,
    deliveries: usize,
    etas: usize,
    inside: usize,
    dropoffs: usize,
    metrics: usize,
    overall: Option<Tally>,
}

impl ChangeCounts {
    fn of(output: &EpochOutput) -> Self {
        let mut counts = Self::default();
        for (change, diff) in &output.changes {
            if *diff <= 0 {
                continue;
            }
            match change {
                Change::Courier(..) => counts.couriers += 1,
                Change::Zone(..) => counts.zones += 1,
                Change::Delivery(..) => counts.deliveries += 1,
                Change::Eta(..) => counts.etas += 1,
                Change::Inside(..) => counts.inside += 1,
                Change::DropoffZone(..) => counts.dropoffs += 1,
                Change::Metric(scope, tally) => {
                    counts.metrics += 1;
                    if *scope == Scope::Overall {
                        counts.overall = Some(*tally);
                    }
                }
            }
        }
        counts
    }
}

/// CPU time of this process so far (all threads, user and system), seconds: `utime` and
/// `stime` of `/proc/self/stat`, in clock ticks of 1/100 s (Linux's `USER_HZ`).
fn cpu_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |index: usize| -> anyhow::Result<f64> {
        let value: u64 = fields
            .get(index)
            .context("/proc/self/stat is shorter than expected")?
            .parse()?;
        Ok(value as f64 / 100.0)
    };
    // After the command name: state is field 3, utime field 14, stime field 15.
    Ok(ticks(11)? + ticks(12)?)
}

/// The process's peak resident set size (`VmHWM`), KiB.
fn peak_rss_kib() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/self/status")
}
