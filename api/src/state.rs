//! The state every handler shares.

use std::time::Duration;

use delivertrack_sinks::ReadModel;
use prometheus::Registry;
use tokio_util::sync::CancellationToken;

use crate::auth::{AuthConfig, Authenticator};
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
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(10),
            ws_ping_interval: Duration::from_secs(15),
            ws_send_timeout: Duration::from_secs(10),
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
        Self {
            read_model,
            config: ApiConfig::default(),
            shutdown,
            readiness: Readiness::always_connected(),
            registry: Registry::new(),
            auth,
        }
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

    /// The same state serving another registry on `/metrics`.
    pub fn with_registry(mut self, registry: Registry) -> Self {
        self.registry = registry;
        self
    }

    /// The same state with another configuration.
    pub fn with_config(mut self, config: ApiConfig) -> Self {
        self.config = config;
        self
    }
}
