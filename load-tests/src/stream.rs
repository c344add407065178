//! [`FleetStream`]: a deterministic, paced stream of a fleet's events.
//!
//! N couriers each report a GPS fix every `1/R` seconds. Between fixes a courier moves at
//! its speed toward where its current delivery takes it: idle couriers wander, get an
//! order (`delivery.created` and `status.changed` to `assigned`), drive to the pickup
//! (`picked_up`, `in_transit`), drive to the dropoff (`delivered`, or now and then
//! `failed`), are sometimes rated (`delivery.rated`), and wait a few seconds for the next
//! order. Zones (`zone.upserted`) come first, scattered over the city, so couriers cross
//! them. Trips are short (a pickup within 400 m, a dropoff within 1.5 km), so that a
//! run of a minute or two completes deliveries.
//!
//! Every event is due at a time since the stream's start: courier `i` starts at
//! `ramp_up · i / N` (the offered rate climbs linearly over the ramp-up) and then reports
//! every `1/R` s. Its `occurred_at` is `start_ms` + the due time. Everything else (ids,
//! positions, the order of events) comes from one generator seeded by `seed`, taken in the
//! order of due time then courier index: **the same seed and start give the same stream**,
//! event for event, whatever the speed at which it is consumed.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use delivertrack_dataflow::contract::{ContractLimits, decode_event, encode_event};
use delivertrack_dataflow::event::{
    DeliveryCreated, DeliveryRated, LocationUpdated, StatusChanged, ZoneUpserted,
};
use delivertrack_dataflow::geometry::GeoPoint;
use delivertrack_dataflow::{
    CourierId, CustomerId, DeliveryId, Event, EventBody, EventId, Status, UnixMillis,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::world::{City, random_uuid};

/// What the fleet looks like and how fast it reports.
#[derive(Clone, Debug, PartialEq)]
pub struct FleetConfig {
    /// Couriers.
    pub couriers: usize,
    /// Fixes per second each courier reports.
    pub fixes_per_second: f64,
    /// Zones published before the first fix.
    pub zones: usize,
    /// Side of the square city, metres.
    pub city_side_m: f64,
    /// Courier speed while on a delivery, m/s.
    pub speed_mps: f64,
    /// Share of deliveries that end `failed` instead of `delivered`.
    pub failure_rate: f64,
    /// Share of ended deliveries that are rated.
    pub rating_rate: f64,
    /// The seed of every random choice.
    pub seed: u64,
    /// Couriers join over this time, so the offered rate climbs linearly.
    pub ramp_up: Duration,
    /// Nothing is due after this time.
    pub duration: Duration,
    /// Nothing is produced beyond this many events (zones included).
    pub max_events: u64,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            couriers: 1_000,
            fixes_per_second: 1.0,
            zones: 200,
            city_side_m: 10_000.0,
            speed_mps: 12.0,
            failure_rate: 0.05,
            rating_rate: 0.6,
            seed: 1,
            ramp_up: Duration::from_secs(5),
            duration: Duration::from_secs(60),
            max_events: u64::MAX,
        }
    }
}

impl FleetConfig {
    /// The location events per second once every courier has joined.
    pub fn fix_rate(&self) -> f64 {
        self.couriers as f64 * self.fixes_per_second
    }
}

/// A GPS fix's place in its courier's sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fix {
    /// The courier's index in the fleet (`0..couriers`).
    pub courier: usize,
    /// 1 for the courier's first fix, then 2, 3, ...
    pub seq: u64,
}

/// One event of the stream and when it is due.
#[derive(Clone, Debug, PartialEq)]
pub struct Planned {
    /// Time since the stream's start at which it is due.
    pub due: Duration,
    /// The event (its `occurred_at` is the stream's start + `due`).
    pub event: Event,
    /// Which courier sends it (every event of a delivery belongs to its courier; `None`
    /// for zones). Events of one courier must be published in order.
    pub courier: Option<usize>,
    /// For a location fix, its sequence number.
    pub fix: Option<Fix>,
}

#[derive(Clone, Copy, Debug)]
enum Task {
    /// Wandering until an order comes (time since start, µs).
    Idle { until_us: u64 },
    /// Driving to the pickup of `delivery`, then to `dropoff`.
    ToPickup {
        delivery: DeliveryId,
        target: (f64, f64),
        dropoff: (f64, f64),
    },
    /// Driving to the dropoff of `delivery`.
    ToDropoff {
        delivery: DeliveryId,
        target: (f64, f64),
    },
}

