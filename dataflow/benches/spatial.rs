//! Spatial-join throughput: the R-tree indexes of `spatial.rs`, and the geofence join
//! state built on them ([`CourierTracker`]), each against a brute-force scan.
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
//! The same two questions asked of the real join state, the one the dataflow's
//! `TrackCouriers` operator holds (here one tracker holds every courier, as with one timely
//! worker), loaded with the whole world before measuring:
//!
//! - `join_position_update`: epochs of [`EPOCH_FIXES`] `location.updated` events through
//!   [`ZoneJoin::apply_epoch`]: each fix updates its courier's record (odometer, speed
//!   window) and re-tests its zones; out come the epoch's net `couriers` and
//!   `inside(courier, zone)` changes. Brute force: the same `inside` changes from a join
//!   without index, which tests every zone for each moved courier.
//! - `join_zone_edit`: one `zone.upserted` event that moves an existing zone's polygon,
//!   through the zone registers (which turn it into the `zones` change the tracker
//!   receives) and the tracker, which re-tests the couriers near the old and new shapes.
//!   Brute force: replace the shape and test every courier.
//!
//! Every zone has no dwell time, so `inside` is exactly "the latest fix is in the polygon",
//! which is what the brute-force join computes. Before measuring, both joins take the same
//! epoch of fixes and the same zone edits, and their `inside` changes must be equal.
//!
//! Run with `cargo bench -p delivertrack-dataflow --bench spatial`. Before measuring, it
//! prints the shape of the data: how many zones a point hits, how many candidates a zone
//! edit re-tests, and how many `inside` changes the joins produce.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::f64::consts::TAU;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, SamplingMode, Throughput};
use delivertrack_dataflow::event::{Event, EventBody, LocationUpdated, UnixMillis, ZoneUpserted};
use delivertrack_dataflow::geometry::{GeoPoint, ZoneShape};
use delivertrack_dataflow::operators::couriers::{CourierTracker, TrackerRecord};
use delivertrack_dataflow::operators::zones::ZoneRegisters;
use delivertrack_dataflow::operators::{EpochState, ZoneJoin};
use delivertrack_dataflow::pipeline::DataflowConfig;
use delivertrack_dataflow::restore::Input;
use delivertrack_dataflow::spatial::{PointIndex, ZoneIndex};
use delivertrack_dataflow::{CourierId, EventId, ZoneId};
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
/// `location.updated` events per epoch through the tracker.
const EPOCH_FIXES: usize = 10_000;
/// Fixes per measured iteration of the brute-force join.
const BRUTE_JOIN_FIXES: usize = 50;
/// Fixes and zone edits both joins take before measuring, whose outputs must agree.
const CHECK_FIXES: usize = 500;
const CHECK_EDITS: usize = 20;

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

/// One join's input: events with their own ids and ever later event times, and where the
/// join is in the world's lists of moves and of edits.
struct Inputs {
    clock: UnixMillis,
    next_id: u128,
    moves: usize,
    edits: usize,
}

impl Inputs {
    fn new() -> Self {
        Self {
            clock: 1_764_500_000_000,
            next_id: 0,
            moves: 0,
            edits: 0,
        }
    }

    fn event(&mut self, body: EventBody) -> Event {
        self.clock += 1;
        self.next_id += 1;
        Event {
            event_id: EventId(Uuid::from_u128(self.next_id)),
            occurred_at: self.clock,
            body,
        }
    }

    fn fix(&mut self, courier_id: CourierId, position: GeoPoint) -> Input {
        Input::Event(self.event(EventBody::LocationUpdated(LocationUpdated {
            courier_id,
            position,
            speed_mm_s: Some(4_000),
            heading_ddeg: None,
            accuracy_cm: None,
        })))
    }

    fn zone(&mut self, zone_id: ZoneId, shape: ZoneShape) -> Input {
        Input::Event(self.event(EventBody::ZoneUpserted(ZoneUpserted {
            zone_id,
            name: String::from("zone"),
            shape,
            dwell_ms: 0,
        })))
    }

