//! `GET /graphql/ws`: GraphQL subscriptions over a WebSocket, in the
//! `graphql-transport-ws` protocol (the older `graphql-ws` one too), chosen by the
//! `Sec-WebSocket-Protocol` header.
//!
//! **Authentication.** A token on the upgrade request itself (`Authorization: Bearer`
//! header, or `access_token` query parameter for browsers) must be valid, otherwise the
//! upgrade is answered `401` in the API's error shape. Without one, the token comes in the
//! `connection_init` message's payload, `{"Authorization": "Bearer ..."}`; a missing or
//! invalid one closes the socket with code `4403` and the reason. A client that sends no
//! `connection_init` within 10 seconds is closed with `4408`, as the protocol says.
//!
//! **Ends with the token.** The session closes with
//! [`CLOSE_TOKEN_EXPIRED`](crate::auth::CLOSE_TOKEN_EXPIRED) (4401, `the token has
//! expired`) at the `exp` of the token it runs on (the `connection_init` one when it
//! brings one, otherwise the upgrade's), subscriptions and all.
//!
//! **Origin.** A page of an origin not on the allow-list is refused `403
//! origin_not_allowed` before the upgrade ([`crate::origin`]).
//!
//! **Limits.** At most
//! [`ApiConfig::graphql_max_subscriptions`](crate::ApiConfig::graphql_max_subscriptions)
//! operations open at once per connection: the next `subscribe` is answered with an
//! `error` message for its id whose `extensions.code` is [`TOO_MANY_SUBSCRIPTIONS`], and
//! the connection stays usable. A message over
//! [`ApiConfig::ws_max_message_bytes`](crate::ApiConfig::ws_max_message_bytes) closes it
//! with 1009.
//!
//! **Liveness.** As on `/ws/changes`: the server pings every
//! [`ApiConfig::ws_ping_interval`](crate::ApiConfig::ws_ping_interval) and closes a peer
//! silent for two intervals, drops one that does not take a message within
//! [`ApiConfig::ws_send_timeout`](crate::ApiConfig::ws_send_timeout), and closes every
//! session with `1001` at shutdown. The subscriptions' own buffering is the read model's
//! bounded broadcast (see [`subscription`](super::subscription)). Open sessions count in
//! `delivertrack_websocket_connections` with the other WebSockets.

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_graphql::Data;
use async_graphql::http::{ALL_WEBSOCKET_PROTOCOLS, WebSocketProtocols, WsMessage};
use axum::Extension;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{FromRequestParts, Request, State};
use axum::response::{IntoResponse, Response};
use futures::stream::SplitSink;
use futures::{SinkExt, StreamExt, future};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::AnalyticsSchema;
use crate::auth::{AuthError, Authenticator, CLOSE_TOKEN_EXPIRED, Grant, TOKEN_EXPIRED_REASON};
use crate::error::{ApiError, ErrorBody};
use crate::state::AppState;

/// How long a client has to send `connection_init` after the upgrade.
pub const CONNECTION_INIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Close code: the connection-init payload carried no valid token.
pub const CLOSE_FORBIDDEN: u16 = 4403;
/// Close code: no `connection_init` in time.
pub const CLOSE_INIT_TIMEOUT: u16 = 4408;

/// Upgrades to a GraphQL WebSocket session.
#[utoipa::path(
    get,
    path = "/graphql/ws",
    operation_id = "graphqlSubscriptions",
    tag = "graphql",
    summary = "GraphQL subscriptions (WebSocket)",
    description = "`metricChanged` subscriptions in the `graphql-transport-ws` protocol (or the \
        older `graphql-ws`), named in `Sec-WebSocket-Protocol`. The token comes with the \
        upgrade (header or `access_token`; an invalid one is `401`) or in the \
        `connection_init` payload, `{\"Authorization\": \"Bearer ...\"}`; none is closed \
        with 4403, no `connection_init` within 10 s with 4408, and the session with 4401 when \
        its token expires.",
    security((), ("bearer_jwt" = []), ("access_token" = [])),
    params(("Sec-WebSocket-Protocol" = String, Header, description = "`graphql-transport-ws` or `graphql-ws`.")),
    responses(
        (status = 101, description = "Switching to the WebSocket session."),
        (status = 400, description = "`websocket_required` (not a WebSocket upgrade request) or \
            `unsupported_protocol`.", body = ErrorBody),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, description = "`origin_not_allowed`: a page of an origin not on the allow-list.", body = ErrorBody),
    )
)]
pub(super) async fn upgrade(
    State(state): State<AppState>,
    Extension(schema): Extension<AnalyticsSchema>,
    request: Request,
) -> Result<Response, ApiError> {
    let (mut parts, _body) = request.into_parts();
    crate::origin::check(&state.config.allowed_origins, &parts.headers)?;
    let ws = WebSocketUpgrade::from_request_parts(&mut parts, &state)
        .await
        .map_err(|rejection| ApiError::BadRequest {
            code: "websocket_required",
            message: rejection.body_text(),
        })?;
    let protocol = parts
        .headers
        .get(axum::http::header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|value| value.to_str().ok())
        .and_then(|protocols| {
            protocols
                .split(',')
                .find_map(|p| WebSocketProtocols::from_str(p.trim()).ok())
        })
        .ok_or_else(|| ApiError::BadRequest {
            code: "unsupported_protocol",
            message: "Sec-WebSocket-Protocol must name graphql-transport-ws (or graphql-ws)".into(),
        })?;
    // A token on the upgrade must be valid; none leaves it to `connection_init`.
    let grant = match state.auth.authenticate_grant(&parts) {
        Ok(grant) => Some(grant),
        Err(AuthError::Missing) => None,
        Err(error) => {
            return Err(ApiError::Unauthorized {
                reason: error.to_string(),
            });
        }
    };
    Ok(crate::live::bounded(ws, &state.config)
        .protocols(ALL_WEBSOCKET_PROTOCOLS)
        .on_upgrade(move |socket| session(socket, state, schema, protocol, grant))
        .into_response())
}

