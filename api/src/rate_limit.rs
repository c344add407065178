//! Rate limits: courier location updates, delivery creation per customer, and calls per
//! API key (`X-API-Key`), answered `429 rate_limited` with `Retry-After` when exceeded.
//!
//! # The limits
//! | [`Limit`] | counted per | default | where it is checked |
//! |---|---|---|---|
//! | `location_update` | courier | `2/2s` | the location route, `state.limiter.check(Limit::LocationUpdate, &courier_id.to_string())` |
//! | `delivery_creation` | customer | `10/h` | the delivery creation route, `check(Limit::DeliveryCreation, &customer_id.to_string())` |
//! | `rating` | customer (the delivery's) | `20/h` | the rating route, `check(Limit::Rating, &customer_id.to_string())` |
//! | `api_key` | API key | per key, configured | [`api_key_layer`], on every route |
//!
//! A [`Quota`] of `n/period` lets a burst of `n` requests through at once and then one every
//! `period / n`: the generic cell rate algorithm (GCRA). GCRA keeps one timestamp per key
//! (the "theoretical arrival time" of the next request) instead of a counter and a window,
//! so it has no window edges to game and costs one read and one write per check.
//!
//! # Shared or in-process
//! [`RateLimiter::redis`] keeps the timestamps in Redis so that every API instance enforces
//! the same limit: each check is one Lua script (atomic on the server, which is what makes
//! concurrent instances agree), timed by the Redis server's own clock (`TIME`), so the
//! instances' clocks do not matter. A key is `{key_prefix}{limit}:{key}`
//! (`delivertrack:ratelimit:location_update:{courier id}`) and expires once its timestamp
//! is in the past, when it would no longer refuse anything.
//!
//! [`RateLimiter::in_process`] keeps them in a bounded map in this process: the demo, and
//! deployments without Redis.
//!
//! # When Redis fails
//! A limiter is a guard, not the record, and must not take the API down with it: a check
//! that Redis does not answer (in [`RateLimitConfig::redis_timeout`]) or answers with an
//! error is decided by this instance's in-process limiter instead. During an outage each
//! instance thus enforces the limits on its own (a client spread over `k` instances gets up
//! to `k` times its quota) rather than refusing everything or nothing. Each such check
//! counts in `delivertrack_rate_limit_redis_errors_total`; the outage is logged when it
//! begins and when Redis answers again, not at every request.
//!
//! # API keys
//! [`api_key_layer`] applies to requests that carry `X-API-Key`; a request without one is
//! not limited by key (routes still apply their own limits and authentication):
//! - a key listed in [`RateLimitConfig::api_keys`] is limited by its own quota;
//! - an unlisted key is limited by [`RateLimitConfig::api_key_default`] when it is set,
//!   **one bucket shared by every unlisted key** (a bucket per unlisted key would let a
//!   client mint a fresh key for each request), and refused `401 unauthorized` when it is not;
//! - with no key listed and no default, API-key limits are off and the header is ignored.
//!
//! API keys are secrets: their buckets (in Redis and in process) are named by a SHA-256
//! digest of the key, keys are never logged, and neither the `Debug` of
//! [`RateLimitConfig`] and [`RateLimiter`] nor parse errors show them.
//!
//! # Metrics
//! [`RateLimiter::register`] adds `delivertrack_rate_limited_total{route}` (requests answered
//! `429`, `route` being the limit: `location_update`, `delivery_creation`, `api_key`) and
//! `delivertrack_rate_limit_redis_errors_total`. [`AppState`] registers its limiter's metrics
//! in its registry by itself.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use delivertrack_sinks::RedisConfig;
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::error::ApiError;
use crate::state::AppState;

/// The header that names the caller's API key.
pub const API_KEY_HEADER: &str = "x-api-key";

/// The longest period a quota may have: timestamps are kept in microseconds, and a year
/// keeps every sum far inside what Redis's Lua numbers (doubles) hold exactly.
const MAX_PERIOD: Duration = Duration::from_secs(366 * 24 * 3600);

/// The storage key of the bucket shared by every unlisted API key. Listed keys are stored
/// as hex digests, which never spell this.
const UNLISTED_API_KEYS: &str = "unlisted";

// ---------------------------------------------------------------------------------------
// Quotas
// ---------------------------------------------------------------------------------------

/// `burst` requests per `per`: a burst of `burst` at once, then one every `per / burst`.
///
/// Written `count/period` in configuration ([`FromStr`]): `10/s`, `100/min`, `10/h`,
/// `1000/d`, with an optional multiple of the unit (`5/200ms`, `100/10s`, `20/15min`).
/// Units: `ms`, `s` (`sec`, `second`), `min` (`m`, `minute`), `h` (`hour`), `d` (`day`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Quota {
    /// The period over which `burst` requests are allowed.
    pub per: Duration,
    /// How many requests may come at once, and how many per `per` in the long run.
    pub burst: u32,
}

impl Quota {
    /// `burst` requests per `per`.
    ///
    /// # Errors
    /// [`RateLimitError::InvalidQuota`] as [`validate`](Self::validate) says.
    pub fn new(burst: u32, per: Duration) -> Result<Self, RateLimitError> {
        let quota = Self { per, burst };
        quota.validate()?;
        Ok(quota)
    }

    /// `n` per second.
    pub const fn per_second(n: u32) -> Self {
        Self {
            per: Duration::from_secs(1),
            burst: n,
        }
    }

    /// `n` per minute.
    pub const fn per_minute(n: u32) -> Self {
        Self {
            per: Duration::from_secs(60),
            burst: n,
        }
    }

    /// `n` per hour.
    pub const fn per_hour(n: u32) -> Self {
        Self {
            per: Duration::from_secs(3600),
            burst: n,
        }
    }

