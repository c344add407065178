//! From one epoch's output to the derived events it implies — pure, no I/O, so that what
//! is published when is tested without a broker.
//!
//! The rules (docs/events.md, "Derived events"):
//! - every `inside(courier, zone)` `+1` is one `geofence.entered`, every `-1` one
//!   `geofence.exited`;
//! - an ETA change is an `eta.updated` when the delivery has no published ETA yet, or when
//!   the arrival moved by more than the threshold from the last *published* one;
//! - a delivery reaching a terminal status is a `delivery.completed` (`reason: "ended"`); a
//!   rating given or replaced after that is another `delivery.completed` with
//!   `reason: "rated"` (the completion record, now with its rating);
//! - an ETA of an active delivery that passes its `promised_by` is a `delivery.delayed`,
//!   once, until an ETA is back on or before the promise.
//!
//! The state behind the ETA and delay rules (what was last published, what was promised)
//! is kept per delivery from its creation until it ends. [`Deriver::derive`] does not change
//! it: it returns the events and the state they lead to, and [`Deriver::apply`] adopts that
//! state only once the broker confirmed the events. A failed epoch therefore derives the
//! very same events when it is retried.
//!
//! # Event ids
//!
//! Every `event_id` is a UUID v5 of what the event says happened — its kind, its entity and
//! the event time (or version) that makes it unique, e.g. `geofence.entered` of courier *c*
//! in zone *z* at fix time *t*. No counter and no clock goes in, not even the epoch number
//! (which restarts at 0 in every process): a retried epoch, an epoch committed again, and
//! input redelivered after a crash and cut into different epochs all give the same ids, so
//! consumers dedupe on `event_id`.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat};
use delivertrack_dataflow::model::{DeliveryState, Eta};
use delivertrack_dataflow::{
    Change, CourierId, CustomerId, DeliveryId, EpochOutput, EventBody, EventId, Status, UnixMillis,
    ZoneId,
};
use serde_json::{Map, Value, json};
use uuid::Uuid;

/// The UUID v5 namespace of derived event ids. Fixed forever: changing it would change every
/// id and defeat consumers' deduplication across an upgrade.
pub const EVENT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x11fa_1f73_568c_4e21_852a_edbd_af78_bd22);

/// Schema version of the derived events, like `v` of the input events.
pub const SCHEMA_VERSION: u64 = 1;

/// The kinds of derived events; each is also its routing key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DerivedKind {
    /// A courier entered a zone.
    GeofenceEntered,
    /// A courier left a zone.
    GeofenceExited,
    /// A delivery's estimated arrival moved beyond the threshold.
    EtaUpdated,
    /// A delivery ended (or, later, was rated).
    DeliveryCompleted,
    /// A delivery's estimated arrival passed its promise.
    DeliveryDelayed,
}

impl DerivedKind {
    /// Every kind.
    pub const ALL: [DerivedKind; 5] = [
        DerivedKind::GeofenceEntered,
        DerivedKind::GeofenceExited,
        DerivedKind::EtaUpdated,
        DerivedKind::DeliveryCompleted,
        DerivedKind::DeliveryDelayed,
    ];

    /// The wire name, which is also the routing key.
    pub fn as_str(self) -> &'static str {
        match self {
            DerivedKind::GeofenceEntered => "geofence.entered",
            DerivedKind::GeofenceExited => "geofence.exited",
            DerivedKind::EtaUpdated => "eta.updated",
            DerivedKind::DeliveryCompleted => "delivery.completed",
            DerivedKind::DeliveryDelayed => "delivery.delayed",
        }
    }
}

impl std::fmt::Display for DerivedKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One derived event, ready to encode.
#[derive(Clone, Debug, PartialEq)]
pub struct DerivedEvent {
    /// Deterministic (see the module's "Event ids").
    pub event_id: Uuid,
    /// When it happened, in event time.
    pub occurred_at: UnixMillis,
    /// What happened.
    pub body: DerivedBody,
}

/// The kind-specific part of a [`DerivedEvent`].
#[derive(Clone, Debug, PartialEq)]
pub enum DerivedBody {
    /// `geofence.entered`.
    GeofenceEntered(Geofence),
    /// `geofence.exited`.
    GeofenceExited(Geofence),
    /// `eta.updated`.
    EtaUpdated(EtaUpdated),
    /// `delivery.completed`.
    DeliveryCompleted(Completed),
    /// `delivery.delayed`.
    DeliveryDelayed(Delayed),
}