    /// The next `count` fixes, alternating forward and back over the move list as
    /// [`run_moves`] does, so that every fix really moves its courier.
    fn fixes(&mut self, world: &World, count: usize) -> Vec<(Input, isize)> {
        let total = world.moves.len();
        (0..count)
            .map(|_| {
                let pass = self.moves / total;
                let (i, from, to) = world.moves[self.moves % total];
                self.moves += 1;
                let target = if pass.is_multiple_of(2) { to } else { from };
                (self.fix(world.couriers[i].0, target), 1)
            })
            .collect()
    }

    /// The next zone edit: a `zone.upserted` flipping a zone to the shape it does not have.
    fn edit(&mut self, world: &World) -> Input {
        let (z, a, b) = &world.edits[self.edits % world.edits.len()];
        let shape = if (self.edits / world.edits.len()).is_multiple_of(2) {
            b
        } else {
            a
        };
        self.edits += 1;
        self.zone(world.zones[*z].0, shape.clone())
    }
}

/// The real join: the zone registers (`zone.upserted` → the `zones` change) and the
/// courier tracker, loaded with every zone and every courier's first fix.
struct TrackerJoin {
    registers: ZoneRegisters,
    tracker: CourierTracker,
}

impl TrackerJoin {
    /// Loads the world with events from `inputs`.
    fn load(world: &World, inputs: &mut Inputs) -> Self {
        let mut registers = ZoneRegisters::default();
        let upserts = world
            .zones
            .iter()
            .map(|(id, shape)| inputs.zone(*id, shape.clone()))
            .collect();
        let (zones, refused) = registers.apply_epoch(upserts);
        assert!(refused.is_empty(), "{refused:?}");
        // The bench's clock moves a millisecond per event, so its 60 m steps would all be
        // implausible jumps: the jump rule is off, and every fix does the join's work.
        let mut tracker = CourierTracker::new(DataflowConfig::default().speed_window, u32::MAX);
        tracker.apply_epoch(zones, Vec::new());
        for chunk in world.couriers.chunks(EPOCH_FIXES) {
            let fixes = chunk
                .iter()
                .map(|&(id, p)| (inputs.fix(id, p), 1))
                .collect();
            let (_, refused) = tracker.apply_epoch(Vec::new(), fixes);
            assert!(refused.is_empty(), "{refused:?}");
        }
        Self { registers, tracker }
    }
}

/// Applies one zone edit the way the dataflow does: the registers turn the event into the
/// zone's `-old +new` change, which the tracker applies as its epoch's zone changes.
fn tracker_edit(
    registers: &mut ZoneRegisters,
    tracker: &mut CourierTracker,
    edit: Input,
) -> Vec<(TrackerRecord, isize)> {
    let (zones, refused) = registers.apply_epoch(vec![edit]);
    assert!(refused.is_empty(), "{refused:?}");
    tracker.apply_epoch(zones, Vec::new()).0
}

/// The `inside` changes among a tracker's output.
fn inside_changes(records: &[(TrackerRecord, isize)]) -> Vec<(TrackerRecord, isize)> {
    records
        .iter()
        .filter(|(record, _)| matches!(record, TrackerRecord::Inside(..)))
        .cloned()
        .collect()
}

/// The geofence join without an index: a fix tests every zone, a zone edit tests every
/// courier. Its output is the tracker's `inside` changes, consolidated and sorted.
struct BruteJoin {
    zones: Vec<(ZoneId, ZoneShape)>,
    zone_slots: HashMap<ZoneId, usize>,
    couriers: Vec<(CourierId, GeoPoint)>,
    courier_slots: HashMap<CourierId, usize>,
    /// The zones each courier is inside, by courier slot.
    inside: Vec<Vec<ZoneId>>,
}

