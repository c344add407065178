//! What the Redis sink knows and writes, without I/O: the key names, the JSON values, the
//! part of the current state the cache is rebuilt from, and the writes of one epoch or of
//! one resync.
//!
//! The sink mirrors only what the cache shows and what is live: couriers whose location key
//! would still exist, deliveries that have not ended (with their ETAs), and, while Redis is
//! unreachable, what ended or disappeared meanwhile. Ended deliveries and old history are
//! not kept: PostgreSQL is the record, the cache is rebuilt from what is hot.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use delivertrack_dataflow::model::{CourierState, DeliveryState, Eta};
use delivertrack_dataflow::{
    Change, CourierId, CustomerId, DeliveryId, Epoch, EpochOutput, UnixMillis,
};
use serde::Serialize;

use super::config::RedisConfig;
pub use crate::read_model::DeliveryDetails;

/// The key names, all under one prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `prefix` (`delivertrack:` by default).
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    /// `{prefix}courier:{id}:location`: a [`CourierLocation`].
    pub fn courier_location(&self, id: CourierId) -> String {
        format!("{}courier:{id}:location", self.prefix)
    }

    /// `{prefix}delivery:{id}`: a [`DeliveryDetails`].
    pub fn delivery(&self, id: DeliveryId) -> String {
        format!("{}delivery:{id}", self.prefix)
    }

    /// `{prefix}customer:{id}:deliveries`: a sorted set of delivery ids scored by their
    /// `created_at` (Unix ms).
    pub fn customer_history(&self, id: CustomerId) -> String {
        format!("{}customer:{id}:deliveries", self.prefix)
    }
}

/// The value of `courier:{id}:location`.
///
/// Field names and units are those of the API's courier view: positions in degrees, times
/// in Unix milliseconds (`_ms`), speeds in m/s, headings in degrees clockwise from north.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CourierLocation {
    /// The courier.
    pub courier_id: CourierId,
    /// Latitude, degrees.
    pub lat: f64,
    /// Longitude, degrees.
    pub lon: f64,
    /// When the fix was taken (`occurred_at`), Unix ms.
    pub at_ms: UnixMillis,
    /// Current speed, m/s, when known.
    pub speed_mps: Option<f64>,
    /// Heading, degrees, when reported.
    pub heading_deg: Option<f64>,
}

impl CourierLocation {
    /// The location of one courier's state.
    pub fn new(courier_id: CourierId, state: &CourierState) -> Self {
        Self {
            courier_id,
            lat: state.position.lat(),
            lon: state.position.lon(),
            at_ms: state.at,
            speed_mps: state.speed_mm_s.map(|s| f64::from(s) / 1000.0),
            heading_deg: state.heading_ddeg.map(|h| f64::from(h) / 10.0),
        }
    }
}

/// One write to Redis. A list of them becomes one pipeline (`service::pipeline`).
#[derive(Clone, Debug, PartialEq)]
pub enum Write {
    /// `SET key value PX ttl_ms`.
    Set {
        /// The key.
        key: String,
        /// JSON.
        value: String,
        /// Lifetime, ms (at least 1).
        ttl_ms: u64,
    },
    /// `DEL key`.
    Del {
        /// The key.
        key: String,
    },
    /// A customer's history: `ZADD key score member ...`, `ZREM key member ...`, then
    /// `ZREMRANGEBYRANK key 0 -(keep + 1)` (the newest `keep` stay) and `PEXPIRE key ttl_ms`.
    History {
        /// The key.
        key: String,
        /// `(created_at, delivery id)` to add or refresh.
        add: Vec<(UnixMillis, String)>,
        /// Delivery ids to remove.
        remove: Vec<String>,
        /// How many ids stay.
        keep: usize,
        /// Lifetime, ms (at least 1).
        ttl_ms: u64,
    },
}

/// A courier location the cache shows, until the key expires.
#[derive(Clone, Debug)]
struct Located {
    state: CourierState,
    /// When the key written for this state expires.
    expires: Instant,
}

