//! The I/O of the Redis sink: connecting, turning writes into one pipeline, sending it
//! within a time bound, and which failures a fresh connection may cure.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Pipeline};

use super::cache::Write;
use super::config::RedisConfig;

/// What went wrong talking to Redis.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    /// The configuration cannot work.
    #[error("invalid Redis configuration: {0}")]
    InvalidConfig(String),
    /// Redis did not accept a connection or did not answer the first command.
    #[error("cannot connect to Redis at {target}")]
    Unreachable {
        /// `host:port`.
        target: String,
        /// The client's error.
        #[source]
        source: redis::RedisError,
    },
    /// Redis did not answer within the time allowed.
    #[error("Redis at {target} did not answer within {timeout:?}")]
    TimedOut {
        /// `host:port`.
        target: String,
        /// The time allowed.
        timeout: Duration,
    },
    /// A pipeline failed: the connection broke, or Redis refused a command.
    #[error("writing to Redis at {target} failed")]
    Write {
        /// `host:port`.
        target: String,
        /// The client's error.
        #[source]
        source: redis::RedisError,
    },
}

impl RedisError {
    /// Did the connection itself fail (as opposed to Redis refusing a command)? The
    /// connection manager opens a new connection after such an error, so sending again
    /// right away goes over the new one.
    pub fn is_connection_error(&self) -> bool {
        match self {
            RedisError::Unreachable { .. } | RedisError::TimedOut { .. } => true,
            RedisError::Write { source, .. } => {
                source.is_io_error()
                    || source.is_connection_dropped()
                    || source.is_connection_refusal()
                    || source.is_timeout()
                    || source.is_unrecoverable_error()
            }
            RedisError::InvalidConfig(_) => false,
        }
    }
}

/// A connection to Redis that reconnects by itself, and the bounds of one exchange.
#[derive(Clone)]
pub struct Connection {
    manager: ConnectionManager,
    target: String,
    /// One exchange may first have to wait for a reconnection, then for its reply.
    budget: Duration,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("target", &self.target)
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

/// Connects to Redis and checks that it answers (`PING`), within the configured timeouts.
///
/// The manager is told not to retry a reconnection itself: the sink sends every epoch
/// anyway, and each failed exchange makes the manager start a new attempt, so an extra
/// backoff inside the manager would only hold commits up.
///
/// # Errors
/// [`RedisError::InvalidConfig`], or [`RedisError::Unreachable`] / [`RedisError::TimedOut`]
/// naming the Redis.
pub async fn connect(config: &RedisConfig) -> Result<Connection, RedisError> {
    config.validate()?;
    let target = config.target();
    let unreachable = |source| RedisError::Unreachable {
        target: target.clone(),
        source,
    };
    let client = Client::open(config.address()).map_err(unreachable)?;
    let manager_config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(config.connect_timeout))
        .set_response_timeout(Some(config.response_timeout))
        .set_number_of_retries(0);
    let budget = config.connect_timeout + config.response_timeout;
    let start = async {
        let mut manager = ConnectionManager::new_with_config(client, manager_config).await?;
        redis::cmd("PING")
            .query_async::<String>(&mut manager)
            .await?;
        Ok::<_, redis::RedisError>(manager)
    };
    let manager = match tokio::time::timeout(budget, start).await {
        Ok(Ok(manager)) => manager,
        Ok(Err(source)) => return Err(unreachable(source)),
        Err(_) => {
            return Err(RedisError::TimedOut {
                target,
                timeout: budget,
            });
        }
    };
    Ok(Connection {
        manager,
        target,
        budget,
    })
}

impl Connection {
    /// `host:port`.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Sends one pipeline and waits for its reply, at most the connect and response
    /// timeouts together. If the connection turns out to be broken, the manager has opened
    /// a new one by the time the error comes back, and the pipeline is sent once more over
    /// it (within the same bound): so the first commit after Redis returns goes through,
    /// instead of only discovering that the old connection is dead.
    ///
    /// # Errors
    /// [`RedisError::Write`] or [`RedisError::TimedOut`].
    pub async fn send(&mut self, pipeline: &Pipeline) -> Result<(), RedisError> {
        let target = self.target.clone();
        let manager = &mut self.manager;
        let exchange = async {
            let mut last = None;
            for _ in 0..2 {
                match pipeline.query_async::<()>(manager).await {
                    Ok(()) => return Ok(()),
                    Err(source) => {
                        let error = RedisError::Write {
                            target: target.clone(),
                            source,
                        };
                        if !error.is_connection_error() {
                            return Err(error);
                        }
                        last = Some(error);
                    }
                }
            }
            Err(last.unwrap_or(RedisError::TimedOut {
                target: target.clone(),
                timeout: Duration::ZERO,
            }))
        };
        match tokio::time::timeout(self.budget, exchange).await {
            Ok(result) => result,
            Err(_) => Err(RedisError::TimedOut {
                target,
                timeout: self.budget,
            }),
        }
    }
}

