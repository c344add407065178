//! One writer per database (ARCHITECTURE rule 10), against the real PostgreSQL on
//! localhost: the writer lock a standby waits for, and the fence that keeps a writer that
//! is no longer the writer from committing — above all, from "skipping" an epoch another
//! writer's progress covers and having it acknowledged.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use delivertrack_dataflow::event::{DeliveryCreated, Event, EventBody};
use delivertrack_dataflow::geometry::GeoPoint;
use delivertrack_dataflow::pipeline::{self, DataflowConfig};
use delivertrack_dataflow::{CustomerId, DeliveryId, EpochOutput, EventId};
use delivertrack_sinks::postgres::{
    LockWatch, PostgresConfig, PostgresSink, WRITER_LOCK_KEY, WriterLock, claim_generation,
};
use delivertrack_sinks::{Sink, SinkError};
use sqlx::PgPool;
use uuid::Uuid;

/// `epochs` epochs of `per_epoch` new deliveries each, as one process's dataflow numbers
/// them (from 0).
fn outputs(epochs: usize, per_epoch: usize) -> Vec<Arc<EpochOutput>> {
    let now = i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    let (mut input, mut output) = pipeline::start(DataflowConfig {
        workers: 1,
        ..DataflowConfig::default()
    })
    .unwrap();
    let mut out = Vec::new();
    for _ in 0..epochs {
        let batch: Vec<Event> = (0..per_epoch)
            .map(|_| Event {
                event_id: EventId(Uuid::new_v4()),
                occurred_at: now - 60_000,
                body: EventBody::DeliveryCreated(DeliveryCreated {
                    delivery_id: DeliveryId(Uuid::new_v4()),
                    customer_id: CustomerId(Uuid::new_v4()),
                    pickup: GeoPoint::from_degrees(52.52, 13.40),
                    dropoff: GeoPoint::from_degrees(52.53, 13.41),
                    promised_by: None,
                }),
            })
            .collect();
        input.send(batch).unwrap();
        out.push(Arc::new(output.recv().unwrap()));
    }
    input.close();
    out
}

fn event_ids(output: &EpochOutput) -> Vec<Uuid> {
    output.events.iter().map(|e| e.event_id.0).collect()
}

async fn logged(pool: &PgPool, ids: &[Uuid]) -> usize {
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM event_log WHERE event_id = ANY($1)")
        .bind(ids)
        .fetch_one(pool)
        .await
        .unwrap();
    usize::try_from(count).unwrap()
}

fn config_of(pool: &PgPool) -> PostgresConfig {
    let options = pool.connect_options();
    PostgresConfig::from_parts(
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap(),
        options.get_username(),
        "",
    )
}

/// Commits `output` through `sink`; an `Ok` promises the epoch is in the database, so that
/// the driver may acknowledge it: checks that promise, and returns whether it was made.
async fn commit_and_check(
    sink: &mut PostgresSink,
    pool: &PgPool,
    output: &Arc<EpochOutput>,
) -> bool {
    let committed = sink.commit(Arc::clone(output)).await;
    let ids = event_ids(output);
    match committed {
        Ok(()) => {
            assert_eq!(
                logged(pool, &ids).await,
                ids.len(),
                "epoch {} was answered Ok (and would be acknowledged) but is not in the database",
                output.epoch
            );
            true
        }
        Err(error) => {
            assert!(matches!(error, SinkError::Closed { .. }), "{error:?}");
            false
        }
    }
}

