//! The broker-side topology, declared idempotently at every (re)connection.
//!
//! ```text
//!  publishers ──► exchange `delivertrack.events` (topic, durable)
//!                   │ bindings: location.updated · delivery.created · status.changed
//!                   │           delivery.rated · zone.upserted · zone.deleted
//!                   ▼
//!                 queue `delivertrack.ingest` (classic, durable) ──► this source
//!
//!  refused events ──► exchange `delivertrack.dead` (topic, durable)
//!                   │ binding: `#`
//!                   ▼
//!                 queue `delivertrack.dead` (classic, durable)
//! ```
//!
//! Declaring everything on every connection means publishers need only the exchange name,
//! and a broker that lost its definitions (a fresh node, a deleted queue) is repaired by the
//! next reconnection. Declarations of what exists with the same flags are no-ops.
//!
//! # Why a classic queue
//!
//! The ingest queue is a durable **classic** queue, not a quorum queue. The brokers this runs
//! on are single nodes: a quorum queue's Raft log buys replication only across nodes, so on
//! one node it adds a write-ahead log and fsync per message for no gain in safety, and
//! classic queues consume faster. What protects events is already in place: the queue is
//! durable, publishers mark messages persistent, and a delivery is acked only after every
//! sink committed it, so a crash redelivers instead of losing. Poison messages, the usual
//! reason for quorum queues' `x-delivery-limit`, cannot loop here: an event that fails to
//! decode is dead-lettered and acked, never requeued. On a multi-node cluster, switching to a
//! quorum queue is a deliberate migration (a queue's type cannot change on redeclaration).

use delivertrack_dataflow::EventKind;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, ExchangeKind};

use super::config::RabbitConfig;

/// The binding of the dead-letter queue: every routing key.
pub const DEAD_LETTER_BINDING: &str = "#";

/// Declares the exchanges, queues and bindings of `config`; a no-op for what exists already.
///
/// # Errors
/// The broker refused a declaration — typically `PRECONDITION_FAILED` because an object of
/// that name exists with other flags (a non-durable queue, another exchange type) — or the
/// channel failed. A refused declaration closes `channel`.
pub async fn declare_topology(
    channel: &Channel,
    config: &RabbitConfig,
) -> Result<(), lapin::Error> {
    let durable_exchange = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    let durable_queue = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .exchange_declare(
            config.exchange.as_str().into(),
            ExchangeKind::Topic,
            durable_exchange,
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            config.queue.as_str().into(),
            durable_queue,
            FieldTable::default(),
        )
        .await?;
    for kind in EventKind::ALL {
        channel
            .queue_bind(
                config.queue.as_str().into(),
                config.exchange.as_str().into(),
                kind.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    channel
        .exchange_declare(
            config.dead_letter_exchange.as_str().into(),
            ExchangeKind::Topic,
            durable_exchange,
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            config.dead_letter_queue.as_str().into(),
            durable_queue,
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            config.dead_letter_queue.as_str().into(),
            config.dead_letter_exchange.as_str().into(),
            DEAD_LETTER_BINDING.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}
