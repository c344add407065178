//! The JSON wire format of events and its strict validation.
//!
//! A RabbitMQ message (`content_type: application/json`, routing key = the event's kind)
//! carries one event object or a JSON array of them. [`decode_message`] turns such a payload
//! into validated [`Event`]s and a typed [`DecodeError`] for every event it refuses;
//! [`encode_event`] and [`encode_message`] produce the same format, so that
//! `decode(encode(e)) == e` for every valid event. `docs/events.md` is the human-readable
//! form of this module; a test decodes every example in it.
//!
//! Decoding is strict because a wrong event that slips through poisons every aggregate it
//! touches, while a refused one is dead-lettered with a reason and can be replayed once
//! fixed. What can be judged from the event alone is judged here: field names and types,
//! ranges, geometry, the schema version, the routing key, the clock (ahead and behind), and
//! whether every string is text the stores can hold (no control characters, no lone
//! surrogates or noncharacters, bounded lengths). What depends on state
//! (a status transition, a rating of an unknown delivery) is judged inside the dataflow
//! ([`crate::model::RejectReason`]).
//!
//! Quantization happens here too: positions become fixed point ([`GeoPoint`]), zone
//! coordinates are rounded to the same 1e-7 degree grid, speeds, headings and accuracies
//! become integers. Every worker therefore sees bit-identical values, and a value survives
//! an encode/decode round trip through text unchanged.

use std::fmt;

use chrono::{DateTime, SecondsFormat};
use geo::{MapCoordsInPlace, MultiPolygon, Validation};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};
use uuid::Uuid;

use crate::event::{
    DeliveryCreated, DeliveryRated, Event, EventBody, EventKind, LocationUpdated, StatusChanged,
    UnixMillis, ZoneDeleted, ZoneUpserted,
};
use crate::geometry::{E7, GeoPoint, ZoneShape};
use crate::ids::{CourierId, CustomerId, DeliveryId, EventId, ZoneId};
use crate::lifecycle::Status;

/// The schema version this module reads and writes (`v`).
pub const SCHEMA_VERSION: u64 = 1;
/// The content type of every message.
pub const CONTENT_TYPE: &str = "application/json";
/// Longest zone `name`, in characters.
pub const MAX_NAME_CHARS: usize = 200;
/// Longest rating `comment`, in characters.
pub const MAX_COMMENT_CHARS: usize = 2_000;
/// Most positions (over all rings) in one zone geometry. Validation (geo's OGC check) is
/// quadratic in a ring's positions and runs on the ingest's thread: a ring of 2 000 costs
/// about 40 ms in a release build, one of 10 000 (the former limit) 1.3 s, so a broker
/// full of such zones stalled consumption for minutes.
pub const MAX_ZONE_POSITIONS: usize = 2_000;
/// Highest accepted `speed_mps` (540 km/h: nothing on a delivery round goes faster).
pub const MAX_SPEED_MPS: f64 = 150.0;
/// Highest accepted `accuracy_m` (100 km: beyond that a fix says nothing).
pub const MAX_ACCURACY_M: f64 = 100_000.0;
/// Highest accepted `dwell_seconds` (one day).
pub const MAX_DWELL_SECONDS: f64 = 86_400.0;
/// Longest value of every other string field (identifiers, timestamps, kinds, statuses,
/// `geometry.type`), in characters: the longest valid one (an RFC 3339 timestamp with
/// nanoseconds and an offset) has 35.
pub const MAX_SHORT_STRING_CHARS: usize = 64;
/// Seven days, ms: the default bound on the age of `occurred_at`, and how far `promised_by`
/// may lie from `occurred_at` either way.
pub const SEVEN_DAYS_MS: i64 = 7 * 24 * 3_600_000;

/// Longest free-text detail copied into an error (error texts travel in message headers).
const MAX_DETAIL_CHARS: usize = 200;
/// Longest piece of input quoted in an error.
const MAX_QUOTE_CHARS: usize = 64;
/// A key the strict parser adds to an object whose input repeated a key; its value names
/// the repeated key. It starts with NUL, so no sane producer sends it, and if one does the
/// event is still refused.
const DUPLICATE_KEY_MARKER: &str = "\u{0}duplicate";
/// What a lone surrogate escape (`"\ud800"`, which no Rust string can hold) is replaced by
/// before the payload is parsed again, so that the event holding it is refused by name. It
/// is the noncharacter U+FFFF, which Unicode reserves for such internal use; every
/// noncharacter is refused in input ([`is_noncharacter`]), so a producer cannot send one to
/// be mistaken for anything.
const LONE_SURROGATE_ESCAPE_MARK: &[u8] = b"\\uffff";

/// The fields every event carries.
const ENVELOPE_FIELDS: [&str; 4] = ["v", "kind", "event_id", "occurred_at"];

/// Limits of decoding that depend on the deployment rather than on the schema.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContractLimits {
    /// How far `occurred_at` may lie ahead of the receiver's clock, ms. Device clocks drift,
    /// so some skew is normal; an event from far in the future would pin last-writer-wins
    /// state forever.
    pub max_future_skew_ms: i64,
    /// How far `occurred_at` may lie behind the receiver's clock, ms. Late input is normal
    /// (a device that was offline), but an event from long ago would open an hour bucket,
    /// a delivery or a dwell clock that nothing current can close, and a timestamp such as
    /// `0001-01-01T00:00:00Z` is beyond what every store holds the same way.
    pub max_event_age_ms: i64,
    /// How far `promised_by` may lie from its event's `occurred_at`, either way, ms: a
    /// promise years away would skew the on-time rate and the delay notifications forever.
    pub max_promise_offset_ms: i64,
    /// Most events in one array message: bounds the memory one message can claim.
    pub max_events_per_message: usize,
}

impl Default for ContractLimits {
    /// Five minutes of clock skew, events up to seven days old, promises within seven days
    /// of their event, 10 000 events per message.
    fn default() -> Self {
        Self {
            max_future_skew_ms: 300_000,
            max_event_age_ms: SEVEN_DAYS_MS,
            max_promise_offset_ms: SEVEN_DAYS_MS,
            max_events_per_message: 10_000,
        }
    }
}

impl ContractLimits {
    /// The limits of `run`'s input with a maximum event age (`--max-event-age-secs`), the
    /// others as by default.
    pub fn with_max_event_age_ms(max_event_age_ms: i64) -> Self {
        Self {
            max_event_age_ms,
            ..Self::default()
        }
    }

    /// The limits for reading back events that were accepted once (hydration from the
    /// event log, replays): no bound in time at all, since an event stored a month ago was
    /// judged against the clock of its day and must still load. Everything that does not
    /// depend on the clock (strings, ranges, geometry) is judged as for new input.
    pub fn replay() -> Self {
        Self {
            max_future_skew_ms: i64::MAX,
            max_event_age_ms: i64::MAX,
            max_promise_offset_ms: i64::MAX,
            ..Self::default()
        }
    }
}

/// Why an event (or a whole message) was refused. Each variant has a stable
/// [`code`](DecodeErrorReason::code), used as metric label and dead-letter header.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum DecodeErrorReason {
    /// The payload is not JSON (whole message).
    #[error("the payload is not valid JSON: {detail}")]
    BadJson {
        /// The parser's message, with line and column.
        detail: Box<str>,
    },
    /// The message or an array element is not a JSON object.
    #[error("expected a JSON object, found {found}")]
    NotAnObject {
        /// The JSON type found.
        found: &'static str,
    },
    /// The message is an empty array.
    #[error("the message is an empty array")]
    EmptyArray,
    /// The message is an array longer than [`ContractLimits::max_events_per_message`].
    #[error("the message holds {count} events, more than the limit of {max}")]
    TooManyEvents {
        /// Array length.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// `v` is not 1.
    #[error("unsupported schema version {found}, this decoder reads version 1")]
    UnsupportedVersion {
        /// The value found, as JSON.
        found: Box<str>,
    },
    /// `kind` is not one of the six kinds.
    #[error("unknown event kind {kind:?}")]
    UnknownKind {
        /// The kind found.
        kind: Box<str>,
    },
    /// A required field is absent or null.
    #[error("missing field `{field}`")]
    MissingField {
        /// The field, with its parent for nested fields (`pickup.lat`).
        field: Box<str>,
    },
    /// A field that this kind does not have.
    #[error("unknown field `{field}`")]
    UnknownField {
        /// The field, with its parent for nested fields.
        field: Box<str>,
    },
    /// A key given twice in one object: which value was meant is unknowable.
    #[error("field `{field}` appears more than once")]
    DuplicateField {
        /// The field, with its parent for nested fields.
        field: Box<str>,
    },
    /// `kind` differs from the message's routing key.
    #[error("kind {kind:?} does not match the routing key {routing_key:?}")]
    KindMismatch {
        /// The event's kind.
        kind: Box<str>,
        /// The message's routing key.
        routing_key: Box<str>,
    },
    /// A field has the wrong JSON type or a malformed value (UUID, timestamp, enum name).
    #[error("invalid value for `{field}`: expected {expected}, found {found}")]
    InvalidValue {
        /// The field.
        field: Box<str>,
        /// What the contract wants there.
        expected: &'static str,
        /// What was there, shortened.
        found: Box<str>,
    },
    /// A latitude outside ±90° or a longitude outside ±180°.
    #[error("`{field}` = {value} is outside {range}")]
    CoordinateOutOfRange {
        /// The field (`lat`, `dropoff.lon`, `geometry.coordinates`).
        field: Box<str>,
        /// The value found.
        value: f64,
        /// The valid range.
        range: &'static str,
    },
    /// A number JSON cannot hold: `NaN`, `Infinity`, or a literal beyond the f64 range.
    #[error("non-finite number at {at}")]
    NonFiniteNumber {
        /// The field, or the position in the payload when the parser refused the number.
        at: Box<str>,
    },
    /// A number outside the range of its field (speed, heading, accuracy, dwell time).
    #[error("`{field}` = {value} is outside {range}")]
    ValueOutOfRange {
        /// The field.
        field: Box<str>,
        /// The value found.
        value: f64,
        /// The valid range.
        range: &'static str,
    },
    /// The zone geometry is not a valid GeoJSON Polygon or MultiPolygon.
    #[error("invalid zone geometry: {detail}")]
    InvalidPolygon {
        /// What is wrong, and where.
        detail: Box<str>,
    },
    /// A status that `status.changed` cannot set (`created` comes from `delivery.created`).
    #[error("status.changed cannot set status {status}")]
    StatusNotAllowed {
        /// The status asked for.
        status: Status,
    },
    /// `status` is `assigned` but no `courier_id` says to whom.
    #[error("status assigned requires `courier_id`")]
    CourierRequired,
    /// A rating score that is an integer but not 1 to 5.
    #[error("score {score} is outside 1 to 5")]
    ScoreOutOfRange {
        /// The score found.
        score: Box<str>,
    },
    /// A string longer than its bound.
    #[error("`{field}` has {chars} characters, more than the limit of {max}")]
    StringTooLong {
        /// The field.
        field: Box<str>,
        /// Its length in characters.
        chars: usize,
        /// The limit.
        max: usize,
    },
    /// A control character (Unicode category Cc: U+0000–U+001F, U+007F–U+009F) in a string
    /// field; only a rating's `comment` may hold line feeds, carriage returns and tabs.
    /// PostgreSQL cannot store NUL in text at all, and the others have no business in ids,
    /// names or timestamps.
    #[error("`{field}` holds the control character U+{code_point:04X} at character {position}")]
    ControlCharacter {
        /// The field.
        field: Box<str>,
        /// The character, as a code point.
        code_point: u32,
        /// Its position in the string, in characters from 0.
        position: usize,
    },
    /// Text that is not Unicode: a lone surrogate escape (`"\ud800"` without its pair) or a
    /// noncharacter (U+FFFE, U+FFFF, U+FDD0–U+FDEF, ...), in a string or a key, or bytes
    /// that are not UTF-8 inside a string.
    #[error("`{at}` holds a lone surrogate escape or a noncharacter, which is not Unicode text")]
    InvalidUnicode {
        /// The field (or key) holding it, or the position in the payload when no event can
        /// be read.
        at: Box<str>,
    },
    /// A timestamp further ahead of its reference than allowed: `occurred_at` ahead of the
    /// receiver's clock, `promised_by` ahead of `occurred_at`.
    #[error(
        "`{field}` is {ahead_ms} ms ahead of {reference}, more than the allowed {max_skew_ms} ms"
    )]
    TimestampInFuture {
        /// The field.
        field: Box<str>,
        /// What it is compared with (`the receiver's clock`, `occurred_at`).
        reference: &'static str,
        /// How far ahead, ms.
        ahead_ms: i64,
        /// The allowed distance, ms.
        max_skew_ms: i64,
    },
    /// A timestamp further behind its reference than allowed: `occurred_at` older than the
    /// maximum event age, `promised_by` before `occurred_at` by more than the bound.
    #[error("`{field}` is {age_ms} ms behind {reference}, more than the allowed {max_age_ms} ms")]
    TimestampTooOld {
        /// The field.
        field: Box<str>,
        /// What it is compared with (`the receiver's clock`, `occurred_at`).
        reference: &'static str,
        /// How far behind, ms.
        age_ms: i64,
        /// The allowed distance, ms.
        max_age_ms: i64,
    },
}

