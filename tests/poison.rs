//! Poison isolation (ARCHITECTURE rule 11) against the real PostgreSQL and RabbitMQ: an
//! event that PostgreSQL refuses for good — here a `CHECK` constraint the test adds to its
//! own database, which refuses one delivery's row (SQLSTATE 23514), a refusal the contract
//! cannot foresee — is dead-lettered with `sink_refused:postgres:23514` and kept out of
//! every store, while the rest of its epoch commits and is acknowledged; the pipeline keeps
//! running, and a restart on the same database and queue does not fail.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use delivertrack::{PipelineConfig, RunConfig, RunHooks, StoresConfig, run_pipeline_on};
use delivertrack_dataflow::event::DeliveryCreated;
use delivertrack_dataflow::geometry::GeoPoint;
use delivertrack_dataflow::{CustomerId, DeliveryId, Event, EventBody, EventId};
use delivertrack_ingest::rabbitmq::dead_letter::{HEADER_EVENT_ID, HEADER_REASON, HEADER_STAGE};
use delivertrack_ingest::testing::{TopologyGuard, unique_config};
use delivertrack_sinks::postgres::{connect_pool, ensure_database, migrate};
use delivertrack_sinks::{PostgresConfig, ReadModel, ReadModelSink, Sink};
use sqlx::postgres::PgPool;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::time::timeout;
use uuid::Uuid;

use support::{
    Database, eventually, now_ms, publisher, ready_messages, scrape, take_dead_letters, url_of,
};

const PATIENCE: Duration = Duration::from_secs(90);

fn created(delivery: Uuid, at: i64) -> Event {
    Event {
        event_id: EventId(Uuid::new_v4()),
        occurred_at: at,
        body: EventBody::DeliveryCreated(DeliveryCreated {
            delivery_id: DeliveryId(delivery),
            customer_id: CustomerId(Uuid::new_v4()),
            pickup: GeoPoint::from_degrees(52.52, 13.40),
            dropoff: GeoPoint::from_degrees(52.50, 13.42),
            promised_by: None,
        }),
    }
}

