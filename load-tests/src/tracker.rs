//! WebSocket trackers: M clients, each following part of the fleet.
//!
//! Two ways to follow, chosen by [`WsMode`]:
//! - [`WsMode::Track`]: `GET /ws/track/{delivery_id}`, the customer's view. Each tracker
//!   picks a live delivery of the fleet (one assigned at least 600 ms ago, so the read
//!   model has it), connects with that customer's token, follows its courier's
//!   moves until the session closes with the delivery's end, and picks the next one.
//! - [`WsMode::Changes`]: `GET /ws/changes` with an admin's token (the stream is the
//!   admins'), every change of every epoch. Tracker `j` of
//!   `M` follows the couriers `c` with `c mod M = j` (or, with more trackers than couriers,
//!   courier `j mod N`), so every courier is followed.
//!
//! For every position change of a followed courier the tracker looks the fix up in the
//! [`SentLog`] by `at_ms`: the latency publish → receipt, and the fix's sequence number.
//! Skipped sequence numbers are gaps; at the end, fixes published after the last one a
//! tracker received are `unseen_at_end`. The WebSocket carries each courier's latest
//! position per epoch, so a gap is a lost fix — or two fixes of one courier in the same
//! epoch (above about one fix per epoch interval per courier).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use delivertrack_dataflow::{CourierId, CustomerId, DeliveryId, UnixMillis};
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;

use crate::auth::Tokens;
use crate::record::Recorder;
use crate::sent::SentLog;
use crate::target::Target;

/// Which WebSocket route trackers use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WsMode {
    /// `/ws/track/{delivery_id}`: one delivery per session.
    Track,
    /// `/ws/changes`: every change.
    Changes,
}

/// Deliveries of the fleet that trackers may follow.
#[derive(Debug, Default)]
pub struct LiveDeliveries {
    inner: Mutex<LiveInner>,
}

#[derive(Debug, Default)]
struct LiveInner {
    /// `(delivery, customer, courier index, assigned at)`, oldest first.
    live: VecDeque<(DeliveryId, CustomerId, usize, Instant)>,
    next: usize,
}

/// At most this many live deliveries are remembered (the oldest are forgotten).
const LIVE_CAPACITY: usize = 100_000;

impl LiveDeliveries {
    /// A delivery was assigned to courier `courier` just now.
    pub fn assigned(&self, delivery: DeliveryId, customer: CustomerId, courier: usize) {
        if let Ok(mut inner) = self.inner.lock() {
            if inner.live.len() >= LIVE_CAPACITY {
                inner.live.pop_front();
            }
            inner
                .live
                .push_back((delivery, customer, courier, Instant::now()));
        }
    }

    /// A delivery ended.
    pub fn ended(&self, delivery: DeliveryId) {
        if let Ok(mut inner) = self.inner.lock()
            && let Some(at) = inner.live.iter().position(|(d, ..)| *d == delivery)
        {
            inner.live.remove(at);
        }
    }

    /// The next delivery to follow, round-robin over those assigned at least `settle` ago.
    pub fn pick(&self, settle: Duration) -> Option<(DeliveryId, CustomerId, usize)> {
        let mut inner = self.inner.lock().ok()?;
        let ready = inner
            .live
            .iter()
            .take_while(|(.., at)| at.elapsed() >= settle)
            .count();
        if ready == 0 {
            return None;
        }
        inner.next = (inner.next + 1) % ready;
        inner.live.get(inner.next).map(|&(d, c, i, _)| (d, c, i))
    }
}

/// How long after its assignment a delivery is followed: the read model must have it
/// (an epoch of at most a few hundred milliseconds), or the route answers 404.
const SETTLE: Duration = Duration::from_millis(600);

/// How the trackers run.
#[derive(Clone, Debug)]
pub struct TrackerConfig {
    /// Trackers.
    pub count: usize,
    /// The route.
    pub mode: WsMode,
    /// New connections per second at most while connecting.
    pub connect_rate: f64,
    /// Handshakes in flight at most.
    pub connect_concurrency: usize,
    /// Each client's WebSocket read buffer, bytes (tungstenite's default is 128 KiB, which
    /// 20 000 clients would hold in vain: trackers read small frames).
    pub read_buffer: usize,
}

