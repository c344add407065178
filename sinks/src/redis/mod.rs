//! The Redis sink: hot caches with lifetimes, the seed's caching strategy.
//!
//! Redis is a cache, not the record (that is PostgreSQL): an epoch is acknowledged whether
//! or not Redis could be written, and a cache that fell behind is rewritten from the
//! current state as soon as Redis answers again (see [`RedisSink`]).
//!
//! # Keys and values
//! Every key starts with the configured prefix (`delivertrack:` by default). Values are
//! JSON with the API's field names: positions in degrees, times in Unix milliseconds
//! (`_ms`), speeds in m/s.
//!
//! | key | value | lifetime |
//! |---|---|---|
//! | `courier:{id}:location` | [`CourierLocation`]: `courier_id`, `lat`, `lon`, `at_ms`, `speed_mps`, `heading_deg` | 15 s, renewed at every fix: a silent courier drops out |
//! | `delivery:{id}` | [`DeliveryDetails`]: status, courier, pickup, dropoff, times, rating, version, and `eta` (`eta_ms`, `remaining_m`, `speed_mps`, `as_of_ms`) while one is known | while not ended: 24 h, renewed at every change of it or its ETA (a safety net, not an expiry); once delivered, failed or cancelled: 1 h from its last change (0: deleted) |
//! | `customer:{id}:deliveries` | sorted set of delivery ids scored by `created_at` (Unix ms), the newest 100 | 30 days, renewed whenever one of them changes |
//!
//! # Layout
//! - [`config`]: [`RedisConfig`], `REDIS_HOST`/`REDIS_PORT`, the prefix, lifetimes and
//!   timeouts.
//! - [`sink`]: [`RedisSink`], the [`Sink`](crate::Sink): per-epoch writes, outages, resync.
//! - [`cache`]: key names, values, the state the cache is rebuilt from, and the writes of
//!   an epoch or a resync (no I/O).
//! - [`service`]: connecting, one `MULTI`/`EXEC` pipeline per write, bounded exchanges.

pub mod cache;
pub mod config;
pub mod service;
pub mod sink;

pub use cache::{CourierLocation, DeliveryDetails, Keys};
pub use config::RedisConfig;
pub use service::RedisError;
pub use sink::RedisSink;
