//! One run: the scenario's parts started in order, measured, reported.
//!
//! Every scenario is the same machinery with different defaults ([`Scenario::defaults`]):
//! a fleet ([`crate::driver`]), trackers ([`crate::tracker`]) and analysts
//! ([`crate::analysts`]), each of which may be zero, plus the baselines asked for.
//!
//! The order: check every address is loopback and the target answers; the baselines that
//! compete for the CPU (broker ceiling, geofence) first, alone; then the trackers connect
//! (and the server's memory is read with all of them held, before any traffic); then the
//! fleet and the analysts start, a sampler reads the counters and the server's `/metrics`
//! and memory once a second (the progress bar and the chart's timeline), the analytics
//! baseline runs halfway through while the fleet ingests; when the fleet has sent
//! everything (bounded by `--duration` and `--max-events`), the trackers get `--drain`
//! seconds to receive the rest, and everything stops. A hard deadline of duration + drain
//! + 60 s stops whatever still runs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::analysts::{AnalystConfig, AnalystContext, MetricsScope, run_analysts};
use crate::auth::Tokens;
use crate::baseline::{
    self, AnalyticsBaseline, GeofenceBaseline, analytics_read_path, broker_ceiling,
};
use crate::driver::{DriverConfig, DriverContext, Via, drive};
use crate::record::{Recorder, Sample, Series};
use crate::report::{ChartInfo, EventFigures, Report, WebSocketFigures};
use crate::sent::SentLog;
use crate::server_metrics::{Reading, ServerFigures};
use crate::stream::{FleetConfig, FleetStream};
use crate::target::{Target, cpu_by_component, loopback_url, pid_listening_on, rss_kib};
use crate::tracker::{LiveDeliveries, TrackerConfig, TrackerContext, WsMode, run_trackers};
use crate::world::{BENCH_SEED, SpatialWorld};

/// The scenarios.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scenario {
    /// Couriers publishing positions (one tracker observes, for latency and loss).
    Fleet,
    /// Many WebSocket trackers following a small fleet.
    Trackers,
    /// GraphQL analysts polling while a small fleet ingests.
    Analysts,
    /// All three at once.
    Mixed,
    /// The baselines alone.
    Baselines,
}

/// What a scenario runs unless told otherwise: `(couriers, trackers, analysts)`.
impl Scenario {
    /// The default sizes.
    pub fn defaults(self) -> (usize, usize, usize) {
        match self {
            Scenario::Fleet => (1_000, 1, 0),
            Scenario::Trackers => (200, 1_000, 0),
            Scenario::Analysts => (200, 0, 10),
            Scenario::Mixed => (1_000, 100, 10),
            Scenario::Baselines => (0, 0, 0),
        }
    }

    /// The name.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Fleet => "fleet",
            Scenario::Trackers => "trackers",
            Scenario::Analysts => "analysts",
            Scenario::Mixed => "mixed",
            Scenario::Baselines => "baselines",
        }
    }
}

/// Which baselines to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BaselineKind {
    /// Publish + consume + ack with no pipeline.
    Broker,
    /// The zone index against PostGIS.
    Geofence,
    /// GraphQL against SQL `GROUP BY`.
    Analytics,
}

/// Which WebSocket route trackers use: as given, or `track` when the target has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WsChoice {
    /// `/ws/track/{id}` if the target serves it (and a JWT secret is given), else
    /// `/ws/changes`; always `/ws/changes` for `fleet`, whose one tracker observes every
    /// courier.
    Auto,
    /// `/ws/track/{id}`.
    Track,
    /// `/ws/changes`.
    Changes,
}

