//! Dead letters: refused events published, with their reason, to the dead-letter exchange.
//!
//! A refused event must neither stop the pipeline nor vanish: it is published to the
//! dead-letter exchange (routing key = the original routing key), with publisher confirms,
//! and only once the broker has confirmed it is the delivery that carried it acknowledged.
//! The body is the refused event's own JSON (its element of an array message), or the
//! original bytes when the message as a whole was refused (not JSON, an empty array, ...).
//!
//! Headers of every dead letter (also [`HEADER_REASON`] and friends):
//!
//! | header | value |
//! |---|---|
//! | `delivertrack-reason` | the stable reason code (`bad_json`, `kind_mismatch`, `illegal_transition`, ...) |
//! | `delivertrack-detail` | the human-readable reason |
//! | `delivertrack-stage` | `decode` (refused by the contract), `dataflow` (refused by the state it met) or `sink` (refused for good by a store, e.g. reason `sink_refused:postgres:23514`) |
//! | `delivertrack-routing-key` | the routing key the message was published with |
//! | `delivertrack-rejected-at` | when it was refused, RFC 3339 UTC |
//! | `delivertrack-index` | the event's position in an array message (absent for a single event or a whole message) |
//! | `delivertrack-event-id` | the event's id, when it could be read |

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use delivertrack_dataflow::RejectReason;
use delivertrack_dataflow::contract::{CONTENT_TYPE, DecodeError};
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation};
use serde_json::value::RawValue;

use super::metrics::IngestMetrics;
use crate::source::Refusal;

/// The reason code.
pub const HEADER_REASON: &str = "delivertrack-reason";
/// The human-readable reason.
pub const HEADER_DETAIL: &str = "delivertrack-detail";
/// `decode` or `dataflow`.
pub const HEADER_STAGE: &str = "delivertrack-stage";
/// The routing key the message was published with.
pub const HEADER_ROUTING_KEY: &str = "delivertrack-routing-key";
/// When the event was refused, RFC 3339 UTC.
pub const HEADER_REJECTED_AT: &str = "delivertrack-rejected-at";
/// The event's position in an array message.
pub const HEADER_INDEX: &str = "delivertrack-index";
/// The event's id, when known.
pub const HEADER_EVENT_ID: &str = "delivertrack-event-id";

/// Persistent (AMQP delivery mode 2): a dead letter survives a broker restart like the
/// event it replaces would have.
const PERSISTENT: u8 = 2;

/// A message as it arrived, kept while its events are in flight so that an event refused
/// later, by the dataflow, can still be dead-lettered in its wire form.
#[derive(Debug)]
pub(crate) struct Wire {
    /// The routing key it was published with.
    pub routing_key: String,
    /// The body as received.
    pub payload: Vec<u8>,
}

/// Where one decoded event came from.
#[derive(Clone, Debug)]
pub(crate) struct Origin {
    /// Its message.
    pub wire: Arc<Wire>,
    /// Its position when the message is an array.
    pub index: Option<usize>,
}

impl Origin {
    /// The event's own JSON: its element of an array message, or the whole body.
    fn body(&self) -> Vec<u8> {
        match self.index {
            None => self.wire.payload.clone(),
            Some(index) => element(&self.wire.payload, index),
        }
    }
}

/// The JSON of element `index` of an array payload, as its bytes came; the whole payload if
/// it cannot be taken apart (the strict decoder accepted it, so this is only a fallback).
fn element(payload: &[u8], index: usize) -> Vec<u8> {
    elements(payload)
        .and_then(|elements| elements.get(index).map(|raw| raw.get().as_bytes().to_vec()))
        .unwrap_or_else(|| payload.to_vec())
}

/// The elements of an array payload, each as its own bytes. Strings are skipped, not
/// decoded, so an element the contract refused for a lone surrogate escape (which serde_json
/// refuses to decode) still comes apart from the good ones beside it.
fn elements(payload: &[u8]) -> Option<Vec<&RawValue>> {
    serde_json::from_slice(payload).ok()
}

/// Which part of the pipeline refused an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stage {
    /// The contract (`decode_message`).
    Decode,
    /// The dataflow, against the state it met.
    Dataflow,
    /// A sink's store, for good (the driver kept the event out of every store).
    Sink,
}

