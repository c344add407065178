//! The maintained collections held in memory, and how one epoch's changes apply to them.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use delivertrack_dataflow::model::{CourierState, DeliveryState, Eta, Scope, Tally, ZoneState};
use delivertrack_dataflow::{
    Change, CourierId, DeliveryId, Epoch, EpochOutput, EventId, RejectReason, Status, ZoneId,
};

/// How many of the latest refusals [`ReadState::refusal`] remembers: far more than the
/// events a write route waits on at once, and a bounded memory whatever the input.
pub const RECENT_REFUSALS: usize = 4_096;

use super::live::{EpochUpdate, LiveChange};
#[cfg(test)]
use super::view::ScopeView;
use super::view::{
    Counts, CourierDetail, CourierView, DeliveryView, EtaView, MetricSummary, ScopedMetrics,
    Snapshot, ZoneView, polygons,
};

/// The current state of every collection the dataflow maintains.
///
/// Ordered maps, so that snapshots and update messages list entities in a stable order.
#[derive(Clone, Debug, Default)]
pub struct ReadState {
    /// The last epoch applied; `None` before the first.
    pub epoch: Option<Epoch>,
    /// `couriers(courier, state)`.
    pub couriers: BTreeMap<CourierId, CourierState>,
    /// `zones(zone, state)`.
    pub zones: BTreeMap<ZoneId, ZoneState>,
    /// `inside(courier, zone)`.
    pub inside: BTreeSet<(CourierId, ZoneId)>,
    /// `deliveries(delivery, state)`.
    pub deliveries: BTreeMap<DeliveryId, DeliveryState>,
    /// `dropoff_zone(delivery, zone)`.
    pub dropoff_zones: BTreeSet<(DeliveryId, ZoneId)>,
    /// `eta(delivery, eta)`.
    pub etas: BTreeMap<DeliveryId, Eta>,
    /// `metrics(scope, tally)`.
    pub metrics: BTreeMap<Scope, Tally>,
    /// Rejected events since start, by reason code.
    pub rejections: BTreeMap<&'static str, u64>,
    /// The latest [`RECENT_REFUSALS`] events the dataflow refused, oldest first: a write
    /// route that published an event learns here that the pipeline refused it.
    pub recent_refusals: VecDeque<(EventId, RejectReason)>,
    /// Retractions that did not match the held record: a sign of a missed epoch. Counted
    /// (and the record replaced anyway) rather than failing the sink, since the next
    /// upsert of the entity repairs it.
    pub mismatches: u64,
}

/// The keys an epoch touched, to derive the live changes after applying it.
#[derive(Default)]
struct Touched {
    zones: BTreeSet<ZoneId>,
    couriers: BTreeSet<CourierId>,
    inside: Vec<((CourierId, ZoneId), bool)>,
    deliveries: BTreeMap<DeliveryId, Option<Status>>,
    etas: BTreeSet<DeliveryId>,
    metrics: BTreeSet<Scope>,
}

impl ReadState {
    /// Applies one epoch's output and returns what changed, or `None` when the epoch is
    /// not newer than the last one applied (a replay, which is a no-op: the sink is
    /// idempotent).
    ///
    /// Retractions (`diff < 0`) apply before insertions, so an upsert (`-old +new`) leaves
    /// the new record whatever the order of the changes in the batch.
    pub fn apply(&mut self, output: &EpochOutput) -> Option<EpochUpdate> {
        if self.epoch.is_some_and(|last| output.epoch <= last) {
            return None;
        }
        let mut touched = Touched::default();
        for (change, _) in output.changes.iter().filter(|(_, diff)| *diff < 0) {
            self.retract(change, &mut touched);
        }
        for (change, _) in output.changes.iter().filter(|(_, diff)| *diff > 0) {
            self.insert(change, &mut touched);
        }
        for rejection in &output.rejections {
            *self.rejections.entry(rejection.reason.code()).or_default() += 1;
            if self.recent_refusals.len() == RECENT_REFUSALS {
                self.recent_refusals.pop_front();
            }
            self.recent_refusals
                .push_back((rejection.event_id, rejection.reason.clone()));
        }
        self.epoch = Some(output.epoch);
        Some(EpochUpdate {
            epoch: output.epoch,
            changes: self.live_changes(touched),
            rejected: output.rejections.len(),
        })
    }

