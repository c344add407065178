//! A deterministic fleet simulator: a synthetic city with couriers and deliveries.
//!
//! It feeds `delivertrack demo`, the tests and the load tests with a stream of events that
//! looks like a real fleet's and is legal for the contract, with no service running.
//!
//! # The city
//! Around a configurable centre, within `radius_m`:
//! - **zones**: a *Depot* (a rectangle near the centre, with the configured dwell, so that a
//!   courier merely passing by does not count as "at the depot"), a *Restricted area* (an
//!   irregular polygon of about 600 m across, no dwell, so that an entry is reported at
//!   once) and *districts* (irregular polygons of 1.4–2 km across, in a ring around the
//!   centre, every second one with the dwell). Zones may overlap, as real geofences do.
//! - **couriers**: 70 % on bikes (3–7 m/s), 30 % in cars (8–14 m/s), each with its own
//!   cruising speed and noise on every segment. They move along straight segments, half of
//!   the time through one street corner (an L-shaped route, as on a street grid). Idle
//!   couriers rest, wander, or return to the depot. Every `fix_interval_ms` each courier
//!   reports a GPS fix with a few metres of noise, usually with speed, heading and accuracy.
//! - **deliveries** are ordered as a Poisson process; pickup and dropoff lie in the city, a
//!   dropoff within about half the radius of its pickup. A dispatcher assigns the nearest of
//!   a few free couriers (sampled, so assignment costs the same for 200 couriers or 100 000);
//!   the courier drives to the pickup, waits for the parcel (`picked_up`), leaves
//!   (`in_transit`), drives to the dropoff and hands it over (`delivered`, or `failed` at the
//!   configured rate). Customers cancel at the configured rate before delivery, and give up
//!   when no courier was free for a while. Some delivered or failed deliveries are rated
//!   later (`delivery.rated`, mostly 4–5 after a delivery, mostly 1–2 after a failure).
//!
//! # Determinism
//! Everything random comes from one [`StdRng`] seeded with `seed`, event ids included, and the
//! simulation is a discrete-event simulation: an agenda of timed actions processed in
//! `(time, sequence)` order. The same configuration and start therefore give the same
//! events, however the time is cut into [`FleetSimulator::step`]s. Each action costs
//! `O(log n)` (the agenda is a binary heap), so a step costs in proportion to the events it
//! produces: 100 000 couriers are a matter of fix volume, not of quadratic work.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};
use std::f64::consts::TAU;
use std::future::Future;
use std::pin::pin;
use std::time::Duration;

use delivertrack_dataflow::event::{
    DeliveryCreated, DeliveryRated, Event, EventBody, LocationUpdated, StatusChanged, UnixMillis,
    ZoneUpserted,
};
use delivertrack_dataflow::geometry::{GeoPoint, ZoneShape};
use delivertrack_dataflow::ids::{CourierId, CustomerId, DeliveryId, EventId, ZoneId};
use delivertrack_dataflow::lifecycle::Status;
use geo::{Coord, LineString, MultiPolygon, Polygon};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::{Instant, MissedTickBehavior};
use uuid::Uuid;

use crate::channel::InProcessSender;
use crate::source::SourceError;

/// Metres per degree of latitude on the mean-radius sphere that the dataflow's haversine
/// distance uses, so that simulated distances and computed ones agree.
const METRES_PER_DEGREE: f64 = 6_371_008.8 * std::f64::consts::PI / 180.0;
/// Free couriers the dispatcher compares per delivery; a constant keeps assignment `O(1)`.
const DISPATCH_CANDIDATES: usize = 16;
/// GPS noise, metres, on each axis.
const GPS_NOISE_M: f64 = 4.0;
/// One minute in milliseconds.
const MINUTE_MS: i64 = 60_000;

/// What the simulated city and fleet look like. Out-of-range values are clamped when the
/// simulator is built (rates to 0–1, the radius to 200 m–100 km, the fix interval to at least
/// 100 ms), so that any configuration gives a legal event stream.
#[derive(Clone, Debug, PartialEq)]
pub struct SimulatorConfig {
    /// Number of couriers, all present from the start.
    pub couriers: usize,
    /// Latitude of the city centre, degrees.
    pub center_lat: f64,
    /// Longitude of the city centre, degrees.
    pub center_lon: f64,
    /// Radius of the city, metres: every position, pickup, dropoff and zone lies within it.
    pub radius_m: f64,
    /// Number of zones: the depot first, then the restricted area, then districts.
    pub zones: usize,
    /// Mean rate of new deliveries, per minute of simulated time. A courier completes about
    /// one delivery every 12–15 minutes, so beyond about `couriers / 13` per minute orders
    /// queue and some are cancelled for want of a courier.
    pub deliveries_per_minute: f64,
    /// Time between two GPS fixes of one courier, ms.
    pub fix_interval_ms: i64,
    /// Seed of every random choice: the same seed gives the same events.
    pub seed: u64,
    /// Dwell time of the depot and of every second district, seconds.
    pub dwell_seconds: u32,
    /// Fraction of deliveries that fail at the dropoff (after `in_transit`).
    pub fail_rate: f64,
    /// Fraction of deliveries the customer tries to cancel (it takes effect only if the
    /// delivery has not ended by then).
    pub cancel_rate: f64,
    /// Fraction of delivered or failed deliveries that get a rating.
    pub rating_rate: f64,
}

