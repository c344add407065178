//! Spatial-join throughput: the R-tree indexes of `spatial.rs` against a brute-force scan.
//!
//! The world: 100k couriers spread uniformly over a 40 km × 40 km city around Berlin
//! (52.52 N, 13.405 E) and 20k irregular polygon zones (6–12 vertices, 100 m – 1.5 km
//! across), generated from a fixed seed, so every run measures the same data.
//!
//! Two questions, each answered by the index and by a brute-force scan in the same run:
//!
//! - `position_update`: a courier moves; put it at its new position and find the zones
//!   that contain it. Indexed: [`PointIndex::set`] + [`ZoneIndex::containing`]. Brute force:
//!   store the position and test every zone's exact `contains`. `indexed_lookup_only`
//!   is the zone lookup alone, without moving the courier in the point index.
//! - `zone_edit`: a zone's polygon is replaced; find which couriers are inside the new
//!   shape among those that could have changed. Indexed: [`ZoneIndex::upsert`], then
//!   [`PointIndex::candidates_for`] the old and the new shape (union) and the exact test on
//!   those. Brute force: replace the shape and test all 100k couriers.
//!
//! Run with `cargo bench -p delivertrack-dataflow --bench spatial`. Before measuring, it
//! prints the shape of the data: how many zones a point hits and how many candidates a
//! zone edit re-tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::f64::consts::TAU;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, SamplingMode, Throughput};
use delivertrack_dataflow::geometry::{GeoPoint, ZoneShape};
use delivertrack_dataflow::spatial::{PointIndex, ZoneIndex};
use delivertrack_dataflow::{CourierId, ZoneId};
use geo::{LineString, MultiPolygon, Polygon};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

const SEED: u64 = 0x0DE1_1E7E_5EED;
const COURIERS: usize = 100_000;
const ZONES: usize = 20_000;
const CENTRE_LAT: f64 = 52.52;
const CENTRE_LON: f64 = 13.405;
/// Side of the square city, in metres.
const CITY_SIDE_M: f64 = 40_000.0;
/// Zone diameters (across), in metres.
const ZONE_ACROSS_M: (f64, f64) = (100.0, 1_500.0);
/// How far a courier moves between two fixes, at most, in metres.
const STEP_M: f64 = 60.0;
/// Position updates per measured iteration of the indexed and brute-force benchmarks.
const UPDATES_INDEXED: usize = 10_000;
const UPDATES_BRUTE: usize = 50;
/// Distinct zones edited (each flips between two shapes).
const EDITED_ZONES: usize = 1_000;
/// How far an edit moves a zone's vertices, at most, in metres.
const EDIT_SHIFT_M: f64 = 150.0;

const METRES_PER_DEG_LAT: f64 = 111_320.0;

fn metres_per_deg_lon() -> f64 {
    METRES_PER_DEG_LAT * CENTRE_LAT.to_radians().cos()
}

/// A point `(north, east)` metres from the city centre.
fn offset(north_m: f64, east_m: f64) -> GeoPoint {
    GeoPoint::from_degrees(
        CENTRE_LAT + north_m / METRES_PER_DEG_LAT,
        CENTRE_LON + east_m / metres_per_deg_lon(),
    )
}

fn random_in_city(rng: &mut SmallRng) -> GeoPoint {
    let half = CITY_SIDE_M / 2.0;
    offset(rng.random_range(-half..half), rng.random_range(-half..half))
}

/// A point moved by up to [`STEP_M`] in a random direction, kept inside the city.
fn step(rng: &mut SmallRng, from: GeoPoint) -> GeoPoint {
    let half = CITY_SIDE_M / 2.0;
    let north = (from.lat() - CENTRE_LAT) * METRES_PER_DEG_LAT;
    let east = (from.lon() - CENTRE_LON) * metres_per_deg_lon();
    let angle = rng.random_range(0.0..TAU);
    let dist = rng.random_range(1.0..STEP_M);
    offset(
        (north + dist * angle.sin()).clamp(-half, half),
        (east + dist * angle.cos()).clamp(-half, half),
    )
}

/// An irregular star-shaped (hence simple) polygon of 6–12 vertices around `(north, east)`.
fn random_zone(rng: &mut SmallRng, north: f64, east: f64) -> ZoneShape {
    let radius = rng.random_range(ZONE_ACROSS_M.0..ZONE_ACROSS_M.1) / 2.0;
    let vertices = rng.random_range(6..=12);
    let mut angles: Vec<f64> = (0..vertices).map(|_| rng.random_range(0.0..TAU)).collect();
    angles.sort_by(f64::total_cmp);
    let mut ring: Vec<(f64, f64)> = angles
        .iter()
        .map(|angle| {
            let r = radius * rng.random_range(0.55..1.0);
            let p = offset(north + r * angle.sin(), east + r * angle.cos());
            (p.lon(), p.lat())
        })
        .collect();
    ring.push(ring[0]);
    ZoneShape(MultiPolygon(vec![Polygon::new(
        LineString::from(ring),
        vec![],
    )]))
}

