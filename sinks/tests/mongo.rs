//! The MongoDB sink against a real server.
//!
//! These tests need a MongoDB server, given by `MONGO_URI`
//! (`MONGO_URI=mongodb://127.0.0.1:27017 cargo test -p delivertrack-sinks --test mongo`).
//! Without it they print a `SKIPPED:` line and pass, except
//! [`an_unreachable_server_is_an_error_naming_it_within_the_timeout`], which needs no
//! server and always runs. Each test works in a database of its own,
//! `delivertrack_test_<uuid>`, and drops it at its end (a failed test leaves it behind for
//! inspection).
//!
//! The input is real: the fleet simulator's stream through the real dataflow, with a few
//! events mixed in that the simulator never sends (replays, a stale fix, a zone edit and a
//! zone deletion). The reference is the dataflow's own output accumulated in memory by
//! [`ReadState`], the read model's state.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::DateTime;
use delivertrack_dataflow::event::{Event, EventBody, ZoneDeleted, ZoneUpserted};
use delivertrack_dataflow::pipeline::{self, DataflowConfig};
use delivertrack_dataflow::{CourierId, EpochOutput, EventId, RejectReason, ZoneId};
use delivertrack_ingest::{FleetSimulator, SimulatorConfig};
use delivertrack_sinks::mongo::documents::{self, uuid_bson, uuid_from_bson};
use delivertrack_sinks::mongo::{MongoConfig, MongoError, MongoSink};
use delivertrack_sinks::read_model::ReadState;
use delivertrack_sinks::{Sink, SinkError};
use geo::{Distance, Euclidean};
use mongodb::bson::{Document, doc};
use uuid::Uuid;

/// Monday 2026-11-30, 08:00 UTC.
const START_MS: i64 = 1_796_025_600_000;
/// Simulated time per epoch.
const STEP_MS: i64 = 60_000;
/// Epochs per run.
const EPOCHS: usize = 12;
/// The epoch that replays part of the previous one, the one with a stale fix, the one that
/// edits a zone and the one that deletes the zone with the most couriers inside.
const REPLAY_EPOCH: usize = 2;
const STALE_EPOCH: usize = 3;
const EDIT_EPOCH: usize = 5;
const DELETE_EPOCH: usize = 8;

// ---------------------------------------------------------------------------------------
// The server, or the skip line
// ---------------------------------------------------------------------------------------

/// `MONGO_URI`, or `None` after printing the skip line.
fn mongo_uri(test: &str) -> Option<String> {
    match std::env::var("MONGO_URI") {
        Ok(uri) if !uri.trim().is_empty() => Some(uri),
        _ => {
            // Straight to the process's stderr: the test harness captures `eprintln!` of a
            // passing test, and this line must be seen.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: {test}: MONGO_URI is not set; the MongoDB integration tests need a server"
            );
            None
        }
    }
}

/// A database of the test's own.
struct TestDatabase {
    config: MongoConfig,
}

impl TestDatabase {
    fn new(uri: String) -> Self {
        let name = format!("delivertrack_test_{}", Uuid::new_v4().simple());
        Self {
            config: MongoConfig::new(uri, name),
        }
    }

    async fn sink(&self) -> MongoSink {
        MongoSink::connect(&self.config).await.unwrap()
    }

    /// Drops the database (called at the end of each test).
    async fn drop(self) {
        let client = mongodb::Client::with_uri_str(&self.config.uri)
            .await
            .unwrap();
        client.database(&self.config.database).drop().await.unwrap();
        client.shutdown().await;
    }
}

// ---------------------------------------------------------------------------------------
// The input: simulator → dataflow
// ---------------------------------------------------------------------------------------

/// What the run produced, epoch by epoch, with the reference state after each.
struct Run {
    outputs: Vec<Arc<EpochOutput>>,
    states: Vec<ReadState>,
}