impl Default for SimulatorConfig {
    /// 200 couriers around Berlin's centre in a 6 km radius, six zones, 15 deliveries a
    /// minute (about the fleet's capacity), a fix every 2 s.
    fn default() -> Self {
        Self {
            couriers: 200,
            center_lat: 52.52,
            center_lon: 13.405,
            radius_m: 6_000.0,
            zones: 6,
            deliveries_per_minute: 15.0,
            fix_interval_ms: 2_000,
            seed: 0,
            dwell_seconds: 30,
            fail_rate: 0.05,
            cancel_rate: 0.05,
            rating_rate: 0.6,
        }
    }
}

impl SimulatorConfig {
    fn sanitized(mut self) -> Self {
        let unit = |v: f64| {
            if v.is_finite() {
                v.clamp(0.0, 1.0)
            } else {
                0.0
            }
        };
        self.fail_rate = unit(self.fail_rate);
        self.cancel_rate = unit(self.cancel_rate);
        self.rating_rate = unit(self.rating_rate);
        self.center_lat = finite_or(self.center_lat, 0.0).clamp(-80.0, 80.0);
        self.center_lon = wrap_lon(finite_or(self.center_lon, 0.0));
        self.radius_m = finite_or(self.radius_m, 6_000.0).clamp(200.0, 100_000.0);
        self.deliveries_per_minute = finite_or(self.deliveries_per_minute, 0.0).max(0.0);
        self.fix_interval_ms = self.fix_interval_ms.max(100);
        self.couriers = self.couriers.min(u32::MAX as usize - 1);
        self
    }
}

fn finite_or(value: f64, fallback: f64) -> f64 {
    if value.is_finite() { value } else { fallback }
}

fn wrap_lon(lon: f64) -> f64 {
    (lon + 180.0).rem_euclid(360.0) - 180.0
}

/// A position in the city's local frame: metres east (`x`) and north (`y`) of the centre.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Vec2 {
    x: f64,
    y: f64,
}

impl Vec2 {
    const ZERO: Vec2 = Vec2 { x: 0.0, y: 0.0 };

    fn new(x: f64, y: f64) -> Self {
        Self { x, y }
    }

    fn norm(self) -> f64 {
        self.x.hypot(self.y)
    }

    fn dist(self, other: Vec2) -> f64 {
        (other.x - self.x).hypot(other.y - self.y)
    }

    fn dist2(self, other: Vec2) -> f64 {
        let (dx, dy) = (other.x - self.x, other.y - self.y);
        dx * dx + dy * dy
    }

    fn lerp(self, other: Vec2, f: f64) -> Vec2 {
        Vec2::new(
            self.x + (other.x - self.x) * f,
            self.y + (other.y - self.y) * f,
        )
    }

    fn add(self, other: Vec2) -> Vec2 {
        Vec2::new(self.x + other.x, self.y + other.y)
    }

    /// Bearing from `self` to `other`, degrees clockwise from north.
    fn bearing_to(self, other: Vec2) -> f64 {
        (other.x - self.x)
            .atan2(other.y - self.y)
            .to_degrees()
            .rem_euclid(360.0)
    }

    /// The same direction, at most `max` from the centre.
    fn clamp_norm(self, max: f64) -> Vec2 {
        let n = self.norm();
        if n > max {
            Vec2::new(self.x * max / n, self.y * max / n)
        } else {
            self
        }
    }
}

/// The local equirectangular projection around the centre: accurate to well under a metre
/// over a city, and cheap.
#[derive(Clone, Copy, Debug)]
struct Frame {
    lat0: f64,
    lon0: f64,
    metres_per_degree_lon: f64,
}

impl Frame {
    fn new(lat0: f64, lon0: f64) -> Self {
        Self {
            lat0,
            lon0,
            metres_per_degree_lon: METRES_PER_DEGREE * lat0.to_radians().cos(),
        }
    }

    fn degrees(&self, p: Vec2) -> (f64, f64) {
        let lat = (self.lat0 + p.y / METRES_PER_DEGREE).clamp(-90.0, 90.0);
        let lon = wrap_lon(self.lon0 + p.x / self.metres_per_degree_lon);
        (lat, lon)
    }

    fn geo_point(&self, p: Vec2) -> GeoPoint {
        let (lat, lon) = self.degrees(p);
        GeoPoint::from_degrees(lat, lon)
    }