    /// The time between two requests in the long run, `per / burst` (the GCRA emission
    /// interval), at least one microsecond.
    pub fn emission_interval(&self) -> Duration {
        Duration::from_micros(self.gcra().interval_us)
    }

    /// Checks that the quota can be enforced: at least one request, a period of at least
    /// one millisecond and at most a year, and at most one request per microsecond.
    ///
    /// # Errors
    /// [`RateLimitError::InvalidQuota`] saying which.
    pub fn validate(&self) -> Result<(), RateLimitError> {
        let invalid = |reason: &str| {
            Err(RateLimitError::InvalidQuota {
                quota: self.to_string(),
                reason: reason.to_owned(),
            })
        };
        if self.burst == 0 {
            return invalid("the count must be at least 1");
        }
        if self.per < Duration::from_millis(1) {
            return invalid("the period must be at least 1 ms");
        }
        if self.per > MAX_PERIOD {
            return invalid("the period must be at most 366 days");
        }
        if self.per.as_micros() < u128::from(self.burst) {
            return invalid("at most one request per microsecond can be counted");
        }
        Ok(())
    }

    /// The quota in the units of the algorithm. Total: a quota that
    /// [`validate`](Self::validate) refuses is clamped (at least one request, one
    /// microsecond apart) rather than turned into a panic.
    fn gcra(&self) -> Gcra {
        let burst = u64::from(self.burst.max(1));
        let per_us = u64::try_from(self.per.min(MAX_PERIOD).as_micros()).unwrap_or(u64::MAX);
        let interval_us = (per_us / burst).max(1);
        Gcra {
            interval_us,
            tolerance_us: interval_us.saturating_mul(burst),
        }
    }
}

/// One unit of the configuration syntax, case-insensitive.
fn parse_unit(name: &str) -> Option<Duration> {
    let unit = match name.to_ascii_lowercase().as_str() {
        "ms" | "msec" | "millisecond" | "milliseconds" => Duration::from_millis(1),
        "s" | "sec" | "secs" | "second" | "seconds" => Duration::from_secs(1),
        "m" | "min" | "mins" | "minute" | "minutes" => Duration::from_secs(60),
        "h" | "hr" | "hour" | "hours" => Duration::from_secs(3600),
        "d" | "day" | "days" => Duration::from_secs(86_400),
        _ => return None,
    };
    Some(unit)
}

impl FromStr for Quota {
    type Err = RateLimitError;

    /// Parses `count/period` (see [`Quota`]).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: &str| RateLimitError::InvalidQuota {
            quota: text.to_owned(),
            reason: reason.to_owned(),
        };
        let (count, period) = text
            .trim()
            .split_once('/')
            .ok_or_else(|| invalid("expected count/period, like 100/min or 10/s"))?;
        let burst: u32 = count
            .trim()
            .parse()
            .map_err(|_| invalid("the count must be a whole number of at most 4294967295"))?;
        let period = period.trim();
        let digits = period
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| invalid("the period needs a unit: ms, s, min, h or d"))?;
        let (multiple, unit) = period.split_at(digits);
        let multiple: u32 = if multiple.is_empty() {
            1
        } else {
            multiple
                .parse()
                .map_err(|_| invalid("the multiple of the unit is too large"))?
        };
        let unit = parse_unit(unit.trim())
            .ok_or_else(|| invalid("unknown unit: expected ms, s, min, h or d"))?;
        let per = unit
            .checked_mul(multiple)
            .ok_or_else(|| invalid("the period is too long"))?;
        let quota = Quota { per, burst };
        quota.validate().map_err(|error| match error {
            RateLimitError::InvalidQuota { reason, .. } => invalid(&reason),
            other => other,
        })?;
        Ok(quota)
    }
}

impl fmt::Display for Quota {
    /// The configuration syntax: `10/s`, `100/min`, `5/200ms`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let units = [
            ("d", Duration::from_secs(86_400)),
            ("h", Duration::from_secs(3600)),
            ("min", Duration::from_secs(60)),
            ("s", Duration::from_secs(1)),
            ("ms", Duration::from_millis(1)),
        ];
        for (name, unit) in units {
            if self.per >= unit && self.per.as_nanos().is_multiple_of(unit.as_nanos()) {
                let multiple = self.per.as_nanos() / unit.as_nanos();
                return if multiple == 1 {
                    write!(f, "{}/{name}", self.burst)
                } else {
                    write!(f, "{}/{multiple}{name}", self.burst)
                };
            }
        }
        write!(f, "{}/{:?}", self.burst, self.per)
    }
}

/// A quota in the algorithm's units, microseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Gcra {
    /// Between two requests in the long run (`T`).
    interval_us: u64,
    /// How far ahead of now the next theoretical arrival may be after a request is let
    /// through: `burst × T`. A request that would push it further is refused.
    tolerance_us: u64,
}

// ---------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------

/// Which limit a check is against; its [`as_str`](Self::as_str) names it in errors, keys
/// and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Limit {
    /// A courier's location updates, per courier.
    LocationUpdate,
    /// Delivery creation, per customer.
    DeliveryCreation,
    /// Every call made with an API key, per key.
    ApiKey,
    /// Ratings, per customer (the rated delivery's customer, whoever sends the rating).
    Rating,
}

impl Limit {
    /// Every limit.
    pub const ALL: [Limit; 4] = [
        Limit::LocationUpdate,
        Limit::DeliveryCreation,
        Limit::ApiKey,
        Limit::Rating,
    ];