/// The writes as one `MULTI`/`EXEC` pipeline: one round trip, applied all or nothing.
///
/// `MULTI`/`EXEC` rather than a plain pipeline because a reader must never see half an
/// epoch (a delivery already ended while its customer's history lacks it, a courier moved
/// while its delivery's ETA is the old one), and a pipeline cut off midway must leave
/// nothing of the epoch behind. It costs no extra round trip; it holds other clients off
/// for the time Redis executes the epoch, which for an epoch's few thousand commands is
/// well under a millisecond. It needs every key on one node: a single Redis or a
/// replicated one, not Redis Cluster (whose transactions stay within one hash slot).
pub fn pipeline(writes: &[Write]) -> Pipeline {
    let mut pipe = redis::pipe();
    pipe.atomic();
    for write in writes {
        match write {
            Write::Set { key, value, ttl_ms } => {
                pipe.cmd("SET")
                    .arg(key)
                    .arg(value)
                    .arg("PX")
                    .arg(*ttl_ms)
                    .ignore();
            }
            Write::Del { key } => {
                pipe.cmd("DEL").arg(key).ignore();
            }
            Write::History {
                key,
                add,
                remove,
                keep,
                ttl_ms,
            } => {
                if !add.is_empty() {
                    let cmd = pipe.cmd("ZADD").arg(key);
                    for (score, member) in add {
                        cmd.arg(*score).arg(member);
                    }
                    cmd.ignore();
                }
                if !remove.is_empty() {
                    pipe.cmd("ZREM").arg(key).arg(remove).ignore();
                }
                // Ranks count from the lowest score, the oldest delivery: removing ranks
                // 0 ..= -(keep + 1) keeps the newest `keep`.
                let last_dropped = -i64::try_from(*keep).unwrap_or(i64::MAX - 1) - 1;
                pipe.cmd("ZREMRANGEBYRANK")
                    .arg(key)
                    .arg(0)
                    .arg(last_dropped)
                    .ignore();
                pipe.cmd("PEXPIRE").arg(key).arg(*ttl_ms).ignore();
            }
        }
    }
    pipe
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn commands(pipe: &Pipeline) -> String {
        String::from_utf8_lossy(&pipe.get_packed_pipeline())
            .split("\r\n")
            .filter(|part| !part.starts_with(['*', '$']))
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn writes_become_one_transaction() {
        let pipe = pipeline(&[
            Write::Set {
                key: "p:courier:1:location".to_owned(),
                value: "{}".to_owned(),
                ttl_ms: 15_000,
            },
            Write::Del {
                key: "p:delivery:2".to_owned(),
            },
            Write::History {
                key: "p:customer:3:deliveries".to_owned(),
                add: vec![(1_000, "a".to_owned()), (2_000, "b".to_owned())],
                remove: vec!["c".to_owned()],
                keep: 100,
                ttl_ms: 60_000,
            },
        ]);
        assert_eq!(
            commands(&pipe),
            "MULTI SET p:courier:1:location {} PX 15000 DEL p:delivery:2 \
             ZADD p:customer:3:deliveries 1000 a 2000 b ZREM p:customer:3:deliveries c \
             ZREMRANGEBYRANK p:customer:3:deliveries 0 -101 \
             PEXPIRE p:customer:3:deliveries 60000 EXEC "
        );
    }

    #[test]
    fn a_refused_command_is_not_a_connection_error() {
        let refused = RedisError::Write {
            target: "h:1".to_owned(),
            source: redis::RedisError::from((redis::ErrorKind::Client, "WRONGTYPE")),
        };
        assert!(!refused.is_connection_error());
        let broken = RedisError::Write {
            target: "h:1".to_owned(),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionReset).into(),
        };
        assert!(broken.is_connection_error());
    }
}
