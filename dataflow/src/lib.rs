//! The domain of DeliverTrack and its incremental computation.
//!
//! Events come in as epochs of validated [`event::Event`]s; a timely/differential dataflow
//! maintains couriers, zones, geofence membership, deliveries, ETAs and aggregates as
//! collections, and every closed epoch comes out as one [`model::EpochOutput`]: the
//! consolidated changes of all of them. This crate is pure: no async runtime, no network,
//! no database.
//!
//! # Layout
//! - [`ids`]: newtype identifiers.
//! - [`geometry`]: fixed-point positions, zone shapes, distances.
//! - [`lifecycle`]: delivery statuses and the one transition table.
//! - [`event`]: validated events; [`contract`]: the JSON wire format and its validation.
//! - [`model`]: the maintained records and the epoch output.
//! - [`spatial`]: the R-tree indexes behind the spatial joins.
//! - [`eta`]: the ETA and speed estimates.
//! - [`compute`]: the dataflow itself, a function from event stream to collections.
//! - [`operators`]: the stateful timely operators it is built from (upserts, geofences).
//! - [`pipeline`]: runs the dataflow on worker threads; epochs in, epoch outputs out.
//! - [`restore`]: the state a restarting pipeline is seeded with (hydration).

pub mod compute;
pub mod contract;
pub mod eta;
pub mod event;
pub mod geometry;
pub mod ids;
pub mod lifecycle;
pub mod model;
pub mod operators;
pub mod pipeline;
pub mod restore;
pub mod spatial;

pub use event::{Event, EventBody, EventKind, UnixMillis};
pub use ids::{CourierId, CustomerId, DeliveryId, EventId, ZoneId};
pub use lifecycle::Status;
pub use model::{Change, Epoch, EpochOutput, RejectReason, Rejection};
pub use pipeline::{DataflowConfig, EpochReceiver, EpochSender};
