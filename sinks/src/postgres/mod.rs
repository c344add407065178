//! The PostgreSQL sink: the system of record (ARCHITECTURE rule 4).
//!
//! Every epoch is written in one transaction, one batched statement per table, and is
//! idempotent: the schema (`migrations/`) keys every table by entity id or event id, and a
//! progress row skips an epoch the database already has.
//!
//! - [`config`]: [`PostgresConfig`], the `POSTGRES_*` parts or a `DATABASE_URL`.
//! - [`sink`]: [`PostgresSink`], the [`Sink`](crate::Sink) that commits epochs.
//! - [`hydrate`]: [`load_restore`], the state a restarting pipeline restores.
//! - `batch`: an epoch's output reshaped into per-table column arrays (no I/O).
//! - [`service`]: connecting, [`MIGRATOR`] and [`migrate`], the epoch's statements, and
//!   which errors are worth a retry ([`classify`]).

pub mod config;
pub mod hydrate;
pub mod service;
pub mod sink;

mod batch;

pub use batch::{BatchError, ScopeKey};
pub use config::PostgresConfig;
pub use hydrate::load_restore;
pub use service::{
    Failure, MIGRATOR, PostgresError, classify, connect_pool, ensure_database,
    last_committed_epoch, migrate,
};
pub use sink::PostgresSink;
