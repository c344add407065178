//! Tests of the fleet simulator: determinism, legality of the stream, and that the city
//! produces the situations the dataflow must handle.

use std::collections::{HashMap, HashSet};

use delivertrack_dataflow::event::{Event, EventBody, ZoneUpserted};
use delivertrack_dataflow::geometry::GeoPoint;
use delivertrack_dataflow::ids::{CourierId, DeliveryId};
use delivertrack_dataflow::lifecycle::Status;

use super::*;
use crate::channel::in_process;
use crate::source::{EpochPolicy, Source};

/// 2025-12-01T00:00:00Z.
const START: UnixMillis = 1_764_547_200_000;

fn config(seed: u64) -> SimulatorConfig {
    SimulatorConfig {
        seed,
        ..SimulatorConfig::default()
    }
}

/// Runs `minutes` of simulated time in steps of `step_ms`; returns the scene and the rest.
fn run(config: SimulatorConfig, minutes: i64, step_ms: i64) -> (Vec<Event>, Vec<Event>) {
    let mut sim = FleetSimulator::new(config, START);
    let scene = sim.initial_events();
    let mut events = Vec::new();
    while sim.now() < START + minutes * MINUTE_MS {
        events.extend(sim.step(step_ms));
    }
    (scene, events)
}

fn zones(scene: &[Event]) -> Vec<&ZoneUpserted> {
    scene
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::ZoneUpserted(z) => Some(z),
            _ => None,
        })
        .collect()
}

fn fixes(events: &[Event]) -> impl Iterator<Item = (UnixMillis, &LocationUpdated)> {
    events.iter().filter_map(|e| match &e.body {
        EventBody::LocationUpdated(l) => Some((e.occurred_at, l)),
        _ => None,
    })
}

fn centre() -> GeoPoint {
    let c = SimulatorConfig::default();
    GeoPoint::from_degrees(c.center_lat, c.center_lon)
}

#[test]
fn the_same_seed_gives_the_same_events_and_another_seed_does_not() {
    let (scene_a, a) = run(config(7), 10, 1_000);
    let (scene_b, b) = run(config(7), 10, 1_000);
    assert!(a.len() > 1_000, "{} events", a.len());
    assert_eq!(scene_a, scene_b);
    assert_eq!(a, b);

    let (scene_c, c) = run(config(8), 10, 1_000);
    assert_ne!(scene_a, scene_c);
    assert_ne!(a, c);
}

#[test]
fn how_time_is_cut_into_steps_does_not_change_the_events() {
    let (_, fine) = run(config(3), 10, 250);
    let (_, coarse) = run(config(3), 10, 60_000);
    assert_eq!(fine, coarse);
}

#[test]
fn steps_return_their_events_in_time_order_and_within_the_step() {
    let mut sim = FleetSimulator::new(config(11), START);
    let mut last = START;
    for dt in [1, 999, 5_000, 60_000, 7, 120_000, 30_000] {
        let before = sim.now();
        let events = sim.step(dt);
        assert_eq!(sim.now(), before + dt);
        for event in &events {
            assert!(event.occurred_at >= last, "out of order");
            assert!(event.occurred_at > before && event.occurred_at <= before + dt);
            last = event.occurred_at;
        }
    }
    assert!(sim.step(0).is_empty() && sim.step(-5).is_empty());
}

#[test]
fn event_ids_are_unique() {
    let (scene, events) = run(config(5), 10, 10_000);
    let mut seen = HashSet::new();
    for event in scene.iter().chain(&events) {
        assert!(seen.insert(event.event_id), "duplicate {}", event.event_id);
    }
}