impl DecodeErrorReason {
    /// Every code [`code`](Self::code) can return.
    pub const ALL_CODES: [&'static str; 23] = [
        "bad_json",
        "not_an_object",
        "empty_array",
        "too_many_events",
        "unsupported_version",
        "unknown_kind",
        "missing_field",
        "unknown_field",
        "duplicate_field",
        "kind_mismatch",
        "invalid_value",
        "coordinate_out_of_range",
        "non_finite_number",
        "value_out_of_range",
        "invalid_polygon",
        "status_not_allowed",
        "courier_required",
        "score_out_of_range",
        "string_too_long",
        "control_character",
        "invalid_unicode",
        "timestamp_in_future",
        "timestamp_too_old",
    ];

    /// A stable snake_case code, for metric labels and dead-letter headers.
    pub fn code(&self) -> &'static str {
        match self {
            DecodeErrorReason::BadJson { .. } => "bad_json",
            DecodeErrorReason::NotAnObject { .. } => "not_an_object",
            DecodeErrorReason::EmptyArray => "empty_array",
            DecodeErrorReason::TooManyEvents { .. } => "too_many_events",
            DecodeErrorReason::UnsupportedVersion { .. } => "unsupported_version",
            DecodeErrorReason::UnknownKind { .. } => "unknown_kind",
            DecodeErrorReason::MissingField { .. } => "missing_field",
            DecodeErrorReason::UnknownField { .. } => "unknown_field",
            DecodeErrorReason::DuplicateField { .. } => "duplicate_field",
            DecodeErrorReason::KindMismatch { .. } => "kind_mismatch",
            DecodeErrorReason::InvalidValue { .. } => "invalid_value",
            DecodeErrorReason::CoordinateOutOfRange { .. } => "coordinate_out_of_range",
            DecodeErrorReason::NonFiniteNumber { .. } => "non_finite_number",
            DecodeErrorReason::ValueOutOfRange { .. } => "value_out_of_range",
            DecodeErrorReason::InvalidPolygon { .. } => "invalid_polygon",
            DecodeErrorReason::StatusNotAllowed { .. } => "status_not_allowed",
            DecodeErrorReason::CourierRequired => "courier_required",
            DecodeErrorReason::ScoreOutOfRange { .. } => "score_out_of_range",
            DecodeErrorReason::StringTooLong { .. } => "string_too_long",
            DecodeErrorReason::ControlCharacter { .. } => "control_character",
            DecodeErrorReason::InvalidUnicode { .. } => "invalid_unicode",
            DecodeErrorReason::TimestampInFuture { .. } => "timestamp_in_future",
            DecodeErrorReason::TimestampTooOld { .. } => "timestamp_too_old",
        }
    }
}

/// A refused event, or a refused message when `index`, `event_id` and `kind` are all unknown.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodeError {
    /// Position of the event in a JSON array message; `None` for a single-event message or
    /// a problem with the message as a whole.
    pub index: Option<usize>,
    /// The event's id, when it could be read (so a dead letter can be traced).
    pub event_id: Option<EventId>,
    /// The event's `kind` as sent, when it was a string.
    pub kind: Option<String>,
    /// Why.
    pub reason: DecodeErrorReason,
}

impl DecodeError {
    /// An error about the message as a whole.
    fn message(reason: DecodeErrorReason) -> Self {
        Self {
            index: None,
            event_id: None,
            kind: None,
            reason,
        }
    }

    /// The reason's stable code.
    pub fn code(&self) -> &'static str {
        self.reason.code()
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.index, &self.event_id, &self.kind) {
            (None, None, None) => f.write_str("message refused")?,
            (index, event_id, kind) => {
                f.write_str("event")?;
                if let Some(index) = index {
                    write!(f, " #{index}")?;
                }
                if let Some(kind) = kind {
                    write!(f, " {kind:?}")?;
                }
                if let Some(event_id) = event_id {
                    write!(f, " {event_id}")?;
                }
                f.write_str(" refused")?;
            }
        }
        write!(f, " ({}): {}", self.reason.code(), self.reason)
    }
}

impl std::error::Error for DecodeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.reason)
    }
}

/// The outcome of decoding one message: the valid events, in message order, and one error
/// per refused event (or one for the whole message).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DecodedMessage {
    /// The events that passed validation.
    pub events: Vec<Event>,
    /// The refusals, in message order.
    pub errors: Vec<DecodeError>,
}

/// One RabbitMQ message: one event object or a JSON array of events. `routing_key` is the
/// message's routing key when known (`None` = do not check). Bad elements of an array are
/// reported individually; the good ones are still returned.
///
/// Never panics, whatever the payload.
pub fn decode_message(
    routing_key: Option<&str>,
    payload: &[u8],
    now: UnixMillis,
    limits: &ContractLimits,
) -> DecodedMessage {
    let mut decoded = DecodedMessage::default();
    let value = match parse_strict(payload) {
        Ok(value) => value,
        // A lone surrogate escape fails the whole parse; marked, the payload parses and
        // only the events holding one are refused (`invalid_unicode`, naming the field).
        Err(error) => {
            match mark_lone_surrogates(payload).and_then(|marked| parse_strict(&marked).ok()) {
                Some(value) => value,
                None => {
                    decoded
                        .errors
                        .push(DecodeError::message(json_error_reason(payload, &error)));
                    return decoded;
                }
            }
        }
    };
    match value {
        Value::Array(elements) => {
            if elements.is_empty() {
                decoded
                    .errors
                    .push(DecodeError::message(DecodeErrorReason::EmptyArray));
            } else if elements.len() > limits.max_events_per_message {
                decoded
                    .errors
                    .push(DecodeError::message(DecodeErrorReason::TooManyEvents {
                        count: elements.len(),
                        max: limits.max_events_per_message,
                    }));
            } else {
                for (index, element) in elements.iter().enumerate() {
                    match decode_event(routing_key, element, now, limits) {
                        Ok(event) => decoded.events.push(event),
                        Err(mut error) => {
                            error.index = Some(index);
                            decoded.errors.push(error);
                        }
                    }
                }
            }
        }
        value => match decode_event(routing_key, &value, now, limits) {
            Ok(event) => decoded.events.push(event),
            Err(error) => decoded.errors.push(error),
        },
    }
    decoded
}

/// Decodes and validates one event object. `routing_key` as in [`decode_message`]; `now`
/// is the receiver's clock, against which `occurred_at` is checked.
///
/// # Errors
/// A [`DecodeError`] (with `index` unset) naming the first problem found.
pub fn decode_event(
    routing_key: Option<&str>,
    value: &Value,
    now: UnixMillis,
    limits: &ContractLimits,
) -> Result<Event, DecodeError> {
    let Value::Object(object) = value else {
        return Err(DecodeError::message(DecodeErrorReason::NotAnObject {
            found: json_type(value),
        }));
    };
    decode_object(routing_key, object, now, limits).map_err(|reason| DecodeError {
        index: None,
        event_id: object
            .get("event_id")
            .and_then(Value::as_str)
            .and_then(parse_uuid)
            .map(EventId),
        kind: object
            .get("kind")
            .and_then(Value::as_str)
            .map(|kind| shorten(kind, MAX_QUOTE_CHARS)),
        reason,
    })
}

/// The wire JSON of an event. For every event that [`decode_event`] can produce,
/// `decode_event(encode_event(e)) == e`. Optional fields that are `None` are left out.
pub fn encode_event(event: &Event) -> Value {
    let mut object = Map::new();
    object.insert("v".into(), Value::from(SCHEMA_VERSION));
    object.insert("kind".into(), Value::from(event.kind().as_str()));
    object.insert("event_id".into(), Value::from(event.event_id.to_string()));
    object.insert("occurred_at".into(), encode_timestamp(event.occurred_at));
    let mut put = |name: &str, value: Value| {
        object.insert(name.into(), value);
    };
    match &event.body {
        EventBody::LocationUpdated(body) => {
            put("courier_id", Value::from(body.courier_id.to_string()));
            put("lat", Value::from(body.position.lat()));
            put("lon", Value::from(body.position.lon()));
            if let Some(speed) = body.speed_mm_s {
                put("speed_mps", Value::from(f64::from(speed) / 1_000.0));
            }
            if let Some(heading) = body.heading_ddeg {
                put("heading_deg", Value::from(f64::from(heading) / 10.0));
            }
            if let Some(accuracy) = body.accuracy_cm {
                put("accuracy_m", Value::from(f64::from(accuracy) / 100.0));
            }
        }
        EventBody::DeliveryCreated(body) => {
            put("delivery_id", Value::from(body.delivery_id.to_string()));
            put("customer_id", Value::from(body.customer_id.to_string()));
            put("pickup", encode_point(body.pickup));
            put("dropoff", encode_point(body.dropoff));
            if let Some(promised_by) = body.promised_by {
                put("promised_by", encode_timestamp(promised_by));
            }
        }
        EventBody::StatusChanged(body) => {
            put("delivery_id", Value::from(body.delivery_id.to_string()));
            put("status", Value::from(body.status.as_str()));
            if let Some(courier_id) = body.courier_id {
                put("courier_id", Value::from(courier_id.to_string()));
            }
        }
        EventBody::DeliveryRated(body) => {
            put("delivery_id", Value::from(body.delivery_id.to_string()));
            put("score", Value::from(body.score));
            if let Some(comment) = &body.comment {
                put("comment", Value::from(comment.as_str()));
            }
        }
        EventBody::ZoneUpserted(body) => {
            put("zone_id", Value::from(body.zone_id.to_string()));
            put("name", Value::from(body.name.as_str()));
            put("geometry", encode_shape(&body.shape));
            if body.dwell_ms % 1_000 == 0 {
                put("dwell_seconds", Value::from(body.dwell_ms / 1_000));
            } else {
                put("dwell_seconds", Value::from(body.dwell_ms as f64 / 1_000.0));
            }
        }
        EventBody::ZoneDeleted(body) => {
            put("zone_id", Value::from(body.zone_id.to_string()));
        }
    }
    Value::Object(object)
}

/// One message holding `events` as a JSON array (also for a single event, so that a
/// consumer needs one code path).
pub fn encode_message(events: &[Event]) -> Vec<u8> {
    let array = Value::Array(events.iter().map(encode_event).collect());
    // Writing a `Value` to a `Vec` cannot fail: no I/O error, and every map key is a string.
    serde_json::to_vec(&array).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// Decoding one event
// ---------------------------------------------------------------------------------------

type Reason = DecodeErrorReason;

/// The fields of a kind, beside the envelope.
fn kind_fields(kind: EventKind) -> &'static [&'static str] {
    match kind {
        EventKind::LocationUpdated => &[
            "courier_id",
            "lat",
            "lon",
            "speed_mps",
            "heading_deg",
            "accuracy_m",
        ],
        EventKind::DeliveryCreated => &[
            "delivery_id",
            "customer_id",
            "pickup",
            "dropoff",
            "promised_by",
        ],
        EventKind::StatusChanged => &["delivery_id", "status", "courier_id"],
        EventKind::DeliveryRated => &["delivery_id", "score", "comment"],
        EventKind::ZoneUpserted => &["zone_id", "name", "geometry", "dwell_seconds"],
        EventKind::ZoneDeleted => &["zone_id"],
    }
}