/// A geofence transition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Geofence {
    /// Who.
    pub courier_id: CourierId,
    /// Which zone.
    pub zone_id: ZoneId,
    /// The courier's fix that made the transition, when the epoch has one; otherwise the
    /// zone change that did (an edit or a delete); otherwise the epoch's newest event time.
    pub at: UnixMillis,
}

/// A published change of an estimated arrival.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtaUpdated {
    /// The delivery.
    pub delivery_id: DeliveryId,
    /// Its courier.
    pub courier_id: CourierId,
    /// The status the estimate is for.
    pub status: Status,
    /// The new estimated arrival at the dropoff.
    pub eta_at: UnixMillis,
    /// Distance still to cover, metres.
    pub remaining_m: u32,
    /// The estimate published before this one; `None` for the delivery's first.
    pub previous_eta_at: Option<UnixMillis>,
    /// The courier fix the estimate is computed from.
    pub as_of: UnixMillis,
}

/// Why a `delivery.completed` is published.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompletionReason {
    /// The delivery reached its terminal status.
    Ended,
    /// A rating was given (or replaced) after the delivery ended.
    Rated,
}

impl CompletionReason {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            CompletionReason::Ended => "ended",
            CompletionReason::Rated => "rated",
        }
    }
}

/// A delivery that ended, with how it went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completed {
    /// The delivery.
    pub delivery_id: DeliveryId,
    /// Its courier (none when it was cancelled before being assigned).
    pub courier_id: Option<CourierId>,
    /// Who ordered it.
    pub customer_id: CustomerId,
    /// `delivered`, `failed` or `cancelled`.
    pub status: Status,
    /// See [`CompletionReason`].
    pub reason: CompletionReason,
    /// When it ended.
    pub ended_at: UnixMillis,
    /// Created → ended, ms.
    pub duration_ms: i64,
    /// Delivered by the promise (`ended_at <= promised_by`, as in the aggregates); `None`
    /// when nothing was promised or it was not delivered.
    pub on_time: Option<bool>,
    /// The customer's score, 1–5, when known.
    pub rating: Option<u8>,
}

/// An estimate that passed the promise.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delayed {
    /// The delivery.
    pub delivery_id: DeliveryId,
    /// Its courier.
    pub courier_id: CourierId,
    /// What was promised.
    pub promised_by: UnixMillis,
    /// The estimate that passed it.
    pub eta_at: UnixMillis,
}

impl DerivedEvent {
    /// The kind, which is also the routing key.
    pub fn kind(&self) -> DerivedKind {
        match self.body {
            DerivedBody::GeofenceEntered(_) => DerivedKind::GeofenceEntered,
            DerivedBody::GeofenceExited(_) => DerivedKind::GeofenceExited,
            DerivedBody::EtaUpdated(_) => DerivedKind::EtaUpdated,
            DerivedBody::DeliveryCompleted(_) => DerivedKind::DeliveryCompleted,
            DerivedBody::DeliveryDelayed(_) => DerivedKind::DeliveryDelayed,
        }
    }

    /// The wire form: the envelope of the input events (`v`, `kind`, `event_id`,
    /// `occurred_at`) and the kind's fields. Optional fields are present as `null`, so that
    /// every message of a kind has the same keys.
    pub fn to_json(&self) -> Value {
        let mut object = Map::new();
        object.insert("v".into(), json!(SCHEMA_VERSION));
        object.insert("kind".into(), json!(self.kind().as_str()));
        object.insert("event_id".into(), json!(self.event_id.to_string()));
        object.insert("occurred_at".into(), time(self.occurred_at));
        let mut put = |key: &str, value: Value| {
            object.insert(key.to_owned(), value);
        };
        match &self.body {
            DerivedBody::GeofenceEntered(g) | DerivedBody::GeofenceExited(g) => {
                put("courier_id", json!(g.courier_id.to_string()));
                put("zone_id", json!(g.zone_id.to_string()));
                put("at", time(g.at));
            }
            DerivedBody::EtaUpdated(e) => {
                put("delivery_id", json!(e.delivery_id.to_string()));
                put("courier_id", json!(e.courier_id.to_string()));
                put("status", json!(e.status.as_str()));
                put("eta_at", time(e.eta_at));
                put("remaining_m", json!(e.remaining_m));
                put(
                    "previous_eta_at",
                    e.previous_eta_at.map_or(Value::Null, time),
                );
            }
            DerivedBody::DeliveryCompleted(c) => {
                put("delivery_id", json!(c.delivery_id.to_string()));
                put(
                    "courier_id",
                    c.courier_id.map_or(Value::Null, |id| json!(id.to_string())),
                );
                put("customer_id", json!(c.customer_id.to_string()));
                put("status", json!(c.status.as_str()));
                put("reason", json!(c.reason.as_str()));
                put("ended_at", time(c.ended_at));
                put("duration_seconds", json!(c.duration_ms as f64 / 1000.0));
                put("on_time", c.on_time.map_or(Value::Null, Value::from));
                put("rating", c.rating.map_or(Value::Null, Value::from));
            }
            DerivedBody::DeliveryDelayed(d) => {
                put("delivery_id", json!(d.delivery_id.to_string()));
                put("courier_id", json!(d.courier_id.to_string()));
                put("promised_by", time(d.promised_by));
                put("eta_at", time(d.eta_at));
            }
        }
        Value::Object(object)
    }
}

