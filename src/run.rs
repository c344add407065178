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
//! One writer per database (rule 10): with PostgreSQL, the stores are opened under the
//! database's writer lock ([`crate::stores`]). A second `run` on the same database waits
//! there as a hot standby — before it hydrates or connects to RabbitMQ, so it holds no
//! message — while a [standby server](crate::standby) answers `/healthz` `200` and
//! `/readyz` `503 standby` on its address, and prints one line saying so. When the writer
//! dies its session ends, PostgreSQL releases the lock, and the standby takes it within
//! [`WRITER_LOCK_POLL`](crate::stores::WRITER_LOCK_POLL), hydrates and consumes. A writer
//! whose lock connection is cut pauses its commits (as for PostgreSQL down) until it holds
//! the lock again; one that another process took over from stops without acknowledging
//! what it did not commit and exits with an error: its epochs are fenced in PostgreSQL
//! anyway ([`delivertrack_sinks::postgres::leader`]).
//!
//! Shutdown (rule 7): the source stops being read, the open epochs are computed, committed
//! and acknowledged, then the API stops — all within [`RunConfig::shutdown_timeout`], after
//! which the process gives up and leaves what is unacknowledged to be redelivered.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use delivertrack_api::{AuthConfig, Readiness, SourceStatus};
use delivertrack_ingest::rabbitmq::{
    CommandPublisher, CommandPublisherConfig, IngestMetrics, RabbitConfig, RabbitSource,
    SourceHealth,
};
use delivertrack_sinks::Sink;
use delivertrack_sinks::postgres::{LockWatch, WriterLock};
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

use crate::commands::RabbitCommands;
use crate::driver::DriveReport;
use crate::metrics::DriverMetrics;
use crate::service::{Companion, PipelineConfig, Service};
use crate::standby::{self, Phase};
use crate::stores::{StoresConfig, open_stores_as};
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
    /// Where `/metrics` is served when it has an address of its own (`--metrics-listen`).
    pub metrics_addr: Option<SocketAddr>,
}

/// What to open, for a person starting `run`.
pub fn banner(addr: SocketAddr, metrics_addr: Option<SocketAddr>, rabbit: &RabbitConfig) -> String {
    let metrics = match metrics_addr {
        Some(metrics) => format!("metrics on http://{metrics}/metrics"),
        None => "metrics /metrics".to_owned(),
    };
    format!(
        "DeliverTrack is running on http://{addr}/ (readiness /readyz, {metrics}), \
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
            println!("{}", banner(started.addr, started.metrics_addr, &rabbit));
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
    let metrics_listener = config.pipeline.bind_metrics().await?;
    let metrics_addr = PipelineConfig::metrics_addr(metrics_listener.as_ref())?;
    let registry = Registry::new();
    let metrics =
        IngestMetrics::register(&registry).context("the ingest metrics could not be registered")?;
    let driver_metrics = DriverMetrics::register(&registry)
        .context("the driver's metrics could not be registered")?;

    let mut shutdown = std::pin::pin!(shutdown);
    let speed_window = config.pipeline.driver_config().dataflow.speed_window;
    // Until the API serves, a standby server answers on the same socket (a second handle
    // on it): `/healthz` 200, `/readyz` 503 `starting` or `standby`.
    let listener = listener
        .into_std()
        .context("the listener cannot be shared with the standby server")?;
    let (phase_tx, phase_rx) = watch::channel(Phase::Starting);
    let standby_server = standby::serve(
        TcpListener::from_std(
            listener
                .try_clone()
                .context("the listener cannot be shared with the standby server")?,
        )
        .context("the standby server cannot listen")?,
        phase_rx.clone(),
    );
    let announce_standby = tokio::spawn(announce_standby(addr, phase_rx));
    let holder = writer_name(addr);
    let opened = tokio::select! {
        opened = open_stores_as(&config.stores, speed_window, &driver_metrics, &holder, &phase_tx) => Some(opened),
        () = &mut shutdown => None,
    };
    announce_standby.abort();
    let Some(stores) = opened else {
        tracing::info!(
            "Stopped while the stores were being opened (or while waiting as a standby)."
        );
        return Ok(DriveReport::default());
    };
    let stores = stores?;
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
        // The source decodes with the pipeline's contract limits, as the API's commands do.
        connected = RabbitSource::connect(RabbitConfig { limits: config.pipeline.api.contract, ..config.rabbit.clone() }, metrics) => {
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
    service.metrics_listener = metrics_listener;
    if let Some(lock) = stores.writer_lock {
        service
            .companions
            .push(watch_writer_lock(lock, service.stop.clone()));
    }
    let sink_names: Vec<&str> = service.sinks.iter().map(|s| s.name()).collect();
    tracing::info!(%addr, rabbitmq = %url, queue = %config.rabbit.queue, prefetch = config.rabbit.prefetch, workers = config.pipeline.workers, sinks = ?sink_names, restored_records = service.restore.len(), "DeliverTrack is running.");
    // The API takes the socket over from the standby server: what connects from now on
    // waits in the backlog for the API, so a caller told "started" talks to the API.
    standby_server.stop().await;
    let listener = TcpListener::from_std(listener).context("the API cannot listen")?;
    if let Some(started) = hooks.started {
        // The caller may have stopped listening; nothing depends on it hearing this.
        let _ = started.send(Started { addr, metrics_addr });
    }
    let ran = service.run(listener, shutdown).await;
    publisher.close().await;
    ran
}

/// How this process names itself to operators and standbys, in `pipeline_leader.holder`
/// and the lock session's `application_name`.
fn writer_name(addr: SocketAddr) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "an unknown host".to_owned());
    format!(
        "delivertrack run (pid {} on {host}, API http://{addr}/)",
        std::process::id()
    )
}

/// Prints one line on stdout when this process starts to wait as a standby, beside the
/// log line, so that whoever started it sees why it does not serve yet.
async fn announce_standby(addr: SocketAddr, mut phase: watch::Receiver<Phase>) {
    while phase.changed().await.is_ok() {
        let line = match &*phase.borrow_and_update() {
            Phase::Standby { database, holder } => format!(
                "DeliverTrack is a standby on http://{addr}/ (/readyz answers 503 until it takes over): {holder} writes to {database}."
            ),
            Phase::Starting => continue,
        };
        println!("{line}");
        return;
    }
}

/// A companion that keeps the writer lock (taking it again after a lost connection) and
/// ends the pipeline with an error when another process took over: the driver then stops without acknowledging what it did not commit (the fence
/// refuses its commits in any case), and the process exits non-zero.
fn watch_writer_lock(lock: WriterLock, stop: tokio_util::sync::CancellationToken) -> Companion {
    let task = tokio::spawn(async move {
        tokio::select! {
            () = stop.cancelled() => Ok(()),
            watched = lock.lost(Duration::from_secs(1)) => match watched {
                // The sink let it go (it found itself fenced): the driver reports why.
                LockWatch::Released => {
                    stop.cancelled().await;
                    Ok(())
                }
                LockWatch::Lost(fenced) => Err(anyhow!(
                    "this process is no longer the writer of the database ({fenced}); it stops without acknowledging what it did not commit"
                )),
            },
        }
    });
    Companion {
        name: "the writer lock",
        task,
    }
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