fn decode_object(
    routing_key: Option<&str>,
    object: &Map<String, Value>,
    now: UnixMillis,
    limits: &ContractLimits,
) -> Result<Event, Reason> {
    let fields = Fields { object, parent: "" };
    fields.check_duplicates()?;
    // Before any field is read, so that whatever field holds it, the reason is the same.
    check_unicode(object, "")?;

    // The version first: it decides what every other field means.
    match fields.get("v") {
        None => return Err(fields.missing("v")),
        Some(v) if v.as_u64() == Some(SCHEMA_VERSION) => {}
        Some(v) => {
            return Err(Reason::UnsupportedVersion {
                found: quote(v).into(),
            });
        }
    }
    let kind_name = fields.str("kind")?;
    let kind = EventKind::from_wire(kind_name).ok_or_else(|| Reason::UnknownKind {
        kind: shorten(kind_name, MAX_QUOTE_CHARS).into(),
    })?;
    if let Some(routing_key) = routing_key
        && routing_key != kind.as_str()
    {
        return Err(Reason::KindMismatch {
            kind: kind.as_str().to_owned().into(),
            routing_key: shorten(routing_key, MAX_QUOTE_CHARS).into(),
        });
    }
    fields.only(&[&ENVELOPE_FIELDS, kind_fields(kind)])?;

    let event_id = EventId(fields.uuid("event_id")?);
    let occurred_at = fields.timestamp("occurred_at")?;
    within(
        "occurred_at",
        occurred_at,
        (now, "the receiver's clock"),
        limits.max_future_skew_ms,
        limits.max_event_age_ms,
    )?;

    let body = match kind {
        EventKind::LocationUpdated => EventBody::LocationUpdated(LocationUpdated {
            courier_id: CourierId(fields.uuid("courier_id")?),
            position: fields.position("lat", "lon")?,
            speed_mm_s: fields
                .optional_number("speed_mps")?
                .map(|speed| {
                    in_range(
                        "speed_mps",
                        speed,
                        (0.0..=MAX_SPEED_MPS).contains(&speed),
                        "0 to 150 m/s",
                    )
                    .map(|speed| (speed * 1_000.0).round() as u32)
                })
                .transpose()?,
            heading_ddeg: fields
                .optional_number("heading_deg")?
                .map(|heading| {
                    in_range(
                        "heading_deg",
                        heading,
                        (0.0..360.0).contains(&heading),
                        "0 (inclusive) to 360 (exclusive) degrees",
                    )
                    // 359.96° rounds to 360.0°, which is north again.
                    .map(|heading| ((heading * 10.0).round() as u16) % 3_600)
                })
                .transpose()?,
            accuracy_cm: fields
                .optional_number("accuracy_m")?
                .map(|accuracy| {
                    in_range(
                        "accuracy_m",
                        accuracy,
                        (0.0..=MAX_ACCURACY_M).contains(&accuracy),
                        "0 to 100000 m",
                    )
                    .map(|accuracy| (accuracy * 100.0).round() as u32)
                })
                .transpose()?,
        }),
        EventKind::DeliveryCreated => EventBody::DeliveryCreated(DeliveryCreated {
            delivery_id: DeliveryId(fields.uuid("delivery_id")?),
            customer_id: CustomerId(fields.uuid("customer_id")?),
            pickup: fields.nested("pickup")?.position("lat", "lon")?,
            dropoff: fields.nested("dropoff")?.position("lat", "lon")?,
            promised_by: fields
                .optional_timestamp("promised_by")?
                .map(|promised_by| {
                    within(
                        "promised_by",
                        promised_by,
                        (occurred_at, "occurred_at"),
                        limits.max_promise_offset_ms,
                        limits.max_promise_offset_ms,
                    )
                    .map(|()| promised_by)
                })
                .transpose()?,
        }),
        EventKind::StatusChanged => {
            let delivery_id = DeliveryId(fields.uuid("delivery_id")?);
            let name = fields.str("status")?;
            let status: Status = name.parse().map_err(|_| Reason::InvalidValue {
                field: "status".into(),
                expected: "one of assigned, picked_up, in_transit, delivered, failed, cancelled",
                found: quote_str(name).into(),
            })?;
            if status == Status::Created {
                return Err(Reason::StatusNotAllowed { status });
            }
            let courier_id = fields.optional_uuid("courier_id")?.map(CourierId);
            if status == Status::Assigned && courier_id.is_none() {
                return Err(Reason::CourierRequired);
            }
            EventBody::StatusChanged(StatusChanged {
                delivery_id,
                status,
                courier_id,
            })
        }
        EventKind::DeliveryRated => EventBody::DeliveryRated(DeliveryRated {
            delivery_id: DeliveryId(fields.uuid("delivery_id")?),
            score: fields.score("score")?,
            comment: fields.optional_string("comment", MAX_COMMENT_CHARS, COMMENT_WHITESPACE)?,
        }),
        EventKind::ZoneUpserted => {
            let zone_id = ZoneId(fields.uuid("zone_id")?);
            let name = fields.string("name", MAX_NAME_CHARS, &[])?;
            if name.trim().is_empty() {
                return Err(Reason::InvalidValue {
                    field: "name".into(),
                    expected: "a non-blank string",
                    found: quote_str(&name).into(),
                });
            }
            let shape = decode_geometry(fields.require("geometry")?)?;
            let dwell_ms = match fields.optional_number("dwell_seconds")? {
                None => 0,
                Some(seconds) => {
                    let seconds = in_range(
                        "dwell_seconds",
                        seconds,
                        (0.0..=MAX_DWELL_SECONDS).contains(&seconds),
                        "0 to 86400 seconds",
                    )?;
                    (seconds * 1_000.0).round() as i64
                }
            };
            EventBody::ZoneUpserted(ZoneUpserted {
                zone_id,
                name,
                shape,
                dwell_ms,
            })
        }
        EventKind::ZoneDeleted => EventBody::ZoneDeleted(ZoneDeleted {
            zone_id: ZoneId(fields.uuid("zone_id")?),
        }),
    };
    Ok(Event {
        event_id,
        occurred_at,
        body,
    })
}

/// Typed access to the fields of one JSON object, with errors that name the field.
struct Fields<'a> {
    object: &'a Map<String, Value>,
    /// `""` for the event itself, `"pickup."` for a nested object.
    parent: &'static str,
}

impl<'a> Fields<'a> {
    fn path(&self, name: &str) -> String {
        format!("{}{name}", self.parent)
    }

    fn missing(&self, name: &str) -> Reason {
        Reason::MissingField {
            field: self.path(name).into(),
        }
    }

    fn invalid(&self, name: &str, expected: &'static str, found: String) -> Reason {
        Reason::InvalidValue {
            field: self.path(name).into(),
            expected,
            found: found.into(),
        }
    }

    /// Refuses an object whose input repeated a key.
    fn check_duplicates(&self) -> Result<(), Reason> {
        match self.object.get(DUPLICATE_KEY_MARKER) {
            Some(Value::String(name)) => Err(Reason::DuplicateField {
                field: self.path(&shorten(name, MAX_QUOTE_CHARS)).into(),
            }),
            Some(_) => Err(Reason::UnknownField {
                field: self
                    .path(&DUPLICATE_KEY_MARKER.escape_debug().to_string())
                    .into(),
            }),
            None => Ok(()),
        }
    }

    /// Refuses a repeated key, then the first key (in sorted order) that is in none of the
    /// `allowed` lists.
    fn only(&self, allowed: &[&[&str]]) -> Result<(), Reason> {
        self.check_duplicates()?;
        let known = |key: &str| allowed.iter().any(|names| names.contains(&key));
        match self.object.keys().find(|key| !known(key)) {
            Some(key) => Err(Reason::UnknownField {
                field: self
                    .path(&shorten(key, MAX_QUOTE_CHARS).escape_debug().to_string())
                    .into(),
            }),
            None => Ok(()),
        }
    }

    /// The field's value; `None` when absent or null (the two mean the same).
    fn get(&self, name: &str) -> Option<&'a Value> {
        self.object.get(name).filter(|value| !value.is_null())
    }

    fn require(&self, name: &str) -> Result<&'a Value, Reason> {
        self.get(name).ok_or_else(|| self.missing(name))
    }

    /// A string field of at most [`MAX_SHORT_STRING_CHARS`] characters, none of them a
    /// control character.
    fn str(&self, name: &str) -> Result<&'a str, Reason> {
        self.text(name, MAX_SHORT_STRING_CHARS, &[])
    }

    /// A string field of at most `max_chars` characters, with no control character but
    /// those `allowed`.
    fn text(&self, name: &str, max_chars: usize, allowed: &[char]) -> Result<&'a str, Reason> {
        let value = self.require(name)?;
        let text = value
            .as_str()
            .ok_or_else(|| self.invalid(name, "a string", quote(value)))?;
        check_text(|| self.path(name), text, max_chars, allowed)?;
        Ok(text)
    }

    fn uuid(&self, name: &str) -> Result<Uuid, Reason> {
        let text = self.str(name)?;
        parse_uuid(text).ok_or_else(|| {
            self.invalid(
                name,
                "a UUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)",
                quote_str(text),
            )
        })
    }

    fn optional_uuid(&self, name: &str) -> Result<Option<Uuid>, Reason> {
        self.get(name).map(|_| self.uuid(name)).transpose()
    }

    fn timestamp(&self, name: &str) -> Result<UnixMillis, Reason> {
        let text = self.str(name)?;
        DateTime::parse_from_rfc3339(text)
            .map(|time| time.timestamp_millis())
            .map_err(|_| {
                self.invalid(
                    name,
                    "an RFC 3339 timestamp (2026-11-30T12:00:00Z)",
                    quote_str(text),
                )
            })
    }

    fn optional_timestamp(&self, name: &str) -> Result<Option<UnixMillis>, Reason> {
        self.get(name).map(|_| self.timestamp(name)).transpose()
    }

    fn number(&self, name: &str) -> Result<f64, Reason> {
        let value = self.require(name)?;
        let number = value
            .as_f64()
            .ok_or_else(|| self.invalid(name, "a number", quote(value)))?;
        if number.is_finite() {
            Ok(number)
        } else {
            Err(Reason::NonFiniteNumber {
                at: self.path(name).into(),
            })
        }
    }

    fn optional_number(&self, name: &str) -> Result<Option<f64>, Reason> {
        self.get(name).map(|_| self.number(name)).transpose()
    }

    fn string(&self, name: &str, max_chars: usize, allowed: &[char]) -> Result<String, Reason> {
        self.text(name, max_chars, allowed).map(str::to_owned)
    }

    fn optional_string(
        &self,
        name: &str,
        max_chars: usize,
        allowed: &[char],
    ) -> Result<Option<String>, Reason> {
        self.get(name)
            .map(|_| self.string(name, max_chars, allowed))
            .transpose()
    }

    fn score(&self, name: &str) -> Result<u8, Reason> {
        let value = self.require(name)?;
        let Value::Number(number) = value else {
            return Err(self.invalid(name, "an integer from 1 to 5", quote(value)));
        };
        if !(number.is_i64() || number.is_u64()) {
            return Err(self.invalid(name, "an integer from 1 to 5", number.to_string()));
        }
        match number.as_u64() {
            Some(score @ 1..=5) => Ok(score as u8),
            _ => Err(Reason::ScoreOutOfRange {
                score: number.to_string().into(),
            }),
        }
    }

    /// A nested `{lat, lon}` object.
    fn nested(&self, name: &'static str) -> Result<Fields<'a>, Reason> {
        let value = self.require(name)?;
        let Value::Object(object) = value else {
            return Err(self.invalid(name, "an object {\"lat\": …, \"lon\": …}", quote(value)));
        };
        let parent = match name {
            "pickup" => "pickup.",
            "dropoff" => "dropoff.",
            _ => "nested.",
        };
        let fields = Fields { object, parent };
        fields.only(&[&["lat", "lon"]])?;
        Ok(fields)
    }

    fn position(&self, lat: &str, lon: &str) -> Result<GeoPoint, Reason> {
        let lat_value = self.number(lat)?;
        let lon_value = self.number(lon)?;
        check_lat(self.path(lat), lat_value)?;
        check_lon(self.path(lon), lon_value)?;
        Ok(GeoPoint::from_degrees(lat_value, lon_value))
    }
}

/// The control characters a rating's `comment` may hold: it is free text of several lines.
const COMMENT_WHITESPACE: &[char] = &['\n', '\r', '\t'];

/// Refuses a string of more than `max_chars` characters, or one holding a control
/// character (Unicode category Cc) other than those `allowed`.
fn check_text(
    field: impl Fn() -> String,
    text: &str,
    max_chars: usize,
    allowed: &[char],
) -> Result<(), Reason> {
    let mut chars = 0;
    let mut control = None;
    for (position, c) in text.chars().enumerate() {
        chars += 1;
        if control.is_none() && c.is_control() && !allowed.contains(&c) {
            control = Some((position, c));
        }
    }
    if chars > max_chars {
        return Err(Reason::StringTooLong {
            field: field().into(),
            chars,
            max: max_chars,
        });
    }
    match control {
        Some((position, c)) => Err(Reason::ControlCharacter {
            field: field().into(),
            code_point: u32::from(c),
            position,
        }),
        None => Ok(()),
    }
}

/// A Unicode noncharacter (U+FDD0–U+FDEF, and the last two code points of every plane):
/// reserved for a process's internal use, never to be interchanged. U+FFFF is this
/// module's mark of a lone surrogate escape.
fn is_noncharacter(c: char) -> bool {
    let c = u32::from(c);
    (0xFDD0..=0xFDEF).contains(&c) || c & 0xFFFE == 0xFFFE
}

/// Refuses an object (`parent` names it: `""` for the event, `"pickup."`) any of whose keys
/// or strings, at any depth, holds a noncharacter — a marked lone surrogate among them.
fn check_unicode(object: &Map<String, Value>, parent: &str) -> Result<(), Reason> {
    for (key, value) in object {
        let path = || format!("{parent}{}", shorten(key, MAX_QUOTE_CHARS).escape_debug());
        if key.chars().any(is_noncharacter) {
            return Err(Reason::InvalidUnicode { at: path().into() });
        }
        check_value_unicode(value, &path)?;
    }
    Ok(())
}

fn check_value_unicode(value: &Value, path: &dyn Fn() -> String) -> Result<(), Reason> {
    match value {
        Value::String(text) if text.chars().any(is_noncharacter) => {
            Err(Reason::InvalidUnicode { at: path().into() })
        }
        Value::Array(items) => items
            .iter()
            .try_for_each(|item| check_value_unicode(item, path)),
        Value::Object(object) => check_unicode(object, &format!("{}.", path())),
        _ => Ok(()),
    }
}