impl BruteJoin {
    /// Loaded through the zone index (scanning 100k × 20k pairs would take minutes).
    fn load(world: &World) -> Self {
        let index = world.zone_index();
        let inside = world
            .couriers
            .iter()
            .map(|&(_, p)| index.containing(p).collect())
            .collect();
        Self {
            zones: world.zones.clone(),
            zone_slots: (world.zones.iter().enumerate())
                .map(|(slot, (id, _))| (*id, slot))
                .collect(),
            couriers: world.couriers.clone(),
            courier_slots: (world.couriers.iter().enumerate())
                .map(|(slot, (id, _))| (*id, slot))
                .collect(),
            inside,
        }
    }

    fn apply_fixes(&mut self, fixes: &[(Input, isize)]) -> Vec<(TrackerRecord, isize)> {
        let mut changes = HashMap::new();
        for (input, _) in fixes {
            let Input::Event(Event {
                body: EventBody::LocationUpdated(fix),
                ..
            }) = input
            else {
                continue;
            };
            let slot = self.courier_slots[&fix.courier_id];
            self.couriers[slot].1 = fix.position;
            let now: Vec<ZoneId> = (self.zones.iter())
                .filter(|(_, shape)| shape.contains(fix.position))
                .map(|(id, _)| *id)
                .collect();
            let before = std::mem::replace(&mut self.inside[slot], now);
            for zone_id in &before {
                if !self.inside[slot].contains(zone_id) {
                    *changes.entry((fix.courier_id, *zone_id)).or_default() -= 1;
                }
            }
            for zone_id in &self.inside[slot] {
                if !before.contains(zone_id) {
                    *changes.entry((fix.courier_id, *zone_id)).or_default() += 1;
                }
            }
        }
        consolidated(changes)
    }

    fn apply_edit(&mut self, edit: &Input) -> Vec<(TrackerRecord, isize)> {
        let Input::Event(Event {
            body: EventBody::ZoneUpserted(upsert),
            ..
        }) = edit
        else {
            return Vec::new();
        };
        let zone_id = upsert.zone_id;
        let slot = self.zone_slots[&zone_id];
        self.zones[slot].1 = upsert.shape.clone();
        let shape = &self.zones[slot].1;
        let mut changes = HashMap::new();
        for (&(courier_id, position), inside) in self.couriers.iter().zip(&mut self.inside) {
            let now = shape.contains(position);
            let was = inside.iter().position(|z| *z == zone_id);
            match (was, now) {
                (None, true) => {
                    inside.push(zone_id);
                    changes.insert((courier_id, zone_id), 1);
                }
                (Some(i), false) => {
                    inside.swap_remove(i);
                    changes.insert((courier_id, zone_id), -1);
                }
                _ => {}
            }
        }
        consolidated(changes)
    }
}

fn consolidated(changes: HashMap<(CourierId, ZoneId), isize>) -> Vec<(TrackerRecord, isize)> {
    let mut records: Vec<_> = changes
        .into_iter()
        .filter(|(_, diff)| *diff != 0)
        .map(|((courier_id, zone_id), diff)| (TrackerRecord::Inside(courier_id, zone_id), diff))
        .collect();
    records.sort();
    records
}

/// A join and its input.
struct Joined<J> {
    join: J,
    inputs: Inputs,
}

/// Both joins take the same fixes and the same zone edits; their `inside` changes must be
/// equal. Prints how many there were.
fn check_joins_agree(
    world: &World,
    tracker: &mut Joined<TrackerJoin>,
    brute: &mut Joined<BruteJoin>,
) {
    let fixes = tracker.inputs.fixes(world, CHECK_FIXES);
    let (records, refused) = tracker.join.tracker.apply_epoch(Vec::new(), fixes);
    assert!(refused.is_empty(), "{refused:?}");
    let fixes = brute.inputs.fixes(world, CHECK_FIXES);
    let expected = brute.join.apply_fixes(&fixes);
    assert_eq!(
        inside_changes(&records),
        expected,
        "the tracker and the brute-force join disagree on an epoch of fixes"
    );
    let mut edit_changes = 0;
    for _ in 0..CHECK_EDITS {
        let edit = tracker.inputs.edit(world);
        let records = tracker_edit(&mut tracker.join.registers, &mut tracker.join.tracker, edit);
        let edit = brute.inputs.edit(world);
        let expected = brute.join.apply_edit(&edit);
        assert_eq!(
            inside_changes(&records),
            expected,
            "the tracker and the brute-force join disagree on a zone edit"
        );
        edit_changes += expected.len();
    }
    println!(
        "  the joins agree: {} inside changes from an epoch of {CHECK_FIXES} fixes, {} from \
         {CHECK_EDITS} zone edits",
        expected.len(),
        edit_changes,
    );
}

