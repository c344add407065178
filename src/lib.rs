//! DeliverTrack: the wiring of the source, the dataflow, the sinks and the API.
//!
//! The binary (`src/main.rs`) only parses the command line and calls into this library,
//! so that everything it does can be tested in-process.
//!
//! # Layout
//! - [`driver`] — [`drive`], the generic loop source → epochs → dataflow → sinks → ack.
//! - [`demo`] — [`run_demo`], the whole pipeline with the fleet simulator and no external
//!   service.
//! - [`telemetry`] — logging set-up.

pub mod demo;
pub mod driver;
pub mod telemetry;

pub use demo::{DemoConfig, banner, run_demo, run_demo_on};
pub use driver::{DriveReport, DriverConfig, drive};