/// Refuses a timestamp `field` = `at` further than `max_ahead` ms ahead of or `max_behind`
/// ms behind its reference (its time and its name in the error).
fn within(
    field: &str,
    at: UnixMillis,
    (reference, reference_name): (UnixMillis, &'static str),
    max_ahead: i64,
    max_behind: i64,
) -> Result<(), Reason> {
    let ahead_ms = at.saturating_sub(reference);
    if ahead_ms > max_ahead {
        return Err(Reason::TimestampInFuture {
            field: field.into(),
            reference: reference_name,
            ahead_ms,
            max_skew_ms: max_ahead,
        });
    }
    let age_ms = reference.saturating_sub(at);
    if age_ms > max_behind {
        return Err(Reason::TimestampTooOld {
            field: field.into(),
            reference: reference_name,
            age_ms,
            max_age_ms: max_behind,
        });
    }
    Ok(())
}

fn in_range(field: &str, value: f64, ok: bool, range: &'static str) -> Result<f64, Reason> {
    if ok {
        Ok(value)
    } else {
        Err(Reason::ValueOutOfRange {
            field: field.to_owned().into(),
            value,
            range,
        })
    }
}

fn check_lat(field: String, lat: f64) -> Result<(), Reason> {
    if (-90.0..=90.0).contains(&lat) {
        Ok(())
    } else {
        Err(Reason::CoordinateOutOfRange {
            field: field.into(),
            value: lat,
            range: "latitude -90 to 90",
        })
    }
}

fn check_lon(field: String, lon: f64) -> Result<(), Reason> {
    if (-180.0..=180.0).contains(&lon) {
        Ok(())
    } else {
        Err(Reason::CoordinateOutOfRange {
            field: field.into(),
            value: lon,
            range: "longitude -180 to 180",
        })
    }
}

/// Only the hyphenated form: one spelling per id keeps ids greppable across systems.
fn parse_uuid(text: &str) -> Option<Uuid> {
    if text.len() == 36 {
        Uuid::try_parse(text).ok()
    } else {
        None
    }
}

/// Parses a GeoJSON Polygon or MultiPolygon (`[lon, lat]` positions), rounds it to the
/// 1e-7 degree grid and validates it as an OGC simple feature: the `geometry` field of
/// `zone.upserted`. Public for the fuzz target and its regression test.
///
/// Never panics, whatever the value.
///
/// # Errors
/// The reason the geometry is refused (`invalid_polygon`, `out_of_range`, ...).
pub fn decode_geometry(value: &Value) -> Result<ZoneShape, DecodeErrorReason> {
    let Value::Object(object) = value else {
        return Err(Reason::InvalidValue {
            field: "geometry".into(),
            expected: "a GeoJSON Polygon or MultiPolygon object",
            found: quote(value).into(),
        });
    };
    let fields = Fields {
        object,
        parent: "geometry.",
    };
    fields.only(&[&["type", "coordinates", "bbox"]])?;
    if let Some(Value::String(_)) = object.get("type") {
        fields.str("type")?;
    }

    let geometry = geojson::Geometry::from_json_value(value.clone()).map_err(|error| {
        Reason::InvalidPolygon {
            detail: shorten(&error.to_string(), MAX_DETAIL_CHARS).into(),
        }
    })?;
    let polygons: Vec<&geojson::PolygonType> = match &geometry.value {
        geojson::Value::Polygon(polygon) => vec![polygon],
        geojson::Value::MultiPolygon(polygons) => polygons.iter().collect(),
        other => {
            return Err(Reason::InvalidPolygon {
                detail: format!(
                    "expected a Polygon or MultiPolygon, found a {}",
                    other.type_name()
                )
                .into(),
            });
        }
    };
    if polygons.is_empty() {
        return Err(Reason::InvalidPolygon {
            detail: "a MultiPolygon needs at least one polygon".into(),
        });
    }
    let positions: usize = polygons
        .iter()
        .flat_map(|rings| rings.iter())
        .map(Vec::len)
        .sum();
    if positions > MAX_ZONE_POSITIONS {
        return Err(Reason::InvalidPolygon {
            detail: format!("{positions} positions, more than the limit of {MAX_ZONE_POSITIONS}")
                .into(),
        });
    }
    for (p, rings) in polygons.iter().enumerate() {
        if rings.is_empty() {
            return Err(Reason::InvalidPolygon {
                detail: format!("polygon {p} has no exterior ring").into(),
            });
        }
        for (r, ring) in rings.iter().enumerate() {
            for position in ring {
                let [lon, lat] = position.as_slice() else {
                    return Err(Reason::InvalidPolygon {
                        detail: format!(
                            "ring {r} of polygon {p}: a position is [lon, lat], found {} numbers",
                            position.len()
                        )
                        .into(),
                    });
                };
                if !lon.is_finite() || !lat.is_finite() {
                    return Err(Reason::NonFiniteNumber {
                        at: "geometry.coordinates".into(),
                    });
                }
                check_lon("geometry.coordinates".into(), *lon)?;
                check_lat("geometry.coordinates".into(), *lat)?;
            }
            if ring.len() < 4 {
                return Err(Reason::InvalidPolygon {
                    detail: format!(
                        "ring {r} of polygon {p} has {} positions; a closed ring needs at least 4",
                        ring.len()
                    )
                    .into(),
                });
            }
            if ring.first() != ring.last() {
                return Err(Reason::InvalidPolygon {
                    detail: format!(
                        "ring {r} of polygon {p} is not closed: its first and last positions differ"
                    )
                    .into(),
                });
            }
        }
    }

    let converted = match geometry.value {
        polygon @ geojson::Value::Polygon(_) => {
            geo::Polygon::<f64>::try_from(polygon).map(|polygon| MultiPolygon(vec![polygon]))
        }
        other => MultiPolygon::<f64>::try_from(other),
    };
    let mut shape = converted.map_err(|error| Reason::InvalidPolygon {
        detail: shorten(&error.to_string(), MAX_DETAIL_CHARS).into(),
    })?;
    shape.map_coords_in_place(|coord| geo::Coord {
        x: (coord.x * E7).round() / E7,
        y: (coord.y * E7).round() / E7,
    });
    shape
        .check_validation()
        .map_err(|error| Reason::InvalidPolygon {
            detail: shorten(&error.to_string(), MAX_DETAIL_CHARS).into(),
        })?;
    Ok(ZoneShape(shape))
}

// ---------------------------------------------------------------------------------------
// Encoding helpers
// ---------------------------------------------------------------------------------------

/// RFC 3339 in UTC, with as many fraction digits as needed (none for whole seconds).
fn encode_timestamp(millis: UnixMillis) -> Value {
    match DateTime::from_timestamp_millis(millis) {
        Some(time) => Value::from(time.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
        // Beyond chrono's range (±262 000 years): no decoded event gets here. The raw number
        // keeps the information, and decoding refuses it.
        None => Value::from(millis),
    }
}

fn encode_point(point: GeoPoint) -> Value {
    let mut object = Map::new();
    object.insert("lat".into(), Value::from(point.lat()));
    object.insert("lon".into(), Value::from(point.lon()));
    Value::Object(object)
}

/// A Polygon when the shape has one, a MultiPolygon otherwise.
fn encode_shape(shape: &ZoneShape) -> Value {
    let value = match shape.0.0.as_slice() {
        [polygon] => geojson::Value::from(polygon),
        _ => geojson::Value::from(&shape.0),
    };
    Value::Object(geojson::JsonObject::from(&value))
}

// ---------------------------------------------------------------------------------------
// Parsing and error texts
// ---------------------------------------------------------------------------------------

/// Parses JSON like `serde_json::from_slice::<Value>`, except that an object with a repeated
/// key gets a [`DUPLICATE_KEY_MARKER`] entry instead of silently keeping the last value.
/// serde_json's nesting limit still applies.
fn parse_strict(payload: &[u8]) -> Result<Value, serde_json::Error> {
    serde_json::from_slice::<StrictValue>(payload).map(|strict| strict.0)
}

struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("number out of range"))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        StrictValue::deserialize(deserializer).map(|strict| strict.0)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut elements = Vec::new();
        while let Some(StrictValue(element)) = seq.next_element()? {
            elements.push(element);
        }
        Ok(Value::Array(elements))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        let mut duplicate = None;
        while let Some(key) = map.next_key::<String>()? {
            let StrictValue(value) = map.next_value()?;
            if object.insert(key.clone(), value).is_some() && duplicate.is_none() {
                duplicate = Some(key);
            }
        }
        if let Some(key) = duplicate {
            object.insert(DUPLICATE_KEY_MARKER.into(), Value::String(key));
        }
        Ok(Value::Object(object))
    }
}

/// `payload` with every lone surrogate escape inside a string (`\ud800`–`\udfff` not
/// part of a pair) replaced by [`LONE_SURROGATE_ESCAPE_MARK`]; `None` when it holds none.
/// No Rust string can hold a lone surrogate, so serde_json refuses the whole payload for
/// one; marked, it parses, and the event holding the mark is refused as `invalid_unicode`
/// with the field's name while the others of its message go on.
fn mark_lone_surrogates(payload: &[u8]) -> Option<Vec<u8>> {
    let code_unit = |at: usize| -> Option<u16> {
        match payload.get(at..at.checked_add(6)?)? {
            [b'\\', b'u', hex @ ..] => u16::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok(),
            _ => None,
        }
    };
    let high = 0xD800..0xDC00_u16;
    let low = 0xDC00..0xE000_u16;
    let mut marked = Vec::new();
    let mut copied = 0;
    let mut in_string = false;
    let mut at = 0;
    while let Some(&byte) = payload.get(at) {
        match (in_string, byte) {
            (false, b'"') => in_string = true,
            (false, _) => {}
            (true, b'"') => in_string = false,
            (true, b'\\') => {
                let lone = match code_unit(at) {
                    Some(unit) if high.contains(&unit) => match code_unit(at + 6) {
                        Some(next) if low.contains(&next) => {
                            at += 12;
                            continue;
                        }
                        _ => true,
                    },
                    Some(unit) => low.contains(&unit),
                    None => false,
                };
                if lone {
                    marked.extend_from_slice(payload.get(copied..at).unwrap_or_default());
                    marked.extend_from_slice(LONE_SURROGATE_ESCAPE_MARK);
                    at += 6;
                    copied = at;
                } else {
                    // Any other escape: skip the escaped character (it may be a quote).
                    at += 2;
                }
                continue;
            }
            (true, _) => {}
        }
        at += 1;
    }
    if marked.is_empty() {
        return None;
    }
    marked.extend_from_slice(payload.get(copied..).unwrap_or_default());
    Some(marked)
}

/// A parse error as a reason: numbers JSON cannot hold (`1e400`, `NaN`, `Infinity`) get
/// their own code, since they are a common producer bug, as does text that is not Unicode
/// (bytes that are not UTF-8 in a string, a surrogate escape that cannot be marked);
/// everything else is `bad_json`.
fn json_error_reason(payload: &[u8], error: &serde_json::Error) -> Reason {
    let message = error.to_string();
    if is_not_unicode_error(&message) {
        Reason::InvalidUnicode {
            at: format!("line {} column {}", error.line(), error.column()).into(),
        }
    } else if message.starts_with("number out of range")
        || non_finite_literal_at(payload, error.line(), error.column())
    {
        Reason::NonFiniteNumber {
            at: format!("line {} column {}", error.line(), error.column()).into(),
        }
    } else {
        Reason::BadJson {
            detail: shorten(&message, MAX_DETAIL_CHARS).into(),
        }
    }
}

/// Is this serde_json error message about text that is not Unicode — bytes that are not
/// UTF-8 in a string, a surrogate escape without its pair? (serde_json's error codes are
/// not public; its messages are stable.) The API's JSON bodies answer these as
/// `invalid_unicode` too.
pub fn is_not_unicode_error(message: &str) -> bool {
    message.contains("invalid unicode code point")
        || message.contains("lone leading surrogate in hex escape")
        || message.contains("unexpected end of hex escape")
}

