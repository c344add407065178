//! `GET /ws/changes`: the live stream of every change, over a WebSocket.
//!
//! Admins only (every courier's position, every delivery's status): the token comes in the
//! `Authorization` header or, from a browser, as `?access_token=`; none is `401`, another
//! role `403`, a page of another origin `403 origin_not_allowed` ([`crate::origin`]). The
//! session closes with [`CLOSE_TOKEN_EXPIRED`] (4401) when the token expires.
//!
//! Server → client, text frames of JSON, each tagged by `"type"`:
//! - `{"type": "snapshot", "reason": "connected" | "lagged", "snapshot": {...}}`: the
//!   whole [`Snapshot`]; first on connect, and again whenever the client fell behind;
//! - `{"type": "epoch", "epoch": N, "changes": [...], "rejected": k}`: one per applied
//!   epoch after the snapshot's, in increasing order; each change is tagged by `"type"`
//!   (`courier_moved`, `geofence_entered`, `geofence_exited`, `delivery_status`, `eta`,
//!   `eta_cleared`, `metric`, `zone_upserted`, ...; see
//!   [`LiveChange`](delivertrack_sinks::LiveChange)).
//!
//! Client → server: nothing is expected; pongs and any message count as signs of life.
//!
//! Each session is two tasks: one sends, one receives. The per-client buffer is the read
//! model's bounded broadcast ([`ReadModelConfig::live_capacity`] epochs): the publisher
//! never waits for a client, and a client that falls further behind gets a fresh snapshot
//! (a resync) instead of the updates it missed. A peer that stops answering pings, or does
//! not take a message within [`ApiConfig::ws_send_timeout`], is closed.
//!
//! [`ReadModelConfig::live_capacity`]: delivertrack_sinks::ReadModelConfig::live_capacity
//! [`ApiConfig::ws_send_timeout`]: crate::ApiConfig::ws_send_timeout
//! [`ApiConfig::ws_max_message_bytes`]: crate::ApiConfig::ws_max_message_bytes

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::response::Response;
use axum::routing::get;
use delivertrack_dataflow::Epoch;
use delivertrack_sinks::read_model::{EpochUpdate, Snapshot};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::auth::{CLOSE_TOKEN_EXPIRED, Grant, TOKEN_EXPIRED_REASON};
use crate::error::{ApiError, ErrorBody};
use crate::origin::OriginAllowed;
use crate::reads::access::require_admin;
use crate::state::AppState;

/// The routes of this module.
pub fn router() -> Router<AppState> {
    Router::new().route("/ws/changes", get(upgrade))
}

/// A message to the client.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ServerMessage<'a> {
    /// The whole state.
    Snapshot {
        /// `connected` or `lagged`.
        reason: &'static str,
        /// The state.
        snapshot: &'a Snapshot,
    },
    /// One epoch's changes.
    Epoch(&'a EpochUpdate),
}

/// Upgrades to a session of the change stream.
#[utoipa::path(
    get,
    path = "/ws/changes",
    operation_id = "streamChanges",
    tag = "live",
    summary = "Every change, epoch by epoch (WebSocket)",
    description = "A WebSocket for admins (browsers pass the token as `access_token`). Text \
        frames of JSON tagged by `type`: `snapshot` (the whole `/api/snapshot`, with `reason` \
        `connected` or `lagged`) first and whenever the client fell behind, then one `epoch` \
        message per applied epoch (`epoch`, `changes`, `rejected`). Closed with 4401 when the \
        token expires, 1001 at shutdown.",
    security(("bearer_jwt" = []), ("access_token" = [])),
    responses(
        (status = 101, description = "Switching to the WebSocket session."),
        (status = 400, description = "`websocket_required`: not a WebSocket upgrade request.", body = ErrorBody),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, description = "`forbidden`: not an admin; `origin_not_allowed`: a page \
            of an origin not on the allow-list.", body = ErrorBody),
    )
)]
async fn upgrade(
    State(state): State<AppState>,
    _origin: OriginAllowed,
    grant: Grant,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    require_admin(&grant.principal)?;
    let ws = ws.map_err(|rejection| ApiError::BadRequest {
        code: "websocket_required",
        message: rejection.body_text(),
    })?;
    Ok(bounded(ws, &state.config).on_upgrade(move |socket| session(socket, state, grant)))
}

