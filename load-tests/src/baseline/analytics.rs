//! The analytics read path: the GraphQL metrics query against the same aggregate computed
//! by PostgreSQL over the event log.
//!
//! Both answer the same question — GraphQL from the read model the dataflow keeps current
//! (`successRates(scope: ...)`), PostgreSQL by a `GROUP BY` over the event log, the
//! way a reporting query without the dataflow would (each delivery's creation, assigned
//! courier and latest status):
//! - [`MetricsScope::Overall`]: the fleet's deliveries by current status (GraphQL: one
//!   row of counts and rates; SQL: one row per status);
//! - [`MetricsScope::Courier`]: per courier, deliveries and how they ended, with a row for
//!   every courier that reported a position, as the dataflow's courier scope has
//!   (couriers without deliveries have zeros).
//!
//! Each is sent `requests` times, one after another from one client, while the fleet
//! ingests; the latencies are request → full answer (for SQL: query → all rows fetched).
//! The row counts of the last answers are reported.

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};
use sqlx::Connection;
use sqlx::postgres::PgConnection;

use crate::analysts::MetricsScope;
use crate::record::LatencySummary;
use crate::target::Target;

/// The fleet's deliveries by current status: a `GROUP BY` over the event log (each
/// delivery's creation, and its latest status change).
pub const SQL_OVERALL: &str = "
WITH created AS (
    SELECT delivery_id FROM delivery_events WHERE kind = 'delivery.created' AND NOT stale
), latest AS (
    SELECT DISTINCT ON (delivery_id) delivery_id, payload ->> 'status' AS status
    FROM delivery_events
    WHERE kind = 'status.changed' AND NOT stale
    ORDER BY delivery_id, occurred_at DESC, event_id DESC
)
SELECT coalesce(l.status, 'created') AS status, count(*) AS deliveries
FROM created c LEFT JOIN latest l USING (delivery_id)
GROUP BY 1";

/// Per courier: deliveries by how they ended, a `GROUP BY` over the event log.
pub const SQL_COURIER: &str = "
WITH couriers AS (
    SELECT DISTINCT courier_id FROM location_fixes WHERE NOT stale
), assigned AS (
    SELECT DISTINCT ON (delivery_id) delivery_id, courier_id
    FROM delivery_events
    WHERE kind = 'status.changed' AND NOT stale AND payload ->> 'status' = 'assigned'
    ORDER BY delivery_id, occurred_at DESC, event_id DESC
), latest AS (
    SELECT DISTINCT ON (delivery_id) delivery_id, payload ->> 'status' AS status
    FROM delivery_events
    WHERE kind = 'status.changed' AND NOT stale
    ORDER BY delivery_id, occurred_at DESC, event_id DESC
), per_courier AS (
    SELECT a.courier_id,
           count(*) AS deliveries,
           count(*) FILTER (WHERE l.status = 'delivered') AS delivered,
           count(*) FILTER (WHERE l.status = 'failed') AS failed,
           count(*) FILTER (WHERE l.status = 'cancelled') AS cancelled
    FROM assigned a JOIN latest l USING (delivery_id)
    GROUP BY a.courier_id
)
SELECT c.courier_id,
       coalesce(p.deliveries, 0) AS deliveries,
       coalesce(p.delivered, 0) AS delivered,
       coalesce(p.failed, 0) AS failed,
       coalesce(p.cancelled, 0) AS cancelled
FROM couriers c LEFT JOIN per_courier p USING (courier_id)";

/// The SQL of a scope.
pub fn statement(scope: MetricsScope) -> &'static str {
    match scope {
        MetricsScope::Overall => SQL_OVERALL,
        MetricsScope::Courier => SQL_COURIER,
    }
}

/// GraphQL against SQL.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct AnalyticsBaseline {
    /// The metrics compared.
    pub scope: Option<MetricsScope>,
    /// Requests of each.
    pub requests: usize,
    /// The GraphQL query, request → answer.
    pub graphql: LatencySummary,
    /// Rows (couriers) in the last GraphQL answer.
    pub graphql_rows: usize,
    /// The SQL aggregate, query → rows.
    pub sql: LatencySummary,
    /// Rows in the last SQL answer.
    pub sql_rows: usize,
    /// Events in the log (`event_log`: `delivery_events` and `location_fixes`) when the SQL
    /// side ran.
    pub logged_events: i64,
    /// SQL p50 ÷ GraphQL p50.
    pub ratio_p50: Option<f64>,
}

/// Why the comparison could not run.
#[derive(Debug, thiserror::Error)]
pub enum AnalyticsError {
    /// PostgreSQL failed.
    #[error("PostgreSQL: {0}")]
    Database(#[from] sqlx::Error),
    /// GraphQL failed.
    #[error("GraphQL: {0}")]
    Graphql(String),
}

/// Runs both sides `requests` times each.
///
/// # Errors
/// [`AnalyticsError`] when either side fails.
pub async fn analytics_read_path(
    target: &Target,
    http: &reqwest::Client,
    token: &str,
    database_url: &str,
    query: &str,
    scope: MetricsScope,
    requests: usize,
) -> Result<AnalyticsBaseline, AnalyticsError> {
    let requests = requests.max(1);
    let body = json!({ "query": query });
    let mut graphql = histogram();
    let mut graphql_rows = 0;
    for _ in 0..requests {
        let started = Instant::now();
        let answer = http
            .post(target.http("/graphql"))
            .bearer_auth(token)
            .json(&body)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| AnalyticsError::Graphql(e.to_string()))?;
        let value: Value = answer
            .json()
            .await
            .map_err(|e| AnalyticsError::Graphql(e.to_string()))?;
        record(&mut graphql, started.elapsed());
        if let Some(errors) = value.get("errors").filter(|e| !e.is_null()) {
            return Err(AnalyticsError::Graphql(errors.to_string()));
        }
        graphql_rows = value["data"]
            .as_object()
            .and_then(|data| data.values().next())
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
    }

    let mut db = PgConnection::connect(database_url).await?;
    let logged_events: i64 = sqlx::query_scalar("SELECT count(*) FROM event_log")
        .fetch_one(&mut db)
        .await?;
    let mut sql = histogram();
    let mut sql_rows = 0;
    for _ in 0..requests {
        let started = Instant::now();
        let rows = sqlx::query(statement(scope)).fetch_all(&mut db).await?;
        record(&mut sql, started.elapsed());
        sql_rows = rows.len();
    }
    let _ = db.close().await;
    let graphql = LatencySummary::of(&graphql);
    let sql = LatencySummary::of(&sql);
    Ok(AnalyticsBaseline {
        scope: Some(scope),
        requests,
        ratio_p50: (graphql.p50_ms > 0.0).then(|| sql.p50_ms / graphql.p50_ms),
        graphql,
        graphql_rows,
        sql,
        sql_rows,
        logged_events,
    })
}

#[allow(clippy::expect_used)]
fn histogram() -> hdrhistogram::Histogram<u64> {
    // Constant, valid bounds: no input reaches this.
    hdrhistogram::Histogram::new_with_bounds(1, 600_000_000, 3).expect("constant, valid bounds")
}

fn record(histogram: &mut hdrhistogram::Histogram<u64>, latency: Duration) {
    histogram.saturating_record(
        u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .max(1),
    );
}