    /// A polygon vertex as `(lon, lat)`, quantized to 1e-7° like every position on the wire.
    fn coord(&self, p: Vec2) -> Coord<f64> {
        let (lat, lon) = self.degrees(p);
        Coord {
            x: (lon * 1e7).round() / 1e7,
            y: (lat * 1e7).round() / 1e7,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Vehicle {
    Bike,
    Car,
}

impl Vehicle {
    /// Plausible ground speeds in a city, m/s.
    fn speed_range(self) -> (f64, f64) {
        match self {
            Vehicle::Bike => (3.0, 7.0),
            Vehicle::Car => (8.0, 14.0),
        }
    }
}

/// A delivery slot and the generation it was issued with; stale once the slot is reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DeliveryRef {
    slot: u32,
    generation: u32,
}

/// What a courier is doing; the pending `Arrive` action ends the current phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Task {
    /// No delivery; resting in place.
    Resting,
    /// No delivery; wandering or returning to the depot.
    Roaming,
    /// Driving to a delivery's pickup.
    ToPickup(DeliveryRef),
    /// At the pickup, waiting for the parcel.
    AtPickup(DeliveryRef),
    /// Parcel in hand, getting ready to leave.
    Loading(DeliveryRef),
    /// Driving to the dropoff.
    ToDropoff(DeliveryRef),
    /// At the dropoff, handing over.
    AtDropoff(DeliveryRef),
}

impl Task {
    fn delivery(self) -> Option<DeliveryRef> {
        match self {
            Task::Resting | Task::Roaming => None,
            Task::ToPickup(d)
            | Task::AtPickup(d)
            | Task::Loading(d)
            | Task::ToDropoff(d)
            | Task::AtDropoff(d) => Some(d),
        }
    }
}

#[derive(Clone, Debug)]
struct Courier {
    id: CourierId,
    vehicle: Vehicle,
    /// This courier's usual speed; every segment varies around it.
    cruise_mps: f64,
    /// The current segment (a wait is a segment with `from == to` and no speed).
    from: Vec2,
    to: Vec2,
    depart_at: UnixMillis,
    arrive_at: UnixMillis,
    speed_mps: f64,
    heading_deg: f64,
    /// The destination after the street corner the current segment ends at.
    next_waypoint: Option<Vec2>,
    task: Task,
    /// Bumped whenever the current phase is interrupted, so its scheduled end is ignored.
    generation: u32,
    /// Index in the free pool, when free.
    pool_index: Option<u32>,
}

impl Courier {
    fn position_at(&self, t: UnixMillis) -> Vec2 {
        if t >= self.arrive_at {
            self.to
        } else if t <= self.depart_at {
            self.from
        } else {
            let f = (t - self.depart_at) as f64 / (self.arrive_at - self.depart_at) as f64;
            self.from.lerp(self.to, f)
        }
    }