impl Stage {
    fn as_str(self) -> &'static str {
        match self {
            Stage::Decode => "decode",
            Stage::Dataflow => "dataflow",
            Stage::Sink => "sink",
        }
    }
}

/// One refused event (or message), ready to publish.
#[derive(Clone, Debug)]
pub(crate) struct DeadLetter {
    /// The reason code: the metric label and the `delivertrack-reason` header.
    pub reason: Cow<'static, str>,
    detail: String,
    stage: Stage,
    routing_key: String,
    rejected_at: String,
    index: Option<usize>,
    event_id: Option<String>,
    body: Vec<u8>,
}

impl DeadLetter {
    /// Why, in words.
    pub(crate) fn detail(&self) -> &str {
        &self.detail
    }
}

/// The current time, RFC 3339 UTC with milliseconds.
pub(crate) fn now_rfc3339() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

impl DeadLetter {
    /// The dead letters of one message's decode errors. `payload` is parsed at most once,
    /// however many elements of an array were refused.
    pub(crate) fn decoded(routing_key: &str, payload: &[u8], errors: &[DecodeError]) -> Vec<Self> {
        let rejected_at = now_rfc3339();
        // Taken apart once, when some refused event is an element of an array.
        let elements = errors
            .iter()
            .any(|error| error.index.is_some())
            .then(|| elements(payload))
            .flatten();
        errors
            .iter()
            .map(|error| {
                let body = error
                    .index
                    .and_then(|index| elements.as_ref()?.get(index))
                    .map_or_else(|| payload.to_vec(), |raw| raw.get().as_bytes().to_vec());
                DeadLetter {
                    reason: Cow::Borrowed(error.code()),
                    detail: error.reason.to_string(),
                    stage: Stage::Decode,
                    routing_key: routing_key.to_owned(),
                    rejected_at: rejected_at.clone(),
                    index: error.index,
                    event_id: error.event_id.map(|id| id.to_string()),
                    body,
                }
            })
            .collect()
    }

    /// The dead letter of an event refused after decoding (by the dataflow or a sink).
    /// `origin` is `None` only if the source lost track of the event, which it does not;
    /// the body then describes the refusal instead of carrying the event.
    pub(crate) fn refused(rejection: &Refusal, origin: Option<&Origin>) -> Self {
        let (routing_key, index, body) = match origin {
            Some(origin) => (origin.wire.routing_key.clone(), origin.index, origin.body()),
            None => (
                rejection.kind().as_str().to_owned(),
                None,
                serde_json::to_vec(&serde_json::json!({
                    "event_id": rejection.event_id().to_string(),
                    "kind": rejection.kind().as_str(),
                }))
                .unwrap_or_default(),
            ),
        };
        DeadLetter {
            reason: rejection.reason(),
            detail: rejection.detail(),
            stage: match rejection {
                Refusal::Dataflow(_) => Stage::Dataflow,
                Refusal::Sink(_) => Stage::Sink,
            },
            routing_key,
            rejected_at: now_rfc3339(),
            index,
            event_id: Some(rejection.event_id().to_string()),
            body,
        }
    }

    fn properties(&self) -> BasicProperties {
        let text = |s: &str| AMQPValue::LongString(s.into());
        let mut headers = FieldTable::default();
        headers.insert(HEADER_REASON.into(), text(&self.reason));
        headers.insert(HEADER_DETAIL.into(), text(&self.detail));
        headers.insert(HEADER_STAGE.into(), text(self.stage.as_str()));
        headers.insert(HEADER_ROUTING_KEY.into(), text(&self.routing_key));
        headers.insert(HEADER_REJECTED_AT.into(), text(&self.rejected_at));
        if let Some(index) = self.index {
            headers.insert(
                HEADER_INDEX.into(),
                AMQPValue::LongLongInt(i64::try_from(index).unwrap_or(i64::MAX)),
            );
        }
        if let Some(event_id) = &self.event_id {
            headers.insert(HEADER_EVENT_ID.into(), text(event_id));
        }
        BasicProperties::default()
            .with_content_type(CONTENT_TYPE.into())
            .with_delivery_mode(PERSISTENT)
            .with_headers(headers)
    }
}

