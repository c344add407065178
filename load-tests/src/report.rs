//! [`Report`]: the outcome of a run, as JSON and as the table printed at the end.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::baseline::{AnalyticsBaseline, BrokerCeiling, GeofenceBaseline};
use crate::record::{LatencySummary, LossCounts, Sample};
use crate::server_metrics::ServerFigures;

/// Events offered, achieved and processed.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct EventFigures {
    /// Events due over the run.
    pub offered: u64,
    /// Events accepted (broker confirm or HTTP 2xx).
    pub achieved: u64,
    /// Offered per second, over the sending time.
    pub offered_per_s: f64,
    /// Achieved per second, over the sending time.
    pub achieved_per_s: f64,
    /// Events the server ingested per second in the steady state (after the ramp-up), from
    /// its `/metrics`.
    pub processed_per_s: Option<f64>,
    /// Events the server ingested during the run.
    pub processed: Option<u64>,
    /// Seconds spent sending.
    pub sending_seconds: f64,
}

/// WebSocket connections and the server's memory.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct WebSocketFigures {
    /// Trackers asked for.
    pub trackers: usize,
    /// The route used.
    pub mode: Option<String>,
    /// Most connections open at once.
    pub peak_connections: i64,
    /// Connections open once every tracker had connected (before the fleet started).
    pub held_connections: i64,
    /// Messages received.
    pub messages: u64,
    /// The server's pid, when known.
    pub server_pid: Option<u32>,
    /// Its resident memory before the trackers connected, KiB.
    pub server_rss_before_kib: Option<u64>,
    /// ... with every tracker connected, KiB.
    pub server_rss_held_kib: Option<u64>,
    /// (held − before) ÷ held connections, KiB.
    pub kib_per_connection: Option<f64>,
    /// The harness's own resident memory per held connection, KiB (its clients' read
    /// buffers are `--ws-read-buffer`): the same WebSocket library on the other side.
    pub harness_kib_per_connection: Option<f64>,
    /// When the held memory was read: `idle` (every tracker connected, before any
    /// traffic: `/ws/changes`) or `loaded` (at the most sessions open while the fleet ran:
    /// `/ws/track`, whose sessions need live deliveries; includes the fleet's own state).
    pub memory_read: Option<String>,
}

/// The baselines measured in this run.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Baselines {
    /// The broker ceiling.
    pub broker: Option<BrokerCeiling>,
    /// Geofence: index against PostGIS.
    pub geofence: Option<GeofenceBaseline>,
    /// GraphQL against SQL.
    pub analytics: Option<AnalyticsBaseline>,
    /// Baselines that could not be measured, and why.
    pub errors: BTreeMap<String, String>,
}

/// One target of issue 7, as far as this run speaks to it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TargetCheck {
    /// What is aimed at.
    pub target: String,
    /// What this run measured.
    pub measured: String,
    /// Met, not met, or not measurable from this run.
    pub met: Option<bool>,
}

/// The first three fields of `/proc/loadavg` (1, 5 and 15 minutes).
pub fn loadavg() -> Option<String> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(
        text.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// The whole outcome.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Report {
    /// `fleet`, `trackers`, `analysts`, `mixed` or `baselines`.
    pub scenario: String,
    /// When the run started, Unix ms.
    pub started_at_ms: i64,
    /// Wall time of the run, seconds.
    pub seconds: f64,
    /// `/proc/loadavg` when the run started and when it ended: how busy the machine was.
    pub loadavg: [Option<String>; 2],
    /// The settings, as given.
    pub config: serde_json::Value,
    /// Events.
    pub events: EventFigures,
    /// Latencies by series name.
    pub latency: BTreeMap<String, LatencySummary>,
    /// What trackers saw of the fixes.
    pub loss: LossCounts,
    /// Errors by kind.
    pub errors: BTreeMap<String, u64>,
    /// Connections and memory.
    pub websocket: WebSocketFigures,
    /// GraphQL requests answered per second, over the sending time.
    pub graphql_per_s: f64,
    /// Baselines.
    pub baselines: Baselines,
    /// The targets of issue 7 this run speaks to.
    pub targets: Vec<TargetCheck>,
    /// Cores used by each part of the system while the fleet was sent (CPU seconds ÷
    /// sending seconds; the machine has `cores`): where the CPU went.
    pub cpu_cores: BTreeMap<String, f64>,
    /// Cores of the machine.
    pub cores: usize,
    /// What the service's `/metrics` say it did while the fleet was sent.
    pub server: Option<ServerFigures>,
    /// One sample per second.
    pub timeline: Vec<Sample>,
    /// Where the chart is, and the colours of its series.
    pub chart: Option<ChartInfo>,
}

