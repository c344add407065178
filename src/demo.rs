//! `delivertrack demo`: the whole pipeline in one process, with no external service.
//!
//! The fleet simulator feeds the in-process source; the [driver](crate::driver) runs the
//! dataflow and commits every epoch to the read model; the API serves the read model, the
//! live WebSocket stream and the operations map. The API's write routes send their events
//! into the same in-process channel as the simulator ([`InProcessCommands`]); tokens are
//! signed with a random secret of this process, and the banner prints an admin token.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use delivertrack_api::{AuthConfig, Readiness, Role};
use delivertrack_ingest::{
    FleetSimulator, IngestMetrics, SimulatorConfig, in_process, run_simulator,
};
use prometheus::Registry;
use tokio::net::TcpListener;

use crate::commands::InProcessCommands;
use crate::driver::DriveReport;
use crate::metrics::DriverMetrics;
use crate::service::{Companion, PipelineConfig, Service};

/// How long the banner's admin token is valid: the demo's secret dies with its process
/// anyway.
const DEMO_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// How long a command may wait for room in the full in-process channel.
const COMMAND_SEND_BOUND: Duration = Duration::from_secs(2);

/// Everything `delivertrack demo` can be told.
#[derive(Clone, Debug)]
pub struct DemoConfig {
    /// The settings shared with `run`: listen address, workers, epoch bounds, API.
    pub pipeline: PipelineConfig,
    /// Simulated couriers.
    pub couriers: usize,
    /// Simulated zones.
    pub zones: usize,
    /// Centre of the simulated city, latitude.
    pub center_lat: f64,
    /// Centre of the simulated city, longitude.
    pub center_lon: f64,
    /// Radius of the simulated city, metres.
    pub radius_m: f64,
    /// New deliveries per simulated minute.
    pub deliveries_per_minute: f64,
    /// Simulated time per wall-clock time (2.0: twice as fast as real time).
    pub speed: f64,
    /// How often the simulator advances.
    pub tick: Duration,
    /// Seed of the simulation: the same seed gives the same city and fleet.
    pub seed: u64,
    /// Events buffered between the simulator and the dataflow.
    pub channel_capacity: usize,
    /// The secret tokens are signed and verified with; `None`: a random one of this process.
    pub auth: Option<AuthConfig>,
}

impl Default for DemoConfig {
    fn default() -> Self {
        Self {
            pipeline: PipelineConfig::default(),
            couriers: 100,
            zones: 6,
            center_lat: 52.52,
            center_lon: 13.405,
            radius_m: 6_000.0,
            deliveries_per_minute: 10.0,
            speed: 5.0,
            tick: Duration::from_millis(100),
            seed: 0,
            channel_capacity: 10_000,
            auth: None,
        }
    }
}

/// What to open, for a person starting the demo, with an admin token to try the API with.
/// The map's link carries the token in its fragment (`#access_token=`), which the browser
/// never sends to the server: the page signs in with it.
pub fn banner(addr: SocketAddr, metrics_addr: Option<SocketAddr>, admin_token: &str) -> String {
    let metrics = metrics_addr.unwrap_or(addr);
    format!(
        "DeliverTrack demo is running.\n  \
         operations map:  http://{addr}/#access_token={admin_token}\n  \
         snapshot (JSON): http://{addr}/api/snapshot (with the admin token)\n  \
         live changes:    ws://{addr}/ws/changes (with the admin token)\n  \
         health:          http://{addr}/healthz\n  \
         metrics:         http://{metrics}/metrics\n  \
         admin token:     {admin_token}\n  \
         (send it as `Authorization: Bearer <token>`, or `?access_token=` on a WebSocket, to the\n   \
         read model, the write routes and GraphQL; it is signed with a random 64-hex-digit\n   \
         secret of this process, not JWT_SECRET)\n\
         Press Ctrl-C to stop."
    )
}

