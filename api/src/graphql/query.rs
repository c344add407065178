//! [`QueryRoot`]: the analytics queries and the delivery lookups.
//!
//! Every resolver reads the read model under its read lock once (`with_state`), so the
//! rows of one field are consistent as of one epoch, which each row carries (`epoch`).

use std::ops::Bound;

use async_graphql::{Context, Error, ID, Object};
use delivertrack_dataflow::model::{Scope, Tally};
use delivertrack_dataflow::{CourierId, DeliveryId, Epoch, Status};
use delivertrack_sinks::read_model::ReadState;
use uuid::Uuid;

use super::access::{self, BAD_USER_INPUT, error};
use super::limits::SCAN_COST;
use super::types::{
    CourierEfficiency, CourierOrder, Delivery, DeliveryPage, DeliveryStatus, MetricScope, PeakTime,
    Satisfaction, ScopeKey, SuccessRate,
};

/// The most deliveries one `deliveries` page holds.
pub const MAX_PAGE: i32 = 100;

/// The root of every query.
#[derive(Debug, Default)]
pub struct QueryRoot;

#[Object(name = "Query")]
impl QueryRoot {
    /// The last epoch the read model applied (`null` before the first): how fresh every
    /// figure is. Any authenticated caller may ask.
    async fn epoch(&self, ctx: &Context<'_>) -> Result<Option<Epoch>, Error> {
        let (_, model) = access::caller(ctx)?;
        Ok(model.epoch())
    }

    /// Success rates of one family of groups: `OVERALL` (always one row), `ZONE`,
    /// `COURIER`, `HOUR` or `WEEKDAY_HOUR`, each in key order. Admins only.
    #[graphql(complexity = "SCAN_COST + child_complexity")]
    async fn success_rates(
        &self,
        ctx: &Context<'_>,
        #[graphql(default_with = "MetricScope::Overall")] scope: MetricScope,
    ) -> Result<Vec<SuccessRate>, Error> {
        let model = access::admin(ctx)?;
        Ok(model.with_state(|state| {
            rows(state, scope)
                .map(|(s, tally)| SuccessRate::new(state.epoch, ScopeKey::new(&s, state), &tally))
                .collect()
        }))
    }

    /// Courier efficiency: one courier's (`courierId`) or every courier's with aggregates,
    /// best first by `orderBy`, at most `limit` rows. Admins only.
    #[graphql(complexity = "SCAN_COST + child_complexity")]
    async fn courier_efficiency(
        &self,
        ctx: &Context<'_>,
        courier_id: Option<ID>,
        #[graphql(default_with = "CourierOrder::Delivered")] order_by: CourierOrder,
        limit: Option<i32>,
    ) -> Result<Vec<CourierEfficiency>, Error> {
        let model = access::admin(ctx)?;
        let courier = courier_id
            .map(|id| parse_id("courierId", &id).map(CourierId))
            .transpose()?;
        let limit = limit.map(|n| count("limit", n, i32::MAX)).transpose()?;
        let mut rows: Vec<CourierEfficiency> = model.with_state(|state| {
            state
                .metrics
                .iter()
                .filter_map(|(scope, tally)| match scope {
                    Scope::Courier(id) if courier.is_none_or(|c| c == *id) => {
                        Some(CourierEfficiency::new(state.epoch, *id, tally))
                    }
                    _ => None,
                })
                .collect()
        });
        rows.sort_by(|a, b| CourierEfficiency::compare(order_by, a, b));
        if let Some(limit) = limit {
            rows.truncate(limit);
        }
        Ok(rows)
    }

    /// Peak times: deliveries per weekday and hour of creation (UTC), busiest first (ties
    /// in weekday and hour order), at most `limit` rows. Admins only.
    #[graphql(complexity = "SCAN_COST + child_complexity")]
    async fn peak_times(
        &self,
        ctx: &Context<'_>,
        limit: Option<i32>,
    ) -> Result<Vec<PeakTime>, Error> {
        let model = access::admin(ctx)?;
        let limit = limit.map(|n| count("limit", n, i32::MAX)).transpose()?;
        let mut rows: Vec<PeakTime> = model.with_state(|state| {
            let total = state
                .metrics
                .get(&Scope::Overall)
                .map_or(0, |t| t.deliveries);
            state
                .metrics
                .iter()
                .filter_map(|(scope, tally)| match scope {
                    Scope::WeekdayHour(weekday, hour) => {
                        Some(PeakTime::new(state.epoch, *weekday, *hour, tally, total))
                    }
                    _ => None,
                })
                .collect()
        });
        // Stable: equal counts keep their (weekday, hour) order.
        rows.sort_by_key(|row| std::cmp::Reverse(row.deliveries));
        if let Some(limit) = limit {
            rows.truncate(limit);
        }
        Ok(rows)
    }

