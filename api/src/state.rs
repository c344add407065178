//! The state every handler shares.

use std::time::Duration;

use delivertrack_sinks::ReadModel;
use prometheus::Registry;
use tokio_util::sync::CancellationToken;

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
}

impl AppState {
    /// State over a read model, with the default [`ApiConfig`], a source that is always
    /// connected and an empty registry.
    pub fn new(read_model: ReadModel, shutdown: CancellationToken) -> Self {
        Self {
            read_model,
            config: ApiConfig::default(),
            shutdown,
            readiness: Readiness::always_connected(),
            registry: Registry::new(),
        }
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