#[test]
fn every_delivery_follows_the_lifecycle() {
    let (_, events) = run(config(21), 45, 5_000);
    let couriers: HashSet<CourierId> = fixes(&events).map(|(_, l)| l.courier_id).collect();
    let mut status: HashMap<DeliveryId, (Status, UnixMillis)> = HashMap::new();
    let mut rated = HashSet::new();
    let mut changes = 0;
    for event in &events {
        let at = event.occurred_at;
        match &event.body {
            EventBody::DeliveryCreated(d) => {
                assert!(
                    status
                        .insert(d.delivery_id, (Status::Created, at))
                        .is_none()
                );
                assert!(d.promised_by.is_none_or(|p| p > at));
            }
            EventBody::StatusChanged(s) => {
                changes += 1;
                let (from, since) = status[&s.delivery_id];
                assert!(
                    from.can_become(s.status),
                    "{}: {from} → {}",
                    s.delivery_id,
                    s.status
                );
                assert!(at > since, "{}: statuses at the same time", s.delivery_id);
                assert_eq!(s.courier_id.is_some(), s.status == Status::Assigned);
                if let Some(courier) = s.courier_id {
                    assert!(couriers.contains(&courier), "unknown courier {courier}");
                }
                status.insert(s.delivery_id, (s.status, at));
            }
            EventBody::DeliveryRated(r) => {
                let (now, _) = status[&r.delivery_id];
                assert!(
                    matches!(now, Status::Delivered | Status::Failed),
                    "rated while {now}"
                );
                assert!((1..=5).contains(&r.score));
                assert!(rated.insert(r.delivery_id), "rated twice");
            }
            EventBody::LocationUpdated(_) => {}
            EventBody::ZoneUpserted(_) | EventBody::ZoneDeleted(_) => {
                panic!("zones change only in the scene")
            }
        }
    }
    assert!(changes > 100, "{changes} status changes");
}

#[test]
fn a_courier_does_one_delivery_at_a_time() {
    let (_, events) = run(config(4), 30, 5_000);
    let mut busy: HashMap<CourierId, DeliveryId> = HashMap::new();
    let mut courier_of: HashMap<DeliveryId, CourierId> = HashMap::new();
    for event in &events {
        if let EventBody::StatusChanged(s) = &event.body {
            if let Some(courier) = s.courier_id {
                assert!(
                    busy.insert(courier, s.delivery_id).is_none(),
                    "{courier} got a second delivery"
                );
                courier_of.insert(s.delivery_id, courier);
            }
            if s.status.is_terminal()
                && let Some(courier) = courier_of.get(&s.delivery_id)
            {
                busy.remove(courier);
            }
        }
    }
}

#[test]
fn everything_stays_within_the_city() {
    let config = config(9);
    let radius = config.radius_m;
    let (scene, events) = run(config, 30, 10_000);
    let centre = centre();
    let within = |p: GeoPoint| centre.distance_m(&p) <= radius + 2.0 * GPS_NOISE_M;
    for (_, fix) in fixes(&events) {
        assert!(within(fix.position), "{:?}", fix.position);
    }
    for event in &events {
        if let EventBody::DeliveryCreated(d) = &event.body {
            assert!(within(d.pickup) && within(d.dropoff));
        }
    }
    for zone in zones(&scene) {
        for polygon in &zone.shape.0.0 {
            for c in &polygon.exterior().0 {
                assert!(within(GeoPoint::from_degrees(c.y, c.x)), "{}", zone.name);
            }
        }
    }
}

#[test]
fn couriers_move_plausibly_and_report_every_interval() {
    let config = config(13);
    let interval = config.fix_interval_ms;
    let (_, events) = run(config, 20, 10_000);
    let mut last: HashMap<CourierId, (UnixMillis, GeoPoint)> = HashMap::new();
    let (mut with_speed, mut without_speed, mut fast, mut slow) = (0, 0, 0, 0);
    let mut max_step = 0.0f64;
    for (at, fix) in fixes(&events) {
        if let Some((then, before)) = last.insert(fix.courier_id, (at, fix.position)) {
            assert_eq!(at - then, interval);
            let metres = before.distance_m(&fix.position);
            max_step = max_step.max(metres);
            // 14 m/s at most, plus the GPS noise of both fixes.
            assert!(
                metres <= 14.0 * 2.0 + 4.0 * GPS_NOISE_M,
                "{metres} m in 2 s"
            );
        }
        match fix.speed_mm_s {
            Some(v) => {
                with_speed += 1;
                assert!(v <= 14_700, "{v} mm/s");
                if v >= 8_000 {
                    fast += 1;
                } else if (3_000..=7_350).contains(&v) {
                    slow += 1;
                }
            }
            None => without_speed += 1,
        }
        if let Some(h) = fix.heading_ddeg {
            assert!(h < 3600);
        }
    }
    assert_eq!(last.len(), SimulatorConfig::default().couriers);
    assert!(max_step > 15.0, "nobody moved fast: {max_step} m");
    assert!(with_speed > 5 * without_speed && without_speed > 0);
    assert!(fast > 0 && slow > 0, "cars {fast}, bikes {slow}");
}

