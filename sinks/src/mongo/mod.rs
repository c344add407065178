//! The MongoDB sink: the GeoJSON location history (`courier_locations`) and the delivery
//! zones (`delivery_zones`), with the `$geoWithin` query of couriers in a zone.
//!
//! Every epoch's accepted fixes are inserted once, keyed by event id, so a replay inserts
//! nothing; the zones follow the dataflow's zone changes, guarded by each zone's version.
//!
//! - [`config`]: [`MongoConfig`], `MONGO_URI`, `MONGO_DB`, timeouts, collection names.
//! - [`sink`]: [`MongoSink`], the [`Sink`](crate::Sink) that commits epochs.
//! - [`documents`]: the stored documents, the indexes and the query pipeline, as BSON
//!   (no I/O).
//! - [`service`]: connecting, the indexes, the writes, the query ([`MongoStore`]), and
//!   which errors are worth a retry ([`classify`]).

pub mod config;
pub mod documents;
pub mod service;
pub mod sink;

pub use config::MongoConfig;
pub use documents::{CourierPosition, MalformedPosition, MappingError};
pub use service::{Failure, MongoError, MongoStore, classify};
pub use sink::MongoSink;
