//! The state every handler shares.

use std::sync::Arc;
use std::time::Duration;

use delivertrack_dataflow::contract::ContractLimits;
use delivertrack_sinks::ReadModel;
use prometheus::Registry;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::auth::{AuthConfig, Authenticator};
use crate::commands::EventPublisher;
use crate::metrics::ApiMetrics;
use crate::origin::AllowedOrigins;
use crate::rate_limit::RateLimiter;
use crate::readiness::Readiness;

/// Limits and timings of the API.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// A request that takes longer is answered `408`. WebSocket sessions are not
    /// requests: only their upgrade is.
    pub request_timeout: Duration,
    /// How often a WebSocket peer is pinged; one that answered nothing for two intervals
    /// is closed as dead.
    pub ws_ping_interval: Duration,
    /// A WebSocket message the peer does not take within this time closes the session:
    /// a stuck peer never holds resources for long.
    pub ws_send_timeout: Duration,
    /// How long a write route may wait for its event's publisher confirm (or the demo's
    /// channel) before answering `503 commands_unavailable`.
    pub command_publish_timeout: Duration,
    /// Read-your-writes: how long a write route waits, after the confirm, for the pipeline
    /// to apply its event before answering `202 Accepted` instead of the applied view.
    /// With [`command_publish_timeout`](Self::command_publish_timeout) it must stay below
    /// [`request_timeout`](Self::request_timeout).
    pub command_wait: Duration,
    /// The origins, besides the API's own, whose pages may open its WebSockets
    /// (`--allowed-origins`; [`crate::origin`]).
    pub allowed_origins: AllowedOrigins,
    /// Whether the API's router serves `GET /metrics`; `false` when `--metrics-listen`
    /// serves it on an address of its own ([`crate::metrics::serve`]).
    pub metrics_on_api: bool,
    /// A request's head (request line and headers) must arrive within this time of the
    /// connection's accept, or of its first byte on a kept-alive connection; otherwise the
    /// connection is closed (slow-loris). `--http-header-timeout-secs`.
    pub http_header_timeout: Duration,
    /// A kept-alive connection with no request in progress is closed after this long.
    /// `--http-idle-timeout-secs`.
    pub http_idle_timeout: Duration,
    /// Connections served at once (WebSocket sessions included); further ones wait in the
    /// listen backlog until one closes. `--max-connections`.
    pub max_connections: usize,
    /// The largest WebSocket message (and frame) a client may send; a larger one closes the
    /// session with 1009. `--ws-max-message-bytes`.
    pub ws_max_message_bytes: usize,
    /// Subscriptions open at once on one GraphQL WebSocket; the next is refused with
    /// `TOO_MANY_SUBSCRIPTIONS`. `--graphql-max-subscriptions`.
    pub graphql_max_subscriptions: usize,
    /// The event contract's limits a command's event is decoded with: the same as the
    /// pipeline's source applies (`--max-event-age-secs`), so that the API never publishes
    /// an event ingest would dead-letter at decoding.
    pub contract: ContractLimits,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(10),
            ws_ping_interval: Duration::from_secs(15),
            ws_send_timeout: Duration::from_secs(10),
            command_publish_timeout: Duration::from_secs(4),
            command_wait: Duration::from_secs(5),
            allowed_origins: AllowedOrigins::SameOrigin,
            metrics_on_api: true,
            http_header_timeout: Duration::from_secs(10),
            http_idle_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            ws_max_message_bytes: 64 * 1024,
            graphql_max_subscriptions: 16,
            contract: ContractLimits::default(),
        }
    }
}

