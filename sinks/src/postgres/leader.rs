//! One writer per database (ARCHITECTURE rule 10): the writer lock and the fence.
//!
//! Two processes that commit epochs to the same database lose data: each numbers its
//! epochs on its own, and an epoch of one looks "already committed" to the other. So:
//!
//! - **The lock.** A writer holds the session-level advisory lock [`WRITER_LOCK_KEY`] on a
//!   connection of its own ([`WriterLock`]) for as long as it writes. A second process waits
//!   for it (a hot standby); when the writer dies, PostgreSQL ends its session and releases
//!   the lock, and the standby takes it within one [poll](WriterLock::acquire). Advisory
//!   locks belong to one database, so the key is a constant: one writer per database.
//! - **The fence.** A lock alone cannot stop a writer that lost its lock connection
//!   without noticing (a network partition): the standby takes over while the old writer
//!   still has a pooled connection to commit on. So every takeover bumps a generation in
//!   `pipeline_leader`, and every epoch's transaction first reads that row `FOR SHARE` and
//!   checks that the generation is still its own and its lock is still held
//!   ([`Fence`]). The takeover's bump waits for the epoch in flight; every later epoch of
//!   the old writer is refused ([`Fenced`]) and never acknowledged.

use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use sqlx::postgres::{PgConnection, PgExecutor};
use sqlx::{ConnectOptions, Postgres, Transaction};
use tokio::sync::Mutex;

use super::config::PostgresConfig;
use super::service::{PIPELINE, PostgresError};

/// The advisory lock a writer holds: the bytes `DLVTRACK` as a big-endian `bigint`
/// (4921403412966359883, `0x444C56545241434B`). `pg_locks` shows it as `classid`
/// 1145853524, `objid` 1380008779, `objsubid` 1.
pub const WRITER_LOCK_KEY: i64 = 0x444C_5654_5241_434B;
/// The high half of the key, as `pg_locks.classid` shows it.
const LOCK_CLASSID: i64 = WRITER_LOCK_KEY >> 32;
/// The low half of the key, as `pg_locks.objid` shows it.
const LOCK_OBJID: i64 = WRITER_LOCK_KEY & 0xFFFF_FFFF;

/// What an epoch's transaction checks before it writes anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fence {
    /// The writer generation this sink claimed (`pipeline_leader.generation`).
    pub generation: i64,
    /// The backend of the connection that holds [`WRITER_LOCK_KEY`]; `None` for a sink that
    /// claimed its generation without the lock ([`claim_generation`]: tests, tools).
    pub lock_backend: Option<i32>,
}

/// Why an epoch may not be committed by this writer: it is no longer the writer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Fenced {
    /// Another process took over (it bumped the generation).
    #[error("writer generation {current} took over from this process's generation {own}")]
    Superseded {
        /// This writer's generation.
        own: i64,
        /// The generation now recorded.
        current: i64,
    },
    /// The connection holding the writer lock is gone (its session ended). Retryable: the
    /// lock is taken again on a new connection unless another writer took over
    /// ([`WriterLock::lost`]).
    #[error("this process no longer holds the writer lock (its connection to PostgreSQL is lost)")]
    LockLost,
    /// The progress row is ahead of this epoch and was written by another writer: skipping
    /// the epoch as "already committed" would lose it.
    #[error(
        "the database records epoch {epoch} of writer generation {generation}, not of this process's generation {own}"
    )]
    ForeignProgress {
        /// The recorded epoch.
        epoch: i64,
        /// Who recorded it.
        generation: i64,
        /// This writer's generation.
        own: i64,
    },
    /// `pipeline_leader` has no row: no writer claimed this database.
    #[error("no writer has claimed this database (pipeline_leader is empty)")]
    Unclaimed,
}

/// Claims a new writer generation and returns it: every writer of an older generation is
/// fenced from now on. The bump waits for an older writer's epoch in flight (it holds the
/// row `FOR SHARE`), so what `pipeline_progress` says after this is final.
///
/// # Errors
/// The driver's error (for instance before the migrations).
pub async fn claim_generation<'e>(
    executor: impl PgExecutor<'e>,
    holder: &str,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO pipeline_leader (pipeline, generation, holder) VALUES ($1, 1, $2)
         ON CONFLICT (pipeline) DO UPDATE
             SET generation = pipeline_leader.generation + 1,
                 holder = EXCLUDED.holder,
                 acquired_at = now()
         RETURNING generation",
    )
    .bind(PIPELINE)
    .bind(holder)
    .fetch_one(executor)
    .await
}