/// How the `connection_init` went, shared between the protocol's callback and the loop
/// that sends.
#[derive(Debug, Default)]
struct Init {
    accepted: AtomicBool,
    refused: AtomicBool,
    /// The `exp` of the token the session runs on, Unix seconds (0: none yet).
    expires_at: AtomicU64,
}

/// Runs one session until either side ends it.
async fn session(
    socket: WebSocket,
    state: AppState,
    schema: AnalyticsSchema,
    protocol: WebSocketProtocols,
    grant: Option<Grant>,
) {
    let principal = grant.map(|grant| grant.principal);
    let _counted = state.metrics.websocket_session();
    let started = Instant::now();
    // Milliseconds since `started` at which the peer last sent anything.
    let heard_from = Arc::new(AtomicU64::new(0));
    let (mut sink, stream) = socket.split();
    // Set when the input ended on a message over the size limit: the session closes 1009.
    let oversized = Arc::new(AtomicBool::new(false));
    let operations = Arc::new(Operations::new(state.config.graphql_max_subscriptions));
    // Refusals of operations over the cap, sent by the loop below. Bounded: a client
    // that floods subscriptions waits for its refusals to be sent.
    let (refuse, mut refusals) = mpsc::channel::<String>(4);
    let input = {
        let heard_from = Arc::clone(&heard_from);
        let oversized = Arc::clone(&oversized);
        let operations = Arc::clone(&operations);
        stream
            .take_while(move |message| {
                if let Err(error) = message
                    && crate::live::too_big(error)
                {
                    tracing::info!(%error, "A GraphQL WebSocket peer sent a message over the size limit; closing it with 1009.");
                    oversized.store(true, Ordering::SeqCst);
                }
                future::ready(message.is_ok())
            })
            .filter_map(move |message| {
                heard_from.store(millis_since(started), Ordering::Relaxed);
                let operations = Arc::clone(&operations);
                let refuse = refuse.clone();
                async move {
                    let data = match message {
                        Ok(message @ (Message::Text(_) | Message::Binary(_))) => message.into_data(),
                        _ => return None,
                    };
                    match operations.admit(&data, protocol) {
                        Ok(()) => Some(data),
                        Err(refusal) => {
                            let _ = refuse.send(refusal).await;
                            None
                        }
                    }
                }
            })
    };

    let init = Arc::new(Init::default());
    if let Some(grant) = grant {
        init.expires_at.store(grant.expires_at, Ordering::SeqCst);
    }
    let mut data = Data::default();
    data.insert(state.read_model.clone());
    if let Some(principal) = principal {
        data.insert(principal);
    }
    let on_init = {
        let init = Arc::clone(&init);
        let auth = state.auth.clone();
        move |payload: serde_json::Value| async move {
            match init_principal(&auth, &payload, principal.is_some()) {
                Ok(found) => {
                    let mut data = Data::default();
                    if let Some(grant) = found {
                        init.expires_at.store(grant.expires_at, Ordering::SeqCst);
                        data.insert(grant.principal);
                    }
                    init.accepted.store(true, Ordering::SeqCst);
                    Ok(data)
                }
                Err(reason) => {
                    init.refused.store(true, Ordering::SeqCst);
                    Err(async_graphql::Error::new(reason))
                }
            }
        }
    };
    let graphql = async_graphql::http::WebSocket::new(schema, input, protocol)
        .connection_data(data)
        .on_connection_init(on_init);
    futures::pin_mut!(graphql);

    let timeout = state.config.ws_send_timeout;
    let ping_every = state.config.ws_ping_interval;
    let mut ping = tokio::time::interval_at(started + ping_every, ping_every);
    let init_deadline = tokio::time::sleep_until(started + CONNECTION_INIT_TIMEOUT);
    tokio::pin!(init_deadline);
    let mut init_pending = true;
    // Armed with the token's expiry once there is a token, re-armed when `connection_init`
    // brings another.
    let expiry = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(expiry);
    let mut armed = 0;
    let close = loop {
        let expires_at = init.expires_at.load(Ordering::SeqCst);
        if expires_at != armed {
            armed = expires_at;
            expiry
                .as_mut()
                .reset(Instant::now() + crate::auth::until(expires_at));
        }
        tokio::select! {
            () = state.shutdown.cancelled() => {
                break Some((close_code::AWAY, "the server is shutting down".to_owned()));
            }
            () = &mut expiry, if armed != 0 => {
                break Some((CLOSE_TOKEN_EXPIRED, TOKEN_EXPIRED_REASON.to_owned()));
            }
            () = &mut init_deadline, if init_pending => {
                init_pending = false;
                if !init.accepted.load(Ordering::SeqCst) {
                    break Some((CLOSE_INIT_TIMEOUT, "Connection initialisation timeout".to_owned()));
                }
            }
            _ = ping.tick() => {
                let silent = millis_since(started).saturating_sub(heard_from.load(Ordering::Relaxed));
                if silent > 2 * duration_millis(ping_every) + duration_millis(timeout) {
                    tracing::info!(silent_ms = silent, "A GraphQL WebSocket peer stopped answering pings; closing it.");
                    break Some((close_code::POLICY, "no answer to pings".to_owned()));
                }
                if !send(&mut sink, Message::Ping(Default::default()), timeout).await {
                    break None;
                }
            }
            Some(refusal) = refusals.recv() => {
                if !send(&mut sink, Message::Text(refusal.into()), timeout).await {
                    break None;
                }
            }
            message = graphql.next() => match message {
                Some(WsMessage::Text(text)) => {
                    operations.sent(&text);
                    if !send(&mut sink, Message::Text(text.into()), timeout).await {
                        break None;
                    }
                }
                Some(WsMessage::Close(code, reason)) => {
                    let code = if init.refused.load(Ordering::SeqCst) { CLOSE_FORBIDDEN } else { code };
                    break Some((code, reason));
                }
                // The peer closed its side, or sent too much.
                None if oversized.load(Ordering::SeqCst) => {
                    break Some((close_code::SIZE, crate::live::MESSAGE_TOO_BIG.to_owned()));
                }
                None => break None,
            },
        }
    };
    if let Some((code, reason)) = close {
        let frame = CloseFrame {
            code,
            reason: truncate(&reason, 120).into(),
        };
        let _ = send(&mut sink, Message::Close(Some(frame)), timeout).await;
    }
    tracing::debug!("A GraphQL WebSocket session ended.");
}