/// What the cache must still learn about a delivery that left the live mirror (ended or
/// disappeared) while Redis was unreachable.
#[derive(Clone, Debug)]
struct Pending {
    customer: CustomerId,
    /// `Some`: keep it in the customer's history with this score; `None`: the delivery is
    /// gone, remove it.
    created_at: Option<UnixMillis>,
    /// The ended delivery's value and when its key would expire; `None` once that time
    /// has passed, or for a gone delivery: the key is deleted.
    details: Option<(String, Instant)>,
}

/// An epoch's writes, and what they would leave unknown to the cache if they failed.
#[derive(Debug, Default)]
pub struct EpochWrites {
    /// The writes, in order.
    pub writes: Vec<Write>,
    /// Deliveries that ended or disappeared in the epoch (they leave the mirror).
    leftovers: Vec<(DeliveryId, Pending)>,
    /// Couriers that disappeared in the epoch.
    couriers_gone: Vec<CourierId>,
}

/// What one write changes in a customer's history.
#[derive(Debug, Default)]
struct HistoryChange {
    /// `(created_at, delivery id)` to add or refresh.
    add: Vec<(UnixMillis, String)>,
    /// Delivery ids to remove.
    remove: Vec<String>,
}

/// The history changes of one write, by customer (ordered, so that writes are
/// deterministic).
type Histories = BTreeMap<CustomerId, HistoryChange>;

/// The lifetimes, in the units the commands take.
#[derive(Clone, Copy, Debug)]
struct Lifetimes {
    courier: Duration,
    active_ms: u64,
    ended: Duration,
    history_ms: u64,
    history_len: usize,
}

/// The part of the current state the cache is made of, and the writes that keep it so.
pub struct Cache {
    keys: Keys,
    ttl: Lifetimes,
    /// The last epoch applied: an epoch at or below it is a replay and is skipped.
    last_epoch: Option<Epoch>,
    /// Couriers whose location key is (or should be) in Redis; pruned once it expired.
    couriers: HashMap<CourierId, Located>,
    /// Deliveries that have not ended.
    deliveries: HashMap<DeliveryId, DeliveryState>,
    /// The dataflow's `eta` collection (active deliveries only).
    etas: HashMap<DeliveryId, Eta>,
    /// While Redis is unreachable: deliveries that ended or disappeared meanwhile.
    pending: HashMap<DeliveryId, Pending>,
    /// While Redis is unreachable: couriers that disappeared meanwhile.
    couriers_gone: HashSet<CourierId>,
}

/// Sizes only: the mirror can hold thousands of records, too many for a log line.
impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("keys", &self.keys)
            .field("last_epoch", &self.last_epoch)
            .field("couriers", &self.couriers.len())
            .field("deliveries", &self.deliveries.len())
            .field("etas", &self.etas.len())
            .field("pending", &self.pending.len())
            .field("couriers_gone", &self.couriers_gone.len())
            .finish()
    }
}

impl Cache {
    /// An empty cache with the key names and lifetimes of `config`.
    pub fn new(config: &RedisConfig) -> Self {
        Self {
            keys: Keys::new(config.key_prefix.clone()),
            ttl: Lifetimes {
                courier: config.courier_location_ttl,
                active_ms: millis(config.active_delivery_ttl),
                ended: config.ended_delivery_ttl,
                history_ms: millis(config.customer_history_ttl),
                history_len: config.customer_history_len,
            },
            last_epoch: None,
            couriers: HashMap::new(),
            deliveries: HashMap::new(),
            etas: HashMap::new(),
            pending: HashMap::new(),
            couriers_gone: HashSet::new(),
        }
    }

