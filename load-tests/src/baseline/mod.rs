//! The baselines every figure is set against, measured in the same run.
//!
//! - [`broker`] — the broker ceiling: publish + consume + ack on RabbitMQ with nothing
//!   behind the consumer.
//! - [`geofence`] — point-in-zone checks: the dataflow's zone index in process against
//!   PostGIS `ST_Contains` with a GiST index, on the same zones and points.
//! - [`analytics`] — the GraphQL metrics query against the same aggregate computed by a
//!   PostgreSQL `GROUP BY` over the event log.

pub mod analytics;
pub mod broker;
pub mod geofence;

pub use analytics::{AnalyticsBaseline, analytics_read_path};
pub use broker::{BrokerCeiling, broker_ceiling};
pub use geofence::{GeofenceBaseline, IndexFigures, index_throughput, postgis_throughput};
