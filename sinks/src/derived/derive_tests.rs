//! The derivation, epoch output → derived events, on hand-made epochs: no broker.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use delivertrack_dataflow::event::{Event, EventBody, ZoneDeleted};
use delivertrack_dataflow::geometry::GeoPoint;
use delivertrack_dataflow::model::{CourierState, DeliveryState, Eta, Rating};
use delivertrack_dataflow::{
    Change, CourierId, CustomerId, DeliveryId, EpochOutput, EventId, Status, ZoneId,
};
use uuid::Uuid;

use super::derive::{CompletionReason, DerivedBody, DerivedKind, Deriver};

const T0: i64 = 1_796_025_600_000;
const MIN: i64 = 60_000;

fn uuid(n: u128) -> Uuid {
    Uuid::from_u128(0xde00_0000_0000_0000_0000_0000_0000_0000 | n)
}
fn courier(n: u128) -> CourierId {
    CourierId(uuid(0x100 + n))
}
fn zone(n: u128) -> ZoneId {
    ZoneId(uuid(0x200 + n))
}
fn delivery(n: u128) -> DeliveryId {
    DeliveryId(uuid(0x300 + n))
}

fn epoch(epoch: u64, changes: Vec<(Change, i64)>) -> EpochOutput {
    EpochOutput {
        epoch,
        changes,
        ..EpochOutput::default()
    }
}

fn fix(c: CourierId, at: i64) -> Change {
    Change::Courier(
        c,
        CourierState {
            position: GeoPoint::from_degrees(52.52, 13.40),
            at,
            event_id: EventId(uuid(at as u128)),
            speed_mm_s: None,
            heading_ddeg: None,
            odometer_mm: 0,
            active_hours: 1,
            presence: Vec::new(),
        },
    )
}

fn state(status: Status, promised_by: Option<i64>) -> DeliveryState {
    DeliveryState {
        customer_id: CustomerId(uuid(0x400)),
        courier_id: (!matches!(status, Status::Created | Status::Cancelled)).then(|| courier(1)),
        pickup: GeoPoint::from_degrees(52.52, 13.40),
        dropoff: GeoPoint::from_degrees(52.53, 13.41),
        promised_by,
        status,
        created_at: T0,
        assigned_at: None,
        picked_up_at: None,
        ended_at: status.is_terminal().then_some(T0 + 25 * MIN),
        rating: None,
        version: 1,
    }
}

fn eta(eta_at: i64, as_of: i64) -> Eta {
    Eta {
        courier_id: courier(1),
        status: Status::InTransit,
        remaining_m: 1_200,
        speed_mm_s: 5_000,
        eta_at,
        as_of,
    }
}

fn kinds(events: &[super::DerivedEvent]) -> Vec<DerivedKind> {
    events.iter().map(|e| e.kind()).collect()
}

#[test]
fn every_inside_change_is_one_transition_dated_by_the_fix_or_the_zone_change() {
    let deriver = Deriver::new(Duration::from_secs(60));
    let mut output = epoch(
        3,
        vec![
            (fix(courier(1), T0 + 5_000), 1),
            (Change::Inside(courier(1), zone(1)), 1),
            (Change::Inside(courier(1), zone(2)), -1),
            (Change::Inside(courier(2), zone(3)), -1),
            (Change::Inside(courier(3), zone(4)), 1),
        ],
    );
    // Zone 3 was deleted in this epoch; courier 3 moved nowhere, so its entry is dated by
    // the epoch's newest event.
    output.events = vec![
        Event {
            event_id: EventId(uuid(1)),
            occurred_at: T0 + 7_000,
            body: EventBody::ZoneDeleted(ZoneDeleted { zone_id: zone(3) }),
        },
        Event {
            event_id: EventId(uuid(2)),
            occurred_at: T0 + 9_000,
            body: EventBody::ZoneDeleted(ZoneDeleted { zone_id: zone(9) }),
        },
    ];
    let events = deriver.derive(&output).events;
    assert_eq!(events.len(), 4);
    let at = |courier_id: CourierId, zone_id: ZoneId| {
        events
            .iter()
            .find_map(|e| match &e.body {
                DerivedBody::GeofenceEntered(g) | DerivedBody::GeofenceExited(g)
                    if g.courier_id == courier_id && g.zone_id == zone_id =>
                {
                    Some((e.kind(), g.at, e.occurred_at))
                }
                _ => None,
            })
            .unwrap()
    };
    assert_eq!(
        at(courier(1), zone(1)),
        (DerivedKind::GeofenceEntered, T0 + 5_000, T0 + 5_000)
    );
    assert_eq!(at(courier(1), zone(2)).0, DerivedKind::GeofenceExited);
    assert_eq!(
        at(courier(2), zone(3)),
        (DerivedKind::GeofenceExited, T0 + 7_000, T0 + 7_000)
    );
    assert_eq!(
        at(courier(3), zone(4)),
        (DerivedKind::GeofenceEntered, T0 + 9_000, T0 + 9_000)
    );
    // Sorted by time.
    assert!(
        events
            .windows(2)
            .all(|w| w[0].occurred_at <= w[1].occurred_at)
    );
}