    /// The key names.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Applies one epoch to the mirror and returns its writes; `None` for an epoch at or
    /// below the last one applied (a replay: the cache already has it).
    ///
    /// An upsert arrives as `-old +new`; a record only retracted is gone. `now` is when the
    /// writes are sent: the courier keys' expiry is counted from it.
    pub fn apply(&mut self, output: &EpochOutput, now: Instant) -> Option<EpochWrites> {
        if self.last_epoch.is_some_and(|last| output.epoch <= last) {
            return None;
        }
        self.last_epoch = Some(output.epoch);
        self.prune(now);
        if output.restored {
            return Some(self.restore(output, now));
        }

        let mut courier_added = BTreeMap::new();
        let mut courier_removed = BTreeSet::new();
        let mut delivery_added = BTreeMap::new();
        let mut delivery_removed = BTreeMap::new();
        let mut eta_added = BTreeMap::new();
        let mut eta_removed = BTreeSet::new();
        for (change, diff) in &output.changes {
            match (change, *diff > 0) {
                (Change::Courier(id, state), true) => {
                    courier_added.insert(*id, state);
                }
                (Change::Courier(id, _), false) => {
                    courier_removed.insert(*id);
                }
                (Change::Delivery(id, state), true) => {
                    delivery_added.insert(*id, state);
                }
                (Change::Delivery(id, state), false) => {
                    delivery_removed.insert(*id, state);
                }
                (Change::Eta(id, eta), true) => {
                    eta_added.insert(*id, eta);
                }
                (Change::Eta(id, _), false) => {
                    eta_removed.insert(*id);
                }
                _ => {}
            }
        }

        let mut out = EpochWrites::default();

        // Couriers: the latest fix, with a fresh lifetime.
        for id in &courier_removed {
            if !courier_added.contains_key(id) {
                self.couriers.remove(id);
                out.writes.push(Write::Del {
                    key: self.keys.courier_location(*id),
                });
                out.couriers_gone.push(*id);
            }
        }
        for (id, state) in courier_added {
            let location = CourierLocation::new(id, state);
            out.writes.push(Write::Set {
                key: self.keys.courier_location(id),
                value: json(&location),
                ttl_ms: millis(self.ttl.courier),
            });
            self.couriers_gone.remove(&id);
            self.couriers.insert(
                id,
                Located {
                    state: state.clone(),
                    expires: now + self.ttl.courier,
                },
            );
        }

        // ETAs first, so that a delivery touched below is written with its current one.
        for id in &eta_removed {
            self.etas.remove(id);
        }
        for (id, eta) in &eta_added {
            self.etas.insert(*id, (*eta).clone());
        }

        // Deliveries whose record or ETA changed: one write each, and their histories.
        let touched: BTreeSet<DeliveryId> = delivery_added
            .keys()
            .chain(delivery_removed.keys())
            .chain(eta_added.keys())
            .chain(eta_removed.iter())
            .copied()
            .collect();
        let mut histories = Histories::new();
        for id in touched {
            let key = self.keys.delivery(id);
            if let Some(state) = delivery_added.get(&id).copied() {
                histories
                    .entry(state.customer_id)
                    .or_default()
                    .add
                    .push((state.created_at, id.to_string()));
                let value = json(&DeliveryDetails::new(id, state, self.etas.get(&id)));
                if state.status.is_terminal() {
                    self.deliveries.remove(&id);
                    let details = if self.ttl.ended.is_zero() {
                        out.writes.push(Write::Del { key });
                        None
                    } else {
                        out.writes.push(Write::Set {
                            key,
                            value: value.clone(),
                            ttl_ms: millis(self.ttl.ended),
                        });
                        Some((value, now + self.ttl.ended))
                    };
                    out.leftovers.push((
                        id,
                        Pending {
                            customer: state.customer_id,
                            created_at: Some(state.created_at),
                            details,
                        },
                    ));
                } else {
                    out.writes.push(Write::Set {
                        key,
                        value,
                        ttl_ms: self.ttl.active_ms,
                    });
                    self.pending.remove(&id);
                    self.deliveries.insert(id, state.clone());
                }
            } else if let Some(state) = delivery_removed.get(&id).copied() {
                self.deliveries.remove(&id);
                out.writes.push(Write::Del { key });
                histories
                    .entry(state.customer_id)
                    .or_default()
                    .remove
                    .push(id.to_string());
                out.leftovers.push((
                    id,
                    Pending {
                        customer: state.customer_id,
                        created_at: None,
                        details: None,
                    },
                ));
            } else if let Some(state) = self.deliveries.get(&id) {
                // Only the ETA moved.
                let value = json(&DeliveryDetails::new(id, state, self.etas.get(&id)));
                out.writes.push(Write::Set {
                    key,
                    value,
                    ttl_ms: self.ttl.active_ms,
                });
            }
        }
        for (customer, change) in histories {
            out.writes.push(self.history(customer, change));
        }
        Some(out)
    }

