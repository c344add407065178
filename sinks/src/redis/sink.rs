//! [`RedisSink`]: the hot caches, written one pipeline per epoch, never in the way.

use std::sync::Arc;
use std::time::Instant;

use delivertrack_dataflow::EpochOutput;
use prometheus::{IntCounter, Opts, Registry};

use super::cache::{Cache, Keys};
use super::config::RedisConfig;
use super::service::{self, Connection, RedisError};
use crate::sink::{BoxError, Sink, SinkError, SinkFuture};

const NAME: &str = "redis";

/// Keeps the Redis caches in step with the dataflow's output.
///
/// Each epoch is one `MULTI`/`EXEC` pipeline (one round trip; see `service::pipeline` for
/// why a transaction). Redis is a cache, not the record: when it cannot be written,
/// [`commit`](Sink::commit) still succeeds, so that the epoch is acknowledged and the
/// pipeline goes on; the failure is counted (`delivertrack_sink_errors_total{sink="redis"}`),
/// logged once per outage, and the sink remembers that the cache is stale. At the first
/// commit that reaches Redis again, it rewrites everything the cache should show from the
/// current state it keeps (live courier locations, deliveries not yet ended with their
/// ETAs, what ended or vanished during the outage, and those deliveries' customer
/// histories) in one pipeline, and the cache is whole again.
///
/// Every exchange is bounded by the connect and response timeouts, so a dead Redis costs an
/// epoch at most that, and a refused connection nothing.
#[derive(Debug)]
pub struct RedisSink {
    connection: Connection,
    /// The current state the cache is made of, and the writes that keep it so.
    cache: Cache,
    /// Failed writes (one per epoch or resync that did not reach Redis).
    errors: IntCounter,
    /// `Some` while the cache is stale: since when, and how many writes failed since.
    outage: Option<Outage>,
    /// Set by [`close`](Sink::close); later commits are refused.
    closed: bool,
}

#[derive(Debug, Clone, Copy)]
struct Outage {
    since: Instant,
    failures: u64,
}

impl RedisSink {
    /// Connects to the Redis of `config` and checks that it answers.
    ///
    /// # Errors
    /// [`SinkError::Unavailable`] whose source, a [`RedisError`], names the Redis: unreachable,
    /// timed out, or a configuration that cannot work. A configured Redis that is not there
    /// at start is an error, never a silent start without the cache (ARCHITECTURE rule 8).
    pub async fn connect(config: &RedisConfig) -> Result<Self, SinkError> {
        let errors = IntCounter::with_opts(
            Opts::new(
                "delivertrack_sink_errors_total",
                "Epoch commits a sink could not write to its store.",
            )
            .const_label("sink", NAME),
        )
        .map_err(|source| unavailable(RedisError::InvalidConfig(source.to_string())))?;
        let connection = service::connect(config).await.map_err(unavailable)?;
        tracing::info!(
            redis = connection.target(),
            key_prefix = %config.key_prefix,
            "The Redis sink is connected."
        );
        Ok(Self {
            connection,
            cache: Cache::new(config),
            errors,
            outage: None,
            closed: false,
        })
    }

    /// The failure counter, `delivertrack_sink_errors_total{sink="redis"}`.
    pub fn errors(&self) -> &IntCounter {
        &self.errors
    }

    /// Counts failed writes in `errors` instead of the sink's own counter: the pipeline
    /// hands in its `delivertrack_sink_errors_total{sink="redis"}` series, so that every
    /// sink's failures are one metric family.
    #[must_use]
    pub fn with_error_counter(mut self, errors: IntCounter) -> Self {
        self.errors = errors;
        self
    }

    /// Registers the failure counter with the registry `/metrics` renders.
    ///
    /// # Errors
    /// The registry's error, for instance when it is registered twice.
    pub fn register(&self, registry: &Registry) -> Result<(), prometheus::Error> {
        registry.register(Box::new(self.errors.clone()))
    }

