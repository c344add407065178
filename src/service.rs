//! The wiring every command shares: one source → the [driver](crate::driver) → the sinks,
//! the API beside them, and the order in which they stop.
//!
//! `demo` and `run` differ only in their source (the simulator's in-process channel,
//! RabbitMQ), in what else runs beside it (the simulator) and in their readiness probe;
//! building the read model, the sinks, the API state and the driver's settings, and above
//! all the shutdown sequence, live here once:
//!
//! 1. `shutdown` resolves (or a part ends on its own, which is an error);
//! 2. the pipeline's stop token fires: the source stops being read, the companions (the
//!    simulator) stop;
//! 3. the driver drains: every epoch already read is computed, committed by every sink
//!    and acknowledged — within the drain bound, if one is set;
//! 4. only then does the API stop, so `/readyz` and the read model answer while draining.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, anyhow};
use delivertrack_api::{ApiConfig, AppState, Readiness};
use delivertrack_dataflow::pipeline::{DEFAULT_MAX_COURIER_SPEED_MPS, DataflowConfig};
use delivertrack_dataflow::restore::Restore;
use delivertrack_ingest::{EpochPolicy, Source};
use delivertrack_sinks::{ReadModel, ReadModelConfig, ReadModelSink, Sink};
use futures::future::select_all;
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::driver::{DriveReport, DriverConfig, Rehydrate, drive_isolating};
use crate::metrics::DriverMetrics;

/// The settings of the pipeline and its API that do not depend on where events come
/// from; `demo` and `run` both embed it.
#[derive(Clone, Debug)]
pub struct PipelineConfig {
    /// Where the API listens.
    pub listen: SocketAddr,
    /// Timely worker threads.
    pub workers: usize,
    /// ETA speed for couriers whose own speed is unknown, m/s.
    pub default_speed_mps: f64,
    /// An epoch closes at this many events ...
    pub epoch_max_events: usize,
    /// ... or this long after its first event, whichever comes first, while the commits
    /// keep up; while they are behind, an epoch grows up to `epoch_max_events` (see
    /// `docs/ARCHITECTURE.md`, *Epochs*).
    pub epoch_max_wait: Duration,
    /// API limits and timings. Its [`contract`](ApiConfig::contract) (`--max-event-age-secs`)
    /// is also what `run`'s RabbitMQ source decodes with.
    pub api: ApiConfig,
    /// The fastest a courier moves between two fixes, m/s (`--max-courier-speed-mps`); a
    /// faster fix is refused as `implausible_jump`.
    pub max_courier_speed_mps: f64,
    /// Epoch updates buffered per live WebSocket client before it is resynced.
    pub live_capacity: usize,
    /// Where `GET /metrics` is served instead of the API's address (`--metrics-listen`);
    /// `None`: on the API's address.
    pub metrics_listen: Option<SocketAddr>,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            workers: 2,
            default_speed_mps: DataflowConfig::default().default_speed_mps,
            epoch_max_events: 10_000,
            epoch_max_wait: Duration::from_millis(200),
            api: ApiConfig::default(),
            max_courier_speed_mps: DEFAULT_MAX_COURIER_SPEED_MPS,
            live_capacity: ReadModelConfig::default().live_capacity,
            metrics_listen: None,
        }
    }
}

impl PipelineConfig {
    /// Binds [`listen`](Self::listen).
    ///
    /// # Errors
    /// The address cannot be bound (in use, not local, no permission).
    pub async fn bind(&self) -> anyhow::Result<TcpListener> {
        TcpListener::bind(self.listen)
            .await
            .with_context(|| format!("cannot listen on {}", self.listen))
    }

    /// Binds [`metrics_listen`](Self::metrics_listen), when set.
    ///
    /// # Errors
    /// The address cannot be bound.
    pub async fn bind_metrics(&self) -> anyhow::Result<Option<TcpListener>> {
        let Some(addr) = self.metrics_listen else {
            return Ok(None);
        };
        TcpListener::bind(addr)
            .await
            .map(Some)
            .with_context(|| format!("cannot listen on {addr} for the metrics"))
    }

    /// Where a listener of [`bind_metrics`](Self::bind_metrics) listens, for the banner.
    ///
    /// # Errors
    /// The socket has no local address.
    pub fn metrics_addr(listener: Option<&TcpListener>) -> anyhow::Result<Option<SocketAddr>> {
        listener
            .map(TcpListener::local_addr)
            .transpose()
            .context("the metrics listener has no local address")
    }