    fn is_moving_at(&self, t: UnixMillis) -> bool {
        self.speed_mps > 0.0 && t >= self.depart_at && t < self.arrive_at
    }
}

#[derive(Clone, Debug)]
struct DeliveryRec {
    id: DeliveryId,
    generation: u32,
    live: bool,
    pickup: Vec2,
    dropoff: Vec2,
    status: Status,
    courier: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    /// A courier's GPS fix.
    Fix { courier: u32 },
    /// The end of a courier's current segment or wait.
    Arrive { courier: u32, generation: u32 },
    /// The next order comes in.
    Order,
    /// The dispatcher looks for a courier.
    Dispatch(DeliveryRef),
    /// The customer cancels (if the delivery has not ended).
    Cancel(DeliveryRef),
    /// The customer gives up waiting for a courier (if still unassigned).
    GiveUp(DeliveryRef),
    /// The customer rates an ended delivery.
    Rate { delivery: DeliveryId, failed: bool },
}

/// An agenda entry, ordered by time, then by scheduling order (which makes ties
/// deterministic).
#[derive(Clone, Copy, Debug)]
struct Scheduled {
    at: UnixMillis,
    seq: u64,
    action: Action,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Scheduled {}

impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Scheduled {
    /// Reversed, so that `BinaryHeap` (a max-heap) pops the earliest entry first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// A deterministic simulation of a delivery fleet in a synthetic city (see the module
/// documentation for what it simulates).
pub struct FleetSimulator {
    config: SimulatorConfig,
    rng: StdRng,
    now: UnixMillis,
    frame: Frame,
    /// The `zone.upserted` events of the city, stamped with the start time.
    scene: Vec<Event>,
    depot_min: Vec2,
    depot_max: Vec2,
    couriers: Vec<Courier>,
    /// Indices of the couriers without a delivery, for `O(1)` sampling and removal.
    free: Vec<u32>,
    deliveries: Vec<DeliveryRec>,
    free_slots: Vec<u32>,
    /// Deliveries waiting for a free courier, oldest first. Cancelled ones stay until they
    /// reach the front; customers give up after a bounded time, which bounds the queue.
    waiting: VecDeque<DeliveryRef>,
    customers: Vec<CustomerId>,
    agenda: BinaryHeap<Scheduled>,
    seq: u64,
    /// Events of the step in progress.
    out: Vec<Event>,
}

impl std::fmt::Debug for FleetSimulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetSimulator")
            .field("config", &self.config)
            .field("now", &self.now)
            .field("couriers", &self.couriers.len())
            .field("free_couriers", &self.free.len())
            .field(
                "open_deliveries",
                &(self.deliveries.len() - self.free_slots.len()),
            )
            .field("waiting", &self.waiting.len())
            .field("agenda", &self.agenda.len())
            .finish_non_exhaustive()
    }
}

fn random_uuid(rng: &mut StdRng) -> Uuid {
    uuid::Builder::from_random_bytes(rng.random()).into_uuid()
}

/// A uniformly distributed point in a disc of `radius` around `centre`.
fn point_in_disc(rng: &mut StdRng, centre: Vec2, radius: f64) -> Vec2 {
    let r = radius * rng.random::<f64>().sqrt();
    let a = rng.random::<f64>() * TAU;
    centre.add(Vec2::new(r * a.sin(), r * a.cos()))
}

/// A uniformly distributed duration in `[lo, hi)` seconds, as ms.
fn seconds(rng: &mut StdRng, lo: f64, hi: f64) -> i64 {
    (rng.random_range(lo..hi) * 1000.0).round() as i64
}

/// An irregular polygon around `centre`: `vertices` corners at jittered angles (so the ring
/// stays simple) and radii between 75 % and 100 % of `radius`, counter-clockwise as GeoJSON
/// prefers.
fn irregular_polygon(
    rng: &mut StdRng,
    frame: &Frame,
    centre: Vec2,
    radius: f64,
    vertices: usize,
) -> Polygon<f64> {
    let offset = rng.random::<f64>() * TAU;
    let step = TAU / vertices as f64;
    let ring: Vec<Coord<f64>> = (0..vertices)
        .map(|k| {
            let angle = offset + step * (k as f64 + rng.random_range(-0.3..0.3));
            let r = radius * rng.random_range(0.75..1.0);
            // Counter-clockwise in (east, north): increasing mathematical angle.
            frame.coord(centre.add(Vec2::new(r * angle.cos(), r * angle.sin())))
        })
        .collect();
    // `Polygon::new` closes the ring.
    Polygon::new(LineString::new(ring), Vec::new())
}

fn rectangle(frame: &Frame, min: Vec2, max: Vec2) -> Polygon<f64> {
    let ring = [
        Vec2::new(min.x, min.y),
        Vec2::new(max.x, min.y),
        Vec2::new(max.x, max.y),
        Vec2::new(min.x, max.y),
    ]
    .into_iter()
    .map(|p| frame.coord(p))
    .collect();
    Polygon::new(LineString::new(ring), Vec::new())
}

const DISTRICT_NAMES: [&str; 12] = [
    "Old Town",
    "Harbour",
    "University Quarter",
    "Market District",
    "Riverside",
    "Station Quarter",
    "Parkside",
    "Docklands",
    "Hillside",
    "Arts Quarter",
    "Garden City",
    "Exhibition Grounds",
];

const GOOD_COMMENTS: [&str; 4] = [
    "Fast and friendly.",
    "Arrived earlier than expected.",
    "Parcel in perfect condition.",
    "Great service, thank you!",
];

const BAD_COMMENTS: [&str; 4] = [
    "Nobody rang the bell.",
    "Much later than promised.",
    "The parcel was damaged.",
    "Could not reach the courier.",
];

impl FleetSimulator {
    /// Builds the city and the fleet; nothing has happened yet at `start`. Every random
    /// choice, ids included, comes from `config.seed`.
    pub fn new(config: SimulatorConfig, start: UnixMillis) -> Self {
        let config = config.sanitized();
        let mut rng = StdRng::seed_from_u64(config.seed);
        let frame = Frame::new(config.center_lat, config.center_lon);
        let radius = config.radius_m;

        // The depot: a yard near the centre, about 420 m × 240 m in a 6 km city.
        let depot_centre = point_in_disc(&mut rng, Vec2::ZERO, 0.1 * radius);
        let half = Vec2::new(0.035 * radius, 0.02 * radius);
        let depot_min = Vec2::new(depot_centre.x - half.x, depot_centre.y - half.y);
        let depot_max = Vec2::new(depot_centre.x + half.x, depot_centre.y + half.y);

        let dwell_ms = i64::from(config.dwell_seconds) * 1000;
        let mut scene = Vec::with_capacity(config.zones);
        let districts = config.zones.saturating_sub(2);
        let district_offset = rng.random::<f64>() * TAU;
        for index in 0..config.zones {
            let (name, polygon, dwell) = match index {
                0 => (
                    "Depot".to_owned(),
                    rectangle(&frame, depot_min, depot_max),
                    dwell_ms,
                ),
                1 => {
                    let angle = rng.random::<f64>() * TAU;
                    let distance = rng.random_range(0.3..0.5) * radius;
                    let centre = Vec2::new(distance * angle.sin(), distance * angle.cos());
                    let vertices = rng.random_range(5..=7);
                    let polygon =
                        irregular_polygon(&mut rng, &frame, centre, 0.05 * radius, vertices);
                    ("Restricted area".to_owned(), polygon, 0)
                }
                _ => {
                    let k = index - 2;
                    let angle = district_offset
                        + TAU * (k as f64 + rng.random_range(-0.2..0.2)) / districts as f64;
                    let distance = rng.random_range(0.4..0.6) * radius;
                    let centre = Vec2::new(distance * angle.sin(), distance * angle.cos());
                    let size = rng.random_range(0.12..0.17) * radius;
                    let vertices = rng.random_range(6..=9);
                    let polygon = irregular_polygon(&mut rng, &frame, centre, size, vertices);
                    let name = match DISTRICT_NAMES.get(k) {
                        Some(name) => (*name).to_owned(),
                        None => format!("District {}", k + 1),
                    };
                    (name, polygon, if k % 2 == 1 { dwell_ms } else { 0 })
                }
            };
            scene.push(Event {
                event_id: EventId(random_uuid(&mut rng)),
                occurred_at: start,
                body: EventBody::ZoneUpserted(ZoneUpserted {
                    zone_id: ZoneId(random_uuid(&mut rng)),
                    name,
                    shape: ZoneShape(MultiPolygon(vec![polygon])),
                    dwell_ms: dwell,
                }),
            });
        }

        let customer_count = (config.couriers.saturating_mul(4)).clamp(100, 1_000_000);
        let customers = (0..customer_count)
            .map(|_| CustomerId(random_uuid(&mut rng)))
            .collect();

        let mut sim = Self {
            rng,
            now: start,
            frame,
            scene,
            depot_min,
            depot_max,
            couriers: Vec::with_capacity(config.couriers),
            free: Vec::with_capacity(config.couriers),
            deliveries: Vec::new(),
            free_slots: Vec::new(),
            waiting: VecDeque::new(),
            customers,
            agenda: BinaryHeap::with_capacity(config.couriers * 2 + 16),
            seq: 0,
            out: Vec::new(),
            config,
        };

        for index in 0..sim.config.couriers {
            let vehicle = if sim.rng.random_bool(0.7) {
                Vehicle::Bike
            } else {
                Vehicle::Car
            };
            let (lo, hi) = vehicle.speed_range();
            let cruise_mps = sim.rng.random_range(lo + 0.5..hi - 0.5);
            // A third start at the depot, the others somewhere in town.
            let position = if sim.rng.random_bool(0.3) {
                sim.point_in_depot()
            } else {
                point_in_disc(&mut sim.rng, Vec2::ZERO, 0.9 * radius)
            };
            let rest = seconds(&mut sim.rng, 0.0, 120.0);
            let id = CourierId(random_uuid(&mut sim.rng));
            sim.couriers.push(Courier {
                id,
                vehicle,
                cruise_mps,
                from: position,
                to: position,
                depart_at: start,
                arrive_at: start + rest,
                speed_mps: 0.0,
                heading_deg: 0.0,
                next_waypoint: None,
                task: Task::Resting,
                generation: 0,
                pool_index: None,
            });
            let courier = index as u32;
            sim.pool_add(courier);
            sim.schedule(
                start + rest,
                Action::Arrive {
                    courier,
                    generation: 0,
                },
            );
            // Fixes are staggered over the interval, as real devices are.
            let first_fix = sim.rng.random_range(1..=sim.config.fix_interval_ms);
            sim.schedule(start + first_fix, Action::Fix { courier });
        }
        sim.schedule_next_order(start);
        sim
    }