    /// `location_update`, `delivery_creation`, `api_key`, `rating`: the `limit` of the error, the
    /// `route` label of the metric and a part of the storage key.
    pub const fn as_str(self) -> &'static str {
        match self {
            Limit::LocationUpdate => "location_update",
            Limit::DeliveryCreation => "delivery_creation",
            Limit::ApiKey => "api_key",
            Limit::Rating => "rating",
        }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The limits, the API keys and where the limiter keeps its state.
///
/// The defaults are the product's: one location update per second per courier (with a
/// burst of two), ten
/// deliveries per hour per customer, no API keys (API-key limits off).
#[derive(Clone, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// Per courier (`DELIVERTRACK_LOCATION_UPDATE_LIMIT`, default `2/2s`: one a second in
    /// the long run, and a burst of two, so that a device sending exactly once a second is
    /// not refused when the network's jitter brings two of its fixes closer than a second).
    pub location_update: Quota,
    /// Per customer (`DELIVERTRACK_DELIVERY_CREATION_LIMIT`, default `10/h`).
    pub delivery_creation: Quota,
    /// Per customer (`DELIVERTRACK_RATING_LIMIT`, default `20/h`): a customer's ratings of
    /// all their deliveries together.
    pub rating: Quota,
    /// The one quota shared by all API keys not listed in [`api_keys`](Self::api_keys)
    /// (`DELIVERTRACK_API_KEY_DEFAULT`). `None`: an unlisted key is refused `401` (while
    /// some key is listed).
    pub api_key_default: Option<Quota>,
    /// Each known API key and its quota (`DELIVERTRACK_API_KEYS`, parsed by
    /// [`parse_api_keys`](Self::parse_api_keys)).
    pub api_keys: HashMap<String, Quota>,
    /// Put before every Redis key (`delivertrack:ratelimit:`), so that deployments and tests
    /// sharing a Redis keep apart.
    pub key_prefix: String,
    /// How long a check waits for Redis before this instance decides it alone: bounded, so
    /// that a Redis that hangs adds at most this much to a request.
    pub redis_timeout: Duration,
    /// The most keys the in-process limiter holds (also the fallback of the Redis one).
    /// Keys whose timestamp has passed are dropped when it is reached; if all are still
    /// live, a new key is let through uncounted (and the fact logged) rather than growing
    /// the map without bound.
    pub in_process_capacity: usize,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            location_update: Quota {
                per: Duration::from_secs(2),
                burst: 2,
            },
            delivery_creation: Quota::per_hour(10),
            rating: Quota::per_hour(20),
            api_key_default: None,
            api_keys: HashMap::new(),
            key_prefix: "delivertrack:ratelimit:".to_owned(),
            redis_timeout: Duration::from_millis(250),
            in_process_capacity: 100_000,
        }
    }
}

impl fmt::Debug for RateLimitConfig {
    /// Shows how many API keys there are, never the keys.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitConfig")
            .field("location_update", &self.location_update)
            .field("delivery_creation", &self.delivery_creation)
            .field("api_key_default", &self.api_key_default)
            .field("api_keys", &format_args!("<{} keys>", self.api_keys.len()))
            .field("key_prefix", &self.key_prefix)
            .field("redis_timeout", &self.redis_timeout)
            .field("in_process_capacity", &self.in_process_capacity)
            .finish()
    }
}

impl RateLimitConfig {
    /// Parses API keys and their quotas: `key1=100/min,key2=10/s`. Entries are separated by
    /// commas; a key is everything before the entry's last `=` (so base64 keys ending in
    /// `=` work), trimmed. Empty entries (a trailing comma) are skipped; an empty text is no
    /// keys.
    ///
    /// # Errors
    /// [`RateLimitError::InvalidApiKeys`] naming the entry by its position (never by its
    /// key, a secret): no `=`, an empty key, a key given twice, or a quota that does not
    /// parse.
    pub fn parse_api_keys(text: &str) -> Result<HashMap<String, Quota>, RateLimitError> {
        let mut keys = HashMap::new();
        for (index, entry) in text.split(',').enumerate() {
            let position = index + 1;
            let invalid = |reason: String| RateLimitError::InvalidApiKeys { position, reason };
            let entry = entry.trim();
            if entry.is_empty() {
                continue;
            }
            let (key, quota) = entry
                .rsplit_once('=')
                .ok_or_else(|| invalid("expected key=count/period".to_owned()))?;
            let key = key.trim();
            if key.is_empty() {
                return Err(invalid("the key is empty".to_owned()));
            }
            if key.chars().any(|c| c.is_control() || c.is_whitespace()) {
                return Err(invalid(
                    "the key holds whitespace or control characters".to_owned(),
                ));
            }
            let quota = quota
                .parse::<Quota>()
                .map_err(|error| invalid(error.to_string()))?;
            if keys.insert(key.to_owned(), quota).is_some() {
                return Err(invalid("the key is listed twice".to_owned()));
            }
        }
        Ok(keys)
    }

    /// The quota of a limit other than [`Limit::ApiKey`] (whose quota depends on the key).
    pub fn quota(&self, limit: Limit) -> Option<Quota> {
        match limit {
            Limit::LocationUpdate => Some(self.location_update),
            Limit::DeliveryCreation => Some(self.delivery_creation),
            Limit::Rating => Some(self.rating),
            Limit::ApiKey => None,
        }
    }

    /// Are API-key limits on: is a key listed, or a default set?
    pub fn api_key_limits_enabled(&self) -> bool {
        !self.api_keys.is_empty() || self.api_key_default.is_some()
    }