    /// A restored epoch (hydration at start): its changes are every record the pipeline
    /// starts from, ended deliveries of all time included. The mirror takes the live part
    /// of them, and Redis gets what a resync writes (live couriers, deliveries not ended,
    /// their histories), not a key per delivery that ever ended.
    fn restore(&mut self, output: &EpochOutput, now: Instant) -> EpochWrites {
        for (change, diff) in &output.changes {
            if *diff <= 0 {
                continue;
            }
            match change {
                Change::Courier(id, state) => {
                    self.couriers.insert(
                        *id,
                        Located {
                            state: state.clone(),
                            expires: now + self.ttl.courier,
                        },
                    );
                }
                Change::Delivery(id, state) if !state.status.is_terminal() => {
                    self.deliveries.insert(*id, state.clone());
                }
                Change::Eta(id, eta) => {
                    self.etas.insert(*id, eta.clone());
                }
                _ => {}
            }
        }
        EpochWrites {
            writes: self.resync(now),
            ..EpochWrites::default()
        }
    }

    /// Keeps what a failed epoch left unknown to Redis, for the next resync.
    pub fn remember(&mut self, writes: EpochWrites) {
        for id in writes.couriers_gone {
            self.couriers_gone.insert(id);
        }
        for (id, pending) in writes.leftovers {
            self.pending.insert(id, pending);
        }
    }

    /// Every write that makes Redis show the current state again, whatever it held: the
    /// keys of what disappeared meanwhile deleted, what ended meanwhile with what is left
    /// of its short lifetime, every live courier location (with what is left of its
    /// lifetime), every active delivery, and the histories of their customers.
    ///
    /// History entries of deliveries that ended before the outage and are not kept here
    /// stay as Redis has them (a Redis that lost its data loses those: the record is
    /// PostgreSQL).
    pub fn resync(&mut self, now: Instant) -> Vec<Write> {
        self.prune(now);
        let mut writes = Vec::new();
        let mut gone: Vec<&CourierId> = self.couriers_gone.iter().collect();
        gone.sort();
        for id in gone {
            writes.push(Write::Del {
                key: self.keys.courier_location(*id),
            });
        }
        let mut histories = Histories::new();
        let mut pending: Vec<(&DeliveryId, &Pending)> = self.pending.iter().collect();
        pending.sort_by_key(|(id, _)| **id);
        for (id, ended) in pending {
            let key = self.keys.delivery(*id);
            match &ended.details {
                Some((value, expires)) => writes.push(Write::Set {
                    key,
                    value: value.clone(),
                    ttl_ms: remaining_ms(*expires, now),
                }),
                None => writes.push(Write::Del { key }),
            }
            let history = histories.entry(ended.customer).or_default();
            match ended.created_at {
                Some(created_at) => history.add.push((created_at, id.to_string())),
                None => history.remove.push(id.to_string()),
            }
        }
        let mut couriers: Vec<(&CourierId, &Located)> = self.couriers.iter().collect();
        couriers.sort_by_key(|(id, _)| **id);
        for (id, located) in couriers {
            writes.push(Write::Set {
                key: self.keys.courier_location(*id),
                value: json(&CourierLocation::new(*id, &located.state)),
                ttl_ms: remaining_ms(located.expires, now),
            });
        }
        let mut deliveries: Vec<(&DeliveryId, &DeliveryState)> = self.deliveries.iter().collect();
        deliveries.sort_by_key(|(id, _)| **id);
        for (id, state) in deliveries {
            writes.push(Write::Set {
                key: self.keys.delivery(*id),
                value: json(&DeliveryDetails::new(*id, state, self.etas.get(id))),
                ttl_ms: self.ttl.active_ms,
            });
            histories
                .entry(state.customer_id)
                .or_default()
                .add
                .push((state.created_at, id.to_string()));
        }
        for (customer, change) in histories {
            writes.push(self.history(customer, change));
        }
        writes
    }

    /// Redis has everything: what was pending is written.
    pub fn synced(&mut self) {
        self.pending.clear();
        self.couriers_gone.clear();
    }

    /// How many entities the mirror holds: couriers, live deliveries, pending deliveries.
    pub fn sizes(&self) -> (usize, usize, usize) {
        (
            self.couriers.len(),
            self.deliveries.len(),
            self.pending.len(),
        )
    }