    /// Events that set the scene (zone.upserted for every zone), to be sent first.
    ///
    /// They are stamped with the start time and the same on every call; they are built with
    /// the city, so calling this or not does not change what [`step`](Self::step) returns.
    pub fn initial_events(&mut self) -> Vec<Event> {
        self.scene.clone()
    }

    /// Advances simulated time by `dt_ms` and returns what happened meanwhile, in
    /// occurred_at order. A non-positive `dt_ms` returns nothing.
    pub fn step(&mut self, dt_ms: i64) -> Vec<Event> {
        if dt_ms <= 0 {
            return Vec::new();
        }
        let until = self.now.saturating_add(dt_ms);
        while let Some(next) = self.agenda.peek().copied() {
            if next.at > until {
                break;
            }
            self.agenda.pop();
            self.now = next.at;
            self.handle(next.at, next.action);
        }
        self.now = until;
        std::mem::take(&mut self.out)
    }

    /// The simulated time reached so far.
    pub fn now(&self) -> UnixMillis {
        self.now
    }

    /// The configuration in effect (after clamping).
    pub fn config(&self) -> &SimulatorConfig {
        &self.config
    }

    fn schedule(&mut self, at: UnixMillis, action: Action) {
        self.seq += 1;
        self.agenda.push(Scheduled {
            at,
            seq: self.seq,
            action,
        });
    }

    fn emit(&mut self, at: UnixMillis, body: EventBody) {
        let event_id = EventId(random_uuid(&mut self.rng));
        self.out.push(Event {
            event_id,
            occurred_at: at,
            body,
        });
    }

    fn handle(&mut self, t: UnixMillis, action: Action) {
        match action {
            Action::Fix { courier } => self.fix(t, courier),
            Action::Arrive {
                courier,
                generation,
            } => {
                if self.couriers[courier as usize].generation == generation {
                    self.arrive(t, courier);
                }
            }
            Action::Order => self.order(t),
            Action::Dispatch(d) => self.dispatch(t, d),
            Action::Cancel(d) => self.cancel(t, d, false),
            Action::GiveUp(d) => self.cancel(t, d, true),
            Action::Rate { delivery, failed } => self.rate(t, delivery, failed),
        }
    }

    fn point_in_depot(&mut self) -> Vec2 {
        Vec2::new(
            self.rng.random_range(self.depot_min.x..=self.depot_max.x),
            self.rng.random_range(self.depot_min.y..=self.depot_max.y),
        )
    }

    // --- couriers -------------------------------------------------------------------------

    fn fix(&mut self, t: UnixMillis, courier: u32) {
        let c = &self.couriers[courier as usize];
        let rng = &mut self.rng;
        let moving = c.is_moving_at(t);
        let noise = Vec2::new(
            rng.random_range(-GPS_NOISE_M..GPS_NOISE_M),
            rng.random_range(-GPS_NOISE_M..GPS_NOISE_M),
        );
        let position = self.frame.geo_point(c.position_at(t).add(noise));
        let speed_mps = rng.random_bool(0.85).then(|| {
            if moving {
                c.speed_mps * rng.random_range(0.95..1.05)
            } else {
                rng.random_range(0.0..0.3)
            }
        });
        let heading = (moving && rng.random_bool(0.9)).then(|| {
            let deg = (c.heading_deg + rng.random_range(-4.0..4.0)).rem_euclid(360.0);
            ((deg * 10.0).round() as u16) % 3600
        });
        let accuracy_cm = rng
            .random_bool(0.7)
            .then(|| rng.random_range(300..1_200u32));
        let body = EventBody::LocationUpdated(LocationUpdated {
            courier_id: c.id,
            position,
            speed_mm_s: speed_mps.map(|v| (v * 1000.0).round() as u32),
            heading_ddeg: heading,
            accuracy_cm,
        });
        self.emit(t, body);
        let next = t + self.config.fix_interval_ms;
        self.schedule(next, Action::Fix { courier });
    }