#[sqlx::test(migrator = "delivertrack_sinks::MIGRATOR")]
async fn two_writers_on_one_database_never_skip_each_others_epochs(pool: PgPool) {
    // Two processes started together: both read "nothing committed yet", both number their
    // epochs from the same base. Before the fence, the one behind found its epochs "already
    // committed" by the other's progress, skipped them and answered Ok: acknowledged, lost.
    let first_run = outputs(6, 20);
    let second_run = outputs(6, 20);
    let mut first = PostgresSink::with_pool(pool.clone()).await.unwrap();
    let mut second = PostgresSink::with_pool(pool.clone()).await.unwrap();
    assert_eq!(first.epoch_base(), second.epoch_base());
    let (mut first_ok, mut second_ok) = (0, 0);
    // The second runs ahead, then they interleave.
    for output in &second_run[..3] {
        second_ok += usize::from(commit_and_check(&mut second, &pool, output).await);
    }
    for (a, b) in first_run.iter().zip(&second_run[3..]) {
        first_ok += usize::from(commit_and_check(&mut first, &pool, a).await);
        second_ok += usize::from(commit_and_check(&mut second, &pool, b).await);
    }
    // The newest sink is the writer; the older one is fenced from its first commit on.
    assert_eq!(first_ok, 0, "the fenced writer committed");
    assert_eq!(second_ok, 6, "the writer was refused");
    for output in &first_run {
        assert_eq!(logged(&pool, &event_ids(output)).await, 0);
    }
}

#[sqlx::test(migrator = "delivertrack_sinks::MIGRATOR")]
async fn a_writer_behind_another_writers_progress_is_refused_not_skipped(pool: PgPool) {
    // The writer of the newest generation whose epoch base was read before an older writer
    // moved the progress on (no lock between them): its epoch is at or behind the recorded
    // one, which is not its own, so "already committed" would be a lie.
    let older = outputs(4, 10);
    let newer = outputs(2, 10);
    let mut old = PostgresSink::with_pool(pool.clone()).await.unwrap();
    let old_fence = old.fence();
    let mut new = PostgresSink::with_pool(pool.clone()).await.unwrap();
    assert!(new.fence().generation > old_fence.generation);
    // The old writer's progress lands after the new one opened: write it as that writer
    // would have, had it committed just before the takeover.
    sqlx::query(
        "INSERT INTO pipeline_progress (pipeline, epoch, generation) VALUES ('delivertrack', 3, $1)
         ON CONFLICT (pipeline) DO UPDATE SET epoch = 3, generation = $1",
    )
    .bind(old_fence.generation)
    .execute(&pool)
    .await
    .unwrap();
    assert!(!commit_and_check(&mut new, &pool, &newer[0]).await);
    assert!(!commit_and_check(&mut old, &pool, &older[0]).await);
}

#[sqlx::test(migrator = "delivertrack_sinks::MIGRATOR")]
async fn a_retried_epoch_of_the_same_writer_is_still_skipped(pool: PgPool) {
    let run = outputs(3, 10);
    let mut sink = PostgresSink::with_pool(pool.clone()).await.unwrap();
    for output in &run {
        assert!(commit_and_check(&mut sink, &pool, output).await);
    }
    // Its own epochs again (a retry after a lost reply): harmless, and Ok.
    for output in &run {
        assert!(commit_and_check(&mut sink, &pool, output).await);
    }
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM event_log")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(total, 30);
}

