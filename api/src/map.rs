//! `GET /`: the operations map, one self-contained HTML page (inline JS, no CDN).
//!
//! It loads `/api/snapshot`, then follows `/ws/changes`: zones and couriers drawn on a
//! canvas (a courier inside a zone in that zone's colour), a few live aggregates beside.

use axum::Router;
use axum::response::Html;
use axum::routing::get;

use crate::state::AppState;

/// The page, compiled in.
const MAP_PAGE: &str = include_str!("map.html");

/// The routes of this module.
pub fn router() -> Router<AppState> {
    Router::new().route("/", get(map))
}

/// The operations map: one self-contained HTML page.
#[utoipa::path(
    get,
    path = "/",
    operation_id = "mapPage",
    tag = "read model",
    summary = "The operations map page",
    description = "One self-contained HTML page (inline script, no CDN) that loads \
        `/api/snapshot` and follows `/ws/changes`.",
    responses((status = 200, description = "The page.", body = String, content_type = "text/html"))
)]
async fn map() -> Html<&'static str> {
    Html(MAP_PAGE)
}
