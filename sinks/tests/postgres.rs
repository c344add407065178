//! The PostgreSQL sink against the real PostgreSQL (`DATABASE_URL`, by default
//! `postgres://postgres@127.0.0.1:5432/postgres`): every `#[sqlx::test]` gets a fresh,
//! migrated database of its own.
//!
//! The input is real: the fleet simulator's stream, run through the real dataflow, with a
//! few events mixed in that the simulator never sends (replays, a stale fix, refused status
//! changes, a zone edit and a zone deletion). The reference is the dataflow's own output
//! accumulated in memory by [`ReadState`], the read model's state.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use delivertrack_dataflow::event::{
    DeliveryCreated, Event, EventBody, StatusChanged, ZoneDeleted, ZoneUpserted,
};
use delivertrack_dataflow::geometry::GeoPoint;
use delivertrack_dataflow::model::{DeliveryState, Rating, Scope, Tally};
use delivertrack_dataflow::pipeline::{self, DataflowConfig};
use delivertrack_dataflow::restore::{self, Restore};
use delivertrack_dataflow::{
    Change, CustomerId, DeliveryId, EpochOutput, EventId, RejectReason, Status,
};
use delivertrack_ingest::{FleetSimulator, SimulatorConfig};
use delivertrack_sinks::postgres::{PostgresConfig, PostgresSink, load_restore};
use delivertrack_sinks::read_model::ReadState;
use delivertrack_sinks::{Sink, SinkError};
use sqlx::{PgPool, Row};
use uuid::Uuid;

/// Monday 2026-11-30, 08:00 UTC.
const START_MS: i64 = 1_796_025_600_000;
/// Simulated time per epoch.
const STEP_MS: i64 = 120_000;
/// Epochs per run: 30 simulated minutes, long enough for deliveries to end and be rated.
const EPOCHS: usize = 15;
/// The epoch that edits a zone, and the one that deletes the zone with the most couriers.
const EDIT_EPOCH: usize = 8;
const DELETE_EPOCH: usize = 10;
/// The epoch with a late correction (a `cancelled` stamped before a `delivered`).
const CORRECTION_EPOCH: usize = 12;

// ---------------------------------------------------------------------------------------
// The input: simulator → dataflow
// ---------------------------------------------------------------------------------------

/// What the run produced, epoch by epoch, with the reference state after each.
struct Run {
    outputs: Vec<Arc<EpochOutput>>,
    states: Vec<ReadState>,
}

fn id(n: u128) -> Uuid {
    Uuid::from_u128(0x5eed_0000_0000_0000_0000_0000_0000_0000 | n)
}

fn event(n: u128, occurred_at: i64, body: EventBody) -> Event {
    Event {
        event_id: EventId(id(n)),
        occurred_at,
        body,
    }
}

/// Runs `EPOCHS` epochs of a 30-courier city through the dataflow (2 workers).
fn run(seed: u64) -> Run {
    let config = SimulatorConfig {
        couriers: 30,
        seed,
        deliveries_per_minute: 4.0,
        fix_interval_ms: 5_000,
        rating_rate: 0.9,
        ..SimulatorConfig::default()
    };
    let mut simulator = FleetSimulator::new(config, START_MS);
    let (mut input, mut output) = pipeline::start(DataflowConfig::default()).unwrap();
    let mut state = ReadState::default();
    let mut run = Run {
        outputs: Vec::new(),
        states: Vec::new(),
    };
    let mut earlier: Vec<Event> = Vec::new();
    let own_delivery = DeliveryId(id(1));
    for epoch in 0..EPOCHS {
        let mut events = if epoch == 0 {
            simulator.initial_events()
        } else {
            Vec::new()
        };
        events.extend(simulator.step(STEP_MS));
        let now = simulator.now();
        match epoch {
            // Redelivery: five events of the previous epoch again, and one twice in this one.
            2 => {
                events.extend(earlier.iter().take(5).cloned());
                if let Some(first) = events.first().cloned() {
                    events.push(first);
                }
            }
            // A stale fix (older than the courier's newest), a status change for a delivery
            // that does not exist, and a delivery of our own.
            3 => {
                let fix = earlier
                    .iter()
                    .find(|e| matches!(e.body, EventBody::LocationUpdated(_)))
                    .cloned()
                    .expect("the simulator sends fixes");
                events.push(Event {
                    event_id: EventId(id(10)),
                    occurred_at: fix.occurred_at - 1_000,
                    ..fix
                });
                events.push(event(
                    11,
                    now,
                    EventBody::StatusChanged(StatusChanged {
                        delivery_id: DeliveryId(id(999)),
                        status: Status::Cancelled,
                        courier_id: None,
                    }),
                ));
                events.push(event(
                    12,
                    now - 60_000,
                    EventBody::DeliveryCreated(DeliveryCreated {
                        delivery_id: own_delivery,
                        customer_id: CustomerId(id(2)),
                        pickup: GeoPoint::from_degrees(52.52, 13.40),
                        dropoff: GeoPoint::from_degrees(52.53, 13.41),
                        promised_by: Some(now + 3_600_000),
                    }),
                ));
            }
            // created → delivered is illegal; a second creation of it is refused too.
            4 => {
                events.push(event(
                    13,
                    now,
                    EventBody::StatusChanged(StatusChanged {
                        delivery_id: own_delivery,
                        status: Status::Delivered,
                        courier_id: None,
                    }),
                ));
                events.push(event(
                    14,
                    now,
                    EventBody::DeliveryCreated(DeliveryCreated {
                        delivery_id: own_delivery,
                        customer_id: CustomerId(id(3)),
                        pickup: GeoPoint::from_degrees(52.5, 13.4),
                        dropoff: GeoPoint::from_degrees(52.5, 13.4),
                        promised_by: None,
                    }),
                ));
            }
            // A zone edited: the first zone of the scene grows by a third and is renamed.
            EDIT_EPOCH => {
                let scene = simulator.initial_events();
                let Some(EventBody::ZoneUpserted(zone)) = scene.first().map(|e| e.body.clone())
                else {
                    panic!("the scene starts with a zone");
                };
                let mut shape = zone.shape.clone();
                for polygon in &mut shape.0.0 {
                    let centre = polygon.exterior().0.first().copied().expect("a ring");
                    polygon.exterior_mut(|ring| {
                        for c in &mut ring.0 {
                            c.x = centre.x + (c.x - centre.x) * 1.33;
                            c.y = centre.y + (c.y - centre.y) * 1.33;
                        }
                    });
                }
                events.push(event(
                    20,
                    now,
                    EventBody::ZoneUpserted(ZoneUpserted {
                        name: format!("{} (enlarged)", zone.name),
                        shape,
                        ..zone
                    }),
                ));
            }
            // A late correction: a rated, delivered delivery turns out to have been cancelled
            // a moment before it was delivered. It ends cancelled, its rating is hidden.
            CORRECTION_EPOCH => {
                let (delivery_id, delivered) = state
                    .deliveries
                    .iter()
                    .find(|(_, d)| d.status == Status::Delivered && d.rating.is_some())
                    .expect("a rated, delivered delivery by now");
                let ended = delivered.ended_at.expect("a delivered delivery has ended");
                events.push(event(
                    22,
                    ended - 1,
                    EventBody::StatusChanged(StatusChanged {
                        delivery_id: *delivery_id,
                        status: Status::Cancelled,
                        courier_id: None,
                    }),
                ));
            }
            // The zone with the most couriers inside is deleted: they all exit.
            DELETE_EPOCH => {
                let mut counts = BTreeMap::new();
                for (_, zone) in &state.inside {
                    *counts.entry(*zone).or_insert(0) += 1;
                }
                let busiest = counts
                    .into_iter()
                    .max_by_key(|(_, n)| *n)
                    .map(|(zone, _)| zone)
                    .expect("some courier is inside some zone by now");
                events.push(event(
                    21,
                    now,
                    EventBody::ZoneDeleted(ZoneDeleted { zone_id: busiest }),
                ));
            }
            _ => {}
        }
        earlier.clone_from(&events);
        input.send(events).unwrap();
        let out = output.recv().expect("the dataflow outputs every epoch");
        assert_eq!(out.epoch, epoch as u64);
        state.apply(&out);
        run.outputs.push(Arc::new(out));
        run.states.push(state.clone());
    }
    input.close();
    run
}

