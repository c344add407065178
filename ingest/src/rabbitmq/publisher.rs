//! [`CommandPublisher`]: the API's commands, published as events to the events exchange
//! with publisher confirms.
//!
//! Each event goes out as one message: the contract's JSON ([`encode_event`]), routing
//! key = its kind, `content_type: application/json`, persistent, and **mandatory**, so that
//! a message no queue is bound for comes back (`basic.return`) instead of vanishing.
//! [`CommandPublisher::publish`] resolves only once the broker confirmed the message
//! (`basic.ack`), within [`CommandPublisherConfig::confirm_timeout`]; a nack, a return, a
//! lost connection or a late confirm is an error, never a silent drop.
//!
//! The publisher has a connection of its own (named `{connection_name}-commands`), apart
//! from the source's: a publish never waits behind the consumer's traffic, and a refused
//! publish, which closes its channel, cannot take the consumer down. A lost connection is
//! replaced at the next publish; while the broker stays unreachable, attempts are spaced by
//! a capped exponential backoff, and the publishes in between fail at once
//! ([`CommandPublishError::Backoff`]) rather than each waiting for a connect timeout.
//! Concurrent publishes share one confirmed channel: the broker pipelines their confirms.

use std::sync::Arc;
use std::time::Duration;

use delivertrack_dataflow::Event;
use delivertrack_dataflow::contract::{CONTENT_TYPE, encode_event};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::FieldTable;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use tokio::sync::Mutex;
use tokio::time::{Instant, timeout};

use super::config::RabbitConfig;
use super::link::Backoff;

/// AMQP delivery mode 2: the message survives a broker restart.
const PERSISTENT: u8 = 2;

/// AMQP reply code of a normal close.
const REPLY_SUCCESS: u16 = 200;

/// Where and how commands are published.
#[derive(Clone, Debug)]
pub struct CommandPublisherConfig {
    /// The broker's AMQP URI; only ever logged redacted.
    pub url: String,
    /// The durable topic exchange the pipeline consumes from (declared, idempotently, at
    /// every connection, so that publishing never fails on a missing exchange).
    pub exchange: String,
    /// The connection's name in `rabbitmqctl list_connections`.
    pub connection_name: String,
    /// How long one connection attempt may take.
    pub connect_timeout: Duration,
    /// How long the broker may take to confirm one message. Also bounds the publish
    /// itself: a connection stuck in a full TCP buffer is an error, not a hang.
    pub confirm_timeout: Duration,
    /// The first pause after a failed connection attempt ...
    pub reconnect_min: Duration,
    /// ... doubling up to this.
    pub reconnect_max: Duration,
}

impl CommandPublisherConfig {
    /// The publisher of the pipeline that `config` consumes for: the same broker and
    /// exchange, a connection named after the source's with `-commands`, and bounds short
    /// enough for an HTTP request (connect 3 s, confirm 3 s, backoff 100 ms to 5 s).
    pub fn for_source(config: &RabbitConfig) -> Self {
        Self {
            url: config.url.clone(),
            exchange: config.exchange.clone(),
            connection_name: format!("{}-commands", config.connection_name),
            connect_timeout: Duration::from_secs(3),
            confirm_timeout: Duration::from_secs(3),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
        }
    }

    /// The URL with its password replaced by `***`.
    pub fn redacted_url(&self) -> String {
        super::config::redact(&self.url)
    }
}

