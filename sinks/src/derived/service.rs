//! The I/O of the derived-event sink: the connection to the broker, the exchange, and
//! publishing an epoch's messages with publisher confirms.
//!
//! Every failure here is worth a retry: the broker was unreachable, refused a message
//! (`nack`, e.g. under a resource alarm) or did not confirm in time, or the connection
//! dropped. After any of them the connection is closed and forgotten, and the next commit
//! opens a new one, so a broken channel (a publish refused by the broker closes it) can
//! never stall later epochs.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::FieldTable;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};

use super::config::DerivedConfig;

/// AMQP reply code of a normal close.
const REPLY_SUCCESS: u16 = 200;

/// Persistent (AMQP delivery mode 2): a notification waiting in a durable queue survives a
/// broker restart.
const PERSISTENT: u8 = 2;

/// What went wrong talking to the broker.
#[derive(Debug, thiserror::Error)]
pub enum DerivedError {
    /// The configuration can never work.
    #[error("invalid derived-event sink configuration: {0}")]
    Config(String),
    /// TCP, TLS, authentication or the AMQP handshake failed.
    #[error("could not connect to RabbitMQ at {url} for the derived events")]
    Connect {
        /// The broker, password redacted.
        url: String,
        /// What lapin reported (boxed: lapin's error is large, and this one is rare).
        #[source]
        source: Box<lapin::Error>,
    },
    /// Connected, but declaring the exchange or entering confirm mode failed (an exchange
    /// of that name with another type or durability, a missing permission).
    #[error("could not declare the exchange {exchange} at {url}")]
    Declare {
        /// The broker, password redacted.
        url: String,
        /// The exchange.
        exchange: String,
        /// What lapin reported (boxed: lapin's error is large, and this one is rare).
        #[source]
        source: Box<lapin::Error>,
    },
    /// The connection attempt took longer than the connect timeout.
    #[error("connecting to RabbitMQ at {url} took longer than {timeout:?}")]
    ConnectTimeout {
        /// The broker, password redacted.
        url: String,
        /// The limit.
        timeout: Duration,
    },
    /// Sending a message failed (the connection or channel is gone).
    #[error("publishing a derived event failed")]
    Publish(#[source] Box<lapin::Error>),
    /// The broker refused a message.
    #[error("the broker refused a derived event (nack)")]
    Nacked,
    /// The broker did not confirm every message in time.
    #[error("the broker did not confirm the epoch's derived events within {0:?}")]
    ConfirmTimeout(Duration),
}

/// One encoded message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    /// The derived event's kind.
    pub routing_key: &'static str,
    /// Its `event_id`, also the AMQP `message_id`, so consumers may dedupe without parsing.
    pub event_id: String,
    /// The JSON body.
    pub body: Vec<u8>,
}

impl Outgoing {
    fn properties(&self) -> BasicProperties {
        BasicProperties::default()
            .with_content_type(delivertrack_dataflow::contract::CONTENT_TYPE.into())
            .with_delivery_mode(PERSISTENT)
            .with_message_id(self.event_id.as_str().into())
            .with_type(self.routing_key.into())
            .with_app_id("delivertrack".into())
    }
}

/// One open connection and its confirm-mode channel.
struct Link {
    connection: Connection,
    channel: Channel,
}

impl Link {
    fn is_usable(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }

    async fn close(self, timeout: Duration) {
        let closing = self
            .connection
            .close(REPLY_SUCCESS, "derived-event sink done".into());
        if let Ok(Err(error)) = tokio::time::timeout(timeout, closing).await {
            tracing::debug!(%error, "Closing the derived-event connection failed; it was probably gone already.");
        }
    }
}

/// Publishes to the derived-event exchange, reconnecting when needed.
pub struct Publisher {
    config: DerivedConfig,
    /// `None` after a failure or before the first connection: the next publish connects.
    link: Option<Link>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("config", &self.config)
            .field(
                "connected",
                &self.link.as_ref().is_some_and(Link::is_usable),
            )
            .finish()
    }
}

impl Publisher {
    /// Connects and declares the exchange.
    ///
    /// # Errors
    /// [`DerivedError`] naming the broker (password redacted).
    pub async fn connect(config: DerivedConfig) -> Result<Self, DerivedError> {
        config.validate()?;
        let link = establish(&config).await?;
        Ok(Self {
            config,
            link: Some(link),
        })
    }