/// RFC 3339 in UTC, with as many fraction digits as needed — the form of the input events.
fn time(millis: UnixMillis) -> Value {
    match DateTime::from_timestamp_millis(millis) {
        Some(time) => Value::from(time.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
        // Beyond chrono's range (±262 000 years): validated input never gets here; the raw
        // number keeps the information.
        None => Value::from(millis),
    }
}

/// The deterministic id of an event: UUID v5 of its kind and identifying parts.
fn event_id(kind: DerivedKind, parts: &[&dyn std::fmt::Display]) -> Uuid {
    let mut name = kind.as_str().to_owned();
    for part in parts {
        name.push('/');
        name.push_str(&part.to_string());
    }
    Uuid::new_v5(&EVENT_ID_NAMESPACE, name.as_bytes())
}

/// What the sink remembers of a delivery between its creation and its end.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Tracked {
    /// Its promise, learned from its state (a delivery's promise never changes).
    promised_by: Option<UnixMillis>,
    /// The arrival time last published in an `eta.updated`.
    published_eta: Option<UnixMillis>,
    /// A `delivery.delayed` was published and no estimate has been on time since.
    delayed: bool,
}

/// The derived events of one epoch, and the state the deriver moves to once they are
/// published.
#[derive(Debug, Default)]
pub struct Derivation {
    /// The events, sorted by `occurred_at` (ties in derivation order: geofences, then
    /// deliveries, then ETAs).
    pub events: Vec<DerivedEvent>,
    /// The new state of every delivery the epoch touched; `None` forgets it.
    updates: BTreeMap<DeliveryId, Option<Tracked>>,
}

/// Derives the events of each epoch and keeps what the ETA threshold and the delay rule
/// need to remember between epochs.
#[derive(Clone, Debug)]
pub struct Deriver {
    /// [`DerivedConfig::eta_threshold`](super::DerivedConfig::eta_threshold), ms.
    threshold_ms: i64,
    /// Deliveries seen and not yet ended. A `HashMap`: only looked up by id, never walked.
    tracked: HashMap<DeliveryId, Tracked>,
}

/// One epoch's changes, sorted by collection and direction.
#[derive(Default)]
struct Sorted<'a> {
    fixes: HashMap<CourierId, UnixMillis>,
    zone_versions: HashMap<ZoneId, UnixMillis>,
    inside: Vec<(CourierId, ZoneId, i64)>,
    deliveries_old: BTreeMap<DeliveryId, &'a DeliveryState>,
    deliveries_new: BTreeMap<DeliveryId, &'a DeliveryState>,
    etas_old: BTreeMap<DeliveryId, &'a Eta>,
    etas_new: BTreeMap<DeliveryId, &'a Eta>,
}

impl<'a> Sorted<'a> {
    fn new(output: &'a EpochOutput) -> Self {
        let mut sorted = Sorted::default();
        for (change, diff) in &output.changes {
            let added = *diff > 0;
            match change {
                Change::Courier(id, state) if added => {
                    sorted.fixes.insert(*id, state.at);
                }
                Change::Zone(id, state) if added => {
                    sorted.zone_versions.insert(*id, state.updated_at);
                }
                Change::Inside(courier, zone) => sorted.inside.push((*courier, *zone, *diff)),
                Change::Delivery(id, state) => {
                    let side = if added {
                        &mut sorted.deliveries_new
                    } else {
                        &mut sorted.deliveries_old
                    };
                    side.insert(*id, state);
                }
                Change::Eta(id, eta) => {
                    let side = if added {
                        &mut sorted.etas_new
                    } else {
                        &mut sorted.etas_old
                    };
                    side.insert(*id, eta);
                }
                _ => {}
            }
        }
        // A deleted zone has no new version: its delete event (if the dataflow took it)
        // dates the exits it caused.
        let refused: std::collections::HashSet<EventId> =
            output.rejections.iter().map(|r| r.event_id).collect();
        for event in &output.events {
            if let EventBody::ZoneDeleted(deleted) = &event.body
                && !refused.contains(&event.event_id)
            {
                let at = sorted.zone_versions.entry(deleted.zone_id).or_insert(0);
                *at = (*at).max(event.occurred_at);
            }
        }
        sorted
    }
}