/// Why a command could not be published.
#[derive(Debug, thiserror::Error)]
pub enum CommandPublishError {
    /// No connection could be made (TCP, authentication, the exchange declaration).
    #[error("cannot connect to RabbitMQ at {url}: {reason}")]
    Connect {
        /// The broker, password redacted.
        url: String,
        /// Why.
        reason: String,
    },
    /// The last connection attempt failed and the next is not due yet.
    #[error("RabbitMQ is unreachable (next attempt in {} ms): {last_error}", retry_in.as_millis())]
    Backoff {
        /// Until the next attempt.
        retry_in: Duration,
        /// What the last attempt reported.
        last_error: String,
    },
    /// The channel or connection failed while publishing; it is replaced at the next publish.
    #[error("RabbitMQ failed while publishing: {0}")]
    Broker(#[source] lapin::Error),
    /// The broker took no responsibility for the message (`basic.nack`).
    #[error("RabbitMQ refused the message (nack)")]
    Nacked,
    /// No queue is bound for the routing key: the broker returned the message.
    #[error(
        "no queue is bound to exchange {exchange:?} for routing key {routing_key:?}; the message was returned"
    )]
    Unroutable {
        /// The exchange.
        exchange: String,
        /// The event's kind.
        routing_key: String,
    },
    /// The confirm did not come within the bound; the connection is replaced.
    #[error("RabbitMQ did not confirm the message within {} ms", .0.as_millis())]
    ConfirmTimeout(Duration),
    /// The channel is not in confirm mode (cannot happen with this publisher's channels).
    #[error("the channel did not confirm the message")]
    NotConfirmed,
    /// The event could not be encoded.
    #[error("the event could not be encoded: {0}")]
    Encode(#[from] serde_json::Error),
}

impl CommandPublishError {
    /// Was the message possibly taken by the broker? `false`: it certainly was not
    /// published (no connection, refused, returned); `true`: it was sent and its fate is
    /// unknown (the connection failed or the confirm was late).
    pub fn maybe_published(&self) -> bool {
        matches!(
            self,
            CommandPublishError::Broker(_) | CommandPublishError::ConfirmTimeout(_)
        )
    }
}

/// One connection with its confirmed channel.
#[derive(Debug)]
struct Link {
    connection: Connection,
    channel: Channel,
}

impl Link {
    fn is_usable(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }
}

/// The current link and the reconnection backoff, behind one async lock: one task
/// connects while the others wait for it.
#[derive(Debug)]
struct LinkState {
    current: Option<Arc<Link>>,
    backoff: Backoff,
    /// Set after a failed attempt: no new attempt before this.
    retry_at: Option<Instant>,
    last_error: String,
}

/// Publishes events with confirms on a connection of its own; see the module docs.
#[derive(Debug)]
pub struct CommandPublisher {
    config: CommandPublisherConfig,
    state: Mutex<LinkState>,
}