/// Whether a refusal is dead-lettered: everything but the dataflow's `stale`, which is
/// normal late input, counted and acknowledged.
pub(crate) fn is_dead_lettered(refusal: &Refusal) -> bool {
    !matches!(
        refusal,
        Refusal::Dataflow(rejection) if rejection.reason == RejectReason::Stale
    )
}

/// Why dead letters could not be published; each case is healed by a new connection.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DeadLetterError {
    #[error("publishing a dead letter failed")]
    Publish(#[source] lapin::Error),
    #[error("the broker refused a dead letter (nack)")]
    Nacked,
    #[error("a dead letter could not be routed: the dead-letter exchange has no queue bound")]
    Unroutable,
    #[error("the broker did not confirm the dead letters within {0:?}")]
    Timeout(Duration),
}

/// Publishes `letters` on `channel` (in confirm mode) and waits for every confirmation;
/// counts each confirmed one.
///
/// # Errors
/// A publish failed, was nacked or returned unroutable, or the confirms took longer than
/// `timeout`. Some letters may have been published then; they will be published again
/// after redelivery (dead letters are at-least-once, like everything else).
pub(crate) async fn publish(
    channel: &Channel,
    exchange: &str,
    letters: &[DeadLetter],
    metrics: &IngestMetrics,
    timeout: Duration,
) -> Result<(), DeadLetterError> {
    if letters.is_empty() {
        return Ok(());
    }
    let all = async {
        let mut confirms = Vec::with_capacity(letters.len());
        for letter in letters {
            let confirm = channel
                .basic_publish(
                    exchange.into(),
                    letter.routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &letter.body,
                    letter.properties(),
                )
                .await
                .map_err(DeadLetterError::Publish)?;
            confirms.push(confirm);
        }
        for (confirm, letter) in confirms.into_iter().zip(letters) {
            match confirm.await.map_err(DeadLetterError::Publish)? {
                Confirmation::Ack(None) | Confirmation::NotRequested => {
                    metrics.event_dead_lettered(&letter.reason);
                }
                Confirmation::Ack(Some(_returned)) => return Err(DeadLetterError::Unroutable),
                Confirmation::Nack(_) => return Err(DeadLetterError::Nacked),
            }
        }
        Ok(())
    };
    tokio::time::timeout(timeout, all)
        .await
        .map_err(|_| DeadLetterError::Timeout(timeout))?
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::source::SinkRefusal;
    use delivertrack_dataflow::contract::{ContractLimits, decode_message};
    use delivertrack_dataflow::{EventId, EventKind, Rejection};
    use serde_json::Value;

    const GOOD: &str = r#"{"v":1,"kind":"zone.deleted","event_id":"d4c3b2a1-0f9e-4d8c-b7a6-958473625140","occurred_at":"2026-01-01T00:00:00Z","zone_id":"8b7a6c5d-4e3f-4a2b-9c1d-0e9f8a7b6c5d"}"#;

    #[test]
    fn only_the_bad_elements_of_an_array_become_dead_letters_with_their_own_json() {
        let bad = r#"{"v":1,"kind":"zone.deleted","event_id":"d4c3b2a1-0f9e-4d8c-b7a6-958473625141","occurred_at":"2026-01-01T00:00:00Z"}"#;
        let payload = format!("[{GOOD},{bad},{GOOD}]");
        let decoded = decode_message(
            Some("zone.deleted"),
            payload.as_bytes(),
            // 2026-01-01T00:00:00Z, the events' time.
            1_767_225_600_000,
            &ContractLimits::default(),
        );
        assert_eq!(decoded.events.len(), 2);
        let letters = DeadLetter::decoded("zone.deleted", payload.as_bytes(), &decoded.errors);
        assert_eq!(letters.len(), 1);
        let letter = &letters[0];
        assert_eq!(letter.reason, "missing_field");
        assert_eq!(letter.index, Some(1));
        assert_eq!(
            letter.event_id.as_deref(),
            Some("d4c3b2a1-0f9e-4d8c-b7a6-958473625141")
        );
        let body: Value = serde_json::from_slice(&letter.body).unwrap();
        let expected: Value = serde_json::from_str(bad).unwrap();
        assert_eq!(body, expected);
        let headers = letter.properties().headers().clone().unwrap();
        let names: Vec<String> = headers.inner().keys().map(|k| k.to_string()).collect();
        for header in [
            HEADER_REASON,
            HEADER_DETAIL,
            HEADER_STAGE,
            HEADER_ROUTING_KEY,
            HEADER_REJECTED_AT,
            HEADER_INDEX,
            HEADER_EVENT_ID,
        ] {
            assert!(names.iter().any(|n| n == header), "{header} in {names:?}");
        }
    }

    #[test]
    fn an_element_refused_for_a_lone_surrogate_is_dead_lettered_alone() {
        let bad = r#"{"v":1,"kind":"zone.upserted","event_id":"d4c3b2a1-0f9e-4d8c-b7a6-958473625142","occurred_at":"2026-01-01T00:00:00Z","zone_id":"8b7a6c5d-4e3f-4a2b-9c1d-0e9f8a7b6c5e","name":"a\ud800b","geometry":{"type":"Polygon","coordinates":[[[13.0,52.0],[13.1,52.0],[13.1,52.1],[13.0,52.0]]]}}"#;
        let payload = format!("[{GOOD}, {bad}]");
        let decoded = decode_message(
            None,
            payload.as_bytes(),
            1_767_225_600_000,
            &ContractLimits::default(),
        );
        assert_eq!(decoded.events.len(), 1);
        let letters = DeadLetter::decoded("zone.upserted", payload.as_bytes(), &decoded.errors);
        assert_eq!(letters.len(), 1);
        assert_eq!(letters[0].reason, "invalid_unicode");
        assert_eq!(letters[0].index, Some(1));
        // Its own bytes, as they came (serde_json cannot decode them into a value).
        assert_eq!(letters[0].body, bad.as_bytes());
    }

    #[test]
    fn a_message_that_is_not_json_is_dead_lettered_as_it_came() {
        let payload = b"{\"v\":1,";
        let decoded = decode_message(Some("zone.deleted"), payload, 0, &ContractLimits::default());
        let letters = DeadLetter::decoded("zone.deleted", payload, &decoded.errors);
        assert_eq!(letters.len(), 1);
        assert_eq!(letters[0].reason, "bad_json");
        assert_eq!(letters[0].body, payload);
        assert_eq!(letters[0].index, None);
        assert_eq!(letters[0].event_id, None);
    }

    #[test]
    fn a_refused_event_carries_its_wire_form_and_stale_is_never_dead_lettered() {
        let wire = Arc::new(Wire {
            routing_key: "zone.deleted".into(),
            payload: format!("[{GOOD}]").into_bytes(),
        });
        let rejection = Rejection {
            event_id: EventId("d4c3b2a1-0f9e-4d8c-b7a6-958473625140".parse().unwrap()),
            kind: EventKind::ZoneDeleted,
            reason: RejectReason::UnknownDelivery,
        };
        let origin = Origin {
            wire,
            index: Some(0),
        };
        let refusal = Refusal::Dataflow(rejection.clone());
        let letter = DeadLetter::refused(&refusal, Some(&origin));
        assert_eq!(letter.stage, Stage::Dataflow);
        assert_eq!(letter.reason, "unknown_delivery");
        let body: Value = serde_json::from_slice(&letter.body).unwrap();
        assert_eq!(body, serde_json::from_str::<Value>(GOOD).unwrap());
        assert!(is_dead_lettered(&refusal));
        let stale = Refusal::Dataflow(Rejection {
            reason: RejectReason::Stale,
            ..rejection.clone()
        });
        assert!(!is_dead_lettered(&stale));
        let lost = DeadLetter::refused(&refusal, None);
        assert_eq!(lost.routing_key, "zone.deleted");
    }

    #[test]
    fn a_sink_refusal_names_the_sink_and_the_store_code() {
        let refusal = Refusal::Sink(SinkRefusal {
            event_id: EventId("d4c3b2a1-0f9e-4d8c-b7a6-958473625140".parse().unwrap()),
            kind: EventKind::DeliveryRated,
            sink: "postgres",
            code: "22P05".into(),
            detail: "unsupported Unicode escape sequence".into(),
        });
        let letter = DeadLetter::refused(&refusal, None);
        assert_eq!(letter.reason, "sink_refused:postgres:22P05");
        assert_eq!(letter.stage, Stage::Sink);
        assert_eq!(letter.detail(), "unsupported Unicode escape sequence");
        assert!(is_dead_lettered(&refusal));
    }
}
