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
///
/// Points move far more often than the boxes are queried (a courier reports every few
/// seconds; a zone is edited now and then), so the R-tree is brought up to date lazily:
/// [`set`](Self::set) only records the move, and the next query first applies every move
/// since the last one — once per key, however often it moved — or rebuilds the tree in
/// bulk when most points have moved.
#[derive(Debug)]
pub struct PointIndex<K> {
    /// Where every key is now.
    points: HashMap<K, GeoPoint>,
    /// Keys moved or removed since the tree was last updated, with where the tree has them.
    moved: HashMap<K, Option<GeoPoint>>,
    tree: RTree<PointEntry<K>>,
}

impl<K> Default for PointIndex<K> {
    fn default() -> Self {
        Self {
            points: HashMap::new(),
            moved: HashMap::new(),
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
        let old = self.points.insert(key, point);
        if old != Some(point) {
            self.moved.entry(key).or_insert(old);
        }
    }

    /// Forgets `key`.
    pub fn remove(&mut self, key: K) {
        if let Some(old) = self.points.remove(&key) {
            self.moved.entry(key).or_insert(Some(old));
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
    pub fn within(&mut self, lo: [f64; 2], hi: [f64; 2]) -> Vec<K> {
        self.catch_up();
        self.tree
            .locate_in_envelope_intersecting(AABB::from_corners(lo, hi))
            .map(|entry| entry.data)
            .collect()
    }

    /// The keys whose points lie in the bounding box of `shape` (and so may be inside it).
    pub fn candidates_for(&mut self, shape: &ZoneShape) -> Vec<K> {
        match shape.bounds() {
            Some((lo, hi)) => self.within(lo, hi),
            None => Vec::new(),
        }
    }

    /// Applies the moves recorded since the last query to the tree.
    fn catch_up(&mut self) {
        if self.moved.is_empty() {
            return;
        }
        if self.moved.len() * 2 >= self.points.len() {
            let entries = self
                .points
                .iter()
                .map(|(key, point)| GeomWithData::new(point.to_rtree(), *key))
                .collect();
            self.tree = RTree::bulk_load(entries);
            self.moved.clear();
            return;
        }
        for (key, in_tree) in self.moved.drain() {
            if let Some(old) = in_tree {
                self.tree.remove(&GeomWithData::new(old.to_rtree(), key));
            }
            if let Some(point) = self.points.get(&key) {
                self.tree.insert(GeomWithData::new(point.to_rtree(), key));
            }
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

    #[test]
    fn lazy_updates_answer_like_a_scan_of_all_points() {
        use rand::{Rng, SeedableRng, rngs::SmallRng};
        let mut rng = SmallRng::seed_from_u64(3);
        let mut index = PointIndex::new();
        let mut truth: HashMap<u32, GeoPoint> = HashMap::new();
        let random_point = |rng: &mut SmallRng| {
            GeoPoint::from_degrees(rng.random_range(52.0..52.2), rng.random_range(13.0..13.2))
        };
        for key in 0..300u32 {
            let point = random_point(&mut rng);
            index.set(key, point);
            truth.insert(key, point);
        }
        for round in 0..200 {
            // A few moves (the incremental path) and now and then most of them (a rebuild).
            let moves = if round % 50 == 0 {
                250
            } else {
                rng.random_range(0..12)
            };
            for _ in 0..moves {
                let key = rng.random_range(0..320u32);
                if rng.random_bool(0.1) {
                    index.remove(key);
                    truth.remove(&key);
                } else {
                    let point = random_point(&mut rng);
                    index.set(key, point);
                    truth.insert(key, point);
                }
            }
            let (a, b) = (random_point(&mut rng), random_point(&mut rng));
            let lo = [a.lon().min(b.lon()), a.lat().min(b.lat())];
            let hi = [a.lon().max(b.lon()), a.lat().max(b.lat())];
            let mut found = index.within(lo, hi);
            found.sort();
            let mut expected: Vec<u32> = truth
                .iter()
                .filter(|(_, p)| {
                    (lo[0]..=hi[0]).contains(&p.lon()) && (lo[1]..=hi[1]).contains(&p.lat())
                })
                .map(|(key, _)| *key)
                .collect();
            expected.sort();
            assert_eq!(found, expected, "round {round}");
            assert_eq!(index.len(), truth.len());
        }
    }
}
