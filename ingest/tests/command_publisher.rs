//! The command publisher against the real broker (`RABBITMQ_URL`, default the local one).
//!
//! Each test has its own exchange and queue names ([`unique_config`]), deleted at the end
//! ([`TopologyGuard`], also on a panic). A test queue bound to the exchange is the consumer:
//! what the publisher confirmed must be in it, byte for byte the contract's JSON.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use delivertrack_dataflow::contract::{ContractLimits, decode_message};
use delivertrack_dataflow::event::{LocationUpdated, ZoneDeleted};
use delivertrack_dataflow::geometry::GeoPoint;
use delivertrack_dataflow::{CourierId, Event, EventBody, EventId, EventKind, ZoneId};
use delivertrack_ingest::rabbitmq::{
    CommandPublishError, CommandPublisher, CommandPublisherConfig,
};
use delivertrack_ingest::testing::{TcpProxy, TopologyGuard, broker_addr, unique_config, url_via};
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, Consumer};
use tokio::time::{Instant, timeout};
use uuid::Uuid;

/// The longest any awaited condition may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(20);

fn location(n: u128) -> Event {
    Event {
        event_id: EventId(Uuid::new_v4()),
        occurred_at: 1_790_000_000_000 + n as i64,
        body: EventBody::LocationUpdated(LocationUpdated {
            courier_id: CourierId(Uuid::from_u128(n)),
            position: GeoPoint::from_degrees(52.52, 13.405),
            speed_mm_s: Some(4_500),
            heading_ddeg: None,
            accuracy_cm: None,
        }),
    }
}

/// A queue of this test bound to `exchange` with `binding`, and a consumer on it.
async fn consumer(
    url: &str,
    exchange: &str,
    queue: &str,
    binding: &str,
) -> (Connection, Channel, Consumer) {
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("RabbitMQ must be reachable at RABBITMQ_URL");
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            binding.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    (connection, channel, consumer)
}

/// The next message's routing key, content type, delivery mode and the events it holds.
async fn receive(consumer: &mut Consumer) -> (String, Option<String>, Option<u8>, Vec<Event>) {
    let delivery = timeout(PATIENCE, consumer.next())
        .await
        .expect("a message within the bound")
        .expect("the consumer is open")
        .unwrap();
    delivery.ack(BasicAckOptions::default()).await.unwrap();
    let routing_key = delivery.routing_key.to_string();
    let decoded = decode_message(
        Some(&routing_key),
        &delivery.data,
        1_790_000_000_000,
        &ContractLimits::default(),
    );
    assert!(decoded.errors.is_empty(), "{:?}", decoded.errors);
    (
        routing_key,
        delivery
            .properties
            .content_type()
            .as_ref()
            .map(ToString::to_string),
        *delivery.properties.delivery_mode(),
        decoded.events,
    )
}

#[tokio::test]
async fn a_confirmed_event_is_in_a_bound_queue_as_the_contract_writes_it() {
    let rabbit = unique_config("commands");
    let _cleanup = TopologyGuard::new(&rabbit);
    let publisher = CommandPublisher::connect(CommandPublisherConfig::for_source(&rabbit))
        .await
        .unwrap();
    // The publisher declared the exchange; the test's queue takes every kind.
    let (_connection, _channel, mut consumer) =
        consumer(&rabbit.url, &rabbit.exchange, &rabbit.queue, "#").await;

    let events: Vec<Event> = (1..=20).map(location).collect();
    // Concurrent publishes share the channel; each resolves on its own confirm.
    let results = futures::future::join_all(events.iter().map(|e| publisher.publish(e))).await;
    for result in results {
        result.unwrap();
    }
    let mut received = Vec::new();
    for _ in 0..events.len() {
        let (routing_key, content_type, mode, mut decoded) = receive(&mut consumer).await;
        assert_eq!(routing_key, "location.updated");
        assert_eq!(content_type.as_deref(), Some("application/json"));
        assert_eq!(mode, Some(2), "persistent");
        assert_eq!(decoded.len(), 1, "one event per message");
        received.append(&mut decoded);
    }
    received.sort_by_key(|e| e.occurred_at);
    assert_eq!(received, events);

    // Another kind travels under its own routing key.
    let zone = Event {
        event_id: EventId(Uuid::new_v4()),
        occurred_at: 1_790_000_000_000,
        body: EventBody::ZoneDeleted(ZoneDeleted {
            zone_id: ZoneId(Uuid::new_v4()),
        }),
    };
    publisher.publish(&zone).await.unwrap();
    let (routing_key, _, _, decoded) = receive(&mut consumer).await;
    assert_eq!(routing_key, EventKind::ZoneDeleted.as_str());
    assert_eq!(decoded, vec![zone]);
    publisher.close().await;
}