/// What every tracker shares.
#[derive(Debug)]
pub struct TrackerContext {
    /// Where to connect.
    pub target: Target,
    /// The fleet's fixes.
    pub sent: Arc<SentLog>,
    /// The fleet's live deliveries (track mode).
    pub live: Arc<LiveDeliveries>,
    /// Token signing (track mode).
    pub tokens: Option<Tokens>,
    /// Measurements.
    pub recorder: Arc<Recorder>,
    /// Fires when the trackers should close.
    pub stop: CancellationToken,
}

/// One frame from the server: the fields any of our routes may carry (others ignored).
#[derive(Debug, Deserialize)]
struct Frame {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    changes: Vec<ChangeFrame>,
    #[serde(default)]
    courier_id: Option<CourierId>,
    #[serde(default)]
    at_ms: Option<UnixMillis>,
}

#[derive(Debug, Deserialize)]
struct ChangeFrame {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    courier_id: Option<CourierId>,
    #[serde(default)]
    at_ms: Option<UnixMillis>,
}

/// A tracker's view of the couriers it follows.
#[derive(Debug, Default)]
struct Follow {
    /// Last sequence number received, per courier index.
    seen: HashMap<usize, u64>,
    latencies: Vec<Duration>,
}

impl Follow {
    fn moved(&mut self, ctx: &TrackerContext, courier: usize, at_ms: UnixMillis, now: Instant) {
        match ctx.sent.lookup(courier, at_ms) {
            Some((seq, sent)) => {
                self.latencies.push(now.saturating_duration_since(sent));
                let last = self.seen.get(&courier).copied();
                ctx.recorder.loss(|l| {
                    l.received += 1;
                    match last {
                        Some(last) if seq > last + 1 => l.gaps += seq - last - 1,
                        Some(last) if seq <= last => l.duplicates += 1,
                        _ => {}
                    }
                });
                let entry = self.seen.entry(courier).or_insert(seq);
                *entry = (*entry).max(seq);
            }
            None => ctx.recorder.loss(|l| l.unmatched += 1),
        }
    }

    /// After a resync the next fix starts a new count.
    fn forget(&mut self) {
        self.seen.clear();
    }

    fn flush(&mut self, ctx: &TrackerContext) {
        ctx.recorder
            .latencies(crate::record::Series::PublishToWebSocket, &self.latencies);
        self.latencies.clear();
    }

    /// Fixes published after the last one received, for the couriers still followed.
    fn unseen(&self, ctx: &TrackerContext) -> u64 {
        self.seen
            .iter()
            .map(|(&c, &seen)| ctx.sent.last_seq(c).saturating_sub(seen))
            .sum()
    }
}

/// Runs `config.count` trackers until `ctx.stop` fires; returns once all have closed.
pub async fn run_trackers(config: TrackerConfig, ctx: Arc<TrackerContext>) {
    let handshakes = Arc::new(Semaphore::new(config.connect_concurrency.max(1)));
    let pause = Duration::from_secs_f64(1.0 / config.connect_rate.max(1.0));
    let mut tasks = Vec::with_capacity(config.count);
    for j in 0..config.count {
        if ctx.stop.is_cancelled() {
            break;
        }
        let ctx = Arc::clone(&ctx);
        let handshakes = Arc::clone(&handshakes);
        let count = config.count;
        let read_buffer = config.read_buffer;
        tasks.push(tokio::spawn(async move {
            match config.mode {
                WsMode::Changes => changes_tracker(j, count, &ctx, &handshakes, read_buffer).await,
                WsMode::Track => track_tracker(&ctx, &handshakes, read_buffer).await,
            }
        }));
        tokio::time::sleep(pause).await;
    }
    for task in tasks {
        let _ = task.await;
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connects, unless the stop fires first (then `None`, and no error is counted).
async fn connect(
    ctx: &TrackerContext,
    handshakes: &Semaphore,
    url: &str,
    read_buffer: usize,
) -> Option<Socket> {
    let config = WebSocketConfig::default()
        .read_buffer_size(read_buffer.max(1_024))
        .write_buffer_size(0);
    let _permit = tokio::select! {
        permit = handshakes.acquire() => permit.ok()?,
        () = ctx.stop.cancelled() => return None,
    };
    let attempt = tokio::select! {
        attempt = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async_with_config(url, Some(config), true),
        ) => attempt,
        () = ctx.stop.cancelled() => return None,
    };
    match attempt {
        Ok(Ok((socket, _))) => Some(socket),
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(response))) => {
            ctx.recorder
                .error(format!("ws_connect_http_{}", response.status().as_u16()));
            None
        }
        Ok(Err(error)) => {
            ctx.recorder
                .error(format!("ws_connect_{}", ws_error_kind(&error)));
            None
        }
        Err(_) => {
            ctx.recorder.error("ws_connect_timeout");
            None
        }
    }
}

