//! The `delivertrack` command: parses the command line and hands over to the library.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use delivertrack::StoresConfig;
use delivertrack::auth::issue_token;
use delivertrack::telemetry::{self, LogFormat};
use delivertrack::{DemoConfig, PipelineConfig, RunConfig, run_demo, run_migrations, run_pipeline};
use delivertrack_api::{AllowedOrigins, ApiConfig, AuthConfig, Role};
use delivertrack_api::{Quota, RateLimitConfig};
use delivertrack_dataflow::contract::ContractLimits;
use delivertrack_ingest::rabbitmq::RabbitConfig;
use delivertrack_sinks::{DerivedConfig, MongoConfig, PostgresConfig, RedisConfig};

/// Real-time delivery tracking on an incremental dataflow.
#[derive(Debug, Parser)]
#[command(name = "delivertrack", version, about)]
struct Cli {
    /// How log lines look (filter them with RUST_LOG).
    #[arg(long, env = "DELIVERTRACK_LOG_FORMAT", value_enum, default_value_t = Format::Human, global = true)]
    log_format: Format,

    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Format {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the whole pipeline with a simulated fleet and no external service.
    Demo(DemoArgs),
    /// Runs the pipeline on RabbitMQ: consumes the event stream, serves the API.
    Run(Box<RunArgs>),
    /// Applies the PostgreSQL migrations the database does not have yet, then exits.
    Migrate(PostgresArgs),
    /// Prints a signed API token (JWT) for a role and subject, alone on stdout.
    Token(TokenArgs),
}

/// The API's token settings: `run` verifies with them, `token` signs with them.
#[derive(Debug, clap::Args)]
struct JwtArgs {
    /// The HS256 secret of the API's tokens, at least 32 bytes. Required: `run` refuses an
    /// empty one, a shorter one and the README's sample `change-me` (see
    /// --insecure-dev-secret).
    #[arg(long, env = "JWT_SECRET", hide_env_values = true, default_value = "")]
    jwt_secret: String,
    /// The lifetime of a token `token` issues: a duration with its unit (`24h`, `15m`,
    /// `3600s`, `1h 30m`) or a bare number of seconds.
    #[arg(long = "jwt-expiry", visible_alias = "jwt-expiry-secs", env = "JWT_EXPIRY", default_value = "1h", value_parser = parse_expiry)]
    jwt_expiry: Duration,
    /// Accepts a secret shorter than 32 bytes, and the README's sample `change-me`: for a
    /// developer's machine only.
    #[arg(long, env = "DELIVERTRACK_INSECURE_DEV_SECRET", value_parser = clap::builder::BoolishValueParser::new())]
    insecure_dev_secret: bool,
}

impl JwtArgs {
    fn config(&self) -> AuthConfig {
        AuthConfig {
            secret: self.jwt_secret.clone(),
            expiry: self.jwt_expiry,
        }
    }
}

/// `JWT_EXPIRY`, as clap parses it ([`delivertrack::auth::parse_expiry`]).
fn parse_expiry(text: &str) -> Result<Duration, String> {
    delivertrack::auth::parse_expiry(text)
}

#[derive(Debug, clap::Args)]
struct TokenArgs {
    /// Whom the token speaks for.
    #[arg(long, value_enum)]
    role: TokenRole,
    /// The subject: the customer's or courier's id (a UUID); an admin's own id.
    #[arg(long)]
    sub: uuid::Uuid,
    #[command(flatten)]
    jwt: JwtArgs,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum TokenRole {
    Customer,
    Courier,
    Admin,
}

impl From<TokenRole> for Role {
    fn from(role: TokenRole) -> Self {
        match role {
            TokenRole::Customer => Role::Customer,
            TokenRole::Courier => Role::Courier,
            TokenRole::Admin => Role::Admin,
        }
    }
}

/// Where PostgreSQL is: `DATABASE_URL`, or the `POSTGRES_*` parts.
#[derive(Debug, clap::Args)]
struct PostgresArgs {
    /// A full connection url; when set, it overrides the `POSTGRES_*` parts.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// PostgreSQL host.
    #[arg(long, env = "POSTGRES_HOST", default_value = "127.0.0.1")]
    postgres_host: String,
    /// PostgreSQL port.
    #[arg(long, env = "POSTGRES_PORT", default_value_t = 5432)]
    postgres_port: u16,
    /// Database name.
    #[arg(long, env = "POSTGRES_DB", default_value = "delivertrack")]
    postgres_db: String,
    /// User.
    #[arg(long, env = "POSTGRES_USER", default_value = "postgres")]
    postgres_user: String,
    /// Password (empty: none, as with trust authentication).
    #[arg(
        long,
        env = "POSTGRES_PASSWORD",
        default_value = "",
        hide_env_values = true
    )]
    postgres_password: String,
}