    /// Starts a trip to `dest` from wherever the courier is at `t`, half of the time through
    /// a street corner. Of the two corners of the L, the one nearer the centre is taken: it
    /// lies within the city whenever both ends do.
    fn travel(&mut self, t: UnixMillis, courier: u32, dest: Vec2) {
        let from = self.couriers[courier as usize].position_at(t);
        let mut first = dest;
        let mut then = None;
        if self.rng.random_bool(0.5) {
            let a = Vec2::new(dest.x, from.y);
            let b = Vec2::new(from.x, dest.y);
            let corner = if a.norm() <= b.norm() { a } else { b };
            if corner.dist(from) > 20.0 && corner.dist(dest) > 20.0 {
                first = corner;
                then = Some(dest);
            }
        }
        self.couriers[courier as usize].next_waypoint = then;
        self.segment(t, courier, from, first);
    }

    fn segment(&mut self, t: UnixMillis, courier: u32, from: Vec2, to: Vec2) {
        let c = &mut self.couriers[courier as usize];
        let (lo, hi) = c.vehicle.speed_range();
        let speed = (c.cruise_mps * self.rng.random_range(0.85..1.15)).clamp(lo, hi);
        let ms = ((from.dist(to) / speed) * 1000.0).ceil().max(1.0) as i64;
        c.from = from;
        c.to = to;
        c.depart_at = t;
        c.arrive_at = t + ms;
        c.speed_mps = speed;
        c.heading_deg = from.bearing_to(to);
        let generation = c.generation;
        self.schedule(
            t + ms,
            Action::Arrive {
                courier,
                generation,
            },
        );
    }

    /// Keeps the courier where it is at `t` for `ms`.
    fn wait(&mut self, t: UnixMillis, courier: u32, ms: i64) {
        let c = &mut self.couriers[courier as usize];
        let here = c.position_at(t);
        c.from = here;
        c.to = here;
        c.depart_at = t;
        c.arrive_at = t + ms.max(1);
        c.speed_mps = 0.0;
        let generation = c.generation;
        self.schedule(
            t + ms.max(1),
            Action::Arrive {
                courier,
                generation,
            },
        );
    }

    /// Drops whatever the courier was doing (its pending arrival becomes stale).
    fn interrupt(&mut self, t: UnixMillis, courier: u32) {
        let c = &mut self.couriers[courier as usize];
        let here = c.position_at(t);
        c.from = here;
        c.to = here;
        c.depart_at = t;
        c.arrive_at = t;
        c.speed_mps = 0.0;
        c.next_waypoint = None;
        c.generation = c.generation.wrapping_add(1);
    }

    /// The end of the courier's current segment or wait.
    fn arrive(&mut self, t: UnixMillis, courier: u32) {
        let c = &mut self.couriers[courier as usize];
        if let Some(next) = c.next_waypoint.take() {
            let here = c.to;
            self.segment(t, courier, here, next);
            return;
        }
        match c.task {
            Task::Roaming => {
                c.task = Task::Resting;
                let ms = seconds(&mut self.rng, 20.0, 180.0);
                self.wait(t, courier, ms);
            }
            Task::Resting => self.roam(t, courier),
            Task::ToPickup(d) => {
                c.task = Task::AtPickup(d);
                let ms = seconds(&mut self.rng, 20.0, 120.0);
                self.wait(t, courier, ms);
            }
            Task::AtPickup(d) => {
                c.task = Task::Loading(d);
                self.set_status(t, d, Status::PickedUp, None);
                let ms = seconds(&mut self.rng, 5.0, 30.0);
                self.wait(t, courier, ms);
            }
            Task::Loading(d) => {
                c.task = Task::ToDropoff(d);
                self.set_status(t, d, Status::InTransit, None);
                let dropoff = self.deliveries[d.slot as usize].dropoff;
                self.travel(t, courier, dropoff);
            }
            Task::ToDropoff(d) => {
                c.task = Task::AtDropoff(d);
                let ms = seconds(&mut self.rng, 15.0, 90.0);
                self.wait(t, courier, ms);
            }
            Task::AtDropoff(d) => {
                let failed = self.rng.random_bool(self.config.fail_rate);
                let status = if failed {
                    Status::Failed
                } else {
                    Status::Delivered
                };
                let delivery = self.deliveries[d.slot as usize].id;
                self.set_status(t, d, status, None);
                self.release_slot(d);
                if self.rng.random_bool(self.config.rating_rate) {
                    let later = t + seconds(&mut self.rng, 60.0, 1_200.0);
                    self.schedule(later, Action::Rate { delivery, failed });
                }
                self.become_free(t, courier);
            }
        }
    }

    /// An idle courier picks something to do: back to the depot, or a wander around town.
    fn roam(&mut self, t: UnixMillis, courier: u32) {
        let radius = self.config.radius_m;
        let here = self.couriers[courier as usize].position_at(t);
        let far_from_depot = here.dist(self.depot_min.lerp(self.depot_max, 0.5)) > 0.1 * radius;
        let dest = if far_from_depot && self.rng.random_bool(0.35) {
            self.point_in_depot()
        } else {
            point_in_disc(&mut self.rng, here, 0.25 * radius).clamp_norm(0.95 * radius)
        };
        self.couriers[courier as usize].task = Task::Roaming;
        self.travel(t, courier, dest);
    }

    /// A courier without a delivery takes the oldest waiting one, or joins the free pool.
    fn become_free(&mut self, t: UnixMillis, courier: u32) {
        self.interrupt(t, courier);
        while let Some(d) = self.waiting.pop_front() {
            if self
                .delivery(d)
                .is_some_and(|rec| rec.status == Status::Created)
            {
                self.assign(t, d, courier);
                return;
            }
        }
        self.pool_add(courier);
        self.roam(t, courier);
    }

