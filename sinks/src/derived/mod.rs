//! The derived-event sink: the notification feed on the topic exchange
//! `delivertrack.derived` (docs/events.md, "Derived events").
//!
//! From each epoch's changes it derives `geofence.entered` / `geofence.exited`,
//! `eta.updated` (beyond a threshold), `delivery.completed` and `delivery.delayed`, and
//! publishes them with publisher confirms as part of the epoch's commit.
//!
//! - [`config`]: [`DerivedConfig`], the broker, the exchange, the ETA threshold, timeouts.
//! - [`derive`]: [`Deriver`], epoch output → [`DerivedEvent`]s, pure, with the per-delivery
//!   memory the ETA threshold and the delay rule need; the deterministic event ids.
//! - [`sink`]: [`DerivedSink`], the [`Sink`](crate::Sink) that commits epochs.
//! - [`service`]: the connection, the exchange, publishing with confirms, [`DerivedError`].

pub mod config;
pub mod derive;
pub mod service;
pub mod sink;

#[cfg(test)]
mod derive_tests;

pub use config::DerivedConfig;
pub use derive::{
    CompletionReason, DerivedBody, DerivedEvent, DerivedKind, Deriver, EVENT_ID_NAMESPACE,
};
pub use service::DerivedError;
pub use sink::DerivedSink;