/// The size of each WebSocket session's read and write buffers, bytes: an idle session
/// costs little (tungstenite's default is 128 KiB each, allocated up front for reading).
/// A larger message still goes through: the buffers grow for it.
pub const WS_BUFFER_BYTES: usize = 4 * 1024;

/// The close reason of a message over [`ApiConfig::ws_max_message_bytes`], sent with
/// code 1009.
///
/// [`ApiConfig::ws_max_message_bytes`]: crate::ApiConfig::ws_max_message_bytes
pub const MESSAGE_TOO_BIG: &str = "message too big";

/// `ws` with the API's WebSocket bounds: the largest message and frame a client may send,
/// and small buffers.
pub(crate) fn bounded(ws: WebSocketUpgrade, config: &crate::ApiConfig) -> WebSocketUpgrade {
    ws.max_message_size(config.ws_max_message_bytes)
        .max_frame_size(config.ws_max_message_bytes)
        .read_buffer_size(WS_BUFFER_BYTES)
        .write_buffer_size(WS_BUFFER_BYTES)
}

/// Whether a read failed because the peer's message or frame was over the size limit.
pub(crate) fn too_big(error: &axum::Error) -> bool {
    std::error::Error::source(error)
        .and_then(|source| source.downcast_ref::<websocket_protocol::Error>())
        .is_some_and(|error| matches!(error, websocket_protocol::Error::Capacity(_)))
}

/// Runs one client's session until either side ends it.
async fn session(socket: WebSocket, state: AppState, grant: Grant) {
    let _counted = state.metrics.websocket_session();
    let started = Instant::now();
    // Milliseconds since `started` at which the peer last sent anything.
    let heard_from = Arc::new(AtomicU64::new(0));
    let oversized = CancellationToken::new();
    let (sink, stream) = socket.split();
    let mut send = tokio::spawn(send_loop(
        sink,
        state,
        grant,
        started,
        Arc::clone(&heard_from),
        oversized.clone(),
    ));
    let mut receive = tokio::spawn(receive_loop(stream, started, heard_from, oversized.clone()));
    tokio::select! {
        _ = &mut send => receive.abort(),
        _ = &mut receive => end_after_receive(send, &oversized).await,
    }
    tracing::debug!("A live WebSocket session ended.");
}

/// The receiving half ended: the sending half closes with 1009 if the peer sent a message
/// too big (bounded by its send timeout), and is stopped otherwise.
pub(crate) async fn end_after_receive(
    send: tokio::task::JoinHandle<()>,
    oversized: &CancellationToken,
) {
    if oversized.is_cancelled() {
        let _ = send.await;
    } else {
        send.abort();
    }
}

/// Reads until the peer closes, noting when it was last heard from; a message over the
/// size limit cancels `oversized` (the sending half then closes with 1009).
pub(crate) async fn receive_loop(
    mut stream: SplitStream<WebSocket>,
    started: Instant,
    heard_from: Arc<AtomicU64>,
    oversized: CancellationToken,
) {
    while let Some(message) = stream.next().await {
        let message = match message {
            Ok(message) => message,
            Err(error) => {
                if too_big(&error) {
                    tracing::info!(%error, "A WebSocket peer sent a message over the size limit; closing it with 1009.");
                    oversized.cancel();
                }
                break;
            }
        };
        heard_from.store(millis_since(started), Ordering::Relaxed);
        if let Message::Close(_) = message {
            break;
        }
    }
}

