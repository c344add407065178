//! Deterministic streams of `location.updated` events.
//!
//! Couriers zigzag: every fix moves a courier north and alternately east and west, so each
//! step adds a known distance to its odometer and a lost or doubled fix changes the total.
//! That makes the stream usable both as load and as a correctness check.

use delivertrack_dataflow::event::LocationUpdated;
use delivertrack_dataflow::geometry::GeoPoint;
use delivertrack_dataflow::{CourierId, Event, EventBody, EventId, UnixMillis};
use uuid::Uuid;

/// Where the fleet starts (the README's city), degrees.
const START: (f64, f64) = (52.50, 13.38);
/// The grid couriers start on: couriers are 0.001° (about 100 m) apart in longitude.
const SPACING_DEG: f64 = 0.001;
/// One step: 0.0001° (about 11 m) north, and as much east or west.
const STEP_DEG: f64 = 0.0001;

/// `count` location fixes spread round-robin over `couriers` fresh couriers, one second of
/// event time apart per courier, the last one at `end_ms` at the latest. Event ids and
/// courier ids are random, so two calls never collide.
pub fn location_events(couriers: usize, count: usize, end_ms: UnixMillis) -> Vec<Event> {
    let couriers = couriers.max(1);
    let ids: Vec<CourierId> = (0..couriers).map(|_| CourierId(Uuid::new_v4())).collect();
    let rounds = count.div_ceil(couriers);
    let start_ms = end_ms - 1_000 * i64::try_from(rounds).unwrap_or(i64::MAX / 2_000);
    (0..count)
        .map(|i| {
            let courier = i % couriers;
            let round = i / couriers;
            let east = if round.is_multiple_of(2) {
                0.0
            } else {
                STEP_DEG
            };
            let lat = START.0 + STEP_DEG * round as f64;
            let lon = START.1 + SPACING_DEG * courier as f64 + east;
            Event {
                event_id: EventId(Uuid::new_v4()),
                occurred_at: start_ms + 1_000 * i64::try_from(round).unwrap_or(0),
                body: EventBody::LocationUpdated(LocationUpdated {
                    courier_id: ids[courier],
                    position: GeoPoint::from_degrees(lat, lon),
                    speed_mm_s: None,
                    heading_ddeg: None,
                    accuracy_cm: None,
                }),
            }
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn fixes_are_round_robin_and_end_in_the_past() {
        let events = location_events(3, 10, 1_000_000);
        assert_eq!(events.len(), 10);
        assert!(events.iter().all(|e| e.occurred_at <= 1_000_000));
        let courier = |e: &Event| match &e.body {
            EventBody::LocationUpdated(l) => l.courier_id,
            _ => unreachable!(),
        };
        assert_eq!(courier(&events[0]), courier(&events[3]));
        assert_ne!(courier(&events[0]), courier(&events[1]));
        assert!(events[3].occurred_at > events[0].occurred_at);
    }
}