/// `extensions.code` of the error refusing an operation over
/// [`ApiConfig::graphql_max_subscriptions`](crate::ApiConfig::graphql_max_subscriptions).
pub const TOO_MANY_SUBSCRIPTIONS: &str = "TOO_MANY_SUBSCRIPTIONS";

/// The operations open on one connection (subscriptions, and queries until answered), by
/// id, and the cap on them. A `subscribe` (`start`) over the cap is not handed to the
/// schema: it is answered with an `error` message for its id, code
/// [`TOO_MANY_SUBSCRIPTIONS`], and the connection stays usable. An operation ends when
/// the server sends its `complete` (after the client's own `complete`/`stop`, or when its
/// stream ends).
#[derive(Debug)]
struct Operations {
    max: usize,
    open: Mutex<HashSet<String>>,
}

/// The two fields of a protocol message this cares about; the payload is skipped.
#[derive(Deserialize)]
struct Envelope {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    id: Option<String>,
}

impl Operations {
    fn new(max: usize) -> Self {
        Self {
            max,
            open: Mutex::new(HashSet::new()),
        }
    }

    fn open(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A client message: `Ok` to hand it to the schema, or the refusal to send instead.
    fn admit(&self, message: &[u8], protocol: WebSocketProtocols) -> Result<(), String> {
        let Ok(envelope) = serde_json::from_slice::<Envelope>(message) else {
            // Not ours to judge: the protocol answers it.
            return Ok(());
        };
        let (true, Some(id)) = (
            matches!(envelope.kind.as_str(), "subscribe" | "start"),
            envelope.id,
        ) else {
            return Ok(());
        };
        let mut open = self.open();
        if open.contains(&id) || open.len() < self.max {
            open.insert(id);
            return Ok(());
        }
        drop(open);
        tracing::info!(
            max = self.max,
            "A GraphQL WebSocket client opened more subscriptions than allowed; refusing one."
        );
        let error = serde_json::json!({
            "message": format!("at most {} subscriptions may be open on one connection", self.max),
            "extensions": {"code": TOO_MANY_SUBSCRIPTIONS},
        });
        let payload = match protocol {
            WebSocketProtocols::GraphQLWS => serde_json::json!([error]),
            WebSocketProtocols::SubscriptionsTransportWS => error,
        };
        Err(serde_json::json!({"type": "error", "id": id, "payload": payload}).to_string())
    }

    /// A server message: a `complete` ends its operation.
    fn sent(&self, text: &str) {
        // Results are most of the traffic and end nothing: skip them unparsed.
        if text.starts_with(r#"{"type":"next""#) || text.starts_with(r#"{"type":"data""#) {
            return;
        }
        if let Ok(Envelope { kind, id: Some(id) }) = serde_json::from_str::<Envelope>(text)
            && kind == "complete"
        {
            self.open().remove(&id);
        }
    }
}

/// The principal of a `connection_init` payload: `Ok(Some)` from its `Authorization`,
/// `Ok(None)` when it has none but the upgrade carried a token, otherwise why not.
fn init_principal(
    auth: &Authenticator,
    payload: &serde_json::Value,
    upgraded_with_token: bool,
) -> Result<Option<Grant>, String> {
    let header = payload.as_object().and_then(|fields| {
        fields
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case("authorization"))
            .map(|(_, value)| value)
    });
    match header {
        Some(serde_json::Value::String(value)) => {
            let token = value
                .strip_prefix("Bearer ")
                .or_else(|| value.strip_prefix("bearer "))
                .map(str::trim)
                .filter(|token| !token.is_empty())
                .ok_or_else(|| AuthError::Malformed.to_string())?;
            auth.verify_grant(token)
                .map(Some)
                .map_err(|e| e.to_string())
        }
        Some(_) => Err(AuthError::Malformed.to_string()),
        None if upgraded_with_token => Ok(None),
        None => Err(AuthError::Missing.to_string()),
    }
}

