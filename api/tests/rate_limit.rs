//! Rate limits against the real Redis (`REDIS_HOST`, `REDIS_PORT`; by default
//! `127.0.0.1:6379`), and the `X-API-Key` middleware over real HTTP.
//!
//! Every test keeps its keys under a prefix of its own and deletes them when it ends (also
//! when it fails). Quotas are chosen so that no assertion depends on a tight timing: a
//! refusal is checked well inside its interval, a recovery well after it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use delivertrack_api::rate_limit::api_key_layer;
use delivertrack_api::{ApiError, AppState, Limit, Quota, RateLimitConfig, RateLimiter, router};
use delivertrack_ingest::testing::TcpProxy;
use delivertrack_sinks::{ReadModel, RedisConfig};
use redis::AsyncCommands;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

// ---------------------------------------------------------------------------------------
// Redis: where it is, a prefix per test
// ---------------------------------------------------------------------------------------

fn redis_host() -> String {
    std::env::var("REDIS_HOST").unwrap_or_else(|_| "127.0.0.1".to_owned())
}

fn redis_port() -> u16 {
    std::env::var("REDIS_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(6379)
}

fn server() -> RedisConfig {
    RedisConfig::new(redis_host(), redis_port())
}

fn client() -> redis::Client {
    redis::Client::open(redis::ConnectionAddr::Tcp(redis_host(), redis_port())).unwrap()
}

/// A test's own key prefix; dropping it deletes every key under it.
struct Prefix(String);

impl Prefix {
    fn new(test: &str) -> Self {
        Prefix(format!("test:ratelimit:{test}:{}:", Uuid::new_v4()))
    }

    /// The default limits under this prefix, with `changes` applied.
    fn config(&self, changes: impl FnOnce(&mut RateLimitConfig)) -> RateLimitConfig {
        let mut config = RateLimitConfig {
            key_prefix: self.0.clone(),
            ..RateLimitConfig::default()
        };
        changes(&mut config);
        config
    }

    /// The Redis key of `limit` for `key`, as the module documents it.
    fn key(&self, limit: Limit, key: &str) -> String {
        format!("{}{}:{key}", self.0, limit.as_str())
    }

    async fn keys(&self) -> Vec<String> {
        let mut conn = client().get_multiplexed_async_connection().await.unwrap();
        let mut iter = conn
            .scan_match::<_, String>(format!("{}*", self.0))
            .await
            .unwrap();
        let mut keys = Vec::new();
        while let Some(key) = iter.next_item().await {
            keys.push(key.unwrap());
        }
        keys.sort();
        keys.dedup();
        keys
    }
}

impl Drop for Prefix {
    fn drop(&mut self) {
        let Ok(mut conn) = client().get_connection() else {
            return;
        };
        let keys: Vec<String> = match redis::Commands::scan_match(&mut conn, format!("{}*", self.0))
        {
            Ok(iter) => iter.filter_map(Result::ok).collect(),
            Err(_) => return,
        };
        for chunk in keys.chunks(500) {
            let _: Result<i64, _> = redis::Commands::del(&mut conn, chunk);
        }
    }
}

/// The wait of a 429, failing on anything else.
fn retry_after(result: Result<(), ApiError>) -> Duration {
    match result {
        Err(ApiError::RateLimited { retry_after, .. }) => retry_after,
        other => panic!("expected 429, got {other:?}"),
    }
}

fn metrics_text(registry: &prometheus::Registry) -> String {
    prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap()
}

/// The value of the one series `series` (a name with its labels, as the text format writes
/// it).
fn metric_value(registry: &prometheus::Registry, series: &str) -> f64 {
    let text = metrics_text(registry);
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in {text}"))
        .parse()
        .unwrap()
}

// ---------------------------------------------------------------------------------------
// The limiter on Redis
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn two_instances_share_one_limit() {
    let prefix = Prefix::new("shared");
    // 5 per 10 s: one every 2 s after the burst.
    let quota: Quota = "5/10s".parse().unwrap();
    let config = prefix.config(|c| c.location_update = quota);
    let first = RateLimiter::redis(&server(), config.clone()).await.unwrap();
    let second = RateLimiter::redis(&server(), config).await.unwrap();
    assert!(first.is_shared() && second.is_shared());

    for _ in 0..5 {
        first
            .check(Limit::LocationUpdate, "courier-1")
            .await
            .unwrap();
    }
    // The other instance knows the burst is spent.
    let wait = retry_after(second.check(Limit::LocationUpdate, "courier-1").await);
    assert!(
        wait > Duration::from_secs(1) && wait <= quota.emission_interval(),
        "about one emission interval (2 s), minus the time since: {wait:?}"
    );
    // And so does the first.
    assert!(
        first
            .check(Limit::LocationUpdate, "courier-1")
            .await
            .is_err()
    );

    // Another courier, and the same courier under another limit, are other buckets.
    second
        .check(Limit::LocationUpdate, "courier-2")
        .await
        .unwrap();
    first
        .check(Limit::DeliveryCreation, "courier-1")
        .await
        .unwrap();

    // Every bucket is one key with a lifetime: the time until it refuses nothing any more.
    let mut conn = client().get_multiplexed_async_connection().await.unwrap();
    let key = prefix.key(Limit::LocationUpdate, "courier-1");
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 0 && ttl <= 10_000, "{key}: PTTL {ttl}");
    assert_eq!(
        prefix.keys().await,
        vec![
            prefix.key(Limit::DeliveryCreation, "courier-1"),
            prefix.key(Limit::LocationUpdate, "courier-1"),
            prefix.key(Limit::LocationUpdate, "courier-2"),
        ]
    );
    for key in prefix.keys().await {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(ttl > 0, "{key}: PTTL {ttl}");
    }
}

