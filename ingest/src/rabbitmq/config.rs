//! The RabbitMQ source's configuration: where the broker is, what the topology is called,
//! how many deliveries may be in flight and how reconnection backs off.

use std::time::Duration;

use delivertrack_dataflow::contract::ContractLimits;

use crate::source::SourceError;

/// Everything the RabbitMQ source needs. `Default` gives the names of the README, on a
/// broker on localhost; `delivertrack run` overrides them from its flags and environment.
#[derive(Clone, Debug)]
pub struct RabbitConfig {
    /// The AMQP URI of the broker (`RABBITMQ_URL`). It may carry credentials, so it is only
    /// ever logged through [`RabbitConfig::redacted_url`].
    pub url: String,
    /// The durable topic exchange publishers send events to, with the event's kind as
    /// routing key. Publishers need only this name.
    pub exchange: String,
    /// The durable queue this source consumes, bound to the exchange with every kind.
    pub queue: String,
    /// Where refused events are published (a durable topic exchange, routing key = the
    /// original routing key, so operators may bind per kind).
    pub dead_letter_exchange: String,
    /// The durable queue bound to the dead-letter exchange with `#`: every refused event
    /// lands there with its reason in the headers.
    pub dead_letter_queue: String,
    /// Unacknowledged deliveries the broker may push to this consumer (`basic_qos`). This is
    /// the bound on input held in memory: when sinks stall, acks stop, and the broker stops
    /// delivering. Must be at least 1 (0 would mean "unbounded" to AMQP). 10 000 by
    /// default: the unacknowledged epochs share it (about four under a backlog), so it also
    /// bounds how large an epoch of single-event messages can grow.
    pub prefetch: u16,
    /// The name shown by `rabbitmqctl list_connections` and the management UI, so an operator
    /// can tell this process's connection apart (and close it on purpose).
    pub connection_name: String,
    /// The first pause after a failed reconnection attempt.
    pub reconnect_min: Duration,
    /// The longest pause between two attempts: the backoff doubles up to here, so a broker
    /// that comes back is found within this long.
    pub reconnect_max: Duration,
    /// How long one connection attempt (TCP, AMQP handshake, topology) may take. A broker
    /// that black-holes packets would otherwise hang an attempt for the TCP timeout.
    pub connect_timeout: Duration,
    /// How long dead-letter publisher confirms and acks may take in [`ack`](crate::Source::ack)
    /// before the connection is considered broken and replaced.
    pub confirm_timeout: Duration,
    /// Decoding limits (clock skew, events per message).
    pub limits: ContractLimits,
}

impl Default for RabbitConfig {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned(),
            exchange: "delivertrack.events".to_owned(),
            queue: "delivertrack.ingest".to_owned(),
            dead_letter_exchange: "delivertrack.dead".to_owned(),
            dead_letter_queue: "delivertrack.dead".to_owned(),
            prefetch: 10_000,
            connection_name: "delivertrack".to_owned(),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            confirm_timeout: Duration::from_secs(30),
            limits: ContractLimits::default(),
        }
    }
}

impl RabbitConfig {
    /// The URL with its password replaced by `***`, for logs and error messages.
    pub fn redacted_url(&self) -> String {
        redact(&self.url)
    }