    /// The API's settings: [`api`](Self::api), with `/metrics` left to its own address
    /// when one is set.
    pub fn api_config(&self) -> ApiConfig {
        ApiConfig {
            metrics_on_api: self.metrics_listen.is_none(),
            ..self.api.clone()
        }
    }

    /// The driver's settings: epochs cut by these bounds, the dataflow on these workers.
    pub fn driver_config(&self) -> DriverConfig {
        DriverConfig {
            epoch_policy: EpochPolicy {
                max_events: self.epoch_max_events,
                max_wait: self.epoch_max_wait,
            },
            dataflow: DataflowConfig {
                workers: self.workers.max(1),
                default_speed_mps: self.default_speed_mps,
                max_courier_speed_mps: self.max_courier_speed_mps,
                ..DataflowConfig::default()
            },
            ..DriverConfig::default()
        }
    }
}

/// A task that runs beside the pipeline for as long as it does (the demo's simulator).
/// It must end once the pipeline's stop token fires; ending before is an error.
#[derive(Debug)]
pub struct Companion {
    /// For the error message when it ends early ("the simulator").
    pub name: &'static str,
    /// The task.
    pub task: JoinHandle<anyhow::Result<()>>,
}

/// Everything a running pipeline is made of, assembled by a command and run by
/// [`Service::run`].
pub struct Service<S> {
    /// Where events come from.
    pub source: S,
    /// Every enabled sink; the read model's is always among them.
    pub sinks: Vec<Box<dyn Sink>>,
    /// How the driver cuts epochs and runs the dataflow.
    pub driver: DriverConfig,
    /// The API's state: the read model, readiness, registry and the API's own stop token.
    pub state: AppState,
    /// Tasks that run beside the pipeline.
    pub companions: Vec<Companion>,
    /// Stops the reading of the source (and the companions); the driver then drains.
    pub stop: CancellationToken,
    /// How long the drain after shutdown may take; `None` waits as long as it takes.
    pub drain_timeout: Option<Duration>,
    /// The state hydrated from the system of record, submitted before any input is read
    /// (empty: start from nothing).
    pub restore: Vec<Restore>,
    /// Where the driver reads the state back from when the system of record refuses an
    /// epoch's data for good (poison isolation); `None`: such a refusal stops the pipeline.
    pub rehydrate: Option<Box<dyn Rehydrate>>,
    /// Where `GET /metrics` is served apart from the API (`--metrics-listen`), bound by the
    /// command; `None`: the API serves it.
    pub metrics_listener: Option<TcpListener>,
}

impl<S> std::fmt::Debug for Service<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field(
                "sinks",
                &self.sinks.iter().map(|s| s.name()).collect::<Vec<_>>(),
            )
            .field("driver", &self.driver)
            .field("companions", &self.companions)
            .field("drain_timeout", &self.drain_timeout)
            .field("restore", &self.restore.len())
            .field("rehydrate", &self.rehydrate.is_some())
            .field("metrics_listener", &self.metrics_listener)
            .finish_non_exhaustive()
    }
}

