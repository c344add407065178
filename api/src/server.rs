//! [`serve`]: the router on a listener, until shutdown, with per-connection bounds.
//!
//! Its own accept loop over hyper rather than `axum::serve`, which has none of these:
//!
//! - **Connection cap.** A semaphore of [`ApiConfig::max_connections`] permits is taken
//!   *before* each accept, and a connection holds its permit until its socket closes
//!   (an upgraded WebSocket's too). Over the cap nothing is refused: new connections wait
//!   in the listen backlog until one closes.
//! - **Header timeout.** A request's head must be complete within
//!   [`ApiConfig::http_header_timeout`] of the accept, or of its first byte on a kept-alive
//!   connection; otherwise the connection is closed. A client sending a byte now and then
//!   (slow-loris) holds a connection that long and no longer.
//! - **Idle timeout.** A kept-alive connection with no request in progress is closed after
//!   [`ApiConfig::http_idle_timeout`]. A request in progress is bounded by the router's
//!   request timeout instead; a WebSocket session by its pings.
//! - **Header size.** A head over [`HEADER_LIMIT`] is answered `431 headers_too_large` in
//!   the API's error shape; one over twice that is refused by hyper itself (a `431` with no
//!   body) before it is buffered any further.
//!
//! At shutdown the loop stops accepting, every connection finishes the request it is
//! serving and closes (idle ones at once), and [`serve`] returns once all have; WebSocket
//! sessions watch the same token and close themselves with a close frame.
//!
//! [`ApiConfig::max_connections`]: crate::ApiConfig::max_connections
//! [`ApiConfig::http_header_timeout`]: crate::ApiConfig::http_header_timeout
//! [`ApiConfig::http_idle_timeout`]: crate::ApiConfig::http_idle_timeout

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::error::ApiError;
use crate::router;
use crate::state::{ApiConfig, AppState};

/// The largest request head (request line and headers) answered, bytes.
pub const HEADER_LIMIT: usize = 64 * 1024;

/// Serves the API on `listener` until `state.shutdown` fires, then stops accepting,
/// finishes the requests in flight and returns. WebSocket sessions watch the same token
/// and close themselves with a final close frame.
///
/// # Errors
/// None so far: a failed accept (out of descriptors, a connection reset before it was
/// accepted) is logged and the loop goes on after a pause.
pub async fn serve(listener: TcpListener, state: AppState) -> io::Result<()> {
    let shutdown = state.shutdown.clone();
    let config = state.config.clone();
    serve_router(listener, router(state), config, shutdown).await
}

/// Serves `app` on `listener` with the bounds of `config` (connection cap, header and
/// idle timeouts) until `shutdown` fires, as [`serve`] does the API: also the metrics'
/// own address (`--metrics-listen`), which shares the process's descriptors.
///
/// # Errors
/// None so far, as [`serve`].
pub async fn serve_router(
    listener: TcpListener,
    app: Router,
    config: ApiConfig,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let permits = Arc::new(Semaphore::new(config.max_connections.max(1)));
    // Shared by the connections, which read their timeouts from it.
    let config = Arc::new(config);
    let connections = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                // Never closed; were it, there would be nothing left to serve with.
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                connections.spawn(connection(
                    stream,
                    permit,
                    app.clone(),
                    Arc::clone(&config),
                    shutdown.clone(),
                ));
            }
            Err(error) => {
                // Out of descriptors, or a connection reset before it was accepted: the
                // next accept may succeed; do not spin meanwhile.
                tracing::warn!(%error, "The API could not accept a connection.");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop(listener);
    connections.close();
    connections.wait().await;
    Ok(())
}

