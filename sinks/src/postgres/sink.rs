//! [`PostgresSink`]: the system of record, written one transaction per epoch.

use std::sync::Arc;
use std::time::Instant;

use delivertrack_dataflow::{Epoch, EpochOutput};
use sqlx::PgPool;

use super::batch::EpochBatch;
use super::config::PostgresConfig;
use super::leader::{Fence, Fenced, WriterLock, claim_generation};
use super::service::{self, Failure, PostgresError, Written};
use crate::sink::{BoxError, Sink, SinkError, SinkFuture};

const NAME: &str = "postgres";

/// Writes every epoch's output to PostgreSQL, idempotently.
///
/// Each commit is one transaction holding one batched statement per table (`UNNEST` of
/// column arrays), so its cost grows with the rows, not with round trips. The transaction
/// first checks that this sink is still the database's writer (its [`Fence`]), then moves
/// `pipeline_progress` forward, and only if the epoch is newer than the one recorded; an
/// epoch already there is skipped as a whole only if this same writer recorded it (a retry
/// whose first attempt did commit, a replay). Beyond that guard every statement is
/// idempotent on its own: upserts to the new state, deletes by key, inserts that skip
/// existing keys.
///
/// # One writer
/// Each sink claims a writer generation when it opens: with the [`WriterLock`] a process
/// took ([`with_writer_lock`](Self::with_writer_lock), what `run` does), or on its own
/// ([`with_pool`](Self::with_pool), [`connect`](Self::connect): the newest sink on a
/// database is its writer). A sink that finds itself fenced (another writer took over, or
/// its lock is lost) writes nothing, closes itself and answers [`SinkError::Closed`], so
/// the driver stops without acknowledging the epoch.
///
/// # Epoch numbers
/// The dataflow numbers its epochs from 0 in every process. The tables number them across
/// restarts: the sink adds [`epoch_base`](Self::epoch_base), one past the last epoch
/// committed when it connected, so that epochs of a new process never collide with those of
/// an earlier one (in the progress guard, in `geofence_transitions`' key).
#[derive(Debug)]
pub struct PostgresSink {
    pool: PgPool,
    /// Added to the dataflow's epoch to get the stored epoch.
    epoch_base: u64,
    /// The writer generation (and lock session) every commit checks.
    fence: Fence,
    /// The writer lock this sink commits under, released by [`close`](Sink::close).
    lock: Option<WriterLock>,
    /// Set by [`close`](Sink::close) or when fenced; later commits are refused.
    closed: bool,
}

impl PostgresSink {
    /// Connects to the database of `config` and reads where the last run stopped. The
    /// schema must be in place ([`migrate`](super::migrate)).
    ///
    /// # Errors
    /// [`SinkError::Unavailable`] whose source, a [`PostgresError`], names the database:
    /// unreachable, refused login, invalid url, schema missing.
    pub async fn connect(config: &PostgresConfig) -> Result<Self, SinkError> {
        let pool = service::connect_pool(config).await.map_err(unavailable)?;
        Self::with_pool_named(pool, config.target()).await
    }

    /// A sink on an existing pool (shared with the `migrate` step and hydration), continuing
    /// after the last committed epoch. It claims a new writer generation without the
    /// writer lock: every sink opened earlier on this database is fenced from now on.
    ///
    /// # Errors
    /// [`SinkError::Unavailable`] when `pipeline_progress` cannot be read (schema missing,
    /// database gone).
    pub async fn with_pool(pool: PgPool) -> Result<Self, SinkError> {
        let target = pool_target(&pool);
        Self::with_pool_named(pool, target).await
    }