impl PostgresArgs {
    fn config(&self) -> PostgresConfig {
        match &self.database_url {
            Some(url) => PostgresConfig::from_url(url.clone()),
            None => PostgresConfig::from_parts(
                self.postgres_host.clone(),
                self.postgres_port,
                self.postgres_db.clone(),
                self.postgres_user.clone(),
                self.postgres_password.clone(),
            ),
        }
    }
}

/// The settings `demo` and `run` share.
#[derive(Debug, clap::Args)]
struct PipelineArgs {
    /// Address the API (and the demo's map page) listens on.
    #[arg(long, env = "DELIVERTRACK_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Timely worker threads.
    #[arg(long, env = "DELIVERTRACK_WORKERS", default_value_t = 2)]
    workers: usize,
    /// ETA speed for a courier whose own speed is unknown (or implausibly low), m/s.
    #[arg(long, env = "DELIVERTRACK_DEFAULT_SPEED_MPS", default_value_t = 5.0, value_parser = positive_speed)]
    default_speed_mps: f64,
    /// An epoch closes at this many events ...
    #[arg(long, env = "DELIVERTRACK_EPOCH_MAX_EVENTS", default_value_t = 10_000)]
    epoch_max_events: usize,
    /// ... or this many milliseconds after its first event, while the commits keep up
    /// (while they are behind, it grows up to --epoch-max-events).
    #[arg(long, env = "DELIVERTRACK_EPOCH_MAX_MS", default_value_t = 200)]
    epoch_max_ms: u64,
    /// Serves /metrics on this address of its own, and not on the API's (keep it off the
    /// network the API faces). Unset: /metrics is on the API's address.
    #[arg(long, env = "DELIVERTRACK_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Origins of web pages allowed to open the API's WebSockets besides its own, separated
    /// by commas (`https://ops.example.com,http://127.0.0.1:3000`), or `*` for any. Unset:
    /// the API's own origin only; clients that send no Origin (not browsers) always pass.
    #[arg(long, env = "DELIVERTRACK_ALLOWED_ORIGINS", default_value = "", value_parser = allowed_origins)]
    allowed_origins: AllowedOrigins,
    /// The oldest an event may be, seconds: an `occurred_at` further behind the clock is
    /// refused as `timestamp_too_old` (RabbitMQ input and the API's commands alike; events
    /// read back from PostgreSQL are not held to it).
    #[arg(long, env = "DELIVERTRACK_MAX_EVENT_AGE_SECS", default_value_t = 604_800, value_parser = clap::value_parser!(u64).range(1..))]
    max_event_age_secs: u64,
    /// The fastest a courier moves, m/s: a fix whose implied speed from the courier's
    /// previous accepted fix is higher is refused as `implausible_jump`.
    #[arg(long, env = "DELIVERTRACK_MAX_COURIER_SPEED_MPS", default_value_t = 70.0, value_parser = max_courier_speed)]
    max_courier_speed_mps: f64,
    #[command(flatten)]
    http: HttpArgs,
}

/// `--allowed-origins`, as clap parses it.
fn allowed_origins(text: &str) -> Result<AllowedOrigins, String> {
    text.parse()
        .map_err(|error: delivertrack_api::origin::OriginListError| error.to_string())
}

