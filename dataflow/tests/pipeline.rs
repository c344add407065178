//! The pipeline runner: epochs in order, replays harmless, bounded in-flight work.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use delivertrack_dataflow::event::*;
use delivertrack_dataflow::geometry::{GeoPoint, ZoneShape};
use delivertrack_dataflow::model::Scope;
use delivertrack_dataflow::pipeline::{self, DataflowConfig};
use delivertrack_dataflow::*;
use geo::{MultiPolygon, polygon};
use uuid::Uuid;

fn config(workers: usize) -> DataflowConfig {
    DataflowConfig {
        workers,
        max_epochs_in_flight: 2,
        ..DataflowConfig::default()
    }
}

fn event(id: u128, at: UnixMillis, body: EventBody) -> Event {
    Event {
        event_id: EventId(Uuid::from_u128(id)),
        occurred_at: at,
        body,
    }
}

fn fix(id: u128, at: UnixMillis, courier: u128, lat: f64, lon: f64) -> Event {
    event(
        id,
        at,
        EventBody::LocationUpdated(LocationUpdated {
            courier_id: CourierId(Uuid::from_u128(courier)),
            position: GeoPoint::from_degrees(lat, lon),
            speed_mm_s: None,
            heading_ddeg: None,
            accuracy_cm: None,
        }),
    )
}

fn square_zone(id: u128, at: UnixMillis) -> Event {
    let shape = ZoneShape(MultiPolygon(vec![polygon![
        (x: 13.0, y: 52.0), (x: 13.1, y: 52.0), (x: 13.1, y: 52.1), (x: 13.0, y: 52.1), (x: 13.0, y: 52.0)
    ]]));
    event(
        id,
        at,
        EventBody::ZoneUpserted(ZoneUpserted {
            zone_id: ZoneId(Uuid::from_u128(900)),
            name: "depot".into(),
            shape,
            dwell_ms: 0,
        }),
    )
}

fn lifecycle(first_id: u128, at: UnixMillis) -> Vec<Event> {
    let delivery_id = DeliveryId(Uuid::from_u128(500));
    let status = |n: u128, status, courier_id| {
        event(
            first_id + n,
            at + n as i64,
            EventBody::StatusChanged(StatusChanged {
                delivery_id,
                status,
                courier_id,
            }),
        )
    };
    vec![
        event(
            first_id,
            at,
            EventBody::DeliveryCreated(DeliveryCreated {
                delivery_id,
                customer_id: CustomerId(Uuid::from_u128(600)),
                pickup: GeoPoint::from_degrees(52.05, 13.05),
                dropoff: GeoPoint::from_degrees(52.06, 13.06),
                promised_by: None,
            }),
        ),
        status(1, Status::Assigned, Some(CourierId(Uuid::from_u128(1)))),
        status(2, Status::PickedUp, None),
        status(3, Status::InTransit, None),
    ]
}

#[test]
fn every_epoch_is_output_once_in_order_even_when_empty() {
    for workers in [1, 3] {
        let (mut sender, mut receiver) = pipeline::start(config(workers)).unwrap();
        let epochs = [
            vec![],
            vec![square_zone(1, 0)],
            vec![],
            vec![fix(2, 10, 1, 52.05, 13.05)],
            vec![],
        ];
        let expected = epochs.len() as u64;
        let feeder = std::thread::spawn(move || {
            for events in epochs {
                sender.send(events).unwrap();
            }
        });
        let outputs: Vec<EpochOutput> = std::iter::from_fn(|| receiver.recv()).collect();
        let epochs: Vec<Epoch> = outputs.iter().map(|output| output.epoch).collect();
        assert_eq!(epochs, (0..expected).collect::<Vec<_>>());
        // Each output carries its epoch's input, for the sinks that log raw events.
        let inputs: Vec<usize> = outputs.iter().map(|output| output.events.len()).collect();
        assert_eq!(inputs, vec![0, 1, 0, 1, 0]);
        assert_eq!(outputs[1].events[0].event_id, EventId(Uuid::from_u128(1)));
        feeder.join().unwrap();
        assert!(matches!(receiver.outcome(), Some(Ok(()))));
    }
}