/// Sends one message; `false` when the peer is gone or did not take it in time.
async fn send(
    sink: &mut SplitSink<WebSocket, Message>,
    message: Message,
    timeout: Duration,
) -> bool {
    match tokio::time::timeout(timeout, sink.send(message)).await {
        Ok(Ok(())) => true,
        Ok(Err(error)) => {
            tracing::debug!(%error, "A GraphQL WebSocket peer went away.");
            false
        }
        Err(_) => {
            tracing::info!("A GraphQL WebSocket peer did not take a message in time; dropping it.");
            false
        }
    }
}

/// At most `max` bytes of `text`, cut at a character boundary (a close reason may hold
/// 123 bytes).
fn truncate(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

fn millis_since(start: Instant) -> u64 {
    duration_millis(start.elapsed())
}

fn duration_millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::auth::{AuthConfig, Principal, Role};
    use uuid::Uuid;

    #[test]
    fn the_init_payload_carries_the_token() {
        let auth = Authenticator::new(&AuthConfig {
            secret: "a-secret-for-tests".into(),
            expiry: Duration::from_secs(60),
        })
        .unwrap();
        let sub = Uuid::from_u128(5);
        let token = auth.issue(Role::Admin, sub).unwrap();
        let payload = serde_json::json!({"Authorization": format!("Bearer {token}")});
        assert_eq!(
            init_principal(&auth, &payload, false)
                .unwrap()
                .map(|grant| grant.principal),
            Some(Principal {
                sub,
                role: Role::Admin
            })
        );
        let lower = serde_json::json!({"authorization": format!("bearer {token}")});
        assert!(init_principal(&auth, &lower, false).unwrap().is_some());
        assert!(init_principal(&auth, &serde_json::Value::Null, false).is_err());
        assert_eq!(
            init_principal(&auth, &serde_json::json!({}), true),
            Ok(None)
        );
        assert!(init_principal(&auth, &serde_json::json!({"Authorization": token}), true).is_err());
        assert!(
            init_principal(
                &auth,
                &serde_json::json!({"Authorization": "Bearer x.y.z"}),
                true
            )
            .is_err()
        );
    }

    #[test]
    fn close_reasons_are_cut_at_a_character_boundary() {
        assert_eq!(truncate("abc", 120), "abc");
        assert_eq!(truncate("ééé", 3), "é");
    }
}
