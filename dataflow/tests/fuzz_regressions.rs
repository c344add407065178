//! Replays every input the fuzz targets ever found (`fuzz/regressions/<target>/`, kept by
//! `scripts/fuzz.sh`) and the hand-written nasty ones beside them, with the fuzzers' own
//! checks (`fuzz/oracle.rs`): the decoders never panic, and what they accept survives its
//! own encoding. Inputs too large to keep as files (a 1 MiB string, giant polygons) are
//! made here.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use delivertrack_dataflow::contract::{
    ContractLimits, MAX_ZONE_POSITIONS, decode_geometry, decode_message,
};
use serde_json::{Value, json};

#[path = "../../fuzz/oracle.rs"]
mod oracle;

/// Decoding one input must stay this fast even for the worst of them (debug build).
const SLOWEST: Duration = Duration::from_secs(5);

fn regressions(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/regressions")
        .join(target);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("{}: {error}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

/// Runs `check` on every kept input of `target`, naming the one that fails.
fn replay(target: &str, check: fn(&[u8])) {
    let files = regressions(target);
    assert!(!files.is_empty(), "no inputs kept for {target}");
    for path in files {
        let payload = fs::read(&path).unwrap();
        let started = Instant::now();
        let outcome = std::panic::catch_unwind(|| check(&payload));
        assert!(outcome.is_ok(), "{} panicked", path.display());
        assert!(
            started.elapsed() < SLOWEST,
            "{} took {:?}",
            path.display(),
            started.elapsed()
        );
    }
}

#[test]
fn every_kept_message_is_decoded_without_panic() {
    replay("decode_message", oracle::decode_message_bytes);
}

#[test]
fn every_kept_geometry_is_decoded_without_panic() {
    replay("zone_geometry", oracle::zone_geometry_bytes);
}

fn zone_upserted(name: &str, geometry: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "v": 1,
        "kind": "zone.upserted",
        "event_id": "5f4e3d2c-1b0a-4987-a6b5-c4d3e2f1a0b9",
        "occurred_at": "2026-11-30T11:59:00Z",
        "zone_id": "6a5b4c3d-2e1f-4a09-b8c7-d6e5f4a3b2c1",
        "name": name,
        "geometry": geometry,
    }))
    .unwrap()
}

/// A closed ring of `positions` positions (the first repeated last) on a circle.
fn circle(positions: usize) -> Value {
    let n = positions - 1;
    let mut ring: Vec<Value> = (0..n)
        .map(|i| {
            let angle = std::f64::consts::TAU * i as f64 / n as f64;
            json!([13.4 + 0.05 * angle.cos(), 52.5 + 0.03 * angle.sin()])
        })
        .collect();
    ring.push(ring[0].clone());
    json!({"type": "Polygon", "coordinates": [ring]})
}

#[test]
fn a_polygon_at_the_position_limit_is_accepted_and_one_past_it_refused() {
    let at_limit = circle(MAX_ZONE_POSITIONS);
    let started = Instant::now();
    let shape = decode_geometry(&at_limit).expect("a valid polygon at the limit");
    assert!(started.elapsed() < SLOWEST, "took {:?}", started.elapsed());
    assert_eq!(shape.0.0[0].exterior().0.len(), MAX_ZONE_POSITIONS);

    let past = circle(MAX_ZONE_POSITIONS + 1);
    let reason = decode_geometry(&past).unwrap_err();
    assert_eq!(reason.code(), "invalid_polygon", "{reason}");
    // The whole event, through the message decoder and the fuzz check.
    oracle::decode_message_bytes(&zone_upserted("giant", past));
    oracle::decode_message_bytes(&zone_upserted("at the limit", at_limit));
}

#[test]
fn a_giant_self_intersecting_polygon_is_refused_in_bounded_time() {
    // A zig-zag of MAX_ZONE_POSITIONS positions whose closing edge crosses all of them:
    // the validity check is the expensive part.
    let n = MAX_ZONE_POSITIONS - 1;
    let mut ring: Vec<Value> = (0..n)
        .map(|i| {
            let x = 13.0 + 0.0001 * i as f64;
            let y = if i % 2 == 0 { 52.0 } else { 52.01 };
            json!([x, y])
        })
        .collect();
    ring.push(json!([13.0 + 0.0001 * n as f64, 52.005]));
    ring[n] = ring[0].clone();
    ring.insert(1, json!([14.0, 52.02]));
    ring.truncate(MAX_ZONE_POSITIONS);
    let last = ring.len() - 1;
    ring[last] = ring[0].clone();
    let geometry = json!({"type": "Polygon", "coordinates": [ring]});
    let started = Instant::now();
    let outcome = decode_geometry(&geometry);
    assert!(started.elapsed() < SLOWEST, "took {:?}", started.elapsed());
    let error = outcome.expect_err("a self-intersecting ring was accepted");
    assert_eq!(error.code(), "invalid_polygon", "{error}");
}

#[test]
fn a_multipolygon_of_many_tiny_polygons_is_bounded_by_the_position_limit() {
    let square = |i: usize| {
        let x = -170.0 + 0.001 * i as f64;
        json!([[
            [x, 0.0],
            [x + 0.0005, 0.0],
            [x + 0.0005, 0.0005],
            [x, 0.0005],
            [x, 0.0]
        ]])
    };
    let many = json!({
        "type": "MultiPolygon",
        "coordinates": (0..=MAX_ZONE_POSITIONS / 5).map(square).collect::<Vec<_>>(),
    });
    let reason = decode_geometry(&many).unwrap_err();
    assert_eq!(reason.code(), "invalid_polygon", "{reason}");
}

#[test]
fn one_mebibyte_strings_are_decoded_without_panic() {
    let huge = "x".repeat(1 << 20);
    let limits = ContractLimits::default();
    for payload in [
        zone_upserted(&huge, circle(5)),
        serde_json::to_vec(&json!({
            "v": 1, "kind": "delivery.rated",
            "event_id": "5f4e3d2c-1b0a-4987-a6b5-c4d3e2f1a0b9",
            "occurred_at": "2026-11-30T11:59:00Z",
            "delivery_id": "3c2d8e1f-9a4b-4c6d-8e7f-1a2b3c4d5e6f",
            "score": 5, "comment": huge,
        }))
        .unwrap(),
        serde_json::to_vec(&json!({"v": 1, "kind": huge})).unwrap(),
        serde_json::to_vec(&json!({ huge.as_str(): 1 })).unwrap(),
    ] {
        oracle::decode_message_bytes(&payload);
        let decoded = decode_message(None, &payload, oracle::NOW_MS, &limits);
        assert!(decoded.events.is_empty(), "a 1 MiB string was accepted");
        assert!(!decoded.errors.is_empty(), "a 1 MiB string was not refused");
        for error in decoded.errors {
            // A refusal quotes the input shortened, never the whole of it.
            assert!(
                error.to_string().len() < 4_096,
                "{} bytes",
                error.to_string().len()
            );
        }
    }
}

#[test]
fn deep_nesting_is_refused_not_overflowed() {
    let limits = ContractLimits::default();
    for depth in [129, 10_000, 1_000_000] {
        for payload in [
            "[".repeat(depth) + &"]".repeat(depth),
            "{\"a\":".repeat(depth) + "1" + &"}".repeat(depth),
        ] {
            let decoded = decode_message(None, payload.as_bytes(), oracle::NOW_MS, &limits);
            assert!(decoded.events.is_empty());
            assert_eq!(decoded.errors.len(), 1, "depth {depth}");
        }
    }
}