    /// Is a connection open right now?
    pub fn is_connected(&self) -> bool {
        self.link.as_ref().is_some_and(Link::is_usable)
    }

    /// Publishes `messages` in order and waits until the broker confirmed every one, within
    /// the confirm timeout. Nothing to publish is no I/O at all.
    ///
    /// # Errors
    /// [`DerivedError`]; the connection is then dropped, and some of the messages may have
    /// been published — committing the epoch again publishes them again with the same ids.
    pub async fn publish(&mut self, messages: &[Outgoing]) -> Result<(), DerivedError> {
        if messages.is_empty() {
            return Ok(());
        }
        let link = match self.link.take() {
            Some(link) if link.is_usable() => link,
            stale => {
                if let Some(stale) = stale {
                    stale.close(self.config.connect_timeout).await;
                }
                establish(&self.config).await?
            }
        };
        let timeout = self.config.confirm_timeout;
        let result = tokio::time::timeout(
            timeout,
            publish_confirmed(&link.channel, &self.config.exchange, messages),
        )
        .await
        .unwrap_or(Err(DerivedError::ConfirmTimeout(timeout)));
        match result {
            Ok(()) => {
                self.link = Some(link);
                Ok(())
            }
            Err(error) => {
                link.close(self.config.connect_timeout).await;
                Err(error)
            }
        }
    }

    /// Closes the connection cleanly.
    pub async fn close(&mut self) {
        if let Some(link) = self.link.take() {
            link.close(self.config.connect_timeout).await;
        }
    }
}

async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    messages: &[Outgoing],
) -> Result<(), DerivedError> {
    // Every message is sent before the first confirm is awaited: one round trip per epoch,
    // not per message.
    let mut confirms = Vec::with_capacity(messages.len());
    for message in messages {
        let confirm = channel
            .basic_publish(
                exchange.into(),
                message.routing_key.into(),
                // Not mandatory: a notification nobody has bound a queue for is dropped by
                // the broker, which is what a feed without subscribers means. Failing on it
                // would stop the whole pipeline for want of a listener.
                BasicPublishOptions::default(),
                &message.body,
                message.properties(),
            )
            .await
            .map_err(|error| DerivedError::Publish(Box::new(error)))?;
        confirms.push(confirm);
    }
    for confirm in confirms {
        match confirm
            .await
            .map_err(|error| DerivedError::Publish(Box::new(error)))?
        {
            Confirmation::Ack(_) => {}
            // The channel is in confirm mode, so this does not happen; if it did, nothing
            // would be known about the message, which is as bad as a nack.
            Confirmation::Nack(_) | Confirmation::NotRequested => {
                return Err(DerivedError::Nacked);
            }
        }
    }
    Ok(())
}

/// Connects, declares the exchange and enters confirm mode, within the connect timeout.
async fn establish(config: &DerivedConfig) -> Result<Link, DerivedError> {
    match tokio::time::timeout(config.connect_timeout, try_establish(config)).await {
        Ok(result) => result,
        Err(_elapsed) => Err(DerivedError::ConnectTimeout {
            url: config.redacted_url(),
            timeout: config.connect_timeout,
        }),
    }
}

async fn try_establish(config: &DerivedConfig) -> Result<Link, DerivedError> {
    let properties = ConnectionProperties::default()
        .with_connection_name(config.connection_name.as_str().into());
    let connection = Connection::connect(&config.url, properties)
        .await
        .map_err(|source| DerivedError::Connect {
            url: config.redacted_url(),
            source: Box::new(source),
        })?;
    match set_up(&connection, config).await {
        Ok(channel) => Ok(Link {
            connection,
            channel,
        }),
        Err(source) => {
            let _ = connection
                .close(REPLY_SUCCESS, "set-up failed".into())
                .await;
            Err(DerivedError::Declare {
                url: config.redacted_url(),
                exchange: config.exchange.clone(),
                source: Box::new(source),
            })
        }
    }
}

async fn set_up(connection: &Connection, config: &DerivedConfig) -> Result<Channel, lapin::Error> {
    let channel = connection.create_channel().await?;
    // Idempotent: declaring an exchange that exists with the same flags is a no-op.
    channel
        .exchange_declare(
            config.exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}