fn ws_error_kind(error: &tokio_tungstenite::tungstenite::Error) -> &'static str {
    use tokio_tungstenite::tungstenite::Error;
    match error {
        Error::Io(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => "refused",
        Error::Io(e) if e.raw_os_error() == Some(24) => "too_many_open_files",
        Error::Io(e) if e.raw_os_error() == Some(99) => "no_local_port",
        Error::Io(_) => "io",
        Error::ConnectionClosed | Error::AlreadyClosed => "closed",
        Error::Protocol(_) => "protocol",
        _ => "other",
    }
}

/// One `/ws/changes` session for the whole run.
async fn changes_tracker(
    j: usize,
    m: usize,
    ctx: &TrackerContext,
    handshakes: &Semaphore,
    read_buffer: usize,
) {
    let n = ctx.sent.couriers();
    let follows = |c: usize| {
        if m >= n {
            n > 0 && c == j % n
        } else {
            c % m == j
        }
    };
    // The change stream is the admins': the harness signs an admin token.
    let Some(token) = ctx.tokens.as_ref().and_then(|tokens| tokens.admin().ok()) else {
        ctx.recorder.error("ws_changes_without_token");
        return;
    };
    let url = ctx.target.ws(&format!("/ws/changes?access_token={token}"));
    let Some(socket) = connect(ctx, handshakes, &url, read_buffer).await else {
        return;
    };
    ctx.recorder.ws_opened();
    let mut follow = Follow::default();
    let closed_by_server = session(ctx, socket, &mut follow, |frame, follow, now| {
        if frame.kind == "snapshot" && frame.reason.as_deref() == Some("lagged") {
            ctx.recorder.loss(|l| l.resyncs += 1);
            follow.forget();
        }
        for change in &frame.changes {
            if change.kind != "courier_moved" {
                continue;
            }
            if let (Some(id), Some(at)) = (change.courier_id, change.at_ms)
                && let Some(c) = ctx.sent.courier_index(&id)
                && follows(c)
            {
                follow.moved(ctx, c, at, now);
            }
        }
    })
    .await;
    ctx.recorder.ws_closed();
    if closed_by_server {
        ctx.recorder.error("ws_closed_by_server");
    }
    // A followed courier never heard from counts whole.
    let never: u64 = (0..n)
        .filter(|&c| follows(c) && !follow.seen.contains_key(&c))
        .map(|c| ctx.sent.last_seq(c))
        .sum();
    let unseen = follow.unseen(ctx) + never;
    ctx.recorder.loss(|l| l.unseen_at_end += unseen);
}

