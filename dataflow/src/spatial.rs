//! The R-tree indexes behind the spatial joins.
//!
//! A geofence join must be incremental in both inputs: a moving point is tested against the
//! zones whose bounding boxes hold it ([`ZoneIndex::containing`]); an edited zone is tested
//! against the points inside its old and new bounding boxes ([`PointIndex::within`]). Neither
//! side ever scans the whole of the other.

use std::collections::HashMap;
use std::hash::Hash;

use rstar::primitives::{GeomWithData, Rectangle};
use rstar::{AABB, RTree};

use crate::geometry::{GeoPoint, ZoneShape};
use crate::ids::ZoneId;

type ZoneEntry = GeomWithData<Rectangle<[f64; 2]>, ZoneId>;

/// Zone shapes, indexed by bounding box.
#[derive(Debug, Default)]
pub struct ZoneIndex {
    shapes: HashMap<ZoneId, (ZoneShape, Option<ZoneEntry>)>,
    tree: RTree<ZoneEntry>,
}

impl ZoneIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bulk-loads many zones at once (faster than repeated [`upsert`](Self::upsert)).
    pub fn bulk_load(zones: impl IntoIterator<Item = (ZoneId, ZoneShape)>) -> Self {
        let mut shapes = HashMap::new();
        let mut entries = Vec::new();
        for (id, shape) in zones {
            let entry = envelope_entry(id, &shape);
            if let Some(entry) = &entry {
                entries.push(*entry);
            }
            shapes.insert(id, (shape, entry));
        }
        Self {
            shapes,
            tree: RTree::bulk_load(entries),
        }
    }

    /// Inserts or replaces a zone; returns the shape it replaced.
    pub fn upsert(&mut self, id: ZoneId, shape: ZoneShape) -> Option<ZoneShape> {
        let previous = self.remove(id);
        let entry = envelope_entry(id, &shape);
        if let Some(entry) = &entry {
            self.tree.insert(*entry);
        }
        self.shapes.insert(id, (shape, entry));
        previous
    }

    /// Removes a zone; returns its shape.
    pub fn remove(&mut self, id: ZoneId) -> Option<ZoneShape> {
        let (shape, entry) = self.shapes.remove(&id)?;
        if let Some(entry) = entry {
            self.tree.remove(&entry);
        }
        Some(shape)
    }

    /// The shape of a zone.
    pub fn get(&self, id: ZoneId) -> Option<&ZoneShape> {
        self.shapes.get(&id).map(|(shape, _)| shape)
    }

    /// Number of zones.
    pub fn len(&self) -> usize {
        self.shapes.len()
    }

    /// No zones.
    pub fn is_empty(&self) -> bool {
        self.shapes.is_empty()
    }

    /// The zones containing `point`, in no particular order: candidates by bounding box,
    /// then the exact polygon test.
    pub fn containing(&self, point: GeoPoint) -> impl Iterator<Item = ZoneId> + '_ {
        self.tree
            .locate_all_at_point(point.to_rtree())
            .map(|entry| entry.data)
            .filter(move |id| self.get(*id).is_some_and(|shape| shape.contains(point)))
    }

    /// Does zone `id` contain `point`?
    pub fn zone_contains(&self, id: ZoneId, point: GeoPoint) -> bool {
        self.get(id).is_some_and(|shape| shape.contains(point))
    }
}

fn envelope_entry(id: ZoneId, shape: &ZoneShape) -> Option<ZoneEntry> {
    let (lo, hi) = shape.bounds()?;
    Some(GeomWithData::new(Rectangle::from_corners(lo, hi), id))
}

type PointEntry<K> = GeomWithData<[f64; 2], K>;

/// The current position of many keyed points (couriers, dropoffs), indexed for box queries.
#[derive(Debug)]
pub struct PointIndex<K> {
    points: HashMap<K, GeoPoint>,
    tree: RTree<PointEntry<K>>,
}

impl<K> Default for PointIndex<K> {
    fn default() -> Self {
        Self {
            points: HashMap::new(),
            tree: RTree::new(),
        }
    }
}

impl<K: Copy + Eq + Hash + std::fmt::Debug> PointIndex<K> {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `key` at `point`, moving it if it was elsewhere.
    pub fn set(&mut self, key: K, point: GeoPoint) {
        if let Some(old) = self.points.insert(key, point) {
            if old == point {
                return;
            }
            self.tree.remove(&GeomWithData::new(old.to_rtree(), key));
        }
        self.tree.insert(GeomWithData::new(point.to_rtree(), key));
    }

