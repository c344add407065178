//! [`EventPublisher`]: where the event of a command goes.
//!
//! The API crate knows neither RabbitMQ nor the in-process channel of the demo (it may not
//! depend on the ingest crate): the binary adapts each to this trait and hands one to
//! [`AppState::with_commands`](crate::AppState::with_commands). A write route publishes its
//! validated event through it and answers only once `publish` resolved `Ok` — for RabbitMQ,
//! once the broker confirmed the message.

use delivertrack_dataflow::Event;
use futures::future::BoxFuture;

/// Publishes the events of commands into the pipeline's input.
pub trait EventPublisher: Send + Sync + std::fmt::Debug {
    /// Hands `event` over and resolves once whoever takes it is responsible for it (the
    /// broker's publisher confirm; the in-process channel's send). Implementations bound
    /// the time this takes and never drop an event silently: a failure is an error.
    fn publish<'a>(&'a self, event: &'a Event) -> BoxFuture<'a, Result<(), PublishError>>;
}

/// Why an event could not be published; answered `503 commands_unavailable`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The event could not be handed over at all (the broker is unreachable or being
    /// reconnected to, the pipeline has stopped): it was not published.
    #[error("{0}")]
    Unavailable(String),
    /// The event was handed over but not confirmed (refused, unroutable, or the confirm did
    /// not come in time): whether it will be applied is unknown.
    #[error("{0}")]
    Unconfirmed(String),
}
