//! The seam between the dataflow and every store: one small trait.
//!
//! The trait is dyn-compatible on purpose: the driver holds the enabled sinks as
//! `Vec<Box<dyn Sink>>`, a list whose members are chosen at start-up from the
//! configuration (PostgreSQL, MongoDB, Redis, the read model). That is why
//! [`Sink::commit`] returns a boxed future ([`SinkFuture`]) rather than being an
//! `async fn`; the box costs one allocation per sink per epoch, nothing next to the I/O a
//! commit does.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use delivertrack_dataflow::{Epoch, EpochOutput};

/// The future a sink returns: `Send`, so the driver may run it on any runtime thread.
pub type SinkFuture<'a> = Pin<Box<dyn Future<Output = Result<(), SinkError>> + Send + 'a>>;

/// The error a store's client library returns, kept as the source of a [`SinkError`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A destination of the dataflow's output.
///
/// Contract, for every implementation:
/// - [`commit`](Sink::commit) is called with the epochs in increasing order, one at a time
///   (the next call only after the previous future completed);
/// - the future resolves `Ok` only once the epoch is *durably* applied in the store (for
///   an in-memory sink: visible to readers), because the driver acknowledges the epoch's
///   input to its source as soon as every sink said `Ok`;
/// - committing the same epoch again is harmless (writes are keyed by entity id and
///   version or by event id), because after a crash the source redelivers;
/// - the output is shared (`Arc`) between the sinks and must not be assumed exclusive.
///
/// The sink ends when its input ends: after the last epoch the driver calls
/// [`close`](Sink::close) once, which flushes whatever the sink buffers.
pub trait Sink: Send {
    /// A short stable name for logs and metric labels (`"read_model"`, `"postgres"`).
    fn name(&self) -> &'static str;

    /// Is this the system of record? The driver commits each epoch to the system of record
    /// first and to the other sinks only once it has, so that an epoch the record refuses
    /// has reached no other store (and the dataflow can be rebuilt from the record).
    fn is_system_of_record(&self) -> bool {
        false
    }

    /// Commits one epoch's output.
    ///
    /// # Errors
    /// A [`SinkError`]; [`SinkError::is_retryable`] tells the driver whether committing
    /// the same epoch again may succeed.
    fn commit(&mut self, output: Arc<EpochOutput>) -> SinkFuture<'_>;

    /// Flushes and releases the sink after the last epoch. The default does nothing.
    ///
    /// # Errors
    /// A [`SinkError`] when the final flush fails.
    fn close(&mut self) -> SinkFuture<'_> {
        Box::pin(async { Ok(()) })
    }
}

/// Why a sink could not commit an epoch.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The store could not be reached or timed out; committing again may succeed.
    #[error("the {sink} sink could not reach its store")]
    Unavailable {
        /// [`Sink::name`] of the failing sink.
        sink: &'static str,
        /// The client library's error.
        #[source]
        source: BoxError,
    },
    /// The store refused the epoch's *data* for good (a constraint, a value it cannot
    /// hold); committing the same data again will fail again, but the epoch without the
    /// offending event may commit. The driver isolates that event (see `src/driver.rs`).
    #[error("the {sink} sink refused epoch {epoch} ({code})")]
    Rejected {
        /// [`Sink::name`] of the failing sink.
        sink: &'static str,
        /// The refused epoch.
        epoch: Epoch,
        /// The store's code for the refusal (a SQLSTATE such as `23514`, a server error
        /// code): part of the dead-letter reason `sink_refused:<sink>:<code>`, so it must
        /// come from a small fixed set.
        code: String,
        /// The client library's error.
        #[source]
        source: BoxError,
    },
    /// The sink failed for good for a reason that is not the data (the schema is missing,
    /// a statement is wrong, an epoch number overflows): no event is to blame, so nothing
    /// is isolated and the driver stops.
    #[error("the {sink} sink failed on epoch {epoch}")]
    Failed {
        /// [`Sink::name`] of the failing sink.
        sink: &'static str,
        /// The epoch.
        epoch: Epoch,
        /// The client library's error.
        #[source]
        source: BoxError,
    },
    /// The sink was closed and takes no more epochs.
    #[error("the {sink} sink is closed")]
    Closed {
        /// [`Sink::name`] of the closed sink.
        sink: &'static str,
    },
}

impl SinkError {
    /// May committing the same epoch again succeed (a transient failure)?
    pub fn is_retryable(&self) -> bool {
        matches!(self, SinkError::Unavailable { .. })
    }

    /// The name of the sink that failed.
    pub fn sink(&self) -> &'static str {
        match self {
            SinkError::Unavailable { sink, .. }
            | SinkError::Rejected { sink, .. }
            | SinkError::Failed { sink, .. }
            | SinkError::Closed { sink } => sink,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// A sink that counts commits, to prove the trait is usable as `Box<dyn Sink>`.
    struct Counting(u64);

    impl Sink for Counting {
        fn name(&self) -> &'static str {
            "counting"
        }

        fn commit(&mut self, output: Arc<EpochOutput>) -> SinkFuture<'_> {
            Box::pin(async move {
                self.0 += 1;
                let _ = output.epoch;
                Ok(())
            })
        }
    }

    #[tokio::test]
    async fn sinks_are_usable_as_trait_objects() {
        let mut sinks: Vec<Box<dyn Sink>> = vec![Box::new(Counting(0)), Box::new(Counting(0))];
        let output = Arc::new(EpochOutput::default());
        for sink in &mut sinks {
            sink.commit(Arc::clone(&output)).await.unwrap();
            sink.close().await.unwrap();
        }
        assert_eq!(sinks[0].name(), "counting");
    }

    #[test]
    fn only_unavailable_is_retryable() {
        let unavailable = SinkError::Unavailable {
            sink: "x",
            source: "down".into(),
        };
        let closed = SinkError::Closed { sink: "y" };
        let rejected = SinkError::Rejected {
            sink: "z",
            epoch: 1,
            code: "23514".into(),
            source: "check".into(),
        };
        assert!(!rejected.is_retryable());
        assert!(unavailable.is_retryable());
        assert!(!closed.is_retryable());
        assert_eq!(closed.sink(), "y");
    }
}