/// The API's bounds on each client (connections, WebSockets, GraphQL).
#[derive(Debug, clap::Args)]
struct HttpArgs {
    /// A request's headers must arrive within this many seconds of the connection (or of
    /// their first byte on a kept-alive one); otherwise the connection is closed.
    #[arg(long, env = "DELIVERTRACK_HTTP_HEADER_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    http_header_timeout_secs: u64,
    /// A kept-alive connection with no request in progress is closed after this many
    /// seconds.
    #[arg(long, env = "DELIVERTRACK_HTTP_IDLE_TIMEOUT_SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    http_idle_timeout_secs: u64,
    /// Connections served at once (WebSockets included); more wait in the listen backlog.
    #[arg(long, env = "DELIVERTRACK_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// The largest WebSocket message or frame a client may send, bytes (a larger one
    /// closes the session with 1009).
    #[arg(long, env = "DELIVERTRACK_WS_MAX_MESSAGE_BYTES", default_value_t = 65_536, value_parser = clap::value_parser!(u32).range(1024..))]
    ws_max_message_bytes: u32,
    /// Subscriptions open at once on one GraphQL WebSocket.
    #[arg(long, env = "DELIVERTRACK_GRAPHQL_MAX_SUBSCRIPTIONS", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    graphql_max_subscriptions: u32,
}

impl HttpArgs {
    fn config(&self) -> ApiConfig {
        ApiConfig {
            http_header_timeout: Duration::from_secs(self.http_header_timeout_secs),
            http_idle_timeout: Duration::from_secs(self.http_idle_timeout_secs),
            max_connections: self.max_connections as usize,
            ws_max_message_bytes: self.ws_max_message_bytes as usize,
            graphql_max_subscriptions: self.graphql_max_subscriptions as usize,
            ..ApiConfig::default()
        }
    }
}

impl From<PipelineArgs> for PipelineConfig {
    fn from(args: PipelineArgs) -> Self {
        let max_event_age_ms =
            i64::try_from(args.max_event_age_secs.saturating_mul(1_000)).unwrap_or(i64::MAX);
        PipelineConfig {
            listen: args.listen,
            workers: args.workers,
            default_speed_mps: args.default_speed_mps,
            epoch_max_events: args.epoch_max_events,
            epoch_max_wait: Duration::from_millis(args.epoch_max_ms),
            metrics_listen: args.metrics_listen,
            api: ApiConfig {
                allowed_origins: args.allowed_origins,
                contract: ContractLimits::with_max_event_age_ms(max_event_age_ms),
                ..args.http.config()
            },
            max_courier_speed_mps: args.max_courier_speed_mps,
            ..PipelineConfig::default()
        }
    }
}

#[derive(Debug, clap::Args)]
struct DemoArgs {
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// Simulated couriers.
    #[arg(long, env = "DELIVERTRACK_COURIERS", default_value_t = 100)]
    couriers: usize,
    /// Simulated zones.
    #[arg(long, env = "DELIVERTRACK_ZONES", default_value_t = 6)]
    zones: usize,
    /// Latitude of the simulated city's centre.
    #[arg(
        long,
        env = "DELIVERTRACK_CENTER_LAT",
        default_value_t = 52.52,
        allow_negative_numbers = true
    )]
    center_lat: f64,
    /// Longitude of the simulated city's centre.
    #[arg(
        long,
        env = "DELIVERTRACK_CENTER_LON",
        default_value_t = 13.405,
        allow_negative_numbers = true
    )]
    center_lon: f64,
    /// New deliveries per simulated minute.
    #[arg(
        long,
        env = "DELIVERTRACK_DELIVERIES_PER_MINUTE",
        default_value_t = 10.0
    )]
    deliveries_per_minute: f64,
    /// Simulated time per wall-clock time (5: five times faster than real time).
    #[arg(long, env = "DELIVERTRACK_SPEED", default_value_t = 5.0)]
    speed: f64,
    /// Seed of the simulation.
    #[arg(long, env = "DELIVERTRACK_SEED", default_value_t = 0)]
    seed: u64,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// The AMQP URI of RabbitMQ (it may hold a password: never shown in logs). A path of a
    /// lone `/` (`amqp://host:5672/`) is the default vhost `/`, as `%2f` would be.
    #[arg(long, env = "RABBITMQ_URL", hide_env_values = true, default_value_t = RabbitConfig::default().url, value_parser = amqp_url)]
    rabbitmq_url: String,
    /// The topic exchange events are published to (routing key = the event's kind).
    #[arg(long, env = "DELIVERTRACK_EXCHANGE", default_value_t = RabbitConfig::default().exchange)]
    exchange: String,
    /// The durable queue consumed, bound to the exchange with every event kind.
    #[arg(long, env = "DELIVERTRACK_QUEUE", default_value_t = RabbitConfig::default().queue)]
    queue: String,
    /// Where refused events are published, with their reason in the headers.
    #[arg(long, env = "DELIVERTRACK_DEAD_LETTER_EXCHANGE", default_value_t = RabbitConfig::default().dead_letter_exchange)]
    dead_letter_exchange: String,
    /// The queue that keeps refused events.
    #[arg(long, env = "DELIVERTRACK_DEAD_LETTER_QUEUE", default_value_t = RabbitConfig::default().dead_letter_queue)]
    dead_letter_queue: String,
    /// Unacknowledged messages RabbitMQ may hand this process: the bound on input held in
    /// memory while the sinks work.
    #[arg(long, env = "DELIVERTRACK_PREFETCH", default_value_t = RabbitConfig::default().prefetch, value_parser = clap::value_parser!(u16).range(1..))]
    prefetch: u16,
    /// How long the drain after Ctrl-C / SIGTERM may take before the process gives up
    /// (unacknowledged input is then redelivered).
    #[arg(long, env = "DELIVERTRACK_SHUTDOWN_TIMEOUT_SECS", default_value_t = 30)]
    shutdown_timeout_secs: u64,
    #[command(flatten)]
    stores: StoreArgs,
    #[command(flatten)]
    jwt: JwtArgs,
    #[command(flatten)]
    limits: LimitArgs,
}

