//! The broker ceiling: how many events per second RabbitMQ moves on this machine when
//! nothing but a bare consumer stands behind it.
//!
//! On a fresh durable exchange and classic queue of its own (the pipeline's topology, so
//! the same per-message disk work), `publishers` confirmed channels publish persistent
//! messages as fast as their confirm windows allow, while one consumer with the pipeline's
//! prefetch takes them and acknowledges every `prefetch / 2` deliveries with a
//! multiple-ack — publish, consume and ack at once, like the pipeline under load, with no
//! decoding and no work. The messages are the fleet's own (`batch` location events per
//! message). The ceiling is the consumed events per second after a one-second warm-up.
//! The queue and exchange are deleted afterwards.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use delivertrack_dataflow::Event;
use delivertrack_dataflow::contract::{CONTENT_TYPE, encode_event, encode_message};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use serde::Serialize;
use tokio::sync::mpsc;

/// The measured ceiling.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct BrokerCeiling {
    /// Events per message.
    pub batch: usize,
    /// Publishing channels.
    pub publishers: usize,
    /// Consumer prefetch.
    pub prefetch: u16,
    /// Seconds measured (after the warm-up).
    pub seconds: f64,
    /// Events published and confirmed per second.
    pub published_per_s: f64,
    /// Events consumed and acknowledged per second: the ceiling.
    pub consumed_per_s: f64,
}

/// Why the ceiling could not be measured.
#[derive(Debug, thiserror::Error)]
#[error("the broker ceiling could not be measured: {0}")]
pub struct BrokerError(String);

impl From<lapin::Error> for BrokerError {
    fn from(error: lapin::Error) -> Self {
        Self(crate::target::error_chain(&error))
    }
}

/// Measures the ceiling for `duration` with messages made of `events` (cycled).
///
/// # Errors
/// [`BrokerError`] when RabbitMQ cannot be used.
pub async fn broker_ceiling(
    url: &str,
    events: &[Event],
    batch: usize,
    publishers: usize,
    prefetch: u16,
    duration: Duration,
) -> Result<BrokerCeiling, BrokerError> {
    let batch = batch.max(1);
    let payloads: Arc<Vec<Vec<u8>>> = Arc::new(if batch == 1 {
        events
            .iter()
            .map(|e| serde_json::to_vec(&encode_event(e)).unwrap_or_default())
            .collect()
    } else {
        events.chunks(batch).map(encode_message).collect()
    });
    if payloads.is_empty() {
        return Err(BrokerError("no events to publish".into()));
    }
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let exchange = format!("loadtest.ceiling.{suffix}");
    let queue = format!("loadtest.ceiling.{suffix}");

    let admin = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = admin.create_channel().await?;
    channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;

    let result = measure(
        url, &exchange, &queue, payloads, batch, publishers, prefetch, duration,
    )
    .await;

    let _ = channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = channel
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await;
    let _ = admin.close(200, "done".into()).await;
    result
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    url: &str,
    exchange: &str,
    queue: &str,
    payloads: Arc<Vec<Vec<u8>>>,
    batch: usize,
    publishers: usize,
    prefetch: u16,
    duration: Duration,
) -> Result<BrokerCeiling, BrokerError> {
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let consumed = Arc::new(AtomicU64::new(0));

    // The consumer first, so that nothing piles up before it runs.
    let consumer_connection = Connection::connect(url, ConnectionProperties::default()).await?;
    let consumer_channel = consumer_connection.create_channel().await?;
    consumer_channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = consumer_channel
        .basic_consume(
            queue.into(),
            "ceiling".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let consumer_task = {
        let stop = Arc::clone(&stop);
        let consumed = Arc::clone(&consumed);
        let every = u64::from(prefetch / 2).max(1);
        tokio::spawn(async move {
            let mut received = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let next = tokio::time::timeout(Duration::from_millis(200), consumer.next()).await;
                let Ok(Some(Ok(delivery))) = next else {
                    continue;
                };
                received += 1;
                consumed.fetch_add(batch as u64, Ordering::Relaxed);
                if received.is_multiple_of(every) {
                    let _ = delivery.acker.ack(BasicAckOptions { multiple: true }).await;
                }
            }
        })
    };

    let mut connections = Vec::new();
    let mut tasks = Vec::new();
    for p in 0..publishers.max(1) {
        let connection = Connection::connect(url, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let (confirms_tx, mut confirms_rx) = mpsc::channel::<lapin::PublisherConfirm>(2_000);
        let settled = {
            let published = Arc::clone(&published);
            tokio::spawn(async move {
                while let Some(confirm) = confirms_rx.recv().await {
                    if matches!(confirm.await, Ok(lapin::Confirmation::Ack(_))) {
                        published.fetch_add(batch as u64, Ordering::Relaxed);
                    }
                }
            })
        };
        let stop = Arc::clone(&stop);
        let payloads = Arc::clone(&payloads);
        let exchange = exchange.to_owned();
        tasks.push(tokio::spawn(async move {
            let properties = BasicProperties::default()
                .with_content_type(CONTENT_TYPE.into())
                .with_delivery_mode(2);
            let mut i = p;
            while !stop.load(Ordering::Relaxed) {
                let payload = &payloads[i % payloads.len()];
                i += 1;
                match channel
                    .basic_publish(
                        exchange.as_str().into(),
                        "location.updated".into(),
                        BasicPublishOptions::default(),
                        payload,
                        properties.clone(),
                    )
                    .await
                {
                    Ok(confirm) => {
                        if confirms_tx.send(confirm).await.is_err() {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
            drop(confirms_tx);
            let _ = settled.await;
            let _ = channel.close(200, "done".into()).await;
        }));
        connections.push(connection);
    }

    let warm_up = Duration::from_secs(1);
    tokio::time::sleep(warm_up).await;
    let (p0, c0, t0) = (
        published.load(Ordering::Relaxed),
        consumed.load(Ordering::Relaxed),
        Instant::now(),
    );
    tokio::time::sleep(duration.saturating_sub(warm_up).max(Duration::from_secs(1))).await;
    let (p1, c1, seconds) = (
        published.load(Ordering::Relaxed),
        consumed.load(Ordering::Relaxed),
        t0.elapsed().as_secs_f64(),
    );
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
    let _ = consumer_task.await;
    for connection in connections {
        let _ = connection.close(200, "done".into()).await;
    }
    let _ = consumer_connection.close(200, "done".into()).await;
    Ok(BrokerCeiling {
        batch,
        publishers,
        prefetch,
        seconds,
        published_per_s: (p1 - p0) as f64 / seconds,
        consumed_per_s: (c1 - c0) as f64 / seconds,
    })
}