#[tokio::test]
async fn an_event_no_queue_takes_is_an_error_not_a_silent_drop() {
    let rabbit = unique_config("commands-unroutable");
    let _cleanup = TopologyGuard::new(&rabbit);
    let publisher = CommandPublisher::connect(CommandPublisherConfig::for_source(&rabbit))
        .await
        .unwrap();
    // Only zone events are bound: a location is returned by the broker.
    let (_connection, _channel, mut consumer) =
        consumer(&rabbit.url, &rabbit.exchange, &rabbit.queue, "zone.*").await;
    let error = publisher.publish(&location(1)).await.unwrap_err();
    assert!(
        matches!(&error, CommandPublishError::Unroutable { routing_key, .. } if routing_key == "location.updated"),
        "{error:?}"
    );
    assert!(!error.maybe_published());
    // The channel survives a return: the next routable publish goes through.
    let zone = Event {
        event_id: EventId(Uuid::new_v4()),
        occurred_at: 1_790_000_000_000,
        body: EventBody::ZoneDeleted(ZoneDeleted {
            zone_id: ZoneId(Uuid::new_v4()),
        }),
    };
    publisher.publish(&zone).await.unwrap();
    let (_, _, _, decoded) = receive(&mut consumer).await;
    assert_eq!(decoded, vec![zone]);
}

#[tokio::test]
async fn a_lost_connection_fails_the_publish_then_is_replaced_with_backoff() {
    let rabbit = unique_config("commands-reconnect");
    let _cleanup = TopologyGuard::new(&rabbit);
    let (_connection, _channel, mut consumer) = {
        // The exchange must exist before the test's queue binds to it.
        let direct = CommandPublisher::connect(CommandPublisherConfig::for_source(&rabbit))
            .await
            .unwrap();
        direct.close().await;
        consumer(&rabbit.url, &rabbit.exchange, &rabbit.queue, "#").await
    };
    let proxy = TcpProxy::start(broker_addr(&rabbit.url).await.unwrap())
        .await
        .unwrap();
    let config = CommandPublisherConfig {
        url: url_via(&rabbit.url, proxy.addr()),
        reconnect_min: Duration::from_millis(200),
        reconnect_max: Duration::from_millis(400),
        connect_timeout: Duration::from_secs(2),
        ..CommandPublisherConfig::for_source(&rabbit)
    };
    let publisher = CommandPublisher::connect(config).await.unwrap();
    let first = location(1);
    publisher.publish(&first).await.unwrap();
    assert_eq!(receive(&mut consumer).await.3, vec![first]);

    proxy.cut();
    // The publish that meets the cut connection fails (a broker error or a late confirm):
    // it is never answered as published.
    let second = location(2);
    let error = timeout(PATIENCE, publisher.publish(&second))
        .await
        .expect("the publish is bounded")
        .unwrap_err();
    tracing::info!(%error, "The publish on the cut connection failed.");
    // While the broker is unreachable, publishes fail at once: a refused connection, then
    // the backoff.
    let started = Instant::now();
    for _ in 0..3 {
        let error = publisher.publish(&second).await.unwrap_err();
        assert!(
            matches!(
                error,
                CommandPublishError::Connect { .. } | CommandPublishError::Backoff { .. }
            ),
            "{error:?}"
        );
        assert!(!error.maybe_published());
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "no publish waits out a timeout"
    );

    proxy.restore();
    let deadline = Instant::now() + PATIENCE;
    loop {
        match publisher.publish(&second).await {
            Ok(()) => break,
            Err(CommandPublishError::Backoff { retry_in, .. }) => {
                assert!(
                    retry_in <= Duration::from_millis(400),
                    "the backoff is capped"
                );
                tokio::time::sleep(retry_in).await;
            }
            Err(error) => panic!("after the restore: {error:?}"),
        }
        assert!(Instant::now() < deadline, "never reconnected");
    }
    assert_eq!(receive(&mut consumer).await.3, vec![second]);
    publisher.close().await;
}
