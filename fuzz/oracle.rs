//! What each fuzz target checks, shared by the targets (`fuzz_targets/`) and the test that
//! replays every input ever found (`dataflow/tests/fuzz_regressions.rs`), so a regression
//! is checked exactly as the fuzzer checked it.
//!
//! Both decoders must never panic, and whatever they accept must survive its own encoding:
//! `decode(encode(e)) == e` for an event, and a zone's shape must be valid and closed.

// Each includer uses its own half.
#![allow(dead_code)]

use delivertrack_dataflow::contract::{
    ContractLimits, decode_event, decode_geometry, decode_message, encode_event,
};
use serde_json::{Value, json};

/// A fixed receiver clock (2026-11-30T12:00:00Z), so that a replay sees what the fuzzer saw.
pub const NOW_MS: i64 = 1_796_040_000_000;

/// The routing keys tried on every message: none (do not check) and each kind's own.
const ROUTING_KEYS: [Option<&str>; 3] = [None, Some("zone.upserted"), Some("location.updated")];

/// Decodes `payload` as a RabbitMQ message and checks that every accepted event encodes to
/// JSON that decodes to the same event.
pub fn decode_message_bytes(payload: &[u8]) {
    let limits = ContractLimits::default();
    for routing_key in ROUTING_KEYS {
        let decoded = decode_message(routing_key, payload, NOW_MS, &limits);
        for error in &decoded.errors {
            // Formatting the reason must not panic either (it quotes input).
            let _ = error.to_string();
            let _ = error.reason.code();
        }
        for event in &decoded.events {
            let encoded = encode_event(event);
            let again = decode_event(routing_key, &encoded, NOW_MS, &limits);
            assert_eq!(
                again.as_ref(),
                Ok(event),
                "an accepted event does not survive its own encoding: {encoded}"
            );
        }
    }
}

/// Parses `payload` as JSON and decodes it as a zone geometry: as it is, and as the
/// coordinates of a Polygon and of a MultiPolygon (so the fuzzer need not find the
/// envelope to reach the ring checks).
pub fn zone_geometry_bytes(payload: &[u8]) {
    let Ok(value) = serde_json::from_slice::<Value>(payload) else {
        return;
    };
    let candidates = [
        json!({"type": "Polygon", "coordinates": value.clone()}),
        json!({"type": "MultiPolygon", "coordinates": value.clone()}),
        value,
    ];
    for candidate in &candidates {
        match decode_geometry(candidate) {
            Ok(shape) => {
                // What is accepted must be usable: the spatial index needs a bounding box.
                assert!(
                    !shape.0.0.is_empty(),
                    "an accepted zone has no polygon: {candidate}"
                );
            }
            Err(reason) => {
                let _ = reason.to_string();
                let _ = reason.code();
            }
        }
    }
}