    fn retract(&mut self, change: &Change, touched: &mut Touched) {
        let matched = match change {
            Change::Courier(id, state) => {
                touched.couriers.insert(*id);
                self.couriers.remove(id).is_some_and(|held| held == *state)
            }
            Change::Zone(id, state) => {
                touched.zones.insert(*id);
                self.zones.remove(id).is_some_and(|held| held == *state)
            }
            Change::Inside(courier, zone) => {
                touched.inside.push(((*courier, *zone), false));
                self.inside.remove(&(*courier, *zone))
            }
            Change::Delivery(id, state) => {
                let held = self.deliveries.remove(id);
                touched
                    .deliveries
                    .insert(*id, held.as_ref().map(|held| held.status));
                held.is_some_and(|held| held == *state)
            }
            Change::DropoffZone(delivery, zone) => self.dropoff_zones.remove(&(*delivery, *zone)),
            Change::Eta(id, eta) => {
                touched.etas.insert(*id);
                self.etas.remove(id).is_some_and(|held| held == *eta)
            }
            Change::Metric(scope, tally) => {
                touched.metrics.insert(*scope);
                self.metrics
                    .remove(scope)
                    .is_some_and(|held| held == *tally)
            }
        };
        if !matched {
            self.mismatches += 1;
            tracing::warn!(change = ?change, "A retraction did not match the read model's record.");
        }
    }

    fn insert(&mut self, change: &Change, touched: &mut Touched) {
        match change {
            Change::Courier(id, state) => {
                touched.couriers.insert(*id);
                self.couriers.insert(*id, state.clone());
            }
            Change::Zone(id, state) => {
                touched.zones.insert(*id);
                self.zones.insert(*id, state.clone());
            }
            Change::Inside(courier, zone) => {
                touched.inside.push(((*courier, *zone), true));
                self.inside.insert((*courier, *zone));
            }
            Change::Delivery(id, state) => {
                touched.deliveries.entry(*id).or_insert(None);
                self.deliveries.insert(*id, state.clone());
            }
            Change::DropoffZone(delivery, zone) => {
                self.dropoff_zones.insert((*delivery, *zone));
            }
            Change::Eta(id, eta) => {
                touched.etas.insert(*id);
                self.etas.insert(*id, eta.clone());
            }
            Change::Metric(scope, tally) => {
                touched.metrics.insert(*scope);
                self.metrics.insert(*scope, *tally);
            }
        }
    }

    fn live_changes(&self, touched: Touched) -> Vec<LiveChange> {
        let mut changes = Vec::new();
        for id in touched.zones {
            changes.push(match self.zones.get(&id) {
                Some(zone) => LiveChange::ZoneUpserted {
                    zone_id: id,
                    name: zone.name.clone(),
                    polygons: polygons(&zone.shape),
                },
                None => LiveChange::ZoneDeleted { zone_id: id },
            });
        }
        for id in touched.couriers {
            changes.push(match self.couriers.get(&id) {
                Some(courier) => {
                    let view = CourierView::new(id, courier, Vec::new());
                    LiveChange::CourierMoved {
                        courier_id: id,
                        position: view.position,
                        at_ms: view.at_ms,
                        speed_mps: view.speed_mps,
                        heading_deg: view.heading_deg,
                        odometer_m: view.odometer_m,
                    }
                }
                None => LiveChange::CourierRemoved { courier_id: id },
            });
        }
        for ((courier_id, zone_id), entered) in touched.inside {
            changes.push(if entered {
                LiveChange::GeofenceEntered {
                    courier_id,
                    zone_id,
                }
            } else {
                LiveChange::GeofenceExited {
                    courier_id,
                    zone_id,
                }
            });
        }
        for (id, previous_status) in touched.deliveries {
            changes.push(match self.deliveries.get(&id) {
                Some(delivery) => LiveChange::DeliveryStatus {
                    delivery_id: id,
                    status: delivery.status,
                    previous_status,
                    courier_id: delivery.courier_id,
                    dropoff: delivery.dropoff.into(),
                    version: delivery.version,
                },
                None => LiveChange::DeliveryRemoved { delivery_id: id },
            });
        }
        for id in touched.etas {
            changes.push(match self.etas.get(&id) {
                Some(eta) => LiveChange::Eta {
                    delivery_id: id,
                    eta: EtaView::from(eta),
                },
                None => LiveChange::EtaCleared { delivery_id: id },
            });
        }
        for scope in touched.metrics {
            changes.push(match self.metrics.get(&scope) {
                Some(tally) => LiveChange::Metric {
                    scope: scope.into(),
                    metrics: MetricSummary::from(tally),
                },
                None => LiveChange::MetricCleared {
                    scope: scope.into(),
                },
            });
        }
        changes
    }