    /// A sink that commits under `lock` (taken with [`WriterLock::acquire`], its generation
    /// claimed), continuing after the last committed epoch; [`close`](Sink::close) releases
    /// the lock.
    ///
    /// # Errors
    /// [`SinkError::Unavailable`] when `pipeline_progress` cannot be read.
    pub async fn with_writer_lock(pool: PgPool, lock: WriterLock) -> Result<Self, SinkError> {
        let target = pool_target(&pool);
        let mut sink = Self::open(pool, target, Some(lock.fence())).await?;
        sink.lock = Some(lock);
        Ok(sink)
    }

    async fn with_pool_named(pool: PgPool, target: String) -> Result<Self, SinkError> {
        Self::open(pool, target, None).await
    }

    /// Claims a generation unless `fence` has one, then reads where the last writer stopped
    /// (after the claim, so that what it reads is final).
    async fn open(pool: PgPool, target: String, fence: Option<Fence>) -> Result<Self, SinkError> {
        let fence = match fence {
            Some(fence) => fence,
            None => {
                let holder = format!("a PostgreSQL sink of pid {}", std::process::id());
                match claim_generation(&pool, &holder).await {
                    Ok(generation) => Fence {
                        generation,
                        lock_backend: None,
                    },
                    Err(source) => {
                        return Err(unavailable(open_error(
                            PostgresError::Query(source),
                            target,
                        )));
                    }
                }
            }
        };
        let last = match service::last_committed_epoch(&pool).await {
            Ok(last) => last,
            Err(error) => return Err(unavailable(open_error(error, target))),
        };
        let epoch_base = last.map_or(0, |last| last.saturating_add(1));
        tracing::info!(
            database = %target,
            last_committed_epoch = ?last,
            epoch_base,
            generation = fence.generation,
            "The PostgreSQL sink is connected."
        );
        Ok(Self {
            pool,
            epoch_base,
            fence,
            lock: None,
            closed: false,
        })
    }

    /// The pool, for whoever shares the database (hydration, health checks).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// What is added to the dataflow's epoch numbers before they are stored.
    pub fn epoch_base(&self) -> u64 {
        self.epoch_base
    }

    /// The stored number of the dataflow's epoch `epoch`.
    ///
    /// # Errors
    /// [`SinkError::Failed`] when it does not fit PostgreSQL's `bigint`.
    pub fn stored_epoch(&self, epoch: Epoch) -> Result<i64, SinkError> {
        self.epoch_base
            .checked_add(epoch)
            .and_then(|stored| i64::try_from(stored).ok())
            .ok_or_else(|| SinkError::Failed {
                sink: NAME,
                epoch,
                source: format!("epoch {} + {epoch} exceeds a bigint", self.epoch_base).into(),
            })
    }

    async fn write(&mut self, output: &EpochOutput) -> Result<(), SinkError> {
        let started = Instant::now();
        let stored = self.stored_epoch(output.epoch)?;
        let batch = EpochBatch::new(output, stored).map_err(|source| SinkError::Rejected {
            sink: NAME,
            epoch: output.epoch,
            // A value PostgreSQL cannot represent, found before sending: the data's fault.
            code: "unrepresentable".into(),
            source: Box::new(source),
        })?;
        match service::write_epoch(&self.pool, &batch, self.fence()).await {
            Ok(Written::Applied { rows }) => {
                tracing::debug!(
                    epoch = output.epoch,
                    stored_epoch = stored,
                    rows,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "PostgreSQL committed an epoch."
                );
                Ok(())
            }
            Ok(Written::AlreadyCommitted) => {
                tracing::debug!(
                    epoch = output.epoch,
                    stored_epoch = stored,
                    "PostgreSQL already had this epoch; nothing was written."
                );
                Ok(())
            }
            Ok(Written::Fenced(fenced @ Fenced::LockLost)) => {
                // The lock's session is gone but nobody took over (yet): wait for the lock
                // to be taken again, as for any outage.
                Err(SinkError::Unavailable {
                    sink: NAME,
                    source: Box::new(fenced),
                })
            }
            Ok(Written::Fenced(fenced)) => {
                tracing::error!(
                    epoch = output.epoch,
                    stored_epoch = stored,
                    generation = self.fence().generation,
                    reason = %fenced,
                    "This process is no longer the writer of the database: it commits nothing more and stops without acknowledging."
                );
                self.closed = true;
                if let Some(lock) = self.lock.take() {
                    lock.release().await;
                }
                Err(SinkError::Closed { sink: NAME })
            }
            Err(error) => Err(commit_error(output.epoch, error)),
        }
    }