#[tokio::test]
async fn a_refused_key_recovers_after_its_interval() {
    let prefix = Prefix::new("recovery");
    // 2 per second: one every 500 ms after the burst.
    let config = prefix.config(|c| c.location_update = "2/1s".parse().unwrap());
    let limiter = RateLimiter::redis(&server(), config).await.unwrap();

    limiter.check(Limit::LocationUpdate, "c").await.unwrap();
    limiter.check(Limit::LocationUpdate, "c").await.unwrap();
    let wait = retry_after(limiter.check(Limit::LocationUpdate, "c").await);
    assert!(wait <= Duration::from_millis(500), "{wait:?}");
    // Refusals write nothing: they do not push the next success further out.
    for _ in 0..5 {
        assert!(limiter.check(Limit::LocationUpdate, "c").await.is_err());
    }

    // Well past the period, the whole burst is back, and the key is gone.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(prefix.keys().await.is_empty(), "the key expired");
    limiter.check(Limit::LocationUpdate, "c").await.unwrap();
    limiter.check(Limit::LocationUpdate, "c").await.unwrap();
    assert!(limiter.check(Limit::LocationUpdate, "c").await.is_err());
}

#[tokio::test]
async fn the_products_delivery_limit_holds_on_redis() {
    let prefix = Prefix::new("deliveries");
    let limiter = RateLimiter::redis(&server(), prefix.config(|_| {}))
        .await
        .unwrap();
    let customer = Uuid::new_v4().to_string();
    for _ in 0..10 {
        limiter
            .check(Limit::DeliveryCreation, &customer)
            .await
            .unwrap();
    }
    let error = limiter
        .check(Limit::DeliveryCreation, &customer)
        .await
        .unwrap_err();
    assert_eq!(error.code(), "rate_limited");
    // Ten per hour: the next one six minutes after the burst.
    let wait = retry_after(Err(error));
    assert!(
        wait > Duration::from_secs(300) && wait <= Duration::from_secs(360),
        "{wait:?}"
    );
    let registry = prometheus::Registry::new();
    limiter.register(&registry).unwrap();
    let text = metrics_text(&registry);
    assert!(
        text.contains("delivertrack_rate_limited_total{route=\"delivery_creation\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("delivertrack_rate_limited_total{route=\"location_update\"} 0"),
        "{text}"
    );
}

#[tokio::test]
async fn an_unreachable_redis_is_refused_at_start() {
    // A port nothing listens on: bind one, learn it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let error = RateLimiter::redis(
        &RedisConfig::new("127.0.0.1", port),
        RateLimitConfig::default(),
    )
    .await
    .unwrap_err();
    assert!(
        error.to_string().contains(&format!("127.0.0.1:{port}")),
        "{error}"
    );
}