fn join_position_updates(
    c: &mut Criterion,
    world: &World,
    tracker: &mut Joined<TrackerJoin>,
    brute: &mut Joined<BruteJoin>,
) {
    let mut group = c.benchmark_group("join_position_update");
    // One iteration is a whole epoch: the same count in every sample.
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(20);
    group.warm_up_time(Duration::from_secs(2));
    group.measurement_time(Duration::from_secs(8));
    group.throughput(Throughput::Elements(EPOCH_FIXES as u64));
    let mut changes = (0usize, 0usize);
    group.bench_function("courier_tracker", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                // Making the events is not part of the figure; applying them is.
                let fixes = tracker.inputs.fixes(world, EPOCH_FIXES);
                let start = Instant::now();
                let (records, refused) = tracker.join.tracker.apply_epoch(Vec::new(), fixes);
                spent += start.elapsed();
                assert!(refused.is_empty(), "{refused:?}");
                changes.0 += 1;
                changes.1 += records
                    .iter()
                    .filter(|(record, _)| matches!(record, TrackerRecord::Inside(..)))
                    .count();
                black_box(records);
            }
            spent
        });
    });
    if changes.0 > 0 {
        println!(
            "  an epoch of {EPOCH_FIXES} fixes made {:.0} inside changes on average ({} epochs)",
            changes.1 as f64 / changes.0 as f64,
            changes.0,
        );
    }

    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Elements(BRUTE_JOIN_FIXES as u64));
    group.bench_function("brute_force", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                let fixes = brute.inputs.fixes(world, BRUTE_JOIN_FIXES);
                let start = Instant::now();
                let records = brute.join.apply_fixes(&fixes);
                spent += start.elapsed();
                black_box(records);
            }
            spent
        });
    });
    group.finish();
}

fn join_zone_edits(
    c: &mut Criterion,
    world: &World,
    tracker: &mut Joined<TrackerJoin>,
    brute: &mut Joined<BruteJoin>,
) {
    let mut group = c.benchmark_group("join_zone_edit");
    group.throughput(Throughput::Elements(1));
    group.bench_function("courier_tracker", |b| {
        b.iter_batched(
            || tracker.inputs.edit(world),
            |edit| tracker_edit(&mut tracker.join.registers, &mut tracker.join.tracker, edit),
            BatchSize::SmallInput,
        );
    });

    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("brute_force", |b| {
        b.iter_batched(
            || brute.inputs.edit(world),
            |edit| brute.join.apply_edit(&edit),
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

fn main() {
    let world = World::generate(SEED);
    world.describe(&world.zone_index(), &mut world.point_index());
    let mut inputs = Inputs::new();
    let mut tracker = Joined {
        join: TrackerJoin::load(&world, &mut inputs),
        inputs,
    };
    let mut brute = Joined {
        join: BruteJoin::load(&world),
        inputs: Inputs::new(),
    };
    check_joins_agree(&world, &mut tracker, &mut brute);
    let mut c = Criterion::default().configure_from_args();
    position_updates(&mut c, &world);
    zone_edits(&mut c, &world);
    join_position_updates(&mut c, &world, &mut tracker, &mut brute);
    join_zone_edits(&mut c, &world, &mut tracker, &mut brute);
    c.final_summary();
}
