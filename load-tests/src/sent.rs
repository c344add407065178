//! [`SentLog`]: when each fix left the harness, so a tracker can time its arrival.
//!
//! Publisher and trackers run in the same process, so the publish time never travels: the
//! publisher notes `(courier, occurred_at) → (sequence number, Instant)` just before the
//! fix is sent, and a tracker that receives the courier's position change looks the fix up
//! by the change's `at_ms` (the fix's `occurred_at`, distinct per courier at up to 1 000
//! fixes/s). Each courier keeps only its most recent fixes: memory is bounded by
//! `couriers × KEEP`.
//!
//! Status changes are noted too ([`SentLog::status_published`]), newest only, for the
//! publish → GraphQL probe.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Instant;

use delivertrack_dataflow::{CourierId, DeliveryId, Status, UnixMillis};

/// Fixes remembered per courier.
pub const KEEP: usize = 512;

#[derive(Debug, Default)]
struct CourierLog {
    recent: VecDeque<(UnixMillis, u64, Instant)>,
    last_seq: u64,
}

/// See the [module documentation](self).
#[derive(Debug)]
pub struct SentLog {
    index: HashMap<CourierId, usize>,
    couriers: Vec<Mutex<CourierLog>>,
    last_status: Mutex<Option<(DeliveryId, Status, Instant)>>,
}

impl SentLog {
    /// A log for the couriers `ids` (index = position in `ids`).
    pub fn new(ids: &[CourierId]) -> Self {
        Self {
            index: ids.iter().enumerate().map(|(i, id)| (*id, i)).collect(),
            couriers: ids
                .iter()
                .map(|_| Mutex::new(CourierLog::default()))
                .collect(),
            last_status: Mutex::new(None),
        }
    }

    /// Couriers in the log.
    pub fn couriers(&self) -> usize {
        self.couriers.len()
    }

    /// The index of a courier, if it is one of ours.
    pub fn courier_index(&self, id: &CourierId) -> Option<usize> {
        self.index.get(id).copied()
    }

    /// Notes that fix `seq` of courier `courier`, taken at `at_ms`, is being sent now.
    pub fn published(&self, courier: usize, at_ms: UnixMillis, seq: u64, when: Instant) {
        if let Some(Ok(mut log)) = self.couriers.get(courier).map(Mutex::lock) {
            if log.recent.len() >= KEEP {
                log.recent.pop_front();
            }
            log.recent.push_back((at_ms, seq, when));
            log.last_seq = log.last_seq.max(seq);
        }
    }

    /// The sequence number and send time of courier `courier`'s fix taken at `at_ms`.
    pub fn lookup(&self, courier: usize, at_ms: UnixMillis) -> Option<(u64, Instant)> {
        let log = self.couriers.get(courier)?.lock().ok()?;
        log.recent
            .iter()
            .rev()
            .find(|(at, _, _)| *at == at_ms)
            .map(|&(_, seq, when)| (seq, when))
    }

    /// The last sequence number sent for `courier` (0: none).
    pub fn last_seq(&self, courier: usize) -> u64 {
        self.couriers
            .get(courier)
            .and_then(|log| log.lock().ok().map(|log| log.last_seq))
            .unwrap_or(0)
    }

    /// Notes that `delivery` was sent to `status` now.
    pub fn status_published(&self, delivery: DeliveryId, status: Status, when: Instant) {
        if let Ok(mut last) = self.last_status.lock() {
            *last = Some((delivery, status, when));
        }
    }

    /// Takes the newest status change noted since the last call.
    pub fn take_status(&self) -> Option<(DeliveryId, Status, Instant)> {
        self.last_status
            .lock()
            .ok()
            .and_then(|mut last| last.take())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn fixes_are_found_by_courier_and_time_and_old_ones_forgotten() {
        let ids = [CourierId(Uuid::from_u128(1)), CourierId(Uuid::from_u128(2))];
        let log = SentLog::new(&ids);
        assert_eq!(log.courier_index(&ids[1]), Some(1));
        let t0 = Instant::now();
        for seq in 1..=(KEEP as u64 + 10) {
            log.published(0, 1_000 + seq as i64, seq, t0);
        }
        assert_eq!(
            log.lookup(0, 1_000 + KEEP as i64 + 10).unwrap().0,
            KEEP as u64 + 10
        );
        assert_eq!(log.lookup(0, 1_001), None, "evicted");
        assert_eq!(log.lookup(1, 1_001), None);
        assert_eq!(log.last_seq(0), KEEP as u64 + 10);
        assert_eq!(log.last_seq(1), 0);
        assert_eq!(log.last_seq(7), 0);
    }
}
