//! Who may see which delivery: its customer, its courier, and admins.
//!
//! The one rule of [`may_see`] serves `GET /deliveries/{id}`, the list and the tracking
//! WebSocket alike, so that what a caller can read and what it can watch never differ.

use delivertrack_dataflow::{CourierId, CustomerId};
use delivertrack_sinks::read_model::DeliveryDetails;

use crate::auth::{Principal, Role};
use crate::error::ApiError;

/// May `principal` see a delivery of `customer`, assigned to `courier`? Admins see every
/// delivery, a customer those they ordered, a courier those assigned to them now.
pub fn may_see(principal: &Principal, customer: CustomerId, courier: Option<CourierId>) -> bool {
    match principal.role {
        Role::Admin => true,
        Role::Customer => customer.0 == principal.sub,
        Role::Courier => courier.is_some_and(|courier| courier.0 == principal.sub),
    }
}

/// [`may_see`] for a delivery's details.
pub fn may_see_delivery(principal: &Principal, delivery: &DeliveryDetails) -> bool {
    may_see(principal, delivery.customer_id, delivery.courier_id)
}

/// `403 forbidden` unless the caller is an admin.
///
/// # Errors
/// [`ApiError::Forbidden`] for customers and couriers.
pub fn require_admin(principal: &Principal) -> Result<(), ApiError> {
    if principal.is_admin() {
        Ok(())
    } else {
        Err(ApiError::Forbidden {
            reason: "this route is for admins".to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn principal(role: Role, n: u128) -> Principal {
        Principal {
            sub: Uuid::from_u128(n),
            role,
        }
    }

    #[test]
    fn owners_and_admins_see_a_delivery_others_do_not() {
        let customer = CustomerId(Uuid::from_u128(1));
        let courier = Some(CourierId(Uuid::from_u128(2)));
        assert!(may_see(&principal(Role::Admin, 9), customer, courier));
        assert!(may_see(&principal(Role::Customer, 1), customer, courier));
        assert!(may_see(&principal(Role::Courier, 2), customer, courier));
        assert!(!may_see(&principal(Role::Customer, 2), customer, courier));
        assert!(!may_see(&principal(Role::Courier, 1), customer, courier));
        // Not yet assigned: no courier sees it, even one whose id is the customer's.
        assert!(!may_see(&principal(Role::Courier, 1), customer, None));
        assert!(require_admin(&principal(Role::Admin, 9)).is_ok());
        assert!(matches!(
            require_admin(&principal(Role::Customer, 1)),
            Err(ApiError::Forbidden { .. })
        ));
    }
}
