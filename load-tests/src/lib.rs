//! The load-testing harness of DeliverTrack.
//!
//! One binary, `load-tests`, with a subcommand per scenario — `fleet`, `trackers`,
//! `analysts`, `mixed` — and `baselines`: couriers publishing positions through RabbitMQ
//! or `POST /locations`, WebSocket trackers following live deliveries, GraphQL analysts
//! polling metrics, and the baselines every figure is set against, measured in the same
//! run (the broker ceiling, PostGIS geofencing, SQL aggregates). It measures events
//! offered / achieved / processed per second, publish → WebSocket and publish → GraphQL
//! latencies (hdrhistogram), lost fixes, errors by kind, WebSocket connections held and the
//! server's memory per connection; it shows a progress bar, prints a table and writes a
//! JSON report and a PNG chart. It sends traffic to loopback addresses only, stops by
//! itself (duration, event count, a hard deadline) and says so plainly when the target is
//! not up. `BENCHMARKS.md` has the commands and the figures of this machine.
//!
//! The harness depends on the dataflow's event types only (ARCHITECTURE: `load-tests` may
//! depend on `dataflow` alone), and speaks to the service as any client would.
//!
//! # Layout
//! - [`scenario`] — [`scenario::run`]: one run, its settings ([`scenario::RunArgs`]).
//! - [`stream`] — [`stream::FleetStream`], the deterministic, paced fleet.
//! - [`world`] — the synthetic city and its zones (shared with the spatial bench's data).
//! - [`driver`] — sends the fleet through RabbitMQ or the API.
//! - [`tracker`] — WebSocket trackers (`/ws/track/{id}` or `/ws/changes`).
//! - [`analysts`] — GraphQL analysts and the publish → GraphQL probe.
//! - [`sent`] — when each fix left, for the trackers' latencies and gaps.
//! - [`record`] — counters and histograms; [`report`] — the report and table;
//!   [`plot`] — the PNG.
//! - [`baseline`] — broker ceiling, geofence against PostGIS, GraphQL against SQL.
//! - [`server_metrics`] — what the service's `/metrics` say it did during the run.
//! - [`target`] — loopback checks, "is it up", the server's pid and memory.
//! - [`auth`] — JWTs signed with the service's secret.
//! - [`fleet`] — [`fleet::location_events`], simple zigzag streams for tests.
//! - [`publisher`] — [`Publisher`], publishing events one per message or in arrays, with
//!   publisher confirms and a bounded window of unconfirmed messages.

pub mod analysts;
pub mod auth;
pub mod baseline;
pub mod curve;
pub mod driver;
pub mod fleet;
pub mod plot;
pub mod publisher;
pub mod record;
pub mod report;
pub mod scenario;
pub mod sent;
pub mod server_metrics;
pub mod stream;
pub mod target;
pub mod tracker;
pub mod world;

pub use publisher::{PublishError, PublishReport, Publisher};
pub use scenario::{RunArgs, Scenario};