/// Runs `EPOCHS` epochs of a 20-courier city through the dataflow (2 workers). Every zone
/// has dwell 0, so the dataflow's `inside` is exactly "the latest fix lies in the zone",
/// which is what `couriers_in_zone` answers. The city is small so that zones hold couriers.
fn run(seed: u64) -> Run {
    let config = SimulatorConfig {
        couriers: 20,
        seed,
        radius_m: 1_500.0,
        dwell_seconds: 0,
        fix_interval_ms: 5_000,
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
    for epoch in 0..EPOCHS {
        let mut events = if epoch == 0 {
            simulator.initial_events()
        } else {
            Vec::new()
        };
        events.extend(simulator.step(STEP_MS));
        let now = simulator.now();
        match epoch {
            // Redelivery: ten events of the previous epoch again, and one twice in this one.
            REPLAY_EPOCH => {
                events.extend(earlier.iter().take(10).cloned());
                if let Some(first) = events.first().cloned() {
                    events.push(first);
                }
            }
            // A fix older than its courier's newest, under a new event id: stale.
            STALE_EPOCH => {
                let fix = earlier
                    .iter()
                    .find(|e| matches!(e.body, EventBody::LocationUpdated(_)))
                    .cloned()
                    .expect("the simulator sends fixes");
                events.push(Event {
                    event_id: EventId(Uuid::from_u128(0x5eed_0010)),
                    occurred_at: fix.occurred_at - 1_000,
                    ..fix
                });
            }
            // The first zone grows by a third and is renamed: couriers enter through the edit.
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
                events.push(Event {
                    event_id: EventId(Uuid::from_u128(0x5eed_0020)),
                    occurred_at: now,
                    body: EventBody::ZoneUpserted(ZoneUpserted {
                        name: format!("{} (enlarged)", zone.name),
                        shape,
                        ..zone
                    }),
                });
            }
            // The zone with the most couriers inside is deleted (any zone if none holds one).
            DELETE_EPOCH => {
                let mut counts: BTreeMap<ZoneId, usize> =
                    state.zones.keys().map(|zone| (*zone, 0)).collect();
                for (_, zone) in &state.inside {
                    *counts.entry(*zone).or_insert(0) += 1;
                }
                let busiest = counts
                    .into_iter()
                    .max_by_key(|(_, n)| *n)
                    .map(|(zone, _)| zone)
                    .expect("the scene has zones");
                events.push(Event {
                    event_id: EventId(Uuid::from_u128(0x5eed_0021)),
                    occurred_at: now,
                    body: EventBody::ZoneDeleted(ZoneDeleted { zone_id: busiest }),
                });
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

/// The fixes the collection must hold after `outputs`: every `location.updated` except
/// those refused for a reason other than `stale` — the same rule as the sink's, written
/// out again here so that the test does not trust the code it tests.
fn accepted_fixes(outputs: &[Arc<EpochOutput>]) -> BTreeSet<Uuid> {
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
                .filter(|e| matches!(e.body, EventBody::LocationUpdated(_)))
                .filter(|e| !refused.contains(&e.event_id))
                .map(|e| e.event_id.0),
        );
    }
    accepted
}

/// The first stored form of every accepted fix, by event id: a replay in a later epoch
/// stores nothing, so the document keeps the epoch that first carried it.
fn expected_locations(outputs: &[Arc<EpochOutput>]) -> BTreeMap<Uuid, Document> {
    let accepted = accepted_fixes(outputs);
    let mut expected = BTreeMap::new();
    for output in outputs {
        for event in &output.events {
            if let EventBody::LocationUpdated(fix) = &event.body
                && accepted.contains(&event.event_id.0)
            {
                expected.entry(event.event_id.0).or_insert_with(|| {
                    documents::location_document(
                        event.event_id,
                        event.occurred_at,
                        fix,
                        output.epoch,
                    )
                });
            }
        }
    }
    expected
}

// ---------------------------------------------------------------------------------------
// Reading the collections back
// ---------------------------------------------------------------------------------------

async fn all(collection: &mongodb::Collection<Document>) -> Vec<Document> {
    let mut cursor = collection.find(doc! {}).await.unwrap();
    let mut documents = Vec::new();
    while cursor.advance().await.unwrap() {
        documents.push(cursor.deserialize_current().unwrap());
    }
    documents
}

async fn stored_locations(sink: &MongoSink) -> BTreeMap<Uuid, Document> {
    all(sink.store().locations())
        .await
        .into_iter()
        .map(|d| (uuid_from_bson(d.get("_id").unwrap()).unwrap(), d))
        .collect()
}

async fn stored_zones(sink: &MongoSink) -> BTreeMap<ZoneId, Document> {
    all(sink.store().zones())
        .await
        .into_iter()
        .map(|d| (ZoneId(uuid_from_bson(d.get("_id").unwrap()).unwrap()), d))
        .collect()
}

fn expected_zones(state: &ReadState) -> BTreeMap<ZoneId, Document> {
    state
        .zones
        .iter()
        .map(|(id, zone)| (*id, documents::zone_document(*id, zone).unwrap()))
        .collect()
}

/// Couriers whose latest fix lies within 1e-6° (about 10 cm) of a ring of the zone: there
/// MongoDB's spherical edges and the dataflow's planar ones may disagree (by about a
/// centimetre for zones this size), so such couriers are left out of the comparison.
fn near_the_border(state: &ReadState, zone: ZoneId) -> BTreeSet<CourierId> {
    let Some(zone) = state.zones.get(&zone) else {
        return BTreeSet::new();
    };
    state
        .couriers
        .iter()
        .filter(|(_, courier)| {
            let point = courier.position.to_point();
            zone.shape.0.0.iter().any(|polygon| {
                std::iter::once(polygon.exterior())
                    .chain(polygon.interiors())
                    .any(|ring| Euclidean.distance(&point, ring) < 1e-6)
            })
        })
        .map(|(id, _)| *id)
        .collect()
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn every_accepted_fix_is_stored_once_even_when_an_epoch_is_committed_twice() {
    let Some(uri) = mongo_uri("every_accepted_fix_is_stored_once") else {
        return;
    };
    let database = TestDatabase::new(uri);
    let run = run(11);
    let mut sink = database.sink().await;
    for (index, output) in run.outputs.iter().enumerate() {
        sink.commit(Arc::clone(output)).await.unwrap();
        // The driver's retry after a lost reply: the same epoch again.
        sink.commit(Arc::clone(output)).await.unwrap();
        let stored = stored_locations(&sink).await;
        assert_eq!(
            stored,
            expected_locations(&run.outputs[..=index]),
            "epoch {index}"
        );
    }
    // A whole replay (a restarted process before hydration) inserts nothing either.
    let before = stored_locations(&sink).await;
    for output in &run.outputs {
        sink.commit(Arc::clone(output)).await.unwrap();
    }
    assert_eq!(stored_locations(&sink).await, before);

    // The run covered what the test is for: replays, and a stale fix that is stored.
    let stale = Uuid::from_u128(0x5eed_0010);
    assert!(
        run.outputs[STALE_EPOCH]
            .rejections
            .iter()
            .any(|r| r.event_id.0 == stale && r.reason == RejectReason::Stale)
    );
    assert!(before.contains_key(&stale));
    assert!(run.outputs[REPLAY_EPOCH].events.len() > 10);

    sink.close().await.unwrap();
    assert!(matches!(
        sink.commit(Arc::clone(&run.outputs[0])).await,
        Err(SinkError::Closed { sink: "mongo" })
    ));
    database.drop().await;
}

#[tokio::test]
async fn zones_equal_the_dataflows_zones_after_every_epoch() {
    let Some(uri) = mongo_uri("zones_equal_the_dataflows_zones") else {
        return;
    };
    let database = TestDatabase::new(uri);
    let run = run(12);
    let mut sink = database.sink().await;
    for (output, state) in run.outputs.iter().zip(&run.states) {
        sink.commit(Arc::clone(output)).await.unwrap();
        assert_eq!(
            stored_zones(&sink).await,
            expected_zones(state),
            "epoch {}",
            output.epoch
        );
    }
    let last = run.states.last().unwrap();
    // The run covered an edit and a deletion.
    assert!(
        last.zones
            .values()
            .any(|zone| zone.name.ends_with("(enlarged)"))
    );
    assert!(
        run.outputs[DELETE_EPOCH]
            .changes
            .iter()
            .any(|(c, d)| matches!(c, delivertrack_dataflow::Change::Zone(..)) && *d < 0)
    );
    // Committing older epochs after newer ones changes nothing: the version guard keeps the
    // newer zone versions (the deleted zone, gone from the dataflow, may come back from its
    // creation epoch; that is the one thing only hydration can settle, so it is excluded).
    let deleted: BTreeSet<ZoneId> = run.states[DELETE_EPOCH - 1]
        .zones
        .keys()
        .filter(|zone| !last.zones.contains_key(zone))
        .copied()
        .collect();
    for output in run.outputs.iter().take(EDIT_EPOCH + 1) {
        sink.commit(Arc::clone(output)).await.unwrap();
    }
    let mut stored = stored_zones(&sink).await;
    stored.retain(|zone, _| !deleted.contains(zone));
    assert_eq!(stored, expected_zones(last));
    database.drop().await;
}

#[tokio::test]
async fn couriers_in_zone_equals_the_couriers_the_dataflow_has_inside() {
    let Some(uri) = mongo_uri("couriers_in_zone_equals_the_dataflow") else {
        return;
    };
    let database = TestDatabase::new(uri);
    let run = run(13);
    let mut sink = database.sink().await;
    let mut compared = 0;
    for (output, state) in run.outputs.iter().zip(&run.states) {
        sink.commit(Arc::clone(output)).await.unwrap();
        for zone in state.zones.keys() {
            let border = near_the_border(state, *zone);
            let expected: BTreeSet<CourierId> = state
                .inside
                .iter()
                .filter(|(_, z)| z == zone)
                .map(|(courier, _)| *courier)
                .filter(|courier| !border.contains(courier))
                .collect();
            let answer = sink.couriers_in_zone(*zone, None).await.unwrap();
            // Each answer is the courier's latest fix, as the dataflow has it.
            for position in &answer {
                let courier = &state.couriers[&position.courier_id];
                assert_eq!(position.position, courier.position);
                assert_eq!(position.event_id, courier.event_id);
                assert_eq!(position.occurred_at.timestamp_millis(), courier.at);
            }
            let found: BTreeSet<CourierId> = answer
                .iter()
                .map(|p| p.courier_id)
                .filter(|courier| !border.contains(courier))
                .collect();
            assert_eq!(found, expected, "epoch {}, zone {zone}", output.epoch);
            compared += expected.len();
        }
    }
    assert!(compared > 0, "no courier was ever inside a zone");

    let last = run.states.last().unwrap();
    let zone = *last.zones.keys().next().unwrap();
    // `since` after every fix: nobody.
    let latest = last.couriers.values().map(|c| c.at).max().unwrap();
    let later = DateTime::from_timestamp_millis(latest + 1).unwrap();
    assert!(
        sink.couriers_in_zone(zone, Some(later))
            .await
            .unwrap()
            .is_empty()
    );
    // A zone that is not stored is named.
    let unknown = ZoneId(Uuid::from_u128(0x5eed_0099));
    assert!(matches!(
        sink.couriers_in_zone(unknown, None).await,
        Err(MongoError::UnknownZone(zone)) if zone == unknown
    ));
    database.drop().await;
}

#[tokio::test]
async fn connect_creates_the_indexes_and_may_run_again() {
    let Some(uri) = mongo_uri("connect_creates_the_indexes") else {
        return;
    };
    let database = TestDatabase::new(uri);
    let sink = database.sink().await;
    // A second start finds the indexes in place.
    let again = database.sink().await;
    let mut names = Vec::new();
    for collection in [sink.store().locations(), sink.store().zones()] {
        let mut cursor = collection.list_indexes().await.unwrap();
        while cursor.advance().await.unwrap() {
            let index = cursor.deserialize_current().unwrap();
            names.push(index.options.and_then(|o| o.name).unwrap_or_default());
        }
    }
    names.sort();
    let mut expected = vec![
        "_id_",
        "_id_",
        documents::LATEST_INDEX,
        documents::GEOMETRY_INDEX,
        documents::LOCATION_INDEX,
    ];
    expected.sort_unstable();
    assert_eq!(names, expected);
    // The uuid form of an id is what the shell's `UUID("...")` finds.
    let zone = Uuid::from_u128(7);
    sink.store()
        .zones()
        .insert_one(doc! { "_id": uuid_bson(zone), "name": "x" })
        .await
        .unwrap();
    assert!(matches!(
        again.couriers_in_zone(ZoneId(zone), None).await,
        Err(MongoError::ZoneWithoutGeometry(_))
    ));
    database.drop().await;
}

/// Needs no server: the input of the tests above covers what they are for, so that a run
/// against a server cannot pass vacuously. Checked on every run of the suite.
#[test]
fn the_input_covers_replays_stale_fixes_zone_edits_deletions_and_occupancy() {
    for seed in [11, 12, 13] {
        let run = run(seed);
        let stale = Uuid::from_u128(0x5eed_0010);
        assert!(
            run.outputs[STALE_EPOCH]
                .rejections
                .iter()
                .any(|r| r.event_id.0 == stale && r.reason == RejectReason::Stale),
            "seed {seed}: the stale fix"
        );
        let accepted = accepted_fixes(&run.outputs);
        assert!(
            accepted.contains(&stale),
            "seed {seed}: stale fixes are history"
        );
        assert_eq!(expected_locations(&run.outputs).len(), accepted.len());
        // Ten events of the previous epoch again, and one event twice within the epoch.
        let previous: BTreeSet<EventId> = run.outputs[REPLAY_EPOCH - 1]
            .events
            .iter()
            .map(|e| e.event_id)
            .collect();
        let replay = &run.outputs[REPLAY_EPOCH].events;
        let again = replay
            .iter()
            .filter(|e| previous.contains(&e.event_id))
            .count();
        let distinct: BTreeSet<EventId> = replay.iter().map(|e| e.event_id).collect();
        assert!(again >= 10, "seed {seed}: {again} replayed");
        assert_eq!(
            distinct.len() + 1,
            replay.len(),
            "seed {seed}: one event twice"
        );
        let last = run.states.last().unwrap();
        assert!(
            last.zones
                .values()
                .any(|zone| zone.name.ends_with("(enlarged)")),
            "seed {seed}: the edit"
        );
        assert!(
            last.zones.len() < run.states[DELETE_EPOCH - 1].zones.len(),
            "seed {seed}: the deletion"
        );
        assert!(
            last.zones.values().all(|zone| zone.dwell_ms == 0),
            "seed {seed}: dwell 0 everywhere"
        );
        let occupied = run
            .states
            .iter()
            .map(|state| state.inside.len())
            .sum::<usize>();
        assert!(
            occupied > 0,
            "seed {seed}: no courier was ever inside a zone"
        );
        // The border exclusion leaves almost everyone in the comparison.
        let near: usize = last
            .zones
            .keys()
            .map(|zone| near_the_border(last, *zone).len())
            .sum();
        assert!(near <= 1, "seed {seed}: {near} couriers on a border");
    }
}

/// Needs no server: nothing listens on the port, and the start must say so, naming the
/// server, within the configured timeout instead of the driver's 30 s default.
#[tokio::test]
async fn an_unreachable_server_is_an_error_naming_it_within_the_timeout() {
    // A port that nothing listens on: bind one, then let it go.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = MongoConfig::new(
        format!("mongodb://ops:s3cret@127.0.0.1:{port}/?serverSelectionTimeoutMS=500"),
        "fleet",
    );
    let started = Instant::now();
    let error = MongoSink::connect(&config).await.unwrap_err();
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    assert!(error.is_retryable(), "{error:?}");
    assert_eq!(error.sink(), "mongo");
    let text = error_chain(&error);
    assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
    assert!(text.contains("fleet"), "{text}");
    assert!(!text.contains("s3cret"), "{text}");
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
