//! [`SubscriptionRoot`]: `metricChanged`, the aggregates pushed as the dataflow changes
//! them.
//!
//! A subscription listens to the read model's per-epoch broadcast ([`EpochUpdate`]s, each
//! listing the metric rows the epoch changed). It first sends the full current set
//! (`SNAPSHOT`, unless `snapshot: false`), then one `CHANGED` message per epoch that
//! changed a row of the requested family, with the rows as they are after that epoch.
//! The broadcast is bounded and never waits for anyone: a subscriber that falls more
//! than its capacity behind misses epochs, and is sent the full set again (`RESYNC`)
//! instead of the updates it missed.

use std::sync::Arc;

use async_graphql::{Context, Error, Subscription};
use delivertrack_dataflow::Epoch;
use delivertrack_dataflow::model::Scope;
use delivertrack_sinks::ReadModel;
use delivertrack_sinks::read_model::{EpochUpdate, LiveChange, MetricSummary, ScopeView};
use futures::Stream;
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;

use super::access;
use super::types::{ChangeReason, Metric, MetricChange, MetricKey, MetricScope, ScopeKey};

/// The root of every subscription.
#[derive(Debug, Default)]
pub struct SubscriptionRoot;

#[Subscription(name = "Subscription")]
impl SubscriptionRoot {
    /// The aggregates of one family of groups (all families when `scope` is omitted) as
    /// each epoch changes them; first the full current set unless `snapshot` is false.
    /// Admins only.
    #[graphql(complexity = "super::limits::SCAN_COST + child_complexity")]
    async fn metric_changed(
        &self,
        ctx: &Context<'_>,
        scope: Option<MetricScope>,
        #[graphql(default = true)] snapshot: bool,
    ) -> Result<impl Stream<Item = MetricChange> + use<>, Error> {
        let model = access::admin(ctx)?.clone();
        Ok(metric_changes(model, scope, snapshot))
    }
}

/// The state of one subscription between two messages.
struct Follow {
    model: ReadModel,
    updates: broadcast::Receiver<Arc<EpochUpdate>>,
    filter: Option<MetricScope>,
    /// The epoch of the last message: older updates are already in it.
    last: Option<Epoch>,
    /// The snapshot still to send.
    first: Option<MetricChange>,
}

/// The stream of `metricChanged` messages for `filter`.
pub fn metric_changes(
    model: ReadModel,
    filter: Option<MetricScope>,
    snapshot: bool,
) -> impl Stream<Item = MetricChange> {
    // Subscribe before reading the state: every later epoch is then either in the full
    // set or received below (and the ones already in it are skipped by epoch).
    let updates = model.subscribe();
    let (first, last) = if snapshot {
        let full = full_set(&model, filter, ChangeReason::Snapshot);
        let epoch = full.epoch;
        (Some(full), epoch)
    } else {
        (None, model.epoch())
    };
    let follow = Follow {
        model,
        updates,
        filter,
        last,
        first,
    };
    futures::stream::unfold(follow, |mut follow| async move {
        if let Some(first) = follow.first.take() {
            return Some((first, follow));
        }
        loop {
            match follow.updates.recv().await {
                Ok(update) => {
                    if follow.last.is_some_and(|last| update.epoch <= last) {
                        continue;
                    }
                    follow.last = Some(update.epoch);
                    let change = changed_rows(&follow.model, &update, follow.filter);
                    if change.metrics.is_empty() && change.cleared.is_empty() {
                        continue;
                    }
                    return Some((change, follow));
                }
                Err(RecvError::Lagged(missed)) => {
                    tracing::info!(
                        missed,
                        "A GraphQL metric subscriber fell behind; sending it the full set."
                    );
                    let full = full_set(&follow.model, follow.filter, ChangeReason::Resync);
                    follow.last = full.epoch;
                    return Some((full, follow));
                }
                // The read model is gone: the pipeline has stopped.
                Err(RecvError::Closed) => return None,
            }
        }
    })
}

/// Every row of `filter` now.
fn full_set(model: &ReadModel, filter: Option<MetricScope>, reason: ChangeReason) -> MetricChange {
    model.with_state(|state| MetricChange {
        epoch: state.epoch,
        reason,
        metrics: state
            .metrics
            .iter()
            .filter(|(scope, _)| filter.is_none_or(|f| MetricScope::of(scope) == f))
            .map(|(scope, tally)| {
                Metric::new(ScopeKey::new(scope, state), &MetricSummary::from(tally))
            })
            .collect(),
        cleared: Vec::new(),
    })
}

