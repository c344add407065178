//! The synthetic city: positions in metres around a centre, and irregular polygon zones.
//!
//! The zone generator is the one of the dataflow's `spatial` criterion bench
//! (`dataflow/benches/spatial.rs`): star-shaped polygons of 6–12 vertices, 100 m – 1.5 km
//! across. [`SpatialWorld::bench`] replays that bench's random sequence exactly (same seed,
//! same draws in the same order), so the geofence baseline of this harness measures the
//! very zones and points the bench measures.

use std::f64::consts::TAU;

use delivertrack_dataflow::geometry::{GeoPoint, ZoneShape};
use delivertrack_dataflow::{CourierId, ZoneId};
use geo::{LineString, MultiPolygon, Polygon};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

/// Metres per degree of latitude (and of longitude at the equator).
pub const METRES_PER_DEG_LAT: f64 = 111_320.0;

/// A square city around a centre. Positions inside it are `(north, east)` metres from the
/// centre; [`City::point`] turns them into coordinates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct City {
    /// Latitude of the centre, degrees.
    pub centre_lat: f64,
    /// Longitude of the centre, degrees.
    pub centre_lon: f64,
    /// Side of the square, metres.
    pub side_m: f64,
}

impl City {
    /// The README's city (52.52 N, 13.405 E) with a side of `side_m` metres.
    pub fn berlin(side_m: f64) -> Self {
        Self {
            centre_lat: 52.52,
            centre_lon: 13.405,
            side_m,
        }
    }

    /// Half the side: positions lie in `-half..half` both ways.
    pub fn half(&self) -> f64 {
        self.side_m / 2.0
    }

    fn metres_per_deg_lon(&self) -> f64 {
        METRES_PER_DEG_LAT * self.centre_lat.to_radians().cos()
    }

    /// The point `north` and `east` metres from the centre.
    pub fn point(&self, north_m: f64, east_m: f64) -> GeoPoint {
        GeoPoint::from_degrees(
            self.centre_lat + north_m / METRES_PER_DEG_LAT,
            self.centre_lon + east_m / self.metres_per_deg_lon(),
        )
    }

    /// `(north, east)` metres of a point from the centre.
    pub fn local(&self, point: GeoPoint) -> (f64, f64) {
        (
            (point.lat() - self.centre_lat) * METRES_PER_DEG_LAT,
            (point.lon() - self.centre_lon) * self.metres_per_deg_lon(),
        )
    }

    /// A uniformly random point of the city.
    pub fn random_point(&self, rng: &mut SmallRng) -> GeoPoint {
        let half = self.half();
        // Two statements: the draws happen in this order, as in the bench.
        let north = rng.random_range(-half..half);
        let east = rng.random_range(-half..half);
        self.point(north, east)
    }

    /// An irregular star-shaped (hence simple) polygon of 6–12 vertices around
    /// `(north, east)`, `across_m.0` to `across_m.1` metres across.
    pub fn random_zone(
        &self,
        rng: &mut SmallRng,
        north: f64,
        east: f64,
        across_m: (f64, f64),
    ) -> ZoneShape {
        let radius = rng.random_range(across_m.0..across_m.1) / 2.0;
        let vertices = rng.random_range(6..=12);
        let mut angles: Vec<f64> = (0..vertices).map(|_| rng.random_range(0.0..TAU)).collect();
        angles.sort_by(f64::total_cmp);
        let mut ring: Vec<(f64, f64)> = angles
            .iter()
            .map(|angle| {
                let r = radius * rng.random_range(0.55..1.0);
                let p = self.point(north + r * angle.sin(), east + r * angle.cos());
                (p.lon(), p.lat())
            })
            .collect();
        if let Some(first) = ring.first().copied() {
            ring.push(first);
        }
        ZoneShape(MultiPolygon(vec![Polygon::new(
            LineString::from(ring),
            vec![],
        )]))
    }

    /// `count` zones at uniformly random centres, ids drawn from the same generator.
    pub fn random_zones(
        &self,
        rng: &mut SmallRng,
        count: usize,
        across_m: (f64, f64),
    ) -> Vec<(ZoneId, ZoneShape)> {
        let half = self.half();
        (0..count)
            .map(|_| {
                let id = ZoneId(random_uuid(rng));
                let north = rng.random_range(-half..half);
                let east = rng.random_range(-half..half);
                (id, self.random_zone(rng, north, east, across_m))
            })
            .collect()
    }
}

