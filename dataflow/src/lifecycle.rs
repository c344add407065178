//! The delivery lifecycle: one transition table, used by the API and the dataflow alike.
//!
//! ```text
//! created → assigned → picked_up → in_transit → delivered | failed
//!    └──────────┴───────────┴───────────┴──────→ cancelled
//! ```

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::event::UnixMillis;
use crate::ids::{CourierId, EventId};

/// The status of a delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Ordered, no courier yet.
    Created,
    /// A courier is on the way to the pickup point.
    Assigned,
    /// The courier has the parcel.
    PickedUp,
    /// The courier is on the way to the dropoff point.
    InTransit,
    /// Handed over. Terminal.
    Delivered,
    /// Given up after pickup. Terminal.
    Failed,
    /// Called off before delivery. Terminal.
    Cancelled,
}

impl Status {
    /// Every status, in lifecycle order.
    pub const ALL: [Status; 7] = [
        Status::Created,
        Status::Assigned,
        Status::PickedUp,
        Status::InTransit,
        Status::Delivered,
        Status::Failed,
        Status::Cancelled,
    ];

    /// The wire name (`picked_up`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Created => "created",
            Status::Assigned => "assigned",
            Status::PickedUp => "picked_up",
            Status::InTransit => "in_transit",
            Status::Delivered => "delivered",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }

    /// Is `self → next` a legal transition?
    pub fn can_become(self, next: Status) -> bool {
        use Status::*;
        matches!(
            (self, next),
            (Created, Assigned)
                | (Assigned, PickedUp)
                | (PickedUp, InTransit)
                | (InTransit, Delivered | Failed)
                | (Created | Assigned | PickedUp | InTransit, Cancelled)
        )
    }

    /// No transition leaves a terminal status.
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Delivered | Status::Failed | Status::Cancelled)
    }

    /// A courier is working on it: the statuses that have an ETA.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            Status::Assigned | Status::PickedUp | Status::InTransit
        )
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One accepted `status.changed` event, as a delivery's history keeps it.
///
/// A delivery's status is its history folded in event time (`occurred_at`, then event id):
/// each step that is a legal transition from the status before it applies, a step that is
/// not — because a step earlier in event time arrived after it and ended the delivery, say —
/// is superseded and changes nothing. The derived order sorts steps exactly that way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct StatusStep {
    /// `occurred_at` of the event.
    pub at: UnixMillis,
    /// The event.
    pub event_id: EventId,
    /// The status it sets.
    pub status: Status,
    /// The courier it names (on `assigned`).
    pub courier_id: Option<CourierId>,
}

/// A status name that is not one of [`Status::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown status {0:?}")]
pub struct UnknownStatus(pub String);

impl FromStr for Status {
    type Err = UnknownStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Status::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_happy_path_is_legal() {
        let path = [
            Status::Created,
            Status::Assigned,
            Status::PickedUp,
            Status::InTransit,
            Status::Delivered,
        ];
        for pair in path.windows(2) {
            assert!(pair[0].can_become(pair[1]), "{} → {}", pair[0], pair[1]);
        }
    }

    #[test]
    fn terminal_statuses_have_no_way_out() {
        for from in Status::ALL.into_iter().filter(|s| s.is_terminal()) {
            for to in Status::ALL {
                assert!(!from.can_become(to), "{from} → {to}");
            }
        }
    }

    #[test]
    fn cancel_is_allowed_before_delivery_only() {
        for from in Status::ALL {
            assert_eq!(
                from.can_become(Status::Cancelled),
                !from.is_terminal(),
                "{from}"
            );
        }
    }

    #[test]
    fn skipping_a_step_or_going_back_is_illegal() {
        assert!(!Status::Created.can_become(Status::PickedUp));
        assert!(!Status::Assigned.can_become(Status::Delivered));
        assert!(!Status::InTransit.can_become(Status::Assigned));
        assert!(!Status::Created.can_become(Status::Created));
    }

    #[test]
    fn names_round_trip() {
        for status in Status::ALL {
            assert_eq!(status.as_str().parse::<Status>(), Ok(status));
        }
        assert!("lost".parse::<Status>().is_err());
    }
}
