//! Helpers for tests against the real RabbitMQ (cargo feature `test-support`, never in
//! release builds).
//!
//! - [`unique_config`] gives a test its own exchange and queue names, so tests run in
//!   parallel on one broker; [`delete_topology`] removes them afterwards, and
//!   [`TopologyGuard`] does so when dropped, even if the test panics.
//! - [`TcpProxy`] sits between a test's pipeline and the broker, so a test can cut *its own*
//!   connection (a broker restart, seen from the client) without disturbing parallel tests.

use std::net::SocketAddr;
use std::time::Duration;

use lapin::options::{ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::rabbitmq::RabbitConfig;

/// The broker the tests use: `RABBITMQ_URL`, or the local default.
pub fn rabbitmq_url() -> String {
    std::env::var("RABBITMQ_URL")
        .ok()
        .filter(|url| !url.trim().is_empty())
        .unwrap_or_else(|| RabbitConfig::default().url)
}

/// A configuration on [`rabbitmq_url`] whose exchange, queues and connection name carry
/// `test` and a random suffix, with a small prefetch and a quick reconnect backoff.
pub fn unique_config(test: &str) -> RabbitConfig {
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let name = |what: &str| format!("delivertrack.test.{test}.{what}.{suffix}");
    RabbitConfig {
        url: rabbitmq_url(),
        exchange: name("events"),
        queue: name("ingest"),
        dead_letter_exchange: name("dead-x"),
        dead_letter_queue: name("dead"),
        prefetch: 100,
        connection_name: format!("delivertrack-test-{test}-{suffix}"),
        reconnect_min: Duration::from_millis(50),
        reconnect_max: Duration::from_millis(500),
        connect_timeout: Duration::from_secs(10),
        confirm_timeout: Duration::from_secs(10),
        ..RabbitConfig::default()
    }
}

/// Deletes the exchanges and queues of `config` (what is missing is skipped). Failures are
/// logged, not returned: a test that cleans up should not fail on the cleaning.
pub async fn delete_topology(config: &RabbitConfig) {
    let connection = match Connection::connect(&config.url, ConnectionProperties::default()).await {
        Ok(connection) => connection,
        Err(error) => {
            tracing::warn!(%error, "Could not connect to RabbitMQ to delete a test topology.");
            return;
        }
    };
    // A failed delete closes its channel, so each one gets its own.
    for queue in [&config.queue, &config.dead_letter_queue] {
        if let Ok(channel) = connection.create_channel().await
            && let Err(error) = channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await
        {
            tracing::warn!(%error, queue, "Could not delete a test queue.");
        }
    }
    for exchange in [&config.exchange, &config.dead_letter_exchange] {
        if let Ok(channel) = connection.create_channel().await
            && let Err(error) = channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await
        {
            tracing::warn!(%error, exchange, "Could not delete a test exchange.");
        }
    }
    let _ = connection.close(200, "test topology deleted".into()).await;
}

/// Deletes a test's topology when dropped — also when the test panics half-way, so a
/// failing test leaves nothing behind either. Keep it alive for the whole test:
/// `let _cleanup = TopologyGuard::new(&config);`.
#[derive(Debug)]
pub struct TopologyGuard {
    config: RabbitConfig,
}

impl TopologyGuard {
    /// Guards the topology of `config`.
    pub fn new(config: &RabbitConfig) -> Self {
        Self {
            config: config.clone(),
        }
    }
}

impl Drop for TopologyGuard {
    fn drop(&mut self) {
        // Drop cannot await, and the test's runtime may be the one unwinding: delete from a
        // thread with its own small runtime, and wait for it.
        let config = self.config.clone();
        let deleting =
            std::thread::spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime.block_on(delete_topology(&config)),
                    Err(error) => {
                        tracing::warn!(%error, "No runtime to delete a test topology.");
                    }
                }
            });
        let _ = deleting.join();
    }
}

/// Messages ready in `queue`, not counting delivered and unacknowledged ones (a passive
/// declare on `channel`).
///
/// # Errors
/// The queue does not exist, or the channel failed.
pub async fn ready_messages(channel: &Channel, queue: &str) -> lapin::Result<u32> {
    let options = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let queue = channel
        .queue_declare(queue.into(), options, FieldTable::default())
        .await?;
    Ok(queue.message_count())
}