/// A version-4 UUID from the generator: reproducible from the seed, valid on the wire.
pub fn random_uuid(rng: &mut SmallRng) -> Uuid {
    uuid::Builder::from_random_bytes(rng.random()).into_uuid()
}

/// The data of the `spatial` bench: couriers at random positions, zones, and one move per
/// courier (where it goes next).
#[derive(Debug)]
pub struct SpatialWorld {
    /// The city the data lies in.
    pub city: City,
    /// Couriers and where they are.
    pub couriers: Vec<(CourierId, GeoPoint)>,
    /// The zones.
    pub zones: Vec<(ZoneId, ZoneShape)>,
    /// `(courier index, to)`: one move per courier, in a random order.
    pub moves: Vec<(usize, GeoPoint)>,
}

/// The seed of the `spatial` bench.
pub const BENCH_SEED: u64 = 0x0DE1_1E7E_5EED;

impl SpatialWorld {
    /// The bench's world: 40 km × 40 km around 52.52 N 13.405 E, `couriers` couriers and
    /// `zones` zones 100 m – 1.5 km across, from `seed`. With [`BENCH_SEED`], 100 000
    /// couriers and 20 000 zones it is exactly the bench's data.
    pub fn bench(seed: u64, couriers: usize, zones: usize) -> Self {
        const ZONE_ACROSS_M: (f64, f64) = (100.0, 1_500.0);
        const STEP_M: f64 = 60.0;
        let city = City::berlin(40_000.0);
        let half = city.half();
        let mut rng = SmallRng::seed_from_u64(seed);
        let couriers: Vec<(CourierId, GeoPoint)> = (0..couriers)
            .map(|i| {
                (
                    CourierId(Uuid::from_u128(i as u128 + 1)),
                    city.random_point(&mut rng),
                )
            })
            .collect();
        let zones: Vec<(ZoneId, ZoneShape)> = (0..zones)
            .map(|i| {
                let north = rng.random_range(-half..half);
                let east = rng.random_range(-half..half);
                (
                    ZoneId(Uuid::from_u128(i as u128 + 1)),
                    city.random_zone(&mut rng, north, east, ZONE_ACROSS_M),
                )
            })
            .collect();
        let mut order: Vec<usize> = (0..couriers.len()).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.random_range(0..=i));
        }
        let moves = order
            .into_iter()
            .map(|i| {
                let (north, east) = city.local(couriers[i].1);
                let angle = rng.random_range(0.0..TAU);
                let dist = rng.random_range(1.0..STEP_M);
                let to = city.point(
                    (north + dist * angle.sin()).clamp(-half, half),
                    (east + dist * angle.cos()).clamp(-half, half),
                );
                (i, to)
            })
            .collect();
        Self {
            city,
            couriers,
            zones,
            moves,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn local_and_point_are_inverse_to_a_centimetre() {
        let city = City::berlin(10_000.0);
        let (north, east) = city.local(city.point(1_234.5, -987.6));
        assert!((north - 1_234.5).abs() < 0.02, "{north}");
        assert!((east + 987.6).abs() < 0.02, "{east}");
    }

    #[test]
    fn zones_are_closed_rings_of_six_to_twelve_vertices_around_their_centre() {
        let city = City::berlin(10_000.0);
        let mut rng = SmallRng::seed_from_u64(1);
        for (_, shape) in city.random_zones(&mut rng, 50, (100.0, 1_500.0)) {
            let ring = &shape.0.0[0].exterior().0;
            assert!((7..=13).contains(&ring.len()), "{}", ring.len());
            assert_eq!(ring.first(), ring.last());
        }
    }

    #[test]
    fn the_world_depends_only_on_the_seed() {
        let a = SpatialWorld::bench(BENCH_SEED, 200, 20);
        let b = SpatialWorld::bench(BENCH_SEED, 200, 20);
        assert_eq!(a.couriers, b.couriers);
        assert_eq!(a.zones.len(), 20);
        assert!(a.zones.iter().zip(&b.zones).all(|(x, y)| x == y));
        assert_eq!(a.moves, b.moves);
        let c = SpatialWorld::bench(BENCH_SEED + 1, 200, 20);
        assert_ne!(a.couriers, c.couriers);
    }
}