/// The same zone, every vertex shifted by one random offset of up to [`EDIT_SHIFT_M`].
fn shifted(rng: &mut SmallRng, shape: &ZoneShape) -> ZoneShape {
    let north = rng.random_range(-EDIT_SHIFT_M..EDIT_SHIFT_M) / METRES_PER_DEG_LAT;
    let east = rng.random_range(-EDIT_SHIFT_M..EDIT_SHIFT_M) / metres_per_deg_lon();
    let mut moved = shape.clone();
    for polygon in &mut moved.0.0 {
        polygon.exterior_mut(|ring| {
            for c in &mut ring.0 {
                c.x += east;
                c.y += north;
            }
        });
    }
    moved
}

/// The generated city. Every benchmark builds its own indexes from it.
struct World {
    couriers: Vec<(CourierId, GeoPoint)>,
    zones: Vec<(ZoneId, ZoneShape)>,
    /// One move per courier, in a random order: `(courier index, from, to)`.
    moves: Vec<(usize, GeoPoint, GeoPoint)>,
    /// `(zone index, shape A, shape B)`: an edit flips a zone from one to the other.
    edits: Vec<(usize, ZoneShape, ZoneShape)>,
}

impl World {
    fn generate(seed: u64) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        let couriers: Vec<_> = (0..COURIERS)
            .map(|i| {
                (
                    CourierId(Uuid::from_u128(i as u128 + 1)),
                    random_in_city(&mut rng),
                )
            })
            .collect();
        let half = CITY_SIDE_M / 2.0;
        let zones: Vec<_> = (0..ZONES)
            .map(|i| {
                let (north, east) = (rng.random_range(-half..half), rng.random_range(-half..half));
                (
                    ZoneId(Uuid::from_u128(i as u128 + 1)),
                    random_zone(&mut rng, north, east),
                )
            })
            .collect();
        let mut order: Vec<usize> = (0..COURIERS).collect();
        shuffle(&mut rng, &mut order);
        let moves = order
            .into_iter()
            .map(|i| {
                let from = couriers[i].1;
                (i, from, step(&mut rng, from))
            })
            .collect();
        let mut edited: Vec<usize> = (0..ZONES).collect();
        shuffle(&mut rng, &mut edited);
        let edits = edited
            .into_iter()
            .take(EDITED_ZONES)
            .map(|z| {
                let a = zones[z].1.clone();
                let b = shifted(&mut rng, &a);
                (z, a, b)
            })
            .collect();
        Self {
            couriers,
            zones,
            moves,
            edits,
        }
    }

    fn zone_index(&self) -> ZoneIndex {
        ZoneIndex::bulk_load(self.zones.iter().cloned())
    }

    fn point_index(&self) -> PointIndex<CourierId> {
        let mut points = PointIndex::new();
        for &(id, p) in &self.couriers {
            points.set(id, p);
        }
        points
    }

    /// Prints what the benchmarks work on, measured on the data itself.
    fn describe(&self, zones: &ZoneIndex, points: &mut PointIndex<CourierId>) {
        let sample = &self.couriers[..10_000];
        let bounds: Vec<_> = self
            .zones
            .iter()
            .map(|(_, shape)| shape.bounds().unwrap())
            .collect();
        let mut boxes = 0usize;
        let mut hits = 0usize;
        for &(_, p) in sample {
            let [x, y] = p.to_rtree();
            boxes += bounds
                .iter()
                .filter(|(lo, hi)| lo[0] <= x && x <= hi[0] && lo[1] <= y && y <= hi[1])
                .count();
            hits += zones.containing(p).count();
        }
        let mut candidates: Vec<usize> = self
            .edits
            .iter()
            .map(|(_, a, b)| {
                let mut c = points.candidates_for(a);
                c.extend(points.candidates_for(b));
                c.sort_unstable();
                c.dedup();
                c.len()
            })
            .collect();
        candidates.sort_unstable();
        let n = sample.len() as f64;
        println!(
            "spatial bench world: {COURIERS} couriers, {ZONES} zones over {} km x {} km around \
             {CENTRE_LAT} N {CENTRE_LON} E (seed {SEED:#x})",
            CITY_SIDE_M / 1000.0,
            CITY_SIDE_M / 1000.0,
        );
        println!(
            "  a point lies in {:.2} zone bounding boxes and {:.2} zones on average ({} points)",
            boxes as f64 / n,
            hits as f64 / n,
            sample.len(),
        );
        println!(
            "  a zone edit re-tests {} candidate couriers (median; min {}, max {}, {} edits)",
            candidates[candidates.len() / 2],
            candidates[0],
            candidates[candidates.len() - 1],
            candidates.len(),
        );
    }
}

/// Fisher–Yates with the bench's own rng, so the order depends only on the seed.
fn shuffle<T>(rng: &mut SmallRng, items: &mut [T]) {
    for i in (1..items.len()).rev() {
        items.swap(i, rng.random_range(0..=i));
    }
}

