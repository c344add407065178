//! `delivertrack demo`: the whole pipeline in one process, with no external service.
//!
//! The fleet simulator feeds the in-process source; the [driver](crate::driver) runs the
//! dataflow and commits every epoch to the read model; the API serves the read model, the
//! live WebSocket stream and the operations map.

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use delivertrack_api::{ApiConfig, AppState};
use delivertrack_dataflow::pipeline::DataflowConfig;
use delivertrack_ingest::{
    EpochPolicy, FleetSimulator, SimulatorConfig, in_process, run_simulator,
};
use delivertrack_sinks::{ReadModel, ReadModelConfig, ReadModelSink, Sink};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::driver::{DriveReport, DriverConfig, drive};

/// Everything `delivertrack demo` can be told.
#[derive(Clone, Debug)]
pub struct DemoConfig {
    /// Where the API listens.
    pub listen: SocketAddr,
    /// Timely worker threads.
    pub workers: usize,
    /// ETA speed for couriers whose own speed is unknown, m/s.
    pub default_speed_mps: f64,
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
    /// An epoch closes at this many events ...
    pub epoch_max_events: usize,
    /// ... or this long after its first event, whichever comes first.
    pub epoch_max_wait: Duration,
    /// Simulated time per wall-clock time (2.0: twice as fast as real time).
    pub speed: f64,
    /// How often the simulator advances.
    pub tick: Duration,
    /// Seed of the simulation: the same seed gives the same city and fleet.
    pub seed: u64,
    /// Events buffered between the simulator and the dataflow.
    pub channel_capacity: usize,
    /// API limits and timings.
    pub api: ApiConfig,
    /// Epoch updates buffered per live WebSocket client before it is resynced.
    pub live_capacity: usize,
}

impl Default for DemoConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            workers: 2,
            default_speed_mps: DataflowConfig::default().default_speed_mps,
            couriers: 100,
            zones: 6,
            center_lat: 52.52,
            center_lon: 13.405,
            radius_m: 6_000.0,
            deliveries_per_minute: 10.0,
            epoch_max_events: 5_000,
            epoch_max_wait: Duration::from_millis(200),
            speed: 5.0,
            tick: Duration::from_millis(100),
            seed: 0,
            channel_capacity: 10_000,
            api: ApiConfig::default(),
            live_capacity: ReadModelConfig::default().live_capacity,
        }
    }
}

/// What to open, for a person starting the demo.
pub fn banner(addr: SocketAddr) -> String {
    format!(
        "DeliverTrack demo is running.\n  \
         operations map:  http://{addr}/\n  \
         snapshot (JSON): http://{addr}/api/snapshot\n  \
         live changes:    ws://{addr}/ws/changes\n  \
         health:          http://{addr}/healthz\n\
         Press Ctrl-C to stop."
    )
}

/// Binds `config.listen`, prints where to look on stdout, and runs the demo until
/// `shutdown` resolves (see [`run_demo_on`]).
///
/// # Errors
/// The address cannot be bound, or the pipeline failed (see [`run_demo_on`]).
pub async fn run_demo(
    config: DemoConfig,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener
        .local_addr()
        .context("the listener has no local address")?;
    println!("{}", banner(addr));
    run_demo_on(listener, config, shutdown).await.map(|_| ())
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
    let addr = listener
        .local_addr()
        .context("the listener has no local address")?;
    let read_model = ReadModel::new(ReadModelConfig {
        live_capacity: config.live_capacity,
    });
    let sinks: Vec<Box<dyn Sink>> = vec![Box::new(ReadModelSink::new(read_model.clone()))];

    // Two signals: the pipeline stops first and drains, the API after it.
    let pipeline_stop = CancellationToken::new();
    let api_stop = CancellationToken::new();

    let state = AppState::new(read_model, api_stop.clone()).with_config(config.api.clone());
    let mut server = tokio::spawn(delivertrack_api::serve(listener, state));

    let (sender, source) = in_process(config.channel_capacity);
    let simulator = FleetSimulator::new(simulator_config(&config), now_ms());
    let mut simulation = tokio::spawn(run_simulator(
        simulator,
        sender,
        config.tick,
        config.speed,
        pipeline_stop.clone().cancelled_owned(),
    ));

    let driver_config = DriverConfig {
        epoch_policy: EpochPolicy {
            max_events: config.epoch_max_events,
            max_wait: config.epoch_max_wait,
        },
        dataflow: DataflowConfig {
            workers: config.workers.max(1),
            default_speed_mps: config.default_speed_mps,
            ..DataflowConfig::default()
        },
        ..DriverConfig::default()
    };
    let mut driver = tokio::spawn(drive(source, sinks, driver_config, pipeline_stop.clone()));
    tracing::info!(%addr, couriers = config.couriers, zones = config.zones, workers = config.workers, "The demo is running.");

    // Run until asked to stop, or until a part ends on its own (which is an error).
    let mut shutdown = std::pin::pin!(shutdown);
    let early: Option<anyhow::Error> = tokio::select! {
        () = &mut shutdown => None,
        ended = &mut server => Some(match ended {
            Ok(Ok(())) => anyhow::anyhow!("the API server stopped unexpectedly"),
            Ok(Err(error)) => anyhow::Error::new(error).context("the API server failed"),
            Err(error) => anyhow::Error::new(error).context("the API server task panicked"),
        }),
        ended = &mut simulation => Some(match ended {
            Ok(Ok(())) => anyhow::anyhow!("the simulator stopped unexpectedly"),
            Ok(Err(error)) => anyhow::Error::new(error).context("the simulator failed"),
            Err(error) => anyhow::Error::new(error).context("the simulator task panicked"),
        }),
        ended = &mut driver => {
            let error = match ended {
                Ok(Ok(_)) => anyhow::anyhow!("the pipeline stopped unexpectedly"),
                Ok(Err(error)) => error,
                Err(error) => anyhow::Error::new(error).context("the pipeline task panicked"),
            };
            pipeline_stop.cancel();
            api_stop.cancel();
            return Err(error);
        }
    };
    if let Some(error) = &early {
        tracing::error!(error = %format!("{error:#}"), "A part of the demo ended early; shutting down.");
    } else {
        tracing::info!("Shutting down: draining the epochs in flight.");
    }

    pipeline_stop.cancel();
    let report = driver.await.context("the pipeline task panicked")??;
    tracing::info!(epochs = report.epochs, events = report.events, last_epoch = ?report.last_epoch, "The pipeline drained.");
    if !simulation.is_finished() {
        simulation
            .await
            .context("the simulator task panicked")?
            .context("the simulator failed")?;
    }
    api_stop.cancel();
    if !server.is_finished() {
        server
            .await
            .context("the API server task panicked")?
            .context("the API server failed")?;
    }
    match early {
        Some(error) => Err(error),
        None => Ok(report),
    }
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