    fn pool_add(&mut self, courier: u32) {
        let c = &mut self.couriers[courier as usize];
        if c.pool_index.is_none() {
            c.pool_index = Some(self.free.len() as u32);
            self.free.push(courier);
        }
    }

    fn pool_remove(&mut self, courier: u32) {
        if let Some(index) = self.couriers[courier as usize].pool_index.take() {
            self.free.swap_remove(index as usize);
            if let Some(&moved) = self.free.get(index as usize) {
                self.couriers[moved as usize].pool_index = Some(index);
            }
        }
    }

    // --- deliveries -----------------------------------------------------------------------

    fn schedule_next_order(&mut self, t: UnixMillis) {
        let per_ms = self.config.deliveries_per_minute / MINUTE_MS as f64;
        if per_ms <= 0.0 {
            return;
        }
        // Exponential gaps: a Poisson process of orders.
        let u: f64 = self.rng.random_range(f64::EPSILON..1.0);
        let gap = (-u.ln() / per_ms).round().clamp(1.0, 1e12) as i64;
        self.schedule(t + gap, Action::Order);
    }

    fn order(&mut self, t: UnixMillis) {
        let radius = self.config.radius_m;
        let pickup = point_in_disc(&mut self.rng, Vec2::ZERO, 0.9 * radius);
        let mut dropoff = None;
        for _ in 0..8 {
            let distance = self.rng.random_range(0.05..0.5) * radius;
            let angle = self.rng.random::<f64>() * TAU;
            let p = pickup.add(Vec2::new(distance * angle.sin(), distance * angle.cos()));
            if p.norm() <= 0.9 * radius {
                dropoff = Some(p);
                break;
            }
        }
        let dropoff =
            dropoff.unwrap_or_else(|| point_in_disc(&mut self.rng, Vec2::ZERO, 0.9 * radius));
        let customer_id = self.customers[self.rng.random_range(0..self.customers.len())];
        // A promise covers dispatch, handling and the ride at a modest speed, with a margin
        // that is sometimes too tight: some deliveries are late.
        let promised_by = self.rng.random_bool(0.7).then(|| {
            let ride_s = pickup.dist(dropoff) * 1.3 / 5.0;
            t + 8 * MINUTE_MS + seconds(&mut self.rng, ride_s * 0.9, ride_s * 1.8 + 1.0)
        });
        let id = DeliveryId(random_uuid(&mut self.rng));
        let d = self.allocate_slot(DeliveryRec {
            id,
            generation: 0,
            live: true,
            pickup,
            dropoff,
            status: Status::Created,
            courier: None,
        });
        self.emit(
            t,
            EventBody::DeliveryCreated(DeliveryCreated {
                delivery_id: id,
                customer_id,
                pickup: self.frame.geo_point(pickup),
                dropoff: self.frame.geo_point(dropoff),
                promised_by,
            }),
        );
        let dispatch_at = t + seconds(&mut self.rng, 2.0, 20.0);
        self.schedule(dispatch_at, Action::Dispatch(d));
        if self.rng.random_bool(self.config.cancel_rate) {
            let cancel_at = t + seconds(&mut self.rng, 30.0, 900.0);
            self.schedule(cancel_at, Action::Cancel(d));
        }
        self.schedule_next_order(t);
    }

    fn allocate_slot(&mut self, mut rec: DeliveryRec) -> DeliveryRef {
        match self.free_slots.pop() {
            Some(slot) => {
                let generation = self.deliveries[slot as usize].generation;
                rec.generation = generation;
                self.deliveries[slot as usize] = rec;
                DeliveryRef { slot, generation }
            }
            None => {
                self.deliveries.push(rec);
                DeliveryRef {
                    slot: (self.deliveries.len() - 1) as u32,
                    generation: 0,
                }
            }
        }
    }

    fn release_slot(&mut self, d: DeliveryRef) {
        let rec = &mut self.deliveries[d.slot as usize];
        if rec.live && rec.generation == d.generation {
            rec.live = false;
            rec.generation = rec.generation.wrapping_add(1);
            rec.courier = None;
            self.free_slots.push(d.slot);
        }
    }

    /// The delivery `d` refers to, unless it has ended since.
    fn delivery(&self, d: DeliveryRef) -> Option<&DeliveryRec> {
        self.deliveries
            .get(d.slot as usize)
            .filter(|rec| rec.live && rec.generation == d.generation)
    }

    fn set_status(
        &mut self,
        t: UnixMillis,
        d: DeliveryRef,
        status: Status,
        courier_id: Option<CourierId>,
    ) {
        let Some(rec) = self.deliveries.get_mut(d.slot as usize) else {
            return;
        };
        if !(rec.live && rec.generation == d.generation && rec.status.can_become(status)) {
            return;
        }
        rec.status = status;
        let delivery_id = rec.id;
        self.emit(
            t,
            EventBody::StatusChanged(StatusChanged {
                delivery_id,
                status,
                courier_id,
            }),
        );
    }

    fn dispatch(&mut self, t: UnixMillis, d: DeliveryRef) {
        let Some(pickup) = self
            .delivery(d)
            .filter(|rec| rec.status == Status::Created)
            .map(|rec| rec.pickup)
        else {
            return;
        };
        match self.nearest_free(t, pickup) {
            Some(courier) => self.assign(t, d, courier),
            None => {
                // Drop the ended ones from the front, so that the queue holds at most the
                // orders of the last give-up period.
                while let Some(&front) = self.waiting.front() {
                    if self
                        .delivery(front)
                        .is_some_and(|rec| rec.status == Status::Created)
                    {
                        break;
                    }
                    self.waiting.pop_front();
                }
                self.waiting.push_back(d);
                let give_up_at = t + seconds(&mut self.rng, 480.0, 1_200.0);
                self.schedule(give_up_at, Action::GiveUp(d));
            }
        }
    }