/// The fence check, first in an epoch's transaction: the generation is still `fence`'s and
/// its lock is still held. Holds the leader row `FOR SHARE` to the end of the transaction,
/// so that a takeover waits for this epoch rather than racing it.
///
/// # Errors
/// The driver's error; a breached fence is `Ok(Err(..))`.
pub(super) async fn check_fence(
    tx: &mut Transaction<'static, Postgres>,
    fence: Fence,
) -> Result<Result<(), Fenced>, sqlx::Error> {
    let row: Option<(i64, bool)> = sqlx::query_as(
        "SELECT l.generation,
                ($2::int4 IS NULL OR EXISTS (
                    SELECT 1 FROM pg_locks k
                    WHERE k.locktype = 'advisory' AND k.granted AND k.pid = $2
                      AND k.objsubid = 1 AND k.classid::bigint = $3 AND k.objid::bigint = $4
                      AND k.database = (SELECT oid FROM pg_database
                                        WHERE datname = current_database())))
         FROM pipeline_leader l WHERE l.pipeline = $1
         FOR SHARE OF l",
    )
    .bind(PIPELINE)
    .bind(fence.lock_backend)
    .bind(LOCK_CLASSID)
    .bind(LOCK_OBJID)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(match row {
        None => Err(Fenced::Unclaimed),
        Some((current, _)) if current != fence.generation => Err(Fenced::Superseded {
            own: fence.generation,
            current,
        }),
        Some((_, false)) => Err(Fenced::LockLost),
        Some((_, true)) => Ok(()),
    })
}

/// When the progress guard finds the recorded epoch at or past this one: was it this
/// writer's own (a retried commit whose first attempt did commit)? Only then may the epoch
/// be skipped.
///
/// # Errors
/// The driver's error; another writer's progress is `Ok(Err(..))`.
pub(super) async fn own_progress(
    tx: &mut Transaction<'static, Postgres>,
    fence: Fence,
) -> Result<Result<(), Fenced>, sqlx::Error> {
    let (epoch, generation): (i64, i64) =
        sqlx::query_as("SELECT epoch, generation FROM pipeline_progress WHERE pipeline = $1")
            .bind(PIPELINE)
            .fetch_one(&mut **tx)
            .await?;
    Ok(if generation == fence.generation {
        Ok(())
    } else {
        Err(Fenced::ForeignProgress {
            epoch,
            generation,
            own: fence.generation,
        })
    })
}

/// The writer lock, held on a dedicated connection: whoever holds it is the one process
/// that commits to this database. Clones share the connection; [`release`](Self::release)
/// (or the end of the process) lets it go.
///
/// A lost lock connection is not the end by itself: PostgreSQL may have been restarted or
/// the network cut for a while. [`lost`](Self::lost) connects again and takes the lock
/// again if nobody took over meanwhile (the generation is still this writer's); commits
/// wait (retryable [`Fenced::LockLost`]) until it has. Only a takeover ends the writer.
#[derive(Clone)]
pub struct WriterLock {
    /// The session that holds the advisory lock, or why there is none.
    session: Arc<Mutex<Session>>,
    /// The backend pid of the session holding the lock now (it changes when the lock is
    /// taken again on a new connection).
    backend: Arc<AtomicI32>,
    /// The generation claimed at takeover.
    generation: i64,
    /// Where to connect again.
    config: PostgresConfig,
    /// The lock session's `application_name`.
    application_name: String,
    /// `user@host:port/db`, for messages.
    target: String,
}

/// The state of a [`WriterLock`]'s session.
enum Session {
    /// Connected and holding the lock.
    Held(PgConnection),
    /// The connection failed; the lock may be free, or another's.
    Lost,
    /// Let go on purpose.
    Released,
}

impl std::fmt::Debug for WriterLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriterLock")
            .field("fence", &self.fence())
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// What [`WriterLock::lost`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockWatch {
    /// [`WriterLock::release`] let it go: the process is stopping on purpose (or its sink
    /// found itself fenced).
    Released,
    /// Another writer took over: this process must stop writing.
    Lost(Fenced),
}

/// Opens the lock's dedicated session, with server-side TCP keepalives.
async fn connect_session(
    config: &PostgresConfig,
    application_name: &str,
) -> Result<PgConnection, PostgresError> {
    let options = config.connect_options()?.application_name(application_name);
    let attempt = async {
        let mut connection = tokio::time::timeout(config.connect_timeout, options.connect())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)??;
        sqlx::query(
            "SELECT set_config('tcp_keepalives_idle', '10', false),
                    set_config('tcp_keepalives_interval', '5', false),
                    set_config('tcp_keepalives_count', '3', false)",
        )
        .execute(&mut connection)
        .await?;
        Ok::<_, sqlx::Error>(connection)
    };
    attempt.await.map_err(|source| PostgresError::Unreachable {
        target: config.target(),
        source,
    })
}

