//! Geofence checks: the dataflow's zone index against PostGIS, on the same data.
//!
//! The data is the `spatial` criterion bench's ([`SpatialWorld::bench`]): 20 000 irregular
//! polygon zones over 40 km × 40 km and 100 000 couriers, each moved once. Both sides
//! answer "which zones hold this new position" for every move:
//!
//! - **in process** ([`index_throughput`]), on one thread: the dataflow's spatial join
//!   per position update — [`PointIndex::set`] (the courier moves in the point index; its
//!   R-tree catches up lazily at the next box query, one per 10 000 updates as in the
//!   bench) and [`ZoneIndex::containing`] (bounding-box candidates from the R-tree, then
//!   the exact polygon test). Also the lookup alone.
//! - **PostGIS** ([`postgis_throughput`]): a fresh database with `CREATE EXTENSION
//!   postgis`, the zones as `geometry(Polygon, 4326)` with a GiST index, and the points
//!   joined with `ST_Contains` in batches of 10 000 (`unnest` of two arrays), one backend,
//!   parallel query off (`max_parallel_workers_per_gather = 0`) so the figure is per core
//!   like the other. The database is dropped afterwards.
//!
//! Both count the `(point, zone)` pairs they find, and the report shows both counts: the
//! comparison is only fair if they agree. (A point exactly on a boundary is inside for
//! `geo`, outside for `ST_Contains`; random points hit a boundary with probability 0.)

use std::hint::black_box;
use std::time::{Duration, Instant};

use delivertrack_dataflow::CourierId;
use delivertrack_dataflow::spatial::{PointIndex, ZoneIndex};
use serde::Serialize;
use sqlx::Connection;
use sqlx::postgres::PgConnection;

use crate::world::SpatialWorld;

/// The in-process figures.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct IndexFigures {
    /// Position updates (point-index move + zone lookup) per second, one thread.
    pub updates_per_s: f64,
    /// Zone lookups alone per second, one thread.
    pub lookups_per_s: f64,
    /// `(point, zone)` pairs found.
    pub pairs: u64,
}

/// The whole comparison.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct GeofenceBaseline {
    /// Zones.
    pub zones: usize,
    /// Points tested (one per move).
    pub points: usize,
    /// The dataflow's index.
    pub index: IndexFigures,
    /// PostGIS points per second (one backend).
    pub postgis_points_per_s: Option<f64>,
    /// PostGIS pairs found.
    pub postgis_pairs: Option<u64>,
    /// Why PostGIS was not measured, if it was not.
    pub postgis_error: Option<String>,
    /// Index updates/s ÷ PostGIS points/s.
    pub ratio: Option<f64>,
}

/// Why PostGIS could not be measured.
#[derive(Debug, thiserror::Error)]
pub enum GeofenceError {
    /// PostgreSQL refused something.
    #[error("PostgreSQL: {0}")]
    Database(#[from] sqlx::Error),
    /// The extension is missing.
    #[error(
        "PostGIS is not installed on this PostgreSQL ({0}); scripts/bench.sh installs \
         Debian's postgresql-15-postgis-3"
    )]
    NoPostgis(String),
}

/// Runs the in-process side on this thread: every move of `world`, `rounds` times
/// (alternating there and back, so every update really moves its courier).
pub fn index_throughput(world: &SpatialWorld, rounds: usize) -> IndexFigures {
    let zones = ZoneIndex::bulk_load(world.zones.iter().cloned());
    let mut points: PointIndex<CourierId> = PointIndex::new();
    for &(id, p) in &world.couriers {
        points.set(id, p);
    }
    // Warm the R-tree once, as a running pipeline's would be.
    black_box(points.within([0.0, 0.0], [0.0, 0.0]));
    let rounds = rounds.max(1);
    let mut pairs = 0u64;
    let mut since_query = 0usize;
    let started = Instant::now();
    for round in 0..rounds {
        for &(i, to) in &world.moves {
            let (id, from) = world.couriers[i];
            let p = if round % 2 == 0 { to } else { from };
            points.set(id, p);
            since_query += 1;
            if since_query == 10_000 {
                since_query = 0;
                black_box(points.within(p.to_rtree(), p.to_rtree()));
            }
            let found = zones.containing(p).count() as u64;
            if round == 0 {
                pairs += found;
            }
        }
    }
    let updates = (rounds * world.moves.len()) as f64 / started.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut found = 0usize;
    for _ in 0..rounds {
        for &(_, to) in &world.moves {
            found += zones.containing(to).count();
        }
    }
    black_box(found);
    let lookups = (rounds * world.moves.len()) as f64 / started.elapsed().as_secs_f64();
    IndexFigures {
        updates_per_s: updates,
        lookups_per_s: lookups,
        pairs,
    }
}

