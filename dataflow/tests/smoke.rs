#![allow(clippy::unwrap_used, clippy::expect_used)]
use delivertrack_dataflow::event::*;
use delivertrack_dataflow::geometry::*;
use delivertrack_dataflow::*;
use geo::{MultiPolygon, polygon};
use uuid::Uuid;

#[test]
fn smoke() {
    let (mut tx, mut rx) = pipeline::start(DataflowConfig {
        workers: 2,
        ..Default::default()
    })
    .unwrap();
    let zone = ZoneId(Uuid::from_u128(1));
    let courier = CourierId(Uuid::from_u128(2));
    let shape = ZoneShape(MultiPolygon(vec![
        polygon![(x: 13.0, y: 52.0), (x: 13.1, y: 52.0), (x: 13.1, y: 52.1), (x: 13.0, y: 52.1), (x: 13.0, y: 52.0)],
    ]));
    let e = |n: u128, t: i64, body| Event {
        event_id: EventId(Uuid::from_u128(n)),
        occurred_at: t,
        body,
    };
    tx.send(vec![e(
        10,
        0,
        EventBody::ZoneUpserted(ZoneUpserted {
            zone_id: zone,
            name: "z".into(),
            shape,
            dwell_ms: 0,
        }),
    )])
    .unwrap();
    tx.send(vec![e(
        11,
        1000,
        EventBody::LocationUpdated(LocationUpdated {
            courier_id: courier,
            position: GeoPoint::from_degrees(52.05, 13.05),
            speed_mm_s: None,
            heading_ddeg: None,
            accuracy_cm: None,
        }),
    )])
    .unwrap();
    tx.close();
    let a = rx.recv().unwrap();
    println!("{a:#?}");
    let b = rx.recv().unwrap();
    println!("{b:#?}");
    assert!(
        b.changes
            .iter()
            .any(|(c, d)| matches!(c, Change::Inside(..)) && *d == 1)
    );
    assert!(rx.recv().is_none());
}