#[test]
fn eta_updates_only_beyond_the_threshold_from_the_last_published_one() {
    let mut deriver = Deriver::new(Duration::from_secs(60));
    let d = delivery(1);
    let mut step = |n: u64, old: Option<Eta>, new: Eta| {
        let mut changes = vec![(Change::Eta(d, new), 1)];
        if let Some(old) = old {
            changes.push((Change::Eta(d, old), -1));
        }
        let derivation = deriver.derive(&epoch(n, changes));
        let events = derivation.events.clone();
        deriver.apply(derivation);
        events
            .into_iter()
            .filter_map(|e| match e.body {
                DerivedBody::EtaUpdated(u) => Some((u.eta_at, u.previous_eta_at)),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    let base = T0 + 20 * MIN;
    // First appearance: published, with no previous.
    assert_eq!(step(0, None, eta(base, T0)), vec![(base, None)]);
    // 30 s: not more than 60 s.
    assert_eq!(
        step(1, Some(eta(base, T0)), eta(base + 30_000, T0 + 5_000)),
        vec![]
    );
    // Exactly 60 s from the published one: not *more* than the threshold.
    assert_eq!(
        step(
            2,
            Some(eta(base + 30_000, T0 + 5_000)),
            eta(base + 60_000, T0 + 10_000)
        ),
        vec![]
    );
    // Drift: 61 s from the published one, though 1 s from the last estimate.
    assert_eq!(
        step(
            3,
            Some(eta(base + 60_000, T0 + 10_000)),
            eta(base + 61_000, T0 + 15_000)
        ),
        vec![(base + 61_000, Some(base))]
    );
    // Earlier by two minutes: a move either way counts.
    assert_eq!(
        step(
            4,
            Some(eta(base + 61_000, T0 + 15_000)),
            eta(base - 59_000, T0 + 20_000)
        ),
        vec![(base - 59_000, Some(base + 61_000))]
    );
    // Ended: the memory of the delivery goes.
    let mut ended = state(Status::Delivered, None);
    ended.courier_id = Some(courier(1));
    let derivation = deriver.derive(&epoch(
        5,
        vec![
            (Change::Delivery(d, state(Status::InTransit, None)), -1),
            (Change::Delivery(d, ended), 1),
            (Change::Eta(d, eta(base - 59_000, T0 + 20_000)), -1),
        ],
    ));
    assert_eq!(
        kinds(&derivation.events),
        vec![DerivedKind::DeliveryCompleted]
    );
    deriver.apply(derivation);
    assert_eq!(deriver.tracked(), 0);
}

#[test]
fn a_zero_threshold_publishes_every_move_and_nothing_else() {
    let deriver = Deriver::new(Duration::ZERO);
    let d = delivery(1);
    let mut deriver = deriver;
    let first = deriver.derive(&epoch(0, vec![(Change::Eta(d, eta(T0 + MIN, T0)), 1)]));
    deriver.apply(first);
    // The same arrival from a newer fix (the status changed, say): no move, no message.
    let same = deriver.derive(&epoch(
        1,
        vec![
            (Change::Eta(d, eta(T0 + MIN, T0)), -1),
            (Change::Eta(d, eta(T0 + MIN, T0 + 1_000)), 1),
        ],
    ));
    assert!(same.events.is_empty());
    let moved = deriver.derive(&epoch(
        1,
        vec![
            (Change::Eta(d, eta(T0 + MIN, T0)), -1),
            (Change::Eta(d, eta(T0 + MIN + 1, T0 + 1_000)), 1),
        ],
    ));
    assert_eq!(kinds(&moved.events), vec![DerivedKind::EtaUpdated]);
}

#[test]
fn derive_is_pure_until_applied_so_a_retry_gives_the_same_ids() {
    let mut deriver = Deriver::new(Duration::from_secs(60));
    let output = epoch(
        7,
        vec![
            (
                Change::Delivery(delivery(1), state(Status::InTransit, Some(T0 + 10 * MIN))),
                1,
            ),
            (Change::Eta(delivery(1), eta(T0 + 12 * MIN, T0)), 1),
            (Change::Inside(courier(1), zone(1)), 1),
        ],
    );
    let first = deriver.derive(&output);
    let again = deriver.derive(&output);
    assert_eq!(first.events, again.events);
    assert_eq!(
        kinds(&first.events),
        vec![
            DerivedKind::GeofenceEntered,
            DerivedKind::EtaUpdated,
            DerivedKind::DeliveryDelayed
        ]
    );
    // Another deriver in another process (a restart replaying the input) agrees too, even
    // under another epoch number.
    let elsewhere = Deriver::new(Duration::from_secs(60)).derive(&EpochOutput {
        epoch: 0,
        ..output.clone()
    });
    assert_eq!(first.events, elsewhere.events);
    deriver.apply(first);
    // Once applied, the same estimate is old news.
    let later = deriver.derive(&output);
    assert_eq!(kinds(&later.events), vec![DerivedKind::GeofenceEntered]);
}

#[test]
fn completion_carries_duration_on_time_and_rating_and_a_late_rating_is_a_second_one() {
    let mut deriver = Deriver::new(Duration::from_secs(60));
    let d = delivery(1);
    let before = state(Status::InTransit, Some(T0 + 30 * MIN));
    let mut delivered = state(Status::Delivered, Some(T0 + 30 * MIN));
    let derivation = deriver.derive(&epoch(
        1,
        vec![
            (Change::Delivery(d, before.clone()), -1),
            (Change::Delivery(d, delivered.clone()), 1),
        ],
    ));
    let [event] = derivation.events.as_slice() else {
        panic!("one completion: {:?}", derivation.events);
    };
    let DerivedBody::DeliveryCompleted(c) = &event.body else {
        panic!("{event:?}");
    };
    assert_eq!(c.reason, CompletionReason::Ended);
    assert_eq!(c.duration_ms, 25 * MIN);
    assert_eq!(c.on_time, Some(true));
    assert_eq!(c.rating, None);
    assert_eq!(event.occurred_at, T0 + 25 * MIN);
    let json = event.to_json();
    assert_eq!(json["duration_seconds"], 1_500.0);
    assert_eq!(json["status"], "delivered");
    assert_eq!(json["reason"], "ended");
    let ended_id = event.event_id;
    deriver.apply(derivation);

    // The rating arrives later: the completion again, with it.
    let mut rated = delivered.clone();
    rated.rating = Some(Rating {
        score: 4,
        comment: None,
        at: T0 + 40 * MIN,
    });
    rated.version = 2;
    let derivation = deriver.derive(&epoch(
        2,
        vec![
            (Change::Delivery(d, delivered.clone()), -1),
            (Change::Delivery(d, rated.clone()), 1),
        ],
    ));
    let [event] = derivation.events.as_slice() else {
        panic!("one completion: {:?}", derivation.events);
    };
    let DerivedBody::DeliveryCompleted(c) = &event.body else {
        panic!("{event:?}");
    };
    assert_eq!(c.reason, CompletionReason::Rated);
    assert_eq!(c.rating, Some(4));
    assert_eq!(event.occurred_at, T0 + 40 * MIN);
    assert_ne!(event.event_id, ended_id);

    // Any other change of an ended delivery (its version, say) says nothing.
    let mut touched = rated.clone();
    touched.version = 3;
    let quiet = deriver.derive(&epoch(
        3,
        vec![
            (Change::Delivery(d, rated), -1),
            (Change::Delivery(d, touched), 1),
        ],
    ));
    assert!(quiet.events.is_empty());

    // Late, failed and cancelled.
    delivered.ended_at = Some(T0 + 31 * MIN);
    let late = deriver.derive(&epoch(
        4,
        vec![
            (Change::Delivery(delivery(2), before.clone()), -1),
            (Change::Delivery(delivery(2), delivered), 1),
            (Change::Delivery(delivery(3), before), -1),
            (
                Change::Delivery(delivery(3), state(Status::Failed, Some(T0 + 30 * MIN))),
                1,
            ),
            (
                Change::Delivery(delivery(4), state(Status::Cancelled, None)),
                1,
            ),
        ],
    ));
    let completed: Vec<_> = late
        .events
        .iter()
        .map(|e| match &e.body {
            DerivedBody::DeliveryCompleted(c) => (c.delivery_id, c.status, c.on_time),
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(completed.contains(&(delivery(2), Status::Delivered, Some(false))));
    assert!(completed.contains(&(delivery(3), Status::Failed, None)));
    assert!(completed.contains(&(delivery(4), Status::Cancelled, None)));
}

#[test]
fn delayed_once_until_back_on_time() {
    let mut deriver = Deriver::new(Duration::from_secs(3_600));
    let d = delivery(1);
    let promise = T0 + 30 * MIN;
    let mut previous: Option<Eta> = None;
    let mut run = |n: u64, deriver: &mut Deriver, new: Eta, with_state: bool| {
        let mut changes = vec![(Change::Eta(d, new.clone()), 1)];
        if let Some(old) = previous.replace(new) {
            changes.push((Change::Eta(d, old), -1));
        }
        if with_state {
            changes.push((
                Change::Delivery(d, state(Status::Assigned, Some(promise))),
                1,
            ));
        }
        let derivation = deriver.derive(&epoch(n, changes));
        let delayed: Vec<_> = derivation
            .events
            .iter()
            .filter_map(|e| match &e.body {
                DerivedBody::DeliveryDelayed(x) => Some((x.promised_by, x.eta_at)),
                _ => None,
            })
            .collect();
        deriver.apply(derivation);
        delayed
    };
    assert_eq!(run(0, &mut deriver, eta(promise - MIN, T0), true), vec![]);
    assert_eq!(
        run(1, &mut deriver, eta(promise + MIN, T0 + 1_000), false),
        vec![(promise, promise + MIN)]
    );
    // Still late: nothing more.
    assert_eq!(
        run(2, &mut deriver, eta(promise + 5 * MIN, T0 + 2_000), false),
        vec![]
    );
    // Exactly on the promise is on time; late again is a new notification.
    assert_eq!(
        run(3, &mut deriver, eta(promise, T0 + 3_000), false),
        vec![]
    );
    assert_eq!(
        run(4, &mut deriver, eta(promise + 1, T0 + 4_000), false),
        vec![(promise, promise + 1)]
    );
}

#[test]
fn without_a_promise_nothing_is_delayed() {
    let deriver = Deriver::new(Duration::from_secs(60));
    let output = epoch(
        0,
        vec![
            (
                Change::Delivery(delivery(1), state(Status::Assigned, None)),
                1,
            ),
            (Change::Eta(delivery(1), eta(T0 + 999 * MIN, T0)), 1),
        ],
    );
    assert_eq!(
        kinds(&deriver.derive(&output).events),
        vec![DerivedKind::EtaUpdated]
    );
}

#[test]
fn the_wire_form_has_the_envelope_and_the_same_keys_for_every_message_of_a_kind() {
    let deriver = Deriver::new(Duration::from_secs(60));
    let output = epoch(
        0,
        vec![
            (fix(courier(1), T0), 1),
            (Change::Inside(courier(1), zone(1)), 1),
            (
                Change::Delivery(delivery(1), state(Status::Assigned, Some(T0))),
                1,
            ),
            (Change::Eta(delivery(1), eta(T0 + MIN, T0)), 1),
            (
                Change::Delivery(delivery(2), state(Status::Cancelled, None)),
                1,
            ),
        ],
    );
    let events = deriver.derive(&output).events;
    for event in &events {
        let json = event.to_json();
        assert_eq!(json["v"], 1);
        assert_eq!(json["kind"], event.kind().as_str());
        assert_eq!(json["event_id"], event.event_id.to_string());
        assert_eq!(event.event_id.get_version_num(), 5);
        let at = json["occurred_at"].as_str().unwrap();
        assert!(at.ends_with('Z'), "{at}");
        chrono::DateTime::parse_from_rfc3339(at).unwrap();
    }
    let eta = events
        .iter()
        .find(|e| e.kind() == DerivedKind::EtaUpdated)
        .unwrap()
        .to_json();
    assert_eq!(eta["previous_eta_at"], serde_json::Value::Null);
    assert_eq!(eta["remaining_m"], 1_200);
    assert_eq!(eta["eta_at"], "2026-11-30T08:01:00Z");
    let cancelled = events
        .iter()
        .find(|e| e.kind() == DerivedKind::DeliveryCompleted)
        .unwrap()
        .to_json();
    assert_eq!(cancelled["courier_id"], serde_json::Value::Null);
    assert_eq!(cancelled["on_time"], serde_json::Value::Null);
    assert_eq!(cancelled["rating"], serde_json::Value::Null);
}

#[test]
fn a_restored_epoch_publishes_nothing_but_primes_the_memory() {
    let mut deriver = Deriver::new(Duration::from_secs(60));
    let d = delivery(1);
    let promise = T0 + 30 * MIN;
    let restored = EpochOutput {
        restored: true,
        ..epoch(
            0,
            vec![
                (fix(courier(1), T0), 1),
                (Change::Inside(courier(1), zone(1)), 1),
                (
                    Change::Delivery(d, state(Status::InTransit, Some(promise))),
                    1,
                ),
                (Change::Eta(d, eta(promise + MIN, T0)), 1),
                (
                    Change::Delivery(delivery(2), state(Status::Delivered, None)),
                    1,
                ),
            ],
        )
    };
    let derivation = deriver.derive(&restored);
    assert!(derivation.events.is_empty());
    deriver.apply(derivation);
    assert_eq!(deriver.tracked(), 1);
    // The restored estimate counts as published, and the delay as notified.
    let next = deriver.derive(&epoch(
        1,
        vec![
            (Change::Eta(d, eta(promise + MIN, T0)), -1),
            (Change::Eta(d, eta(promise + MIN + 30_000, T0 + 5_000)), 1),
        ],
    ));
    assert!(next.events.is_empty(), "{:?}", next.events);
}

/// The `~~~json` examples of docs/events.md's "Derived events" section (fenced with tildes
/// so that the input contract's test, which decodes every ```json block, leaves them alone).
fn documented_examples() -> Vec<serde_json::Value> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/events.md");
    let docs = std::fs::read_to_string(path).expect("docs/events.md exists");
    let section = docs
        .split("## Derived events")
        .nth(1)
        .expect("docs/events.md has the derived events section");
    let mut examples = Vec::new();
    let mut current: Option<String> = None;
    for line in section.lines() {
        match (&mut current, line.trim_start()) {
            (None, fence) if fence.starts_with("~~~json") => current = Some(String::new()),
            (Some(_), fence) if fence.starts_with("~~~") => {
                examples.push(serde_json::from_str(&current.take().unwrap()).unwrap());
            }
            (Some(block), _) => block.push_str(line),
            (None, _) => {}
        }
    }
    examples
}

#[test]
fn the_documented_examples_have_the_keys_the_sink_publishes() {
    // One event of every kind, from the derivation itself.
    let d = delivery(1);
    let mut deriver = Deriver::new(Duration::from_secs(60));
    let first = deriver.derive(&epoch(
        0,
        vec![
            (Change::Delivery(d, state(Status::InTransit, Some(T0))), 1),
            (Change::Eta(d, eta(T0 + MIN, T0)), 1),
            (Change::Inside(courier(1), zone(1)), 1),
            (Change::Inside(courier(2), zone(1)), -1),
            (
                Change::Delivery(delivery(2), state(Status::Delivered, None)),
                1,
            ),
        ],
    ));
    let produced: std::collections::BTreeMap<String, Vec<String>> = first
        .events
        .iter()
        .map(|e| {
            let json = e.to_json();
            let keys = json.as_object().unwrap().keys().cloned().collect();
            (e.kind().as_str().to_owned(), keys)
        })
        .collect();
    deriver.apply(first);
    assert_eq!(produced.len(), DerivedKind::ALL.len(), "{produced:?}");

    let examples = documented_examples();
    assert_eq!(examples.len(), DerivedKind::ALL.len());
    for example in examples {
        let kind = example["kind"].as_str().unwrap();
        let keys: Vec<String> = example.as_object().unwrap().keys().cloned().collect();
        assert_eq!(Some(&keys), produced.get(kind), "{kind}");
        Uuid::parse_str(example["event_id"].as_str().unwrap()).unwrap();
    }
}
