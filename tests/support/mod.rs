//! What the root crate's integration tests share: their own PostgreSQL databases on the
//! local server, Redis keys under a prefix of their own, RabbitMQ publishing and queue
//! depth, bounded polling, the clock.
//!
//! Each test file includes it with `mod support;` and uses what it needs.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use delivertrack_ingest::rabbitmq::{RabbitConfig, declare_topology};
use delivertrack_load_tests::Publisher;
use tokio::time::{Instant, sleep};

use sqlx::Connection;
use sqlx::postgres::{PgConnection, PgPool};
use uuid::Uuid;

/// The secret the pipelines these tests start (in process or as the binary) sign their
/// tokens with: 32 bytes or more, as `run` requires.
pub const JWT_SECRET: &str = "root-tests-jwt-secret-7c1d5e9a0b3f8c27";

/// Token settings of [`JWT_SECRET`], tokens an hour long.
pub fn auth_config() -> delivertrack_api::AuthConfig {
    delivertrack_api::AuthConfig {
        secret: JWT_SECRET.to_owned(),
        expiry: Duration::from_secs(3600),
    }
}

/// A token of `role`, for a new subject, signed with [`JWT_SECRET`].
pub fn token(role: delivertrack_api::Role) -> String {
    delivertrack_api::Authenticator::new(&auth_config())
        .unwrap()
        .issue(role, Uuid::new_v4())
        .unwrap()
}

/// For a test that needs a tool outside the project (schemathesis, chromium): says loudly
/// that it is skipped, or fails when `DELIVERTRACK_TEST_TOOLS=required` — `scripts/test.sh`
/// installs every such tool and sets it, so there a missing tool is a broken set-up.
pub fn skip_without(missing: &str) {
    assert!(
        std::env::var("DELIVERTRACK_TEST_TOOLS").as_deref() != Ok("required"),
        "{missing}, and scripts/test.sh requires it"
    );
    eprintln!("\n\n!!! SKIPPED: {missing} !!!\n\n");
}

/// The server's maintenance database, where test databases are created and dropped.
pub fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// `admin_url` with another database name (and optionally another host:port).
pub fn url_of(database: &str, authority: Option<SocketAddr>) -> String {
    let admin = admin_url();
    let base = admin
        .rsplit_once('/')
        .map_or(admin.as_str(), |(base, _)| base)
        .to_owned();
    let base = match authority {
        Some(addr) => {
            let (scheme_user, _) = base.rsplit_once('@').map_or_else(
                || {
                    (
                        base.split("://").next().unwrap_or("postgres").to_owned() + "://",
                        "",
                    )
                },
                |(user, host)| (format!("{user}@"), host),
            );
            format!("{scheme_user}{addr}")
        }
        None => base,
    };
    format!("{base}/{database}")
}

/// The PostgreSQL server's address, from `admin_url`.
pub fn postgres_addr() -> SocketAddr {
    let admin = admin_url();
    let authority = admin
        .split("://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    let host_port = if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:5432")
    };
    let host_port = host_port.replace("localhost", "127.0.0.1");
    host_port.parse().unwrap()
}

/// A database of this test's own; the binary creates it, [`Database::drop_now`] drops it.
pub struct Database {
    /// The database name.
    pub name: String,
}

impl Database {
    pub fn new(test: &str) -> Self {
        Self {
            name: format!("dt_{test}_{}", Uuid::new_v4().simple()),
        }
    }

    pub fn url(&self) -> String {
        url_of(&self.name, None)
    }

    pub async fn pool(&self) -> PgPool {
        PgPool::connect(&self.url()).await.unwrap()
    }

    pub async fn drop_now(self) {
        let mut admin = PgConnection::connect(&admin_url()).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .execute(&mut admin)
        .await
        .unwrap();
    }
}

pub fn redis_url() -> String {
    let host = std::env::var("REDIS_HOST").unwrap_or_else(|_| "127.0.0.1".to_owned());
    let port = std::env::var("REDIS_PORT").unwrap_or_else(|_| "6379".to_owned());
    format!("redis://{host}:{port}/")
}

pub async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Deletes every key under `prefix`.
pub async fn delete_keys(prefix: &str) {
    let mut redis = redis().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut redis)
        .await
        .unwrap();
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL")
            .arg(keys)
            .query_async(&mut redis)
            .await
            .unwrap();
    }
}

/// Now, Unix milliseconds.
pub fn now_ms() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// A publisher on the broker itself (never through a test's proxy), with the topology
/// declared so that nothing published before the pipeline's own declaration is dropped.
pub async fn publisher(config: &RabbitConfig) -> Publisher {
    let publisher = Publisher::connect(&config.url).await.unwrap();
    declare_topology(publisher.channel(), config).await.unwrap();
    publisher
}

/// Ready messages in `queue` (a passive declare: unacknowledged ones are not counted).
pub async fn ready_messages(publisher: &Publisher, queue: &str) -> u32 {
    delivertrack_ingest::testing::ready_messages(publisher.channel(), queue)
        .await
        .unwrap()
}

/// Takes `count` dead letters off `queue`, acknowledging each, and returns each one's
/// text headers by name (`HEADER_REASON`, `HEADER_STAGE`, ... of the dead-letter module).
pub async fn take_dead_letters(
    publisher: &Publisher,
    queue: &str,
    count: usize,
) -> Vec<BTreeMap<String, String>> {
    use lapin::options::{BasicAckOptions, BasicGetOptions};
    use lapin::types::AMQPValue;
    let mut letters = Vec::with_capacity(count);
    for _ in 0..count {
        let message = publisher
            .channel()
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .unwrap()
            .expect("a dead letter");
        let headers = message
            .delivery
            .properties
            .headers()
            .clone()
            .expect("dead letters carry headers");
        letters.push(
            headers
                .inner()
                .iter()
                .filter_map(|(name, value)| match value {
                    AMQPValue::LongString(text) => Some((name.to_string(), text.to_string())),
                    _ => None,
                })
                .collect(),
        );
        message
            .delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .unwrap();
    }
    letters
}

/// Polls `probe` every 50 ms until it returns `Some`, failing after `patience` with `what`.
pub async fn eventually<T, F, Fut>(what: &str, patience: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + patience;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        sleep(Duration::from_millis(50)).await;
    }
}

/// Reads the banner (the first line on stdout) of a spawned `delivertrack` binary, within
/// `patience`, and returns the address it says it listens on.
pub async fn banner_address(child: &mut tokio::process::Child, patience: Duration) -> SocketAddr {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let stdout = child.stdout.take().expect("the binary's stdout is piped");
    let banner = tokio::time::timeout(patience, BufReader::new(stdout).lines().next_line())
        .await
        .expect("the banner within the bound")
        .expect("stdout is readable")
        .expect("a banner line");
    banner
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("no address in the banner {banner:?}"))
}

/// One sample of the metrics at `url`, by series.
pub async fn scrape(client: &reqwest::Client, url: &str) -> BTreeMap<String, f64> {
    let text = client.get(url).send().await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}
