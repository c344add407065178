//! The in-memory read model: the current state of every maintained collection, for the
//! API's reads, with a live stream of per-epoch changes for subscribers.
//!
//! - [`config`] — [`ReadModelConfig`].
//! - [`state`] — [`ReadState`], the collections and how an epoch's changes apply to them.
//! - [`live`] — [`EpochUpdate`] and [`LiveChange`], the typed per-epoch change messages.
//! - [`view`] — serializable views: [`Snapshot`], [`CourierDetail`], [`DeliveryView`], ...
//! - [`model`] — [`ReadModel`], the shared handle (lock + broadcast).
//! - [`sink`] — [`ReadModelSink`], the [`Sink`](crate::Sink) that feeds it.

pub mod config;
pub mod live;
pub mod model;
pub mod sink;
pub mod state;
pub mod view;

pub use config::ReadModelConfig;
pub use live::{EpochUpdate, LiveChange};
pub use model::ReadModel;
pub use sink::ReadModelSink;
pub use state::ReadState;
pub use view::{
    Counts, CourierDetail, CourierView, DeliveryDetails, DeliveryView, EtaView, LatLon,
    MetricSummary, RatingView, ScopeView, ScopedMetrics, Snapshot, ZoneView,
};