/// Serves one connection until it closes, it times out, or shutdown has drained it.
async fn connection(
    stream: TcpStream,
    permit: OwnedSemaphorePermit,
    app: Router,
    config: Arc<ApiConfig>,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let activity = Arc::new(Activity::new());
    let io = Watched {
        stream,
        activity: Arc::clone(&activity),
        _permit: permit,
    };
    let service = {
        let activity = Arc::clone(&activity);
        hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let in_flight = InFlight::begin(Arc::clone(&activity));
            let app = app.clone();
            async move {
                let response = app.oneshot(request).await?;
                Ok::<_, std::convert::Infallible>(response.map(|body| {
                    Body::new(Guarded {
                        body,
                        _in_flight: in_flight,
                    })
                }))
            }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .max_header_size(2 * HEADER_LIMIT)
        .max_buf_size(2 * HEADER_LIMIT + 8 * 1024);
    let served = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(served);
    let mut draining = false;
    loop {
        let deadline = activity.deadline(&config);
        tokio::select! {
            result = served.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%error, "An API connection ended with an error.");
                }
                return;
            }
            () = shutdown.cancelled(), if !draining => {
                draining = true;
                served.as_mut().graceful_shutdown();
            }
            () = activity.changed.notified() => {}
            () = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                match activity.expired(&config) {
                    Some(Expired::Head) => {
                        tracing::debug!("A request head did not arrive in time; closing its connection.");
                        return;
                    }
                    Some(Expired::Stalled) => {
                        tracing::debug!("A connection's peer stopped taking its answers; closing it.");
                        return;
                    }
                    Some(Expired::Idle) => return,
                    None => {}
                }
            }
        }
    }
}

/// What a connection is doing, as its watchdog sees it: written by the socket's reads and
/// by the requests' start and end, read when a deadline passes.
#[derive(Debug)]
struct Activity {
    /// When the connection was accepted; times below are milliseconds since.
    started: Instant,
    /// Requests being served (their answers not yet written in full).
    in_flight: AtomicU32,
    /// A request head is being read: the first byte arrived (or the connection is new)
    /// and no request is in flight.
    reading_head: AtomicBool,
    /// When the current phase (reading a head, idle) began.
    since_ms: AtomicU64,
    /// When the socket last moved bytes either way: while a request is in flight, a
    /// connection whose peer neither reads its answers nor sends is stalled.
    io_ms: AtomicU64,
    /// Woken when the phase changes, so that the watchdog takes the new deadline.
    changed: Notify,
}

/// Which bound a connection exceeded.
#[derive(Debug, PartialEq, Eq)]
enum Expired {
    /// Its request head did not arrive within the header timeout.
    Head,
    /// It was idle longer than the idle timeout.
    Idle,
    /// A request was in flight and the socket moved nothing for longer than the request
    /// and send timeouts.
    Stalled,
}

impl Activity {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            in_flight: AtomicU32::new(0),
            // A new connection owes its first request's head.
            reading_head: AtomicBool::new(true),
            since_ms: AtomicU64::new(0),
            io_ms: AtomicU64::new(0),
            changed: Notify::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Bytes went out.
    fn wrote(&self) {
        self.io_ms.store(self.now_ms(), Ordering::Release);
    }

    /// Bytes arrived: on an idle connection, a request head begins.
    fn read(&self) {
        self.io_ms.store(self.now_ms(), Ordering::Release);
        if self.in_flight.load(Ordering::Acquire) == 0
            && !self.reading_head.swap(true, Ordering::AcqRel)
        {
            self.since_ms.store(self.now_ms(), Ordering::Release);
            self.changed.notify_one();
        }
    }

    /// When the current phase's bound passes. While a request is in flight: the request
    /// timeout (the handler's bound) and the send timeout after the socket last moved, so
    /// that a peer that stops reading its answers (pipelining more) cannot hold the
    /// connection, its permit, or a graceful shutdown, for ever.
    fn deadline(&self, config: &ApiConfig) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            let io = self.started + Duration::from_millis(self.io_ms.load(Ordering::Acquire));
            return Some(io + config.request_timeout + config.ws_send_timeout);
        }
        let since = self.started + Duration::from_millis(self.since_ms.load(Ordering::Acquire));
        Some(if self.reading_head.load(Ordering::Acquire) {
            since + config.http_header_timeout
        } else {
            since + config.http_idle_timeout
        })
    }

    /// Whether the current phase has outlived its bound.
    fn expired(&self, config: &ApiConfig) -> Option<Expired> {
        let deadline = self.deadline(config)?;
        if Instant::now() < deadline {
            None
        } else if self.in_flight.load(Ordering::Acquire) > 0 {
            Some(Expired::Stalled)
        } else if self.reading_head.load(Ordering::Acquire) {
            Some(Expired::Head)
        } else {
            Some(Expired::Idle)
        }
    }
}

