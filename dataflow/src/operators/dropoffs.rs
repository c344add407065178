//! A plain points-in-zones join (no dwell): which zones contain each keyed point. Used for
//! delivery dropoff points, for the per-zone success rates.

use std::collections::HashMap;

use differential_dataflow::VecCollection;

use super::couriers::net_zone_changes;
use super::{Emitted, ZoneJoin, select, zone_join};
use crate::geometry::GeoPoint;
use crate::ids::{DeliveryId, ZoneId};
use crate::model::{Rejection, ZoneState};
use crate::spatial::{PointIndex, ZoneIndex};

/// The points of one worker's share, every zone, and which zones hold which point.
#[derive(Debug, Default)]
pub struct PointsInZones {
    zones: ZoneIndex,
    points: PointIndex<DeliveryId>,
    members: HashMap<DeliveryId, Vec<ZoneId>>,
}

impl PointsInZones {
    fn set_membership(
        &mut self,
        key: DeliveryId,
        zones: Vec<ZoneId>,
        out: &mut HashMap<(DeliveryId, ZoneId), isize>,
    ) {
        let old = if zones.is_empty() {
            self.members.remove(&key)
        } else {
            self.members.insert(key, zones.clone())
        };
        for zone_id in old.unwrap_or_default() {
            *out.entry((key, zone_id)).or_default() -= 1;
        }
        for zone_id in zones {
            *out.entry((key, zone_id)).or_default() += 1;
        }
    }

    fn zones_of(&self, point: GeoPoint) -> Vec<ZoneId> {
        let mut zones: Vec<ZoneId> = self.zones.containing(point).collect();
        zones.sort();
        zones
    }
}

impl ZoneJoin for PointsInZones {
    type Input = (DeliveryId, GeoPoint);
    type Record = (DeliveryId, ZoneId);

    fn apply_epoch(
        &mut self,
        zone_changes: Vec<((ZoneId, ZoneState), isize)>,
        input: Vec<((DeliveryId, GeoPoint), isize)>,
    ) -> (Vec<((DeliveryId, ZoneId), isize)>, Vec<Rejection>) {
        let mut out: HashMap<(DeliveryId, ZoneId), isize> = HashMap::new();
        for (zone_id, new) in net_zone_changes(zone_changes) {
            let mut candidates = Vec::new();
            if let Some(old) = self.zones.get(zone_id) {
                candidates.extend(self.points.candidates_for(old));
            }
            match new {
                Some(state) => {
                    candidates.extend(self.points.candidates_for(&state.shape));
                    self.zones.upsert(zone_id, state.shape);
                }
                None => {
                    self.zones.remove(zone_id);
                }
            }
            candidates.sort();
            candidates.dedup();
            for key in candidates {
                if let Some(point) = self.points.get(key) {
                    let zones = self.zones_of(point);
                    self.set_membership(key, zones, &mut out);
                }
            }
        }

        // Net point changes per key: the point with a positive net diff is the new one.
        let mut moves: HashMap<DeliveryId, (isize, Option<GeoPoint>)> = HashMap::new();
        for ((key, point), diff) in input {
            let entry = moves.entry(key).or_default();
            entry.0 += diff;
            if diff > 0 {
                entry.1 = Some(point);
            }
        }
        let mut moves: Vec<_> = moves.into_iter().collect();
        moves.sort_by_key(|(key, _)| *key);
        for (key, (net, point)) in moves {
            match (net, point) {
                (0, Some(point)) if self.points.get(key) == Some(point) => continue,
                (n, Some(point)) if n >= 0 => {
                    self.points.set(key, point);
                    let zones = self.zones_of(point);
                    self.set_membership(key, zones, &mut out);
                }
                (n, _) if n < 0 => {
                    self.points.remove(key);
                    self.set_membership(key, Vec::new(), &mut out);
                }
                _ => {}
            }
        }
        let mut records: Vec<_> = out.into_iter().filter(|(_, diff)| *diff != 0).collect();
        records.sort();
        (records, Vec::new())
    }
}

/// Maintains `dropoff_zone(delivery, zone)` from the dropoff points and the zones.
pub fn dropoff_zones<'scope>(
    dropoffs: VecCollection<'scope, u64, (DeliveryId, GeoPoint)>,
    zones: VecCollection<'scope, u64, (ZoneId, ZoneState)>,
) -> VecCollection<'scope, u64, (DeliveryId, ZoneId)> {
    let emitted = zone_join(
        PointsInZones::default(),
        "DropoffZones",
        dropoffs.inner,
        |(delivery_id, _): &(DeliveryId, GeoPoint)| delivery_id.route(),
        zones,
    );
    select(&emitted, |emitted| match emitted {
        Emitted::Record(record) => Some(record),
        Emitted::Rejected(_) => None,
    })
}
