//! Load generators for DeliverTrack.
//!
//! The harness depends on the dataflow's event types only (ARCHITECTURE: `load-tests` may
//! depend on `dataflow` alone), and speaks to RabbitMQ the way any publisher would: JSON
//! on the topic exchange, routing key = the event's kind.
//!
//! # Layout
//! - [`fleet`] — [`fleet::location_events`], deterministic `location.updated` streams.
//! - [`publisher`] — [`Publisher`], publishing events one per message or in arrays, with
//!   publisher confirms and a bounded window of unconfirmed messages.

pub mod fleet;
pub mod publisher;

pub use publisher::{PublishError, PublishReport, Publisher};
