//! Gathers each worker's share of every epoch's output and hands it to the pipeline.
//!
//! Every record is produced on the worker that owns its key, so a worker's share of an epoch
//! is complete and consolidated once its input frontier has passed the epoch; the pipeline
//! concatenates the shares of all workers.

use std::collections::BTreeMap;
use std::sync::mpsc::SyncSender;

use differential_dataflow::VecCollection;
use differential_dataflow::consolidation::consolidate;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::probe::{Handle as ProbeHandle, Probe};

use crate::model::{Change, Epoch, EpochOutput, Rejection};

/// One worker's share of some closed epochs.
#[derive(Debug)]
pub struct WorkerReport {
    /// The worker.
    pub worker: usize,
    /// Every epoch below this is closed on this worker (`None`: all input is done).
    pub frontier: Option<Epoch>,
    /// The worker's consolidated share of the epochs that closed since its last report (only
    /// non-empty ones).
    pub shares: Vec<EpochOutput>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Item {
    Change(Change),
    Rejected(Rejection),
}

/// Reports `changes` and `rejections` to `sender` as epochs close, and makes `probe` follow
/// the output.
pub fn report<'scope>(
    changes: VecCollection<'scope, u64, Change>,
    rejections: VecCollection<'scope, u64, Rejection>,
    worker: usize,
    sender: SyncSender<WorkerReport>,
    probe: &ProbeHandle<u64>,
) {
    let items = changes
        .map(Item::Change)
        .concat(rejections.map(Item::Rejected));
    let mut open: BTreeMap<Epoch, Vec<(Item, i64)>> = BTreeMap::new();
    let mut reported: Option<Epoch> = Some(0);
    items
        .inner
        .probe_with(probe)
        .sink(Pipeline, "Report", move |(input, frontier)| {
            input.for_each(|_cap, data| {
                for (item, epoch, diff) in data.drain(..) {
                    open.entry(epoch).or_default().push((item, diff as i64));
                }
            });
            let now = frontier.frontier().iter().min().copied();
            if now == reported {
                return;
            }
            let mut shares = Vec::new();
            while let Some(entry) = open.first_entry() {
                if now.is_some_and(|frontier| *entry.key() >= frontier) {
                    break;
                }
                let epoch = *entry.key();
                let mut items = entry.remove();
                consolidate(&mut items);
                let mut changes = Vec::with_capacity(items.len());
                let mut rejections = Vec::new();
                for (item, diff) in items {
                    match item {
                        Item::Change(change) => changes.push((change, diff)),
                        Item::Rejected(refused) => {
                            rejections.extend((0..diff).map(|_| refused.clone()))
                        }
                    }
                }
                shares.push(EpochOutput {
                    events: Vec::new(),
                    restored: false,
                    epoch,
                    changes,
                    rejections,
                });
            }
            reported = now;
            // The receiver may be gone during shutdown; the dataflow still runs to completion.
            let _ = sender.send(WorkerReport {
                worker,
                frontier: now,
                shares,
            });
        });
}