/// The rows of `filter` that `update` changed or cleared.
fn changed_rows(
    model: &ReadModel,
    update: &EpochUpdate,
    filter: Option<MetricScope>,
) -> MetricChange {
    let wanted = |scope: &Scope| filter.is_none_or(|f| MetricScope::of(scope) == f);
    let mut change = MetricChange {
        epoch: Some(update.epoch),
        reason: ChangeReason::Changed,
        metrics: Vec::new(),
        cleared: Vec::new(),
    };
    let touches = update.changes.iter().any(|c| match c {
        LiveChange::Metric { scope, .. } | LiveChange::MetricCleared { scope } => {
            wanted(&scope_of(*scope))
        }
        _ => false,
    });
    if !touches {
        return change;
    }
    // Zone names come from the current state; the figures from the update itself.
    model.with_state(|state| {
        for c in &update.changes {
            match c {
                LiveChange::Metric { scope, metrics } => {
                    let scope = scope_of(*scope);
                    if wanted(&scope) {
                        change
                            .metrics
                            .push(Metric::new(ScopeKey::new(&scope, state), metrics));
                    }
                }
                LiveChange::MetricCleared { scope } => {
                    let scope = scope_of(*scope);
                    if wanted(&scope) {
                        let key = ScopeKey::new(&scope, state);
                        change.cleared.push(MetricKey {
                            scope: key.scope,
                            key: key.key,
                        });
                    }
                }
                _ => {}
            }
        }
    });
    change
}

/// The dataflow scope of a view's scope.
fn scope_of(view: ScopeView) -> Scope {
    match view {
        ScopeView::Overall => Scope::Overall,
        ScopeView::Courier { courier_id } => Scope::Courier(courier_id),
        ScopeView::DropoffZone { zone_id } => Scope::DropoffZone(zone_id),
        ScopeView::HourOfDay { hour } => Scope::HourOfDay(hour),
        ScopeView::WeekdayHour { weekday, hour } => Scope::WeekdayHour(weekday, hour),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use delivertrack_dataflow::model::Tally;
    use delivertrack_dataflow::{Change, EpochOutput};
    use delivertrack_sinks::ReadModelConfig;
    use futures::StreamExt;

    fn output(epoch: Epoch, changes: Vec<(Change, i64)>) -> EpochOutput {
        EpochOutput {
            restored: false,
            epoch,
            changes,
            rejections: Vec::new(),
            events: Vec::new(),
        }
    }

    fn tally(deliveries: i64, delivered: i64) -> Tally {
        Tally {
            deliveries,
            delivered,
            ..Tally::default()
        }
    }

    #[tokio::test]
    async fn snapshot_then_changes_then_a_resync_after_lagging() {
        let model = ReadModel::new(ReadModelConfig { live_capacity: 2 });
        model.apply(&output(
            0,
            vec![
                (Change::Metric(Scope::Overall, tally(1, 0)), 1),
                (Change::Metric(Scope::HourOfDay(8), tally(1, 0)), 1),
            ],
        ));
        let stream = metric_changes(model.clone(), Some(MetricScope::Overall), true);
        futures::pin_mut!(stream);
        let first = stream.next().await.unwrap();
        assert_eq!(first.reason, ChangeReason::Snapshot);
        assert_eq!(first.epoch, Some(0));
        assert_eq!(first.metrics.len(), 1, "only the requested family");

        // An epoch that changes only another family sends nothing; the next one does.
        model.apply(&output(
            1,
            vec![
                (Change::Metric(Scope::HourOfDay(8), tally(1, 0)), -1),
                (Change::Metric(Scope::HourOfDay(8), tally(2, 0)), 1),
            ],
        ));
        model.apply(&output(
            2,
            vec![
                (Change::Metric(Scope::Overall, tally(1, 0)), -1),
                (Change::Metric(Scope::Overall, tally(1, 1)), 1),
            ],
        ));
        let second = stream.next().await.unwrap();
        assert_eq!(
            (second.reason, second.epoch, second.metrics[0].delivered),
            (ChangeReason::Changed, Some(2), 1)
        );

        // Five epochs while nobody reads: more than the capacity of 2.
        let mut current = tally(1, 1);
        for epoch in 3..8 {
            let next = tally(current.deliveries + 1, 1);
            model.apply(&output(
                epoch,
                vec![
                    (Change::Metric(Scope::Overall, current), -1),
                    (Change::Metric(Scope::Overall, next), 1),
                ],
            ));
            current = next;
        }
        let third = stream.next().await.unwrap();
        assert_eq!(third.reason, ChangeReason::Resync);
        assert_eq!(third.epoch, Some(7));
        assert_eq!(third.metrics[0].deliveries, current.deliveries);
    }
}
