//! Zone upserts: last-writer-wins per zone, deletes kept as tombstones so that a late
//! upsert cannot resurrect a deleted zone.

use std::collections::HashMap;

use differential_dataflow::VecCollection;
use timely::dataflow::StreamVec;

use super::{EpochState, Freshness, Version, freshness, net_changes, rejection, upsert};
use crate::event::EventBody;
use crate::ids::ZoneId;
use crate::model::{RejectReason, Rejection, ZoneState};
use crate::restore::{Input, Restore, split};

/// A zone's register: its version and its state (`None` once deleted).
#[derive(Debug, Clone)]
struct Register {
    version: Version,
    state: Option<ZoneState>,
}

/// The zones of one worker's share.
#[derive(Debug, Default)]
pub struct ZoneRegisters {
    zones: HashMap<ZoneId, Register>,
}

impl EpochState for ZoneRegisters {
    type Record = (ZoneId, ZoneState);

    /// Applies one epoch of zone events in apply order. Returns the net change of every zone
    /// it touched and the events it refused.
    fn apply_epoch(
        &mut self,
        inputs: Vec<Input>,
    ) -> (Vec<((ZoneId, ZoneState), isize)>, Vec<Rejection>) {
        let (restores, events) = split(inputs);
        let mut before: HashMap<ZoneId, Option<ZoneState>> = HashMap::new();
        let mut rejections = Vec::new();
        for restore in restores {
            if let Restore::Zone {
                zone_id,
                version,
                state,
            } = restore
            {
                let previous = self.zones.insert(zone_id, Register { version, state });
                before
                    .entry(zone_id)
                    .or_insert_with(|| previous.and_then(|register| register.state));
            }
        }
        for event in events {
            let (kind, version) = (event.kind(), (event.occurred_at, event.event_id));
            let (zone_id, state) = match event.body {
                EventBody::ZoneUpserted(upsert) => (
                    upsert.zone_id,
                    Some(ZoneState {
                        name: upsert.name,
                        shape: upsert.shape,
                        dwell_ms: upsert.dwell_ms,
                        updated_at: event.occurred_at,
                        event_id: event.event_id,
                    }),
                ),
                EventBody::ZoneDeleted(delete) => (delete.zone_id, None),
                _ => continue,
            };
            let current = self.zones.get(&zone_id);
            match freshness(version, current.map(|register| register.version)) {
                Freshness::Newer => {
                    before
                        .entry(zone_id)
                        .or_insert_with(|| current.and_then(|register| register.state.clone()));
                    self.zones.insert(zone_id, Register { version, state });
                }
                Freshness::Replay => {}
                Freshness::Stale => {
                    rejections.push(rejection(version.1, kind, RejectReason::Stale));
                }
            }
        }
        let mut changes = net_changes(before, |zone_id| {
            self.zones
                .get(zone_id)
                .and_then(|register| register.state.clone())
        });
        changes.sort();
        (changes, rejections)
    }
}

/// Maintains `zones(zone, state)` from zone events, partitioned by zone.
pub fn upsert_zones<'scope>(
    events: StreamVec<'scope, u64, Input>,
) -> (
    VecCollection<'scope, u64, (ZoneId, ZoneState)>,
    VecCollection<'scope, u64, Rejection>,
) {
    upsert::<ZoneRegisters>(events, "UpsertZones", |input: &Input| match input {
        Input::Event(event) => match &event.body {
            EventBody::ZoneUpserted(upsert) => upsert.zone_id.route(),
            EventBody::ZoneDeleted(delete) => delete.zone_id.route(),
            _ => 0,
        },
        Input::Restore(restore) => match **restore {
            Restore::Zone { zone_id, .. } => zone_id.route(),
            _ => 0,
        },
    })
}