/// The PNG written beside the report.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ChartInfo {
    /// Its path.
    pub path: String,
    /// Whether it has text (a font was found).
    pub labelled: bool,
    /// Series and colours.
    pub legend: BTreeMap<String, String>,
}

impl Report {
    /// Fills [`Report::targets`] from the figures.
    pub fn check_targets(&mut self) {
        let mut checks = Vec::new();
        let unpaced = self.config["unpaced"].as_bool().unwrap_or(false);
        // Only an unpaced run offers more than the pipeline takes: its processed rate is
        // the maximum.
        if let (Some(broker), Some(processed), true) =
            (&self.baselines.broker, self.events.processed_per_s, unpaced)
            && broker.consumed_per_s > 0.0
        {
            let ratio = processed / broker.consumed_per_s;
            checks.push(TargetCheck {
                target: "sustained events/s ≥ 0.8 × broker ceiling".into(),
                measured: format!(
                    "{processed:.0} / {:.0} = {ratio:.2} ({} events per message)",
                    broker.consumed_per_s, broker.batch
                ),
                met: Some(ratio >= 0.8),
            });
        }
        if let (Some(broker), Some(processed), true) =
            (&self.baselines.broker, self.events.processed_per_s, unpaced)
            && broker.batch >= 50
        {
            checks.push(TargetCheck {
                target: "≥ 100 000 events/s with 50 events per message".into(),
                measured: format!(
                    "{processed:.0} events/s ({} events per message)",
                    broker.batch
                ),
                met: Some(processed >= 100_000.0),
            });
        }
        if let Some(ws) = self.latency.get("publish_to_websocket")
            && ws.count > 0
        {
            checks.push(TargetCheck {
                target: "publish → WebSocket p99 < 100 ms (at half the maximum sustained rate)"
                    .into(),
                measured: if unpaced {
                    format!(
                        "p99 {:.1} ms, but unpaced: the queue grows and latency is backlog",
                        ws.p99_ms
                    )
                } else {
                    format!(
                        "p99 {:.1} ms at {:.0} events/s offered",
                        ws.p99_ms, self.events.offered_per_s
                    )
                },
                met: (!unpaced).then_some(ws.p99_ms < 100.0),
            });
        }
        // One observer does not make a connection test.
        if self.websocket.trackers > 1 {
            let held = self.websocket.held_connections;
            let per = self.websocket.kib_per_connection;
            checks.push(TargetCheck {
                target: "20k concurrent WebSocket trackers, ≤ 20 KB resident per connection".into(),
                measured: format!(
                    "{held} held, {} KiB per connection",
                    per.map_or("?".into(), |p| format!("{p:.1}"))
                ),
                met: Some(held >= 20_000 && per.is_some_and(|p| p * 1.024 <= 20.0)),
            });
        }
        if let Some(geo) = &self.baselines.geofence {
            checks.push(TargetCheck {
                target: "geofence ≥ 1M position updates/s per core with 20k zones, ≥ 50× PostGIS"
                    .into(),
                measured: format!(
                    "{:.0} updates/s ({} zones), {} × PostGIS",
                    geo.index.updates_per_s,
                    geo.zones,
                    geo.ratio.map_or("?".into(), |r| format!("{r:.1}"))
                ),
                met: Some(
                    geo.zones >= 20_000
                        && geo.index.updates_per_s >= 1e6
                        && geo.ratio.is_some_and(|r| r >= 50.0),
                ),
            });
        }
        if let Some(gql) = self.latency.get("graphql_query")
            && gql.count > 0
        {
            checks.push(TargetCheck {
                target: "GraphQL metrics query p99 < 2 ms at 1k requests/s while ingesting".into(),
                measured: format!(
                    "p99 {:.2} ms at {:.0} requests/s, {:.0} events/s ingested",
                    gql.p99_ms,
                    self.graphql_per_s,
                    self.events.processed_per_s.unwrap_or(0.0)
                ),
                met: Some(gql.p99_ms < 2.0 && self.graphql_per_s >= 950.0),
            });
        }
        self.targets = checks;
    }

