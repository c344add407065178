//! The PostgreSQL sink: the system of record (ARCHITECTURE rule 4).
//!
//! Every epoch is written in one transaction, a batched statement or two per table (the
//! location fixes by binary `COPY`), and is idempotent: the schema (`migrations/`) keys
//! every table by entity id or event id (a fix by courier, time and event id), and a
//! progress row skips an epoch this same writer already committed (see [`leader`]).
//!
//! - [`config`]: [`PostgresConfig`], the `POSTGRES_*` parts or a `DATABASE_URL`.
//! - [`sink`]: [`PostgresSink`], the [`Sink`](crate::Sink) that commits epochs.
//! - [`leader`]: one writer per database: [`WriterLock`] (the advisory lock a writer
//!   holds, a standby waits for) and the [`Fence`] every epoch's transaction checks.
//! - [`hydrate`]: [`load_restore`], the state a restarting pipeline restores.
//! - `batch`: an epoch's output reshaped into per-table column arrays (no I/O).
//! - `fixes`: the location fixes, appended with binary `COPY`.
//! - [`service`]: connecting, [`MIGRATOR`] and [`migrate`], the epoch's statements, and
//!   which errors are worth a retry ([`classify`]).

pub mod config;
pub mod hydrate;
pub mod leader;
pub mod service;
pub mod sink;

mod batch;
mod fixes;

pub use batch::{BatchError, ScopeKey};
pub use config::PostgresConfig;
pub use hydrate::load_restore;
pub use leader::{Fence, Fenced, LockWatch, WRITER_LOCK_KEY, WriterLock, claim_generation};
pub use service::{
    Failure, MIGRATOR, PostgresError, classify, connect_pool, ensure_database,
    last_committed_epoch, migrate,
};
pub use sink::PostgresSink;
