//! Configuration of the derived-event sink.

use std::time::Duration;

use super::service::DerivedError;

/// Where the notification feed goes and when an ETA is worth a notification.
///
/// `Default` gives the README's names on a broker on localhost; `delivertrack run` would
/// override `url` from `RABBITMQ_URL`, the variable the source reads too, because the feed
/// lives on the same broker as the input.
#[derive(Clone)]
pub struct DerivedConfig {
    /// The AMQP URI of the broker (`RABBITMQ_URL`). It may carry credentials, so it is only
    /// shown through [`DerivedConfig::redacted_url`] (also by `Debug`).
    pub url: String,
    /// The topic exchange the derived events are published to, routing key = the derived
    /// event's kind. Declared durable and idempotently at every connection, so consumers
    /// may bind their queues before or after the pipeline first starts.
    pub exchange: String,
    /// An `eta.updated` is published only when a delivery's estimated arrival moved by
    /// *more* than this since the last one published for that delivery (or on its first
    /// estimate). The comparison is against the last *published* estimate, not the previous
    /// one, so a slow drift still gets through once it adds up to more than the threshold.
    /// Zero publishes every change of the arrival time.
    pub eta_threshold: Duration,
    /// How long the broker may take to confirm an epoch's messages. Past it the connection
    /// is considered broken, dropped, and the epoch is retried on a new one.
    pub confirm_timeout: Duration,
    /// How long one connection attempt (TCP, AMQP handshake, exchange declaration) may
    /// take; a broker that black-holes packets would otherwise hang a commit.
    pub connect_timeout: Duration,
    /// The name `rabbitmqctl list_connections` shows, so an operator can tell the feed's
    /// connection from the source's.
    pub connection_name: String,
}

impl Default for DerivedConfig {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned(),
            exchange: "delivertrack.derived".to_owned(),
            eta_threshold: Duration::from_secs(60),
            confirm_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            connection_name: "delivertrack-derived".to_owned(),
        }
    }
}

impl DerivedConfig {
    /// The default configuration on the broker at `url`.
    pub fn from_url(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ..Self::default()
        }
    }

    /// The URL with its password replaced by `***`, for logs and error messages.
    pub fn redacted_url(&self) -> String {
        redact(&self.url)
    }

    /// Checks what no retry can fix.
    ///
    /// # Errors
    /// [`DerivedError::Config`] naming the setting.
    pub fn validate(&self) -> Result<(), DerivedError> {
        // The default exchange ("") cannot be declared; AMQP names are at most 255 bytes.
        if self.exchange.trim().is_empty() || self.exchange.len() > 255 {
            return Err(DerivedError::Config(format!(
                "the derived-event exchange name must be 1 to 255 bytes, got {:?}",
                self.exchange
            )));
        }
        if self.confirm_timeout.is_zero() || self.connect_timeout.is_zero() {
            return Err(DerivedError::Config(
                "the derived-event sink's connect and confirm timeouts must be positive".into(),
            ));
        }
        Ok(())
    }
}

/// Hand-written so that the password inside `url` never reaches a log.
impl std::fmt::Debug for DerivedConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DerivedConfig")
            .field("url", &self.redacted_url())
            .field("exchange", &self.exchange)
            .field("eta_threshold", &self.eta_threshold)
            .field("confirm_timeout", &self.confirm_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("connection_name", &self.connection_name)
            .finish()
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
        let config = DerivedConfig::from_url("amqp://feed:s3cret@rabbit:5672/prod");
        assert!(!format!("{config:?}").contains("s3cret"));
    }

    #[test]
    fn the_default_is_the_readme_s_and_bad_settings_are_named() {
        let config = DerivedConfig::default();
        config.validate().unwrap();
        assert_eq!(config.exchange, "delivertrack.derived");
        assert_eq!(config.eta_threshold, Duration::from_secs(60));
        let blank = DerivedConfig {
            exchange: " ".into(),
            ..DerivedConfig::default()
        };
        assert!(
            blank
                .validate()
                .unwrap_err()
                .to_string()
                .contains("exchange")
        );
        let zero = DerivedConfig {
            confirm_timeout: Duration::ZERO,
            ..DerivedConfig::default()
        };
        assert!(
            zero.validate()
                .unwrap_err()
                .to_string()
                .contains("timeouts")
        );
    }
}