/// The API's rate limits (kept in Redis unless `--no-redis`).
#[derive(Debug, clap::Args)]
struct LimitArgs {
    /// Location updates per courier, as `count/period` (`1/s`, `5/10s`, `100/min`, `10/h`).
    #[arg(
        long,
        env = "DELIVERTRACK_LOCATION_UPDATE_LIMIT",
        default_value = "2/2s"
    )]
    location_update_limit: Quota,
    /// Deliveries created per customer.
    #[arg(
        long,
        env = "DELIVERTRACK_DELIVERY_CREATION_LIMIT",
        default_value = "10/h"
    )]
    delivery_creation_limit: Quota,
    /// Ratings per customer (of all their deliveries together).
    #[arg(long, env = "DELIVERTRACK_RATING_LIMIT", default_value = "20/h")]
    rating_limit: Quota,
    /// API keys and their quotas, `key=quota,key=quota` (`X-API-Key` header).
    #[arg(long, env = "DELIVERTRACK_API_KEYS", hide_env_values = true, value_parser = api_keys, default_value = "")]
    api_keys: ApiKeys,
    /// The quota all unlisted API keys share; without it an unlisted key is refused.
    #[arg(long, env = "DELIVERTRACK_API_KEY_DEFAULT")]
    api_key_default: Option<Quota>,
}

/// Parsed `--api-keys` (a newtype, so that clap does not take the map for a list).
#[derive(Clone, Debug, Default)]
struct ApiKeys(std::collections::HashMap<String, Quota>);

fn api_keys(text: &str) -> Result<ApiKeys, String> {
    if text.trim().is_empty() {
        return Ok(ApiKeys::default());
    }
    RateLimitConfig::parse_api_keys(text)
        .map(ApiKeys)
        .map_err(|error| error.to_string())
}

impl LimitArgs {
    fn config(self) -> RateLimitConfig {
        RateLimitConfig {
            location_update: self.location_update_limit,
            delivery_creation: self.delivery_creation_limit,
            rating: self.rating_limit,
            api_keys: self.api_keys.0,
            api_key_default: self.api_key_default,
            ..RateLimitConfig::default()
        }
    }
}