// ---------------------------------------------------------------------------------------
// Reading the tables back
// ---------------------------------------------------------------------------------------

fn at(millis: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(millis).unwrap()
}

fn e7(degrees: f64) -> i32 {
    (degrees * 1e7).round() as i32
}

type DeliveryRow = (
    Uuid,
    Option<Uuid>,
    String,
    (i32, i32, i32, i32),
    Option<DateTime<Utc>>,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    Option<i16>,
    i64,
);

fn delivery_row(state: &DeliveryState) -> DeliveryRow {
    (
        state.customer_id.0,
        state.courier_id.map(|c| c.0),
        state.status.as_str().to_owned(),
        (
            state.pickup.lat_e7,
            state.pickup.lon_e7,
            state.dropoff.lat_e7,
            state.dropoff.lon_e7,
        ),
        state.promised_by.map(at),
        at(state.created_at),
        state.assigned_at.map(at),
        state.picked_up_at.map(at),
        state.ended_at.map(at),
        state.rating.as_ref().map(|r| i16::from(r.score)),
        i64::from(state.version),
    )
}

/// `(scope, scope_key)` of a scope, as the schema keys `metrics`.
fn scope_key(scope: &Scope) -> (&'static str, String) {
    match scope {
        Scope::Overall => ("overall", String::new()),
        Scope::Courier(id) => ("courier", id.to_string()),
        Scope::DropoffZone(id) => ("dropoff_zone", id.to_string()),
        Scope::HourOfDay(hour) => ("hour_of_day", hour.to_string()),
        Scope::WeekdayHour(day, hour) => ("weekday_hour", format!("{day}:{hour}")),
    }
}

const COUNTERS: [&str; 19] = [
    "deliveries",
    "active",
    "delivered",
    "failed",
    "cancelled",
    "promised",
    "on_time",
    "created_to_delivered_ms",
    "picked_up_delivered",
    "picked_up_to_delivered_ms",
    "rated",
    "score_sum",
    "score_1",
    "score_2",
    "score_3",
    "score_4",
    "score_5",
    "distance_mm",
    "active_hours",
];

fn counters(t: &Tally) -> Vec<i64> {
    let [s1, s2, s3, s4, s5] = t.score_histogram;
    vec![
        t.deliveries,
        t.active,
        t.delivered,
        t.failed,
        t.cancelled,
        t.promised,
        t.on_time,
        t.created_to_delivered_ms,
        t.picked_up_delivered,
        t.picked_up_to_delivered_ms,
        t.rated,
        t.score_sum,
        s1,
        s2,
        s3,
        s4,
        s5,
        t.distance_mm,
        t.active_hours,
    ]
}

fn close(a: Option<f64>, b: Option<f64>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => (a - b).abs() <= 1e-9 * a.abs().max(1.0),
        _ => false,
    }
}