    /// Drops what Redis has expired by now: couriers whose location key is gone, and the
    /// values of pending ended deliveries whose short lifetime is over (their keys are
    /// deleted at the resync instead).
    fn prune(&mut self, now: Instant) {
        self.couriers.retain(|_, located| located.expires > now);
        for pending in self.pending.values_mut() {
            if pending
                .details
                .as_ref()
                .is_some_and(|(_, expires)| *expires <= now)
            {
                pending.details = None;
            }
        }
    }

    fn history(&self, customer: CustomerId, change: HistoryChange) -> Write {
        Write::History {
            key: self.keys.customer_history(customer),
            add: change.add,
            remove: change.remove,
            keep: self.ttl.history_len,
            ttl_ms: self.ttl.history_ms,
        }
    }
}

/// A duration in whole milliseconds, at least 1 (Redis refuses a zero lifetime).
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// What is left until `expires`, at least 1 ms.
fn remaining_ms(expires: Instant, now: Instant) -> u64 {
    millis(expires.saturating_duration_since(now))
}

/// The JSON of a value whose serialization cannot fail (plain structs of numbers, strings
/// and options); an empty object if it ever did, rather than a panic in the pipeline.
fn json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "{}".to_owned())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use delivertrack_dataflow::geometry::GeoPoint;
    use delivertrack_dataflow::model::Rating;
    use delivertrack_dataflow::{EventId, Status};
    use uuid::Uuid;

    use super::*;

    fn courier(n: u128) -> CourierId {
        CourierId(Uuid::from_u128(n))
    }

    fn delivery(n: u128) -> DeliveryId {
        DeliveryId(Uuid::from_u128(0xd0 << 64 | n))
    }

    /// A courier's state, read from its serialized form so that the test names only the
    /// fields the cache shows (the record carries more, such as zone presence).
    fn fix(at: i64, lat: f64) -> CourierState {
        let position = GeoPoint::from_degrees(lat, 13.4);
        serde_json::from_value(serde_json::json!({
            "position": position,
            "at": at,
            "event_id": EventId(Uuid::from_u128(at as u128)),
            "speed_mm_s": 8_100,
            "heading_ddeg": 905,
            "odometer_mm": 0,
            "active_hours": 1,
            "presence": [],
        }))
        .expect("a courier state")
    }

    fn order(status: Status, version: u32) -> DeliveryState {
        DeliveryState {
            customer_id: CustomerId(Uuid::from_u128(0xc0)),
            courier_id: (status != Status::Created).then(|| courier(1)),
            pickup: GeoPoint::from_degrees(52.5, 13.4),
            dropoff: GeoPoint::from_degrees(52.51, 13.41),
            promised_by: Some(5_000_000),
            status,
            created_at: 1_000_000,
            assigned_at: None,
            picked_up_at: None,
            ended_at: status.is_terminal().then_some(2_000_000),
            rating: None,
            version,
        }
    }

    fn eta(at: i64) -> Eta {
        Eta {
            courier_id: courier(1),
            status: Status::Assigned,
            remaining_m: 1_200,
            speed_mm_s: 5_000,
            eta_at: at,
            as_of: at - 240_000,
        }
    }

    fn epoch(epoch: Epoch, changes: Vec<(Change, i64)>) -> EpochOutput {
        EpochOutput {
            epoch,
            changes,
            ..EpochOutput::default()
        }
    }

    fn keys_of(writes: &[Write]) -> Vec<String> {
        writes
            .iter()
            .map(|w| match w {
                Write::Set { key, .. } => format!("SET {key}"),
                Write::Del { key } => format!("DEL {key}"),
                Write::History { key, .. } => format!("HISTORY {key}"),
            })
            .collect()
    }

    fn set_value(writes: &[Write], wanted: &str) -> (serde_json::Value, u64) {
        writes
            .iter()
            .find_map(|w| match w {
                Write::Set { key, value, ttl_ms } if key == wanted => {
                    Some((serde_json::from_str(value).unwrap(), *ttl_ms))
                }
                _ => None,
            })
            .unwrap_or_else(|| panic!("no SET of {wanted} in {writes:?}"))
    }

    #[test]
    fn key_names_follow_the_documented_layout() {
        let keys = Keys::new("dt:");
        assert_eq!(
            keys.courier_location(courier(1)),
            "dt:courier:00000000-0000-0000-0000-000000000001:location"
        );
        assert_eq!(
            keys.delivery(DeliveryId(Uuid::nil())),
            "dt:delivery:00000000-0000-0000-0000-000000000000"
        );
        assert_eq!(
            keys.customer_history(CustomerId(Uuid::nil())),
            "dt:customer:00000000-0000-0000-0000-000000000000:deliveries"
        );
    }

    #[test]
    fn values_have_the_documented_shape() {
        let location =
            serde_json::to_value(CourierLocation::new(courier(1), &fix(7, 52.5))).unwrap();
        assert_eq!(
            location,
            serde_json::json!({
                "courier_id": courier(1), "lat": 52.5, "lon": 13.4, "at_ms": 7,
                "speed_mps": 8.1, "heading_deg": 90.5,
            })
        );
        let mut state = order(Status::Delivered, 5);
        state.rating = Some(Rating {
            score: 4,
            comment: None,
            at: 2_100_000,
        });
        let details =
            serde_json::to_value(DeliveryDetails::new(delivery(1), &state, None)).unwrap();
        assert_eq!(details["status"], "delivered");
        assert_eq!(details["ended_at_ms"], 2_000_000);
        assert_eq!(details["rating"]["score"], 4);
        assert_eq!(details["eta"], serde_json::Value::Null);
        assert_eq!(
            details["pickup"],
            serde_json::json!({"lat": 52.5, "lon": 13.4})
        );
    }

    #[test]
    fn an_epoch_writes_locations_deliveries_with_etas_and_histories() {
        let config = RedisConfig::default();
        let mut cache = Cache::new(&config);
        let now = Instant::now();
        let out = cache
            .apply(
                &epoch(
                    0,
                    vec![
                        (Change::Courier(courier(1), fix(1, 52.5)), 1),
                        (Change::Delivery(delivery(1), order(Status::Assigned, 2)), 1),
                        (Change::Eta(delivery(1), eta(9_000)), 1),
                    ],
                ),
                now,
            )
            .unwrap();
        let keys = cache.keys().clone();
        assert_eq!(
            keys_of(&out.writes),
            [
                format!("SET {}", keys.courier_location(courier(1))),
                format!("SET {}", keys.delivery(delivery(1))),
                format!(
                    "HISTORY {}",
                    keys.customer_history(order(Status::Created, 1).customer_id)
                ),
            ]
        );
        let (location, ttl) = set_value(&out.writes, &keys.courier_location(courier(1)));
        assert_eq!(ttl, 15_000);
        assert_eq!(location["lat"], 52.5);
        let (details, ttl) = set_value(&out.writes, &keys.delivery(delivery(1)));
        assert_eq!(ttl, 24 * 3600 * 1000);
        assert_eq!(details["eta"]["eta_ms"], 9_000);
        let Some(Write::History {
            add, keep, ttl_ms, ..
        }) = out.writes.last()
        else {
            panic!("a history write");
        };
        assert_eq!(add, &[(1_000_000, delivery(1).to_string())]);
        assert_eq!((*keep, *ttl_ms), (100, 30 * 24 * 3600 * 1000));
    }

    #[test]
    fn a_moving_eta_rewrites_the_delivery_and_an_ended_one_gets_the_short_lifetime() {
        let mut cache = Cache::new(&RedisConfig::default());
        let now = Instant::now();
        let assigned = order(Status::Assigned, 2);
        cache.apply(
            &epoch(
                0,
                vec![
                    (Change::Delivery(delivery(1), assigned.clone()), 1),
                    (Change::Eta(delivery(1), eta(9_000)), 1),
                ],
            ),
            now,
        );
        let moved = cache
            .apply(
                &epoch(
                    1,
                    vec![
                        (Change::Eta(delivery(1), eta(9_000)), -1),
                        (Change::Eta(delivery(1), eta(8_000)), 1),
                    ],
                ),
                now,
            )
            .unwrap();
        let key = cache.keys().delivery(delivery(1));
        assert_eq!(keys_of(&moved.writes), [format!("SET {key}")]);
        assert_eq!(set_value(&moved.writes, &key).0["eta"]["eta_ms"], 8_000);

        let ended = cache
            .apply(
                &epoch(
                    2,
                    vec![
                        (Change::Delivery(delivery(1), assigned), -1),
                        (
                            Change::Delivery(delivery(1), order(Status::Cancelled, 3)),
                            1,
                        ),
                        (Change::Eta(delivery(1), eta(8_000)), -1),
                    ],
                ),
                now,
            )
            .unwrap();
        let (details, ttl) = set_value(&ended.writes, &key);
        assert_eq!(ttl, 3_600_000);
        assert_eq!(details["status"], "cancelled");
        assert_eq!(details["eta"], serde_json::Value::Null);
        assert_eq!(cache.sizes(), (0, 0, 0), "ended deliveries are not kept");
    }

    #[test]
    fn a_zero_ended_lifetime_deletes_the_key_and_a_vanished_delivery_leaves_its_history() {
        let config = RedisConfig {
            ended_delivery_ttl: Duration::ZERO,
            ..RedisConfig::default()
        };
        let mut cache = Cache::new(&config);
        let now = Instant::now();
        let created = order(Status::Created, 1);
        cache.apply(
            &epoch(0, vec![(Change::Delivery(delivery(1), created.clone()), 1)]),
            now,
        );
        let ended = cache
            .apply(
                &epoch(
                    1,
                    vec![
                        (Change::Delivery(delivery(1), created.clone()), -1),
                        (
                            Change::Delivery(delivery(1), order(Status::Cancelled, 2)),
                            1,
                        ),
                    ],
                ),
                now,
            )
            .unwrap();
        let key = cache.keys().delivery(delivery(1));
        assert!(keys_of(&ended.writes).contains(&format!("DEL {key}")));

        cache.apply(
            &epoch(2, vec![(Change::Delivery(delivery(2), created.clone()), 1)]),
            now,
        );
        let gone = cache
            .apply(
                &epoch(3, vec![(Change::Delivery(delivery(2), created), -1)]),
                now,
            )
            .unwrap();
        let Some(Write::History { add, remove, .. }) = gone.writes.last() else {
            panic!("a history write");
        };
        assert!(add.is_empty());
        assert_eq!(remove, &[delivery(2).to_string()]);
    }

    #[test]
    fn a_replayed_epoch_is_skipped() {
        let mut cache = Cache::new(&RedisConfig::default());
        let now = Instant::now();
        let first = epoch(4, vec![(Change::Courier(courier(1), fix(1, 52.5)), 1)]);
        assert!(cache.apply(&first, now).is_some());
        assert!(cache.apply(&first, now).is_none());
        assert!(cache.apply(&epoch(3, Vec::new()), now).is_none());
        assert!(cache.apply(&epoch(5, Vec::new()), now).is_some());
    }

    #[test]
    fn a_resync_rewrites_what_is_live_and_what_changed_while_redis_was_away() {
        let config = RedisConfig::default();
        let mut cache = Cache::new(&config);
        let start = Instant::now();
        let created = order(Status::Created, 1);
        let assigned = order(Status::Assigned, 2);
        cache.apply(
            &epoch(
                0,
                vec![
                    (Change::Courier(courier(1), fix(1, 52.5)), 1),
                    (Change::Courier(courier(2), fix(1, 52.6)), 1),
                    (Change::Delivery(delivery(1), created.clone()), 1),
                    (Change::Delivery(delivery(2), created.clone()), 1),
                ],
            ),
            start,
        );
        // Redis goes away; in the next epochs courier 2 disappears, delivery 1 is assigned,
        // delivery 2 is cancelled.
        let later = start + Duration::from_secs(10);
        let failed = cache
            .apply(
                &epoch(
                    1,
                    vec![
                        (Change::Courier(courier(2), fix(1, 52.6)), -1),
                        (Change::Delivery(delivery(1), created.clone()), -1),
                        (Change::Delivery(delivery(1), assigned), 1),
                        (Change::Delivery(delivery(2), created), -1),
                        (
                            Change::Delivery(delivery(2), order(Status::Cancelled, 2)),
                            1,
                        ),
                    ],
                ),
                later,
            )
            .unwrap();
        cache.remember(failed);
        assert_eq!(cache.sizes(), (1, 1, 1));

        let back = later + Duration::from_secs(2);
        let writes = cache.resync(back);
        let keys = cache.keys().clone();
        assert_eq!(
            keys_of(&writes),
            [
                format!("DEL {}", keys.courier_location(courier(2))),
                format!("SET {}", keys.delivery(delivery(2))),
                format!("SET {}", keys.courier_location(courier(1))),
                format!("SET {}", keys.delivery(delivery(1))),
                format!(
                    "HISTORY {}",
                    keys.customer_history(order(Status::Created, 1).customer_id)
                ),
            ]
        );
        // Courier 1's key was written at `start` with 15 s: 3 s are left.
        assert_eq!(
            set_value(&writes, &keys.courier_location(courier(1))).1,
            3_000
        );
        // Delivery 2 ended at `later` with 1 h: 1 h - 2 s are left.
        let (details, ttl) = set_value(&writes, &keys.delivery(delivery(2)));
        assert_eq!(
            (details["status"].as_str(), ttl),
            (Some("cancelled"), 3_598_000)
        );
        assert_eq!(
            set_value(&writes, &keys.delivery(delivery(1))).0["status"],
            "assigned"
        );
        let Some(Write::History { add, .. }) = writes.last() else {
            panic!("a history write");
        };
        assert_eq!(add.len(), 2);

        cache.synced();
        assert_eq!(cache.sizes(), (1, 1, 0));
        // Once courier 1's key has expired, the mirror forgets it too.
        let writes = cache.resync(start + Duration::from_secs(16));
        assert!(!keys_of(&writes).iter().any(|k| k.contains(":location")));
        assert_eq!(cache.sizes(), (0, 1, 0));
    }

    #[test]
    fn a_restored_epoch_writes_the_live_state_only() {
        let mut cache = Cache::new(&RedisConfig::default());
        let now = Instant::now();
        let restored = EpochOutput {
            restored: true,
            ..epoch(
                0,
                vec![
                    (Change::Courier(courier(1), fix(1, 52.5)), 1),
                    (Change::Delivery(delivery(1), order(Status::Assigned, 2)), 1),
                    (Change::Eta(delivery(1), eta(9_000)), 1),
                    (
                        Change::Delivery(delivery(2), order(Status::Delivered, 5)),
                        1,
                    ),
                ],
            )
        };
        let writes = cache.apply(&restored, now).unwrap().writes;
        let keys = cache.keys().clone();
        assert_eq!(
            keys_of(&writes),
            [
                format!("SET {}", keys.courier_location(courier(1))),
                format!("SET {}", keys.delivery(delivery(1))),
                format!(
                    "HISTORY {}",
                    keys.customer_history(order(Status::Created, 1).customer_id)
                ),
            ]
        );
        assert_eq!(
            set_value(&writes, &keys.delivery(delivery(1))).0["eta"]["eta_ms"],
            9_000
        );
        // The restored ETA is known: an ETA-only change later rewrites the delivery.
        let moved = cache
            .apply(
                &epoch(
                    1,
                    vec![
                        (Change::Eta(delivery(1), eta(9_000)), -1),
                        (Change::Eta(delivery(1), eta(7_000)), 1),
                    ],
                ),
                now,
            )
            .unwrap();
        let (details, _) = set_value(&moved.writes, &keys.delivery(delivery(1)));
        assert_eq!(details["eta"]["eta_ms"], 7_000);
    }

    #[test]
    fn an_ended_delivery_whose_lifetime_ran_out_during_the_outage_is_deleted() {
        let mut cache = Cache::new(&RedisConfig {
            ended_delivery_ttl: Duration::from_secs(60),
            ..RedisConfig::default()
        });
        let start = Instant::now();
        let failed = cache
            .apply(
                &epoch(
                    0,
                    vec![(
                        Change::Delivery(delivery(1), order(Status::Cancelled, 2)),
                        1,
                    )],
                ),
                start,
            )
            .unwrap();
        cache.remember(failed);
        let writes = cache.resync(start + Duration::from_secs(61));
        let key = cache.keys().delivery(delivery(1));
        assert_eq!(keys_of(&writes)[0], format!("DEL {key}"));
        let Some(Write::History { add, .. }) = writes.last() else {
            panic!("a history write");
        };
        assert_eq!(add.len(), 1, "the history keeps it");
    }
}
