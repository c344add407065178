//! [`ReadModel`]: the shared handle to the in-memory state and its live stream.

use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard};

use delivertrack_dataflow::model::Scope;
use delivertrack_dataflow::{CourierId, DeliveryId, Epoch, EpochOutput};
use tokio::sync::{broadcast, watch};

use super::config::ReadModelConfig;
use super::live::EpochUpdate;
use super::state::ReadState;
use super::view::{CourierDetail, DeliveryView, MetricSummary, Snapshot};

/// The in-memory read model. Cheap to clone: every clone shares the same state.
///
/// One writer (the [`ReadModelSink`](super::ReadModelSink), once per epoch) and many
/// readers (every API request). The state sits behind a `std::sync::RwLock`: readers
/// proceed in parallel, the writer holds the lock only for the in-memory apply, and no
/// lock is ever held across an `.await`, so a blocking lock is right here.
#[derive(Clone, Debug)]
pub struct ReadModel {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The collections.
    state: RwLock<ReadState>,
    /// Per-epoch updates for live subscribers. Bounded: a subscriber that lags by more
    /// than the capacity gets `Lagged` and must resync, the writer never waits.
    updates: broadcast::Sender<Arc<EpochUpdate>>,
    /// The last epoch applied, for readiness checks and waiters.
    applied: watch::Sender<Option<Epoch>>,
}

impl ReadModel {
    /// An empty read model.
    pub fn new(config: ReadModelConfig) -> Self {
        let (updates, _) = broadcast::channel(config.live_capacity.max(1));
        let (applied, _) = watch::channel(None);
        Self {
            inner: Arc::new(Inner {
                state: RwLock::new(ReadState::default()),
                updates,
                applied,
            }),
        }
    }

    /// Applies one epoch's output, then publishes its [`EpochUpdate`] to the subscribers.
    /// Returns the update, or `None` when the epoch was already applied (a replay).
    ///
    /// The state is updated before the update is published, so a subscriber that
    /// subscribes first and then takes a [`snapshot`](Self::snapshot) misses nothing:
    /// every update is either in its snapshot or arrives after it (compare epochs).
    pub fn apply(&self, output: &EpochOutput) -> Option<Arc<EpochUpdate>> {
        let update = {
            let mut state = self
                .inner
                .state
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            state.apply(output)?
        };
        let update = Arc::new(update);
        // No subscriber is not an error: the update is simply not needed.
        let _ = self.inner.updates.send(Arc::clone(&update));
        self.inner.applied.send_replace(Some(update.epoch));
        Some(update)
    }

    /// A receiver of every epoch update published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<EpochUpdate>> {
        self.inner.updates.subscribe()
    }

    /// Watches the last epoch applied (`None` before the first).
    pub fn applied_epochs(&self) -> watch::Receiver<Option<Epoch>> {
        self.inner.applied.subscribe()
    }

    /// The last epoch applied; `None` before the first.
    pub fn epoch(&self) -> Option<Epoch> {
        *self.inner.applied.borrow()
    }

    /// Has at least one epoch been applied?
    pub fn is_ready(&self) -> bool {
        self.epoch().is_some()
    }

    /// Everything a dashboard needs, consistent as of one epoch.
    pub fn snapshot(&self) -> Snapshot {
        self.read().snapshot()
    }

    /// One courier, if known.
    pub fn courier(&self, id: CourierId) -> Option<CourierDetail> {
        self.read().courier(id)
    }

    /// One delivery, if known.
    pub fn delivery(&self, id: DeliveryId) -> Option<DeliveryView> {
        self.read().delivery(id)
    }

    /// The aggregates of one scope, if it has any.
    pub fn metrics(&self, scope: Scope) -> Option<MetricSummary> {
        self.read().metrics(scope)
    }

    /// Runs `f` on the current state under the read lock, for queries the views above do
    /// not cover. Keep `f` short: the writer waits for it.
    pub fn with_state<R>(&self, f: impl FnOnce(&ReadState) -> R) -> R {
        f(&self.read())
    }

    fn read(&self) -> RwLockReadGuard<'_, ReadState> {
        // A panic while writing leaves a state that the next epoch's upserts repair; it
        // must not take every reader down with it.
        self.inner
            .state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Default for ReadModel {
    fn default() -> Self {
        Self::new(ReadModelConfig::default())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::read_model::state::tests::{courier, courier_id, output};
    use delivertrack_dataflow::Change;
    use tokio::sync::broadcast::error::RecvError;

    #[tokio::test]
    async fn subscribers_receive_updates_and_a_lagging_one_is_told() {
        let model = ReadModel::new(ReadModelConfig { live_capacity: 2 });
        let mut prompt = model.subscribe();
        let mut slow = model.subscribe();
        assert!(!model.is_ready());
        for epoch in 0..4 {
            model.apply(&output(
                epoch,
                vec![(
                    Change::Courier(courier_id(epoch.into()), courier(52.0, 13.0, 1)),
                    1,
                )],
            ));
            assert_eq!(prompt.recv().await.unwrap().epoch, epoch);
        }
        assert!(model.is_ready());
        assert_eq!(model.epoch(), Some(3));
        assert_eq!(slow.recv().await, Err(RecvError::Lagged(2)));
        assert_eq!(slow.recv().await.unwrap().epoch, 2);
        assert_eq!(model.snapshot().counts.couriers, 4);
        assert!(model.courier(courier_id(3)).is_some());
    }
}