/// `pg_try_advisory_lock` on the writer key.
async fn try_lock(connection: &mut PgConnection) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(WRITER_LOCK_KEY)
        .fetch_one(connection)
        .await
}

/// The recorded writer generation, `None` without a row.
async fn current_generation(connection: &mut PgConnection) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT generation FROM pipeline_leader WHERE pipeline = $1")
        .bind(PIPELINE)
        .fetch_optional(connection)
        .await
}

impl WriterLock {
    /// Connects to `config`'s database on a dedicated connection and takes the writer lock,
    /// waiting as long as another session holds it (polling every `poll`), then claims a new
    /// generation in the name of `holder` (a sentence naming this process, kept in
    /// `pipeline_leader.holder`). `waiting` is called once, with who holds the lock as far
    /// as PostgreSQL tells, when the lock is not free at the first attempt.
    ///
    /// The session asks the server for TCP keepalives (idle 10 s, then every 5 s, 3 probes),
    /// so that a writer cut off by a partition loses its lock in about 25 s rather than the
    /// system's default two hours. A connection lost while waiting is opened again.
    ///
    /// # Errors
    /// [`PostgresError::InvalidUrl`] or [`PostgresError::Unreachable`] when the first
    /// connection fails; [`PostgresError::Query`] when the lock or the claim fails once held.
    pub async fn acquire(
        config: &PostgresConfig,
        holder: &str,
        poll: Duration,
        mut waiting: impl FnMut(&str),
    ) -> Result<Self, PostgresError> {
        let target = config.target();
        let application_name = application_name(holder);
        let mut connection = connect_session(config, &application_name).await?;
        let mut told = false;
        loop {
            match try_lock(&mut connection).await {
                Ok(true) => break,
                Ok(false) => {
                    if !told {
                        told = true;
                        let holder = describe_holder(&mut connection)
                            .await
                            .unwrap_or_else(|error| {
                                tracing::debug!(%error, "Could not tell who holds the writer lock.");
                                None
                            })
                            .unwrap_or_else(|| "an unknown session".to_owned());
                        waiting(&holder);
                    }
                    tokio::time::sleep(poll).await;
                }
                Err(error) => {
                    tracing::warn!(%error, database = %target, "The connection waiting for the writer lock failed; connecting again.");
                    tokio::time::sleep(poll).await;
                    match connect_session(config, &application_name).await {
                        Ok(again) => connection = again,
                        Err(error) => {
                            tracing::warn!(%error, database = %target, "PostgreSQL cannot be reached while waiting for the writer lock; trying again.");
                        }
                    }
                }
            }
        }
        let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut connection)
            .await
            .map_err(PostgresError::Query)?;
        let generation = claim_generation(&mut connection, holder)
            .await
            .map_err(PostgresError::Query)?;
        Ok(Self {
            session: Arc::new(Mutex::new(Session::Held(connection))),
            backend: Arc::new(AtomicI32::new(backend)),
            generation,
            config: config.clone(),
            application_name,
            target,
        })
    }

    /// What this writer's epochs check before they write (the lock's session now).
    pub fn fence(&self) -> Fence {
        Fence {
            generation: self.generation,
            lock_backend: Some(self.backend.load(Ordering::Acquire)),
        }
    }

    /// Watches the lock every `interval` (each check bounded by `interval` plus 5 s) and
    /// heals a lost session: connects again and takes the lock again while the generation
    /// is still this writer's. Resolves only when another writer took over (or the row is
    /// gone), or when the lock was released on purpose.
    pub async fn lost(&self, interval: Duration) -> LockWatch {
        let superseded = |current: Option<i64>| match current {
            Some(current) => Fenced::Superseded {
                own: self.generation,
                current,
            },
            None => Fenced::Unclaimed,
        };
        loop {
            tokio::time::sleep(interval).await;
            let mut guard = self.session.lock().await;
            match &mut *guard {
                Session::Released => return LockWatch::Released,
                Session::Held(connection) => {
                    let check = current_generation(connection);
                    match tokio::time::timeout(interval + Duration::from_secs(5), check).await {
                        Ok(Ok(Some(current))) if current == self.generation => {}
                        Ok(Ok(current)) => return LockWatch::Lost(superseded(current)),
                        Ok(Err(error)) => {
                            tracing::error!(%error, database = %self.target, "The connection holding the writer lock failed; commits wait until the lock is taken again.");
                            *guard = Session::Lost;
                        }
                        Err(_) => {
                            tracing::error!(database = %self.target, "The connection holding the writer lock does not answer; commits wait until the lock is taken again.");
                            *guard = Session::Lost;
                        }
                    }
                }
                Session::Lost => {
                    let Ok(mut connection) =
                        connect_session(&self.config, &self.application_name).await
                    else {
                        continue;
                    };
                    let locked = try_lock(&mut connection).await;
                    let current = current_generation(&mut connection).await;
                    let backend: Result<i32, _> = sqlx::query_scalar("SELECT pg_backend_pid()")
                        .fetch_one(&mut connection)
                        .await;
                    match (locked, current, backend) {
                        (_, Ok(current), _) if current != Some(self.generation) => {
                            return LockWatch::Lost(superseded(current));
                        }
                        (Ok(true), Ok(_), Ok(backend)) => {
                            self.backend.store(backend, Ordering::Release);
                            *guard = Session::Held(connection);
                            tracing::info!(database = %self.target, generation = self.generation, "This process holds the writer lock again; commits go on.");
                        }
                        // Held by a session of ours that the server has not ended yet, or by
                        // a standby that has not claimed yet: look again.
                        _ => {}
                    }
                }
            }
        }
    }

    /// Lets the lock go (a standby takes over at once) and closes its connection. Safe to
    /// call more than once.
    pub async fn release(&self) {
        let mut guard = self.session.lock().await;
        let Session::Held(mut connection) = std::mem::replace(&mut *guard, Session::Released)
        else {
            return;
        };
        let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(WRITER_LOCK_KEY)
            .execute(&mut connection)
            .await;
        if let Err(error) = unlocked {
            tracing::debug!(%error, "Unlocking the writer lock failed; closing its connection releases it.");
        }
        let _ = sqlx::Connection::close(connection).await;
        tracing::info!(database = %self.target, generation = self.generation, "Released the writer lock.");
    }
}

