//! [`ReadModelSink`]: the [`Sink`] that keeps the [`ReadModel`] current.

use std::sync::Arc;

use delivertrack_dataflow::EpochOutput;

use super::model::ReadModel;
use crate::sink::{Sink, SinkFuture};

/// Applies every epoch to a [`ReadModel`]. A commit is complete (and the epoch visible to
/// readers and published to subscribers) when the future resolves; it never fails.
#[derive(Clone, Debug)]
pub struct ReadModelSink {
    model: ReadModel,
}

impl ReadModelSink {
    /// A sink feeding `model`; keep a clone of the model for the readers.
    pub fn new(model: ReadModel) -> Self {
        Self { model }
    }

    /// The model this sink feeds.
    pub fn model(&self) -> &ReadModel {
        &self.model
    }
}

impl Sink for ReadModelSink {
    fn name(&self) -> &'static str {
        "read_model"
    }

    fn commit(&mut self, output: Arc<EpochOutput>) -> SinkFuture<'_> {
        Box::pin(async move {
            if self.model.apply(&output).is_none() {
                tracing::debug!(
                    epoch = output.epoch,
                    "The read model skipped an epoch it had already applied."
                );
            }
            Ok(())
        })
    }
}