/// Binds `config.listen`, prints where to look on stdout, and runs the demo until
/// `shutdown` resolves (see [`run_demo_on`]).
///
/// # Errors
/// The address cannot be bound, or the pipeline failed (see [`run_demo_on`]).
pub async fn run_demo(
    mut config: DemoConfig,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let listener = config.pipeline.bind().await?;
    let addr = listener
        .local_addr()
        .context("the listener has no local address")?;
    let metrics_listener = config.pipeline.bind_metrics().await?;
    let metrics_addr = PipelineConfig::metrics_addr(metrics_listener.as_ref())?;
    let auth = config
        .auth
        .get_or_insert_with(|| crate::auth::random_secret(DEMO_TOKEN_LIFETIME))
        .clone();
    let admin_token = crate::auth::issue_token(&auth, true, Role::Admin, uuid::Uuid::new_v4())?;
    println!("{}", banner(addr, metrics_addr, &admin_token));
    run_demo_on_with(listener, metrics_listener, config, shutdown)
        .await
        .map(|_| ())
}

/// Runs the demo on an already bound listener (`config.listen` is ignored), so that a
/// caller binding `127.0.0.1:0` knows the port. When `shutdown` resolves: the simulator
/// and the reading stop, every epoch in flight is committed, then the API stops (live
/// clients get a close frame). Returns what the driver did.
///
/// # Errors
/// The dataflow did not start or failed, a sink failed, or the API server failed.
pub async fn run_demo_on(
    listener: TcpListener,
    config: DemoConfig,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<DriveReport> {
    let metrics_listener = config.pipeline.bind_metrics().await?;
    run_demo_on_with(listener, metrics_listener, config, shutdown).await
}

/// [`run_demo_on`] with the metrics' own listener already bound (`--metrics-listen`).
async fn run_demo_on_with(
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    config: DemoConfig,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<DriveReport> {
    let addr = listener
        .local_addr()
        .context("the listener has no local address")?;
    let (sender, source) = in_process(config.channel_capacity);
    let registry = Registry::new();
    // The counters of `run`'s source: what was handed to the dataflow, and what the
    // dataflow refused (an illegal transition sent through the API, a stale fix).
    let ingest =
        IngestMetrics::register(&registry).context("the ingest metrics could not be registered")?;
    let source = source.counted_in(ingest);
    let metrics = DriverMetrics::register(&registry)
        .context("the driver's metrics could not be registered")?;
    let mut service = Service::assemble(
        source,
        &config.pipeline,
        Vec::new(),
        Readiness::always_connected(),
        registry,
        metrics,
    )?;
    // The write routes feed the pipeline beside the simulator.
    service.state = service
        .state
        .clone()
        .with_commands(Arc::new(InProcessCommands::new(
            sender.clone(),
            COMMAND_SEND_BOUND,
        )));
    if let Some(auth) = &config.auth {
        service.state = service
            .state
            .clone()
            .with_auth(crate::auth::authenticator(auth, true)?);
    }
    service.metrics_listener = metrics_listener;
    let simulator = FleetSimulator::new(simulator_config(&config), now_ms());
    let stopped = service.stop.clone().cancelled_owned();
    let (tick, speed) = (config.tick, config.speed);
    service.companions.push(Companion {
        name: "the simulator",
        task: tokio::spawn(async move {
            run_simulator(simulator, sender, tick, speed, stopped)
                .await
                .map_err(anyhow::Error::new)
        }),
    });
    tracing::info!(%addr, couriers = config.couriers, zones = config.zones, workers = config.pipeline.workers, "The demo is running.");
    service.run(listener, shutdown).await
}

fn simulator_config(config: &DemoConfig) -> SimulatorConfig {
    SimulatorConfig {
        couriers: config.couriers,
        center_lat: config.center_lat,
        center_lon: config.center_lon,
        radius_m: config.radius_m,
        zones: config.zones,
        deliveries_per_minute: config.deliveries_per_minute,
        seed: config.seed,
        ..SimulatorConfig::default()
    }
}

/// Wall-clock time, Unix milliseconds: where simulated time starts.
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}