#[tokio::test]
async fn during_an_outage_each_instance_limits_alone_and_redis_takes_over_again() {
    let prefix = Prefix::new("outage");
    let upstream: SocketAddr = tokio::net::lookup_host((redis_host(), redis_port()))
        .await
        .unwrap()
        .next()
        .unwrap();
    let proxy = TcpProxy::start(upstream).await.unwrap();
    let via_proxy = RedisConfig::new(proxy.addr().ip().to_string(), proxy.addr().port());
    // One per minute: whatever Redis has seen refuses for the rest of the test.
    let config = prefix.config(|c| c.location_update = Quota::per_minute(1));
    let limiter = RateLimiter::redis(&via_proxy, config).await.unwrap();
    let registry = prometheus::Registry::new();
    limiter.register(&registry).unwrap();

    limiter
        .check(Limit::LocationUpdate, "seen-1")
        .await
        .unwrap();
    limiter
        .check(Limit::LocationUpdate, "seen-2")
        .await
        .unwrap();
    assert!(
        limiter
            .check(Limit::LocationUpdate, "seen-1")
            .await
            .is_err()
    );

    proxy.cut();
    // Redis would refuse `seen-1`; this instance alone has not counted it yet, and lets it
    // through, once, and quickly.
    let started = Instant::now();
    limiter
        .check(Limit::LocationUpdate, "seen-1")
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a check during the outage took {:?}",
        started.elapsed()
    );
    assert!(
        limiter
            .check(Limit::LocationUpdate, "seen-1")
            .await
            .is_err()
    );
    let errors = metric_value(&registry, "delivertrack_rate_limit_redis_errors_total");
    assert!(
        errors >= 2.0,
        "both checks are counted as Redis errors: {errors}"
    );

    proxy.restore();
    // `seen-2` was counted only in Redis: once a check refuses it, Redis decides again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match limiter.check(Limit::LocationUpdate, "seen-2").await {
            Err(ApiError::RateLimited { .. }) => break,
            Ok(()) => {} // Decided locally while the connection is re-established.
            Err(other) => panic!("{other:?}"),
        }
        assert!(Instant::now() < deadline, "Redis never took over again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And a fresh courier is counted in Redis again.
    limiter.check(Limit::LocationUpdate, "fresh").await.unwrap();
    assert!(
        prefix
            .keys()
            .await
            .contains(&prefix.key(Limit::LocationUpdate, "fresh"))
    );
}

// ---------------------------------------------------------------------------------------
// The X-API-Key middleware over HTTP
// ---------------------------------------------------------------------------------------

/// Serves `app` on an ephemeral port until the token fires; the base url.
async fn serve(app: Router, shutdown: CancellationToken) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
            .unwrap();
    });
    format!("http://{addr}")
}

/// A tiny application: `GET /ping` behind the middleware.
fn ping_app(state: AppState) -> Router {
    Router::new()
        .route("/ping", get(|| async { "pong" }))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            api_key_layer,
        ))
        .with_state(state)
}