    /// The generation and lock session this sink's commits check (the lock's session now).
    pub fn fence(&self) -> Fence {
        self.lock.as_ref().map_or(self.fence, WriterLock::fence)
    }
}

impl Sink for PostgresSink {
    fn name(&self) -> &'static str {
        NAME
    }

    fn is_system_of_record(&self) -> bool {
        true
    }

    fn commit(&mut self, output: Arc<EpochOutput>) -> SinkFuture<'_> {
        Box::pin(async move {
            if self.closed {
                return Err(SinkError::Closed { sink: NAME });
            }
            if output.restored {
                // Hydration's epoch restates what this database holds (it was read from
                // here): writing it again would only log its geofence state as new
                // transitions.
                return Ok(());
            }
            self.write(&output).await
        })
    }

    fn close(&mut self) -> SinkFuture<'_> {
        Box::pin(async move {
            self.closed = true;
            self.pool.close().await;
            // Last: a standby may take over only once nothing more is written.
            if let Some(lock) = self.lock.take() {
                lock.release().await;
            }
            Ok(())
        })
    }
}

/// A failed commit as the driver sees it: retry, isolate the refused data, or give up.
///
/// Only a data exception (SQLSTATE class `22`, e.g. `22P05` a NUL in text) or an integrity
/// constraint violation (class `23`, e.g. `23514` a `CHECK`) blames the data: those are
/// [`SinkError::Rejected`] with the SQLSTATE as code, and the driver isolates the event.
/// Any other permanent failure (a missing table, a broken statement) would refuse every
/// event alike, so it is [`SinkError::Failed`] and stops the pipeline instead of
/// dead-lettering everything.
fn commit_error(epoch: Epoch, error: sqlx::Error) -> SinkError {
    let data_code = match &error {
        sqlx::Error::Database(db) => db
            .code()
            .filter(|code| code.starts_with("22") || code.starts_with("23"))
            .map(|code| code.into_owned()),
        _ => None,
    };
    match service::classify(&error) {
        Failure::Transient => SinkError::Unavailable {
            sink: NAME,
            source: Box::new(error),
        },
        Failure::Permanent => match data_code {
            Some(code) => SinkError::Rejected {
                sink: NAME,
                epoch,
                code,
                source: Box::new(error),
            },
            None => SinkError::Failed {
                sink: NAME,
                epoch,
                source: Box::new(error),
            },
        },
        Failure::Closed => SinkError::Closed { sink: NAME },
    }
}

fn unavailable(error: PostgresError) -> SinkError {
    SinkError::Unavailable {
        sink: NAME,
        source: BoxError::from(Box::new(error)),
    }
}

/// An error reading the database at open, naming it: schema missing, or unreachable.
fn open_error(error: PostgresError, target: String) -> PostgresError {
    match error {
        PostgresError::Query(source) if classify_is_schema(&source) => {
            PostgresError::NotMigrated { target, source }
        }
        PostgresError::Query(source) => PostgresError::Unreachable { target, source },
        other => other,
    }
}

/// Is this the error of a table or column that is not there: the schema is missing.
fn classify_is_schema(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code == "42P01" || code == "42703" || code == "3F000"),
        _ => false,
    }
}

/// `user@host:port/db` of a pool's connections.
fn pool_target(pool: &PgPool) -> String {
    let options = pool.connect_options();
    format!(
        "{}@{}:{}/{}",
        options.get_username(),
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or(options.get_username()),
    )
}