/// The socket address of the broker in `url` (default port 5672), resolved.
///
/// # Errors
/// The host does not resolve.
pub async fn broker_addr(url: &str) -> std::io::Result<SocketAddr> {
    let (host, port) = authority(url);
    tokio::net::lookup_host((host.as_str(), port))
        .await?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("{host} does not resolve")))
}

/// `url` with its host and port replaced by `addr` (credentials and vhost kept): the URL of
/// the broker through a [`TcpProxy`].
pub fn url_via(url: &str, addr: SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("amqp", url));
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let userinfo = authority
        .rfind('@')
        .map(|at| &authority[..=at])
        .unwrap_or("");
    format!("{scheme}://{userinfo}{addr}{path}")
}

fn authority(url: &str) -> (String, u16) {
    const AMQP_PORT: u16 = 5672;
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    let host_port = authority
        .rfind('@')
        .map_or(authority, |at| &authority[at + 1..]);
    if let Some(bracketed) = host_port.strip_prefix('[')
        && let Some((host, after)) = bracketed.split_once(']')
    {
        let port = after.strip_prefix(':').and_then(|p| p.parse().ok());
        return (host.to_owned(), port.unwrap_or(AMQP_PORT));
    }
    match host_port.rsplit_once(':') {
        Some((host, port)) => (host.to_owned(), port.parse().unwrap_or(AMQP_PORT)),
        None => (host_port.to_owned(), AMQP_PORT),
    }
}

/// A TCP proxy to one upstream address that a test can cut and restore.
///
/// Cutting drops every open connection at once (the client sees the socket close, as on a
/// broker restart) and refuses new ones until [`TcpProxy::restore`]. Dropping the proxy
/// stops it and closes what is still open.
#[derive(Debug)]
pub struct TcpProxy {
    addr: SocketAddr,
    /// `true` while cut. Every connection task watches it (and ends when the proxy is
    /// dropped, which drops the sender).
    cut: watch::Sender<bool>,
    accept: JoinHandle<()>,
}

impl TcpProxy {
    /// Listens on an ephemeral port of 127.0.0.1 and forwards every connection to
    /// `upstream`.
    ///
    /// # Errors
    /// The listening socket could not be bound.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<TcpProxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (cut, cut_rx) = watch::channel(false);
        let accept = tokio::spawn(accept_loop(listener, upstream, cut_rx));
        Ok(TcpProxy { addr, cut, accept })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every open connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, cut: watch::Receiver<bool>) {
    loop {
        let Ok((mut client, _)) = listener.accept().await else {
            continue;
        };
        if *cut.borrow() {
            // Refused: the client sees the connection close before any byte.
            let _ = client.shutdown().await;
            continue;
        }
        tokio::spawn(forward(client, upstream, cut.clone()));
    }
}

/// Copies both ways until either side closes or the proxy is cut (or dropped).
async fn forward(mut client: TcpStream, upstream: SocketAddr, mut cut: watch::Receiver<bool>) {
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = cut.wait_for(|cut| *cut) => {}
    }
    // Dropping both streams closes them.
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[test]
    fn urls_are_split_and_rewritten() {
        assert_eq!(
            authority("amqp://guest:guest@127.0.0.1:5672/%2f"),
            ("127.0.0.1".to_owned(), 5672)
        );
        assert_eq!(authority("amqp://rabbit"), ("rabbit".to_owned(), 5672));
        assert_eq!(
            authority("amqp://u:p@[::1]:5673/v"),
            ("::1".to_owned(), 5673)
        );
        let addr: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        assert_eq!(
            url_via("amqp://guest:guest@127.0.0.1:5672/%2f", addr),
            "amqp://guest:guest@127.0.0.1:40000/%2f"
        );
        assert_eq!(url_via("amqp://rabbit", addr), "amqp://127.0.0.1:40000");
    }

    #[tokio::test]
    async fn the_proxy_forwards_cuts_and_restores() {
        let echo = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let upstream = echo.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = socket.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let proxy = TcpProxy::start(upstream).await.unwrap();
        let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
        client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");

        proxy.cut();
        let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0, "a cut closes the open connection");
        let mut refused = TcpStream::connect(proxy.addr()).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), refused.read(&mut buf))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0, "a cut proxy refuses new connections");

        proxy.restore();
        let mut again = TcpStream::connect(proxy.addr()).await.unwrap();
        again.write_all(b"pong").await.unwrap();
        again.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
    }
}
