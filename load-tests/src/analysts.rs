//! GraphQL analysts: K clients polling the metrics query, and the visibility probe.
//!
//! Each analyst sends the query every `K / rate` seconds (`POST /graphql` with an admin
//! token) and records request → full answer; an answer with GraphQL `errors` counts as an
//! error of kind `graphql_errors`. The probe measures publish → visible: it takes the
//! newest status change the fleet published ([`SentLog::take_status`]) and asks
//! `delivery(id) { status }` every 5 ms until the answer shows that status or a later one.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use delivertrack_dataflow::Status;
use serde_json::{Value, json};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::record::{Recorder, Series};
use crate::sent::SentLog;
use crate::target::Target;

/// Which metrics the analysts ask for (and the analytics baseline computes in SQL).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricsScope {
    /// The fleet's success rate: one row (a dashboard's headline).
    Overall,
    /// Success rates per courier: one row per courier.
    Courier,
}

impl MetricsScope {
    /// The GraphQL query of this scope.
    pub fn query(self) -> &'static str {
        match self {
            MetricsScope::Overall => {
                "{ successRates(scope: OVERALL) { deliveries delivered failed cancelled active successRate } }"
            }
            MetricsScope::Courier => {
                "{ successRates(scope: COURIER) { key deliveries delivered failed cancelled active successRate } }"
            }
        }
    }
}

/// How the analysts run.
#[derive(Clone, Debug)]
pub struct AnalystConfig {
    /// Analysts.
    pub count: usize,
    /// Requests per second, all analysts together.
    pub rate: f64,
    /// The query.
    pub query: String,
    /// Run the publish → GraphQL probe too.
    pub probe: bool,
}

/// What the analysts share.
#[derive(Debug, Clone)]
pub struct AnalystContext {
    /// The API.
    pub target: Target,
    /// An admin token.
    pub token: String,
    /// HTTP client.
    pub http: reqwest::Client,
    /// Measurements.
    pub recorder: Arc<Recorder>,
    /// The fleet's status changes.
    pub sent: Arc<SentLog>,
    /// Fires to stop.
    pub stop: CancellationToken,
}

/// Runs the analysts (and the probe) until `ctx.stop` fires.
pub async fn run_analysts(config: AnalystConfig, ctx: AnalystContext) {
    let mut tasks = tokio::task::JoinSet::new();
    let count = config.count.max(1);
    let period = Duration::from_secs_f64(count as f64 / config.rate.max(0.001));
    let body = Arc::new(json!({ "query": config.query }));
    for k in 0..config.count {
        let ctx = ctx.clone();
        let body = Arc::clone(&body);
        tasks.spawn(async move {
            // Spread the analysts over one period.
            tokio::time::sleep(period.mul_f64(k as f64 / count as f64)).await;
            let mut ticks = tokio::time::interval(period);
            ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = ctx.stop.cancelled() => return,
                    _ = ticks.tick() => { query(&ctx, &body).await; }
                }
            }
        });
    }
    if config.probe {
        let ctx = ctx.clone();
        tasks.spawn(async move { probe(&ctx).await });
    }
    while tasks.join_next().await.is_some() {}
}

/// One query; `Some(answer)` when it succeeded.
async fn query(ctx: &AnalystContext, body: &Value) -> Option<Value> {
    let started = Instant::now();
    let answer = ctx
        .http
        .post(ctx.target.http("/graphql"))
        .bearer_auth(&ctx.token)
        .json(body)
        .timeout(Duration::from_secs(10))
        .send()
        .await;
    let answer = match answer {
        Ok(answer) => answer,
        Err(error) => {
            ctx.recorder.error(if error.is_timeout() {
                "graphql_timeout"
            } else {
                "graphql_connect"
            });
            return None;
        }
    };
    let status = answer.status();
    let value: Option<Value> = answer.json().await.ok();
    let elapsed = started.elapsed();
    ctx.recorder
        .graphql_requests
        .fetch_add(1, Ordering::Relaxed);
    match value {
        Some(value) if status.is_success() && value.get("errors").is_none_or(Value::is_null) => {
            ctx.recorder.latency(Series::GraphqlQuery, elapsed);
            Some(value)
        }
        Some(_) if status.is_success() => {
            ctx.recorder.error("graphql_errors");
            None
        }
        _ => {
            ctx.recorder
                .error(format!("graphql_http_{}", status.as_u16()));
            None
        }
    }
}

/// Publish → visible in GraphQL, one status change at a time.
async fn probe(ctx: &AnalystContext) {
    const PATIENCE: Duration = Duration::from_secs(10);
    loop {
        tokio::select! {
            () = ctx.stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        let Some((delivery, wanted, sent)) = ctx.sent.take_status() else {
            continue;
        };
        let body = json!({
            "query": format!("{{ delivery(id: \"{}\") {{ status }} }}", delivery.0)
        });
        loop {
            if ctx.stop.is_cancelled() {
                return;
            }
            if sent.elapsed() > PATIENCE {
                ctx.recorder.error("graphql_visibility_timeout");
                break;
            }
            let seen = reqwest_status(ctx, &body).await;
            if seen.is_some_and(|seen| at_least(seen, wanted)) {
                ctx.recorder
                    .latency(Series::PublishToGraphql, sent.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

async fn reqwest_status(ctx: &AnalystContext, body: &Value) -> Option<Status> {
    let answer = ctx
        .http
        .post(ctx.target.http("/graphql"))
        .bearer_auth(&ctx.token)
        .json(body)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    let value: Value = answer.json().await.ok()?;
    value["data"]["delivery"]["status"]
        .as_str()
        .and_then(|s| s.to_ascii_lowercase().parse().ok())
}

/// Is `seen` the status `wanted` or one after it in the lifecycle?
fn at_least(seen: Status, wanted: Status) -> bool {
    seen == wanted || (seen as u8 > wanted as u8 && (wanted.can_become(seen) || seen.is_terminal()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_later_status_counts_as_visible() {
        assert!(at_least(Status::PickedUp, Status::PickedUp));
        assert!(at_least(Status::InTransit, Status::PickedUp));
        assert!(at_least(Status::Delivered, Status::Assigned));
        assert!(!at_least(Status::Assigned, Status::PickedUp));
        assert!(!at_least(Status::Created, Status::Assigned));
    }
}