impl<S: Source + 'static> Service<S> {
    /// The common assembly: a read model and its sink (first in the list, followed by
    /// `extra_sinks`), the driver counting in `metrics` (registered in `registry`), and an
    /// API state serving both with `readiness`.
    ///
    /// # Errors
    /// None yet; fallible so that assembling more parts need not change the callers.
    pub fn assemble(
        source: S,
        config: &PipelineConfig,
        extra_sinks: Vec<Box<dyn Sink>>,
        readiness: Readiness,
        registry: Registry,
        metrics: DriverMetrics,
    ) -> anyhow::Result<Self> {
        let read_model = ReadModel::new(ReadModelConfig {
            live_capacity: config.live_capacity,
        });
        let mut sinks: Vec<Box<dyn Sink>> = vec![Box::new(ReadModelSink::new(read_model.clone()))];
        sinks.extend(extra_sinks);
        let mut driver = config.driver_config();
        driver.metrics = Some(metrics);
        let state = AppState::new(read_model, CancellationToken::new())
            .with_config(config.api_config())
            .with_readiness(readiness)
            .with_registry(registry);
        Ok(Self {
            source,
            sinks,
            driver,
            state,
            companions: Vec::new(),
            stop: CancellationToken::new(),
            drain_timeout: None,
            restore: Vec::new(),
            rehydrate: None,
            metrics_listener: None,
        })
    }

    /// Serves the API on `listener` and drives the pipeline until `shutdown` resolves,
    /// then drains and stops in the order of the [module docs](self). Returns what the
    /// driver did.
    ///
    /// # Errors
    /// The dataflow did not start or failed, the source or a sink failed, a companion or
    /// the API server ended early, or the drain took longer than `drain_timeout`.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<DriveReport> {
        let Service {
            source,
            sinks,
            driver,
            state,
            companions,
            stop,
            drain_timeout,
            restore,
            rehydrate,
            metrics_listener,
        } = self;
        let api_stop = state.shutdown.clone();
        // The metrics' own server stops with the API (the same token).
        let metrics_server = metrics_listener.map(|listener| {
            tokio::spawn(delivertrack_api::metrics::serve(listener, state.clone()))
        });
        let mut server = tokio::spawn(delivertrack_api::serve(listener, state));
        let mut driving = tokio::spawn(drive_isolating(
            source,
            sinks,
            driver,
            restore,
            rehydrate,
            stop.clone(),
        ));
        let mut companions = companions;

        // Run until asked to stop, or until a part ends on its own (which is an error).
        let mut shutdown = std::pin::pin!(shutdown);
        let early: Option<anyhow::Error> = tokio::select! {
            () = &mut shutdown => None,
            ended = &mut server => Some(match ended {
                Ok(Ok(())) => anyhow!("the API server stopped unexpectedly"),
                Ok(Err(error)) => anyhow::Error::new(error).context("the API server failed"),
                Err(error) => anyhow::Error::new(error).context("the API server task panicked"),
            }),
            (name, ended) = first_to_end(&mut companions) => Some(match ended {
                Ok(Ok(())) => anyhow!("{name} stopped unexpectedly"),
                Ok(Err(error)) => error.context(format!("{name} failed")),
                Err(error) => anyhow::Error::new(error).context(format!("{name} panicked")),
            }),
            ended = &mut driving => {
                let error = match ended {
                    Ok(Ok(_)) => anyhow!("the pipeline stopped unexpectedly"),
                    Ok(Err(error)) => error,
                    Err(error) => anyhow::Error::new(error).context("the pipeline task panicked"),
                };
                stop.cancel();
                api_stop.cancel();
                return Err(error);
            }
        };
        if let Some(error) = &early {
            tracing::error!(error = %format!("{error:#}"), "A part of the pipeline ended early; shutting down.");
        } else {
            tracing::info!("Shutting down: draining the epochs in flight.");
        }

        stop.cancel();
        let drained = match drain_timeout {
            None => Ok((&mut driving).await),
            Some(bound) => tokio::time::timeout(bound, &mut driving).await,
        };
        let report = match drained {
            Ok(joined) => match joined.context("the pipeline task panicked")? {
                Ok(report) => report,
                // The part that ended early says why (a lost writer lock makes the drain's
                // commits fail too); the drain's own error goes to the log.
                Err(error) if early.is_some() => {
                    tracing::error!(error = %format!("{error:#}"), "The drain failed.");
                    api_stop.cancel();
                    return Err(early.unwrap_or(error));
                }
                Err(error) => return Err(error),
            },
            Err(_) => {
                // Dropping the driver drops the source: what it read and did not acknowledge
                // is redelivered by a source that can (RabbitMQ).
                driving.abort();
                api_stop.cancel();
                return Err(anyhow!(
                    "the pipeline did not drain within {:.1} s; its unacknowledged input is left for redelivery",
                    drain_timeout.unwrap_or_default().as_secs_f64()
                ));
            }
        };
        tracing::info!(epochs = report.epochs, events = report.events, last_epoch = ?report.last_epoch, "The pipeline drained.");
        for companion in companions {
            companion
                .task
                .await
                .with_context(|| format!("{} panicked", companion.name))?
                .with_context(|| format!("{} failed", companion.name))?;
        }
        api_stop.cancel();
        if !server.is_finished() {
            server
                .await
                .context("the API server task panicked")?
                .context("the API server failed")?;
        }
        if let Some(metrics_server) = metrics_server {
            metrics_server
                .await
                .context("the metrics server task panicked")?
                .context("the metrics server failed")?;
        }
        match early {
            Some(error) => Err(error),
            None => Ok(report),
        }
    }
}

/// The first companion to end, with its name; never resolves when there are none. A
/// companion that ended is removed, so the drain does not await it twice.
async fn first_to_end(
    companions: &mut Vec<Companion>,
) -> (
    &'static str,
    Result<anyhow::Result<()>, tokio::task::JoinError>,
) {
    if companions.is_empty() {
        return std::future::pending().await;
    }
    let (ended, index, _) = select_all(companions.iter_mut().map(|c| &mut c.task)).await;
    let companion = companions.swap_remove(index);
    (companion.name, ended)
}