    /// Checks every quota, the timeout and the capacity.
    ///
    /// # Errors
    /// [`RateLimitError::InvalidQuota`] (an API key's is named by its quota, not its key),
    /// or [`RateLimitError::InvalidConfig`].
    pub fn validate(&self) -> Result<(), RateLimitError> {
        self.location_update.validate()?;
        self.delivery_creation.validate()?;
        if let Some(quota) = &self.api_key_default {
            quota.validate()?;
        }
        for quota in self.api_keys.values() {
            quota.validate()?;
        }
        if self.redis_timeout.is_zero() {
            return Err(RateLimitError::InvalidConfig(
                "the Redis timeout must be positive".to_owned(),
            ));
        }
        if self.in_process_capacity == 0 {
            return Err(RateLimitError::InvalidConfig(
                "the in-process capacity must be at least 1".to_owned(),
            ));
        }
        Ok(())
    }
}

/// Why a limiter could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RateLimitError {
    /// A quota that does not parse or cannot be enforced.
    #[error("invalid rate limit {quota:?}: {reason}")]
    InvalidQuota {
        /// The quota as written.
        quota: String,
        /// Why.
        reason: String,
    },
    /// An entry of the API-key list that does not parse.
    #[error("invalid API key list, entry {position}: {reason}")]
    InvalidApiKeys {
        /// The entry, counted from 1 (the key itself is a secret and is not shown).
        position: usize,
        /// Why.
        reason: String,
    },
    /// Another setting that cannot work.
    #[error("invalid rate limit configuration: {0}")]
    InvalidConfig(String),
    /// Redis did not accept a connection or did not answer `PING`.
    #[error("cannot connect to Redis at {target} for rate limiting")]
    Unreachable {
        /// `host:port`.
        target: String,
        /// The client's error.
        #[source]
        source: redis::RedisError,
    },
    /// Redis did not answer in time.
    #[error("Redis at {target} did not answer within {timeout:?}")]
    TimedOut {
        /// `host:port`.
        target: String,
        /// The time allowed.
        timeout: Duration,
    },
}

// ---------------------------------------------------------------------------------------
// The limiter
// ---------------------------------------------------------------------------------------

/// Checks requests against the configured limits; cheap to clone (one shared state).
#[derive(Clone, Debug)]
pub struct RateLimiter {
    inner: Arc<Inner>,
}

struct Inner {
    config: RateLimitConfig,
    /// The listed API keys with the id they are stored under.
    api_keys: HashMap<String, ApiKeyEntry>,
    /// `None`: in-process only.
    redis: Option<RedisBackend>,
    /// The in-process limiter: the only one, or the Redis one's fallback.
    local: LocalLimiter,
    metrics: Metrics,
}

/// A listed API key's quota and storage id. The key itself is the map's key: `Debug` of
/// [`Inner`] does not show the map.
#[derive(Debug)]
struct ApiKeyEntry {
    quota: Quota,
    /// The hex SHA-256 digest of the key (its first 16 bytes): what is stored instead of
    /// the key, the same in every instance.
    id: String,
}

impl fmt::Debug for Inner {
    /// The configuration (without API keys), the backend and the in-process map's size.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("config", &self.config)
            .field("redis", &self.redis)
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

/// What a check decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Decision {
    Allowed,
    Refused { retry_after: Duration },
}

impl RateLimiter {
    /// A limiter keeping its state in this process: for the demo, tests and deployments
    /// without Redis. Several instances of the API do not share it.
    ///
    /// # Errors
    /// What [`RateLimitConfig::validate`] finds.
    pub fn in_process(config: RateLimitConfig) -> Result<Self, RateLimitError> {
        config.validate()?;
        Ok(Self::build(config, None))
    }