/// The stores `run` writes: each on localhost by default, and each required unless left
/// out with its `--no-*` flag (ARCHITECTURE rule 8).
#[derive(Debug, clap::Args)]
struct StoreArgs {
    #[command(flatten)]
    postgres: PostgresArgs,
    /// Runs without PostgreSQL: nothing is recorded, and a restart begins from nothing.
    #[arg(long)]
    no_postgres: bool,
    /// Redis host.
    #[arg(long, env = "REDIS_HOST", default_value = "127.0.0.1")]
    redis_host: String,
    /// Redis port.
    #[arg(long, env = "REDIS_PORT", default_value_t = 6379)]
    redis_port: u16,
    /// Put before every Redis key (several deployments can share one Redis).
    #[arg(
        long,
        env = "DELIVERTRACK_REDIS_PREFIX",
        default_value = "delivertrack:"
    )]
    redis_prefix: String,
    /// Runs without the Redis caches.
    #[arg(long)]
    no_redis: bool,
    /// MongoDB connection string (it may hold a password: never shown in logs).
    #[arg(long, env = "MONGO_URI", hide_env_values = true, default_value_t = MongoConfig::default().uri)]
    mongo_uri: String,
    /// MongoDB database.
    #[arg(long, env = "MONGO_DB", default_value = "delivertrack")]
    mongo_db: String,
    /// Runs without MongoDB (location history and GeoJSON zones).
    #[arg(long)]
    no_mongo: bool,
    /// The topic exchange the derived events (geofence, ETA, completion, delay) go to.
    #[arg(long, env = "DELIVERTRACK_DERIVED_EXCHANGE", default_value_t = DerivedConfig::default().exchange)]
    derived_exchange: String,
    /// `eta.updated` is published only when an arrival estimate moved by more than this.
    #[arg(long, env = "DELIVERTRACK_ETA_THRESHOLD_SECS", default_value_t = 60)]
    eta_threshold_secs: u64,
    /// Runs without publishing derived events.
    #[arg(long)]
    no_derived: bool,
}

impl StoreArgs {
    /// The stores to open; the derived feed goes to the broker events come from.
    fn config(self, rabbitmq_url: &str) -> StoresConfig {
        StoresConfig {
            postgres: (!self.no_postgres).then(|| self.postgres.config()),
            redis: (!self.no_redis).then(|| RedisConfig {
                key_prefix: self.redis_prefix.clone(),
                ..RedisConfig::new(self.redis_host.clone(), self.redis_port)
            }),
            mongo: (!self.no_mongo).then(|| MongoConfig::new(self.mongo_uri, self.mongo_db)),
            derived: (!self.no_derived).then(|| DerivedConfig {
                exchange: self.derived_exchange.clone(),
                eta_threshold: Duration::from_secs(self.eta_threshold_secs),
                ..DerivedConfig::from_url(rabbitmq_url)
            }),
        }
    }
}

/// `RABBITMQ_URL`, with a trailing `/` read as the default vhost
/// ([`delivertrack_ingest::rabbitmq::normalize_url`]).
fn amqp_url(text: &str) -> Result<String, String> {
    Ok(delivertrack_ingest::rabbitmq::normalize_url(text))
}

/// A speed in m/s that an ETA can be computed with: finite, above 0, below 150.
fn positive_speed(text: &str) -> Result<f64, String> {
    let speed: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if speed.is_finite() && speed > 0.0 && speed < 150.0 {
        Ok(speed)
    } else {
        Err(format!(
            "{speed} m/s is not a usable speed (0 < speed < 150)"
        ))
    }
}

/// A maximum courier speed in m/s: finite and above 0.
fn max_courier_speed(text: &str) -> Result<f64, String> {
    let speed: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if speed.is_finite() && speed > 0.0 {
        Ok(speed)
    } else {
        Err(format!(
            "{speed} m/s is not a usable maximum speed (above 0)"
        ))
    }
}

impl From<DemoArgs> for DemoConfig {
    fn from(args: DemoArgs) -> Self {
        DemoConfig {
            pipeline: args.pipeline.into(),
            couriers: args.couriers,
            zones: args.zones,
            center_lat: args.center_lat,
            center_lon: args.center_lon,
            deliveries_per_minute: args.deliveries_per_minute,
            speed: args.speed,
            seed: args.seed,
            ..DemoConfig::default()
        }
    }
}