#[test]
fn replaying_an_epoch_changes_nothing() {
    let (mut sender, mut receiver) = pipeline::start(config(2)).unwrap();
    let mut events = vec![
        square_zone(1, 0),
        fix(2, 10, 1, 52.05, 13.05),
        // 111 m north ten seconds later: a plausible move.
        fix(3, 10_010, 1, 52.051, 13.05),
    ];
    events.extend(lifecycle(10, 30));
    sender.send(events.clone()).unwrap();
    let first = receiver.recv().unwrap();
    assert!(
        first
            .changes
            .iter()
            .any(|(change, diff)| matches!(change, Change::Inside(..)) && *diff == 1)
    );
    assert!(
        first
            .changes
            .iter()
            .any(|(change, _)| matches!(change, Change::Eta(..)))
    );
    assert!(first.rejections.is_empty(), "{:?}", first.rejections);

    // The same messages again, as after a redelivery: no record changes. The older of the two
    // fixes is now behind the courier's latest and is reported stale (counted, not dead-lettered).
    sender.send(events).unwrap();
    let replay = receiver.recv().unwrap();
    assert_eq!(replay.changes, vec![]);
    assert_eq!(replay.rejections.len(), 1);
    assert_eq!(replay.rejections[0].reason, RejectReason::Stale);
    assert_eq!(replay.rejections[0].event_id, EventId(Uuid::from_u128(2)));
    sender.close();
    assert!(receiver.recv().is_none());
}

#[test]
fn an_older_fix_never_moves_a_courier_back_or_adds_distance() {
    let (mut sender, mut receiver) = pipeline::start(config(2)).unwrap();
    sender
        .send(vec![
            fix(1, 1_000, 7, 52.50, 13.40),
            fix(2, 61_000, 7, 52.51, 13.40),
        ])
        .unwrap();
    let first = receiver.recv().unwrap();
    let courier = |output: &EpochOutput| {
        output
            .changes
            .iter()
            .find_map(|(change, diff)| match change {
                Change::Courier(_, state) if *diff == 1 => Some(state.clone()),
                _ => None,
            })
    };
    let state = courier(&first).unwrap();
    assert_eq!(state.position, GeoPoint::from_degrees(52.51, 13.40));
    assert!(
        (1_100_000..1_125_000).contains(&state.odometer_mm),
        "{}",
        state.odometer_mm
    );
    assert!(
        state
            .speed_mm_s
            .is_some_and(|speed| (18_000..19_000).contains(&speed))
    );

    sender.send(vec![fix(3, 30_000, 7, 52.60, 13.40)]).unwrap();
    let late = receiver.recv().unwrap();
    assert_eq!(courier(&late), None, "the late fix changes nothing");
    assert_eq!(late.rejections[0].reason, RejectReason::Stale);

    let metric = first.changes.iter().find_map(|(change, _)| match change {
        Change::Metric(Scope::Courier(_), tally) => Some(*tally),
        _ => None,
    });
    assert_eq!(
        metric.map(|tally| tally.distance_mm),
        Some(state.odometer_mm as i64)
    );
    sender.close();
}

#[test]
fn input_is_refused_while_outputs_are_not_consumed() {
    let (mut sender, mut receiver) = pipeline::start(config(2)).unwrap();
    let sent = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&sent);
    let feeder = std::thread::spawn(move || {
        for n in 0..200u128 {
            if sender
                .send(vec![fix(n + 1, n as i64 * 1000, n % 5, 52.5, 13.4)])
                .is_err()
            {
                return;
            }
            counter.fetch_add(1, Ordering::SeqCst);
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let accepted = sent.load(Ordering::SeqCst);
    assert!(
        accepted < 40,
        "{accepted} epochs accepted with no output consumed"
    );
    // Consuming lets the rest through.
    let mut outputs = 0;
    while receiver.recv().is_some() {
        outputs += 1;
    }
    feeder.join().unwrap();
    assert_eq!(outputs, 200);
}