/// Every state table equals the accumulated dataflow state, row for row.
async fn assert_tables_equal(pool: &PgPool, state: &ReadState, label: &str) {
    // deliveries
    let rows = sqlx::query(
        "SELECT id, customer_id, courier_id, status, pickup_lat, pickup_lon, dropoff_lat,
                dropoff_lon, promised_by, created_at, assigned_at, picked_up_at, ended_at,
                rating, version FROM deliveries",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let actual: BTreeMap<Uuid, DeliveryRow> = rows
        .iter()
        .map(|r| {
            let row = (
                r.get("customer_id"),
                r.get("courier_id"),
                r.get("status"),
                (
                    e7(r.get("pickup_lat")),
                    e7(r.get("pickup_lon")),
                    e7(r.get("dropoff_lat")),
                    e7(r.get("dropoff_lon")),
                ),
                r.get("promised_by"),
                r.get("created_at"),
                r.get("assigned_at"),
                r.get("picked_up_at"),
                r.get("ended_at"),
                r.get("rating"),
                r.get("version"),
            );
            (r.get("id"), row)
        })
        .collect();
    let expected: BTreeMap<Uuid, DeliveryRow> = state
        .deliveries
        .iter()
        .map(|(id, s)| (id.0, delivery_row(s)))
        .collect();
    assert_eq!(actual.len(), expected.len(), "{label}: delivery count");
    assert!(actual == expected, "{label}: deliveries differ");

    // ratings
    let rows: Vec<(Uuid, i16, Option<String>, DateTime<Utc>)> =
        sqlx::query_as("SELECT delivery_id, score, comment, rated_at FROM ratings")
            .fetch_all(pool)
            .await
            .unwrap();
    let actual: BTreeSet<_> = rows.into_iter().collect();
    let expected: BTreeSet<_> = state
        .deliveries
        .iter()
        .filter_map(|(id, s)| {
            s.rating
                .as_ref()
                .map(|r: &Rating| (id.0, i16::from(r.score), r.comment.clone(), at(r.at)))
        })
        .collect();
    assert_eq!(actual, expected, "{label}: ratings");

    // couriers (tracked columns)
    let rows = sqlx::query(
        "SELECT id, current_lat, current_lon, last_fix_at, last_event_id, speed_mm_s,
                heading_ddeg, odometer_mm, active_hours
         FROM couriers WHERE last_fix_at IS NOT NULL",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    type CourierRow = (
        i32,
        i32,
        DateTime<Utc>,
        Uuid,
        Option<i64>,
        Option<i32>,
        i64,
        i64,
    );
    let actual: BTreeMap<Uuid, CourierRow> = rows
        .iter()
        .map(|r| {
            let row = (
                e7(r.get("current_lat")),
                e7(r.get("current_lon")),
                r.get("last_fix_at"),
                r.get("last_event_id"),
                r.get("speed_mm_s"),
                r.get("heading_ddeg"),
                r.get("odometer_mm"),
                r.get("active_hours"),
            );
            (r.get("id"), row)
        })
        .collect();
    let expected: BTreeMap<Uuid, CourierRow> = state
        .couriers
        .iter()
        .map(|(id, s)| {
            let row = (
                s.position.lat_e7,
                s.position.lon_e7,
                at(s.at),
                s.event_id.0,
                s.speed_mm_s.map(i64::from),
                s.heading_ddeg.map(i32::from),
                i64::try_from(s.odometer_mm).unwrap(),
                i64::from(s.active_hours),
            );
            (id.0, row)
        })
        .collect();
    assert_eq!(actual.len(), expected.len(), "{label}: courier count");
    assert!(actual == expected, "{label}: couriers differ");

    // zones
    let rows: Vec<(Uuid, String, i64, DateTime<Utc>, Uuid, String)> = sqlx::query_as(
        "SELECT id, name, dwell_ms, updated_at, event_id, geometry ->> 'type' FROM zones",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let actual: BTreeSet<_> = rows.into_iter().collect();
    let expected: BTreeSet<_> = state
        .zones
        .iter()
        .map(|(id, z)| {
            let kind = if z.shape.0.0.len() == 1 {
                "Polygon"
            } else {
                "MultiPolygon"
            };
            (
                id.0,
                z.name.clone(),
                z.dwell_ms,
                at(z.updated_at),
                z.event_id.0,
                kind.to_owned(),
            )
        })
        .collect();
    assert_eq!(actual, expected, "{label}: zones");

    // etas
    type EtaRow = (Uuid, Uuid, String, i64, i64, DateTime<Utc>, DateTime<Utc>);
    let rows: Vec<EtaRow> = sqlx::query_as(
        "SELECT delivery_id, courier_id, status, remaining_m, speed_mm_s, eta_at, as_of FROM etas",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let actual: BTreeSet<_> = rows.into_iter().collect();
    let expected: BTreeSet<_> = state
        .etas
        .iter()
        .map(|(id, e)| {
            (
                id.0,
                e.courier_id.0,
                e.status.as_str().to_owned(),
                i64::from(e.remaining_m),
                i64::from(e.speed_mm_s),
                at(e.eta_at),
                at(e.as_of),
            )
        })
        .collect();
    assert_eq!(actual.len(), expected.len(), "{label}: eta count");
    assert_eq!(actual, expected, "{label}: etas");

    // occupancy and dropoff zones
    let actual: BTreeSet<(Uuid, Uuid)> =
        sqlx::query_as("SELECT courier_id, zone_id FROM zone_occupancy")
            .fetch_all(pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let expected: BTreeSet<_> = state.inside.iter().map(|(c, z)| (c.0, z.0)).collect();
    assert_eq!(actual, expected, "{label}: zone occupancy");
    let actual: BTreeSet<(Uuid, Uuid)> =
        sqlx::query_as("SELECT delivery_id, zone_id FROM delivery_dropoff_zones")
            .fetch_all(pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let expected: BTreeSet<_> = state
        .dropoff_zones
        .iter()
        .map(|(d, z)| (d.0, z.0))
        .collect();
    assert_eq!(actual, expected, "{label}: dropoff zones");

    // metrics: every counter exactly, the derived columns as the Rust helpers compute them
    let rows = sqlx::query("SELECT * FROM metrics")
        .fetch_all(pool)
        .await
        .unwrap();
    assert_eq!(rows.len(), state.metrics.len(), "{label}: metric count");
    let by_key: BTreeMap<(String, String), &sqlx::postgres::PgRow> = rows
        .iter()
        .map(|r| ((r.get("scope"), r.get("scope_key")), r))
        .collect();
    for (scope, tally) in &state.metrics {
        let (kind, key) = scope_key(scope);
        let row = by_key
            .get(&(kind.to_owned(), key.clone()))
            .unwrap_or_else(|| panic!("{label}: no metrics row for {kind} {key}"));
        let stored: Vec<i64> = COUNTERS.iter().map(|c| row.get::<i64, _>(*c)).collect();
        assert_eq!(stored, counters(tally), "{label}: counters of {kind} {key}");
        let derived = [
            ("success_rate", tally.success_rate()),
            ("on_time_rate", tally.on_time_rate()),
            ("mean_delivery_seconds", tally.mean_delivery_seconds()),
            (
                "mean_pickup_to_delivery_seconds",
                tally.mean_pickup_to_delivery_seconds(),
            ),
            ("mean_rating", tally.mean_rating()),
            (
                "deliveries_per_active_hour",
                tally.deliveries_per_active_hour(),
            ),
        ];
        for (column, value) in derived {
            let stored: Option<f64> = row.get(column);
            assert!(
                close(stored, value),
                "{label}: {column} of {kind} {key}: {stored:?} != {value:?}"
            );
        }
    }
}

/// Every table's content as one hash per table: equal fingerprints, equal tables.
async fn fingerprint(pool: &PgPool) -> BTreeMap<&'static str, String> {
    let mut prints = BTreeMap::new();
    for table in [
        "customers",
        "couriers",
        "zones",
        "deliveries",
        "ratings",
        "etas",
        "delivery_dropoff_zones",
        "zone_occupancy",
        "geofence_transitions",
        "delivery_events",
        "location_fixes",
        "metrics",
        "pipeline_progress",
    ] {
        // The table names are the constants above, never input.
        let sql = format!(
            "SELECT count(*) || ':' || coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '')
             FROM {table} t"
        );
        let print: String = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(pool)
            .await
            .unwrap();
        prints.insert(table, print);
    }
    prints
}

/// The event ids the log must hold after `outputs`: every event except those refused for a
/// reason other than `stale`.
fn accepted_events(outputs: &[Arc<EpochOutput>]) -> BTreeSet<Uuid> {
    let mut accepted = BTreeSet::new();
    for output in outputs {
        let refused: BTreeSet<EventId> = output
            .rejections
            .iter()
            .filter(|r| r.reason != RejectReason::Stale)
            .map(|r| r.event_id)
            .collect();
        accepted.extend(
            output
                .events
                .iter()
                .filter(|e| !refused.contains(&e.event_id))
                .map(|e| e.event_id.0),
        );
    }
    accepted
}

/// Was `event` refused as stale in the first epoch that carried it?
fn first_logged_as_stale(run: &Run, event: Uuid) -> bool {
    run.outputs
        .iter()
        .find(|o| o.events.iter().any(|e| e.event_id.0 == event))
        .is_some_and(|first| {
            first
                .rejections
                .iter()
                .any(|r| r.event_id.0 == event && r.reason == RejectReason::Stale)
        })
}

async fn logged_events(pool: &PgPool) -> Vec<Uuid> {
    sqlx::query_scalar("SELECT event_id FROM event_log")
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn sink(pool: &PgPool) -> PostgresSink {
    PostgresSink::with_pool(pool.clone()).await.unwrap()
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[sqlx::test(migrator = "delivertrack_sinks::MIGRATOR")]
async fn every_table_equals_the_dataflow_state_after_every_epoch(pool: PgPool) {
    let run = run(7);
    let mut sink = sink(&pool).await;
    assert_eq!(sink.epoch_base(), 0);
    for (output, state) in run.outputs.iter().zip(&run.states) {
        sink.commit(Arc::clone(output)).await.unwrap();
        let label = format!("epoch {}", output.epoch);
        assert_tables_equal(&pool, state, &label).await;
        let progress: i64 = sqlx::query_scalar("SELECT epoch FROM pipeline_progress")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(progress, output.epoch as i64, "{label}");
    }
    // The run covered what the tables are for.
    let last = run.states.last().unwrap();
    let overall = last
        .metrics
        .get(&Scope::Overall)
        .copied()
        .unwrap_or_default();
    assert!(overall.delivered > 0 && overall.rated > 0, "{overall:?}");
    assert!(run.states.iter().any(|s| !s.etas.is_empty()));
    assert!(run.states.iter().any(|s| !s.inside.is_empty()));
    assert!(
        last.metrics
            .keys()
            .any(|s| matches!(s, Scope::DropoffZone(_)))
    );
    sink.close().await.unwrap();
}

#[sqlx::test(migrator = "delivertrack_sinks::MIGRATOR")]
async fn committing_an_epoch_again_or_an_older_one_changes_nothing(pool: PgPool) {
    let run = run(11);
    let mut sink = sink(&pool).await;
    for output in &run.outputs {
        sink.commit(Arc::clone(output)).await.unwrap();
        // Hashing every table costs more than the commits: look every third epoch.
        if output.epoch % 3 == 2 {
            let before = fingerprint(&pool).await;
            sink.commit(Arc::clone(output)).await.unwrap();
            assert_eq!(fingerprint(&pool).await, before, "epoch {}", output.epoch);
        } else {
            sink.commit(Arc::clone(output)).await.unwrap();
        }
    }
    let before = fingerprint(&pool).await;
    for older in [0, 3, EPOCHS / 2] {
        sink.commit(Arc::clone(&run.outputs[older])).await.unwrap();
    }
    assert_eq!(fingerprint(&pool).await, before);
    assert_tables_equal(&pool, run.states.last().unwrap(), "after replays").await;
}

#[sqlx::test(migrator = "delivertrack_sinks::MIGRATOR")]
async fn the_statements_are_idempotent_without_the_progress_guard(pool: PgPool) {
    // A second sink on the same database continues the epoch numbers, so re-committing the
    // run's outputs through it passes the guard: the upserts, deletes and inserts alone
    // must leave every state table, the log and the aggregates as they were.
    let run = run(13);
    let mut first = sink(&pool).await;
    for output in &run.outputs {
        first.commit(Arc::clone(output)).await.unwrap();
    }
    let before = fingerprint(&pool).await;
    let mut second = sink(&pool).await;
    assert_eq!(second.epoch_base(), EPOCHS as u64);
    let last = run.outputs.last().unwrap();
    second.commit(Arc::clone(last)).await.unwrap();
    let after = fingerprint(&pool).await;
    for (table, print) in &before {
        match *table {
            // Moved on: the new process's epoch is a new epoch.
            "pipeline_progress" => assert_ne!(&after[table], print),
            // An entry or exit in a new epoch is a new transition.
            "geofence_transitions" => {}
            _ => assert_eq!(&after[table], print, "{table}"),
        }
    }
    let progress: i64 = sqlx::query_scalar("SELECT epoch FROM pipeline_progress")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(progress, EPOCHS as i64 + last.epoch as i64);
}

#[sqlx::test(migrator = "delivertrack_sinks::MIGRATOR")]
async fn the_event_log_holds_each_accepted_event_exactly_once(pool: PgPool) {
    let run = run(7);
    let mut sink = sink(&pool).await;
    for output in &run.outputs {
        sink.commit(Arc::clone(output)).await.unwrap();
        sink.commit(Arc::clone(output)).await.unwrap();
    }
    let logged = logged_events(&pool).await;
    let unique: BTreeSet<Uuid> = logged.iter().copied().collect();
    assert_eq!(logged.len(), unique.len(), "an event id is logged twice");
    assert_eq!(unique, accepted_events(&run.outputs));

    // The injected events: the stale fix is kept, the refused ones are not (they are
    // dead-lettered); the redelivered events are there once.
    let reasons: BTreeMap<Uuid, &str> = run
        .outputs
        .iter()
        .flat_map(|o| o.rejections.iter())
        .map(|r| (r.event_id.0, r.reason.code()))
        .collect();
    assert_eq!(reasons.get(&id(10)), Some(&"stale"));
    assert!(
        unique.contains(&id(10)),
        "the stale fix is a fact that arrived late"
    );
    // Flagged stale: the events that were stale when first logged (a redelivery of an
    // applied event keeps its first row).
    let stale: BTreeSet<Uuid> = sqlx::query_scalar("SELECT event_id FROM event_log WHERE stale")
        .fetch_all(&pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    let expected_stale: BTreeSet<Uuid> = reasons
        .iter()
        .filter(|(event, code)| **code == "stale" && first_logged_as_stale(&run, **event))
        .map(|(event, _)| *event)
        .collect();
    assert!(stale.contains(&id(10)));
    assert_eq!(stale, expected_stale);
    for (n, code) in [
        (11, "unknown_delivery"),
        (13, "illegal_transition"),
        (14, "delivery_exists"),
    ] {
        assert_eq!(reasons.get(&id(n)), Some(&code));
        assert!(!unique.contains(&id(n)), "refused event {n} is in the log");
    }
    assert!(unique.contains(&id(12)) && unique.contains(&id(20)) && unique.contains(&id(21)));
    assert!(
        unique.contains(&id(22)) && !reasons.contains_key(&id(22)),
        "the late correction is accepted and logged"
    );
    let input_total: usize = run.outputs.iter().map(|o| o.events.len()).sum();
    assert!(input_total > unique.len() + 3, "the run redelivered events");

    // The stored event is the wire JSON, with the entity ids copied out.
    let (kind, payload, delivery): (String, serde_json::Value, Option<Uuid>) = sqlx::query_as(
        "SELECT kind, payload, delivery_id FROM delivery_events WHERE event_id = $1",
    )
    .bind(id(12))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(kind, "delivery.created");
    assert_eq!(payload["kind"], "delivery.created");
    assert_eq!(payload["delivery_id"], id(1).to_string());
    assert_eq!(delivery, Some(id(1)));
}

#[sqlx::test(migrator = "delivertrack_sinks::MIGRATOR")]
async fn geofence_entries_and_exits_are_recorded_once_per_epoch(pool: PgPool) {
    let run = run(7);
    let mut sink = sink(&pool).await;
    let mut expected = BTreeSet::new();
    for output in &run.outputs {
        sink.commit(Arc::clone(output)).await.unwrap();
        sink.commit(Arc::clone(output)).await.unwrap();
        for (change, diff) in &output.changes {
            if let Change::Inside(courier, zone) = change {
                let direction = if *diff > 0 { "entered" } else { "exited" };
                expected.insert((courier.0, zone.0, output.epoch as i64, direction.to_owned()));
            }
        }
    }
    let rows: Vec<(Uuid, Uuid, i64, String)> =
        sqlx::query_as("SELECT courier_id, zone_id, epoch, direction FROM geofence_transitions")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(rows.len(), expected.len());
    assert_eq!(rows.into_iter().collect::<BTreeSet<_>>(), expected);
    assert!(expected.iter().any(|t| t.3 == "entered"));
    assert!(expected.iter().any(|t| t.3 == "exited"));

    // Deleting the busiest zone made everyone inside it exit, at the deletion's time.
    let deleted: Uuid =
        sqlx::query_scalar("SELECT zone_id FROM delivery_events WHERE kind = 'zone.deleted'")
            .fetch_one(&pool)
            .await
            .unwrap();
    let inside_before = run.states[DELETE_EPOCH - 1]
        .inside
        .iter()
        .filter(|(_, z)| z.0 == deleted)
        .count();
    let exits: Vec<(Option<DateTime<Utc>>,)> = sqlx::query_as(
        "SELECT occurred_at FROM geofence_transitions
         WHERE zone_id = $1 AND direction = 'exited' AND epoch = $2",
    )
    .bind(deleted)
    .bind(DELETE_EPOCH as i64)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(inside_before > 0);
    assert_eq!(exits.len(), inside_before);
    assert!(exits.iter().all(|(t,)| t.is_some()));
    let occupants: i64 =
        sqlx::query_scalar("SELECT count(*) FROM zone_occupancy WHERE zone_id = $1")
            .bind(deleted)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(occupants, 0);
}

#[sqlx::test(migrator = "delivertrack_sinks::MIGRATOR")]
async fn aggregates_equal_a_recomputation_in_sql(pool: PgPool) {
    let run = run(17);
    let mut sink = sink(&pool).await;
    for output in &run.outputs {
        sink.commit(Arc::clone(output)).await.unwrap();
    }

    // Overall delivered count and created → delivered time, from the event log alone: the
    // `delivered` steps not superseded by a `cancelled` or `failed` stamped before them
    // (the run's late correction).
    let (delivered, total_ms): (i64, i64) = sqlx::query_as(
        "SELECT count(*), coalesce(sum(extract(epoch FROM d.occurred_at - c.occurred_at) * 1000), 0)::int8
         FROM delivery_events d
         JOIN delivery_events c ON c.delivery_id = d.delivery_id AND c.kind = 'delivery.created'
         WHERE d.kind = 'status.changed' AND d.payload ->> 'status' = 'delivered'
           AND NOT EXISTS (
               SELECT 1 FROM delivery_events x
               WHERE x.delivery_id = d.delivery_id AND x.kind = 'status.changed'
                 AND x.payload ->> 'status' IN ('cancelled', 'failed')
                 AND (x.occurred_at, x.event_id) < (d.occurred_at, d.event_id))",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let (stored_delivered, stored_ms, mean): (i64, i64, Option<f64>) = sqlx::query_as(
        "SELECT delivered, created_to_delivered_ms, mean_delivery_seconds
         FROM metrics WHERE scope = 'overall'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(delivered > 0);
    assert_eq!((stored_delivered, stored_ms), (delivered, total_ms));

    // The mean delivery time from the deliveries table.
    let recomputed: Option<f64> = sqlx::query_scalar(
        "SELECT avg(extract(epoch FROM delivered_at - created_at))::float8 FROM deliveries
         WHERE status = 'delivered'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(close(mean, recomputed), "{mean:?} != {recomputed:?}");

    // Success rates per hour of day, and satisfaction, from the state tables.
    let mismatches: i64 = sqlx::query_scalar(
        "WITH recomputed AS (
             SELECT extract(hour FROM created_at AT TIME ZONE 'UTC')::int2 AS hour,
                    count(*) AS deliveries,
                    count(*) FILTER (WHERE status = 'delivered') AS delivered,
                    count(*) FILTER (WHERE status = 'failed') AS failed,
                    count(*) FILTER (WHERE status = 'cancelled') AS cancelled
             FROM deliveries GROUP BY 1)
         SELECT count(*) FROM recomputed r
         FULL JOIN (SELECT * FROM metrics WHERE scope = 'hour_of_day') m USING (hour)
         WHERE (r.deliveries, r.delivered, r.failed, r.cancelled)
               IS DISTINCT FROM (m.deliveries, m.delivered, m.failed, m.cancelled)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(mismatches, 0);
    let (rated, score_sum, five): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), coalesce(sum(score), 0)::int8, count(*) FILTER (WHERE score = 5)
         FROM ratings",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let (stored_rated, stored_sum, stored_five): (i64, i64, i64) =
        sqlx::query_as("SELECT rated, score_sum, score_5 FROM metrics WHERE scope = 'overall'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(rated > 0);
    assert_eq!(
        (stored_rated, stored_sum, stored_five),
        (rated, score_sum, five)
    );

    // The analysts' views read the same numbers.
    let (view_rate,): (Option<f64>,) =
        sqlx::query_as("SELECT success_rate FROM success_rates WHERE scope = 'overall'")
            .fetch_one(&pool)
            .await
            .unwrap();
    let overall = run.states.last().unwrap().metrics[&Scope::Overall];
    assert!(close(view_rate, overall.success_rate()));
    let couriers: i64 = sqlx::query_scalar("SELECT count(*) FROM courier_efficiency")
        .fetch_one(&pool)
        .await
        .unwrap();
    let courier_scopes = run
        .states
        .last()
        .unwrap()
        .metrics
        .keys()
        .filter(|s| matches!(s, Scope::Courier(_)))
        .count();
    assert_eq!(couriers, courier_scopes as i64);
    let peak: i64 = sqlx::query_scalar("SELECT coalesce(sum(deliveries), 0)::int8 FROM peak_times")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(peak, overall.deliveries);
}

#[sqlx::test(migrator = "delivertrack_sinks::MIGRATOR")]
async fn data_the_schema_refuses_is_rejected_and_nothing_of_the_epoch_is_written(pool: PgPool) {
    let mut sink = sink(&pool).await;
    let state = DeliveryState {
        customer_id: CustomerId(id(2)),
        courier_id: None,
        pickup: GeoPoint::from_degrees(52.5, 13.4),
        dropoff: GeoPoint::from_degrees(52.6, 13.4),
        promised_by: None,
        status: Status::Delivered,
        created_at: START_MS,
        assigned_at: None,
        picked_up_at: None,
        ended_at: Some(START_MS + 1),
        // The contract allows 1 to 5; the table's check constraint says so too.
        rating: Some(Rating {
            score: 9,
            comment: None,
            at: START_MS + 2,
        }),
        version: 3,
    };
    let output = EpochOutput {
        restored: false,
        epoch: 0,
        changes: vec![(Change::Delivery(DeliveryId(id(1)), state), 1)],
        ..EpochOutput::default()
    };
    let error = sink.commit(Arc::new(output)).await.unwrap_err();
    assert!(
        matches!(error, SinkError::Rejected { epoch: 0, .. }),
        "{error:?}"
    );
    assert!(!error.is_retryable());
    let written: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM deliveries) + (SELECT count(*) FROM customers)
              + (SELECT count(*) FROM pipeline_progress)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(written, 0, "the failed epoch left rows behind");
}

#[sqlx::test(migrator = "delivertrack_sinks::MIGRATOR")]
async fn connect_uses_the_configured_database(pool: PgPool) {
    let options = pool.connect_options();
    let config = PostgresConfig::from_parts(
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap(),
        options.get_username(),
        "",
    );
    let mut sink = PostgresSink::connect(&config).await.unwrap();
    let run_outputs = [Arc::new(EpochOutput::default())];
    sink.commit(Arc::clone(&run_outputs[0])).await.unwrap();
    sink.close().await.unwrap();
    let error = sink.commit(Arc::clone(&run_outputs[0])).await.unwrap_err();
    assert!(matches!(error, SinkError::Closed { .. }));
    // A second sink continues after the epoch the first one committed.
    let mut again = PostgresSink::connect(&config).await.unwrap();
    assert_eq!(again.epoch_base(), 1);
    again.close().await.unwrap();
}

#[sqlx::test(migrations = false)]
async fn a_database_without_the_schema_is_named_and_told_to_migrate(pool: PgPool) {
    let error = PostgresSink::with_pool(pool.clone()).await.unwrap_err();
    assert!(error.is_retryable());
    let text = error_chain(&error);
    assert!(text.contains("delivertrack migrate"), "{text}");
    assert!(
        text.contains(pool.connect_options().get_database().unwrap()),
        "{text}"
    );
    delivertrack_sinks::postgres::migrate(&pool).await.unwrap();
    // Migrating twice is harmless (every start of `run` migrates).
    delivertrack_sinks::postgres::migrate(&pool).await.unwrap();
    PostgresSink::with_pool(pool).await.unwrap();
}

#[tokio::test]
async fn an_unreachable_database_is_an_error_naming_it() {
    // A port that nothing listens on: bind one, then let it go.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = PostgresConfig::from_parts("127.0.0.1", port, "fleet", "ops", "secret");
    config.connect_timeout = std::time::Duration::from_millis(300);
    let error = PostgresSink::connect(&config).await.unwrap_err();
    assert!(error.is_retryable(), "{error:?}");
    let text = error_chain(&error);
    assert!(
        text.contains(&format!("ops@127.0.0.1:{port}/fleet")),
        "{text}"
    );
    assert!(!text.contains("secret"), "{text}");
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

// ---------------------------------------------------------------------------------------
// Hydration
// ---------------------------------------------------------------------------------------

/// The records the dataflow maintains after `outputs`: every change accumulated.
fn accumulated(outputs: &[Arc<EpochOutput>]) -> BTreeSet<Change> {
    let mut counts: BTreeMap<Change, i64> = BTreeMap::new();
    for output in outputs {
        for (change, diff) in &output.changes {
            *counts.entry(change.clone()).or_insert(0) += diff;
        }
    }
    counts
        .into_iter()
        .filter(|(change, count)| {
            assert!(*count == 0 || *count == 1, "{change:?} counted {count}");
            *count == 1
        })
        .map(|(change, _)| change)
        .collect()
}

/// The events the dataflow did not refuse (for any reason, `stale` included), duplicates
/// and all.
fn not_refused(outputs: &[Arc<EpochOutput>]) -> Vec<Event> {
    let mut accepted = Vec::new();
    for output in outputs {
        let refused: BTreeSet<EventId> = output.rejections.iter().map(|r| r.event_id).collect();
        accepted.extend(
            output
                .events
                .iter()
                .filter(|e| !refused.contains(&e.event_id))
                .cloned(),
        );
    }
    accepted
}

/// `Restore` records as a canonical, comparable list.
fn sorted(mut restores: Vec<Restore>) -> Vec<Restore> {
    restores.sort_by_key(|r| match r {
        Restore::Zone { zone_id, .. } => (0, zone_id.0),
        Restore::Courier { courier_id, .. } => (1, courier_id.0),
        Restore::Delivery { delivery_id, .. } => (2, delivery_id.0),
    });
    restores
}

#[sqlx::test(migrator = "delivertrack_sinks::MIGRATOR")]
async fn hydration_reads_back_what_the_history_restores_after_every_epoch(pool: PgPool) {
    let run = run(7);
    let mut sink = sink(&pool).await;
    for (n, output) in run.outputs.iter().enumerate() {
        sink.commit(Arc::clone(output)).await.unwrap();
        let history = &run.outputs[..=n];
        for window in [DataflowConfig::default().speed_window, 1, 50] {
            let expected = sorted(restore::from_history(
                accumulated(history),
                not_refused(history),
                window,
            ));
            let loaded = sorted(load_restore(&pool, window).await.unwrap());
            assert_eq!(loaded.len(), expected.len(), "epoch {n}, window {window}");
            for (got, want) in loaded.iter().zip(&expected) {
                assert_eq!(got, want, "epoch {n}, window {window}");
            }
        }
    }
    // The run restored what hydration is for: tombstones, presence, full windows, ratings.
    let last = load_restore(&pool, 5).await.unwrap();
    assert!(
        last.iter()
            .any(|r| matches!(r, Restore::Zone { state: None, .. }))
    );
    assert!(last.iter().any(
        |r| matches!(r, Restore::Courier { state, window, .. } if !state.presence.is_empty() && window.len() == 5)
    ));
    assert!(last.iter().any(|r| matches!(
        r,
        Restore::Delivery {
            rating: Some(_),
            ..
        }
    )));
    // The corrected delivery: cancelled, its superseded `delivered` step and its hidden
    // rating still in the history it restores.
    assert!(last.iter().any(|r| matches!(
        r,
        Restore::Delivery { state, steps, rating: Some(_), .. }
            if state.status == Status::Cancelled
                && state.rating.is_none()
                && steps.iter().any(|step| step.status == Status::Delivered)
    )));
    sink.close().await.unwrap();
}

/// Commits the first `stop` epochs of a run, restores a new pipeline from PostgreSQL, feeds
/// it the remaining epochs' input, and checks that it computes what the run computed.
async fn restart_at(pool: &PgPool, stop: usize) {
    let run = run(13);
    let config = DataflowConfig::default();
    let mut sink = sink(pool).await;
    for output in &run.outputs[..stop] {
        sink.commit(Arc::clone(output)).await.unwrap();
    }
    let restores = load_restore(pool, config.speed_window).await.unwrap();

    let (mut input, mut output) = pipeline::start(config).unwrap();
    input.restore(restores).unwrap();
    let restored = output.recv().unwrap();
    assert!(restored.restored);
    let mut outputs = vec![Arc::new(restored)];
    assert_eq!(
        accumulated(&outputs),
        accumulated(&run.outputs[..stop]),
        "restored at {stop}"
    );
    for original in &run.outputs[stop..] {
        input.send(original.events.clone()).unwrap();
        let next = output.recv().unwrap();
        assert_eq!(next.rejections, original.rejections, "restored at {stop}");
        outputs.push(Arc::new(next));
        assert_eq!(
            accumulated(&outputs),
            accumulated(&run.outputs[..=original.epoch as usize]),
            "restored at {stop}, epoch {}",
            original.epoch
        );
    }
    input.close();
    sink.close().await.unwrap();
}

#[sqlx::test(migrator = "delivertrack_sinks::MIGRATOR")]
async fn a_pipeline_restored_from_postgres_early_continues_like_one_that_never_stopped(
    pool: PgPool,
) {
    restart_at(&pool, 3).await;
}

#[sqlx::test(migrator = "delivertrack_sinks::MIGRATOR")]
async fn a_pipeline_restored_from_postgres_after_a_zone_deletion_continues_exactly(pool: PgPool) {
    restart_at(&pool, DELETE_EPOCH + 1).await;
}

// ---------------------------------------------------------------------------------------
// Location fixes
// ---------------------------------------------------------------------------------------

/// `location_fixes` as `(event_id, stale, epoch)`, by event id.
async fn stored_fixes(pool: &PgPool) -> Vec<(Uuid, bool, i64)> {
    sqlx::query_as("SELECT event_id, stale, epoch FROM location_fixes ORDER BY event_id")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// The fixes among `accepted_events(outputs)`.
fn accepted_fixes(outputs: &[Arc<EpochOutput>]) -> BTreeSet<Uuid> {
    let fixes: BTreeSet<Uuid> = outputs
        .iter()
        .flat_map(|o| o.events.iter())
        .filter(|e| matches!(e.body, EventBody::LocationUpdated(_)))
        .map(|e| e.event_id.0)
        .collect();
    accepted_events(outputs)
        .intersection(&fixes)
        .copied()
        .collect()
}

#[sqlx::test(migrator = "delivertrack_sinks::MIGRATOR")]
async fn fixes_redelivered_after_a_crash_between_commit_and_ack_are_stored_once(pool: PgPool) {
    // The process commits epochs 0..STOP and dies before acknowledging the last one; the
    // next process restores from PostgreSQL and gets that epoch's messages again, in one
    // batch with new ones.
    const STOP: usize = 6;
    let run = run(7);
    let mut first = sink(&pool).await;
    for output in &run.outputs[..STOP] {
        first.commit(Arc::clone(output)).await.unwrap();
    }
    // Dropped, not closed: closing a sink closes the pool, which the test shares.
    drop(first);
    let before = stored_fixes(&pool).await;

    let config = DataflowConfig::default();
    let restores = load_restore(&pool, config.speed_window).await.unwrap();
    let (mut input, mut output) = pipeline::start(config).unwrap();
    input.restore(restores).unwrap();
    let mut second = sink(&pool).await;
    second
        .commit(Arc::new(output.recv().unwrap()))
        .await
        .unwrap();
    let mut redelivered = run.outputs[STOP - 1].events.clone();
    redelivered.extend(run.outputs[STOP].events.iter().cloned());
    input.send(redelivered).unwrap();
    let next = Arc::new(output.recv().unwrap());

    // The redelivery holds both kinds of fix that may be stored already: each courier's
    // latest, which the dataflow accepts as a replay that changes nothing, and older ones,
    // refused as stale.
    let stale: BTreeSet<EventId> = next
        .rejections
        .iter()
        .filter(|r| r.reason == RejectReason::Stale)
        .map(|r| r.event_id)
        .collect();
    let old_fixes = run.outputs[STOP - 1]
        .events
        .iter()
        .filter(|e| matches!(e.body, EventBody::LocationUpdated(_)));
    let (stale_again, replayed): (Vec<_>, Vec<_>) =
        old_fixes.partition(|e| stale.contains(&e.event_id));
    assert!(!replayed.is_empty() && !stale_again.is_empty());

    second.commit(Arc::clone(&next)).await.unwrap();
    let after = stored_fixes(&pool).await;
    let ids: BTreeSet<Uuid> = after.iter().map(|(id, _, _)| *id).collect();
    assert_eq!(ids.len(), after.len(), "a fix is stored twice");
    assert_eq!(ids, accepted_fixes(&run.outputs[..=STOP]));
    // What was stored stays as it was: first committed in its epoch, not flagged stale by
    // its redelivery.
    for row in &before {
        assert!(after.contains(row), "{row:?} changed");
    }
    input.close();
    second.close().await.unwrap();
}

/// A stored fix's columns that `delivery_events` had too: event id, time, courier, stale,
/// epoch, recorded at.
type LoggedFix = (Uuid, DateTime<Utc>, Uuid, bool, i64, DateTime<Utc>);

#[sqlx::test(migrator = "delivertrack_sinks::MIGRATOR")]
async fn the_migration_moves_logged_fixes_and_hydration_restores_the_same_state(pool: PgPool) {
    let run = run(7);
    let mut sink = sink(&pool).await;
    for output in &run.outputs {
        sink.commit(Arc::clone(output)).await.unwrap();
    }
    drop(sink);
    let window = DataflowConfig::default().speed_window;
    let restored = sorted(load_restore(&pool, window).await.unwrap());
    let tables = fingerprint(&pool).await;

    // The layout before `location_fixes`: every fix a row of `delivery_events`, its wire
    // JSON the payload.
    let payloads: BTreeMap<Uuid, serde_json::Value> = run
        .outputs
        .iter()
        .flat_map(|o| o.events.iter())
        .filter(|e| matches!(e.body, EventBody::LocationUpdated(_)))
        .map(|e| {
            (
                e.event_id.0,
                delivertrack_dataflow::contract::encode_event(e),
            )
        })
        .collect();
    let rows: Vec<LoggedFix> = sqlx::query_as(
        "SELECT event_id, occurred_at, courier_id, stale, epoch, recorded_at FROM location_fixes",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(rows.len() > 100);
    let mut tx = pool.begin().await.unwrap();
    for statement in [
        "DROP VIEW event_log",
        "ALTER TABLE delivery_events DROP CONSTRAINT delivery_events_kind_check",
        "ALTER TABLE delivery_events ADD CONSTRAINT delivery_events_kind_check CHECK (kind IN
             ('location.updated', 'delivery.created', 'status.changed', 'delivery.rated',
              'zone.upserted', 'zone.deleted'))",
    ] {
        sqlx::query(statement).execute(&mut *tx).await.unwrap();
    }
    for (event_id, occurred_at, courier_id, stale, epoch, recorded_at) in rows {
        sqlx::query(
            "INSERT INTO delivery_events (event_id, kind, occurred_at, courier_id, payload,
                                          stale, epoch, recorded_at)
             VALUES ($1, 'location.updated', $2, $3, $4, $5, $6, $7)",
        )
        .bind(event_id)
        .bind(occurred_at)
        .bind(courier_id)
        .bind(&payloads[&event_id])
        .bind(stale)
        .bind(epoch)
        .bind(recorded_at)
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    for statement in [
        "DROP TABLE location_fixes",
        "DELETE FROM _sqlx_migrations WHERE version = 20261206000001",
    ] {
        sqlx::query(statement).execute(&mut *tx).await.unwrap();
    }
    tx.commit().await.unwrap();
    let old_layout: i64 =
        sqlx::query_scalar("SELECT count(*) FROM delivery_events WHERE kind = 'location.updated'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(old_layout > 100);

    delivertrack_sinks::MIGRATOR.run(&pool).await.unwrap();
    assert_eq!(
        fingerprint(&pool).await,
        tables,
        "the tables after the upgrade"
    );
    let upgraded = sorted(load_restore(&pool, window).await.unwrap());
    assert_eq!(upgraded, restored);
}