#[test]
fn half_an_hour_has_every_outcome_and_crosses_zone_borders() {
    let (scene, events) = run(config(1), 30, 5_000);
    let mut ended: HashMap<Status, usize> = HashMap::new();
    let (mut ratings, mut score_sum) = (0, 0u32);
    for event in &events {
        match &event.body {
            EventBody::StatusChanged(s) if s.status.is_terminal() => {
                *ended.entry(s.status).or_default() += 1;
            }
            EventBody::DeliveryRated(r) => {
                ratings += 1;
                score_sum += u32::from(r.score);
            }
            _ => {}
        }
    }
    let count = |s: Status| ended.get(&s).copied().unwrap_or(0);
    assert!(count(Status::Delivered) > 50, "{ended:?}");
    assert!(count(Status::Failed) > 0, "{ended:?}");
    assert!(count(Status::Cancelled) > 0, "{ended:?}");
    assert!(ratings > 10, "{ratings} ratings");
    let mean = f64::from(score_sum) / f64::from(ratings);
    assert!(mean > 3.5, "mean rating {mean}");

    let zones = zones(&scene);
    assert_eq!(zones.len(), 6);
    assert!(zones.iter().any(|z| z.dwell_ms == 30_000));
    assert!(zones.iter().any(|z| z.dwell_ms == 0));
    let (mut inside, mut outside) = (0, 0);
    let mut last: HashMap<(CourierId, usize), bool> = HashMap::new();
    let mut crossings = 0;
    for (_, fix) in fixes(&events) {
        let mut in_any = false;
        for (index, zone) in zones.iter().enumerate() {
            let is_in = zone.shape.contains(fix.position);
            in_any |= is_in;
            if let Some(was) = last.insert((fix.courier_id, index), is_in)
                && was != is_in
            {
                crossings += 1;
            }
        }
        if in_any {
            inside += 1;
        } else {
            outside += 1;
        }
    }
    assert!(
        inside > 1_000 && outside > 1_000,
        "inside {inside}, outside {outside}"
    );
    assert!(crossings > 100, "{crossings} border crossings");
}

#[test]
fn the_scene_names_a_depot_a_restricted_area_and_districts() {
    for count in [0, 1, 2, 6, 20] {
        let mut sim = FleetSimulator::new(
            SimulatorConfig {
                zones: count,
                ..config(2)
            },
            START,
        );
        let scene = sim.initial_events();
        assert_eq!(scene, sim.initial_events());
        let zones = zones(&scene);
        assert_eq!(zones.len(), count);
        assert!(scene.iter().all(|e| e.occurred_at == START));
        let names: HashSet<&str> = zones.iter().map(|z| z.name.as_str()).collect();
        assert_eq!(names.len(), count, "names must differ");
        if count >= 2 {
            assert_eq!(zones[0].name, "Depot");
            assert_eq!(zones[1].name, "Restricted area");
        }
        for zone in zones {
            let polygon = &zone.shape.0.0[0];
            let ring = &polygon.exterior().0;
            assert!(
                ring.len() >= 5 && ring.first() == ring.last(),
                "{}",
                zone.name
            );
            let (min, max) = zone.shape.bounds().unwrap();
            let width_m = GeoPoint::from_degrees(min[1], min[0])
                .distance_m(&GeoPoint::from_degrees(min[1], max[0]));
            assert!(
                (200.0..=2_100.0).contains(&width_m),
                "{}: {width_m} m",
                zone.name
            );
        }
    }
}