impl CommandPublisher {
    /// Connects to the broker and declares the exchange.
    ///
    /// # Errors
    /// [`CommandPublishError::Connect`] naming the broker.
    pub async fn connect(config: CommandPublisherConfig) -> Result<Self, CommandPublishError> {
        let link = establish(&config).await?;
        let backoff = Backoff::new(config.reconnect_min, config.reconnect_max);
        Ok(Self {
            state: Mutex::new(LinkState {
                current: Some(Arc::new(link)),
                backoff,
                retry_at: None,
                last_error: String::new(),
            }),
            config,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &CommandPublisherConfig {
        &self.config
    }

    /// Publishes `event` to the exchange with its kind as routing key and resolves once the
    /// broker confirmed it.
    ///
    /// # Errors
    /// Any [`CommandPublishError`]: the event is then not known to be published.
    pub async fn publish(&self, event: &Event) -> Result<(), CommandPublishError> {
        let payload = serde_json::to_vec(&encode_event(event))?;
        let routing_key = event.kind().as_str();
        let link = self.link().await?;
        let properties = BasicProperties::default()
            .with_content_type(CONTENT_TYPE.into())
            .with_delivery_mode(PERSISTENT)
            .with_message_id(event.event_id.to_string().into());
        let options = BasicPublishOptions {
            mandatory: true,
            immediate: false,
        };
        let exchange = self.config.exchange.as_str();
        let sent = timeout(self.config.confirm_timeout, async {
            link.channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    options,
                    &payload,
                    properties,
                )
                .await?
                .await
        })
        .await;
        match sent {
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(_returned)))) => Err(CommandPublishError::Unroutable {
                exchange: self.config.exchange.clone(),
                routing_key: routing_key.to_owned(),
            }),
            Ok(Ok(Confirmation::Nack(_))) => Err(CommandPublishError::Nacked),
            Ok(Ok(Confirmation::NotRequested)) => Err(CommandPublishError::NotConfirmed),
            Ok(Err(error)) => {
                self.discard(&link).await;
                Err(CommandPublishError::Broker(error))
            }
            Err(_elapsed) => {
                self.discard(&link).await;
                Err(CommandPublishError::ConfirmTimeout(
                    self.config.confirm_timeout,
                ))
            }
        }
    }

    /// Closes the connection politely (within the connect timeout).
    pub async fn close(&self) {
        let link = self.state.lock().await.current.take();
        if let Some(link) = link {
            close(
                &link,
                "the publisher is closing",
                self.config.connect_timeout,
            )
            .await;
        }
    }

    /// The current usable link, or a new one when none is and the backoff allows it.
    async fn link(&self) -> Result<Arc<Link>, CommandPublishError> {
        let mut state = self.state.lock().await;
        if let Some(link) = &state.current {
            if link.is_usable() {
                return Ok(Arc::clone(link));
            }
            tracing::warn!(url = %self.config.redacted_url(), "The command publisher's RabbitMQ connection was lost; reconnecting.");
            state.current = None;
        }
        if let Some(retry_at) = state.retry_at {
            let now = Instant::now();
            if now < retry_at {
                return Err(CommandPublishError::Backoff {
                    retry_in: retry_at - now,
                    last_error: state.last_error.clone(),
                });
            }
        }
        match establish(&self.config).await {
            Ok(link) => {
                if state.retry_at.is_some() {
                    tracing::info!(url = %self.config.redacted_url(), "The command publisher is connected to RabbitMQ again.");
                }
                let link = Arc::new(link);
                state.current = Some(Arc::clone(&link));
                state.retry_at = None;
                state.backoff = Backoff::new(self.config.reconnect_min, self.config.reconnect_max);
                Ok(link)
            }
            Err(error) => {
                let pause = state.backoff.next_pause();
                if state.retry_at.is_none() {
                    tracing::warn!(%error, "The command publisher cannot reach RabbitMQ; commands are refused until it can.");
                }
                state.retry_at = Some(Instant::now() + pause);
                state.last_error = error.to_string();
                Err(error)
            }
        }
    }

    /// Forgets `link` after it failed (if it is still the current one), so that the next
    /// publish connects anew.
    async fn discard(&self, link: &Arc<Link>) {
        let stale = {
            let mut state = self.state.lock().await;
            match &state.current {
                Some(current) if Arc::ptr_eq(current, link) => state.current.take(),
                _ => None,
            }
        };
        if let Some(stale) = stale {
            close(&stale, "replaced after an error", Duration::from_secs(1)).await;
        }
    }
}

/// Connects, opens a channel in confirm mode and declares the exchange, within the
/// connect timeout.
async fn establish(config: &CommandPublisherConfig) -> Result<Link, CommandPublishError> {
    let failed = |reason: String| CommandPublishError::Connect {
        url: config.redacted_url(),
        reason,
    };
    let attempt = async {
        let properties = ConnectionProperties::default()
            .with_connection_name(config.connection_name.as_str().into());
        let connection =
            Connection::connect(&super::normalize_url(&config.url), properties).await?;
        let set_up = async {
            let channel = connection.create_channel().await?;
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
            Ok::<_, lapin::Error>(channel)
        };
        match set_up.await {
            Ok(channel) => Ok(Link {
                connection,
                channel,
            }),
            Err(error) => {
                let _ = connection
                    .close(REPLY_SUCCESS, "set-up failed".into())
                    .await;
                Err(error)
            }
        }
    };
    match timeout(config.connect_timeout, attempt).await {
        Ok(Ok(link)) => Ok(link),
        Ok(Err(error)) => Err(failed(error.to_string())),
        Err(_elapsed) => Err(failed(format!(
            "no connection within {} ms",
            config.connect_timeout.as_millis()
        ))),
    }
}

async fn close(link: &Link, reason: &str, bound: Duration) {
    if let Ok(Err(error)) =
        timeout(bound, link.connection.close(REPLY_SUCCESS, reason.into())).await
    {
        tracing::debug!(%error, "Closing the command publisher's connection failed; it was probably gone already.");
    }
}
