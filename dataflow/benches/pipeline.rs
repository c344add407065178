//! Throughput of the whole dataflow: epochs of location fixes (with a share of delivery
//! lifecycle events) in, consolidated epoch outputs out, with 1 and 2 worker threads.
//!
//! The world: 20k couriers random-walking over a 20 km × 20 km city with 2,000 polygon
//! zones and a steady flow of deliveries; each measured epoch carries 10k events. The figure
//! is events per second from `send` to the epoch's output having been received, so it
//! includes the spatial join, the upserts, the ETA join, the aggregates and the
//! consolidation of the output.
//!
//! Run with `cargo bench -p delivertrack-dataflow --bench pipeline`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use delivertrack_dataflow::event::{
    DeliveryCreated, Event, EventBody, LocationUpdated, StatusChanged, UnixMillis, ZoneUpserted,
};
use delivertrack_dataflow::geometry::{GeoPoint, ZoneShape};
use delivertrack_dataflow::pipeline::{self, DataflowConfig, EpochReceiver, EpochSender};
use delivertrack_dataflow::{CourierId, CustomerId, DeliveryId, EventId, Status, ZoneId};
use geo::{LineString, MultiPolygon, Polygon};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

const COURIERS: usize = 20_000;
const ZONES: usize = 2_000;
const EVENTS_PER_EPOCH: usize = 10_000;
/// Every this many fixes, one delivery event.
const DELIVERY_EVERY: usize = 20;
const HALF_SIDE_DEG: f64 = 0.09;

struct World {
    rng: SmallRng,
    clock: UnixMillis,
    next_id: u128,
    positions: Vec<(f64, f64)>,
    /// Deliveries in flight: (id, courier, status).
    deliveries: Vec<(DeliveryId, usize, Status)>,
}

impl World {
    fn new() -> Self {
        let mut rng = SmallRng::seed_from_u64(7);
        let positions = (0..COURIERS)
            .map(|_| {
                (
                    52.52 + rng.random_range(-HALF_SIDE_DEG..HALF_SIDE_DEG),
                    13.405 + rng.random_range(-HALF_SIDE_DEG..HALF_SIDE_DEG),
                )
            })
            .collect();
        Self {
            rng,
            clock: 1_764_500_000_000,
            next_id: 1,
            positions,
            deliveries: Vec::new(),
        }
    }

    fn event(&mut self, body: EventBody) -> Event {
        self.next_id += 1;
        Event {
            event_id: EventId(Uuid::from_u128(self.next_id)),
            occurred_at: self.clock,
            body,
        }
    }

    fn zones(&mut self) -> Vec<Event> {
        (0..ZONES)
            .map(|n| {
                let lat = 52.52 + self.rng.random_range(-HALF_SIDE_DEG..HALF_SIDE_DEG);
                let lon = 13.405 + self.rng.random_range(-HALF_SIDE_DEG..HALF_SIDE_DEG);
                let r = self.rng.random_range(0.001..0.006);
                let ring: Vec<(f64, f64)> = (0..=8)
                    .map(|k| {
                        let angle = f64::from(k % 8) * std::f64::consts::TAU / 8.0;
                        (lon + r * 1.6 * angle.cos(), lat + r * angle.sin())
                    })
                    .collect();
                let shape = ZoneShape(MultiPolygon(vec![Polygon::new(
                    LineString::from(ring),
                    vec![],
                )]));
                self.event(EventBody::ZoneUpserted(ZoneUpserted {
                    zone_id: ZoneId(Uuid::from_u128(0x1_0000_0000 + n as u128)),
                    name: format!("zone {n}"),
                    shape,
                    dwell_ms: if n % 4 == 0 { 30_000 } else { 0 },
                }))
            })
            .collect()
    }