/// Why the send loop stopped.
enum End {
    /// Close with this frame.
    Close(u16, &'static str),
    /// The peer is gone or stuck: drop the connection.
    Drop,
}

/// Sends the snapshot, then every epoch, pings, and the final close frame.
async fn send_loop(
    mut sink: SplitSink<WebSocket, Message>,
    state: AppState,
    grant: Grant,
    started: Instant,
    heard_from: Arc<AtomicU64>,
    oversized: CancellationToken,
) {
    let end = stream_changes(&mut sink, &state, grant, started, &heard_from, &oversized).await;
    if let End::Close(code, reason) = end {
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        let _ = tokio::time::timeout(
            state.config.ws_send_timeout,
            sink.send(Message::Close(Some(frame))),
        )
        .await;
    }
}

async fn stream_changes(
    sink: &mut SplitSink<WebSocket, Message>,
    state: &AppState,
    grant: Grant,
    started: Instant,
    heard_from: &AtomicU64,
    oversized: &CancellationToken,
) -> End {
    let expired = grant.expired();
    tokio::pin!(expired);
    let timeout = state.config.ws_send_timeout;
    let ping_every = state.config.ws_ping_interval;
    // Subscribe before taking the snapshot: every later epoch is then either in the
    // snapshot or received below (and the ones already in the snapshot are skipped).
    let mut updates = state.read_model.subscribe();
    let mut last = match send_snapshot(sink, state, "connected", timeout).await {
        Some(epoch) => epoch,
        None => return End::Drop,
    };
    let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
    loop {
        tokio::select! {
            () = state.shutdown.cancelled() => {
                return End::Close(close_code::AWAY, "the server is shutting down");
            }
            () = &mut expired => {
                return End::Close(CLOSE_TOKEN_EXPIRED, TOKEN_EXPIRED_REASON);
            }
            () = oversized.cancelled() => return End::Close(close_code::SIZE, MESSAGE_TOO_BIG),
            _ = ping.tick() => {
                let silent = millis_since(started).saturating_sub(heard_from.load(Ordering::Relaxed));
                if silent > 2 * duration_millis(ping_every) + duration_millis(timeout) {
                    tracing::info!(silent_ms = silent, "A live WebSocket peer stopped answering pings; closing it.");
                    return End::Close(close_code::POLICY, "no answer to pings");
                }
                if !send(sink, Message::Ping(Default::default()), timeout).await {
                    return End::Drop;
                }
            }
            update = updates.recv() => match update {
                Ok(update) => {
                    if last.is_some_and(|last| update.epoch <= last) {
                        continue;
                    }
                    last = Some(update.epoch);
                    if !send_json(sink, &ServerMessage::Epoch(&update), timeout).await {
                        return End::Drop;
                    }
                }
                Err(RecvError::Lagged(missed)) => {
                    tracing::info!(missed, "A live WebSocket client fell behind; sending it a fresh snapshot.");
                    last = match send_snapshot(sink, state, "lagged", timeout).await {
                        Some(epoch) => epoch,
                        None => return End::Drop,
                    };
                }
                Err(RecvError::Closed) => {
                    return End::Close(close_code::AWAY, "the pipeline has stopped");
                }
            },
        }
    }
}

/// Sends a fresh snapshot; `Some(its epoch)` on success, `None` when the peer is gone.
async fn send_snapshot(
    sink: &mut SplitSink<WebSocket, Message>,
    state: &AppState,
    reason: &'static str,
    timeout: Duration,
) -> Option<Option<Epoch>> {
    let snapshot = state.read_model.snapshot();
    send_json(
        sink,
        &ServerMessage::Snapshot {
            reason,
            snapshot: &snapshot,
        },
        timeout,
    )
    .await
    .then_some(snapshot.epoch)
}

async fn send_json(
    sink: &mut SplitSink<WebSocket, Message>,
    message: &ServerMessage<'_>,
    timeout: Duration,
) -> bool {
    match serde_json::to_string(message) {
        Ok(text) => send(sink, Message::Text(text.into()), timeout).await,
        Err(error) => {
            tracing::error!(%error, "A live message could not be serialized.");
            false
        }
    }
}

/// Sends one message; `false` when the peer is gone or did not take it in time.
pub(crate) async fn send(
    sink: &mut SplitSink<WebSocket, Message>,
    message: Message,
    timeout: Duration,
) -> bool {
    match tokio::time::timeout(timeout, sink.send(message)).await {
        Ok(Ok(())) => true,
        Ok(Err(error)) => {
            tracing::debug!(%error, "A live WebSocket peer went away.");
            false
        }
        Err(_) => {
            tracing::info!("A live WebSocket peer did not take a message in time; dropping it.");
            false
        }
    }
}

pub(crate) fn millis_since(start: Instant) -> u64 {
    duration_millis(start.elapsed())
}

pub(crate) fn duration_millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
