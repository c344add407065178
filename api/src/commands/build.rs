//! A command's event, built as wire JSON and validated by the event contract.
//!
//! A write route does not construct an [`Event`] by hand: it writes the event's wire form
//! (the request's fields under the contract's names, a new UUIDv4 `event_id`,
//! `occurred_at` now unless the client gave one) and decodes it with
//! [`delivertrack_dataflow::contract::decode_event`] — the very function
//! RabbitMQ input goes through. A command is therefore held to exactly the rules of ingest
//! (ranges, geometry, string lengths, clock skew), and what it publishes is an event the
//! pipeline will not dead-letter at decoding. The contract's reason codes become the
//! stable `400` codes of [`reason_code`].

use chrono::{SecondsFormat, Utc};
use delivertrack_dataflow::contract::{ContractLimits, DecodeErrorReason, decode_event};
use delivertrack_dataflow::{Event, EventKind};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::error::ApiError;

/// The event of kind `kind` with `fields` (the kind's own fields, wire names), a new
/// event id, and `occurred_at` (RFC 3339) or now, decoded under `limits` (the API's
/// [`ApiConfig::contract`](crate::ApiConfig::contract)).
///
/// # Errors
/// `400` with the code of [`reason_code`] when the contract refuses the event.
pub(crate) fn event(
    kind: EventKind,
    occurred_at: Option<String>,
    fields: Map<String, Value>,
    limits: &ContractLimits,
) -> Result<Event, ApiError> {
    let now = Utc::now();
    let mut object = fields;
    object.insert("v".into(), Value::from(1));
    object.insert("kind".into(), Value::from(kind.as_str()));
    object.insert(
        "event_id".into(),
        Value::from(Uuid::new_v4().hyphenated().to_string()),
    );
    object.insert(
        "occurred_at".into(),
        Value::from(
            occurred_at.unwrap_or_else(|| now.to_rfc3339_opts(SecondsFormat::Millis, true)),
        ),
    );
    decode_event(
        Some(kind.as_str()),
        &Value::Object(object),
        now.timestamp_millis(),
        limits,
    )
    .map_err(|error| ApiError::BadRequest {
        code: reason_code(&error.reason),
        message: error.reason.to_string(),
    })
}

/// `{"lat": .., "lon": ..}` as the contract writes a position.
pub(crate) fn point(lat: f64, lon: f64) -> Value {
    let mut object = Map::new();
    object.insert("lat".into(), Value::from(lat));
    object.insert("lon".into(), Value::from(lon));
    Value::Object(object)
}

/// The stable `400` code of a contract refusal. Codes that only a hand-made message can
/// earn (not JSON, an empty array, a kind that differs from its routing key, ...) cannot
/// come from a request built here; they are answered as `invalid_event` all the same.
pub fn reason_code(reason: &DecodeErrorReason) -> &'static str {
    use DecodeErrorReason as R;
    match reason {
        R::CoordinateOutOfRange { .. } => "invalid_coordinates",
        R::StatusNotAllowed { .. } => "invalid_status",
        R::ScoreOutOfRange { .. } => "invalid_score",
        R::InvalidPolygon { .. } => "invalid_geometry",
        R::CourierRequired => "courier_required",
        R::MissingField { .. } => "missing_field",
        R::UnknownField { .. } => "unknown_field",
        R::DuplicateField { .. } => "duplicate_field",
        R::ValueOutOfRange { .. } => "value_out_of_range",
        R::StringTooLong { .. } => "string_too_long",
        R::ControlCharacter { .. } => "control_character",
        R::InvalidUnicode { .. } => "invalid_unicode",
        R::TimestampInFuture { .. } => "timestamp_in_future",
        R::TimestampTooOld { .. } => "timestamp_too_old",
        R::InvalidValue { .. } | R::NonFiniteNumber { .. } => "invalid_value",
        R::BadJson { .. }
        | R::NotAnObject { .. }
        | R::EmptyArray
        | R::TooManyEvents { .. }
        | R::UnsupportedVersion { .. }
        | R::UnknownKind { .. }
        | R::KindMismatch { .. } => "invalid_event",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use delivertrack_dataflow::EventBody;
    use serde_json::json;

    fn fields(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => unreachable!(),
        }
    }

    /// [`super::event`] under the default limits.
    fn event(
        kind: EventKind,
        occurred_at: Option<String>,
        fields: Map<String, Value>,
    ) -> Result<Event, ApiError> {
        super::event(kind, occurred_at, fields, &ContractLimits::default())
    }

    fn code(result: Result<Event, ApiError>) -> &'static str {
        match result {
            Err(ApiError::BadRequest { code, .. }) => code,
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn a_valid_command_becomes_an_event_with_a_fresh_id_and_now() {
        let before = Utc::now().timestamp_millis();
        let event = event(
            EventKind::LocationUpdated,
            None,
            fields(json!({"courier_id": Uuid::from_u128(5).to_string(), "lat": 52.5, "lon": 13.4})),
        )
        .unwrap();
        assert!(event.occurred_at >= before && event.occurred_at <= Utc::now().timestamp_millis());
        assert_eq!(event.event_id.0.get_version_num(), 4);
        let EventBody::LocationUpdated(body) = event.body else {
            panic!("wrong kind")
        };
        assert!((body.position.lat() - 52.5).abs() < 1e-9);
    }

    #[test]
    fn the_contract_refusals_become_stable_codes() {
        let courier = Uuid::from_u128(5).to_string();
        let location = |lat: f64, extra: Value| {
            let mut map = fields(json!({"courier_id": courier, "lat": lat, "lon": 13.4}));
            map.extend(fields(extra));
            event(EventKind::LocationUpdated, None, map)
        };
        assert_eq!(code(location(91.0, json!({}))), "invalid_coordinates");
        assert_eq!(
            code(location(52.0, json!({"speed_mps": 1000.0}))),
            "value_out_of_range"
        );
        let future = (Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
        assert_eq!(
            code(event(
                EventKind::LocationUpdated,
                Some(future),
                fields(json!({"courier_id": courier, "lat": 52.0, "lon": 13.0}))
            )),
            "timestamp_in_future"
        );
        assert_eq!(
            code(event(
                EventKind::LocationUpdated,
                Some("yesterday".into()),
                fields(json!({"courier_id": courier, "lat": 52.0, "lon": 13.0}))
            )),
            "invalid_value"
        );
        let delivery = Uuid::from_u128(6).to_string();
        assert_eq!(
            code(event(
                EventKind::DeliveryRated,
                None,
                fields(json!({"delivery_id": delivery, "score": 6}))
            )),
            "invalid_score"
        );
        assert_eq!(
            code(event(
                EventKind::StatusChanged,
                None,
                fields(json!({"delivery_id": delivery, "status": "assigned"}))
            )),
            "courier_required"
        );
        assert_eq!(
            code(event(
                EventKind::ZoneUpserted,
                None,
                fields(json!({
                    "zone_id": delivery,
                    "name": "bowtie",
                    "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]]}
                }))
            )),
            "invalid_geometry"
        );
    }
}