    /// Forgets `key`.
    pub fn remove(&mut self, key: K) {
        if let Some(old) = self.points.remove(&key) {
            self.tree.remove(&GeomWithData::new(old.to_rtree(), key));
        }
    }

    /// Where `key` is.
    pub fn get(&self, key: K) -> Option<GeoPoint> {
        self.points.get(&key).copied()
    }

    /// Number of points.
    pub fn len(&self) -> usize {
        self.points.len()
    }

    /// No points.
    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// The keys whose points lie in the box `[lo, hi]` (`[lon, lat]` corners, inclusive).
    pub fn within(&self, lo: [f64; 2], hi: [f64; 2]) -> impl Iterator<Item = K> + '_ {
        self.tree
            .locate_in_envelope_intersecting(AABB::from_corners(lo, hi))
            .map(|entry| entry.data)
    }

    /// The keys whose points lie in the bounding box of `shape` (and so may be inside it).
    pub fn candidates_for(&self, shape: &ZoneShape) -> Vec<K> {
        match shape.bounds() {
            Some((lo, hi)) => self.within(lo, hi).collect(),
            None => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use geo::{MultiPolygon, polygon};

    fn square(x: f64, y: f64, side: f64) -> ZoneShape {
        ZoneShape(MultiPolygon(vec![polygon![
            (x: x, y: y), (x: x + side, y: y), (x: x + side, y: y + side), (x: x, y: y + side), (x: x, y: y)
        ]]))
    }

    fn id(n: u128) -> ZoneId {
        ZoneId(uuid::Uuid::from_u128(n))
    }

    #[test]
    fn containing_finds_exactly_the_zones_holding_the_point() {
        let mut index = ZoneIndex::new();
        index.upsert(id(1), square(13.0, 52.0, 0.1));
        index.upsert(id(2), square(13.05, 52.05, 0.1));
        index.upsert(id(3), square(14.0, 53.0, 0.1));
        let mut found: Vec<_> = index
            .containing(GeoPoint::from_degrees(52.07, 13.07))
            .collect();
        found.sort();
        assert_eq!(found, vec![id(1), id(2)]);
        assert_eq!(
            index.containing(GeoPoint::from_degrees(52.5, 13.5)).count(),
            0
        );
    }

    #[test]
    fn the_bounding_box_alone_is_not_enough() {
        // A triangle whose bounding box holds the point, but not the triangle itself.
        let triangle = ZoneShape(MultiPolygon(vec![polygon![
            (x: 13.0, y: 52.0), (x: 13.1, y: 52.0), (x: 13.0, y: 52.1), (x: 13.0, y: 52.0)
        ]]));
        let index = ZoneIndex::bulk_load([(id(1), triangle)]);
        assert_eq!(
            index
                .containing(GeoPoint::from_degrees(52.09, 13.09))
                .count(),
            0
        );
        assert_eq!(
            index
                .containing(GeoPoint::from_degrees(52.01, 13.01))
                .count(),
            1
        );
    }

    #[test]
    fn upsert_replaces_and_remove_forgets() {
        let mut index = ZoneIndex::new();
        index.upsert(id(1), square(13.0, 52.0, 0.1));
        let p = GeoPoint::from_degrees(52.05, 13.05);
        assert_eq!(index.containing(p).count(), 1);
        assert!(index.upsert(id(1), square(14.0, 52.0, 0.1)).is_some());
        assert_eq!(index.containing(p).count(), 0);
        assert_eq!(index.len(), 1);
        index.remove(id(1));
        assert!(index.is_empty());
    }

    #[test]
    fn points_move_and_box_queries_follow() {
        let mut points = PointIndex::new();
        points.set(1u32, GeoPoint::from_degrees(52.05, 13.05));
        points.set(2u32, GeoPoint::from_degrees(52.5, 13.5));
        let zone = square(13.0, 52.0, 0.1);
        assert_eq!(points.candidates_for(&zone), vec![1]);
        points.set(2, GeoPoint::from_degrees(52.06, 13.06));
        let mut inside = points.candidates_for(&zone);
        inside.sort();
        assert_eq!(inside, vec![1, 2]);
        points.remove(1);
        assert_eq!(points.candidates_for(&zone), vec![2]);
        assert_eq!(points.len(), 1);
    }
}
