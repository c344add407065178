//! Holding operator input by epoch until every input frontier has passed it.

use std::collections::BTreeMap;

use timely::dataflow::operators::Capability;
use timely::progress::frontier::MutableAntichain;

/// One epoch's input from two inputs, with the capability to emit at that epoch.
pub(crate) struct Pending<A, B> {
    pub cap: Capability<u64>,
    pub first: Vec<A>,
    pub second: Vec<B>,
}

/// Input held by epoch.
pub(crate) struct Stash<A, B> {
    by_epoch: BTreeMap<u64, Pending<A, B>>,
}

impl<A, B> Default for Stash<A, B> {
    fn default() -> Self {
        Self {
            by_epoch: BTreeMap::new(),
        }
    }
}

impl<A, B> Stash<A, B> {
    fn entry(&mut self, epoch: u64, cap: impl FnOnce() -> Capability<u64>) -> &mut Pending<A, B> {
        self.by_epoch.entry(epoch).or_insert_with(|| Pending {
            cap: cap(),
            first: Vec::new(),
            second: Vec::new(),
        })
    }

    /// Holds `items` of the first input at `epoch`.
    pub fn first(
        &mut self,
        epoch: u64,
        cap: impl FnOnce() -> Capability<u64>,
        items: impl IntoIterator<Item = A>,
    ) {
        self.entry(epoch, cap).first.extend(items);
    }

    /// Holds `items` of the second input at `epoch`.
    pub fn second(
        &mut self,
        epoch: u64,
        cap: impl FnOnce() -> Capability<u64>,
        items: impl IntoIterator<Item = B>,
    ) {
        self.entry(epoch, cap).second.extend(items);
    }

    /// Removes and returns, oldest first, the epochs that no frontier can still reach.
    pub fn ready(&mut self, frontiers: &[&MutableAntichain<u64>]) -> Vec<(u64, Pending<A, B>)> {
        let mut ready = Vec::new();
        while let Some(entry) = self.by_epoch.first_entry() {
            let epoch = *entry.key();
            if frontiers.iter().any(|frontier| frontier.less_equal(&epoch)) {
                break;
            }
            ready.push((epoch, entry.remove()));
        }
        ready
    }
}