    /// A limiter keeping its state in Redis (at `server.host`:`server.port`, connecting
    /// within its `connect_timeout`; its `key_prefix` is not used, the config's is), shared by every
    /// instance using the same Redis and prefix. Connects and checks that Redis answers
    /// (`PING`); afterwards the connection reconnects by itself, and checks Redis cannot
    /// answer are decided in-process (see the module's documentation).
    ///
    /// # Errors
    /// What [`RateLimitConfig::validate`] finds, or [`RateLimitError::Unreachable`] /
    /// [`RateLimitError::TimedOut`] naming the Redis.
    pub async fn redis(
        server: &RedisConfig,
        config: RateLimitConfig,
    ) -> Result<Self, RateLimitError> {
        config.validate()?;
        let target = server.target();
        let unreachable = |source| RateLimitError::Unreachable {
            target: target.clone(),
            source,
        };
        let client =
            redis::Client::open(redis::ConnectionAddr::Tcp(server.host.clone(), server.port))
                .map_err(unreachable)?;
        // No retries inside the manager: a failed check is decided locally at once, and the
        // manager starts reconnecting after each failure by itself.
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(server.connect_timeout))
            .set_response_timeout(Some(config.redis_timeout))
            .set_number_of_retries(0);
        let budget = server.connect_timeout + server.response_timeout;
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
                return Err(RateLimitError::TimedOut {
                    target,
                    timeout: budget,
                });
            }
        };
        let backend = RedisBackend {
            manager,
            script: redis::Script::new(GCRA_SCRIPT),
            target,
            down: AtomicBool::new(false),
        };
        Ok(Self::build(config, Some(backend)))
    }

    fn build(config: RateLimitConfig, redis: Option<RedisBackend>) -> Self {
        let api_keys = config
            .api_keys
            .iter()
            .map(|(key, quota)| {
                let entry = ApiKeyEntry {
                    quota: *quota,
                    id: key_id(key),
                };
                (key.clone(), entry)
            })
            .collect();
        let local = LocalLimiter::new(config.in_process_capacity);
        Self {
            inner: Arc::new(Inner {
                api_keys,
                redis,
                local,
                metrics: Metrics::new(),
                config,
            }),
        }
    }

    /// The configuration it enforces.
    pub fn config(&self) -> &RateLimitConfig {
        &self.inner.config
    }

    /// Is the state kept in Redis, shared by every instance?
    pub fn is_shared(&self) -> bool {
        self.inner.redis.is_some()
    }

    /// Counts one request against `limit` for `key` (a courier's or customer's id; for
    /// [`Limit::ApiKey`], the API key itself, as [`check_api_key`](Self::check_api_key)).
    ///
    /// # Errors
    /// [`ApiError::RateLimited`] with the limit's name and when a retry would pass; for
    /// [`Limit::ApiKey`] also what [`check_api_key`](Self::check_api_key) answers.
    pub async fn check(&self, limit: Limit, key: &str) -> Result<(), ApiError> {
        let quota = match limit {
            Limit::LocationUpdate => self.inner.config.location_update,
            Limit::DeliveryCreation => self.inner.config.delivery_creation,
            Limit::Rating => self.inner.config.rating,
            Limit::ApiKey => return self.check_api_key(key).await,
        };
        self.enforce(limit, key, quota).await
    }

    /// Counts one call made with API key `api_key` (the policy in the module's
    /// documentation): a listed key against its quota, an unlisted one against the shared
    /// default. With API-key limits off, always passes.
    ///
    /// # Errors
    /// [`ApiError::RateLimited`] (`api_key`), or [`ApiError::Unauthorized`] for an unlisted
    /// key when there is no default.
    pub async fn check_api_key(&self, api_key: &str) -> Result<(), ApiError> {
        let config = &self.inner.config;
        if !config.api_key_limits_enabled() {
            return Ok(());
        }
        if let Some(entry) = self.inner.api_keys.get(api_key) {
            return self.enforce(Limit::ApiKey, &entry.id, entry.quota).await;
        }
        match config.api_key_default {
            Some(quota) => self.enforce(Limit::ApiKey, UNLISTED_API_KEYS, quota).await,
            None => Err(ApiError::Unauthorized {
                reason: "the X-API-Key is not known".to_owned(),
            }),
        }
    }

    async fn enforce(&self, limit: Limit, key: &str, quota: Quota) -> Result<(), ApiError> {
        let gcra = quota.gcra();
        let decision = match &self.inner.redis {
            Some(redis) => match redis.decide(&self.inner.config, limit, key, gcra).await {
                Ok(decision) => decision,
                Err(()) => {
                    self.inner.metrics.redis_errors.inc();
                    self.inner.local.decide(limit, key, gcra)
                }
            },
            None => self.inner.local.decide(limit, key, gcra),
        };
        match decision {
            Decision::Allowed => Ok(()),
            Decision::Refused { retry_after } => {
                self.inner
                    .metrics
                    .rate_limited
                    .with_label_values(&[limit.as_str()])
                    .inc();
                Err(ApiError::RateLimited {
                    limit: limit.as_str(),
                    retry_after,
                })
            }
        }
    }

    /// Registers `delivertrack_rate_limited_total{route}` and
    /// `delivertrack_rate_limit_redis_errors_total` in `registry`.
    ///
    /// # Errors
    /// The registry refused one (a metric of the same name is there already).
    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        let metrics = &self.inner.metrics;
        registry.register(Box::new(metrics.rate_limited.clone()))?;
        registry.register(Box::new(metrics.redis_errors.clone()))
    }

    /// Takes this limiter's metrics out of `registry` (when it is replaced by another).
    ///
    /// # Errors
    /// The registry does not hold them.
    pub fn unregister(&self, registry: &Registry) -> prometheus::Result<()> {
        let metrics = &self.inner.metrics;
        let first = registry.unregister(Box::new(metrics.rate_limited.clone()));
        let second = registry.unregister(Box::new(metrics.redis_errors.clone()));
        first.and(second)
    }
}

impl Default for RateLimiter {
    /// In-process, with the default configuration.
    fn default() -> Self {
        Self::build(RateLimitConfig::default(), None)
    }
}

