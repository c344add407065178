//! DeliverTrack: the wiring of the source, the dataflow, the sinks and the API.
//!
//! The binary (`src/main.rs`) only parses the command line and calls into this library,
//! so that everything it does can be tested in-process.
//!
//! # Layout
//! - [`commands`] — [`RabbitCommands`] and [`InProcessCommands`], the API's write routes'
//!   publishers for `run` and `demo`.
//! - [`auth`] — the JWT secret's checks and tokens for `run`, `token` and `demo`.
//! - [`driver`] — [`drive`], the generic loop source → epochs → dataflow → sinks → ack.
//! - [`service`] — [`Service`], the wiring both commands share (read model, sinks, API,
//!   driver) and the order in which it stops; [`PipelineConfig`], their common settings.
//! - [`demo`] — [`run_demo`], the whole pipeline with the fleet simulator and no external
//!   service.
//! - [`run`] — [`run_pipeline`], the pipeline on RabbitMQ.
//! - [`stores`] — [`open_stores`], the stores `run` writes, PostgreSQL's hydration first.
//! - [`standby`] — what `run` serves while it waits for the writer lock (or starts).
//! - [`migrate`] — [`run_migrations`], the PostgreSQL schema.
//! - [`rebuild`] — [`rebuild::PostgresRehydrate`], the state read back from PostgreSQL when
//!   it refused an epoch's data (poison isolation).
//! - [`metrics`] — [`DriverMetrics`], the driver's Prometheus metrics.
//! - [`telemetry`] — logging set-up.

pub mod auth;
pub mod commands;
pub mod demo;
pub mod driver;
pub mod metrics;
pub mod migrate;
pub mod rebuild;
pub mod run;
pub mod service;
pub mod standby;
pub mod stores;
pub mod telemetry;

pub use commands::{InProcessCommands, RabbitCommands};
pub use demo::{DemoConfig, banner, run_demo, run_demo_on};
pub use driver::{DriveReport, DriverConfig, drive};
pub use metrics::DriverMetrics;
pub use migrate::run_migrations;
pub use run::{RunConfig, RunHooks, Started, run_pipeline, run_pipeline_on};
pub use service::{Companion, PipelineConfig, Service};
pub use stores::{Stores, StoresConfig, open_stores, open_stores_as};