async fn get_with_key(url: &str, key: Option<&str>) -> reqwest::Response {
    let mut request = reqwest::Client::new().get(url);
    if let Some(key) = key {
        request = request.header("X-API-Key", key);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn a_listed_key_gets_429_with_retry_after_on_every_instance() {
    let prefix = Prefix::new("api-key");
    let key = format!("key-{}", Uuid::new_v4());
    let config = prefix.config(|c| {
        c.api_keys = RateLimitConfig::parse_api_keys(&format!("{key}=3/min,other=10/s")).unwrap();
    });
    let shutdown = CancellationToken::new();
    // Two API instances on one Redis.
    let mut urls = Vec::new();
    let mut states = Vec::new();
    for _ in 0..2 {
        let limiter = RateLimiter::redis(&server(), config.clone()).await.unwrap();
        let state = AppState::new(ReadModel::default(), shutdown.clone()).with_limiter(limiter);
        urls.push(serve(ping_app(state.clone()), shutdown.clone()).await);
        states.push(state);
    }

    for url in [&urls[0], &urls[1], &urls[0]] {
        let response = get_with_key(&format!("{url}/ping"), Some(&key)).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.unwrap(), "pong");
    }
    let response = get_with_key(&format!("{}/ping", urls[1]), Some(&key)).await;
    assert_eq!(response.status(), 429);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..=20).contains(&retry_after),
        "one every 20 s: {retry_after}"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("api_key"),
        "{body}"
    );
    assert_eq!(body.as_object().unwrap().len(), 1, "{body}");

    // Without a key the middleware does not limit; another key has its own quota.
    for _ in 0..5 {
        assert_eq!(
            get_with_key(&format!("{}/ping", urls[1]), None)
                .await
                .status(),
            200
        );
    }
    assert_eq!(
        get_with_key(&format!("{}/ping", urls[1]), Some("other"))
            .await
            .status(),
        200
    );
    // An unlisted key, with no default quota: refused.
    let response = get_with_key(&format!("{}/ping", urls[0]), Some("guess")).await;
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");

    // The refusal is counted where it happened, under the limit's name.
    let series = "delivertrack_rate_limited_total{route=\"api_key\"}";
    assert_eq!(metric_value(&states[0].registry, series), 0.0);
    assert_eq!(metric_value(&states[1].registry, series), 1.0);

    // Keys are stored as digests, never as themselves.
    let stored = prefix.keys().await;
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert!(
        stored
            .iter()
            .all(|k| !k.contains(&key) && !k.contains("other")),
        "{stored:?}"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn the_router_limits_api_keys_and_metrics_show_it() {
    let key = "router-key";
    let config = RateLimitConfig {
        api_keys: RateLimitConfig::parse_api_keys(&format!("{key}=2/min")).unwrap(),
        // Unlisted keys share one bucket of two per minute.
        api_key_default: Some(Quota::per_minute(2)),
        ..RateLimitConfig::default()
    };
    let shutdown = CancellationToken::new();
    let state = AppState::new(ReadModel::default(), shutdown.clone())
        .with_limiter(RateLimiter::in_process(config).unwrap());
    let url = serve(router(state), shutdown.clone()).await;

    for _ in 0..2 {
        assert_eq!(
            get_with_key(&format!("{url}/healthz"), Some(key))
                .await
                .status(),
            200
        );
    }
    let response = get_with_key(&format!("{url}/healthz"), Some(key)).await;
    assert_eq!(response.status(), 429);
    assert!(response.headers().contains_key("retry-after"));
    // Unmatched routes pass through the middleware too.
    let response = get_with_key(&format!("{url}/nowhere"), Some(key)).await;
    assert_eq!(response.status(), 429);

    // Two unlisted keys share the default bucket.
    assert_eq!(
        get_with_key(&format!("{url}/healthz"), Some("u1"))
            .await
            .status(),
        200
    );
    assert_eq!(
        get_with_key(&format!("{url}/healthz"), Some("u2"))
            .await
            .status(),
        200
    );
    assert_eq!(
        get_with_key(&format!("{url}/healthz"), Some("u3"))
            .await
            .status(),
        429
    );

    let text = get_with_key(&format!("{url}/metrics"), None)
        .await
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("delivertrack_rate_limited_total{route=\"api_key\"} 3"),
        "{text}"
    );
    assert!(
        text.contains("delivertrack_rate_limit_redis_errors_total 0"),
        "{text}"
    );
    shutdown.cancel();
}
