//! `GET /`: the operations map, one self-contained HTML page (inline JS, no CDN).
//!
//! The page itself is public and holds no data. It signs in with an admin token — from a
//! `#access_token=` fragment (the demo's banner link) or a form — kept in the tab's
//! `sessionStorage`, loads `/api/snapshot` with it, then follows `/ws/changes`
//! (`?access_token=`): zones and couriers drawn on a canvas (a courier inside a zone in that
//! zone's colour), a few live aggregates beside. Served with a Content-Security-Policy
//! that allows its own inline script and style by hash and nothing else ([`crate::page`]).

use std::sync::LazyLock;

use axum::Router;
use axum::response::Response;
use axum::routing::get;

use crate::page;
use crate::state::AppState;

/// The page, compiled in.
const MAP_PAGE: &str = include_str!("map.html");

/// Its Content-Security-Policy, from its own inline blocks.
static MAP_POLICY: LazyLock<String> =
    LazyLock::new(|| page::policy(MAP_PAGE, page::Sources::default()));

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
    description = "One self-contained HTML page (inline script, no CDN) that signs in with an \
        admin token (a `#access_token=` fragment, or its form), loads `/api/snapshot` and \
        follows `/ws/changes`. Sent with a Content-Security-Policy (inline script and style by \
        hash, `frame-ancestors 'none'`) and `X-Content-Type-Options: nosniff`.",
    responses((status = 200, description = "The page.", body = String, content_type = "text/html"))
)]
async fn map() -> Response {
    page::html(MAP_PAGE, &MAP_POLICY)
}