/// What every handler gets: cheap to clone, shared by all requests.
#[derive(Clone, Debug)]
pub struct AppState {
    /// Current state of the pipeline's collections, and its live stream.
    pub read_model: ReadModel,
    /// Limits and timings.
    pub config: ApiConfig,
    /// Fires once at shutdown: the server stops accepting and WebSocket sessions close
    /// with a final close frame.
    pub shutdown: CancellationToken,
    /// Whether the pipeline's source is connected, for `/readyz`.
    pub readiness: Readiness,
    /// What `/metrics` renders; the pipeline's parts register their metrics in it.
    pub registry: Registry,
    /// Verifies the bearer tokens of protected routes.
    pub auth: Authenticator,
    /// The system of record, for what the read model does not hold: courier and customer
    /// profiles, and deliveries the read model has not (yet) seen. `None`: routes that need
    /// it answer `503 store_unavailable`, and delivery reads use the read model alone.
    pub records: Option<PgPool>,
    /// The API's own metrics, registered in [`registry`](Self::registry).
    pub metrics: ApiMetrics,
    /// The rate limits (per courier, per customer, per API key); its metrics are
    /// registered in [`registry`](Self::registry).
    pub limiter: RateLimiter,
    /// Where the write routes publish their events; `None`: they answer
    /// `503 commands_unavailable`.
    pub commands: Option<Arc<dyn EventPublisher>>,
}

impl AppState {
    /// State over a read model, with the default [`ApiConfig`], a source that is always
    /// connected, an empty registry, and tokens signed with a random secret of this
    /// process (replace it with [`with_auth`](Self::with_auth)).
    pub fn new(read_model: ReadModel, shutdown: CancellationToken) -> Self {
        let random = AuthConfig {
            secret: format!("{}{}", uuid::Uuid::new_v4(), uuid::Uuid::new_v4()),
            expiry: Duration::from_secs(3600),
        };
        #[allow(clippy::expect_used)]
        let auth = Authenticator::new(&random).expect("a 72-character secret is usable");
        let registry = Registry::new();
        let metrics = ApiMetrics::new();
        register(&metrics, &registry);
        let limiter = RateLimiter::default();
        register_limiter(&limiter, &registry);
        Self {
            read_model,
            config: ApiConfig::default(),
            shutdown,
            readiness: Readiness::always_connected(),
            registry,
            auth,
            records: None,
            metrics,
            limiter,
            commands: None,
        }
    }

    /// The same state publishing the write routes' events through `publisher`.
    pub fn with_commands(mut self, publisher: Arc<dyn EventPublisher>) -> Self {
        self.commands = Some(publisher);
        self
    }

    /// The same state reading records from PostgreSQL through `pool`.
    pub fn with_records(mut self, pool: PgPool) -> Self {
        self.records = Some(pool);
        self
    }

    /// The same state verifying tokens with `auth`.
    pub fn with_auth(mut self, auth: Authenticator) -> Self {
        self.auth = auth;
        self
    }

    /// The same state with another readiness probe.
    pub fn with_readiness(mut self, readiness: Readiness) -> Self {
        self.readiness = readiness;
        self
    }

    /// The same state serving another registry on `/metrics`, with the API's own metrics
    /// registered in it.
    pub fn with_registry(mut self, registry: Registry) -> Self {
        register(&self.metrics, &registry);
        register_limiter(&self.limiter, &registry);
        self.registry = registry;
        self
    }

    /// The same state enforcing the limits of `limiter` (in-process with the defaults
    /// otherwise), whose metrics replace the previous limiter's in the registry.
    pub fn with_limiter(mut self, limiter: RateLimiter) -> Self {
        // The previous limiter's metrics have the same names: they make room.
        let _ = self.limiter.unregister(&self.registry);
        register_limiter(&limiter, &self.registry);
        self.limiter = limiter;
        self
    }

    /// The same state with another configuration.
    pub fn with_config(mut self, config: ApiConfig) -> Self {
        self.config = config;
        self
    }
}

/// Registers the API's metrics in `registry`; a registry that has them already (the same
/// one given twice) keeps them.
fn register(metrics: &ApiMetrics, registry: &Registry) {
    match metrics.register(registry) {
        Ok(()) | Err(prometheus::Error::AlreadyReg) => {}
        Err(error) => tracing::warn!(%error, "The API's metrics could not be registered."),
    }
}

/// Registers a rate limiter's metrics in `registry`, as [`register`] does the API's.
fn register_limiter(limiter: &RateLimiter, registry: &Registry) {
    match limiter.register(registry) {
        Ok(()) | Err(prometheus::Error::AlreadyReg) => {}
        Err(error) => tracing::warn!(%error, "The rate limiter's metrics could not be registered."),
    }
}