/// The id an API key is stored under: the first 16 bytes of its SHA-256 digest, in hex.
fn key_id(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    digest
        .iter()
        .take(16)
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

#[derive(Clone, Debug)]
struct Metrics {
    rate_limited: IntCounterVec,
    redis_errors: IntCounter,
}

impl Metrics {
    #[allow(clippy::expect_used)]
    fn new() -> Self {
        // Names, help texts and labels are constants the registry accepts: these cannot
        // fail.
        let rate_limited = IntCounterVec::new(
            Opts::new(
                "delivertrack_rate_limited_total",
                "Requests refused with 429 Too Many Requests, by limit.",
            ),
            &["route"],
        )
        .expect("a valid metric");
        // Every limit's series exists from the start, at zero.
        for limit in Limit::ALL {
            rate_limited.with_label_values(&[limit.as_str()]);
        }
        let redis_errors = IntCounter::new(
            "delivertrack_rate_limit_redis_errors_total",
            "Rate-limit checks that Redis did not answer; each was decided by this instance alone.",
        )
        .expect("a valid metric");
        Self {
            rate_limited,
            redis_errors,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------------------

/// One GCRA check, atomic. `KEYS[1]` the bucket; `ARGV[1]` the emission interval and
/// `ARGV[2]` the tolerance (burst × interval), microseconds. Answers `{1, 0}` (allowed;
/// the new theoretical arrival time stored, expiring when it is reached) or
/// `{0, retry_after_us}` (refused; nothing written).
///
/// Time is the server's (`TIME`), so instances with skewed clocks agree; Redis 7
/// replicates the script's effects, not the script, so reading the clock is allowed.
/// Timestamps are written with `%.0f`: Lua's default number format would round
/// microseconds since 1970 (16 digits) to 14.
const GCRA_SCRIPT: &str = r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then
  tat = now
end
local new_tat = tat + interval
local ahead = new_tat - now
if ahead > tolerance then
  return {0, ahead - tolerance}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil(ahead / 1000))
return {1, 0}
";

struct RedisBackend {
    manager: ConnectionManager,
    script: redis::Script,
    /// `host:port`, for the log.
    target: String,
    /// Is Redis failing now? The outage is logged when this turns, not at every check.
    down: AtomicBool,
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("target", &self.target)
            .field("down", &self.down)
            .finish_non_exhaustive()
    }
}

impl RedisBackend {
    /// Runs the script within the configured timeout. `Err(())`: Redis failed (logged when
    /// the outage begins); the caller decides locally.
    async fn decide(
        &self,
        config: &RateLimitConfig,
        limit: Limit,
        key: &str,
        gcra: Gcra,
    ) -> Result<Decision, ()> {
        let redis_key = format!("{}{}:{key}", config.key_prefix, limit.as_str());
        let mut connection = self.manager.clone();
        let mut invocation = self.script.key(redis_key);
        invocation.arg(gcra.interval_us).arg(gcra.tolerance_us);
        let call = invocation.invoke_async::<(i64, i64)>(&mut connection);
        let outcome = match tokio::time::timeout(config.redis_timeout, call).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err(format!("no answer within {:?}", config.redis_timeout)),
        };
        match outcome {
            Ok((allowed, retry_us)) => {
                if self.down.swap(false, Ordering::Relaxed) {
                    tracing::info!(
                        redis = %self.target,
                        "Redis answers rate-limit checks again; the limits are shared again."
                    );
                }
                if allowed == 1 {
                    Ok(Decision::Allowed)
                } else {
                    let retry_us = u64::try_from(retry_us).unwrap_or(0);
                    Ok(Decision::Refused {
                        retry_after: Duration::from_micros(retry_us),
                    })
                }
            }
            Err(error) => {
                if !self.down.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        redis = %self.target,
                        %error,
                        "Redis cannot answer rate-limit checks; each instance enforces the limits on its own until it does."
                    );
                }
                Err(())
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// In process
// ---------------------------------------------------------------------------------------

/// GCRA over a bounded map of theoretical arrival times.
///
/// A `std` mutex: it is held for one map operation, never across an await. The clock is
/// tokio's, so tests can pause it.
struct LocalLimiter {
    buckets: Mutex<HashMap<String, Instant>>,
    capacity: usize,
    /// Has the map been found full of live keys? Logged when this turns.
    full: AtomicBool,
}

impl fmt::Debug for LocalLimiter {
    /// The map's size, not its up to `capacity` entries.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalLimiter")
            .field("keys", &self.len())
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl LocalLimiter {
    fn new(capacity: usize) -> Self {
        Self {
            buckets: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
            full: AtomicBool::new(false),
        }
    }

    fn decide(&self, limit: Limit, key: &str, gcra: Gcra) -> Decision {
        let now = Instant::now();
        let bucket = format!("{}:{key}", limit.as_str());
        let interval = Duration::from_micros(gcra.interval_us);
        let tolerance = Duration::from_micros(gcra.tolerance_us);
        // A poisoned map is still a map of timestamps: keep using it.
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let tat = buckets
            .get(&bucket)
            .copied()
            .filter(|tat| *tat > now)
            .unwrap_or(now);
        let new_tat = tat + interval;
        let ahead = new_tat - now;
        if ahead > tolerance {
            return Decision::Refused {
                retry_after: ahead - tolerance,
            };
        }
        if !buckets.contains_key(&bucket) && buckets.len() >= self.capacity {
            // Keys whose time has passed refuse nothing: dropping them changes no decision.
            buckets.retain(|_, tat| *tat > now);
            if buckets.len() >= self.capacity {
                if !self.full.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        capacity = self.capacity,
                        "The in-process rate limiter is full of live keys; new keys pass uncounted until some expire."
                    );
                }
                return Decision::Allowed;
            }
            self.full.store(false, Ordering::Relaxed);
        }
        buckets.insert(bucket, new_tat);
        Decision::Allowed
    }

    fn len(&self) -> usize {
        self.buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }
}

// ---------------------------------------------------------------------------------------
// The middleware
// ---------------------------------------------------------------------------------------

/// Limits the calls of each API key (`X-API-Key`), as the module's documentation says:
/// `429 rate_limited` with `Retry-After` over the key's quota, `401 unauthorized` for an
/// unlisted key when there is no default quota, or an `X-API-Key` that is not visible
/// ASCII. Requests without the header pass untouched.
///
/// Installed by [`router`](crate::router) with
/// `axum::middleware::from_fn_with_state(state.clone(), api_key_layer)`.
pub async fn api_key_layer(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    if !state.limiter.config().api_key_limits_enabled() {
        return next.run(request).await;
    }
    let Some(value) = request.headers().get(API_KEY_HEADER) else {
        return next.run(request).await;
    };
    let Ok(api_key) = value.to_str() else {
        return ApiError::Unauthorized {
            reason: "the X-API-Key header must be visible ASCII".to_owned(),
        }
        .into_response();
    };
    match state.limiter.check_api_key(api_key.trim()).await {
        Ok(()) => next.run(request).await,
        Err(error) => error.into_response(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn retry_after(result: Result<(), ApiError>) -> Duration {
        match result {
            Err(ApiError::RateLimited { retry_after, .. }) => retry_after,
            other => panic!("expected 429, got {other:?}"),
        }
    }

    #[test]
    fn quotas_parse_the_configuration_syntax() {
        let cases = [
            ("10/s", 10, Duration::from_secs(1)),
            ("100/min", 100, Duration::from_secs(60)),
            ("100/m", 100, Duration::from_secs(60)),
            ("10/h", 10, Duration::from_secs(3600)),
            ("1000/d", 1000, Duration::from_secs(86_400)),
            (" 5 / 200ms ", 5, Duration::from_millis(200)),
            ("100/10s", 100, Duration::from_secs(10)),
            ("20/15min", 20, Duration::from_secs(900)),
            ("3/hour", 3, Duration::from_secs(3600)),
            ("3/hours", 3, Duration::from_secs(3600)),
            ("2/2Seconds", 2, Duration::from_secs(2)),
            ("7/MIN", 7, Duration::from_secs(60)),
        ];
        for (text, burst, per) in cases {
            let quota: Quota = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(quota, Quota { per, burst }, "{text}");
        }
        assert_eq!(Quota::per_second(1).to_string(), "1/s");
        assert_eq!(Quota::per_hour(10).to_string(), "10/h");
        assert_eq!("5/200ms".parse::<Quota>().unwrap().to_string(), "5/200ms");
        assert_eq!("20/15min".parse::<Quota>().unwrap().to_string(), "20/15min");
        for text in ["1/s", "100/min", "10/h", "5/200ms", "3/2d"] {
            let quota: Quota = text.parse().unwrap();
            assert_eq!(quota.to_string().parse::<Quota>().unwrap(), quota);
        }
    }

    #[test]
    fn bad_quotas_are_refused_with_the_reason() {
        let cases = [
            ("", "count/period"),
            ("10", "count/period"),
            ("ten/s", "whole number"),
            ("-1/s", "whole number"),
            ("0/s", "at least 1"),
            ("10/", "needs a unit"),
            ("10/5", "needs a unit"),
            ("10/fortnight", "unknown unit"),
            ("10/0s", "at least 1 ms"),
            ("10/400d", "at most 366 days"),
            ("4000000/s", "one request per microsecond"),
            ("99999999999/s", "whole number"),
            ("1/99999999999d", "too large"),
        ];
        for (text, reason) in cases {
            let error = text.parse::<Quota>().unwrap_err();
            let message = error.to_string();
            assert!(message.contains(reason), "{text:?}: {message}");
            assert!(matches!(error, RateLimitError::InvalidQuota { .. }));
        }
    }

    #[test]
    fn the_emission_interval_is_the_period_over_the_count() {
        assert_eq!(
            Quota::per_second(1).emission_interval(),
            Duration::from_secs(1)
        );
        assert_eq!(
            Quota::per_hour(10).emission_interval(),
            Duration::from_secs(360)
        );
        assert_eq!(
            "5/200ms".parse::<Quota>().unwrap().emission_interval(),
            Duration::from_millis(40)
        );
        // A quota validate() refuses is clamped, not a panic or a division by zero.
        let zero = Quota {
            per: Duration::ZERO,
            burst: 0,
        };
        assert_eq!(zero.emission_interval(), Duration::from_micros(1));
    }

    #[test]
    fn api_keys_parse_and_errors_never_show_a_key() {
        let keys =
            RateLimitConfig::parse_api_keys(" alpha=100/min, beta==10/s ,gamma=1/h,").unwrap();
        assert_eq!(keys.len(), 3);
        assert_eq!(keys["alpha"], Quota::per_minute(100));
        assert_eq!(keys["beta="], Quota::per_second(10), "base64 padding stays");
        assert_eq!(keys["gamma"], Quota::per_hour(1));
        assert!(RateLimitConfig::parse_api_keys("").unwrap().is_empty());
        assert!(RateLimitConfig::parse_api_keys(" , ").unwrap().is_empty());

        let cases = [
            ("secret-one=10/s,secret-two", 2, "key=count/period"),
            ("=10/s", 1, "empty"),
            ("secret one=10/s", 1, "whitespace"),
            ("secret=10/s,secret=5/s", 2, "twice"),
            ("a=1/s,secret=10/parsec", 2, "unknown unit"),
        ];
        for (text, position, reason) in cases {
            let error = RateLimitConfig::parse_api_keys(text).unwrap_err();
            let message = error.to_string();
            assert!(
                matches!(error, RateLimitError::InvalidApiKeys { position: p, .. } if p == position),
                "{text}: {message}"
            );
            assert!(message.contains(reason), "{text}: {message}");
            assert!(!message.contains("secret"), "{text}: {message}");
        }
    }

    #[test]
    fn the_default_is_the_products_and_debug_hides_keys() {
        let mut config = RateLimitConfig::default();
        config.validate().unwrap();
        assert_eq!(config.location_update, "2/2s".parse().unwrap());
        assert_eq!(
            config.location_update.emission_interval(),
            Quota::per_second(1).emission_interval()
        );
        assert_eq!(config.delivery_creation, Quota::per_hour(10));
        assert!(!config.api_key_limits_enabled());
        config.api_keys = RateLimitConfig::parse_api_keys("hunter2=1/s").unwrap();
        assert!(config.api_key_limits_enabled());
        let debug = format!("{config:?}");
        assert!(
            !debug.contains("hunter2") && debug.contains("<1 keys>"),
            "{debug}"
        );
        let debug = format!("{:?}", RateLimiter::in_process(config).unwrap());
        assert!(!debug.contains("hunter2"), "{debug}");
        assert_eq!(
            key_id("hunter2"),
            "f52fbd32b2b3b86ff88ef6c490628285",
            "the first half of the SHA-256 digest"
        );
    }

    #[test]
    fn invalid_configurations_are_refused() {
        let config = RateLimitConfig {
            delivery_creation: Quota {
                per: Duration::from_secs(1),
                burst: 0,
            },
            ..RateLimitConfig::default()
        };
        assert!(RateLimiter::in_process(config).is_err());
        let config = RateLimitConfig {
            in_process_capacity: 0,
            ..RateLimitConfig::default()
        };
        assert!(RateLimiter::in_process(config).is_err());
    }

    fn limiter(location_update: Quota) -> RateLimiter {
        RateLimiter::in_process(RateLimitConfig {
            location_update,
            ..RateLimitConfig::default()
        })
        .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_passes_then_one_per_interval() {
        let quota: Quota = "5/200ms".parse().unwrap();
        let limiter = limiter(quota);
        for _ in 0..5 {
            limiter.check(Limit::LocationUpdate, "c1").await.unwrap();
        }
        let wait = retry_after(limiter.check(Limit::LocationUpdate, "c1").await);
        assert_eq!(wait, Duration::from_millis(40), "one emission interval");
        // A refused request does not push the next one further out.
        let again = retry_after(limiter.check(Limit::LocationUpdate, "c1").await);
        assert_eq!(again, wait);
        // Another courier has its own bucket.
        limiter.check(Limit::LocationUpdate, "c2").await.unwrap();

        // Just before the interval: still refused, with the rest of the wait.
        tokio::time::advance(Duration::from_millis(30)).await;
        let rest = retry_after(limiter.check(Limit::LocationUpdate, "c1").await);
        assert_eq!(rest, Duration::from_millis(10));
        // After it: exactly one more.
        tokio::time::advance(Duration::from_millis(10)).await;
        limiter.check(Limit::LocationUpdate, "c1").await.unwrap();
        assert!(limiter.check(Limit::LocationUpdate, "c1").await.is_err());
        // After the whole period: the whole burst again, and no more.
        tokio::time::advance(Duration::from_millis(200)).await;
        for _ in 0..5 {
            limiter.check(Limit::LocationUpdate, "c1").await.unwrap();
        }
        assert!(limiter.check(Limit::LocationUpdate, "c1").await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn the_products_limits() {
        let limiter = RateLimiter::default();
        // One location update per second per courier, two at once.
        limiter.check(Limit::LocationUpdate, "c").await.unwrap();
        limiter.check(Limit::LocationUpdate, "c").await.unwrap();
        let wait = retry_after(limiter.check(Limit::LocationUpdate, "c").await);
        assert_eq!(wait, Duration::from_secs(1));
        tokio::time::advance(Duration::from_secs(1)).await;
        limiter.check(Limit::LocationUpdate, "c").await.unwrap();
        let wait = retry_after(limiter.check(Limit::LocationUpdate, "c").await);
        assert_eq!(wait, Duration::from_secs(1));

        // Ten deliveries per hour per customer, then one every six minutes.
        for _ in 0..10 {
            limiter.check(Limit::DeliveryCreation, "k").await.unwrap();
        }
        let error = limiter
            .check(Limit::DeliveryCreation, "k")
            .await
            .unwrap_err();
        assert_eq!(error.code(), "rate_limited");
        assert!(error.to_string().contains("delivery_creation"), "{error}");
        assert_eq!(retry_after(Err(error)), Duration::from_secs(360));
        // The same id under another limit is another bucket.
        limiter.check(Limit::LocationUpdate, "k").await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn api_keys_follow_the_policy() {
        let mut config = RateLimitConfig {
            api_keys: RateLimitConfig::parse_api_keys("gold=3/s,bronze=1/s").unwrap(),
            ..RateLimitConfig::default()
        };
        let limiter = RateLimiter::in_process(config.clone()).unwrap();
        for _ in 0..3 {
            limiter.check_api_key("gold").await.unwrap();
        }
        assert!(matches!(
            limiter.check(Limit::ApiKey, "gold").await,
            Err(ApiError::RateLimited {
                limit: "api_key",
                ..
            })
        ));
        limiter.check_api_key("bronze").await.unwrap();
        // Unlisted, no default: refused.
        let error = limiter.check_api_key("stolen").await.unwrap_err();
        assert_eq!(error.status().as_u16(), 401);

        // With a default, unlisted keys share one bucket.
        config.api_key_default = Some(Quota::per_second(2));
        let limiter = RateLimiter::in_process(config).unwrap();
        limiter.check_api_key("new-1").await.unwrap();
        limiter.check_api_key("new-2").await.unwrap();
        assert!(limiter.check_api_key("new-3").await.is_err());
        limiter.check_api_key("gold").await.unwrap();

        // No keys at all: the limit is off.
        let off = RateLimiter::default();
        for _ in 0..100 {
            off.check_api_key("anything").await.unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_map_is_bounded_and_expired_keys_are_dropped() {
        let limiter = RateLimiter::in_process(RateLimitConfig {
            in_process_capacity: 10,
            ..RateLimitConfig::default()
        })
        .unwrap();
        for courier in 0..10 {
            limiter
                .check(Limit::LocationUpdate, &courier.to_string())
                .await
                .unwrap();
        }
        // Full of live keys: a new key passes uncounted, the map does not grow.
        for _ in 0..3 {
            limiter.check(Limit::LocationUpdate, "late").await.unwrap();
        }
        assert_eq!(limiter.inner.local.len(), 10);
        // Known keys are still limited (the burst of two, then a refusal).
        limiter.check(Limit::LocationUpdate, "3").await.unwrap();
        assert!(limiter.check(Limit::LocationUpdate, "3").await.is_err());

        // Once their time has passed, they make room.
        tokio::time::advance(Duration::from_secs(3)).await;
        limiter.check(Limit::LocationUpdate, "late").await.unwrap();
        assert_eq!(limiter.inner.local.len(), 1);
        limiter.check(Limit::LocationUpdate, "late").await.unwrap();
        assert!(limiter.check(Limit::LocationUpdate, "late").await.is_err());
    }

    #[test]
    fn limits_have_stable_names() {
        let names: Vec<_> = Limit::ALL.iter().map(|l| l.as_str()).collect();
        assert_eq!(
            names,
            ["location_update", "delivery_creation", "api_key", "rating"]
        );
    }
}