    /// Is the cache behind the dataflow (Redis could not be written since the last
    /// successful write)?
    pub fn is_stale(&self) -> bool {
        self.outage.is_some()
    }

    /// The key names this sink writes.
    pub fn keys(&self) -> &Keys {
        self.cache.keys()
    }

    async fn write(&mut self, output: &EpochOutput) {
        let now = Instant::now();
        let Some(epoch) = self.cache.apply(output, now) else {
            tracing::debug!(
                epoch = output.epoch,
                "Redis already has this epoch; nothing was written."
            );
            return;
        };
        if self.outage.is_some() {
            // The resync holds this epoch too: it is written from the state after it.
            self.cache.remember(epoch);
            let writes = self.cache.resync(now);
            match self.connection.send(&service::pipeline(&writes)).await {
                Ok(()) => {
                    self.cache.synced();
                    if let Some(outage) = self.outage.take() {
                        let (couriers, deliveries, _) = self.cache.sizes();
                        tracing::info!(
                            redis = self.connection.target(),
                            epoch = output.epoch,
                            outage_ms = outage.since.elapsed().as_millis() as u64,
                            failed_writes = outage.failures,
                            writes = writes.len(),
                            couriers,
                            deliveries,
                            "Redis answers again; the cache was rewritten from the current state."
                        );
                    }
                }
                Err(error) => self.failed(output.epoch, &error),
            }
        } else if !epoch.writes.is_empty() {
            let started = Instant::now();
            match self
                .connection
                .send(&service::pipeline(&epoch.writes))
                .await
            {
                Ok(()) => tracing::debug!(
                    epoch = output.epoch,
                    writes = epoch.writes.len(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "Redis committed an epoch."
                ),
                Err(error) => {
                    self.cache.remember(epoch);
                    self.failed(output.epoch, &error);
                }
            }
        }
    }

    /// Counts a failed write; the first of an outage is a warning, the others are not
    /// repeated (the counter shows them).
    fn failed(&mut self, epoch: u64, error: &RedisError) {
        self.errors.inc();
        match &mut self.outage {
            Some(outage) => {
                outage.failures += 1;
                tracing::debug!(
                    epoch,
                    error = %Chain(error),
                    "Redis is still unreachable; the cache stays stale."
                );
            }
            None => {
                self.outage = Some(Outage {
                    since: Instant::now(),
                    failures: 1,
                });
                tracing::warn!(
                    redis = self.connection.target(),
                    epoch,
                    error = %Chain(error),
                    "Redis cannot be written; the pipeline goes on without the cache, which is \
                     stale until Redis answers again."
                );
            }
        }
    }
}

impl Sink for RedisSink {
    fn name(&self) -> &'static str {
        NAME
    }

    /// Never fails for Redis' sake: see [`RedisSink`].
    fn commit(&mut self, output: Arc<EpochOutput>) -> SinkFuture<'_> {
        Box::pin(async move {
            if self.closed {
                return Err(SinkError::Closed { sink: NAME });
            }
            self.write(&output).await;
            Ok(())
        })
    }

    /// A stale cache gets one last chance to be rewritten, so that a process stopping
    /// right after an outage does not leave the cache behind for the next one.
    fn close(&mut self) -> SinkFuture<'_> {
        Box::pin(async move {
            if !self.closed && self.outage.is_some() {
                let writes = self.cache.resync(Instant::now());
                if self
                    .connection
                    .send(&service::pipeline(&writes))
                    .await
                    .is_ok()
                {
                    self.cache.synced();
                    self.outage = None;
                }
            }
            self.closed = true;
            Ok(())
        })
    }
}

fn unavailable(error: RedisError) -> SinkError {
    SinkError::Unavailable {
        sink: NAME,
        source: BoxError::from(Box::new(error)),
    }
}

/// An error with its causes, `a: b: c`, for a log field.
struct Chain<'a>(&'a dyn std::error::Error);

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}