    fn epoch(&mut self) -> Vec<Event> {
        let mut events = Vec::with_capacity(EVENTS_PER_EPOCH);
        for i in 0..EVENTS_PER_EPOCH {
            self.clock += 1;
            if i % DELIVERY_EVERY == 0 {
                let event = self.delivery_step();
                events.push(event);
                continue;
            }
            let courier = self.rng.random_range(0..COURIERS);
            let (lat, lon) = &mut self.positions[courier];
            *lat += self.rng.random_range(-0.0004..0.0004);
            *lon += self.rng.random_range(-0.0006..0.0006);
            let position = GeoPoint::from_degrees(*lat, *lon);
            let speed = self.rng.random_range(2_000..9_000);
            events.push(self.event(EventBody::LocationUpdated(LocationUpdated {
                courier_id: CourierId(Uuid::from_u128(courier as u128)),
                position,
                speed_mm_s: Some(speed),
                heading_ddeg: None,
                accuracy_cm: None,
            })));
        }
        events
    }

    fn delivery_step(&mut self) -> Event {
        if self.deliveries.len() < 2_000 || self.rng.random_bool(0.2) {
            let id = DeliveryId(Uuid::from_u128(0x2_0000_0000 + self.next_id));
            let courier = self.rng.random_range(0..COURIERS);
            self.deliveries.push((id, courier, Status::Created));
            let (lat, lon) = self.positions[courier];
            return self.event(EventBody::DeliveryCreated(DeliveryCreated {
                delivery_id: id,
                customer_id: CustomerId(Uuid::from_u128(9)),
                pickup: GeoPoint::from_degrees(lat + 0.002, lon),
                dropoff: GeoPoint::from_degrees(lat - 0.01, lon + 0.01),
                promised_by: Some(self.clock + 1_800_000),
            }));
        }
        let index = self.rng.random_range(0..self.deliveries.len());
        let (id, courier, status) = self.deliveries[index];
        let next = match status {
            Status::Created => Status::Assigned,
            Status::Assigned => Status::PickedUp,
            Status::PickedUp => Status::InTransit,
            _ => Status::Delivered,
        };
        if next == Status::Delivered {
            self.deliveries.swap_remove(index);
        } else {
            self.deliveries[index].2 = next;
        }
        self.event(EventBody::StatusChanged(StatusChanged {
            delivery_id: id,
            status: next,
            courier_id: (next == Status::Assigned)
                .then(|| CourierId(Uuid::from_u128(courier as u128))),
        }))
    }
}

fn run_epochs(
    sender: &mut EpochSender,
    receiver: &mut EpochReceiver,
    epochs: Vec<Vec<Event>>,
) -> Duration {
    let count = epochs.len();
    let start = Instant::now();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for events in epochs {
                sender.send(events).expect("the dataflow takes input");
            }
        });
        for _ in 0..count {
            receiver.recv().expect("an output per epoch");
        }
    });
    start.elapsed()
}

fn pipeline_throughput(c: &mut Criterion) {
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(EVENTS_PER_EPOCH as u64));
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(20))
        .warm_up_time(Duration::from_secs(3));
    for workers in [1, 2] {
        let config = DataflowConfig {
            workers,
            max_epochs_in_flight: 2,
            // The clock moves a millisecond per event: with the jump rule on, most moves
            // would be refused and the bench would measure less than the join.
            max_courier_speed_mps: f64::MAX,
            ..DataflowConfig::default()
        };
        let (mut sender, mut receiver) = pipeline::start(config).expect("the dataflow starts");
        let mut world = World::new();
        // Set the scene: zones, then every courier's first fix.
        let zones = world.zones();
        let warm: Vec<Vec<Event>> = std::iter::once(zones)
            .chain((0..4).map(|_| world.epoch()))
            .collect();
        run_epochs(&mut sender, &mut receiver, warm);
        group.bench_function(format!("{workers}_workers"), |b| {
            b.iter_custom(|iters| {
                let epochs: Vec<Vec<Event>> = (0..iters).map(|_| world.epoch()).collect();
                run_epochs(&mut sender, &mut receiver, epochs)
            });
        });
        sender.close();
        while receiver.recv().is_some() {}
    }
    group.finish();
}

criterion::criterion_group!(benches, pipeline_throughput);
criterion::criterion_main!(benches);