/// Every setting of a run; each flag also an environment variable.
#[derive(Clone, Debug, clap::Args, Serialize)]
pub struct RunArgs {
    /// The API under test (loopback only).
    #[arg(long, env = "LOAD_TARGET", default_value = "http://127.0.0.1:8080")]
    pub target: String,
    /// RabbitMQ (loopback only).
    #[arg(
        long,
        env = "RABBITMQ_URL",
        hide_env_values = true,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    #[serde(skip)]
    pub rabbitmq_url: String,
    /// The event exchange the service consumes from.
    #[arg(
        long,
        env = "DELIVERTRACK_EXCHANGE",
        default_value = "delivertrack.events"
    )]
    pub exchange: String,
    /// The service's JWT secret, to sign couriers', customers' and admins' tokens.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    #[serde(skip)]
    pub jwt_secret: Option<String>,
    /// The service's PostgreSQL database (the analytics baseline reads the event log).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    #[serde(skip)]
    pub database_url: Option<String>,
    /// A PostgreSQL database in which the geofence baseline may create its own.
    #[arg(
        long,
        env = "LOAD_POSTGRES_ADMIN_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    #[serde(skip)]
    pub postgres_admin_url: String,
    /// The server's pid, for its memory (default: the process listening on the target's
    /// port).
    #[arg(long, env = "LOAD_SERVER_PID")]
    pub server_pid: Option<u32>,

    /// Couriers (default: the scenario's).
    #[arg(long, env = "LOAD_COURIERS")]
    pub couriers: Option<usize>,
    /// Fixes per second per courier.
    #[arg(long, env = "LOAD_RATE", default_value_t = 1.0)]
    pub rate: f64,
    /// Ignore the schedule: send as fast as the senders take events (measures the
    /// maximum; the offered rate is then what the harness could push).
    #[arg(long, env = "LOAD_UNPACED")]
    pub unpaced: bool,
    /// Zones published before the fleet starts.
    #[arg(long, env = "LOAD_ZONES", default_value_t = 200)]
    pub zones: usize,
    /// Courier speed on a delivery, m/s.
    #[arg(long, env = "LOAD_SPEED_MPS", default_value_t = 12.0)]
    pub speed_mps: f64,
    /// The seed: the same seed gives the same event stream.
    #[arg(long, env = "LOAD_SEED", default_value_t = 1)]
    pub seed: u64,
    /// Couriers join over this many seconds.
    #[arg(long, env = "LOAD_RAMP_UP", default_value_t = 5.0)]
    pub ramp_up: f64,
    /// Seconds of sending.
    #[arg(long, env = "LOAD_DURATION", default_value_t = 30.0)]
    pub duration: f64,
    /// Seconds trackers keep receiving after the last event was sent.
    #[arg(long, env = "LOAD_DRAIN", default_value_t = 3.0)]
    pub drain: f64,
    /// Stop after this many events.
    #[arg(long, env = "LOAD_MAX_EVENTS", default_value_t = u64::MAX)]
    pub max_events: u64,
    /// How fixes reach the service.
    #[arg(long, env = "LOAD_VIA", value_enum, default_value_t = Via::Amqp)]
    pub via: Via,
    /// Location events per AMQP message.
    #[arg(long, env = "LOAD_BATCH", default_value_t = 1)]
    pub batch: usize,
    /// AMQP publishing connections.
    #[arg(long, env = "LOAD_PUBLISHERS", default_value_t = 2)]
    pub publishers: usize,
    /// Unconfirmed messages per publisher at most.
    #[arg(long, env = "LOAD_WINDOW", default_value_t = 2_000)]
    pub window: usize,
    /// `POST /locations` in flight at most.
    #[arg(long, env = "LOAD_HTTP_CONCURRENCY", default_value_t = 256)]
    pub http_concurrency: usize,

    /// WebSocket trackers (default: the scenario's).
    #[arg(long, env = "LOAD_TRACKERS")]
    pub trackers: Option<usize>,
    /// The trackers' route.
    #[arg(long, env = "LOAD_WS", value_enum, default_value_t = WsChoice::Auto)]
    pub ws: WsChoice,
    /// New WebSocket connections per second at most.
    #[arg(long, env = "LOAD_CONNECT_RATE", default_value_t = 2_000.0)]
    pub connect_rate: f64,
    /// Each tracker's WebSocket read buffer, bytes (the harness's own memory).
    #[arg(long, env = "LOAD_WS_READ_BUFFER", default_value_t = 8_192)]
    pub ws_read_buffer: usize,

    /// GraphQL analysts (default: the scenario's).
    #[arg(long, env = "LOAD_ANALYSTS")]
    pub analysts: Option<usize>,
    /// GraphQL requests per second, all analysts together.
    #[arg(long, env = "LOAD_ANALYST_RATE", default_value_t = 100.0)]
    pub analyst_rate: f64,
    /// The metrics the analysts poll and the analytics baseline computes in SQL.
    #[arg(long, env = "LOAD_METRICS", value_enum, default_value_t = MetricsScope::Overall)]
    pub metrics: MetricsScope,
    /// Another GraphQL query for the analysts (default: the one of `--metrics`).
    #[arg(long, env = "LOAD_QUERY")]
    pub query: Option<String>,

    /// Baselines to measure in this run (default: all for `baselines`, none otherwise).
    #[arg(long, env = "LOAD_BASELINES", value_enum, value_delimiter = ',')]
    pub baselines: Vec<BaselineKind>,
    /// Seconds of the broker ceiling.
    #[arg(long, env = "LOAD_BROKER_SECONDS", default_value_t = 10.0)]
    pub broker_seconds: f64,
    /// Zones of the geofence baseline.
    #[arg(long, env = "LOAD_GEOFENCE_ZONES", default_value_t = 20_000)]
    pub geofence_zones: usize,
    /// Points (one move each) of the geofence baseline.
    #[arg(long, env = "LOAD_GEOFENCE_POINTS", default_value_t = 100_000)]
    pub geofence_points: usize,
    /// Passes over the points of the in-process side.
    #[arg(long, env = "LOAD_GEOFENCE_ROUNDS", default_value_t = 5)]
    pub geofence_rounds: usize,
    /// Requests of each side of the analytics baseline.
    #[arg(long, env = "LOAD_ANALYTICS_REQUESTS", default_value_t = 200)]
    pub analytics_requests: usize,

    /// Where the JSON report and the PNG go (default: target/load-tests).
    #[arg(long, env = "LOAD_OUT")]
    pub out: Option<PathBuf>,
    /// The report's file name stem (default: scenario and start time).
    #[arg(long, env = "LOAD_NAME")]
    pub name: Option<String>,
    /// A TrueType font for the chart's text.
    #[arg(long, env = "LOAD_FONT", default_value = crate::plot::DEFAULT_FONT)]
    pub font: PathBuf,
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// An address is not loopback, or the target is not up.
    #[error(transparent)]
    Target(#[from] crate::target::TargetError),
    /// The target lacks a route the run needs.
    #[error("{0}")]
    Missing(String),
    /// The fleet could not be sent.
    #[error(transparent)]
    Driver(#[from] crate::driver::DriverError),
    /// A token could not be signed.
    #[error(transparent)]
    Token(#[from] crate::auth::TokenError),
    /// The report could not be written.
    #[error("the report could not be written to {path}: {reason}")]
    Write {
        /// Where.
        path: String,
        /// Why.
        reason: String,
    },
}

/// Where the report and chart of a run went.
#[derive(Debug, Clone)]
pub struct Written {
    /// The JSON report.
    pub report: PathBuf,
    /// The PNG.
    pub chart: Option<PathBuf>,
}

/// Runs `scenario` with `args`; returns the report and where it was written.
///
/// # Errors
/// [`RunError`] when the run cannot start (bad address, target down, a missing route) or
/// its report cannot be written. Failures during the run are counted, not fatal.
pub async fn run(scenario: Scenario, args: RunArgs) -> Result<(Report, Written), RunError> {
    let started_at_ms = now_ms();
    let wall = Instant::now();
    let (default_couriers, default_trackers, default_analysts) = scenario.defaults();
    let couriers = args.couriers.unwrap_or(default_couriers);
    let trackers = args.trackers.unwrap_or(default_trackers);
    let analysts = args.analysts.unwrap_or(default_analysts);
    let baselines: Vec<BaselineKind> =
        if args.baselines.is_empty() && scenario == Scenario::Baselines {
            vec![
                BaselineKind::Broker,
                BaselineKind::Geofence,
                BaselineKind::Analytics,
            ]
        } else {
            args.baselines.clone()
        };
    let wants = |kind: BaselineKind| baselines.contains(&kind);

    // Loopback only, every address, before anything is sent.
    let target = Target::new(&args.target)?;
    loopback_url("RabbitMQ", &args.rabbitmq_url)?;
    loopback_url("the PostgreSQL admin database", &args.postgres_admin_url)?;
    if let Some(url) = &args.database_url {
        loopback_url("the service's database", url)?;
    }
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.http_concurrency.max(analysts).max(16))
        .build()
        .map_err(|e| RunError::Missing(format!("an HTTP client could not be built: {e}")))?;
    let needs_target =
        couriers > 0 || trackers > 0 || analysts > 0 || wants(BaselineKind::Analytics);
    if needs_target {
        target.check_up(&http).await?;
    }
    let tokens = args
        .jwt_secret
        .as_deref()
        .map(|secret| Tokens::new(secret, Duration::from_secs(24 * 3_600)))
        .transpose()?;
    if args.via == Via::Http && couriers > 0 {
        if tokens.is_none() {
            return Err(RunError::Missing(
                "--via http sends real courier tokens: give the service's secret with --jwt-secret (JWT_SECRET)".into(),
            ));
        }
        if !target.has_route(&http, "POST", "/locations").await {
            return Err(RunError::Missing(format!(
                "the target {} has no POST /locations route; use --via amqp",
                target.http("")
            )));
        }
    }
    let needs_graphql = analysts > 0 || wants(BaselineKind::Analytics);
    if needs_graphql {
        if tokens.is_none() {
            return Err(RunError::Missing(
                "GraphQL needs an admin token: give the service's secret with --jwt-secret (JWT_SECRET)".into(),
            ));
        }
        if !target.has_route(&http, "POST", "/graphql").await {
            return Err(RunError::Missing(format!(
                "the target {} has no POST /graphql route yet",
                target.http("")
            )));
        }
    }
    let ws_mode = match args.ws {
        WsChoice::Changes => WsMode::Changes,
        WsChoice::Track => WsMode::Track,
        WsChoice::Auto => {
            let has_track = trackers > 0
                && target
                    .has_route(&http, "GET", &format!("/ws/track/{}", uuid::Uuid::nil()))
                    .await;
            // The fleet scenario's observer follows every courier: `/ws/changes`.
            if has_track && tokens.is_some() && couriers > 0 && scenario != Scenario::Fleet {
                WsMode::Track
            } else {
                WsMode::Changes
            }
        }
    };
    if ws_mode == WsMode::Changes && tokens.is_none() && trackers > 0 {
        return Err(RunError::Missing(
            "/ws/changes is for admins: give the service's secret with --jwt-secret (JWT_SECRET)"
                .into(),
        ));
    }
    if ws_mode == WsMode::Track && tokens.is_none() && trackers > 0 {
        return Err(RunError::Missing(
            "--ws track connects with customers' tokens: give --jwt-secret (JWT_SECRET)".into(),
        ));
    }
    let server_pid = args.server_pid.or_else(|| {
        needs_target
            .then(|| pid_listening_on(target.port()))
            .flatten()
    });

    let mut report = Report {
        scenario: scenario.name().into(),
        started_at_ms,
        loadavg: [crate::report::loadavg(), None],
        config: serde_json::to_value(&args).unwrap_or_default(),
        ..Report::default()
    };
    report.config["couriers"] = couriers.into();
    report.config["trackers"] = trackers.into();
    report.config["analysts"] = analysts.into();

    // The baselines that need the CPU to themselves.
    if wants(BaselineKind::Broker) {
        eprintln!("baseline: the broker ceiling ({} s)…", args.broker_seconds);
        let sample = sample_events(args.seed, 10_000);
        match broker_ceiling(
            &args.rabbitmq_url,
            &sample,
            args.batch,
            args.publishers,
            2_000,
            Duration::from_secs_f64(args.broker_seconds.max(2.0)),
        )
        .await
        {
            Ok(ceiling) => report.baselines.broker = Some(ceiling),
            Err(error) => {
                report
                    .baselines
                    .errors
                    .insert("broker".into(), error.to_string());
            }
        }
    }
    if wants(BaselineKind::Geofence) {
        eprintln!(
            "baseline: geofence, {} zones × {} points, index then PostGIS…",
            args.geofence_zones, args.geofence_points
        );
        report.baselines.geofence = Some(
            geofence(
                &args.postgres_admin_url,
                args.geofence_zones,
                args.geofence_points,
                args.geofence_rounds,
            )
            .await,
        );
    }

    if couriers > 0 || trackers > 0 || analysts > 0 {
        run_traffic(
            &args,
            &mut report,
            TrafficPlan {
                couriers,
                trackers,
                analysts,
                ws_mode,
                server_pid,
                analytics: wants(BaselineKind::Analytics),
            },
            &target,
            &http,
            tokens.as_ref(),
        )
        .await?;
    } else if wants(BaselineKind::Analytics)
        && let Some(tokens) = &tokens
    {
        run_analytics(&args, &mut report, &target, &http, tokens).await;
    }

    report.seconds = wall.elapsed().as_secs_f64();
    report.loadavg[1] = crate::report::loadavg();
    report.check_targets();
    let written = write(&args, scenario, &mut report)?;
    Ok((report, written))
}

struct TrafficPlan {
    couriers: usize,
    trackers: usize,
    analysts: usize,
    ws_mode: WsMode,
    server_pid: Option<u32>,
    analytics: bool,
}

async fn run_traffic(
    args: &RunArgs,
    report: &mut Report,
    plan: TrafficPlan,
    target: &Target,
    http: &reqwest::Client,
    tokens: Option<&Tokens>,
) -> Result<(), RunError> {
    let recorder = Arc::new(Recorder::new());
    let stop = CancellationToken::new();
    let duration = Duration::from_secs_f64(args.duration.max(0.1));
    let drain = Duration::from_secs_f64(args.drain.max(0.0));
    let deadline = duration + drain + Duration::from_secs(60);
    let fleet = FleetConfig {
        couriers: plan.couriers,
        fixes_per_second: args.rate,
        zones: if plan.couriers > 0 { args.zones } else { 0 },
        speed_mps: args.speed_mps,
        seed: args.seed,
        ramp_up: Duration::from_secs_f64(args.ramp_up.max(0.0)),
        duration: if args.unpaced {
            Duration::from_secs(86_400)
        } else {
            duration
        },
        max_events: args.max_events,
        ..FleetConfig::default()
    };
    let stream = FleetStream::new(fleet, now_ms());
    let sent = Arc::new(SentLog::new(&stream.courier_ids()));
    let live = Arc::new(LiveDeliveries::default());

    // Trackers first: connections held, memory read, before any traffic.
    let rss_before = plan.server_pid.and_then(rss_kib);
    let own_rss_before = rss_kib(std::process::id());
    let mut own_rss_held = None;
    let tracker_task = (plan.trackers > 0).then(|| {
        let ctx = Arc::new(TrackerContext {
            target: target.clone(),
            sent: Arc::clone(&sent),
            live: Arc::clone(&live),
            tokens: tokens.cloned(),
            recorder: Arc::clone(&recorder),
            stop: stop.clone(),
        });
        tokio::spawn(run_trackers(
            TrackerConfig {
                count: plan.trackers,
                mode: plan.ws_mode,
                connect_rate: args.connect_rate,
                connect_concurrency: 256,
                read_buffer: args.ws_read_buffer,
            },
            ctx,
        ))
    });
    let mut held = 0;
    let mut rss_held = None;
    if plan.trackers > 0 && plan.ws_mode == WsMode::Changes {
        let wait_until = Instant::now()
            + Duration::from_secs_f64(plan.trackers as f64 / args.connect_rate.max(1.0))
            + Duration::from_secs(30);
        let bar = ProgressBar::new(plan.trackers as u64).with_style(style("connecting"));
        loop {
            let open = recorder.ws_open.load(Ordering::Relaxed);
            let failed: u64 = recorder
                .errors()
                .iter()
                .filter(|(k, _)| k.starts_with("ws_connect"))
                .map(|(_, v)| *v)
                .sum();
            bar.set_position(u64::try_from(open).unwrap_or(0));
            if open as u64 + failed >= plan.trackers as u64 || Instant::now() > wait_until {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bar.finish_and_clear();
        // Let the server settle its buffers before reading its memory.
        tokio::time::sleep(Duration::from_secs(2)).await;
        held = recorder.ws_open.load(Ordering::Relaxed);
        rss_held = plan.server_pid.and_then(rss_kib);
        own_rss_held = rss_kib(std::process::id());
    }

    // The fleet and the analysts.
    let driver_task = (plan.couriers > 0).then(|| {
        let ctx = DriverContext {
            recorder: Arc::clone(&recorder),
            sent: Arc::clone(&sent),
            live: Arc::clone(&live),
            target: target.clone(),
            tokens: tokens.cloned(),
            http: http.clone(),
            stop: stop.clone(),
        };
        let config = DriverConfig {
            via: args.via,
            batch: args.batch,
            publishers: args.publishers,
            window: args.window,
            http_concurrency: args.http_concurrency,
            paced: !args.unpaced,
            duration,
            amqp_url: args.rabbitmq_url.clone(),
            exchange: args.exchange.clone(),
        };
        tokio::spawn(drive(stream, config, ctx))
    });
    let analyst_stop = stop.child_token();
    let analyst_task = match (plan.analysts > 0, tokens) {
        (true, Some(tokens)) => {
            let ctx = AnalystContext {
                target: target.clone(),
                token: tokens.admin()?,
                http: http.clone(),
                recorder: Arc::clone(&recorder),
                sent: Arc::clone(&sent),
                stop: analyst_stop.clone(),
            };
            let config = AnalystConfig {
                count: plan.analysts,
                rate: args.analyst_rate,
                query: query_of(args),
                probe: plan.couriers > 0,
            };
            Some(tokio::spawn(run_analysts(config, ctx)))
        }
        _ => None,
    };

    // Sample once a second until the fleet is done (or the duration passed), then drain.
    let sending = Instant::now();
    let cpu_start = cpu_by_component(plan.server_pid);
    let mut cpu_end = None;
    let bar = ProgressBar::new(duration.as_secs().max(1)).with_style(style("running"));
    let mut timeline: Vec<Sample> = Vec::new();
    let mut ingested_first: Option<f64> = None;
    let mut ingested_last: Option<(f64, f64)> = None;
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    ticks.tick().await;
    recorder.sample();
    let mut analytics: Option<tokio::task::JoinHandle<Result<AnalyticsBaseline, String>>> = None;
    let mut sending_seconds = None;
    let mut drained_at = None;
    let mut first_reading: Option<Reading> = Reading::read(http, target).await;
    let mut last_sending_reading: Option<Reading> = None;
    loop {
        ticks.tick().await;
        let elapsed = sending.elapsed();
        let mut sample = recorder.sample();
        sample.t_s = elapsed.as_secs_f64();
        let reading = Reading::read(http, target).await;
        if let Some(reading) = &reading {
            first_reading.get_or_insert_with(|| reading.clone());
            if sending_seconds.is_none() {
                last_sending_reading = Some(reading.clone());
            }
        }
        let ingested = reading
            .as_ref()
            .and_then(|r| r.total("delivertrack_events_ingested_total"));
        if let Some(now) = ingested {
            ingested_first.get_or_insert(now);
            if let Some((before, at)) = ingested_last {
                sample.processed_per_s =
                    Some((now - before).max(0.0) / (sample.t_s - at).max(1e-3));
            }
            ingested_last = Some((now, sample.t_s));
        }
        sample.server_rss_mib = plan.server_pid.and_then(rss_kib).map(|k| k as f64 / 1024.0);
        bar.set_position(elapsed.as_secs().min(duration.as_secs()));
        bar.set_message(format!(
            "offered {:.0}/s achieved {:.0}/s processed {} ws p99 {} conns {}",
            sample.offered_per_s,
            sample.achieved_per_s,
            sample
                .processed_per_s
                .map_or("?".into(), |p| format!("{p:.0}/s")),
            sample
                .ws_p99_ms
                .map_or("-".into(), |p| format!("{p:.0} ms")),
            sample.ws_connections
        ));
        if plan.ws_mode == WsMode::Track && plan.trackers > 0 && sending_seconds.is_none() {
            // Track sessions open as deliveries go live: held is what is open while the
            // fleet runs (the memory then includes the fleet's own state).
            let open = recorder.ws_open.load(Ordering::Relaxed);
            if open >= held {
                held = open;
                rss_held = plan.server_pid.and_then(rss_kib);
                own_rss_held = rss_kib(std::process::id());
            }
        }
        timeline.push(sample);

        if plan.analytics && analytics.is_none() && elapsed >= duration / 2 {
            analytics = tokens.map(|tokens| {
                let (target, http, tokens) = (target.clone(), http.clone(), tokens.clone());
                let database = args.database_url.clone();
                let query = query_of(args);
                let scope = args.metrics;
                let requests = args.analytics_requests;
                tokio::spawn(async move {
                    let database = database.ok_or_else(|| {
                        "--database-url (DATABASE_URL) is needed: the service's database".to_owned()
                    })?;
                    let token = tokens.admin().map_err(|e| e.to_string())?;
                    analytics_read_path(&target, &http, &token, &database, &query, scope, requests)
                        .await
                        .map_err(|e| e.to_string())
                })
            });
        }
        let fleet_done = driver_task
            .as_ref()
            .is_none_or(tokio::task::JoinHandle::is_finished);
        let time_up = elapsed >= duration;
        if sending_seconds.is_none() && ((plan.couriers > 0 && fleet_done) || time_up) {
            sending_seconds = Some(elapsed.as_secs_f64());
            cpu_end = Some(cpu_by_component(plan.server_pid));
            drained_at = Some(Instant::now() + drain);
            analyst_stop.cancel();
        }
        let analytics_done = analytics
            .as_ref()
            .is_none_or(tokio::task::JoinHandle::is_finished)
            && (!plan.analytics || analytics.is_some() || plan.couriers == 0);
        if drained_at.is_some_and(|at| Instant::now() >= at) && analytics_done {
            break;
        }
        if elapsed >= deadline {
            recorder.error("deadline_reached");
            break;
        }
    }
    bar.finish_and_clear();
    stop.cancel();
    let finish = async {
        if let Some(task) = driver_task {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => return Err(RunError::Driver(error)),
                Err(_) => recorder.error("driver_panicked"),
            }
        }
        if let Some(task) = tracker_task {
            let _ = task.await;
        }
        if let Some(task) = analyst_task {
            let _ = task.await;
        }
        Ok(())
    };
    match tokio::time::timeout(Duration::from_secs(60), finish).await {
        Ok(result) => result?,
        Err(_) => recorder.error("shutdown_timeout"),
    }
    if let Some(task) = analytics {
        match task.await {
            Ok(Ok(baseline)) => report.baselines.analytics = Some(baseline),
            Ok(Err(error)) => {
                report.baselines.errors.insert("analytics".into(), error);
            }
            Err(_) => {
                report
                    .baselines
                    .errors
                    .insert("analytics".into(), "the task failed".into());
            }
        }
    } else if plan.analytics {
        report.baselines.errors.insert(
            "analytics".into(),
            "the run ended before it was halfway".into(),
        );
    }

    let sending_seconds = sending_seconds.unwrap_or(args.duration).max(1e-3);
    let offered = recorder.offered.load(Ordering::Relaxed);
    let achieved = recorder.achieved.load(Ordering::Relaxed);
    // The steady state: after the ramp-up and a second more, while sending.
    let steady: Vec<f64> = timeline
        .iter()
        .filter(|s| s.t_s > args.ramp_up + 1.0 && s.t_s <= sending_seconds)
        .filter_map(|s| s.processed_per_s)
        .collect();
    report.events = EventFigures {
        offered,
        achieved,
        offered_per_s: offered as f64 / sending_seconds,
        achieved_per_s: achieved as f64 / sending_seconds,
        processed_per_s: (!steady.is_empty())
            .then(|| steady.iter().sum::<f64>() / steady.len() as f64),
        processed: match (ingested_first, ingested_last) {
            (Some(first), Some((last, _))) => Some((last - first).max(0.0) as u64),
            _ => None,
        },
        sending_seconds,
    };
    report.graphql_per_s =
        recorder.graphql_requests.load(Ordering::Relaxed) as f64 / sending_seconds;
    report.latency = Series::ALL
        .into_iter()
        .map(|s| (s.name().to_owned(), recorder.summary(s)))
        .collect();
    report.loss = recorder.loss_counts();
    report.errors = recorder.errors();
    report.websocket = WebSocketFigures {
        trackers: plan.trackers,
        mode: (plan.trackers > 0).then(|| {
            match plan.ws_mode {
                WsMode::Track => "track",
                WsMode::Changes => "changes",
            }
            .to_owned()
        }),
        peak_connections: recorder.ws_peak.load(Ordering::Relaxed),
        held_connections: held,
        messages: recorder.ws_messages.load(Ordering::Relaxed),
        server_pid: plan.server_pid,
        server_rss_before_kib: rss_before,
        server_rss_held_kib: rss_held,
        kib_per_connection: match (rss_before, rss_held) {
            (Some(before), Some(after)) if held > 0 => {
                Some(after.saturating_sub(before) as f64 / held as f64)
            }
            _ => None,
        },
        harness_kib_per_connection: match (own_rss_before, own_rss_held) {
            (Some(before), Some(after)) if held > 0 => {
                Some(after.saturating_sub(before) as f64 / held as f64)
            }
            _ => None,
        },
        memory_read: (plan.trackers > 0).then(|| {
            match plan.ws_mode {
                WsMode::Changes => "idle",
                WsMode::Track => "loaded",
            }
            .to_owned()
        }),
    };
    if let Some(end) = cpu_end {
        report.cpu_cores = end
            .iter()
            .zip(&cpu_start)
            .map(|((name, after), (_, before))| {
                (
                    (*name).to_owned(),
                    (after - before).max(0.0) / sending_seconds,
                )
            })
            .collect();
    }
    report.cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    if let (Some(before), Some(after)) = (&first_reading, &last_sending_reading) {
        report.server = Some(ServerFigures::between(before, after));
    }
    report.timeline = timeline;
    Ok(())
}

async fn run_analytics(
    args: &RunArgs,
    report: &mut Report,
    target: &Target,
    http: &reqwest::Client,
    tokens: &Tokens,
) {
    let result = match (&args.database_url, tokens.admin()) {
        (Some(database), Ok(token)) => analytics_read_path(
            target,
            http,
            &token,
            database,
            &query_of(args),
            args.metrics,
            args.analytics_requests,
        )
        .await
        .map_err(|e| e.to_string()),
        (None, _) => Err("--database-url (DATABASE_URL) is needed: the service's database".into()),
        (_, Err(error)) => Err(error.to_string()),
    };
    match result {
        Ok(baseline) => report.baselines.analytics = Some(baseline),
        Err(error) => {
            report.baselines.errors.insert("analytics".into(), error);
        }
    }
}

/// The analysts' query: `--query`, else the one of `--metrics`.
fn query_of(args: &RunArgs) -> String {
    args.query
        .clone()
        .unwrap_or_else(|| args.metrics.query().to_owned())
}

/// The geofence baseline: the index on a blocking thread, then PostGIS.
async fn geofence(admin_url: &str, zones: usize, points: usize, rounds: usize) -> GeofenceBaseline {
    let world = Arc::new(SpatialWorld::bench(BENCH_SEED, points, zones));
    let index = {
        let world = Arc::clone(&world);
        tokio::task::spawn_blocking(move || baseline::index_throughput(&world, rounds))
            .await
            .unwrap_or_default()
    };
    let mut result = GeofenceBaseline {
        zones,
        points,
        index,
        ..GeofenceBaseline::default()
    };
    match baseline::postgis_throughput(admin_url, &world).await {
        Ok((per_s, pairs)) => {
            result.postgis_points_per_s = Some(per_s);
            result.postgis_pairs = Some(pairs);
            result.ratio = Some(result.index.updates_per_s / per_s.max(1e-9));
        }
        Err(error) => result.postgis_error = Some(error.to_string()),
    }
    result
}

/// Location events of the fleet, for the broker ceiling's messages.
fn sample_events(seed: u64, count: usize) -> Vec<delivertrack_dataflow::Event> {
    let mut stream = FleetStream::new(
        FleetConfig {
            couriers: 1_000,
            zones: 0,
            seed,
            ramp_up: Duration::ZERO,
            duration: Duration::from_secs(3_600),
            ..FleetConfig::default()
        },
        now_ms(),
    );
    let mut out = Vec::new();
    while out.len() < count && !stream.is_done() {
        stream.pop_due(Duration::MAX, 1_000, &mut out);
    }
    out.into_iter()
        .filter(|p| p.fix.is_some())
        .take(count)
        .map(|p| p.event)
        .collect()
}

fn style(prefix: &str) -> ProgressStyle {
    ProgressStyle::with_template(&format!(
        "{prefix} {{elapsed_precise}} [{{bar:30}}] {{pos}}/{{len}} {{msg}}"
    ))
    .unwrap_or_else(|_| ProgressStyle::default_bar())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Writes the JSON report and the PNG.
fn write(args: &RunArgs, scenario: Scenario, report: &mut Report) -> Result<Written, RunError> {
    let dir = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("target/load-tests"));
    let failed = |path: &std::path::Path, reason: String| RunError::Write {
        path: path.display().to_string(),
        reason,
    };
    std::fs::create_dir_all(&dir).map_err(|e| failed(&dir, e.to_string()))?;
    let stem = args
        .name
        .clone()
        .unwrap_or_else(|| format!("{}-{}", scenario.name(), report.started_at_ms));
    let chart_path = dir.join(format!("{stem}.png"));
    let chart = if report.timeline.is_empty() {
        None
    } else {
        match crate::plot::draw(&chart_path, scenario.name(), &report.timeline, &args.font) {
            Ok(labelled) => {
                report.chart = Some(ChartInfo {
                    path: chart_path.display().to_string(),
                    labelled,
                    legend: BTreeMap::from([
                        ("offered events/s".into(), "blue (top)".into()),
                        ("achieved events/s".into(), "green (top)".into()),
                        (
                            "processed by the server events/s".into(),
                            "red (top)".into(),
                        ),
                        ("publish → WebSocket p50".into(), "blue (bottom)".into()),
                        ("publish → WebSocket p99".into(), "red (bottom)".into()),
                        ("GraphQL query p99".into(), "magenta (bottom)".into()),
                    ]),
                });
                Some(chart_path)
            }
            Err(error) => {
                report.errors.insert(format!("chart: {error}"), 1);
                None
            }
        }
    };
    let report_path = dir.join(format!("{stem}.json"));
    let json =
        serde_json::to_vec_pretty(&report).map_err(|e| failed(&report_path, e.to_string()))?;
    std::fs::write(&report_path, json).map_err(|e| failed(&report_path, e.to_string()))?;
    Ok(Written {
        report: report_path,
        chart,
    })
}