    /// Customer satisfaction (ratings) of one family of groups, in key order. Admins
    /// only.
    #[graphql(complexity = "SCAN_COST + child_complexity")]
    async fn satisfaction(
        &self,
        ctx: &Context<'_>,
        #[graphql(default_with = "MetricScope::Overall")] scope: MetricScope,
    ) -> Result<Vec<Satisfaction>, Error> {
        let model = access::admin(ctx)?;
        Ok(model.with_state(|state| {
            rows(state, scope)
                .map(|(s, tally)| Satisfaction::new(state.epoch, ScopeKey::new(&s, state), &tally))
                .collect()
        }))
    }

    /// One delivery; `null` when it does not exist or the caller may not see it (a
    /// customer sees their own, a courier those assigned to them, an admin all).
    async fn delivery(&self, ctx: &Context<'_>, id: ID) -> Result<Option<Delivery>, Error> {
        let (principal, model) = access::caller(ctx)?;
        let id = DeliveryId(parse_id("id", &id)?);
        Ok(model.with_state(|state| {
            state
                .deliveries
                .get(&id)
                .filter(|d| access::may_see(&principal, d))
                .and_then(|_| state.delivery(id))
                .map(Delivery::from)
        }))
    }

    /// The deliveries the caller may see (as for `delivery`), optionally of one status,
    /// in delivery-id order: `first` of them (at most 100) after the cursor `after`.
    #[graphql(complexity = "SCAN_COST.max(1 + (first.max(0) as usize) * child_complexity)")]
    async fn deliveries(
        &self,
        ctx: &Context<'_>,
        status: Option<DeliveryStatus>,
        #[graphql(default = 20)] first: i32,
        after: Option<String>,
    ) -> Result<DeliveryPage, Error> {
        let (principal, model) = access::caller(ctx)?;
        let first = count("first", first, MAX_PAGE)?;
        let after = after
            .map(|cursor| {
                Uuid::try_parse(&cursor)
                    .map(DeliveryId)
                    .map_err(|_| error(BAD_USER_INPUT, format!("{cursor:?} is not a cursor")))
            })
            .transpose()?;
        let status = status.map(Status::from);
        Ok(model.with_state(|state| {
            let start = after.map_or(Bound::Unbounded, Bound::Excluded);
            let mut visible = state
                .deliveries
                .range((start, Bound::Unbounded))
                .filter(|(_, d)| {
                    status.is_none_or(|s| d.status == s) && access::may_see(&principal, d)
                })
                .map(|(id, _)| *id);
            let ids: Vec<DeliveryId> = visible.by_ref().take(first).collect();
            let has_next_page = visible.next().is_some();
            DeliveryPage {
                end_cursor: ids.last().map(ToString::to_string),
                has_next_page,
                nodes: ids
                    .into_iter()
                    .filter_map(|id| state.delivery(id))
                    .map(Delivery::from)
                    .collect(),
            }
        }))
    }
}

/// The groups of one family with their tallies, in key order. `OVERALL` always has its
/// row (zeros before the first delivery), as in the REST snapshot.
fn rows(state: &ReadState, scope: MetricScope) -> impl Iterator<Item = (Scope, Tally)> + '_ {
    let overall = (scope == MetricScope::Overall && !state.metrics.contains_key(&Scope::Overall))
        .then(|| (Scope::Overall, Tally::default()));
    state
        .metrics
        .iter()
        .filter(move |(s, _)| MetricScope::of(s) == scope)
        .map(|(s, t)| (*s, *t))
        .chain(overall)
}

/// A UUID argument, or `BAD_USER_INPUT`.
fn parse_id(argument: &str, id: &ID) -> Result<Uuid, Error> {
    Uuid::try_parse(id.as_str()).map_err(|_| {
        error(
            BAD_USER_INPUT,
            format!(
                "{argument}: {:?} is not a valid id (a UUID is expected)",
                id.as_str()
            ),
        )
    })
}

/// A count argument in `0..=max`, or `BAD_USER_INPUT`.
fn count(argument: &str, n: i32, max: i32) -> Result<usize, Error> {
    if (0..=max).contains(&n) {
        usize::try_from(n).map_err(|_| error(BAD_USER_INPUT, format!("{argument} is out of range")))
    } else {
        Err(error(
            BAD_USER_INPUT,
            format!("{argument} must be between 0 and {max}, not {n}"),
        ))
    }
}