#[sqlx::test(migrator = "delivertrack_sinks::MIGRATOR")]
async fn a_standby_waits_for_the_lock_then_takes_over_and_fences_the_old_writer(pool: PgPool) {
    let config = config_of(&pool);
    let run = outputs(3, 10);
    let first = WriterLock::acquire(
        &config,
        "the first writer",
        Duration::from_millis(50),
        |_| panic!("the lock was free"),
    )
    .await
    .unwrap();
    let mut sink = PostgresSink::with_writer_lock(pool.clone(), first.clone())
        .await
        .unwrap();
    assert!(commit_and_check(&mut sink, &pool, &run[0]).await);

    // The standby: told once who holds the lock, and still waiting a while later.
    let told = Arc::new(Mutex::new(Vec::<String>::new()));
    let heard = Arc::clone(&told);
    let standby = tokio::spawn(async move {
        WriterLock::acquire(
            &config,
            "the standby",
            Duration::from_millis(50),
            move |holder| {
                heard.lock().unwrap().push(holder.to_owned());
            },
        )
        .await
        .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!standby.is_finished(), "the standby took a held lock");
    let heard = told.lock().unwrap().clone();
    assert_eq!(heard.len(), 1, "{heard:?}");
    assert!(heard[0].contains("the first writer"), "{heard:?}");
    // The writer still commits meanwhile.
    assert!(commit_and_check(&mut sink, &pool, &run[1]).await);

    // The writer's lock session dies (kill -9, a cut connection): the standby takes over.
    let backend = first.fence().lock_backend.unwrap();
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(backend)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(terminated);
    let second = tokio::time::timeout(Duration::from_secs(5), standby)
        .await
        .expect("the standby takes over within seconds")
        .unwrap();
    assert_eq!(second.fence().generation, first.fence().generation + 1);
    // The old writer's pool still works, but it may not commit any more.
    assert!(!commit_and_check(&mut sink, &pool, &run[2]).await);
    assert!(
        !commit_and_check(&mut sink, &pool, &run[2]).await,
        "a fenced sink stays closed"
    );
    let mut successor = PostgresSink::with_writer_lock(pool.clone(), second.clone())
        .await
        .unwrap();
    assert_eq!(
        successor.epoch_base(),
        2,
        "continues after the last committed epoch"
    );
    assert!(commit_and_check(&mut successor, &pool, &run[2]).await);
    // Closing released the lock: it is free again (asked on a pool of its own, since the
    // sink closes the pool it was given).
    let other = PgPool::connect_with((*pool.connect_options()).clone())
        .await
        .unwrap();
    successor.close().await.unwrap();
    let free: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(WRITER_LOCK_KEY)
        .fetch_one(&other)
        .await
        .unwrap();
    assert!(free);
}

#[sqlx::test(migrator = "delivertrack_sinks::MIGRATOR")]
async fn a_writer_whose_lock_session_died_commits_nothing_until_it_holds_the_lock_again(
    pool: PgPool,
) {
    let config = config_of(&pool);
    let run = outputs(2, 10);
    let lock = WriterLock::acquire(
        &config,
        "a cut-off writer",
        Duration::from_millis(50),
        |_| {},
    )
    .await
    .unwrap();
    let mut sink = PostgresSink::with_writer_lock(pool.clone(), lock.clone())
        .await
        .unwrap();
    assert!(commit_and_check(&mut sink, &pool, &run[0]).await);
    let old_backend = lock.fence().lock_backend.unwrap();
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(old_backend)
        .execute(&pool)
        .await
        .unwrap();
    // The session ends a moment after the signal.
    for _ in 0..100 {
        let alive: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)")
                .bind(old_backend)
                .fetch_one(&pool)
                .await
                .unwrap();
        if !alive {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Nobody bumped the generation, but this writer does not hold the lock: nothing is
    // written, and the error is worth a retry (as with PostgreSQL down).
    let error = sink.commit(Arc::clone(&run[1])).await.unwrap_err();
    assert!(error.is_retryable(), "{error:?}");
    assert_eq!(logged(&pool, &event_ids(&run[1])).await, 0);
    // The watch takes the lock again on a new session (nobody took over meanwhile) ...
    let watch = lock.clone();
    let watching = tokio::spawn(async move { watch.lost(Duration::from_millis(50)).await });
    let again = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if lock.fence().lock_backend != Some(old_backend) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(again.is_ok(), "the lock is taken again");
    // ... and the retried commit goes through.
    assert!(commit_and_check(&mut sink, &pool, &run[1]).await);
    sink.close().await.unwrap();
    let watched = tokio::time::timeout(Duration::from_secs(5), watching)
        .await
        .expect("the watch ends once released")
        .unwrap();
    assert_eq!(watched, LockWatch::Released);
}

#[sqlx::test(migrator = "delivertrack_sinks::MIGRATOR")]
async fn a_claim_without_the_lock_fences_the_lock_holder(pool: PgPool) {
    let config = config_of(&pool);
    let run = outputs(1, 10);
    let lock = WriterLock::acquire(&config, "the writer", Duration::from_millis(50), |_| {})
        .await
        .unwrap();
    let mut sink = PostgresSink::with_writer_lock(pool.clone(), lock.clone())
        .await
        .unwrap();
    claim_generation(&pool, "an operator's tool").await.unwrap();
    assert!(!commit_and_check(&mut sink, &pool, &run[0]).await);
    let watched = tokio::time::timeout(
        Duration::from_secs(10),
        lock.lost(Duration::from_millis(50)),
    )
    .await
    .expect("the watch notices");
    // The sink released the lock when it found itself fenced.
    assert_eq!(watched, LockWatch::Released);
}
