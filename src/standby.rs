//! What `run` serves before it is the writer: while it opens the stores, and above all
//! while it waits as a hot standby for the writer lock another process holds
//! ([`WriterLock`](delivertrack_sinks::postgres::WriterLock), ARCHITECTURE rule 10).
//!
//! A small server of its own answers on the API's address meanwhile: `GET /healthz` is
//! `200` (the process is alive: an orchestrator must not restart a standby), `GET /readyz`
//! and every other route are `503` with the error body of the API, code `standby` (another
//! process writes; the message names it) or `starting` (the stores are being opened and the
//! state read back). A load balancer therefore routes nothing to a standby. The real API
//! replaces it on the same socket once this process holds the lock and has hydrated.

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Where a starting `run` is, as its standby server tells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Opening the stores, migrating, hydrating.
    Starting,
    /// Waiting for the writer lock of `database`, held by `holder`.
    Standby {
        /// `user@host:port/db`.
        database: String,
        /// Who holds the lock, as far as PostgreSQL tells.
        holder: String,
    },
}

impl Phase {
    /// The error code and sentence `/readyz` answers with.
    fn answer(&self) -> (&'static str, String) {
        match self {
            Phase::Starting => (
                "starting",
                "this process is starting: it opens the stores and reads the state back".into(),
            ),
            Phase::Standby { database, holder } => (
                "standby",
                format!(
                    "this process is a standby: {holder} writes to {database}; this one takes over when it stops"
                ),
            ),
        }
    }
}

/// The standby server, running until [`stop`](Self::stop).
#[derive(Debug)]
pub struct StandbyServer {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// How long one connection to the standby server may take: each answers one request and
/// closes, so this only bounds a client that connects and sends nothing.
const CONNECTION_PATIENCE: Duration = Duration::from_secs(5);

/// Serves `/healthz` and a `503` for everything else on `listener`, with `phase`'s
/// reason, until stopped.
///
/// Its own accept loop rather than `axum::serve`: a graceful shutdown closes a connection
/// that was accepted but whose request was not read yet, so a client that connected just
/// before the handover would see its connection closed without an answer. Here stopping
/// ends only the accepting; every accepted connection is answered (by the standby) and
/// every later one waits in the socket's backlog for the API.
pub fn serve(listener: TcpListener, phase: watch::Receiver<Phase>) -> StandbyServer {
    let stop = CancellationToken::new();
    let router = Router::new()
        .route("/healthz", get(healthz))
        .fallback(not_ready)
        .with_state(phase);
    let stopped = stop.clone();
    let task = tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = stopped.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(answer(stream, router.clone()));
                }
                Err(error) => {
                    // Out of descriptors, or a connection reset before it was accepted: the
                    // next accept may succeed; do not spin meanwhile.
                    tracing::debug!(%error, "The standby server could not accept a connection.");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    StandbyServer { stop, task }
}

/// Answers the requests of one connection (one, as every answer closes it), within
/// [`CONNECTION_PATIENCE`].
async fn answer(stream: tokio::net::TcpStream, router: Router) {
    let service = hyper_util::service::TowerToHyperService::new(router);
    let connection = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    if let Ok(Err(error)) = tokio::time::timeout(CONNECTION_PATIENCE, connection).await {
        tracing::debug!(%error, "A connection to the standby server failed.");
    }
}

impl StandbyServer {
    /// Stops accepting and gives the socket back to whoever holds the other handle on it.
    /// Connections already accepted are still answered, by their own tasks.
    pub async fn stop(mut self) {
        self.stop.cancel();
        // The loop ends at its next turn: it never blocks between turns.
        let _ = (&mut self.task).await;
    }
}

impl Drop for StandbyServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Every answer closes its connection: a client's kept-alive connection to the standby
/// server would otherwise break when the API takes the socket over.
const CLOSE: (axum::http::HeaderName, &str) = (axum::http::header::CONNECTION, "close");

async fn healthz() -> impl IntoResponse {
    ([CLOSE], axum::Json(serde_json::json!({"status": "ok"})))
}

async fn not_ready(State(phase): State<watch::Receiver<Phase>>) -> Response {
    let (code, message) = phase.borrow().answer();
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [CLOSE],
        axum::Json(serde_json::json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn a_standby_names_the_writer_and_the_database() {
        let (code, message) = Phase::Standby {
            database: "postgres@db:5432/delivertrack".into(),
            holder: "delivertrack run (pid 7 on a)".into(),
        }
        .answer();
        assert_eq!(code, "standby");
        assert!(message.contains("pid 7") && message.contains("/delivertrack"));
        assert_eq!(Phase::Starting.answer().0, "starting");
    }
}
