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

/// Serves `/healthz` and a `503` for everything else on `listener`, with `phase`'s
/// reason, until stopped.
pub fn serve(listener: TcpListener, phase: watch::Receiver<Phase>) -> StandbyServer {
    let stop = CancellationToken::new();
    let router = Router::new()
        .route("/healthz", get(healthz))
        .fallback(not_ready)
        .with_state(phase);
    let stopped = stop.clone();
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(stopped.cancelled_owned())
            .await;
        if let Err(error) = served {
            tracing::warn!(%error, "The standby server failed; the API will answer once this process is the writer.");
        }
    });
    StandbyServer { stop, task }
}

impl StandbyServer {
    /// Stops accepting, lets requests in progress finish (at most a second), and gives the
    /// socket back to whoever holds the other handle on it.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if tokio::time::timeout(Duration::from_secs(1), &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
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
