//! Sources of events for the DeliverTrack dataflow.
//!
//! A source hands out validated [`Event`](delivertrack_dataflow::Event)s in batches, one
//! batch per dataflow epoch, and takes each batch's acknowledgement token back once every
//! sink has committed that epoch (ARCHITECTURE rule 3). The [`Source`] trait is that seam:
//! the driver loop that feeds the dataflow is written once against it, whether the events
//! come from RabbitMQ or from inside the process.
//!
//! # Layout
//! - [`source`]: the [`Source`] trait, [`SourceBatch`], the [`EpochPolicy`] that cuts
//!   epochs, and [`SourceError`].
//! - [`channel`]: [`InProcessSource`], a bounded in-process channel behind the trait, fed
//!   through [`InProcessSender`]; what `delivertrack demo` and the tests use.
//! - [`rabbitmq`]: [`RabbitSource`], the RabbitMQ source: topology, decoding,
//!   dead-lettering, epochs acknowledged with multiple-ack, reconnection; its
//!   [`IngestMetrics`].
//! - `testing` (feature `test-support`): a cuttable TCP proxy and per-test topology names
//!   for tests against the real broker.
//! - [`simulator`]: [`FleetSimulator`], a deterministic synthetic city with couriers and
//!   deliveries, and [`run_simulator`], which drives it in real time into an
//!   [`InProcessSender`].

pub mod channel;
pub mod rabbitmq;
pub mod simulator;
pub mod source;
#[cfg(feature = "test-support")]
pub mod testing;

pub use channel::{InProcessSender, InProcessSource, in_process};
pub use rabbitmq::{
    IngestMetrics, RabbitAck, RabbitConfig, RabbitSource, SourceHealth, declare_topology,
};
pub use simulator::{FleetSimulator, SimulatorConfig, run_simulator};
pub use source::{EpochPolicy, Refusal, SinkRefusal, Source, SourceBatch, SourceError};