    /// The nearest to `target` of a few free couriers: all of them when there are few, a
    /// random sample otherwise, so that the cost does not grow with the fleet.
    fn nearest_free(&mut self, t: UnixMillis, target: Vec2) -> Option<u32> {
        let distance =
            |sim: &Self, courier: u32| sim.couriers[courier as usize].position_at(t).dist2(target);
        let mut best: Option<(f64, u32)> = None;
        let mut consider = |sim: &Self, courier: u32| {
            let d = distance(sim, courier);
            if best.is_none_or(|(bd, _)| d < bd) {
                best = Some((d, courier));
            }
        };
        if self.free.len() <= DISPATCH_CANDIDATES {
            for &courier in &self.free {
                consider(self, courier);
            }
        } else {
            for _ in 0..DISPATCH_CANDIDATES {
                let courier = self.free[self.rng.random_range(0..self.free.len())];
                consider(self, courier);
            }
        }
        best.map(|(_, courier)| courier)
    }

    fn assign(&mut self, t: UnixMillis, d: DeliveryRef, courier: u32) {
        self.pool_remove(courier);
        self.interrupt(t, courier);
        let courier_id = self.couriers[courier as usize].id;
        self.set_status(t, d, Status::Assigned, Some(courier_id));
        let pickup = self.deliveries[d.slot as usize].pickup;
        self.deliveries[d.slot as usize].courier = Some(courier);
        self.couriers[courier as usize].task = Task::ToPickup(d);
        self.travel(t, courier, pickup);
    }

    /// The customer cancels; with `only_unassigned`, only a delivery still waiting for a
    /// courier (giving up). A courier on the job is freed.
    fn cancel(&mut self, t: UnixMillis, d: DeliveryRef, only_unassigned: bool) {
        let Some(rec) = self.delivery(d) else {
            return;
        };
        if rec.status.is_terminal() || (only_unassigned && rec.status != Status::Created) {
            return;
        }
        let courier = rec.courier;
        self.set_status(t, d, Status::Cancelled, None);
        self.release_slot(d);
        if let Some(courier) = courier
            && self.couriers[courier as usize].task.delivery() == Some(d)
        {
            self.couriers[courier as usize].task = Task::Resting;
            self.become_free(t, courier);
        }
    }

    fn rate(&mut self, t: UnixMillis, delivery_id: DeliveryId, failed: bool) {
        // Cumulative weights of scores 1..=5, in percent.
        let weights: [u32; 5] = if failed {
            [35, 60, 80, 92, 100]
        } else {
            [4, 9, 20, 50, 100]
        };
        let draw = self.rng.random_range(0..100u32);
        let score = weights.iter().position(|&w| draw < w).unwrap_or(4) as u8 + 1;
        let comment = self.rng.random_bool(0.25).then(|| {
            let pool = if score >= 4 {
                &GOOD_COMMENTS
            } else {
                &BAD_COMMENTS
            };
            pool[self.rng.random_range(0..pool.len())].to_owned()
        });
        self.emit(
            t,
            EventBody::DeliveryRated(DeliveryRated {
                delivery_id,
                score,
                comment,
            }),
        );
    }
}

/// Drives a simulator in real time (sim time = wall time × `speed`), sending its events into
/// `sender` every `tick`, until `shutdown` resolves or the receiver is gone.
///
/// The scene ([`FleetSimulator::initial_events`]) is sent first. Sending waits while the
/// channel is full, so a slow dataflow slows the simulator's output (it catches up in larger
/// steps later) rather than growing memory. Simulated time starts at the simulator's
/// [`now`](FleetSimulator::now): with `speed > 1` it runs ahead of the wall clock, so a
/// consumer that rejects timestamps far in the future needs a start in the past.
///
/// # Errors
/// [`SourceError::Config`] when `speed` is not a positive finite number or `tick` is zero.
/// The receiver going away is the normal end, not an error.
pub async fn run_simulator(
    mut sim: FleetSimulator,
    sender: InProcessSender,
    tick: Duration,
    speed: f64,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), SourceError> {
    if !(speed.is_finite() && speed > 0.0) {
        return Err(SourceError::Config(format!(
            "the simulator speed must be a positive number, not {speed}"
        )));
    }
    if tick.is_zero() {
        return Err(SourceError::Config(
            "the simulator tick must be longer than zero".to_owned(),
        ));
    }
    let mut shutdown = pin!(shutdown);
    let scene = sim.initial_events();
    tokio::select! {
        biased;
        () = &mut shutdown => return Ok(()),
        sent = sender.send_batch(scene) => if sent.is_err() { return Ok(()) },
    }

    let wall_start = Instant::now();
    let sim_start = sim.now();
    let mut ticks = tokio::time::interval(tick);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            () = sender.closed() => break,
            _ = ticks.tick() => {}
        }
        let elapsed_ms = wall_start.elapsed().as_secs_f64() * 1000.0;
        let target = sim_start.saturating_add((elapsed_ms * speed) as i64);
        let events = sim.step(target - sim.now());
        if events.is_empty() {
            continue;
        }
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            sent = sender.send_batch(events) => if sent.is_err() { break },
        }
    }
    tracing::debug!(sim_now = sim.now(), "The fleet simulator stopped.");
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
