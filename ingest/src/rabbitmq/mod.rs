//! The RabbitMQ source: topology, decoding, dead-lettering, batching, acknowledgement and
//! reconnection.
//!
//! # Layout
//! - [`config`]: [`RabbitConfig`], names, prefetch, backoff, limits.
//! - [`topology`]: [`declare_topology`], and why the queue is a classic one.
//! - [`source`]: [`RabbitSource`], its ack token [`RabbitAck`] and [`SourceHealth`].
//! - `batch`: gathering deliveries into batches in delivery-tag order.
//! - `link`: the connection task that reconnects with backoff.
//! - [`dead_letter`]: the dead-letter headers and publishing with confirms.
//! - [`metrics`]: [`IngestMetrics`], the Prometheus counters.
//! - [`publisher`]: [`CommandPublisher`], the API's commands published with confirms.
//! - `rabbitmqctl` (feature `test-support`): the broker's tool, for tests that make the
//!   broker close the source's own connection, found by its name.

mod batch;
pub mod config;
pub mod dead_letter;
mod link;
pub mod metrics;
pub mod publisher;
#[cfg(feature = "test-support")]
pub mod rabbitmqctl;
pub mod source;
pub mod topology;

pub use config::{RabbitConfig, normalize_url};
pub use link::ConnectError;
pub use metrics::IngestMetrics;
pub use publisher::{CommandPublishError, CommandPublisher, CommandPublisherConfig};
pub use source::{RabbitAck, RabbitSource, SourceHealth};
pub use topology::declare_topology;