    /// The table printed at the end of a run.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\n== load-tests {} — {:.1} s (load average {} → {}) ==",
            self.scenario,
            self.seconds,
            self.loadavg[0].as_deref().unwrap_or("?"),
            self.loadavg[1].as_deref().unwrap_or("?"),
        );
        let e = &self.events;
        if e.offered > 0 {
            let _ = writeln!(
                out,
                "events   offered {} ({:.0}/s)   achieved {} ({:.0}/s)   processed by the server {}",
                e.offered,
                e.offered_per_s,
                e.achieved,
                e.achieved_per_s,
                e.processed_per_s
                    .map_or("n/a".into(), |p| format!("{p:.0}/s steady")),
            );
        }
        let _ = writeln!(
            out,
            "{:<24} {:>8} {:>9} {:>9} {:>9} {:>9}",
            "latency (ms)", "count", "p50", "p90", "p99", "max"
        );
        for (name, s) in &self.latency {
            if s.count == 0 {
                continue;
            }
            let _ = writeln!(
                out,
                "{name:<24} {:>8} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
                s.count, s.p50_ms, s.p90_ms, s.p99_ms, s.max_ms
            );
        }
        let w = &self.websocket;
        if w.trackers > 0 {
            let _ = writeln!(
                out,
                "websocket  trackers {}  held {}  peak {}  messages {}  server RSS {} → {} KiB ({} KiB/connection; harness {} KiB/connection)",
                w.trackers,
                w.held_connections,
                w.peak_connections,
                w.messages,
                w.server_rss_before_kib
                    .map_or("?".into(), |v| v.to_string()),
                w.server_rss_held_kib.map_or("?".into(), |v| v.to_string()),
                w.kib_per_connection
                    .map_or("?".into(), |v| format!("{v:.1}")),
                w.harness_kib_per_connection
                    .map_or("?".into(), |v| format!("{v:.1}")),
            );
            let l = &self.loss;
            let _ = writeln!(
                out,
                "fixes seen by trackers  received {}  gaps {}  duplicates {}  unseen at end {}  unmatched {}  resyncs {}",
                l.received, l.gaps, l.duplicates, l.unseen_at_end, l.unmatched, l.resyncs
            );
        }
        if !self.cpu_cores.is_empty() {
            let parts: Vec<String> = self
                .cpu_cores
                .iter()
                .map(|(k, v)| format!("{k} {v:.2}"))
                .collect();
            let _ = writeln!(
                out,
                "cpu      cores used while sending (of {}): {}",
                self.cores,
                parts.join(", ")
            );
        }
        if let Some(server) = &self.server
            && server.epochs > 0.0
        {
            let sinks: Vec<String> = server
                .sink_commit_mean_ms
                .iter()
                .map(|(k, v)| format!("{k} {v:.1}"))
                .collect();
            let _ = writeln!(
                out,
                "server   {:.0} epochs of {:.0} events; epoch commit {:.1} ms, epoch latency {:.1} ms (means); sink commits (ms): {}",
                server.epochs,
                server.events_per_epoch.unwrap_or(0.0),
                server.epoch_commit_mean_ms.unwrap_or(0.0),
                server.epoch_latency_mean_ms.unwrap_or(0.0),
                sinks.join(", ")
            );
            if !server.stage_mean_ms.is_empty() {
                let stages: Vec<String> = server
                    .stage_mean_ms
                    .iter()
                    .map(|(k, v)| format!("{k} {v:.1}"))
                    .collect();
                let _ = writeln!(out, "stages   per epoch (ms, means): {}", stages.join(", "));
            }
        }
        if self.graphql_per_s > 0.0 {
            let _ = writeln!(out, "graphql  {:.0} requests/s", self.graphql_per_s);
        }
        if self.errors.is_empty() {
            let _ = writeln!(out, "errors   none");
        } else {
            let list: Vec<String> = self
                .errors
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect();
            let _ = writeln!(out, "errors   {}", list.join(", "));
        }
        let b = &self.baselines;
        if let Some(broker) = &b.broker {
            let _ = writeln!(
                out,
                "baseline broker ceiling ({} events/message): published {:.0}/s, consumed+acked {:.0}/s",
                broker.batch, broker.published_per_s, broker.consumed_per_s
            );
        }
        if let Some(geo) = &b.geofence {
            let _ = writeln!(
                out,
                "baseline geofence ({} zones, {} points): index {:.0} updates/s ({:.0} lookups/s), PostGIS {} points/s, ratio {}; pairs {} vs {}",
                geo.zones,
                geo.points,
                geo.index.updates_per_s,
                geo.index.lookups_per_s,
                geo.postgis_points_per_s
                    .map_or("n/a".into(), |p| format!("{p:.0}")),
                geo.ratio.map_or("n/a".into(), |r| format!("{r:.1}×")),
                geo.index.pairs,
                geo.postgis_pairs.map_or("n/a".into(), |p| p.to_string()),
            );
        }
        if let Some(a) = &b.analytics {
            let _ = writeln!(
                out,
                "baseline analytics ({} requests each): GraphQL p50 {:.2} / p99 {:.2} ms ({} rows), SQL GROUP BY p50 {:.2} / p99 {:.2} ms ({} rows over {} events)",
                a.requests,
                a.graphql.p50_ms,
                a.graphql.p99_ms,
                a.graphql_rows,
                a.sql.p50_ms,
                a.sql.p99_ms,
                a.sql_rows,
                a.logged_events
            );
        }
        for (name, why) in &b.errors {
            let _ = writeln!(out, "baseline {name}: not measured: {why}");
        }
        for check in &self.targets {
            let verdict = match check.met {
                Some(true) => "met",
                Some(false) => "NOT met",
                None => "n/a",
            };
            let _ = writeln!(
                out,
                "target   {:<8} {} — {}",
                verdict, check.target, check.measured
            );
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn targets_follow_the_figures_and_the_table_names_them() {
        let mut report = Report {
            scenario: "mixed".into(),
            ..Report::default()
        };
        report.latency.insert(
            "publish_to_websocket".into(),
            LatencySummary {
                count: 10,
                p99_ms: 40.0,
                ..LatencySummary::default()
            },
        );
        report.baselines.broker = Some(BrokerCeiling {
            consumed_per_s: 10_000.0,
            ..BrokerCeiling::default()
        });
        report.events.processed_per_s = Some(7_000.0);
        report.config = serde_json::json!({"unpaced": true});
        report.check_targets();
        assert_eq!(report.targets.len(), 2);
        assert_eq!(report.targets[0].met, Some(false));
        // Unpaced, the latency is the backlog's: not judged.
        assert_eq!(report.targets[1].met, None);
        report.config = serde_json::json!({"unpaced": false});
        report.check_targets();
        assert_eq!(
            report.targets.len(),
            1,
            "a paced run does not judge the ceiling"
        );
        assert_eq!(report.targets[0].met, Some(true));
        report.config = serde_json::json!({"unpaced": true});
        report.check_targets();
        let table = report.table();
        assert!(
            table.contains("NOT met") && table.contains("publish_to_websocket"),
            "{table}"
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["events"]["processed_per_s"], 7_000.0);
    }
}
