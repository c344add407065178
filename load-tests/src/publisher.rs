//! [`Publisher`]: events to the topic exchange, with publisher confirms.
//!
//! Events are published one per message or as JSON arrays of up to `batch` events (the
//! contract allows both; an array's events share the routing key, so a batch never mixes
//! kinds). Every message is persistent and confirmed by the broker; at most
//! [`Publisher::window`] messages are unconfirmed at a time, which keeps memory bounded and
//! still lets the broker pipeline its confirms.

use std::collections::VecDeque;

use delivertrack_dataflow::Event;
use delivertrack_dataflow::contract::{CONTENT_TYPE, encode_event, encode_message};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, PublisherConfirm,
};

/// AMQP delivery mode 2: the message survives a broker restart, as real input should.
const PERSISTENT: u8 = 2;

/// Why publishing failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The broker could not be reached or the channel failed.
    #[error("RabbitMQ failed")]
    Broker(#[from] lapin::Error),
    /// The broker refused a message (a nack: it could not take responsibility for it).
    #[error("RabbitMQ refused a message")]
    Nacked,
    /// An event could not be encoded as JSON.
    #[error("an event could not be encoded")]
    Encode(#[from] serde_json::Error),
}

/// What a [`Publisher::publish_events`] call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PublishReport {
    /// Messages published and confirmed.
    pub messages: u64,
    /// Events in them.
    pub events: u64,
}

/// A confirmed channel to one broker.
#[derive(Debug)]
pub struct Publisher {
    connection: Connection,
    channel: Channel,
    /// Messages that may await their confirm at once.
    pub window: usize,
}

impl Publisher {
    /// Connects to `url` and opens a channel in confirm mode.
    ///
    /// # Errors
    /// The broker cannot be reached or refuses the channel.
    pub async fn connect(url: &str) -> Result<Self, PublishError> {
        let connection = Connection::connect(url, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self {
            connection,
            channel,
            window: 2_000,
        })
    }

    /// The channel, for declarations and inspection (a passive `queue_declare`, ...).
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Publishes `events` to `exchange`: one event per message when `batch` is 1 or 0,
    /// otherwise JSON arrays of up to `batch` consecutive events of one kind. Returns once
    /// the broker confirmed every message.
    ///
    /// # Errors
    /// The broker failed or refused a message.
    pub async fn publish_events(
        &self,
        exchange: &str,
        events: &[Event],
        batch: usize,
    ) -> Result<PublishReport, PublishError> {
        let mut report = PublishReport::default();
        let mut pending = VecDeque::new();
        let mut rest = events;
        while let Some(first) = rest.first() {
            let kind = first.kind();
            // The next chunk: up to `batch` events of the first one's kind (the scan stops
            // there, so publishing stays linear in the number of events).
            let size = rest
                .iter()
                .take(batch.max(1))
                .take_while(|e| e.kind() == kind)
                .count();
            let (chunk, tail) = rest.split_at(size);
            rest = tail;
            let payload = if batch <= 1 {
                serde_json::to_vec(&encode_event(first))?
            } else {
                encode_message(chunk)
            };
            if pending.len() >= self.window.max(1) {
                settle(pending.pop_front()).await?;
            }
            pending.push_back(self.send(exchange, kind.as_str(), &payload).await?);
            report.messages += 1;
            report.events += chunk.len() as u64;
        }
        while let Some(confirm) = pending.pop_front() {
            settle(Some(confirm)).await?;
        }
        Ok(report)
    }

    /// Publishes one message as it is (for malformed input in tests) and waits for its
    /// confirm.
    ///
    /// # Errors
    /// The broker failed or refused the message.
    pub async fn publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
    ) -> Result<(), PublishError> {
        let confirm = self.send(exchange, routing_key, payload).await?;
        settle(Some(confirm)).await
    }

    async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
    ) -> Result<PublisherConfirm, PublishError> {
        let properties = BasicProperties::default()
            .with_content_type(CONTENT_TYPE.into())
            .with_delivery_mode(PERSISTENT);
        Ok(self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                payload,
                properties,
            )
            .await?)
    }

    /// Closes the channel and the connection politely.
    ///
    /// # Errors
    /// The broker failed while closing.
    pub async fn close(self) -> Result<(), PublishError> {
        self.channel.close(200, "done".into()).await?;
        self.connection.close(200, "done".into()).await?;
        Ok(())
    }
}

async fn settle(confirm: Option<PublisherConfirm>) -> Result<(), PublishError> {
    match confirm {
        None => Ok(()),
        Some(confirm) => match confirm.await? {
            Confirmation::Nack(_) => Err(PublishError::Nacked),
            Confirmation::Ack(_) | Confirmation::NotRequested => Ok(()),
        },
    }
}
