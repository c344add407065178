//! The authenticated read routes: deliveries (one, and pages of them), zones, and the
//! records of couriers and customers.
//!
//! | route | who | source |
//! |---|---|---|
//! | `GET /deliveries/{id}` | its customer, its courier, admins | the read model, else PostgreSQL |
//! | `GET /deliveries?status=&limit=&cursor=` | everyone, each seeing their own | the read model |
//! | `GET /zones`, `GET /zones/{id}` | admins | the read model |
//! | `GET /couriers/{id}`, `PUT /couriers/{id}` | admins | PostgreSQL, joined with the read model |
//! | `GET /customers/{id}` | admins, and the customer themself | PostgreSQL |
//! | `PUT /customers/{id}` | admins | PostgreSQL |
//!
//! A delivery that is not the caller's is answered `404`, exactly like one that does not
//! exist, so that ids cannot be probed; a route a role may not use at all is `403`.
//!
//! # Layout
//! - [`access`] — who may see which delivery.
//! - [`deliveries`] — one delivery, and the paginated list.
//! - [`cursor`] — the opaque page cursor.
//! - [`zones`] — the zones.
//! - [`profiles`] — courier and customer records.
//! - [`records`] — the PostgreSQL queries behind them.

pub mod access;
pub mod cursor;
pub mod deliveries;
pub mod profiles;
pub mod records;
pub mod zones;

use axum::Router;

use crate::state::AppState;

/// The routes of this module.
pub fn router() -> Router<AppState> {
    Router::new()
        .merge(deliveries::router())
        .merge(zones::router())
        .merge(profiles::router())
}
