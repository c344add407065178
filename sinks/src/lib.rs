//! Where the dataflow's output goes: the sink seam and the in-memory read model.
//!
//! Every closed epoch of the dataflow comes out as one
//! [`EpochOutput`](delivertrack_dataflow::EpochOutput). The driver hands it, in epoch
//! order, to every enabled [`Sink`]; each sink commits it and only then confirms, and only
//! once every sink has confirmed is the epoch's input acknowledged to its source
//! (ARCHITECTURE rule 3). Sinks are idempotent: committing an epoch twice leaves the same
//! state as committing it once.
//!
//! # Layout
//! - [`sink`]: the [`Sink`] trait and [`SinkError`].
//! - [`read_model`]: the in-memory current state behind the API, its snapshot and lookup
//!   views, the per-epoch live change stream, and [`ReadModelSink`].
//! - [`postgres`]: the system of record, [`PostgresSink`], and the schema's [`MIGRATOR`].
//! - [`redis`]: the hot caches with lifetimes, [`RedisSink`].
//! - [`derived`]: the notification feed (geofence, ETA, completion and delay events on
//!   RabbitMQ), [`DerivedSink`].
//! - [`mongo`]: the GeoJSON location history and zones, [`MongoSink`].

pub mod derived;
pub mod mongo;
pub mod postgres;
pub mod read_model;
pub mod redis;
pub mod sink;

pub use derived::{DerivedConfig, DerivedSink};
pub use mongo::{MongoConfig, MongoSink};
pub use postgres::{MIGRATOR, PostgresConfig, PostgresSink};
pub use read_model::{ReadModel, ReadModelConfig, ReadModelSink};
pub use redis::{RedisConfig, RedisSink};
pub use sink::{Sink, SinkError, SinkFuture};