/// `/ws/track/{id}` sessions, one delivery after another, until the stop.
async fn track_tracker(ctx: &TrackerContext, handshakes: &Semaphore, read_buffer: usize) {
    let Some(tokens) = &ctx.tokens else {
        ctx.recorder.error("ws_track_without_token");
        return;
    };
    while !ctx.stop.is_cancelled() {
        let Some((delivery, customer, courier)) = ctx.live.pick(SETTLE) else {
            tokio::select! {
                () = ctx.stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(200)) => continue,
            }
        };
        let token = match tokens.customer(customer) {
            Ok(token) => token,
            Err(_) => {
                ctx.recorder.error("token");
                return;
            }
        };
        let url = ctx
            .target
            .ws(&format!("/ws/track/{}?access_token={token}", delivery.0));
        let Some(socket) = connect(ctx, handshakes, &url, read_buffer).await else {
            tokio::select! {
                () = ctx.stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(200)) => continue,
            }
        };
        ctx.recorder.ws_opened();
        let mut follow = Follow::default();
        session(ctx, socket, &mut follow, |frame, follow, now| {
            match frame.kind.as_str() {
                "courier_moved" => {
                    if let (Some(id), Some(at)) = (frame.courier_id, frame.at_ms)
                        && ctx.sent.courier_index(&id) == Some(courier)
                    {
                        follow.moved(ctx, courier, at, now);
                    }
                }
                "snapshot" if frame.reason.as_deref() == Some("lagged") => {
                    ctx.recorder.loss(|l| l.resyncs += 1);
                    follow.forget();
                }
                _ => {}
            }
        })
        .await;
        ctx.recorder.ws_closed();
        if ctx.stop.is_cancelled() {
            let unseen = follow.unseen(ctx);
            ctx.recorder.loss(|l| l.unseen_at_end += unseen);
        } else {
            // The delivery ended: its courier's later fixes are not this session's.
            ctx.live.ended(delivery);
        }
    }
}

/// Reads frames until the stop (then closes politely) or the server closes. Returns
/// whether the server ended the session.
async fn session(
    ctx: &TrackerContext,
    socket: Socket,
    follow: &mut Follow,
    mut on_frame: impl FnMut(&Frame, &mut Follow, Instant),
) -> bool {
    let (mut sink, mut stream) = socket.split();
    let closed_by_server = loop {
        tokio::select! {
            () = ctx.stop.cancelled() => break false,
            message = stream.next() => match message {
                Some(Ok(Message::Text(text))) => {
                    let now = Instant::now();
                    ctx.recorder.ws_messages.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    match serde_json::from_str::<Frame>(&text) {
                        Ok(frame) => on_frame(&frame, follow, now),
                        Err(_) => ctx.recorder.error("ws_bad_frame"),
                    }
                    follow.flush(ctx);
                }
                Some(Ok(Message::Close(_))) | None => break true,
                Some(Ok(_)) => {}
                Some(Err(_)) => {
                    ctx.recorder.error("ws_read");
                    break true;
                }
            },
        }
    };
    if !closed_by_server {
        let _ = tokio::time::timeout(Duration::from_secs(2), sink.send(Message::Close(None))).await;
    }
    closed_by_server
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn live_deliveries_are_picked_round_robin_once_settled_and_forgotten_when_ended() {
        let live = LiveDeliveries::default();
        assert_eq!(live.pick(Duration::ZERO), None);
        let d = |n| DeliveryId(Uuid::from_u128(n));
        let c = CustomerId(Uuid::from_u128(9));
        live.assigned(d(1), c, 0);
        live.assigned(d(2), c, 1);
        assert_eq!(live.pick(Duration::from_secs(60)), None, "not settled yet");
        let a = live.pick(Duration::ZERO).unwrap().0;
        let b = live.pick(Duration::ZERO).unwrap().0;
        assert_ne!(a, b);
        live.ended(d(1));
        assert_eq!(live.pick(Duration::ZERO).unwrap().0, d(2));
    }

    #[test]
    fn frames_of_both_routes_parse_with_unknown_fields_ignored() {
        let changes: Frame = serde_json::from_str(
            r#"{"type":"epoch","epoch":3,"rejected":0,"changes":[
                {"type":"courier_moved","courier_id":"00000000-0000-0000-0000-000000000001",
                 "position":{"lat":52.5,"lon":13.4},"at_ms":1000,"speed_mps":null,"heading_deg":null,"odometer_m":1.5},
                {"type":"metric","scope":"overall","success_rate":0.5}]}"#,
        )
        .unwrap();
        assert_eq!(changes.changes.len(), 2);
        assert_eq!(changes.changes[0].at_ms, Some(1000));
        let track: Frame = serde_json::from_str(
            r#"{"type":"courier_moved","epoch":4,"courier_id":"00000000-0000-0000-0000-000000000001",
                "position":{"lat":52.5,"lon":13.4},"at_ms":2000,"odometer_m":3.0}"#,
        )
        .unwrap();
        assert_eq!(track.at_ms, Some(2000));
        assert!(track.courier_id.is_some());
    }
}