/// Is the word at (1-based) `line`, `column` of `payload` a spelling of NaN or infinity?
fn non_finite_literal_at(payload: &[u8], line: usize, column: usize) -> bool {
    let line_start = if line <= 1 {
        0
    } else {
        match payload
            .iter()
            .enumerate()
            .filter(|(_, byte)| **byte == b'\n')
            .nth(line - 2)
        {
            Some((newline, _)) => newline + 1,
            None => return false,
        }
    };
    let is_word = |byte: &u8| byte.is_ascii_alphabetic() || *byte == b'-' || *byte == b'+';
    let mut start = line_start
        .saturating_add(column.saturating_sub(1))
        .min(payload.len());
    while start > line_start && payload.get(start - 1).is_some_and(is_word) {
        start -= 1;
    }
    let mut end = start;
    while payload.get(end).is_some_and(is_word) {
        end += 1;
    }
    let Some(word) = payload.get(start..end) else {
        return false;
    };
    let word = word.to_ascii_lowercase();
    let word = word
        .strip_prefix(b"-")
        .or_else(|| word.strip_prefix(b"+"))
        .unwrap_or(&word);
    matches!(word, b"nan" | b"inf" | b"infinity")
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A short rendering of a found value: scalars as JSON, containers by type.
fn quote(value: &Value) -> String {
    match value {
        Value::String(text) => quote_str(text),
        Value::Array(_) | Value::Object(_) => json_type(value).to_owned(),
        scalar => shorten(&scalar.to_string(), MAX_QUOTE_CHARS),
    }
}

fn quote_str(text: &str) -> String {
    format!("{:?}", shorten(text, MAX_QUOTE_CHARS))
}

/// At most `max` characters, with `…` when cut.
fn shorten(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        None => text.to_owned(),
        Some((cut, _)) => format!("{}…", text.get(..cut).unwrap_or_default()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const COURIER: &str = "5b1f0e0a-7a57-4f0e-8d3c-2c4b9a1e6f21";
    const DELIVERY: &str = "9d3e2a41-6c0b-4b7e-a1f2-3e4d5c6b7a80";
    const CUSTOMER: &str = "c7a1d2e3-f4a5-4b6c-9d7e-8f9a0b1c2d3e";
    const ZONE: &str = "2f6a8c1e-4b3d-4e5f-8a7b-9c0d1e2f3a4b";
    const EVENT: &str = "0b9c5f6e-3f1a-4c1e-9a43-5d2f3c1b7a10";

    /// 2026-11-30T12:00:00Z, the `occurred_at` of the samples.
    fn at_noon() -> UnixMillis {
        DateTime::parse_from_rfc3339("2026-11-30T12:00:00Z")
            .unwrap()
            .timestamp_millis()
    }

    /// The receiver's clock: one minute after the samples.
    fn now() -> UnixMillis {
        at_noon() + 60_000
    }

    fn limits() -> ContractLimits {
        ContractLimits::default()
    }

    /// A valid event of each kind, as wire JSON.
    fn sample(kind: EventKind) -> Value {
        let mut event = json!({
            "v": 1, "kind": kind.as_str(), "event_id": EVENT, "occurred_at": "2026-11-30T12:00:00Z",
        });
        let body = match kind {
            EventKind::LocationUpdated => json!({
                "courier_id": COURIER, "lat": 52.52, "lon": 13.405,
                "speed_mps": 8.1, "heading_deg": 92.5, "accuracy_m": 4.2,
            }),
            EventKind::DeliveryCreated => json!({
                "delivery_id": DELIVERY, "customer_id": CUSTOMER,
                "pickup": {"lat": 52.5208, "lon": 13.4094},
                "dropoff": {"lat": 52.5163, "lon": 13.3777},
                "promised_by": "2026-11-30T12:45:00+01:00",
            }),
            EventKind::StatusChanged => json!({
                "delivery_id": DELIVERY, "status": "assigned", "courier_id": COURIER,
            }),
            EventKind::DeliveryRated => json!({
                "delivery_id": DELIVERY, "score": 4, "comment": "Schnell und freundlich",
            }),
            EventKind::ZoneUpserted => json!({
                "zone_id": ZONE, "name": "Mitte",
                "geometry": {"type": "Polygon", "coordinates": [[
                    [13.37, 52.50], [13.43, 52.50], [13.43, 52.54], [13.37, 52.54], [13.37, 52.50]
                ]]},
                "dwell_seconds": 30,
            }),
            EventKind::ZoneDeleted => json!({"zone_id": ZONE}),
        };
        for (key, value) in body.as_object().unwrap() {
            event[key] = value.clone();
        }
        event
    }

    /// `sample(kind)` changed by `edit`.
    fn edited(kind: EventKind, edit: impl FnOnce(&mut Map<String, Value>)) -> Value {
        let mut value = sample(kind);
        edit(value.as_object_mut().unwrap());
        value
    }

    fn decode(value: &Value) -> Result<Event, DecodeError> {
        let routing_key = value.get("kind").and_then(Value::as_str);
        decode_event(routing_key, value, now(), &limits())
    }

    /// The code of the rejection of `value`; fails the test when it is accepted.
    fn code_of(value: &Value) -> &'static str {
        match decode(value) {
            Ok(event) => panic!("accepted {value}: {event:?}"),
            Err(error) => error.code(),
        }
    }

    fn message_code(payload: &[u8]) -> &'static str {
        let decoded = decode_message(None, payload, now(), &limits());
        assert!(decoded.events.is_empty(), "{decoded:?}");
        assert_eq!(decoded.errors.len(), 1, "{decoded:?}");
        assert_eq!(decoded.errors[0].index, None);
        decoded.errors[0].code()
    }

    fn uuid(text: &str) -> Uuid {
        Uuid::parse_str(text).unwrap()
    }

    #[test]
    fn accepts_a_location_update_and_quantizes_it() {
        let event = decode(&sample(EventKind::LocationUpdated)).unwrap();
        assert_eq!(event.event_id, EventId(uuid(EVENT)));
        assert_eq!(event.occurred_at, at_noon());
        let EventBody::LocationUpdated(body) = event.body else {
            panic!("{event:?}")
        };
        assert_eq!(body.courier_id, CourierId(uuid(COURIER)));
        assert_eq!(
            body.position,
            GeoPoint {
                lat_e7: 525_200_000,
                lon_e7: 134_050_000
            }
        );
        assert_eq!(body.speed_mm_s, Some(8_100));
        assert_eq!(body.heading_ddeg, Some(925));
        assert_eq!(body.accuracy_cm, Some(420));
    }

    #[test]
    fn accepts_a_delivery_creation_and_converts_offsets_to_utc() {
        let event = decode(&sample(EventKind::DeliveryCreated)).unwrap();
        let EventBody::DeliveryCreated(body) = event.body else {
            panic!("{event:?}")
        };
        assert_eq!(body.delivery_id, DeliveryId(uuid(DELIVERY)));
        assert_eq!(body.customer_id, CustomerId(uuid(CUSTOMER)));
        assert_eq!(body.pickup, GeoPoint::from_degrees(52.5208, 13.4094));
        assert_eq!(body.dropoff, GeoPoint::from_degrees(52.5163, 13.3777));
        // 12:45 at +01:00 is 11:45 UTC.
        assert_eq!(body.promised_by, Some(at_noon() - 15 * 60_000));
    }

    #[test]
    fn accepts_a_status_change() {
        let event = decode(&sample(EventKind::StatusChanged)).unwrap();
        assert_eq!(
            event.body,
            EventBody::StatusChanged(StatusChanged {
                delivery_id: DeliveryId(uuid(DELIVERY)),
                status: Status::Assigned,
                courier_id: Some(CourierId(uuid(COURIER))),
            })
        );
        let delivered = edited(EventKind::StatusChanged, |m| {
            m.insert("status".into(), json!("delivered"));
            m.remove("courier_id");
        });
        let EventBody::StatusChanged(body) = decode(&delivered).unwrap().body else {
            panic!()
        };
        assert_eq!((body.status, body.courier_id), (Status::Delivered, None));
    }

    #[test]
    fn accepts_a_rating() {
        let event = decode(&sample(EventKind::DeliveryRated)).unwrap();
        assert_eq!(
            event.body,
            EventBody::DeliveryRated(DeliveryRated {
                delivery_id: DeliveryId(uuid(DELIVERY)),
                score: 4,
                comment: Some("Schnell und freundlich".into()),
            })
        );
    }

    #[test]
    fn accepts_a_zone_polygon_and_a_multipolygon() {
        let event = decode(&sample(EventKind::ZoneUpserted)).unwrap();
        let EventBody::ZoneUpserted(body) = event.body else {
            panic!("{event:?}")
        };
        assert_eq!(body.zone_id, ZoneId(uuid(ZONE)));
        assert_eq!(body.name, "Mitte");
        assert_eq!(body.dwell_ms, 30_000);
        assert_eq!(body.shape.0.0.len(), 1);
        assert!(body.shape.contains(GeoPoint::from_degrees(52.52, 13.40)));
        assert!(!body.shape.contains(GeoPoint::from_degrees(52.52, 13.50)));

        let multi = edited(EventKind::ZoneUpserted, |m| {
            m.insert(
                "geometry".into(),
                json!({"type": "MultiPolygon", "coordinates": [
                    [[[13.0, 52.0], [13.1, 52.0], [13.1, 52.1], [13.0, 52.0]]],
                    [[[14.0, 52.0], [14.1, 52.0], [14.1, 52.1], [14.0, 52.1], [14.0, 52.0]],
                     [[14.02, 52.02], [14.08, 52.02], [14.08, 52.08], [14.02, 52.02]]]
                ]}),
            );
            m.insert("dwell_seconds".into(), json!(1.5));
        });
        let EventBody::ZoneUpserted(body) = decode(&multi).unwrap().body else {
            panic!()
        };
        assert_eq!(body.shape.0.0.len(), 2);
        assert_eq!(body.shape.0.0[1].interiors().len(), 1);
        assert_eq!(body.dwell_ms, 1_500);
    }

    #[test]
    fn accepts_a_zone_deletion() {
        let event = decode(&sample(EventKind::ZoneDeleted)).unwrap();
        assert_eq!(
            event.body,
            EventBody::ZoneDeleted(ZoneDeleted {
                zone_id: ZoneId(uuid(ZONE))
            })
        );
    }

    #[test]
    fn optional_fields_may_be_absent_or_null() {
        let bare = edited(EventKind::LocationUpdated, |m| {
            m.remove("speed_mps");
            m.insert("heading_deg".into(), Value::Null);
            m.insert("accuracy_m".into(), Value::Null);
        });
        let EventBody::LocationUpdated(body) = decode(&bare).unwrap().body else {
            panic!()
        };
        assert_eq!(
            (body.speed_mm_s, body.heading_ddeg, body.accuracy_cm),
            (None, None, None)
        );
        let zone = edited(EventKind::ZoneUpserted, |m| {
            m.insert("dwell_seconds".into(), Value::Null);
        });
        let EventBody::ZoneUpserted(body) = decode(&zone).unwrap().body else {
            panic!()
        };
        assert_eq!(body.dwell_ms, 0);
    }

    #[test]
    fn quantization_rounds_and_wraps() {
        let value = edited(EventKind::LocationUpdated, |m| {
            m.insert("lat".into(), json!(52.520_000_04));
            m.insert("heading_deg".into(), json!(359.97));
            m.insert("speed_mps".into(), json!(0));
        });
        let EventBody::LocationUpdated(body) = decode(&value).unwrap().body else {
            panic!()
        };
        assert_eq!(body.position.lat_e7, 525_200_000);
        assert_eq!(body.heading_ddeg, Some(0));
        assert_eq!(body.speed_mm_s, Some(0));

        let zone = edited(EventKind::ZoneUpserted, |m| {
            m["geometry"]["coordinates"][0][2] = json!([13.430_000_049, 52.540_000_01]);
        });
        let EventBody::ZoneUpserted(body) = decode(&zone).unwrap().body else {
            panic!()
        };
        let corner = body.shape.0.0[0].exterior().0[2];
        assert_eq!((corner.x, corner.y), (13.43, 52.54));
    }

    #[test]
    fn the_routing_key_is_checked_only_when_given() {
        let value = sample(EventKind::ZoneDeleted);
        assert!(decode_event(None, &value, now(), &limits()).is_ok());
        let error = decode_event(Some("zone.upserted"), &value, now(), &limits()).unwrap_err();
        assert_eq!(error.code(), "kind_mismatch");
        assert_eq!(error.kind.as_deref(), Some("zone.deleted"));
        assert_eq!(error.event_id, Some(EventId(uuid(EVENT))));
    }

    #[test]
    fn the_clock_skew_limit_is_inclusive_and_configurable() {
        let value = edited(EventKind::ZoneDeleted, |m| {
            m.insert("occurred_at".into(), json!("2026-11-30T12:06:00Z"));
        });
        // Exactly five minutes ahead of `now`: accepted.
        assert!(decode(&value).is_ok());
        let strict = ContractLimits {
            max_future_skew_ms: 0,
            ..ContractLimits::default()
        };
        let error = decode_event(None, &value, now(), &strict).unwrap_err();
        assert_eq!(
            error.reason,
            DecodeErrorReason::TimestampInFuture {
                field: "occurred_at".into(),
                reference: "the receiver's clock",
                ahead_ms: 300_000,
                max_skew_ms: 0
            }
        );
    }

    #[test]
    fn the_age_limit_is_inclusive_configurable_and_off_for_replays() {
        let at = |text: &str| {
            edited(EventKind::ZoneDeleted, |m| {
                m.insert("occurred_at".into(), json!(text));
            })
        };
        // `now()` is 2026-11-30T12:01:00Z: exactly seven days back is accepted.
        assert!(decode(&at("2026-11-23T12:01:00Z")).is_ok());
        let error = decode(&at("2026-11-23T12:00:59.999Z")).unwrap_err();
        assert_eq!(
            error.reason,
            DecodeErrorReason::TimestampTooOld {
                field: "occurred_at".into(),
                reference: "the receiver's clock",
                age_ms: SEVEN_DAYS_MS + 1,
                max_age_ms: SEVEN_DAYS_MS
            }
        );
        assert_eq!(
            code_of(&at("0001-01-01T00:00:00Z")),
            "timestamp_too_old",
            "the first instant of the calendar"
        );
        let hour = ContractLimits::with_max_event_age_ms(3_600_000);
        let old = at("2026-11-30T10:00:00Z");
        assert!(decode(&old).is_ok());
        assert_eq!(
            decode_event(None, &old, now(), &hour).unwrap_err().code(),
            "timestamp_too_old"
        );
        // Events read back from the log were judged against the clock of their day.
        for old in ["0001-01-01T00:00:00Z", "1999-12-31T23:59:59Z"] {
            assert!(decode_event(None, &at(old), now(), &ContractLimits::replay()).is_ok());
        }
        let future = at("2030-01-01T00:00:00Z");
        assert!(decode_event(None, &future, now(), &ContractLimits::replay()).is_ok());
    }

    #[test]
    fn a_promise_lies_within_seven_days_of_its_event() {
        let promised = |text: &str| {
            edited(EventKind::DeliveryCreated, |m| {
                m.insert("promised_by".into(), json!(text));
            })
        };
        // The samples happen at 2026-11-30T12:00:00Z.
        assert!(decode(&promised("2026-12-07T12:00:00Z")).is_ok());
        assert!(decode(&promised("2026-11-23T12:00:00Z")).is_ok());
        let error = decode(&promised("2026-12-07T12:00:00.001Z")).unwrap_err();
        assert_eq!(
            error.reason,
            DecodeErrorReason::TimestampInFuture {
                field: "promised_by".into(),
                reference: "occurred_at",
                ahead_ms: SEVEN_DAYS_MS + 1,
                max_skew_ms: SEVEN_DAYS_MS
            }
        );
        assert!(error.to_string().contains("promised_by"), "{error}");
        let error = decode(&promised("0001-01-01T00:00:00Z")).unwrap_err();
        assert_eq!(error.code(), "timestamp_too_old");
        assert!(error.to_string().contains("promised_by"), "{error}");
        assert!(
            decode_event(
                None,
                &promised("2099-01-01T00:00:00Z"),
                now(),
                &ContractLimits::replay()
            )
            .is_ok()
        );
    }

    /// Every string field of every kind: `(kind, field)`, nested fields with their parent.
    const STRING_FIELDS: [(EventKind, &str); 19] = [
        (EventKind::LocationUpdated, "courier_id"),
        (EventKind::DeliveryCreated, "delivery_id"),
        (EventKind::DeliveryCreated, "customer_id"),
        (EventKind::DeliveryCreated, "promised_by"),
        (EventKind::StatusChanged, "delivery_id"),
        (EventKind::StatusChanged, "status"),
        (EventKind::StatusChanged, "courier_id"),
        (EventKind::DeliveryRated, "delivery_id"),
        (EventKind::DeliveryRated, "comment"),
        (EventKind::ZoneUpserted, "zone_id"),
        (EventKind::ZoneUpserted, "name"),
        (EventKind::ZoneUpserted, "geometry.type"),
        (EventKind::ZoneDeleted, "zone_id"),
        // The envelope, in two kinds (it is read by the same code for all six).
        (EventKind::LocationUpdated, "kind"),
        (EventKind::LocationUpdated, "event_id"),
        (EventKind::LocationUpdated, "occurred_at"),
        (EventKind::ZoneUpserted, "kind"),
        (EventKind::ZoneUpserted, "event_id"),
        (EventKind::ZoneUpserted, "occurred_at"),
    ];

    /// The sample of `kind` with the string `field` (`geometry.type` for a nested one) set
    /// to `text`.
    fn with_string(kind: EventKind, field: &str, text: &str) -> Value {
        let mut value = sample(kind);
        match field.split_once('.') {
            Some((parent, child)) => value[parent][child] = json!(text),
            None => value[field] = json!(text),
        }
        value
    }

    /// The sample of `kind` with `field`'s valid value given a character `extra` in the
    /// middle: a string that would pass but for that character.
    fn with_char_inside(kind: EventKind, field: &str, extra: &str) -> Value {
        let value = sample(kind);
        let valid = match field.split_once('.') {
            Some((parent, child)) => value[parent][child].as_str().unwrap().to_owned(),
            None => value[field].as_str().unwrap().to_owned(),
        };
        let (head, tail) = valid.split_at(valid.len() / 2);
        with_string(kind, field, &format!("{head}{extra}{tail}"))
    }

    /// The one error of decoding `payload` as a message whose routing key is the kind.
    fn message_error(kind: EventKind, payload: &[u8]) -> DecodeError {
        let decoded = decode_message(Some(kind.as_str()), payload, now(), &limits());
        assert!(decoded.events.is_empty(), "{decoded:?}");
        assert_eq!(decoded.errors.len(), 1, "{decoded:?}");
        decoded.errors[0].clone()
    }

    #[test]
    fn every_string_field_refuses_a_nul() {
        for (kind, field) in STRING_FIELDS {
            let value = with_char_inside(kind, field, "\u{0}");
            let payload = serde_json::to_vec(&value).unwrap();
            assert!(
                payload.windows(6).any(|w| w == b"\\u0000"),
                "serde_json writes NUL as an escape"
            );
            let error = message_error(kind, &payload);
            assert_eq!(
                error.reason.code(),
                "control_character",
                "{kind} {field}: {error}"
            );
            let DecodeErrorReason::ControlCharacter {
                field: named,
                code_point,
                ..
            } = &error.reason
            else {
                unreachable!()
            };
            assert_eq!((&**named, *code_point), (field, 0), "{kind} {field}");
        }
    }

    #[test]
    fn every_string_field_refuses_a_lone_surrogate_escape_by_name() {
        for (kind, field) in STRING_FIELDS {
            for escape in ["\\ud800", "\\udfff", "\\udbff\\u0041", "\\ud83d"] {
                let value = with_char_inside(kind, field, "@@@");
                let text = serde_json::to_string(&value).unwrap();
                assert_eq!(text.matches("@@@").count(), 1);
                let payload = text.replace("@@@", escape);
                assert!(
                    serde_json::from_str::<Value>(&payload).is_err(),
                    "serde_json refuses {payload}"
                );
                let error = message_error(kind, payload.as_bytes());
                assert_eq!(
                    error.reason,
                    DecodeErrorReason::InvalidUnicode { at: field.into() },
                    "{kind} {field} {escape}: {error}"
                );
                // The event is still named: it can be traced from its dead letter.
                if field != "event_id" {
                    assert_eq!(error.event_id, Some(EventId(uuid(EVENT))), "{field}");
                }
            }
        }
    }

    #[test]
    fn every_string_field_refuses_a_mebibyte() {
        let huge = "x".repeat(1 << 20);
        for (kind, field) in STRING_FIELDS {
            let value = with_string(kind, field, &huge);
            let payload = serde_json::to_vec(&value).unwrap();
            let error = message_error(kind, &payload);
            let max = match field {
                "comment" => MAX_COMMENT_CHARS,
                "name" => MAX_NAME_CHARS,
                _ => MAX_SHORT_STRING_CHARS,
            };
            assert_eq!(
                error.reason,
                DecodeErrorReason::StringTooLong {
                    field: field.into(),
                    chars: 1 << 20,
                    max
                },
                "{kind} {field}"
            );
            assert!(error.to_string().len() < 400, "{error}");
        }
    }

    #[test]
    fn only_a_comment_holds_line_breaks_and_tabs() {
        let comment = with_string(
            EventKind::DeliveryRated,
            "comment",
            "Line one,\r\nline two\tand a tab.",
        );
        let EventBody::DeliveryRated(rated) = decode(&comment).unwrap().body else {
            panic!()
        };
        assert_eq!(
            rated.comment.as_deref(),
            Some("Line one,\r\nline two\tand a tab.")
        );
        for other in ["\u{7}", "\u{1b}[31m", "\u{7f}", "\u{85}", "\u{9f}"] {
            let comment = with_string(EventKind::DeliveryRated, "comment", &format!("a{other}"));
            assert_eq!(code_of(&comment), "control_character", "{other:?}");
        }
        for whitespace in ["\n", "\r", "\t"] {
            let name = with_string(
                EventKind::ZoneUpserted,
                "name",
                &format!("Mitte{whitespace}"),
            );
            assert_eq!(code_of(&name), "control_character", "{whitespace:?}");
        }
        // Other Unicode is text: letters of any script, emoji, a zero-width joiner.
        let name = with_string(
            EventKind::ZoneUpserted,
            "name",
            "Zentrum 🚲 Ünter‍den Linden",
        );
        assert!(decode(&name).is_ok());
    }

    #[test]
    fn noncharacters_and_marked_surrogates_are_refused_anywhere_by_name() {
        for noncharacter in ["\u{ffff}", "\u{fffe}", "\u{fdd0}", "\u{10ffff}"] {
            let comment = with_string(EventKind::DeliveryRated, "comment", noncharacter);
            assert_eq!(
                decode(&comment).unwrap_err().reason,
                DecodeErrorReason::InvalidUnicode {
                    at: "comment".into()
                }
            );
        }
        // In a key, and in a field that is not a string at all.
        let payloads: [(&str, &str, &str); 3] = [
            (r#""v":1"#, r#""\ud800x":1,"v":1"#, "\\u{ffff}x"),
            (r#""v":1"#, r#""dwell":"\udc00","v":1"#, "dwell"),
            (
                r#""lon":13.4094"#,
                r#""lon":13.4094,"\ud800":1"#,
                "pickup.\\u{ffff}",
            ),
        ];
        for (from, to, at) in payloads {
            let text = serde_json::to_string(&sample(EventKind::DeliveryCreated))
                .unwrap()
                .replace(from, to);
            let error = message_error(EventKind::DeliveryCreated, text.as_bytes());
            assert_eq!(
                error.reason,
                DecodeErrorReason::InvalidUnicode { at: at.into() },
                "{text}"
            );
        }
        // A pair of surrogate escapes is one character, and fine.
        let text = serde_json::to_string(&with_string(EventKind::DeliveryRated, "comment", "@@@"))
            .unwrap()
            .replace("@@@", "\\ud83d\\udeb2");
        let decoded = decode_message(None, text.as_bytes(), now(), &limits());
        assert!(decoded.errors.is_empty(), "{decoded:?}");
        let EventBody::DeliveryRated(rated) = &decoded.events[0].body else {
            panic!()
        };
        assert_eq!(rated.comment.as_deref(), Some("🚲"));
    }

    #[test]
    fn a_lone_surrogate_refuses_only_its_own_event_of_an_array() {
        let good = serde_json::to_string(&sample(EventKind::DeliveryRated)).unwrap();
        let bad = serde_json::to_string(&with_string(EventKind::DeliveryRated, "comment", "@@@"))
            .unwrap()
            .replace("@@@", "\\ud800");
        // A quote and a backslash escaped before the surrogate do not confuse the marking.
        let tricky =
            serde_json::to_string(&with_string(EventKind::DeliveryRated, "comment", "\"\\@@@"))
                .unwrap()
                .replace("@@@", "\\udfff");
        let payload = format!("[{good},{bad},{good},{tricky}]");
        let decoded = decode_message(Some("delivery.rated"), payload.as_bytes(), now(), &limits());
        assert_eq!(decoded.events.len(), 2);
        let report: Vec<_> = decoded.errors.iter().map(|e| (e.index, e.code())).collect();
        assert_eq!(
            report,
            vec![(Some(1), "invalid_unicode"), (Some(3), "invalid_unicode")]
        );
        // Bytes that are not UTF-8 inside a string refuse the message, as not Unicode.
        let mut bytes = good.into_bytes();
        let at = bytes.windows(6).position(|w| w == b"Schnel").unwrap();
        bytes[at] = 0xff;
        let error = message_error(EventKind::DeliveryRated, &bytes);
        assert_eq!(error.code(), "invalid_unicode", "{error}");
        assert_eq!(error.index, None);
    }

    /// Every rejection reason, each from a minimal bad input.
    #[test]
    fn every_rejection_has_its_code() {
        use EventKind::*;
        let set = |kind: EventKind, field: &str, value: Value| {
            let field = field.to_owned();
            edited(kind, move |m| {
                m.insert(field, value);
            })
        };
        let remove = |kind: EventKind, field: &str| {
            let field = field.to_owned();
            edited(kind, move |m| {
                m.remove(&field);
            })
        };
        let ring = |coordinates: Value| {
            set(
                ZoneUpserted,
                "geometry",
                json!({"type": "Polygon", "coordinates": coordinates}),
            )
        };
        let cases: Vec<(Value, &str)> = vec![
            (json!([1, 2]), "not_an_object"),
            (json!("location.updated"), "not_an_object"),
            (set(ZoneDeleted, "v", json!(2)), "unsupported_version"),
            (set(ZoneDeleted, "v", json!("1")), "unsupported_version"),
            (set(ZoneDeleted, "v", json!(1.5)), "unsupported_version"),
            (remove(ZoneDeleted, "v"), "missing_field"),
            (
                set(ZoneDeleted, "kind", json!("zone.renamed")),
                "unknown_kind",
            ),
            (set(ZoneDeleted, "kind", json!(7)), "invalid_value"),
            (remove(LocationUpdated, "courier_id"), "missing_field"),
            (set(LocationUpdated, "lat", Value::Null), "missing_field"),
            (remove(DeliveryCreated, "dropoff"), "missing_field"),
            (
                set(DeliveryCreated, "pickup", json!({"lat": 52.5})),
                "missing_field",
            ),
            (set(LocationUpdated, "altitude", json!(34)), "unknown_field"),
            (set(ZoneDeleted, "name", json!("Mitte")), "unknown_field"),
            (
                set(
                    DeliveryCreated,
                    "pickup",
                    json!({"lat": 52.5, "lon": 13.4, "alt": 3}),
                ),
                "unknown_field",
            ),
            (
                set(
                    ZoneUpserted,
                    "geometry",
                    json!({"type": "Polygon", "coordinates": [], "crs": 1}),
                ),
                "unknown_field",
            ),
            (
                set(ZoneDeleted, "event_id", json!("not-a-uuid")),
                "invalid_value",
            ),
            (
                set(
                    ZoneDeleted,
                    "event_id",
                    json!("0b9c5f6e3f1a4c1e9a435d2f3c1b7a10"),
                ),
                "invalid_value",
            ),
            (
                set(LocationUpdated, "courier_id", json!(12)),
                "invalid_value",
            ),
            (
                set(ZoneDeleted, "occurred_at", json!("2026-11-30 12:00")),
                "invalid_value",
            ),
            (
                set(ZoneDeleted, "occurred_at", json!(1_764_504_000_000_i64)),
                "invalid_value",
            ),
            (
                set(DeliveryCreated, "promised_by", json!("tomorrow")),
                "invalid_value",
            ),
            (set(LocationUpdated, "lat", json!("52.52")), "invalid_value"),
            (
                set(DeliveryCreated, "pickup", json!([52.5, 13.4])),
                "invalid_value",
            ),
            (set(StatusChanged, "status", json!("lost")), "invalid_value"),
            (set(DeliveryRated, "score", json!(4.5)), "invalid_value"),
            (set(DeliveryRated, "score", json!("5")), "invalid_value"),
            (set(ZoneUpserted, "name", json!("   ")), "invalid_value"),
            (
                set(
                    ZoneUpserted,
                    "geometry",
                    json!("POLYGON((0 0, 1 0, 1 1, 0 0))"),
                ),
                "invalid_value",
            ),
            (
                set(LocationUpdated, "lat", json!(90.000_001)),
                "coordinate_out_of_range",
            ),
            (
                set(LocationUpdated, "lon", json!(-180.5)),
                "coordinate_out_of_range",
            ),
            (
                set(DeliveryCreated, "dropoff", json!({"lat": -91, "lon": 0})),
                "coordinate_out_of_range",
            ),
            (
                ring(json!([[
                    [13.0, 52.0],
                    [200.0, 52.0],
                    [13.1, 52.1],
                    [13.0, 52.0]
                ]])),
                "coordinate_out_of_range",
            ),
            (
                ring(json!([[
                    [13.0, 95.0],
                    [13.1, 52.0],
                    [13.1, 52.1],
                    [13.0, 95.0]
                ]])),
                "coordinate_out_of_range",
            ),
            (
                set(LocationUpdated, "speed_mps", json!(-0.1)),
                "value_out_of_range",
            ),
            (
                set(LocationUpdated, "speed_mps", json!(150.1)),
                "value_out_of_range",
            ),
            (
                set(LocationUpdated, "heading_deg", json!(360)),
                "value_out_of_range",
            ),
            (
                set(LocationUpdated, "accuracy_m", json!(-1)),
                "value_out_of_range",
            ),
            (
                set(ZoneUpserted, "dwell_seconds", json!(-5)),
                "value_out_of_range",
            ),
            (
                set(ZoneUpserted, "dwell_seconds", json!(1e12)),
                "value_out_of_range",
            ),
            (
                ring(json!([[
                    [13.0, 52.0],
                    [13.1, 52.0],
                    [13.1, 52.1],
                    [13.0, 52.1]
                ]])),
                "invalid_polygon",
            ),
            (
                ring(json!([[[13.0, 52.0], [13.1, 52.0], [13.0, 52.0]]])),
                "invalid_polygon",
            ),
            (
                ring(json!([[
                    [13.0, 52.0],
                    [13.1, 52.1],
                    [13.1, 52.0],
                    [13.0, 52.1],
                    [13.0, 52.0]
                ]])),
                "invalid_polygon",
            ),
            (
                ring(json!([[
                    [13.0, 52.0],
                    [13.1, 52.0],
                    [13.1, 52.0],
                    [13.0, 52.0]
                ]])),
                "invalid_polygon",
            ),
            (ring(json!([])), "invalid_polygon"),
            (
                ring(json!([[
                    [13.0, 52.0, 30.0],
                    [13.1, 52.0, 30.0],
                    [13.1, 52.1, 30.0],
                    [13.0, 52.0, 30.0]
                ]])),
                "invalid_polygon",
            ),
            (
                ring(json!([[
                    [13.0, 52.0],
                    [13.1, 52.0],
                    ["x", 52.1],
                    [13.0, 52.0]
                ]])),
                "invalid_polygon",
            ),
            (
                set(
                    ZoneUpserted,
                    "geometry",
                    json!({"type": "Point", "coordinates": [13.0, 52.0]}),
                ),
                "invalid_polygon",
            ),
            (
                set(
                    ZoneUpserted,
                    "geometry",
                    json!({"type": "MultiPolygon", "coordinates": []}),
                ),
                "invalid_polygon",
            ),
            (
                set(ZoneUpserted, "geometry", json!({"coordinates": []})),
                "invalid_polygon",
            ),
            (
                set(StatusChanged, "status", json!("created")),
                "status_not_allowed",
            ),
            (remove(StatusChanged, "courier_id"), "courier_required"),
            (
                set(StatusChanged, "courier_id", Value::Null),
                "courier_required",
            ),
            (set(DeliveryRated, "score", json!(0)), "score_out_of_range"),
            (set(DeliveryRated, "score", json!(6)), "score_out_of_range"),
            (set(DeliveryRated, "score", json!(-3)), "score_out_of_range"),
            (
                set(ZoneUpserted, "name", json!("x".repeat(201))),
                "string_too_long",
            ),
            (
                set(DeliveryRated, "comment", json!("é".repeat(2_001))),
                "string_too_long",
            ),
            (
                set(
                    ZoneDeleted,
                    "occurred_at",
                    json!("2026-11-30T12:06:00.001Z"),
                ),
                "timestamp_in_future",
            ),
            (
                set(ZoneDeleted, "occurred_at", json!("2030-01-01T00:00:00Z")),
                "timestamp_in_future",
            ),
            (
                set(
                    DeliveryCreated,
                    "promised_by",
                    json!("2027-11-30T12:00:00Z"),
                ),
                "timestamp_in_future",
            ),
            (
                set(ZoneDeleted, "occurred_at", json!("0001-01-01T00:00:00Z")),
                "timestamp_too_old",
            ),
            (
                set(
                    DeliveryCreated,
                    "promised_by",
                    json!("2025-11-30T12:00:00Z"),
                ),
                "timestamp_too_old",
            ),
            (
                set(DeliveryRated, "comment", json!("a\u{0}b")),
                "control_character",
            ),
            (
                set(ZoneUpserted, "name", json!("Mitte\u{1b}[2J")),
                "control_character",
            ),
            (
                set(ZoneUpserted, "name", json!("Mitte\u{ffff}")),
                "invalid_unicode",
            ),
            (
                set(ZoneDeleted, "event_id", json!("x".repeat(65))),
                "string_too_long",
            ),
        ];
        let mut seen = std::collections::BTreeSet::new();
        for (value, expected) in &cases {
            assert_eq!(code_of(value), *expected, "{value}");
            seen.insert(*expected);
        }
        // Strings at their limit pass.
        assert!(decode(&set(ZoneUpserted, "name", json!("ü".repeat(200)))).is_ok());
        assert!(decode(&set(DeliveryRated, "comment", json!("x".repeat(2_000)))).is_ok());

        let mismatch = decode_event(
            Some("location.updated"),
            &sample(ZoneDeleted),
            now(),
            &limits(),
        );
        assert_eq!(mismatch.unwrap_err().code(), "kind_mismatch");
        seen.insert("kind_mismatch");

        // The codes only a whole message can produce.
        let message_cases: Vec<(&[u8], &str)> = vec![
            (b"{\"v\":1,", "bad_json"),
            (b"", "bad_json"),
            (b"\xff\xfe", "bad_json"),
            (b"[]", "empty_array"),
            (b"17", "not_an_object"),
            (br#"{"v":1,"kind":"zone.deleted","v":1}"#, "duplicate_field"),
            (br#"{"v":1,"lat":1e400}"#, "non_finite_number"),
            (br#"{"v":1,"lat":-1e400}"#, "non_finite_number"),
            (br#"{"v":1,"lat":NaN}"#, "non_finite_number"),
            (br#"{"v":1,"lat":nan}"#, "non_finite_number"),
            (br#"{"v":1,"lat":Infinity}"#, "non_finite_number"),
            (b"{\"v\":1,\n\"lat\":-Infinity}", "non_finite_number"),
            (br#"{"v":1,"lat":tru}"#, "bad_json"),
            (b"{\"v\":1,\"name\":\"\xff\"}", "invalid_unicode"),
        ];
        for (payload, expected) in &message_cases {
            assert_eq!(
                message_code(payload),
                *expected,
                "{}",
                String::from_utf8_lossy(payload)
            );
            seen.insert(*expected);
        }
        let three = encode_message(&vec![event_of(&sample(ZoneDeleted)); 3]);
        let few = ContractLimits {
            max_events_per_message: 2,
            ..ContractLimits::default()
        };
        let decoded = decode_message(None, &three, now(), &few);
        assert!(decoded.events.is_empty());
        assert_eq!(decoded.errors.len(), 1);
        assert_eq!(
            decoded.errors[0].reason,
            DecodeErrorReason::TooManyEvents { count: 3, max: 2 }
        );
        seen.insert(decoded.errors[0].code());

        let all: std::collections::BTreeSet<_> = DecodeErrorReason::ALL_CODES.into_iter().collect();
        assert_eq!(
            seen, all,
            "every code is produced by some input, and no other"
        );
    }

    #[test]
    fn non_finite_numbers_in_a_value_are_refused_too() {
        // A `Value` cannot hold NaN (serde_json turns it into null), so a value built in code
        // reaches the decoder as a missing field at worst, never as NaN.
        let value = edited(EventKind::LocationUpdated, |m| {
            m.insert("lat".into(), Value::from(f64::NAN));
        });
        assert_eq!(code_of(&value), "missing_field");
        let value = edited(EventKind::LocationUpdated, |m| {
            m.insert("speed_mps".into(), Value::from(f64::INFINITY));
        });
        // Null optional = absent: accepted without a speed.
        assert!(decode(&value).is_ok());
    }

    #[test]
    fn duplicate_keys_are_named_even_when_nested() {
        let payload = br#"[{"v":1,"kind":"delivery.created","event_id":"0b9c5f6e-3f1a-4c1e-9a43-5d2f3c1b7a10",
            "occurred_at":"2026-11-30T12:00:00Z","delivery_id":"9d3e2a41-6c0b-4b7e-a1f2-3e4d5c6b7a80",
            "customer_id":"c7a1d2e3-f4a5-4b6c-9d7e-8f9a0b1c2d3e",
            "pickup":{"lat":52.5,"lon":13.4,"lat":52.6},"dropoff":{"lat":52.5,"lon":13.4}}]"#;
        let decoded = decode_message(Some("delivery.created"), payload, now(), &limits());
        assert_eq!(decoded.errors.len(), 1);
        assert_eq!(
            decoded.errors[0].reason,
            DecodeErrorReason::DuplicateField {
                field: "pickup.lat".into()
            }
        );
        assert_eq!(decoded.errors[0].index, Some(0));
        assert_eq!(decoded.errors[0].event_id, Some(EventId(uuid(EVENT))));
    }

    #[test]
    fn reasons_name_the_field() {
        let error = decode(&edited(EventKind::LocationUpdated, |m| {
            m.insert("satellites".into(), json!(9));
        }))
        .unwrap_err();
        assert_eq!(
            error.reason,
            DecodeErrorReason::UnknownField {
                field: "satellites".into()
            }
        );
        let error = decode(&edited(EventKind::DeliveryCreated, |m| {
            m.insert("dropoff".into(), json!({"lat": 52.5, "lon": 181}));
        }))
        .unwrap_err();
        assert_eq!(
            error.reason,
            DecodeErrorReason::CoordinateOutOfRange {
                field: "dropoff.lon".into(),
                value: 181.0,
                range: "longitude -180 to 180"
            }
        );
        let text = error.to_string();
        assert!(
            text.contains("coordinate_out_of_range") && text.contains("dropoff.lon"),
            "{text}"
        );
        assert!(
            text.contains(EVENT) && text.contains("delivery.created"),
            "{text}"
        );
        let long = "z".repeat(10_000);
        let error = decode(&edited(EventKind::ZoneDeleted, |m| {
            m.insert("kind".into(), json!(long));
        }))
        .unwrap_err();
        assert!(
            error.to_string().len() < 400,
            "error texts stay short: {error}"
        );
    }

    #[test]
    fn an_array_reports_only_its_bad_events_with_their_index() {
        let events = vec![
            sample(EventKind::LocationUpdated),
            edited(EventKind::LocationUpdated, |m| {
                m.insert("lat".into(), json!(123));
            }),
            sample(EventKind::LocationUpdated),
            json!(null),
            edited(EventKind::LocationUpdated, |m| {
                m.insert("kind".into(), json!("zone.deleted"));
            }),
            sample(EventKind::LocationUpdated),
        ];
        let payload = serde_json::to_vec(&events).unwrap();
        let decoded = decode_message(Some("location.updated"), &payload, now(), &limits());
        assert_eq!(decoded.events.len(), 3);
        let report: Vec<_> = decoded.errors.iter().map(|e| (e.index, e.code())).collect();
        assert_eq!(
            report,
            vec![
                (Some(1), "coordinate_out_of_range"),
                (Some(3), "not_an_object"),
                (Some(4), "kind_mismatch")
            ]
        );
        assert_eq!(decoded.errors[0].event_id, Some(EventId(uuid(EVENT))));
        assert_eq!(decoded.errors[1].event_id, None);
    }

    fn event_of(value: &Value) -> Event {
        decode(value).unwrap()
    }

    #[test]
    fn every_kind_round_trips() {
        for kind in EventKind::ALL {
            let event = event_of(&sample(kind));
            let wire = encode_event(&event);
            assert_eq!(decode(&wire).unwrap(), event, "{wire}");
            let decoded = decode_message(
                Some(kind.as_str()),
                &encode_message(std::slice::from_ref(&event)),
                now(),
                &limits(),
            );
            assert_eq!(
                decoded,
                DecodedMessage {
                    events: vec![event],
                    errors: vec![]
                }
            );
        }
        // A single object message decodes too.
        let single = serde_json::to_vec(&sample(EventKind::ZoneDeleted)).unwrap();
        assert_eq!(
            decode_message(None, &single, now(), &limits()).events.len(),
            1
        );
    }

    #[test]
    fn encoding_uses_the_documented_forms() {
        let wire = encode_event(&event_of(&sample(EventKind::ZoneUpserted)));
        assert_eq!(wire["occurred_at"], json!("2026-11-30T12:00:00Z"));
        assert_eq!(wire["geometry"]["type"], json!("Polygon"));
        assert_eq!(wire["dwell_seconds"], json!(30));
        let wire = encode_event(&event_of(&sample(EventKind::DeliveryCreated)));
        assert_eq!(wire["promised_by"], json!("2026-11-30T11:45:00Z"));
        assert_eq!(wire["pickup"], json!({"lat": 52.5208, "lon": 13.4094}));
    }

    fn docs() -> String {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/events.md");
        std::fs::read_to_string(path).expect("docs/events.md exists")
    }

    /// The ```json blocks of a markdown text.
    fn json_blocks(markdown: &str) -> Vec<String> {
        let mut blocks = Vec::new();
        let mut current: Option<String> = None;
        for line in markdown.lines() {
            match (&mut current, line.trim_start()) {
                (None, fence) if fence.starts_with("```json") => current = Some(String::new()),
                (Some(_), fence) if fence.starts_with("```") => blocks.extend(current.take()),
                (Some(block), _) => {
                    block.push_str(line);
                    block.push('\n');
                }
                (None, _) => {}
            }
        }
        blocks
    }

    #[test]
    fn every_example_in_the_docs_decodes() {
        let docs = docs();
        let blocks = json_blocks(&docs);
        assert!(
            blocks.len() >= EventKind::ALL.len(),
            "one example per kind at least"
        );
        let mut kinds = std::collections::BTreeSet::new();
        for block in &blocks {
            let decoded = decode_message(None, block.as_bytes(), now(), &limits());
            assert!(decoded.errors.is_empty(), "{block}\n{:?}", decoded.errors);
            assert!(!decoded.events.is_empty(), "{block}");
            kinds.extend(decoded.events.iter().map(Event::kind));
        }
        assert_eq!(
            kinds.len(),
            EventKind::ALL.len(),
            "every kind has an example"
        );
    }

    #[test]
    fn the_docs_list_every_reason_code() {
        let docs = docs();
        let dataflow = [
            "unknown_delivery",
            "delivery_exists",
            "illegal_transition",
            "not_rateable",
            "too_many_ratings",
            "implausible_jump",
            "stale",
        ];
        for code in DecodeErrorReason::ALL_CODES.iter().chain(&dataflow) {
            assert!(
                docs.contains(&format!("`{code}`")),
                "docs/events.md lacks `{code}`"
            );
        }
    }

    // -----------------------------------------------------------------------------------
    // Properties
    // -----------------------------------------------------------------------------------

    fn id() -> impl Strategy<Value = Uuid> {
        any::<u128>().prop_map(Uuid::from_u128)
    }

    fn point() -> impl Strategy<Value = GeoPoint> {
        (
            -900_000_000..=900_000_000_i32,
            -1_800_000_000..=1_800_000_000_i32,
        )
            .prop_map(|(lat_e7, lon_e7)| GeoPoint { lat_e7, lon_e7 })
    }

    /// Event times from seven days before `now()` to five minutes after it.
    fn time() -> impl Strategy<Value = UnixMillis> {
        now() - SEVEN_DAYS_MS..=now() + 300_000
    }

    /// A regular polygon on the 1e-7 grid, optionally with a hole.
    fn polygon(cx: i64, cy: i64, radius: i64, sides: usize, hole: bool) -> geo::Polygon<f64> {
        let ring = |radius: i64| {
            let mut coords: Vec<geo::Coord<f64>> = (0..sides)
                .map(|i| {
                    let angle = std::f64::consts::TAU * i as f64 / sides as f64;
                    geo::Coord {
                        x: (cx + (radius as f64 * angle.cos()).round() as i64) as f64 / E7,
                        y: (cy + (radius as f64 * angle.sin()).round() as i64) as f64 / E7,
                    }
                })
                .collect();
            coords.push(coords[0]);
            geo::LineString(coords)
        };
        let holes = if hole { vec![ring(radius / 2)] } else { vec![] };
        geo::Polygon::new(ring(radius), holes)
    }

    fn shape() -> impl Strategy<Value = ZoneShape> {
        (
            -1_700_000_000..=1_700_000_000_i64,
            -850_000_000..=850_000_000_i64,
            10_000..=5_000_000_i64,
            3..12_usize,
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(cx, cy, radius, sides, hole, two)| {
                let mut polygons = vec![polygon(cx, cy, radius, sides, hole)];
                if two {
                    polygons.push(polygon(cx + 3 * radius, cy, radius, sides, false));
                }
                ZoneShape(MultiPolygon(polygons))
            })
    }

    fn body() -> impl Strategy<Value = EventBody> {
        let status = prop::sample::select(&Status::ALL[1..]);
        prop_oneof![
            (
                id(),
                point(),
                prop::option::of(0..=150_000_u32),
                prop::option::of(0..3_600_u16),
                prop::option::of(0..=10_000_000_u32)
            )
                .prop_map(
                    |(courier, position, speed_mm_s, heading_ddeg, accuracy_cm)| {
                        EventBody::LocationUpdated(LocationUpdated {
                            courier_id: CourierId(courier),
                            position,
                            speed_mm_s,
                            heading_ddeg,
                            accuracy_cm,
                        })
                    }
                ),
            // `promised_by` as an offset from `occurred_at`, which `event` adds.
            (
                id(),
                id(),
                point(),
                point(),
                prop::option::of(-SEVEN_DAYS_MS..=SEVEN_DAYS_MS)
            )
                .prop_map(|(delivery, customer, pickup, dropoff, promised_by)| {
                    EventBody::DeliveryCreated(DeliveryCreated {
                        delivery_id: DeliveryId(delivery),
                        customer_id: CustomerId(customer),
                        pickup,
                        dropoff,
                        promised_by,
                    })
                }),
            (id(), status, prop::option::of(id())).prop_map(|(delivery, status, courier)| {
                let courier = if status == Status::Assigned {
                    Some(courier.unwrap_or_default())
                } else {
                    courier
                };
                EventBody::StatusChanged(StatusChanged {
                    delivery_id: DeliveryId(delivery),
                    status,
                    courier_id: courier.map(CourierId),
                })
            }),
            (id(), 1..=5_u8, prop::option::of("[\\PC\r\n\t]{0,40}")).prop_map(
                |(delivery, score, comment)| {
                    EventBody::DeliveryRated(DeliveryRated {
                        delivery_id: DeliveryId(delivery),
                        score,
                        comment,
                    })
                }
            ),
            (
                id(),
                "[A-Za-zÄÖÜäöüß][A-Za-z0-9ÄÖÜäöüß ()-]{0,60}",
                shape(),
                0..=86_400_000_i64
            )
                .prop_map(|(zone, name, shape, dwell_ms)| {
                    EventBody::ZoneUpserted(ZoneUpserted {
                        zone_id: ZoneId(zone),
                        name,
                        shape,
                        dwell_ms,
                    })
                }),
            id().prop_map(|zone| EventBody::ZoneDeleted(ZoneDeleted {
                zone_id: ZoneId(zone)
            })),
        ]
    }

    fn event() -> impl Strategy<Value = Event> {
        (id(), time(), body()).prop_map(|(event_id, occurred_at, mut body)| {
            if let EventBody::DeliveryCreated(created) = &mut body {
                created.promised_by = created.promised_by.map(|offset| occurred_at + offset);
            }
            Event {
                event_id: EventId(event_id),
                occurred_at,
                body,
            }
        })
    }

    /// JSON with the field names of the contract, so that random input gets past the
    /// envelope checks often enough to reach the per-kind code.
    fn json_value() -> impl Strategy<Value = Value> {
        let names = prop::sample::select(
            [
                "v",
                "kind",
                "event_id",
                "occurred_at",
                "courier_id",
                "lat",
                "lon",
                "speed_mps",
                "heading_deg",
                "accuracy_m",
                "delivery_id",
                "customer_id",
                "pickup",
                "dropoff",
                "promised_by",
                "status",
                "score",
                "comment",
                "zone_id",
                "name",
                "geometry",
                "dwell_seconds",
                "type",
                "coordinates",
                "bbox",
            ]
            .as_slice(),
        );
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            (-200.0..200.0_f64).prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            prop::sample::select(
                [
                    EVENT,
                    "2026-11-30T12:00:00Z",
                    "assigned",
                    "created",
                    "Polygon",
                    "MultiPolygon",
                    "location.updated",
                    "delivery.created",
                    "status.changed",
                    "delivery.rated",
                    "zone.upserted",
                    "zone.deleted",
                    "",
                    "9999-12-31T23:59:59Z",
                ]
                .as_slice()
            )
            .prop_map(Value::from),
            Just(Value::from(1)),
        ];
        leaf.prop_recursive(4, 64, 8, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(names.clone(), inner, 0..10).prop_map(|map| {
                    Value::Object(map.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
                }),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn random_events_round_trip(events in prop::collection::vec(event(), 1..8)) {
            for event in &events {
                let wire = encode_event(event);
                let decoded = decode_event(Some(event.kind().as_str()), &wire, now(), &limits());
                prop_assert_eq!(decoded.as_ref(), Ok(event), "{}", wire);
            }
            let decoded = decode_message(None, &encode_message(&events), now(), &limits());
            prop_assert_eq!(decoded.errors, vec![]);
            prop_assert_eq!(decoded.events, events);
        }

        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let decoded = decode_message(Some("location.updated"), &bytes, now(), &limits());
            for error in &decoded.errors {
                prop_assert!(DecodeErrorReason::ALL_CODES.contains(&error.code()));
            }
        }

        #[test]
        fn damaged_messages_never_panic(
            events in prop::collection::vec(event(), 1..4),
            damage in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        ) {
            let mut bytes = encode_message(&events);
            for (index, byte) in damage {
                let at = index.index(bytes.len());
                bytes[at] = byte;
            }
            let decoded = decode_message(None, &bytes, now(), &limits());
            prop_assert!(decoded.events.len() + decoded.errors.len() >= 1);
        }

        #[test]
        fn random_json_never_panics_and_what_passes_is_stable(
            kind in prop::sample::select(EventKind::ALL.as_slice()),
            mut value in json_value(),
        ) {
            if let Value::Object(object) = &mut value {
                object.insert("v".into(), json!(1));
                object.insert("kind".into(), json!(kind.as_str()));
                object.insert("event_id".into(), json!(EVENT));
                object.insert("occurred_at".into(), json!("2026-11-30T12:00:00Z"));
            }
            let payload = serde_json::to_vec(&value).unwrap();
            let decoded = decode_message(Some(kind.as_str()), &payload, now(), &limits());
            for error in &decoded.errors {
                prop_assert!(DecodeErrorReason::ALL_CODES.contains(&error.code()));
            }
            for event in &decoded.events {
                let again = decode_event(None, &encode_event(event), now(), &limits());
                prop_assert_eq!(again.as_ref(), Ok(event));
            }
        }
    }
}
