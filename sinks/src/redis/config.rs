//! Configuration of the Redis sink: where Redis is, how its keys are named, how long they
//! live, and how long the sink waits for it.

use std::time::Duration;

use redis::ConnectionAddr;

use super::service::RedisError;

/// Where the cache is, its key names and lifetimes, and the sink's patience.
///
/// `host` and `port` are `REDIS_HOST` and `REDIS_PORT` of the README's configuration table
/// (those names are a contract, ARCHITECTURE rule 8). The lifetimes follow the caching
/// strategy: a courier's location lives seconds, an active delivery lives as long as it is
/// active, a customer's history lives long.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisConfig {
    /// `REDIS_HOST`.
    pub host: String,
    /// `REDIS_PORT`.
    pub port: u16,
    /// Put before every key, so that several deployments (or tests) can share one Redis
    /// and find their own keys with one `SCAN MATCH prefix*`.
    pub key_prefix: String,
    /// Lifetime of `courier:{id}:location`, refreshed at every fix: a courier that stops
    /// reporting drops out of the cache on its own, which is what "latest position" means to
    /// a map.
    pub courier_location_ttl: Duration,
    /// Lifetime of `delivery:{id}` while the delivery has not ended, refreshed at every
    /// change of it or of its ETA. Active deliveries are meant to stay as long as they are
    /// active; this is only a safety net, so that a key the sink can no longer reach (a
    /// process that died and never came back) does not live for ever.
    pub active_delivery_ttl: Duration,
    /// Lifetime of `delivery:{id}` once the delivery has ended (delivered, failed,
    /// cancelled), counted from its last change (a late rating refreshes it): long enough
    /// for the customer to look at the result, short enough to keep the cache to what is
    /// hot. Zero deletes the key when the delivery ends.
    pub ended_delivery_ttl: Duration,
    /// Lifetime of `customer:{id}:deliveries`, refreshed whenever one of the customer's
    /// deliveries changes: a history is read long after the fact.
    pub customer_history_ttl: Duration,
    /// How many delivery ids a customer's history keeps (the newest by creation), so that
    /// a frequent customer's key stays small.
    pub customer_history_len: usize,
    /// How long one attempt to open a connection may take, at start and on every
    /// reconnection. Bounded, so that an unreachable Redis is reported instead of hanging.
    pub connect_timeout: Duration,
    /// How long the sink waits for Redis to answer one epoch's pipeline. Bounded, so that a
    /// Redis that hangs costs each epoch at most this much: the cache goes stale, the
    /// pipeline goes on.
    pub response_timeout: Duration,
}

impl Default for RedisConfig {
    /// The local Redis of the README's table, `127.0.0.1:6379`, with the documented
    /// lifetimes.
    fn default() -> Self {
        Self {
            host: "127.0.0.1".to_owned(),
            port: 6379,
            key_prefix: "delivertrack:".to_owned(),
            courier_location_ttl: Duration::from_secs(15),
            active_delivery_ttl: Duration::from_secs(24 * 3600),
            ended_delivery_ttl: Duration::from_secs(3600),
            customer_history_ttl: Duration::from_secs(30 * 24 * 3600),
            customer_history_len: 100,
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(2),
        }
    }
}

impl RedisConfig {
    /// The default configuration for Redis at `host:port`.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Self {
            host: host.into(),
            port,
            ..Self::default()
        }
    }

    /// Which Redis this is, for messages: `host:port`.
    pub fn target(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The address the client connects to. Built from the parts rather than from a url, so
    /// that a host needs no escaping.
    pub(super) fn address(&self) -> ConnectionAddr {
        ConnectionAddr::Tcp(self.host.clone(), self.port)
    }

    /// Checks what the commands need: positive lifetimes (Redis refuses `PX 0`), a history
    /// of at least one id, and a host.
    ///
    /// # Errors
    /// [`RedisError::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<(), RedisError> {
        let invalid = |what: &str| Err(RedisError::InvalidConfig(what.to_owned()));
        if self.host.is_empty() {
            return invalid("REDIS_HOST is empty");
        }
        if self.courier_location_ttl.as_millis() == 0 {
            return invalid("the courier location TTL must be at least 1 ms");
        }
        if self.active_delivery_ttl.as_millis() == 0 {
            return invalid("the active delivery TTL must be at least 1 ms");
        }
        if self.customer_history_ttl.as_millis() == 0 {
            return invalid("the customer history TTL must be at least 1 ms");
        }
        if self.customer_history_len == 0 {
            return invalid("the customer history must keep at least one delivery");
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_the_local_redis_with_the_documented_lifetimes() {
        let config = RedisConfig::default();
        assert_eq!(config.target(), "127.0.0.1:6379");
        assert_eq!(config.key_prefix, "delivertrack:");
        assert_eq!(config.courier_location_ttl, Duration::from_secs(15));
        assert_eq!(config.ended_delivery_ttl, Duration::from_secs(3600));
        assert_eq!(config.customer_history_ttl, Duration::from_secs(2_592_000));
        assert_eq!(config.customer_history_len, 100);
        config.validate().unwrap();
    }

    #[test]
    fn ipv6_hosts_are_bracketed_in_messages() {
        assert_eq!(RedisConfig::new("::1", 6380).target(), "[::1]:6380");
    }

    #[test]
    fn zero_lifetimes_are_refused_except_for_ended_deliveries() {
        let mut config = RedisConfig {
            ended_delivery_ttl: Duration::ZERO,
            ..RedisConfig::default()
        };
        config.validate().unwrap();
        config.courier_location_ttl = Duration::ZERO;
        let error = config.validate().unwrap_err();
        assert!(error.to_string().contains("courier location"), "{error}");
        let empty = RedisConfig {
            customer_history_len: 0,
            ..RedisConfig::default()
        };
        assert!(empty.validate().is_err());
    }
}