impl From<RunArgs> for RunConfig {
    fn from(args: RunArgs) -> Self {
        RunConfig {
            stores: args.stores.config(&args.rabbitmq_url),
            pipeline: args.pipeline.into(),
            rabbit: RabbitConfig {
                url: args.rabbitmq_url,
                exchange: args.exchange,
                queue: args.queue,
                dead_letter_exchange: args.dead_letter_exchange,
                dead_letter_queue: args.dead_letter_queue,
                prefetch: args.prefetch,
                ..RabbitConfig::default()
            },
            shutdown_timeout: Duration::from_secs(args.shutdown_timeout_secs),
            auth: Some(args.jwt.config()),
            insecure_dev_secret: args.jwt.insecure_dev_secret,
            rate_limits: args.limits.config(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Token(args) = &cli.command {
        // No runtime, no logger: the token alone on stdout, an error alone on stderr.
        return match issue_token(
            &args.jwt.config(),
            args.jwt.insecure_dev_secret,
            args.role.into(),
            args.sub,
        ) {
            Ok(token) => {
                println!("{token}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("error: {error:#}");
                ExitCode::FAILURE
            }
        };
    }
    let format = match cli.log_format {
        Format::Human => LogFormat::Human,
        Format::Json => LogFormat::Json,
    };
    if let Err(error) = telemetry::init(format) {
        eprintln!("error: {error:#}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "The async runtime could not start.");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Demo(args) => run_demo(args.into(), shutdown_signal()).await,
            Command::Run(args) => run_pipeline((*args).into(), shutdown_signal()).await,
            Command::Migrate(args) => run_migrations(&args.config()).await,
            Command::Token(_) => Ok(()),
        }
    });
    // The drain is bounded inside the pipeline; do not wait on stragglers (a blocked
    // dataflow thread after a drain timeout) beyond a moment.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => {
            tracing::info!("DeliverTrack stopped cleanly.");
            ExitCode::SUCCESS
        }
        Err(error) => {
            tracing::error!(error = %format!("{error:#}"), "DeliverTrack stopped with an error.");
            // Also plainly on stderr: whoever started the process sees why it stopped even
            // with JSON logs or a filter that hides errors.
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on Ctrl-C or, on Unix, SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "Ctrl-C cannot be watched; waiting for SIGTERM only.");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "SIGTERM cannot be watched; waiting for Ctrl-C only.");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("Ctrl-C received."),
        () = terminate => tracing::info!("SIGTERM received."),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// The contract's and the dataflow's bounds, as flags of `demo` and `run` with their
    /// variables, reach the pipeline's configuration.
    #[test]
    fn the_bounds_are_flags_with_their_variables() {
        for command in ["demo", "run"] {
            let cli = Cli::command();
            let sub = cli.find_subcommand(command).unwrap();
            for (flag, env) in [
                ("max_event_age_secs", "DELIVERTRACK_MAX_EVENT_AGE_SECS"),
                (
                    "max_courier_speed_mps",
                    "DELIVERTRACK_MAX_COURIER_SPEED_MPS",
                ),
            ] {
                let arg = sub
                    .get_arguments()
                    .find(|arg| arg.get_id() == flag)
                    .unwrap_or_else(|| panic!("{command} has --{flag}"));
                assert_eq!(arg.get_env().and_then(|e| e.to_str()), Some(env));
            }
        }
        let parse = |args: &[&str]| {
            let mut all = vec!["delivertrack", "demo"];
            all.extend_from_slice(args);
            match Cli::try_parse_from(all).map(|cli| cli.command) {
                Ok(Command::Demo(args)) => Ok(PipelineConfig::from(args.pipeline)),
                Ok(_) => unreachable!(),
                Err(error) => Err(error),
            }
        };
        let defaults = parse(&[]).unwrap();
        assert_eq!(defaults.api.contract.max_event_age_ms, 7 * 24 * 3_600_000);
        assert!((defaults.max_courier_speed_mps - 70.0).abs() < f64::EPSILON);
        let set = parse(&[
            "--max-event-age-secs",
            "3600",
            "--max-courier-speed-mps",
            "25.5",
        ])
        .unwrap();
        assert_eq!(
            set.api.contract,
            ContractLimits::with_max_event_age_ms(3_600_000)
        );
        assert!((set.max_courier_speed_mps - 25.5).abs() < f64::EPSILON);
        assert_eq!(
            set.driver_config().dataflow.max_courier_speed_mps,
            set.max_courier_speed_mps
        );
        for bad in [
            ["--max-event-age-secs", "0"],
            ["--max-courier-speed-mps", "0"],
            ["--max-courier-speed-mps", "-3"],
            ["--max-courier-speed-mps", "NaN"],
        ] {
            assert!(parse(&bad).is_err(), "{bad:?}");
        }
    }
}
