//! `delivertrack run`: the pipeline on real input — RabbitMQ in, the sinks out, the API
//! beside them.
//!
//! The RabbitMQ source declares its topology, consumes with a bounded prefetch and is
//! acknowledged by the [driver](crate::driver) only after every sink committed an epoch;
//! everything else is the wiring `demo` uses too ([`Service`]). The sinks are the read
//! model and the configured [stores](crate::stores): PostgreSQL is created if missing,
//! migrated and read back (hydration) before RabbitMQ is even connected to, so the first
//! event read lands on the state the last run committed.
//!
//! Start-up fails, naming the broker, when RabbitMQ cannot be reached: a configured service
//! that is down is an error, never a silent fallback (ARCHITECTURE rule 8). Once running,
//! a lost connection is the source's to heal (it reconnects with backoff); meanwhile
//! `/readyz` answers `503 source_unavailable` with the reason.
//!
//! The API's write routes publish their events to the same exchange through a
//! [`CommandPublisher`] with a connection of its own ([`crate::commands`]), and verify
//! tokens with `JWT_SECRET` ([`RunConfig::auth`]): an empty secret, or the README's sample
//! one without [`RunConfig::insecure_dev_secret`], stops the start before anything opens.
//!
//! Shutdown (rule 7): the source stops being read, the open epochs are computed, committed
//! and acknowledged, then the API stops — all within [`RunConfig::shutdown_timeout`], after
//! which the process gives up and leaves what is unacknowledged to be redelivered.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use delivertrack_api::{AuthConfig, Readiness, SourceStatus};
use delivertrack_ingest::rabbitmq::{
    CommandPublisher, CommandPublisherConfig, IngestMetrics, RabbitConfig, RabbitSource,
    SourceHealth,
};
use delivertrack_sinks::Sink;
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

use crate::commands::RabbitCommands;
use crate::driver::DriveReport;
use crate::metrics::DriverMetrics;
use crate::service::{PipelineConfig, Service};
use crate::stores::{StoresConfig, open_stores};
use delivertrack_api::{RateLimitConfig, RateLimiter};

/// Everything `delivertrack run` can be told.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// The settings shared with `demo`: listen address, workers, epoch bounds, API.
    pub pipeline: PipelineConfig,
    /// The broker, the topology's names, the prefetch and the reconnect backoff.
    pub rabbit: RabbitConfig,
    /// The stores written besides the read model (none by default; the command line
    /// enables PostgreSQL, Redis and the derived feed unless told otherwise).
    pub stores: StoresConfig,
    /// How long the drain after Ctrl-C / SIGTERM may take before the process gives up
    /// (what it read and did not acknowledge is then redelivered to the next consumer).
    pub shutdown_timeout: Duration,
    /// `JWT_SECRET` and `JWT_EXPIRY`, which the API verifies tokens with. `None`: a random
    /// secret of this process (tokens only it can issue); `delivertrack run` always sets it.
    pub auth: Option<AuthConfig>,
    /// Accept the README's sample secret ([`SAMPLE_SECRET`](crate::auth::SAMPLE_SECRET)),
    /// which is otherwise refused at start (an empty one always is).
    pub insecure_dev_secret: bool,
    /// The API's rate limits: kept in Redis (shared by every instance) when the Redis store
    /// is configured, in this process otherwise.
    pub rate_limits: RateLimitConfig,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            pipeline: PipelineConfig::default(),
            rabbit: RabbitConfig::default(),
            stores: StoresConfig::default(),
            shutdown_timeout: Duration::from_secs(30),
            auth: None,
            insecure_dev_secret: false,
            rate_limits: RateLimitConfig::default(),
        }
    }
}

/// What a caller of [`run_pipeline_on`] may add: tests stall or observe the pipeline
/// through an extra sink and learn when it has started.
#[derive(Default)]
pub struct RunHooks {
    /// Sinks committed beside the read model (each epoch is acknowledged only after all of
    /// them committed it).
    pub extra_sinks: Vec<Box<dyn Sink>>,
    /// Told once the source is connected (its topology declared) and the API is about to
    /// serve.
    pub started: Option<oneshot::Sender<Started>>,
}

impl std::fmt::Debug for RunHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunHooks")
            .field(
                "extra_sinks",
                &self
                    .extra_sinks
                    .iter()
                    .map(|s| s.name())
                    .collect::<Vec<_>>(),
            )
            .field("started", &self.started.is_some())
            .finish()
    }
}

/// The pipeline has connected and is serving.
#[derive(Clone, Debug)]
pub struct Started {
    /// Where the API listens.
    pub addr: SocketAddr,
}

/// What to open, for a person starting `run`.
pub fn banner(addr: SocketAddr, rabbit: &RabbitConfig) -> String {
    format!(
        "DeliverTrack is running on http://{addr}/ (readiness /readyz, metrics /metrics), \
         consuming {queue:?} from {url}. Press Ctrl-C to stop.",
        queue = rabbit.queue,
        url = rabbit.redacted_url(),
    )
}