impl Deriver {
    /// A deriver that remembers nothing yet, publishing ETAs that moved by more than
    /// `eta_threshold`.
    pub fn new(eta_threshold: Duration) -> Self {
        Self {
            threshold_ms: i64::try_from(eta_threshold.as_millis()).unwrap_or(i64::MAX),
            tracked: HashMap::new(),
        }
    }

    /// Deliveries remembered (created or active, not yet ended).
    pub fn tracked(&self) -> usize {
        self.tracked.len()
    }

    /// The events `output` implies, given what was published before. Changes nothing: see
    /// [`apply`](Self::apply).
    ///
    /// An epoch of restored state ([`EpochOutput::restored`], a restart hydrated from the
    /// system of record) publishes nothing — its transitions and completions were published
    /// by the process that saw them happen — but primes the memory: each active delivery's
    /// promise, its estimate as the one last published, and whether it is already late. So a
    /// restart neither repeats an `eta.updated` for every active delivery nor misses a delay.
    pub fn derive(&self, output: &EpochOutput) -> Derivation {
        let sorted = Sorted::new(output);
        if output.restored {
            return self.prime(&sorted);
        }
        let newest_event = output.events.iter().map(|e| e.occurred_at).max();
        let mut derivation = Derivation::default();

        for &(courier_id, zone_id, diff) in &sorted.inside {
            let at = sorted
                .fixes
                .get(&courier_id)
                .or_else(|| sorted.zone_versions.get(&zone_id))
                .copied()
                .or(newest_event)
                .unwrap_or_default();
            let geofence = Geofence {
                courier_id,
                zone_id,
                at,
            };
            let (kind, body) = if diff > 0 {
                (
                    DerivedKind::GeofenceEntered,
                    DerivedBody::GeofenceEntered(geofence),
                )
            } else {
                (
                    DerivedKind::GeofenceExited,
                    DerivedBody::GeofenceExited(geofence),
                )
            };
            derivation.events.push(DerivedEvent {
                event_id: event_id(kind, &[&courier_id, &zone_id, &at]),
                occurred_at: at,
                body,
            });
        }

        // Deliveries first, so that an ETA of this epoch sees its delivery's promise.
        let ids: std::collections::BTreeSet<DeliveryId> = sorted
            .deliveries_old
            .keys()
            .chain(sorted.deliveries_new.keys())
            .copied()
            .collect();
        for id in ids {
            let old = sorted.deliveries_old.get(&id).copied();
            match sorted.deliveries_new.get(&id).copied() {
                Some(new) if new.status.is_terminal() => {
                    if let Some(event) = completion(id, old, new, newest_event) {
                        derivation.events.push(event);
                    }
                    derivation.updates.insert(id, None);
                }
                Some(new) => {
                    let mut tracked = self.current(&derivation, id).unwrap_or_default();
                    tracked.promised_by = new.promised_by;
                    derivation.updates.insert(id, Some(tracked));
                }
                None => {
                    derivation.updates.insert(id, None);
                }
            }
        }

        for (&id, &eta) in &sorted.etas_new {
            if derivation.updates.get(&id) == Some(&None) {
                // Ended in this epoch: an estimate cannot be new and over at once.
                continue;
            }
            let mut tracked = self.current(&derivation, id).unwrap_or_default();
            let moved = tracked
                .published_eta
                .is_none_or(|last| eta.eta_at.abs_diff(last) > self.threshold_ms.unsigned_abs());
            if moved {
                derivation.events.push(DerivedEvent {
                    event_id: event_id(
                        DerivedKind::EtaUpdated,
                        &[&id, &eta.status, &eta.as_of, &eta.eta_at],
                    ),
                    occurred_at: eta.as_of,
                    body: DerivedBody::EtaUpdated(EtaUpdated {
                        delivery_id: id,
                        courier_id: eta.courier_id,
                        status: eta.status,
                        eta_at: eta.eta_at,
                        remaining_m: eta.remaining_m,
                        previous_eta_at: tracked.published_eta,
                        as_of: eta.as_of,
                    }),
                });
                tracked.published_eta = Some(eta.eta_at);
            }
            if let Some(promised_by) = tracked.promised_by {
                let late = eta.eta_at > promised_by;
                if late && !tracked.delayed {
                    derivation.events.push(DerivedEvent {
                        event_id: event_id(
                            DerivedKind::DeliveryDelayed,
                            &[&id, &eta.as_of, &eta.eta_at],
                        ),
                        occurred_at: eta.as_of,
                        body: DerivedBody::DeliveryDelayed(Delayed {
                            delivery_id: id,
                            courier_id: eta.courier_id,
                            promised_by,
                            eta_at: eta.eta_at,
                        }),
                    });
                }
                tracked.delayed = late;
            }
            derivation.updates.insert(id, Some(tracked));
        }
        // An estimate gone without a successor while the delivery goes on (it has no courier
        // position any more): the next one is a first one again.
        for &id in sorted.etas_old.keys() {
            if sorted.etas_new.contains_key(&id) || derivation.updates.get(&id) == Some(&None) {
                continue;
            }
            if let Some(mut tracked) = self.current(&derivation, id) {
                tracked.published_eta = None;
                tracked.delayed = false;
                derivation.updates.insert(id, Some(tracked));
            }
        }

        derivation.events.sort_by_key(|event| event.occurred_at);
        derivation
    }