/// Runs `iters` batches of `batch` moves, alternating forward and back so that every `set`
/// really moves its courier. Returns the time spent.
fn run_moves(
    world: &World,
    iters: u64,
    batch: usize,
    cursor: &mut usize,
    mut apply: impl FnMut(usize, GeoPoint) -> usize,
) -> Duration {
    let total = world.moves.len();
    let mut found = 0usize;
    let start = Instant::now();
    for _ in 0..iters {
        for _ in 0..batch {
            // Pass k over the move list goes forward when k is even, back when it is odd.
            let pass = *cursor / total;
            let (i, from, to) = world.moves[*cursor % total];
            let target = if pass.is_multiple_of(2) { to } else { from };
            found += apply(i, target);
            *cursor += 1;
        }
    }
    let elapsed = start.elapsed();
    black_box(found);
    elapsed
}

fn position_updates(c: &mut Criterion, world: &World) {
    let mut group = c.benchmark_group("position_update");
    // One iteration is a whole batch of updates: the same count in every sample.
    group.sampling_mode(SamplingMode::Flat);
    group.measurement_time(Duration::from_secs(8));

    let zones = world.zone_index();
    let mut points = world.point_index();
    let mut cursor = 0usize;
    group.throughput(Throughput::Elements(UPDATES_INDEXED as u64));
    // The point index updates its R-tree lazily, at the next box query (a zone edit). One
    // query per batch puts that deferred work inside the measurement: the figure is for a
    // zone edit every UPDATES_INDEXED position updates.
    group.bench_function("indexed", |b| {
        b.iter_custom(|iters| {
            let mut since_query = 0usize;
            run_moves(world, iters, UPDATES_INDEXED, &mut cursor, |i, p| {
                let id = world.couriers[i].0;
                points.set(id, p);
                since_query += 1;
                if since_query == UPDATES_INDEXED {
                    since_query = 0;
                    black_box(points.within(p.to_rtree(), p.to_rtree()));
                }
                zones.containing(p).count()
            })
        });
    });

    // The same lookups without moving the courier in the point index: how much of the
    // indexed update is the zone lookup and how much the R-tree move.
    let mut cursor = 0usize;
    group.bench_function("indexed_lookup_only", |b| {
        b.iter_custom(|iters| {
            run_moves(world, iters, UPDATES_INDEXED, &mut cursor, |_, p| {
                zones.containing(p).count()
            })
        });
    });

    let shapes: Vec<&ZoneShape> = world.zones.iter().map(|(_, shape)| shape).collect();
    let mut positions: Vec<GeoPoint> = world.couriers.iter().map(|&(_, p)| p).collect();
    let mut cursor = 0usize;
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Elements(UPDATES_BRUTE as u64));
    group.bench_function("brute_force", |b| {
        b.iter_custom(|iters| {
            run_moves(world, iters, UPDATES_BRUTE, &mut cursor, |i, p| {
                positions[i] = p;
                shapes.iter().filter(|shape| shape.contains(p)).count()
            })
        });
    });
    group.finish();
}

fn zone_edits(c: &mut Criterion, world: &World) {
    let mut group = c.benchmark_group("zone_edit");
    group.throughput(Throughput::Elements(1));

    let mut zones = world.zone_index();
    let mut points = world.point_index();
    let mut next = 0usize;
    group.bench_function("indexed", |b| {
        b.iter_batched(
            || {
                // Flip the zone to the shape it does not have now.
                let (z, a, b) = &world.edits[next % world.edits.len()];
                let shape = if (next / world.edits.len()).is_multiple_of(2) {
                    b
                } else {
                    a
                };
                next += 1;
                (world.zones[*z].0, shape.clone())
            },
            |(id, shape)| {
                let mut candidates = points.candidates_for(&shape);
                let old = zones.upsert(id, shape).expect("an edited zone exists");
                candidates.extend(points.candidates_for(&old));
                candidates.sort_unstable();
                candidates.dedup();
                let shape = zones.get(id).expect("just upserted");
                candidates
                    .into_iter()
                    .filter(|&courier| points.get(courier).is_some_and(|p| shape.contains(p)))
                    .count()
            },
            BatchSize::SmallInput,
        );
    });

    let mut shapes: Vec<ZoneShape> = world.zones.iter().map(|(_, shape)| shape.clone()).collect();
    let positions: Vec<GeoPoint> = world.couriers.iter().map(|&(_, p)| p).collect();
    let mut next = 0usize;
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("brute_force", |b| {
        b.iter_batched(
            || {
                let (z, a, b) = &world.edits[next % world.edits.len()];
                let shape = if (next / world.edits.len()).is_multiple_of(2) {
                    b
                } else {
                    a
                };
                next += 1;
                (*z, shape.clone())
            },
            |(z, shape)| {
                shapes[z] = shape;
                let shape = &shapes[z];
                positions.iter().filter(|&&p| shape.contains(p)).count()
            },
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

fn main() {
    let world = World::generate(SEED);
    world.describe(&world.zone_index(), &mut world.point_index());
    let mut c = Criterion::default().configure_from_args();
    position_updates(&mut c, &world);
    zone_edits(&mut c, &world);
    c.final_summary();
}
