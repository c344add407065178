//! Coordinates and zone geometry in forms the dataflow can order, hash and exchange.
//!
//! Positions are fixed point (1e-7 degree, about 1 cm), so that a position can be part of
//! a differential collection (which needs `Ord` and `Hash`) and so that the same input gives
//! bit-identical results on every worker. Zone geometry stays in floating point (`geo`),
//! wrapped in [`ZoneShape`], which orders by the bit patterns of its coordinates.

use std::cmp::Ordering;
use std::hash::{Hash, Hasher};

use geo::{BoundingRect, CoordsIter, Distance, Haversine, Intersects, MultiPolygon, Point};
use serde::{Deserialize, Serialize};

/// Fixed-point scale of [`GeoPoint`]: units per degree.
pub const E7: f64 = 1e7;

/// A WGS84 position in 1e-7 degrees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct GeoPoint {
    /// Latitude in 1e-7 degrees, within ±90°.
    pub lat_e7: i32,
    /// Longitude in 1e-7 degrees, within ±180°.
    pub lon_e7: i32,
}

impl GeoPoint {
    /// Quantizes degrees to fixed point. The caller has validated the range.
    pub fn from_degrees(lat: f64, lon: f64) -> Self {
        Self {
            lat_e7: (lat * E7).round() as i32,
            lon_e7: (lon * E7).round() as i32,
        }
    }

    /// Latitude in degrees.
    pub fn lat(&self) -> f64 {
        f64::from(self.lat_e7) / E7
    }

    /// Longitude in degrees.
    pub fn lon(&self) -> f64 {
        f64::from(self.lon_e7) / E7
    }

    /// As a `geo` point (x = longitude, y = latitude).
    pub fn to_point(self) -> Point<f64> {
        Point::new(self.lon(), self.lat())
    }

    /// Great-circle distance in metres (haversine, mean earth radius).
    pub fn distance_m(&self, other: &GeoPoint) -> f64 {
        Haversine.distance(self.to_point(), other.to_point())
    }

    /// As a corner of an R-tree envelope: `[lon, lat]`.
    pub fn to_rtree(self) -> [f64; 2] {
        [self.lon(), self.lat()]
    }
}

/// The polygon(s) of a zone. Validated on decode: closed rings, finite coordinates, at
/// least one polygon with a non-empty exterior.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ZoneShape(pub MultiPolygon<f64>);

impl ZoneShape {
    /// Does the shape contain the point? Points on the boundary count as inside.
    pub fn contains(&self, point: GeoPoint) -> bool {
        self.0.intersects(&point.to_point())
    }

    /// The bounding box as `([min_lon, min_lat], [max_lon, max_lat])`, `None` when empty.
    pub fn bounds(&self) -> Option<([f64; 2], [f64; 2])> {
        self.0
            .bounding_rect()
            .map(|r| ([r.min().x, r.min().y], [r.max().x, r.max().y]))
    }

    fn bits(&self) -> impl Iterator<Item = u64> + '_ {
        // Ring and polygon lengths are part of the identity, not only the coordinates.
        self.0.0.iter().flat_map(|polygon| {
            std::iter::once(polygon.interiors().len() as u64)
                .chain(std::iter::once(polygon.exterior().0.len() as u64))
                .chain(
                    polygon
                        .coords_iter()
                        .flat_map(|c| [c.x.to_bits(), c.y.to_bits()]),
                )
        })
    }
}

impl PartialEq for ZoneShape {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for ZoneShape {}

impl PartialOrd for ZoneShape {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ZoneShape {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0
            .0
            .len()
            .cmp(&other.0.0.len())
            .then_with(|| self.bits().cmp(other.bits()))
    }
}

impl Hash for ZoneShape {
    fn hash<H: Hasher>(&self, state: &mut H) {
        for bits in self.bits() {
            bits.hash(state);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use geo::polygon;

    fn square() -> ZoneShape {
        ZoneShape(MultiPolygon(vec![polygon![
            (x: 13.0, y: 52.0), (x: 13.1, y: 52.0), (x: 13.1, y: 52.1), (x: 13.0, y: 52.1), (x: 13.0, y: 52.0)
        ]]))
    }

    #[test]
    fn fixed_point_round_trips_to_a_centimetre() {
        let p = GeoPoint::from_degrees(52.520_008_3, -13.404_954_1);
        assert!((p.lat() - 52.520_008_3).abs() < 1e-7);
        assert!((p.lon() + 13.404_954_1).abs() < 1e-7);
    }

    #[test]
    fn haversine_distance_matches_a_known_pair() {
        // Berlin TV tower to Brandenburg Gate: about 2.2 km.
        let tower = GeoPoint::from_degrees(52.520_8, 13.409_4);
        let gate = GeoPoint::from_degrees(52.516_3, 13.377_7);
        let d = tower.distance_m(&gate);
        assert!((2_100.0..2_300.0).contains(&d), "{d}");
    }

    #[test]
    fn containment_includes_the_boundary_and_excludes_outside() {
        let zone = square();
        assert!(zone.contains(GeoPoint::from_degrees(52.05, 13.05)));
        assert!(zone.contains(GeoPoint::from_degrees(52.0, 13.05)));
        assert!(!zone.contains(GeoPoint::from_degrees(52.2, 13.05)));
    }

    #[test]
    fn shapes_order_by_their_coordinates() {
        let a = square();
        let mut b = square();
        assert_eq!(a, b);
        b.0.0[0].exterior_mut(|ring| ring.0[1].x = 13.2);
        assert_ne!(a, b);
        assert_eq!(a.cmp(&b), b.cmp(&a).reverse());
    }
}