/// Runs the PostGIS side: `(points per second, pairs found)`.
///
/// `admin_url` is a database of the server in which the harness may `CREATE DATABASE`.
///
/// # Errors
/// [`GeofenceError`] when PostgreSQL or PostGIS cannot be used.
pub async fn postgis_throughput(
    admin_url: &str,
    world: &SpatialWorld,
) -> Result<(f64, u64), GeofenceError> {
    let database = format!("dt_loadtest_postgis_{}", uuid::Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(admin_url).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {database}")))
        .execute(&mut admin)
        .await?;
    let url = match admin_url.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{database}"),
        None => format!("{admin_url}/{database}"),
    };
    let result = measure(&url, world).await;
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {database} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await;
    let _ = admin.close().await;
    result
}

async fn measure(url: &str, world: &SpatialWorld) -> Result<(f64, u64), GeofenceError> {
    let mut db = PgConnection::connect(url).await?;
    if let Err(error) = sqlx::query("CREATE EXTENSION postgis")
        .execute(&mut db)
        .await
    {
        return Err(GeofenceError::NoPostgis(error.to_string()));
    }
    sqlx::query("CREATE TABLE zones (id int PRIMARY KEY, geom geometry(Polygon, 4326) NOT NULL)")
        .execute(&mut db)
        .await?;
    for (offset, chunk) in world.zones.chunks(2_000).enumerate() {
        let ids: Vec<i32> = (0..chunk.len())
            .map(|i| i32::try_from(offset * 2_000 + i).unwrap_or(i32::MAX))
            .collect();
        let wkt: Vec<String> = chunk
            .iter()
            .map(|(_, shape)| {
                let ring: Vec<String> = shape
                    .0
                    .0
                    .first()
                    .map(|polygon| {
                        polygon
                            .exterior()
                            .0
                            .iter()
                            .map(|c| format!("{} {}", c.x, c.y))
                            .collect()
                    })
                    .unwrap_or_default();
                format!("POLYGON(({}))", ring.join(","))
            })
            .collect();
        sqlx::query(
            "INSERT INTO zones (id, geom) \
             SELECT i, ST_GeomFromText(w, 4326) FROM unnest($1::int[], $2::text[]) AS t(i, w)",
        )
        .bind(&ids)
        .bind(&wkt)
        .execute(&mut db)
        .await?;
    }
    sqlx::query("CREATE INDEX zones_geom ON zones USING gist (geom)")
        .execute(&mut db)
        .await?;
    sqlx::query("ANALYZE zones").execute(&mut db).await?;
    sqlx::query("SET max_parallel_workers_per_gather = 0")
        .execute(&mut db)
        .await?;
    let points: Vec<(f64, f64)> = world
        .moves
        .iter()
        .map(|(_, p)| (p.lon(), p.lat()))
        .collect();
    let statement = "SELECT count(*) FROM unnest($1::float8[], $2::float8[]) AS p(lon, lat) \
                     JOIN zones z ON ST_Contains(z.geom, ST_SetSRID(ST_MakePoint(p.lon, p.lat), 4326))";
    // One warm-up batch (plans, caches), not timed.
    if let Some(first) = points.chunks(1_000).next() {
        let (lon, lat): (Vec<f64>, Vec<f64>) = first.iter().copied().unzip();
        let _: i64 = sqlx::query_scalar(statement)
            .bind(&lon)
            .bind(&lat)
            .fetch_one(&mut db)
            .await?;
    }
    let mut pairs = 0i64;
    let mut spent = Duration::ZERO;
    for chunk in points.chunks(10_000) {
        let (lon, lat): (Vec<f64>, Vec<f64>) = chunk.iter().copied().unzip();
        let started = Instant::now();
        let found: i64 = sqlx::query_scalar(statement)
            .bind(&lon)
            .bind(&lat)
            .fetch_one(&mut db)
            .await?;
        spent += started.elapsed();
        pairs += found;
    }
    let _ = db.close().await;
    Ok((
        points.len() as f64 / spent.as_secs_f64().max(1e-9),
        u64::try_from(pairs).unwrap_or(0),
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::world::BENCH_SEED;

    #[test]
    fn the_index_finds_what_a_scan_of_every_zone_finds() {
        let world = SpatialWorld::bench(BENCH_SEED, 1_000, 1_000);
        let figures = index_throughput(&world, 1);
        let scanned: u64 = world
            .moves
            .iter()
            .map(|(_, p)| world.zones.iter().filter(|(_, z)| z.contains(*p)).count() as u64)
            .sum();
        assert_eq!(figures.pairs, scanned);
        assert!(figures.pairs > 0);
        assert!(figures.updates_per_s > 0.0 && figures.lookups_per_s > 0.0);
    }
}