#[derive(Debug)]
struct Courier {
    id: CourierId,
    /// `(north, east)` metres from the centre.
    at: (f64, f64),
    heading_deg: f64,
    seq: u64,
    last_due_us: Option<u64>,
    task: Task,
}

/// The stream: see the [module documentation](self).
#[derive(Debug)]
pub struct FleetStream {
    config: FleetConfig,
    city: City,
    start_ms: UnixMillis,
    rng: SmallRng,
    couriers: Vec<Courier>,
    /// `(due µs, courier)`, earliest first.
    heap: BinaryHeap<Reverse<(u64, usize)>>,
    /// Zone events not yet handed out (due at 0).
    zones: Vec<Event>,
    produced: u64,
    interval_us: u64,
}

impl FleetStream {
    /// The stream of `config`, its times counted from `start_ms`.
    pub fn new(config: FleetConfig, start_ms: UnixMillis) -> Self {
        let city = City::berlin(config.city_side_m);
        let mut rng = SmallRng::seed_from_u64(config.seed);
        // Zones as the service will see them: through the contract (coordinates rounded to
        // its 1e-7° grid and validated). A random polygon that rounding makes invalid (two
        // vertices too close) is drawn again, so every zone is accepted.
        let mut zones = Vec::with_capacity(config.zones);
        while zones.len() < config.zones {
            let Some((zone_id, shape)) = city
                .random_zones(&mut rng, 1, (150.0, 1_500.0))
                .into_iter()
                .next()
            else {
                break;
            };
            let i = zones.len();
            let event = Event {
                event_id: EventId(random_uuid(&mut rng)),
                occurred_at: start_ms,
                body: EventBody::ZoneUpserted(ZoneUpserted {
                    zone_id,
                    name: format!("load-test zone {i}"),
                    shape,
                    // A quarter of the zones count a courier as inside only after 10 s.
                    dwell_ms: if i % 4 == 0 { 10_000 } else { 0 },
                }),
            };
            if let Ok(accepted) = decode_event(
                Some(event.kind().as_str()),
                &encode_event(&event),
                start_ms,
                &ContractLimits::default(),
            ) {
                zones.push(accepted);
            }
        }
        zones.reverse();
        let rate = if config.fixes_per_second.is_finite() && config.fixes_per_second > 0.0 {
            config.fixes_per_second
        } else {
            1.0
        };
        let interval_us = ((1e6 / rate).round() as u64).max(1_000);
        let n = config.couriers.max(1) as u64;
        let ramp_us = u64::try_from(config.ramp_up.as_micros()).unwrap_or(u64::MAX / 4);
        let mut couriers = Vec::with_capacity(config.couriers);
        let mut heap = BinaryHeap::with_capacity(config.couriers);
        let half = city.half();
        for i in 0..config.couriers {
            let id = CourierId(random_uuid(&mut rng));
            let at = (
                rng.random_range(-half..half) * 0.9,
                rng.random_range(-half..half) * 0.9,
            );
            let first_us = ramp_us / n * i as u64 + interval_us / n * i as u64;
            let idle = rng.random_range(0..1_500_000);
            couriers.push(Courier {
                id,
                at,
                heading_deg: 0.0,
                seq: 0,
                last_due_us: None,
                task: Task::Idle {
                    until_us: first_us + idle,
                },
            });
            heap.push(Reverse((first_us, i)));
        }
        Self {
            config,
            city,
            start_ms,
            rng,
            couriers,
            heap,
            zones,
            produced: 0,
            interval_us,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &FleetConfig {
        &self.config
    }

    /// When the stream's times start, Unix ms.
    pub fn start_ms(&self) -> UnixMillis {
        self.start_ms
    }

    /// The courier ids, by index.
    pub fn courier_ids(&self) -> Vec<CourierId> {
        self.couriers.iter().map(|c| c.id).collect()
    }

    /// Events produced so far.
    pub fn produced(&self) -> u64 {
        self.produced
    }

    /// Has every event been produced?
    pub fn is_done(&self) -> bool {
        self.produced >= self.config.max_events || (self.zones.is_empty() && self.heap.is_empty())
    }

    /// Appends to `out` the events due at or before `until`, at most `limit` fixes' worth
    /// (a fix and the lifecycle events it triggers are never split), in order.
    pub fn pop_due(&mut self, until: Duration, limit: usize, out: &mut Vec<Planned>) {
        let until_us = u64::try_from(until.as_micros()).unwrap_or(u64::MAX);
        let duration_us = u64::try_from(self.config.duration.as_micros()).unwrap_or(u64::MAX);
        let mut taken = 0;
        while taken < limit && self.produced < self.config.max_events {
            if let Some(event) = self.zones.pop() {
                self.produced += 1;
                taken += 1;
                out.push(Planned {
                    due: Duration::ZERO,
                    event,
                    courier: None,
                    fix: None,
                });
                continue;
            }
            let Some(&Reverse((due_us, index))) = self.heap.peek() else {
                return;
            };
            if due_us > until_us {
                return;
            }
            self.heap.pop();
            if due_us > duration_us {
                continue;
            }
            let before = out.len();
            self.step(index, due_us, out);
            let made = (out.len() - before) as u64;
            self.produced += made;
            taken += 1;
            self.heap.push(Reverse((due_us + self.interval_us, index)));
        }
    }

    /// Moves courier `index` to `due_us` and appends its fix and lifecycle events.
    fn step(&mut self, index: usize, due_us: u64, out: &mut Vec<Planned>) {
        let at_ms = self.start_ms + i64::try_from(due_us / 1_000).unwrap_or(0);
        let due = Duration::from_micros(due_us);
        let speed = self.config.speed_mps;
        let half = self.city.half();
        let Some(courier) = self.couriers.get_mut(index) else {
            return;
        };
        let dt = courier
            .last_due_us
            .map_or(0.0, |last| (due_us - last) as f64 / 1e6);
        courier.last_due_us = Some(due_us);
        let courier_id = courier.id;
        let mut lifecycle: Vec<(UnixMillis, EventBody)> = Vec::new();

        // Where the courier heads, and what happens on arrival.
        let target = match courier.task {
            Task::Idle { .. } => None,
            Task::ToPickup { target, .. } | Task::ToDropoff { target, .. } => Some(target),
        };
        let moving = match target {
            Some(target) => {
                let reached = move_toward(courier, target, speed * dt);
                if reached {
                    match courier.task {
                        Task::ToPickup {
                            delivery, dropoff, ..
                        } => {
                            lifecycle.push((at_ms, status(delivery, Status::PickedUp, None)));
                            lifecycle.push((at_ms + 1, status(delivery, Status::InTransit, None)));
                            courier.task = Task::ToDropoff {
                                delivery,
                                target: dropoff,
                            };
                        }
                        Task::ToDropoff { delivery, .. } => {
                            let failed = self.rng.random_bool(self.config.failure_rate);
                            let end = if failed {
                                Status::Failed
                            } else {
                                Status::Delivered
                            };
                            lifecycle.push((at_ms, status(delivery, end, None)));
                            if self.rng.random_bool(self.config.rating_rate) {
                                let score = if failed {
                                    self.rng.random_range(1..=3)
                                } else {
                                    self.rng.random_range(3..=5)
                                };
                                lifecycle.push((
                                    at_ms + 1,
                                    EventBody::DeliveryRated(DeliveryRated {
                                        delivery_id: delivery,
                                        score,
                                        comment: None,
                                    }),
                                ));
                            }
                            let wait = self.rng.random_range(1_000_000..8_000_000);
                            courier.task = Task::Idle {
                                until_us: due_us + wait,
                            };
                        }
                        Task::Idle { .. } => {}
                    }
                }
                true
            }
            None => {
                // Wander a little, at walking pace, inside the city.
                let angle = self.rng.random_range(0.0..std::f64::consts::TAU);
                let dist = 1.5 * dt;
                courier.at.0 = (courier.at.0 + dist * angle.sin()).clamp(-half, half);
                courier.at.1 = (courier.at.1 + dist * angle.cos()).clamp(-half, half);
                false
            }
        };

        courier.seq += 1;
        let seq = courier.seq;
        let position = self.city.point(courier.at.0, courier.at.1);
        let heading = (courier.heading_deg.rem_euclid(360.0) * 10.0).round() as u16 % 3_600;
        out.push(Planned {
            due,
            event: Event {
                event_id: EventId(random_uuid(&mut self.rng)),
                occurred_at: at_ms,
                body: EventBody::LocationUpdated(LocationUpdated {
                    courier_id,
                    position,
                    speed_mm_s: Some(if moving { (speed * 1_000.0) as u32 } else { 0 }),
                    heading_ddeg: moving.then_some(heading),
                    accuracy_cm: Some(500),
                }),
            },
            courier: Some(index),
            fix: Some(Fix {
                courier: index,
                seq,
            }),
        });

        // A courier whose wait is over gets the next order.
        if let Task::Idle { until_us } = courier.task
            && due_us >= until_us
        {
            let from = courier.at;
            let pickup = offset_within(&mut self.rng, from, 50.0, 400.0, half);
            let dropoff = offset_within(&mut self.rng, pickup, 200.0, 1_500.0, half);
            let delivery = DeliveryId(random_uuid(&mut self.rng));
            let customer = CustomerId(random_uuid(&mut self.rng));
            let trip_m = distance(from, pickup) + distance(pickup, dropoff);
            let promised_ms = (trip_m / speed.max(0.1) * 1_000.0 * 1.3) as i64 + 120_000;
            lifecycle.push((
                at_ms,
                EventBody::DeliveryCreated(DeliveryCreated {
                    delivery_id: delivery,
                    customer_id: customer,
                    pickup: self.city.point(pickup.0, pickup.1),
                    dropoff: self.city.point(dropoff.0, dropoff.1),
                    promised_by: Some(at_ms + promised_ms),
                }),
            ));
            lifecycle.push((at_ms, status(delivery, Status::Assigned, Some(courier_id))));
            courier.task = Task::ToPickup {
                delivery,
                target: pickup,
                dropoff,
            };
        }
        for (occurred_at, body) in lifecycle {
            out.push(Planned {
                due,
                event: Event {
                    event_id: EventId(random_uuid(&mut self.rng)),
                    occurred_at,
                    body,
                },
                courier: Some(index),
                fix: None,
            });
        }
    }
}

fn status(delivery_id: DeliveryId, status: Status, courier_id: Option<CourierId>) -> EventBody {
    EventBody::StatusChanged(StatusChanged {
        delivery_id,
        status,
        courier_id,
    })
}

fn distance(a: (f64, f64), b: (f64, f64)) -> f64 {
    ((a.0 - b.0).powi(2) + (a.1 - b.1).powi(2)).sqrt()
}

/// Moves the courier up to `step` metres toward `target`; `true` when it got there.
fn move_toward(courier: &mut Courier, target: (f64, f64), step: f64) -> bool {
    let (dn, de) = (target.0 - courier.at.0, target.1 - courier.at.1);
    let left = (dn * dn + de * de).sqrt();
    if left > f64::EPSILON {
        courier.heading_deg = de.atan2(dn).to_degrees();
    }
    if left <= step {
        courier.at = target;
        true
    } else {
        courier.at.0 += dn / left * step;
        courier.at.1 += de / left * step;
        false
    }
}

/// A point `min..max` metres from `from` in a random direction, kept inside the city.
fn offset_within(
    rng: &mut SmallRng,
    from: (f64, f64),
    min: f64,
    max: f64,
    half: f64,
) -> (f64, f64) {
    let angle = rng.random_range(0.0..std::f64::consts::TAU);
    let dist = rng.random_range(min..max);
    (
        (from.0 + dist * angle.sin()).clamp(-half, half),
        (from.1 + dist * angle.cos()).clamp(-half, half),
    )
}

/// A point of the stream's city, for callers that place things (tests, probes).
pub fn city_point(config: &FleetConfig, north_m: f64, east_m: f64) -> GeoPoint {
    City::berlin(config.city_side_m).point(north_m, east_m)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use delivertrack_dataflow::EventKind;
    use std::collections::HashMap;

    fn config() -> FleetConfig {
        FleetConfig {
            couriers: 20,
            fixes_per_second: 2.0,
            zones: 10,
            speed_mps: 40.0,
            ramp_up: Duration::from_secs(2),
            duration: Duration::from_secs(120),
            ..FleetConfig::default()
        }
    }

    fn all(config: FleetConfig) -> Vec<Planned> {
        let mut stream = FleetStream::new(config, 1_700_000_000_000);
        let mut out = Vec::new();
        while !stream.is_done() {
            stream.pop_due(Duration::from_secs(3_600), 1_000, &mut out);
        }
        out
    }

    #[test]
    fn the_same_seed_gives_the_same_stream_and_another_seed_another() {
        let a = all(config());
        let b = all(config());
        assert_eq!(a, b);
        let c = all(FleetConfig {
            seed: 2,
            ..config()
        });
        assert_ne!(a, c);
    }

    #[test]
    fn popping_in_small_slices_gives_the_same_stream() {
        let whole = all(config());
        let mut stream = FleetStream::new(config(), 1_700_000_000_000);
        let mut sliced = Vec::new();
        let mut t = Duration::ZERO;
        while !stream.is_done() {
            t += Duration::from_millis(37);
            stream.pop_due(t, 7, &mut sliced);
        }
        assert_eq!(whole, sliced);
    }

    #[test]
    fn the_stream_is_paced_ordered_and_valid_on_the_wire() {
        let events = all(config());
        let fixes = events.iter().filter(|p| p.fix.is_some()).count();
        // 20 couriers × 2 fixes/s over 120 s, less the ramp-up.
        assert!((4_500..=4_820).contains(&fixes), "{fixes}");
        assert!(events.windows(2).all(|w| w[0].due <= w[1].due));
        let mut last_seq: HashMap<usize, u64> = HashMap::new();
        for planned in &events {
            let wire = encode_event(&planned.event);
            let decoded = decode_event(
                Some(planned.event.kind().as_str()),
                &wire,
                planned.event.occurred_at,
                &ContractLimits::default(),
            )
            .expect("every event is valid");
            assert_eq!(decoded, planned.event);
            if let Some(fix) = planned.fix {
                let last = last_seq.insert(fix.courier, fix.seq).unwrap_or(0);
                assert_eq!(fix.seq, last + 1);
                assert_eq!(
                    planned.event.occurred_at,
                    1_700_000_000_000 + planned.due.as_millis() as i64
                );
            }
        }
    }

    #[test]
    fn deliveries_run_their_whole_lifecycle_in_order() {
        let events = all(config());
        let mut statuses: HashMap<DeliveryId, Vec<Status>> = HashMap::new();
        let mut zones = 0;
        for planned in &events {
            match &planned.event.body {
                EventBody::DeliveryCreated(d) => {
                    assert!(
                        statuses
                            .insert(d.delivery_id, vec![Status::Created])
                            .is_none()
                    );
                }
                EventBody::StatusChanged(s) => {
                    let seen = statuses.get_mut(&s.delivery_id).expect("created first");
                    assert!(
                        seen.last().unwrap().can_become(s.status),
                        "{seen:?} → {:?}",
                        s.status
                    );
                    seen.push(s.status);
                }
                _ if planned.event.kind() == EventKind::ZoneUpserted => zones += 1,
                _ => {}
            }
        }
        assert_eq!(zones, 10);
        // Many zones: every one valid on the wire (checked above for all events).
        let many = all(FleetConfig {
            zones: 1_000,
            couriers: 1,
            duration: Duration::from_secs(1),
            ..config()
        });
        let valid = many
            .iter()
            .filter(|p| p.event.kind() == EventKind::ZoneUpserted)
            .filter(|p| {
                decode_event(
                    Some("zone.upserted"),
                    &encode_event(&p.event),
                    p.event.occurred_at,
                    &ContractLimits::default(),
                )
                .is_ok_and(|decoded| decoded == p.event)
            })
            .count();
        assert_eq!(valid, 1_000);
        let ended = statuses
            .values()
            .filter(|s| matches!(s.last(), Some(Status::Delivered | Status::Failed)))
            .count();
        assert!(
            ended >= 20,
            "{ended} of {} deliveries ended",
            statuses.len()
        );
    }

    #[test]
    fn couriers_cross_zones() {
        use delivertrack_dataflow::spatial::ZoneIndex;
        let events = all(FleetConfig {
            zones: 200,
            couriers: 50,
            ..config()
        });
        let zones = ZoneIndex::bulk_load(events.iter().filter_map(|p| match &p.event.body {
            EventBody::ZoneUpserted(z) => Some((z.zone_id, z.shape.clone())),
            _ => None,
        }));
        // Per courier: was it ever inside a zone, and ever outside?
        let mut inside: HashMap<usize, (bool, bool)> = HashMap::new();
        for planned in &events {
            if let (Some(fix), EventBody::LocationUpdated(l)) = (planned.fix, &planned.event.body) {
                let hit = zones.containing(l.position).next().is_some();
                let entry = inside.entry(fix.courier).or_default();
                if hit {
                    entry.0 = true;
                } else {
                    entry.1 = true;
                }
            }
        }
        let crossing = inside.values().filter(|(a, b)| *a && *b).count();
        assert!(
            crossing >= 10,
            "{crossing} of 50 couriers crossed a zone's edge"
        );
    }

    #[test]
    fn max_events_bounds_the_stream() {
        let events = all(FleetConfig {
            max_events: 500,
            ..config()
        });
        // A fix is never split from its lifecycle events: at most a few over.
        assert!((500..505).contains(&events.len()), "{}", events.len());
    }
}