    /// Checks what no retry can fix.
    ///
    /// # Errors
    /// [`SourceError::Config`] naming the setting.
    pub fn validate(&self) -> Result<(), SourceError> {
        let names = [
            ("exchange", &self.exchange),
            ("queue", &self.queue),
            ("dead-letter exchange", &self.dead_letter_exchange),
            ("dead-letter queue", &self.dead_letter_queue),
        ];
        for (what, name) in names {
            // The default exchange ("") cannot be declared or bound to; AMQP names are
            // short strings of at most 255 bytes.
            if name.trim().is_empty() || name.len() > 255 {
                return Err(SourceError::Config(format!(
                    "the RabbitMQ {what} name must be 1 to 255 bytes, got {name:?}"
                )));
            }
        }
        if self.exchange == self.dead_letter_exchange {
            return Err(SourceError::Config(
                "the dead-letter exchange must differ from the event exchange, or refused events would be consumed again".into(),
            ));
        }
        if self.queue == self.dead_letter_queue {
            return Err(SourceError::Config(
                "the dead-letter queue must differ from the ingest queue".into(),
            ));
        }
        if self.prefetch == 0 {
            return Err(SourceError::Config(
                "the RabbitMQ prefetch must be at least 1 (0 means unbounded in AMQP)".into(),
            ));
        }
        if self.reconnect_min.is_zero() || self.reconnect_min > self.reconnect_max {
            return Err(SourceError::Config(format!(
                "the reconnect backoff needs 0 < min <= max, got {:?} and {:?}",
                self.reconnect_min, self.reconnect_max
            )));
        }
        if self.connect_timeout.is_zero() || self.confirm_timeout.is_zero() {
            return Err(SourceError::Config(
                "the RabbitMQ connect and confirm timeouts must be positive".into(),
            ));
        }
        Ok(())
    }
}

/// `RABBITMQ_URL` as users write it, made what they mean: a path of a lone `/`
/// (`amqp://guest:guest@localhost:5672/`) is the default vhost `/`, written `%2f`, because
/// the AMQP URI spec (and lapin) read that path as the *empty* vhost, which no broker has,
/// and the connection would fail with `NOT_ALLOWED`. Every other URL, including one
/// without a path (lapin's default vhost `/` already) and anything that does not parse (the
/// connection reports it), is returned as it is.
pub fn normalize_url(text: &str) -> String {
    match url::Url::parse(text) {
        Ok(mut parsed) if parsed.path() == "/" => {
            parsed.set_path("/%2f");
            parsed.into()
        }
        _ => text.to_owned(),
    }
}

/// `amqp://user:secret@host/vhost` → `amqp://user:***@host/vhost`; URLs without a password
/// are returned as they are.
pub(crate) fn redact(text: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(text) else {
        return text.to_owned();
    };
    if parsed.password().is_none() || parsed.set_password(Some("***")).is_err() {
        return text.to_owned();
    }
    parsed.into()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_a_log() {
        assert_eq!(
            redact("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("amqp://127.0.0.1:5672"), "amqp://127.0.0.1:5672");
        assert_eq!(redact("amqp://user@host/v"), "amqp://user@host/v");
        assert_eq!(redact("amqps://a:b@c@host"), "amqps://a:***@host");
        assert_eq!(redact("not a url"), "not a url");
    }

    #[test]
    fn a_trailing_slash_is_the_default_vhost() {
        assert_eq!(
            normalize_url("amqp://guest:guest@localhost:5672/"),
            "amqp://guest:guest@localhost:5672/%2f"
        );
        assert_eq!(
            normalize_url("amqps://u:p@mq.example:5671/?heartbeat=10"),
            "amqps://u:p@mq.example:5671/%2f?heartbeat=10"
        );
        for kept in [
            "amqp://guest:guest@127.0.0.1:5672/%2f",
            "amqp://guest:guest@127.0.0.1:5672/fleet",
            "amqp://guest:guest@127.0.0.1:5672",
            "not a url",
        ] {
            assert_eq!(normalize_url(kept), kept);
        }
    }

    #[test]
    fn the_default_is_valid_and_bad_settings_are_named() {
        RabbitConfig::default().validate().unwrap();
        let zero = RabbitConfig {
            prefetch: 0,
            ..RabbitConfig::default()
        };
        assert!(
            zero.validate()
                .unwrap_err()
                .to_string()
                .contains("prefetch")
        );
        let same = RabbitConfig {
            dead_letter_exchange: "delivertrack.events".into(),
            ..RabbitConfig::default()
        };
        assert!(same.validate().is_err());
        let backwards = RabbitConfig {
            reconnect_min: Duration::from_secs(5),
            reconnect_max: Duration::from_secs(1),
            ..RabbitConfig::default()
        };
        assert!(backwards.validate().is_err());
        let blank = RabbitConfig {
            queue: " ".into(),
            ..RabbitConfig::default()
        };
        assert!(blank.validate().is_err());
    }
}