    /// The zones a courier is inside.
    fn zones_of(&self, courier: CourierId) -> Vec<ZoneId> {
        self.inside
            .range((courier, ZoneId(Default::default()))..)
            .take_while(|(c, _)| *c == courier)
            .map(|(_, zone)| *zone)
            .collect()
    }

    /// One courier with its zones, aggregates and active deliveries.
    pub fn courier(&self, id: CourierId) -> Option<CourierDetail> {
        let state = self.couriers.get(&id)?;
        let active_deliveries = self
            .deliveries
            .iter()
            .filter(|(_, d)| d.courier_id == Some(id) && is_active(d.status))
            .map(|(delivery, _)| *delivery)
            .collect();
        Some(CourierDetail {
            courier: CourierView::new(id, state, self.zones_of(id)),
            metrics: self
                .metrics
                .get(&Scope::Courier(id))
                .map(MetricSummary::from),
            active_deliveries,
        })
    }

    /// Why the dataflow refused event `id`, if it did among the latest
    /// [`RECENT_REFUSALS`] refusals.
    pub fn refusal(&self, id: EventId) -> Option<&RejectReason> {
        self.recent_refusals
            .iter()
            .rev()
            .find(|(event_id, _)| *event_id == id)
            .map(|(_, reason)| reason)
    }

    /// One delivery with its ETA and dropoff zones.
    pub fn delivery(&self, id: DeliveryId) -> Option<DeliveryView> {
        let state = self.deliveries.get(&id)?;
        let zones = self
            .dropoff_zones
            .range((id, ZoneId(Default::default()))..)
            .take_while(|(d, _)| *d == id)
            .map(|(_, zone)| *zone)
            .collect();
        Some(DeliveryView::new(id, state, self.etas.get(&id), zones))
    }

    /// The aggregates of one scope, if it has any.
    pub fn metrics(&self, scope: Scope) -> Option<MetricSummary> {
        self.metrics.get(&scope).map(MetricSummary::from)
    }

    /// Collection sizes.
    pub fn counts(&self) -> Counts {
        let mut by_status = BTreeMap::new();
        for delivery in self.deliveries.values() {
            *by_status.entry(delivery.status).or_default() += 1;
        }
        Counts {
            couriers: self.couriers.len(),
            zones: self.zones.len(),
            deliveries: self.deliveries.len(),
            active_deliveries: self
                .deliveries
                .values()
                .filter(|d| is_active(d.status))
                .count(),
            deliveries_by_status: by_status,
            inside: self.inside.len(),
            etas: self.etas.len(),
        }
    }

    /// Everything a dashboard shows, at once.
    pub fn snapshot(&self) -> Snapshot {
        let scoped = |keep: fn(&Scope) -> bool| -> Vec<ScopedMetrics> {
            self.metrics
                .iter()
                .filter(|(scope, _)| keep(scope))
                .map(|(scope, tally)| ScopedMetrics {
                    scope: (*scope).into(),
                    metrics: tally.into(),
                })
                .collect()
        };
        let mut inside: BTreeMap<CourierId, Vec<ZoneId>> = BTreeMap::new();
        for (courier, zone) in &self.inside {
            inside.entry(*courier).or_default().push(*zone);
        }
        Snapshot {
            epoch: self.epoch,
            counts: self.counts(),
            overall: self
                .metrics
                .get(&Scope::Overall)
                .map(MetricSummary::from)
                .unwrap_or_else(|| MetricSummary::from(&Tally::default())),
            per_courier: scoped(|s| matches!(s, Scope::Courier(_))),
            per_zone: scoped(|s| matches!(s, Scope::DropoffZone(_))),
            per_hour: scoped(|s| matches!(s, Scope::HourOfDay(_))),
            per_weekday_hour: scoped(|s| matches!(s, Scope::WeekdayHour(..))),
            couriers: self
                .couriers
                .iter()
                .map(|(id, state)| {
                    CourierView::new(*id, state, inside.remove(id).unwrap_or_default())
                })
                .collect(),
            zones: self
                .zones
                .iter()
                .map(|(id, state)| ZoneView::new(*id, state))
                .collect(),
            rejections: self.rejections.clone(),
        }
    }
}

