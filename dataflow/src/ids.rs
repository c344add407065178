//! Newtype identifiers, so a courier id can never be passed where a delivery id is expected.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A fresh random id.
            pub fn new_random() -> Self {
                Self(Uuid::new_v4())
            }

            /// The value used to route this entity to a worker: every event of one entity
            /// lands on the same worker, whatever the number of workers.
            pub fn route(&self) -> u64 {
                self.0.as_u64_pair().1
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl From<Uuid> for $name {
            fn from(id: Uuid) -> Self {
                Self(id)
            }
        }
    };
}

id_type!(
    /// A courier: the subject of `location.updated` events.
    CourierId
);
id_type!(
    /// A delivery, from `delivery.created` to its terminal status.
    DeliveryId
);
id_type!(
    /// A delivery zone (geofence).
    ZoneId
);
id_type!(
    /// The customer who ordered a delivery.
    CustomerId
);
id_type!(
    /// The unique id every event carries; sinks dedupe on it.
    EventId
);
