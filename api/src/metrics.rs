//! `GET /metrics`: every metric registered in the state's Prometheus registry, in the text
//! exposition format.
//!
//! The API does not own the metrics: the source, the driver and later the sinks register
//! theirs in the one [`prometheus::Registry`] the binary puts in [`AppState`], and this
//! route only renders it, so a new metric needs no change here.

use axum::Router;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus::{Encoder, TextEncoder};

use crate::error::ApiError;
use crate::state::AppState;

/// The routes of this module.
pub fn router() -> Router<AppState> {
    Router::new().route("/metrics", get(metrics))
}

/// `200` with the text format (`text/plain; version=0.0.4`).
async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let encoder = TextEncoder::new();
    let mut body = Vec::new();
    encoder
        .encode(&state.registry.gather(), &mut body)
        .map_err(|error| ApiError::Internal(Box::new(error)))?;
    Ok(([(CONTENT_TYPE, encoder.format_type().to_owned())], body).into_response())
}