/// Assigned, picked up or in transit.
fn is_active(status: Status) -> bool {
    matches!(
        status,
        Status::Assigned | Status::PickedUp | Status::InTransit
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod tests {
    use super::*;
    use delivertrack_dataflow::EventKind;
    use delivertrack_dataflow::geometry::{GeoPoint, ZoneShape};
    use delivertrack_dataflow::ids::{CustomerId, EventId};
    use delivertrack_dataflow::model::{RejectReason, Rejection};
    use geo::{MultiPolygon, polygon};
    use uuid::Uuid;

    pub(crate) fn courier_id(n: u128) -> CourierId {
        CourierId(Uuid::from_u128(n))
    }

    pub(crate) fn zone_id(n: u128) -> ZoneId {
        ZoneId(Uuid::from_u128(0x100 + n))
    }

    pub(crate) fn delivery_id(n: u128) -> DeliveryId {
        DeliveryId(Uuid::from_u128(0x200 + n))
    }

    pub(crate) fn courier(lat: f64, lon: f64, at: i64) -> CourierState {
        CourierState {
            position: GeoPoint::from_degrees(lat, lon),
            at,
            event_id: EventId(Uuid::from_u128(at as u128)),
            speed_mm_s: Some(5_000),
            heading_ddeg: Some(900),
            odometer_mm: 1_500_000,
            active_hours: 1,
            presence: Vec::new(),
        }
    }

    pub(crate) fn zone(name: &str) -> ZoneState {
        ZoneState {
            name: name.into(),
            shape: ZoneShape(MultiPolygon(vec![polygon![
                (x: 13.0, y: 52.0), (x: 13.1, y: 52.0), (x: 13.1, y: 52.1), (x: 13.0, y: 52.1), (x: 13.0, y: 52.0)
            ]])),
            dwell_ms: 0,
            updated_at: 0,
            event_id: EventId(Uuid::from_u128(7)),
        }
    }

    pub(crate) fn delivery(
        status: Status,
        courier: Option<CourierId>,
        version: u32,
    ) -> DeliveryState {
        DeliveryState {
            customer_id: CustomerId(Uuid::from_u128(0x300)),
            courier_id: courier,
            pickup: GeoPoint::from_degrees(52.01, 13.01),
            dropoff: GeoPoint::from_degrees(52.05, 13.05),
            promised_by: Some(10_000),
            status,
            created_at: 1_000,
            assigned_at: courier.map(|_| 2_000),
            picked_up_at: None,
            ended_at: None,
            rating: None,
            version,
        }
    }

    pub(crate) fn output(epoch: Epoch, changes: Vec<(Change, i64)>) -> EpochOutput {
        EpochOutput {
            restored: false,
            epoch,
            changes,
            rejections: Vec::new(),
            events: Vec::new(),
        }
    }

    fn tally(deliveries: i64, delivered: i64, failed: i64) -> Tally {
        Tally {
            deliveries,
            delivered,
            failed,
            ..Tally::default()
        }
    }

    #[test]
    fn inserts_then_upserts_leave_the_newest_records() {
        let (c1, z1, d1) = (courier_id(1), zone_id(1), delivery_id(1));
        let mut state = ReadState::default();
        state
            .apply(&output(
                0,
                vec![
                    (Change::Zone(z1, zone("Mitte")), 1),
                    (Change::Courier(c1, courier(52.05, 13.05, 1_000)), 1),
                    (Change::Inside(c1, z1), 1),
                    (Change::Delivery(d1, delivery(Status::Created, None, 1)), 1),
                    (Change::DropoffZone(d1, z1), 1),
                    (Change::Metric(Scope::Overall, tally(1, 0, 0)), 1),
                ],
            ))
            .unwrap();
        assert_eq!(state.counts().couriers, 1);
        assert_eq!(state.courier(c1).unwrap().courier.inside, vec![z1]);
        assert_eq!(state.delivery(d1).unwrap().dropoff_zones, vec![z1]);

        // Epoch 1: the courier moves out of the zone, the delivery is assigned. The
        // insertions come first in the batch on purpose: retractions must still win order.
        let update = state
            .apply(&output(
                1,
                vec![
                    (Change::Courier(c1, courier(52.5, 13.5, 2_000)), 1),
                    (
                        Change::Delivery(d1, delivery(Status::Assigned, Some(c1), 2)),
                        1,
                    ),
                    (Change::Metric(Scope::Overall, tally(1, 0, 0)), -1),
                    (Change::Metric(Scope::Overall, tally(1, 1, 0)), 1),
                    (Change::Courier(c1, courier(52.05, 13.05, 1_000)), -1),
                    (Change::Inside(c1, z1), -1),
                    (Change::Delivery(d1, delivery(Status::Created, None, 1)), -1),
                ],
            ))
            .unwrap();
        assert_eq!(state.mismatches, 0);
        assert_eq!(state.couriers[&c1].at, 2_000);
        assert!(state.inside.is_empty());
        let d = state.delivery(d1).unwrap();
        assert_eq!(
            (d.details.status, d.details.courier_id, d.details.version),
            (Status::Assigned, Some(c1), 2)
        );
        assert_eq!(state.courier(c1).unwrap().active_deliveries, vec![d1]);
        assert_eq!(state.snapshot().overall.delivered, 1);
        assert_eq!(state.snapshot().overall.success_rate, Some(1.0));

        assert_eq!(update.epoch, 1);
        assert!(update.changes.contains(&LiveChange::GeofenceExited {
            courier_id: c1,
            zone_id: z1
        }));
        assert!(update.changes.iter().any(|c| matches!(
            c,
            LiveChange::DeliveryStatus {
                status: Status::Assigned,
                previous_status: Some(Status::Created),
                ..
            }
        )));
        assert!(
            update
                .changes
                .iter()
                .any(|c| matches!(c, LiveChange::CourierMoved { at_ms: 2_000, .. }))
        );
        assert!(
            update
                .changes
                .iter()
                .any(|c| matches!(c, LiveChange::Metric { metrics, .. } if metrics.delivered == 1))
        );
    }

    #[test]
    fn retractions_remove_records_and_report_removals() {
        let (c1, z1, d1) = (courier_id(1), zone_id(1), delivery_id(1));
        let eta = Eta {
            courier_id: c1,
            status: Status::Assigned,
            remaining_m: 900,
            speed_mm_s: 5_000,
            eta_at: 5_000,
            as_of: 1_000,
        };
        let mut state = ReadState::default();
        state.apply(&output(
            0,
            vec![
                (Change::Zone(z1, zone("Mitte")), 1),
                (Change::Courier(c1, courier(52.05, 13.05, 1_000)), 1),
                (Change::Inside(c1, z1), 1),
                (
                    Change::Delivery(d1, delivery(Status::Assigned, Some(c1), 2)),
                    1,
                ),
                (Change::Eta(d1, eta.clone()), 1),
                (Change::Metric(Scope::Courier(c1), tally(1, 0, 0)), 1),
            ],
        ));
        let update = state
            .apply(&output(
                1,
                vec![
                    (Change::Zone(z1, zone("Mitte")), -1),
                    (Change::Inside(c1, z1), -1),
                    (Change::Eta(d1, eta), -1),
                    (Change::Metric(Scope::Courier(c1), tally(1, 0, 0)), -1),
                ],
            ))
            .unwrap();
        assert!(state.zones.is_empty() && state.etas.is_empty() && state.metrics.is_empty());
        assert_eq!(state.mismatches, 0);
        assert!(
            update
                .changes
                .contains(&LiveChange::ZoneDeleted { zone_id: z1 })
        );
        assert!(
            update
                .changes
                .contains(&LiveChange::EtaCleared { delivery_id: d1 })
        );
        assert!(update.changes.contains(&LiveChange::MetricCleared {
            scope: ScopeView::Courier { courier_id: c1 }
        }));
        assert!(state.delivery(d1).unwrap().details.eta.is_none());
    }

    #[test]
    fn a_replayed_epoch_is_a_no_op() {
        let c1 = courier_id(1);
        let mut state = ReadState::default();
        let first = output(0, vec![(Change::Courier(c1, courier(52.0, 13.0, 1)), 1)]);
        assert!(state.apply(&first).is_some());
        assert!(state.apply(&first).is_none());
        assert_eq!(state.couriers.len(), 1);
        assert_eq!(state.mismatches, 0);
    }

    #[test]
    fn a_retraction_of_an_unknown_record_is_counted() {
        let mut state = ReadState::default();
        state.apply(&output(
            0,
            vec![(Change::Courier(courier_id(9), courier(52.0, 13.0, 1)), -1)],
        ));
        assert_eq!(state.mismatches, 1);
        assert!(state.couriers.is_empty());
    }

    #[test]
    fn the_latest_refusals_are_remembered_by_event_and_bounded() {
        let mut state = ReadState::default();
        let refused = |n: u128| Rejection {
            event_id: EventId(Uuid::from_u128(n)),
            kind: EventKind::DeliveryRated,
            reason: RejectReason::TooManyRatings { max: 5 },
        };
        let mut first = output(0, vec![]);
        first.rejections.push(refused(1));
        state.apply(&first);
        assert_eq!(
            state.refusal(EventId(Uuid::from_u128(1))),
            Some(&RejectReason::TooManyRatings { max: 5 })
        );
        assert_eq!(state.refusal(EventId(Uuid::from_u128(2))), None);
        let mut many = output(1, vec![]);
        many.rejections = (2..=RECENT_REFUSALS as u128 + 1).map(refused).collect();
        state.apply(&many);
        assert_eq!(state.recent_refusals.len(), RECENT_REFUSALS);
        assert_eq!(
            state.refusal(EventId(Uuid::from_u128(1))),
            None,
            "forgotten"
        );
        assert!(state.refusal(EventId(Uuid::from_u128(2))).is_some());
    }

    #[test]
    fn the_snapshot_groups_aggregates_by_scope_and_counts_rejections() {
        let (c1, z1) = (courier_id(1), zone_id(1));
        let mut state = ReadState::default();
        let mut out = output(
            0,
            vec![
                (Change::Metric(Scope::Overall, tally(4, 2, 1)), 1),
                (Change::Metric(Scope::Courier(c1), tally(2, 1, 1)), 1),
                (Change::Metric(Scope::DropoffZone(z1), tally(1, 1, 0)), 1),
                (Change::Metric(Scope::HourOfDay(12), tally(4, 2, 1)), 1),
                (Change::Metric(Scope::WeekdayHour(0, 12), tally(4, 2, 1)), 1),
                (
                    Change::Delivery(delivery_id(1), delivery(Status::Created, None, 1)),
                    1,
                ),
            ],
        );
        out.rejections.push(Rejection {
            event_id: EventId(Uuid::from_u128(1)),
            kind: EventKind::StatusChanged,
            reason: RejectReason::UnknownDelivery,
        });
        state.apply(&out);
        let snapshot = state.snapshot();
        assert_eq!(snapshot.epoch, Some(0));
        assert_eq!(snapshot.overall.success_rate, Some(2.0 / 3.0));
        assert_eq!(snapshot.per_courier.len(), 1);
        assert_eq!(snapshot.per_courier[0].metrics.success_rate, Some(0.5));
        assert_eq!(
            snapshot.per_zone[0].scope,
            ScopeView::DropoffZone { zone_id: z1 }
        );
        assert_eq!(
            snapshot.per_hour[0].scope,
            ScopeView::HourOfDay { hour: 12 }
        );
        assert_eq!(snapshot.per_weekday_hour.len(), 1);
        assert_eq!(snapshot.counts.deliveries_by_status[&Status::Created], 1);
        assert_eq!(snapshot.rejections["unknown_delivery"], 1);

        let json = serde_json::to_value(&snapshot).unwrap();
        assert_eq!(json["per_courier"][0]["scope"]["kind"], "courier");
        assert_eq!(json["per_courier"][0]["delivered"], 1);
        assert_eq!(json["counts"]["deliveries_by_status"]["created"], 1);
    }
}