#[test]
fn odd_configurations_are_clamped_into_legal_streams() {
    let mut sim = FleetSimulator::new(
        SimulatorConfig {
            couriers: 3,
            radius_m: f64::NAN,
            deliveries_per_minute: 600.0,
            fix_interval_ms: 0,
            fail_rate: 2.0,
            cancel_rate: -1.0,
            rating_rate: f64::INFINITY,
            ..config(6)
        },
        START,
    );
    assert_eq!(sim.config().fix_interval_ms, 100);
    assert_eq!(sim.config().fail_rate, 1.0);
    let events = sim.step(30 * MINUTE_MS);
    let mut statuses: HashMap<DeliveryId, Status> = HashMap::new();
    for event in &events {
        match &event.body {
            EventBody::DeliveryCreated(d) => {
                statuses.insert(d.delivery_id, Status::Created);
            }
            EventBody::StatusChanged(s) => {
                let from = statuses[&s.delivery_id];
                assert!(from.can_become(s.status), "{from} → {}", s.status);
                assert_ne!(s.status, Status::Delivered, "the fail rate is 1");
                statuses.insert(s.delivery_id, s.status);
            }
            _ => {}
        }
    }
    // Far more orders than 3 couriers can carry: most give up waiting, which bounds the queue.
    let cancelled = statuses
        .values()
        .filter(|s| **s == Status::Cancelled)
        .count();
    assert!(
        cancelled > statuses.len() / 2,
        "{cancelled} of {}",
        statuses.len()
    );
    assert!(
        sim.waiting.len() < 600 * 25,
        "{} waiting",
        sim.waiting.len()
    );
}

#[test]
fn a_large_fleet_steps_in_time_proportional_to_its_fixes() {
    let couriers = 20_000;
    let mut sim = FleetSimulator::new(
        SimulatorConfig {
            couriers,
            deliveries_per_minute: 1_500.0,
            ..config(17)
        },
        START,
    );
    let events = sim.step(10_000);
    let fixes = fixes(&events).count();
    // Every courier reports every 2 s: five fixes each in 10 s.
    assert_eq!(fixes, couriers * 5);
}

#[test]
#[ignore = "3 million fixes, about 35 s in a debug build; run with --ignored"]
fn a_hundred_thousand_couriers_are_possible() {
    let couriers = 100_000;
    let mut sim = FleetSimulator::new(
        SimulatorConfig {
            couriers,
            deliveries_per_minute: 7_500.0,
            ..config(17)
        },
        START,
    );
    let mut fixes_seen = 0;
    for _ in 0..30 {
        fixes_seen += fixes(&sim.step(2_000)).count();
    }
    assert_eq!(fixes_seen, couriers * 30);
}

#[tokio::test(start_paused = true)]
async fn run_simulator_sends_the_scene_then_follows_the_clock_until_shutdown() {
    let (tx, mut source) = in_process(1_024);
    let sim = FleetSimulator::new(config(12), START);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let wall = Instant::now();
    let task = tokio::spawn(run_simulator(
        sim,
        tx,
        Duration::from_millis(100),
        60.0,
        async move {
            let _ = stopped.await;
        },
    ));

    let policy = EpochPolicy::default();
    let mut events: Vec<Event> = Vec::new();
    while let Some(batch) = source.next_batch(&policy).await.unwrap() {
        events.extend(batch.events);
        if events.last().unwrap().occurred_at >= START + 5 * MINUTE_MS {
            break;
        }
    }
    // Five simulated minutes at 60× take five seconds of (paused, auto-advanced) wall time.
    let took = wall.elapsed();
    assert!(
        took >= Duration::from_secs(5) && took <= Duration::from_millis(5_300),
        "{took:?}"
    );
    assert!(
        events[..6]
            .iter()
            .all(|e| matches!(e.body, EventBody::ZoneUpserted(_)))
    );
    assert!(
        events[6..]
            .windows(2)
            .all(|w| w[0].occurred_at <= w[1].occurred_at)
    );

    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn run_simulator_stops_when_the_source_is_dropped() {
    let (tx, source) = in_process(16);
    let sim = FleetSimulator::new(config(12), START);
    let task = tokio::spawn(run_simulator(
        sim,
        tx,
        Duration::from_millis(100),
        10.0,
        std::future::pending(),
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(source);
    tokio::time::timeout(Duration::from_secs(1), task)
        .await
        .expect("the simulator must stop")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn run_simulator_refuses_a_speed_that_cannot_work() {
    for speed in [0.0, -1.0, f64::NAN] {
        let (tx, _source) = in_process(16);
        let sim = FleetSimulator::new(config(1), START);
        let result = run_simulator(sim, tx, Duration::from_millis(100), speed, async {}).await;
        assert!(matches!(result, Err(SourceError::Config(_))), "{speed}");
    }
}
