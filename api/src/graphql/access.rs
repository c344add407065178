//! Who may read what, and the GraphQL errors that say no.
//!
//! The caller's [`Principal`] and the [`ReadModel`] travel in the request's (or the
//! WebSocket connection's) context data. The rules are the REST ones:
//!
//! - analytics (every metrics query and the `metricChanged` subscription) are for admins;
//!   anyone else gets an error with `extensions.code = "FORBIDDEN"`;
//! - a delivery is visible to an admin, to the customer who ordered it and to the courier
//!   it is assigned to; to anyone else it does not exist (`null`, never `FORBIDDEN`, so its
//!   existence is not revealed);
//! - without a principal every field is refused with `UNAUTHENTICATED` (over HTTP a
//!   request without a valid token never gets this far: it is answered `401`).

use async_graphql::{Context, Error, ErrorExtensions};
use delivertrack_dataflow::model::DeliveryState;
use delivertrack_sinks::ReadModel;

use crate::auth::{Principal, Role};

/// `extensions.code` of an error for a caller without a valid token.
pub const UNAUTHENTICATED: &str = "UNAUTHENTICATED";
/// `extensions.code` of an error for a caller whose role may not do this.
pub const FORBIDDEN: &str = "FORBIDDEN";
/// `extensions.code` of an error for an argument out of range or malformed.
pub const BAD_USER_INPUT: &str = "BAD_USER_INPUT";
/// `extensions.code` of an error for a query nested deeper than the limit.
pub const QUERY_TOO_DEEP: &str = "QUERY_TOO_DEEP";
/// `extensions.code` of an error for a query costlier than the limit.
pub const QUERY_TOO_COMPLEX: &str = "QUERY_TOO_COMPLEX";
/// `extensions.code` of an error that is the server's fault (logged, not detailed).
pub const INTERNAL: &str = "INTERNAL";

/// An error with a stable `extensions.code`.
pub fn error(code: &'static str, message: impl Into<String>) -> Error {
    Error::new(message).extend_with(|_, extensions| extensions.set("code", code))
}

/// The caller and the read model, or `UNAUTHENTICATED`.
///
/// # Errors
/// `UNAUTHENTICATED` without a principal; `INTERNAL` if the read model is missing (a
/// wiring bug).
pub fn caller<'a>(ctx: &Context<'a>) -> Result<(Principal, &'a ReadModel), Error> {
    let principal = ctx
        .data_opt::<Principal>()
        .copied()
        .ok_or_else(|| error(UNAUTHENTICATED, "a bearer token is required"))?;
    let model = ctx.data_opt::<ReadModel>().ok_or_else(|| {
        tracing::error!("A GraphQL request ran without the read model in its context.");
        error(INTERNAL, "internal error")
    })?;
    Ok((principal, model))
}

/// The read model for an admin, or `UNAUTHENTICATED` / `FORBIDDEN`.
///
/// # Errors
/// As [`caller`], and `FORBIDDEN` for customers and couriers.
pub fn admin<'a>(ctx: &Context<'a>) -> Result<&'a ReadModel, Error> {
    let (principal, model) = caller(ctx)?;
    if principal.role != Role::Admin {
        return Err(error(FORBIDDEN, "analytics are available to admins only"));
    }
    Ok(model)
}

/// May `principal` see this delivery? The REST rule itself
/// ([`reads::access::may_see`](crate::reads::access::may_see)): admins all, customers
/// their own, couriers those assigned to them now.
pub fn may_see(principal: &Principal, delivery: &DeliveryState) -> bool {
    crate::reads::access::may_see(principal, delivery.customer_id, delivery.courier_id)
}