    /// The memory a restored epoch implies, and no events.
    fn prime(&self, sorted: &Sorted<'_>) -> Derivation {
        let mut derivation = Derivation::default();
        for (&id, &state) in &sorted.deliveries_new {
            if state.status.is_terminal() {
                derivation.updates.insert(id, None);
            } else {
                let mut tracked = self.current(&derivation, id).unwrap_or_default();
                tracked.promised_by = state.promised_by;
                derivation.updates.insert(id, Some(tracked));
            }
        }
        for (&id, &eta) in &sorted.etas_new {
            let mut tracked = self.current(&derivation, id).unwrap_or_default();
            tracked.published_eta = Some(eta.eta_at);
            tracked.delayed = tracked.promised_by.is_some_and(|p| eta.eta_at > p);
            derivation.updates.insert(id, Some(tracked));
        }
        derivation
    }

    /// Adopts the state of a derivation whose events the broker confirmed.
    pub fn apply(&mut self, derivation: Derivation) {
        for (id, tracked) in derivation.updates {
            match tracked {
                Some(tracked) => {
                    self.tracked.insert(id, tracked);
                }
                None => {
                    self.tracked.remove(&id);
                }
            }
        }
    }

    /// A delivery's state as the derivation so far leaves it.
    fn current(&self, derivation: &Derivation, id: DeliveryId) -> Option<Tracked> {
        match derivation.updates.get(&id) {
            Some(update) => *update,
            None => self.tracked.get(&id).copied(),
        }
    }
}

/// The `delivery.completed` of a delivery whose new state is terminal: at its end, or when
/// a rating arrives (or changes) afterwards; `None` for any other change of an ended one.
fn completion(
    id: DeliveryId,
    old: Option<&DeliveryState>,
    new: &DeliveryState,
    newest_event: Option<UnixMillis>,
) -> Option<DerivedEvent> {
    let ended_at = new.ended_at.or(newest_event).unwrap_or(new.created_at);
    let was_ended = old.is_some_and(|old| old.status.is_terminal());
    let (reason, occurred_at, identity) = if !was_ended {
        (CompletionReason::Ended, ended_at, None)
    } else {
        let rating = new.rating.as_ref()?;
        if old.and_then(|old| old.rating.as_ref()) == Some(rating) {
            return None;
        }
        (
            CompletionReason::Rated,
            rating.at,
            Some((rating.at, rating.score)),
        )
    };
    let kind = DerivedKind::DeliveryCompleted;
    let event_id = match identity {
        None => event_id(kind, &[&id, &new.status, &"ended"]),
        Some((at, score)) => event_id(kind, &[&id, &new.status, &"rated", &at, &score]),
    };
    let on_time = match (new.status, new.promised_by) {
        (Status::Delivered, Some(promised_by)) => Some(ended_at <= promised_by),
        _ => None,
    };
    Some(DerivedEvent {
        event_id,
        occurred_at,
        body: DerivedBody::DeliveryCompleted(Completed {
            delivery_id: id,
            courier_id: new.courier_id,
            customer_id: new.customer_id,
            status: new.status,
            reason,
            ended_at,
            duration_ms: (ended_at - new.created_at).max(0),
            on_time,
            rating: new.rating.as_ref().map(|rating| rating.score),
        }),
    })
}