async fn count(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// Starts `run` in-process with PostgreSQL and an extra read model after it; returns the
/// API address, the stop switch and the task.
async fn start(
    config: RunConfig,
    model: &ReadModel,
) -> (
    std::net::SocketAddr,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<anyhow::Result<delivertrack::DriveReport>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (started_tx, started_rx) = oneshot::channel();
    let sinks: Vec<Box<dyn Sink>> = vec![Box::new(ReadModelSink::new(model.clone()))];
    let hooks = RunHooks {
        extra_sinks: sinks,
        started: Some(started_tx),
    };
    let task = tokio::spawn(run_pipeline_on(listener, config, hooks, async {
        let _ = stop_rx.await;
    }));
    timeout(PATIENCE, started_rx)
        .await
        .expect("the pipeline starts in time")
        .expect("the pipeline started");
    (addr, stop_tx, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_postgres_refuses_is_dead_lettered_and_the_rest_of_its_epoch_commits() {
    let rabbit = unique_config("poison");
    let _cleanup = TopologyGuard::new(&rabbit);
    let database = Database::new("poison");
    let postgres = PostgresConfig::from_url(url_of(&database.name, None));
    // The schema, then a constraint only this test's database has: one delivery's row is
    // refused for good.
    ensure_database(&postgres).await.unwrap();
    let setup = connect_pool(&postgres).await.unwrap();
    migrate(&setup).await.unwrap();
    let poison = Uuid::new_v4();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE deliveries ADD CONSTRAINT refuses_one CHECK (id <> '{poison}'::uuid)"
    )))
    .execute(&setup)
    .await
    .unwrap();
    setup.close().await;

    let config = RunConfig {
        pipeline: PipelineConfig {
            workers: 2,
            epoch_max_events: 100,
            // Long enough that the poison shares its epoch with others.
            epoch_max_wait: Duration::from_millis(300),
            ..PipelineConfig::default()
        },
        rabbit: rabbit.clone(),
        stores: StoresConfig {
            postgres: Some(postgres.clone()),
            ..StoresConfig::default()
        },
        shutdown_timeout: Duration::from_secs(30),
        ..RunConfig::default()
    };
    let publisher = publisher(&rabbit).await;
    let model = ReadModel::default();
    let (addr, stop, task) = start(config.clone(), &model).await;
    let pool = database.pool().await;
    let client = reqwest::Client::new();

    let start_ms = now_ms() - 60_000;
    let mut events: Vec<Event> = (0..40)
        .map(|i| created(Uuid::new_v4(), start_ms + i))
        .collect();
    let poison_event = created(poison, start_ms + 20);
    events.insert(20, poison_event.clone());
    publisher
        .publish_events(&rabbit.exchange, &events, 1)
        .await
        .unwrap();

    // Everything is committed and acknowledged: the queue drained, nothing in flight.
    eventually("every other delivery is committed", PATIENCE, || async {
        let ready = ready_messages(&publisher, &rabbit.queue).await;
        let series = scrape(&client, &format!("http://{addr}/metrics")).await;
        let in_flight = series.get("delivertrack_messages_in_flight").copied();
        let stored = count(&pool, "SELECT count(*) FROM deliveries").await;
        (ready == 0 && in_flight == Some(0.0) && stored == 40).then_some(())
    })
    .await;
    assert!(!task.is_finished(), "the pipeline keeps running");
    assert_eq!(count(&pool, "SELECT count(*) FROM event_log").await, 40);
    let stored_poison: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM deliveries WHERE id = $1)
              + (SELECT count(*) FROM event_log WHERE event_id = $2)",
    )
    .bind(poison)
    .bind(poison_event.event_id.0)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(stored_poison, 0, "the refused event is in no table");

    // The dead letter, with the sink and its SQLSTATE.
    let dead = eventually("the refused event is dead-lettered", PATIENCE, || async {
        let dead = ready_messages(&publisher, &rabbit.dead_letter_queue).await;
        (dead >= 1).then_some(dead)
    })
    .await;
    assert_eq!(dead, 1, "only the refused event is dead-lettered");
    let letter = take_dead_letters(&publisher, &rabbit.dead_letter_queue, 1)
        .await
        .remove(0);
    assert_eq!(letter[HEADER_REASON], "sink_refused:postgres:23514");
    assert_eq!(letter[HEADER_STAGE], "sink");
    assert_eq!(letter[HEADER_EVENT_ID], poison_event.event_id.to_string());

    let series = scrape(&client, &format!("http://{addr}/metrics")).await;
    assert_eq!(
        series.get("delivertrack_events_rejected_total{reason=\"sink_refused:postgres:23514\"}"),
        Some(&1.0),
        "{series:?}"
    );
    // The sinks after PostgreSQL never saw it, and hold every other delivery.
    assert!(model.delivery(DeliveryId(poison)).is_none());
    assert_eq!(model.snapshot().counts.deliveries, 40);

    // It goes on: later input commits as usual.
    let later: Vec<Event> = (0..5)
        .map(|i| created(Uuid::new_v4(), start_ms + 100 + i))
        .collect();
    publisher
        .publish_events(&rabbit.exchange, &later, 1)
        .await
        .unwrap();
    eventually("later input is committed", PATIENCE, || async {
        (count(&pool, "SELECT count(*) FROM deliveries").await == 45).then_some(())
    })
    .await;
    let _ = stop.send(());
    timeout(PATIENCE, task)
        .await
        .expect("the pipeline stops within the bound")
        .unwrap()
        .expect("the pipeline stopped cleanly");

    // A restart on the same database and queue starts and stops cleanly.
    let model = ReadModel::default();
    let (_, stop, task) = start(config, &model).await;
    eventually("the restart restores the deliveries", PATIENCE, || async {
        (model.snapshot().counts.deliveries == 45).then_some(())
    })
    .await;
    assert!(model.delivery(DeliveryId(poison)).is_none());
    let _ = stop.send(());
    timeout(PATIENCE, task)
        .await
        .expect("the restart stops within the bound")
        .unwrap()
        .expect("the restart stopped cleanly");
    assert_eq!(ready_messages(&publisher, &rabbit.queue).await, 0);
    pool.close().await;
    database.drop_now().await;
}
