//! The GraphQL analytics API (async-graphql): success rates, courier efficiency, peak
//! times and satisfaction from the dataflow's aggregates, deliveries with the REST role
//! checks, and live metric subscriptions.
//!
//! | route | |
//! |---|---|
//! | `POST /graphql` | queries (`{"query", "variables", "operationName"}`); a bearer token is required (`401` otherwise) |
//! | `GET /graphql` | the GraphiQL page (`?access_token=` presets a token) |
//! | `GET /graphql/ws` | subscriptions over a WebSocket (`graphql-transport-ws`) |
//!
//! Every figure is read from the in-memory [`ReadModel`](delivertrack_sinks::ReadModel),
//! which holds the dataflow's accumulated output, so the numbers are the dataflow's. The
//! schema is built once, in [`router`]; the caller's [`Principal`](crate::Principal) and
//! the read model go into each request's (or WebSocket connection's) context data.
//!
//! Errors a resolver raises carry `extensions.code`: `UNAUTHENTICATED`, `FORBIDDEN`
//! (analytics are for admins), `BAD_USER_INPUT`, `QUERY_TOO_DEEP`, `QUERY_TOO_COMPLEX`
//! (see [`limits`]).
//!
//! # Layout
//! - [`query`] — [`QueryRoot`]: the queries.
//! - [`subscription`] — [`SubscriptionRoot`]: `metricChanged`.
//! - [`types`] — the object types and enums.
//! - [`access`] — who may read what, and the error codes.
//! - [`limits`] — [`QueryLimits`]: depth and complexity limits.
//! - [`http`] — the `POST` handler and the GraphiQL page.
//! - [`ws`] — the WebSocket endpoint.

pub mod access;
pub mod http;
pub mod limits;
pub mod query;
pub mod subscription;
pub mod types;
pub mod ws;

use async_graphql::{EmptyMutation, Schema};
use axum::routing::get;
use axum::{Extension, Router};

pub use limits::{MAX_COMPLEXITY, MAX_DEPTH, QueryLimits};
pub use query::QueryRoot;
pub use subscription::SubscriptionRoot;

use crate::state::AppState;

/// The schema: queries, no mutations (commands go through REST), subscriptions.
pub type AnalyticsSchema = Schema<QueryRoot, EmptyMutation, SubscriptionRoot>;

/// Builds the schema with its limits. Introspection stays on: GraphiQL needs it.
pub fn schema() -> AnalyticsSchema {
    Schema::build(QueryRoot, EmptyMutation, SubscriptionRoot)
        .extension(QueryLimits::default())
        .finish()
}

/// The routes of this module, with the schema built once.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/graphql", get(http::graphiql).post(http::execute))
        .route("/graphql/ws", get(ws::upgrade))
        .layer(Extension(schema()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// The schema's SDL names what the README documents.
    #[test]
    fn the_schema_has_the_documented_fields() {
        let sdl = schema().sdl();
        for field in [
            "epoch: Int",
            "successRates(scope: MetricScope! = OVERALL): [SuccessRate!]!",
            "courierEfficiency(courierId: ID, orderBy: CourierOrder! = DELIVERED, limit: Int): [CourierEfficiency!]!",
            "peakTimes(limit: Int): [PeakTime!]!",
            "satisfaction(scope: MetricScope! = OVERALL): [Satisfaction!]!",
            "delivery(id: ID!): Delivery",
            "deliveries(status: DeliveryStatus, first: Int! = 20, after: String): DeliveryPage!",
            "metricChanged(scope: MetricScope, snapshot: Boolean! = true): MetricChange!",
        ] {
            assert!(sdl.contains(field), "{field} missing from\n{sdl}");
        }
    }
}