/// One request in flight on a connection, from its head parsed to its answer written
/// (dropped with the answer's body).
#[derive(Debug)]
struct InFlight {
    activity: Arc<Activity>,
}

impl InFlight {
    fn begin(activity: Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        activity.reading_head.store(false, Ordering::Release);
        activity.changed.notify_one();
        Self { activity }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.activity.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The connection is idle from now on.
            self.activity
                .since_ms
                .store(self.activity.now_ms(), Ordering::Release);
            self.activity.changed.notify_one();
        }
    }
}

/// An answer's body, holding its request's [`InFlight`] until written (or dropped).
struct Guarded {
    body: Body,
    _in_flight: InFlight,
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The connection's socket: tells [`Activity`] when bytes arrive, and holds the
/// connection's permit until it is closed (also after a WebSocket upgrade took it over).
#[derive(Debug)]
struct Watched {
    stream: TcpStream,
    activity: Arc<Activity>,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.read();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(written)) if written > 0) {
            self.activity.wrote();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(written)) if written > 0) {
            self.activity.wrote();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Middleware answering `431 headers_too_large` for a request head over
/// [`HEADER_LIMIT`] (as hyper counts it: the request line and each header's name, value
/// and separators).
pub async fn limit_headers(request: Request, next: Next) -> Response {
    let size = request.method().as_str().len()
        // Without formatting the URI anew; an absolute-form target's scheme and authority
        // are also the Host header's, counted below.
        + request
            .uri()
            .path_and_query()
            .map_or(0, |target| target.as_str().len())
        + request
            .headers()
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum::<usize>();
    if size > HEADER_LIMIT {
        return ApiError::HeadersTooLarge {
            limit: HEADER_LIMIT,
        }
        .into_response();
    }
    next.run(request).await
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn config() -> ApiConfig {
        ApiConfig {
            http_header_timeout: Duration::from_secs(10),
            http_idle_timeout: Duration::from_secs(60),
            ..ApiConfig::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_whose_answer_nobody_takes_stalls_its_connection() {
        let config = config();
        let activity = Arc::new(Activity::new());
        let _request = InFlight::begin(Arc::clone(&activity));
        // Answers go out while the peer reads them ...
        tokio::time::advance(Duration::from_secs(15)).await;
        activity.wrote();
        tokio::time::advance(Duration::from_secs(15)).await;
        assert_eq!(activity.expired(&config), None);
        // ... then it stops reading: nothing moves for the request and send timeouts.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(activity.expired(&config), Some(Expired::Stalled));
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_connection_owes_its_head_then_idles_between_requests() {
        let config = config();
        let activity = Arc::new(Activity::new());
        let accepted = Instant::now();
        assert_eq!(
            activity.deadline(&config),
            Some(accepted + Duration::from_secs(10))
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(activity.expired(&config), Some(Expired::Head));

        // A request in flight is bounded by the request and send timeouts (10 s each)
        // after the socket last moved bytes (here: none since the accept).
        let request = InFlight::begin(Arc::clone(&activity));
        assert_eq!(
            activity.deadline(&config),
            Some(accepted + Duration::from_secs(20))
        );
        // Bytes read while it is served (its body) start no head; they move that bound.
        activity.read();
        assert_eq!(
            activity.deadline(&config),
            Some(Instant::now() + Duration::from_secs(20))
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        drop(request);
        let idle = Instant::now();
        assert_eq!(
            activity.deadline(&config),
            Some(idle + Duration::from_secs(60))
        );

        // The next request's first byte starts its head's clock.
        tokio::time::advance(Duration::from_secs(30)).await;
        activity.read();
        assert_eq!(
            activity.deadline(&config),
            Some(idle + Duration::from_secs(40))
        );
        // More bytes do not restart it.
        tokio::time::advance(Duration::from_secs(9)).await;
        activity.read();
        assert_eq!(activity.expired(&config), None);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(activity.expired(&config), Some(Expired::Head));
    }
}