/// The holder's backend pid, application name, client address and `pipeline_leader.holder`.
type HolderRow = (i32, Option<String>, Option<String>, Option<String>);

/// Who holds the writer lock now: `pipeline_leader.holder` of the last takeover and the
/// holding session's backend pid, application name and address; `None` when nobody does.
async fn describe_holder(connection: &mut PgConnection) -> Result<Option<String>, sqlx::Error> {
    let row: Option<HolderRow> = sqlx::query_as(
        "SELECT k.pid, a.application_name, host(a.client_addr),
                (SELECT holder FROM pipeline_leader WHERE pipeline = $3)
         FROM pg_locks k LEFT JOIN pg_stat_activity a ON a.pid = k.pid
         WHERE k.locktype = 'advisory' AND k.granted AND k.objsubid = 1
           AND k.classid::bigint = $1 AND k.objid::bigint = $2
           AND k.database = (SELECT oid FROM pg_database WHERE datname = current_database())
         LIMIT 1",
    )
    .bind(LOCK_CLASSID)
    .bind(LOCK_OBJID)
    .bind(PIPELINE)
    .fetch_optional(connection)
    .await?;
    Ok(row.map(|(pid, application, client, holder)| {
        let who = holder
            .or(application)
            .unwrap_or_else(|| "a session".to_owned());
        match client {
            Some(client) => format!("{who} (PostgreSQL backend {pid}, from {client})"),
            None => format!("{who} (PostgreSQL backend {pid})"),
        }
    }))
}

/// `application_name` of the lock's session: PostgreSQL keeps 63 bytes of it.
fn application_name(holder: &str) -> String {
    let mut name = format!("delivertrack writer: {holder}");
    while name.len() > 63 {
        name.pop();
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_the_documented_one_and_its_halves_are_what_pg_locks_shows() {
        assert_eq!(WRITER_LOCK_KEY, 4_921_403_412_966_359_883);
        assert_eq!(&WRITER_LOCK_KEY.to_be_bytes(), b"DLVTRACK");
        assert_eq!((LOCK_CLASSID, LOCK_OBJID), (1_145_853_524, 1_380_008_779));
    }

    #[test]
    fn the_application_name_fits_postgres() {
        let long = "x".repeat(200);
        assert_eq!(application_name(&long).len(), 63);
        assert!(application_name("run pid 7").ends_with("run pid 7"));
    }
}