/// Binds `config.pipeline.listen`, connects to RabbitMQ, prints where to look on stdout,
/// and runs until `shutdown` resolves (see [`run_pipeline_on`]).
///
/// # Errors
/// The address cannot be bound, RabbitMQ cannot be reached, or the pipeline failed.
pub async fn run_pipeline(
    config: RunConfig,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let listener = config.pipeline.bind().await?;
    let (started_tx, started_rx) = oneshot::channel::<Started>();
    let rabbit = config.rabbit.clone();
    let announce = async move {
        if let Ok(started) = started_rx.await {
            println!("{}", banner(started.addr, &rabbit));
        }
    };
    let hooks = RunHooks {
        started: Some(started_tx),
        ..RunHooks::default()
    };
    let (ran, ()) = tokio::join!(run_pipeline_on(listener, config, hooks, shutdown), announce);
    ran.map(|_| ())
}

/// Runs the pipeline on an already bound listener (`config.pipeline.listen` is ignored),
/// so that a caller binding `127.0.0.1:0` knows the port. If `shutdown` resolves while
/// RabbitMQ is still being connected to, returns at once with an empty report.
///
/// # Errors
/// RabbitMQ cannot be reached at start (the error names it), the metrics cannot be
/// registered, or the pipeline failed (see [`Service::run`]), the drain bound included.
pub async fn run_pipeline_on(
    listener: TcpListener,
    config: RunConfig,
    hooks: RunHooks,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<DriveReport> {
    let addr = listener
        .local_addr()
        .context("the listener has no local address")?;
    // The secret first: a refused one stops the start before anything is opened.
    let authenticator = config
        .auth
        .as_ref()
        .map(|auth| crate::auth::authenticator(auth, config.insecure_dev_secret))
        .transpose()?;
    let registry = Registry::new();
    let metrics =
        IngestMetrics::register(&registry).context("the ingest metrics could not be registered")?;
    let driver_metrics = DriverMetrics::register(&registry)
        .context("the driver's metrics could not be registered")?;

    let mut shutdown = std::pin::pin!(shutdown);
    let speed_window = config.pipeline.driver_config().dataflow.speed_window;
    let stores = tokio::select! {
        opened = open_stores(&config.stores, speed_window, &driver_metrics) => opened?,
        () = &mut shutdown => {
            tracing::info!("Stopped while the stores were being opened.");
            return Ok(DriveReport::default());
        }
    };
    let mut sinks = stores.sinks;
    sinks.extend(hooks.extra_sinks);
    let limiter = match &config.stores.redis {
        Some(redis) => {
            let limits = RateLimitConfig {
                key_prefix: format!("{}ratelimit:", redis.key_prefix),
                ..config.rate_limits.clone()
            };
            RateLimiter::redis(redis, limits).await.with_context(|| {
                format!("Redis at {} cannot keep the rate limits", redis.target())
            })?
        }
        None => RateLimiter::in_process(config.rate_limits.clone())
            .context("the rate limits are not usable")?,
    };

    let url = config.rabbit.redacted_url();
    let source = tokio::select! {
        connected = RabbitSource::connect(config.rabbit.clone(), metrics) => {
            connected.with_context(|| format!("RabbitMQ at {url} cannot be reached"))?
        }
        () = &mut shutdown => {
            tracing::info!("Stopped before RabbitMQ was connected.");
            return Ok(DriveReport::default());
        }
    };
    let readiness = readiness(source.health());
    // The write routes publish on a connection of their own, to the exchange the source
    // has just declared and bound its queue to.
    let publisher = Arc::new(
        CommandPublisher::connect(CommandPublisherConfig::for_source(&config.rabbit))
            .await
            .with_context(|| format!("RabbitMQ at {url} cannot take commands"))?,
    );

    let mut service = Service::assemble(
        source,
        &config.pipeline,
        sinks,
        readiness,
        registry,
        driver_metrics,
    )?;
    service.drain_timeout = Some(config.shutdown_timeout);
    service.state = service
        .state
        .clone()
        .with_commands(Arc::new(RabbitCommands::new(Arc::clone(&publisher))));
    if let Some(authenticator) = authenticator {
        service.state = service.state.clone().with_auth(authenticator);
    }
    service.state = service.state.clone().with_limiter(limiter);
    if let Some(records) = stores.records {
        // Poison isolation: the driver rebuilds from PostgreSQL when it refuses an event.
        service.rehydrate = Some(Box::new(crate::rebuild::PostgresRehydrate::new(
            records.clone(),
            speed_window,
        )));
        service.state = service.state.clone().with_records(records);
    }
    service.restore = stores.restore;
    let sink_names: Vec<&str> = service.sinks.iter().map(|s| s.name()).collect();
    tracing::info!(%addr, rabbitmq = %url, queue = %config.rabbit.queue, prefetch = config.rabbit.prefetch, workers = config.pipeline.workers, sinks = ?sink_names, restored_records = service.restore.len(), "DeliverTrack is running.");
    if let Some(started) = hooks.started {
        // The caller may have stopped listening; nothing depends on it hearing this.
        let _ = started.send(Started { addr });
    }
    let ran = service.run(listener, shutdown).await;
    publisher.close().await;
    ran
}

/// `/readyz`'s view of the source: connected, or the reason it is not.
fn readiness(health: watch::Receiver<SourceHealth>) -> Readiness {
    Readiness::new(move || match &*health.borrow() {
        SourceHealth::Connected => SourceStatus::Connected,
        SourceHealth::Reconnecting {
            attempts,
            last_error,
        } => SourceStatus::Unavailable {
            reason: format!(
                "the connection to RabbitMQ is lost; reconnecting (attempt {attempts}): {last_error}"
            ),
        },
    })
}
