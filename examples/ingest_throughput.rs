//! Throughput of ingest: RabbitMQ → RabbitSource → driver → dataflow → in-memory sinks,
//! against a bare lapin consume-and-ack loop on the same broker, in the same run.
//!
//! ```sh
//! cargo run --release --example ingest_throughput -- --events 200000
//! ```
//!
//! For each message shape (one event per message, and JSON arrays of `--batch` events):
//! publish N `location.updated` events to a fresh queue, drain it with the bare loop;
//! publish N again, drain it through the whole pipeline (`run_pipeline_on`, the read
//! model plus a sink that counts committed events). Each drain is timed from the start of
//! its consumer (connection included) until the last event is acknowledged (bare loop) or
//! committed by every sink (pipeline). Prints a Markdown table. Needs RabbitMQ on localhost
//! (or `RABBITMQ_URL`); leaves nothing behind.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use delivertrack::{PipelineConfig, RunConfig, RunHooks, run_pipeline_on};
use delivertrack_dataflow::EpochOutput;
use delivertrack_ingest::rabbitmq::{RabbitConfig, declare_topology};
use delivertrack_ingest::testing::{delete_topology, unique_config};
use delivertrack_load_tests::Publisher;
use delivertrack_load_tests::fleet::location_events;
use delivertrack_sinks::{Sink, SinkFuture};
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

#[derive(Debug, Parser)]
struct Args {
    /// Events per measurement.
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    /// Events per message in the batched measurement.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Couriers the fixes are spread over.
    #[arg(long, default_value_t = 10_000)]
    couriers: usize,
    /// Prefetch of both consumers.
    #[arg(long, default_value_t = 2_000)]
    prefetch: u16,
    /// Timely workers of the pipeline.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// The pipeline's epoch size bound.
    #[arg(long, default_value_t = 5_000)]
    epoch_max_events: usize,
    /// The pipeline's epoch time bound, ms.
    #[arg(long, default_value_t = 50)]
    epoch_max_ms: u64,
}

/// Counts the events of every committed epoch and tells the watcher.
struct CountingSink(watch::Sender<u64>);

impl Sink for CountingSink {
    fn name(&self) -> &'static str {
        "counting"
    }

    fn commit(&mut self, output: Arc<EpochOutput>) -> SinkFuture<'_> {
        let events = output.events.len() as u64;
        self.0.send_modify(|count| *count += events);
        Box::pin(async { Ok(()) })
    }
}

struct Row {
    shape: String,
    messages: u64,
    publish: f64,
    bare: f64,
    pipeline: f64,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let shapes = [
        (1, "1 event per message".to_owned()),
        (args.batch, format!("{} events per message", args.batch)),
    ];
    let mut rows = Vec::new();
    for (batch, shape) in shapes {
        let config = RabbitConfig {
            prefetch: args.prefetch,
            ..unique_config("throughput")
        };
        let publisher = Publisher::connect(&config.url).await.unwrap();
        declare_topology(publisher.channel(), &config)
            .await
            .unwrap();

        let events = location_events(args.couriers, args.events, now_ms());
        let started = Instant::now();
        let report = publisher
            .publish_events(&config.exchange, &events, batch)
            .await
            .unwrap();
        let publish = started.elapsed();
        let bare = bare_loop(&config, report.messages).await;

        let events = location_events(args.couriers, args.events, now_ms());
        publisher
            .publish_events(&config.exchange, &events, batch)
            .await
            .unwrap();
        let pipeline = through_pipeline(&config, &args, args.events as u64).await;

        publisher.close().await.unwrap();
        delete_topology(&config).await;
        let rate = |d: Duration| args.events as f64 / d.as_secs_f64();
        let row = Row {
            shape,
            messages: report.messages,
            publish: rate(publish),
            bare: rate(bare),
            pipeline: rate(pipeline),
        };
        eprintln!(
            "{}: publish {:.0}/s, bare loop {:.0}/s, pipeline {:.0}/s",
            row.shape, row.publish, row.bare, row.pipeline
        );
        rows.push(row);
    }

    println!(
        "\n{} events, prefetch {}, {} timely workers, epochs of at most {} events / {} ms\n",
        args.events, args.prefetch, args.workers, args.epoch_max_events, args.epoch_max_ms
    );
    println!(
        "| messages | published (confirmed) events/s | bare consume-and-ack events/s | pipeline events/s | pipeline / bare |"
    );
    println!("|---|---|---|---|---|");
    for row in rows {
        println!(
            "| {} ({} messages) | {:.0} | {:.0} | {:.0} | {:.2} |",
            row.shape,
            row.messages,
            row.publish,
            row.bare,
            row.pipeline,
            row.pipeline / row.bare
        );
    }
}

/// Consumes `messages` with the same prefetch and acknowledges them (multiple-ack every
/// half prefetch, as the source acknowledges a batch at once). Returns the time taken.
async fn bare_loop(config: &RabbitConfig, messages: u64) -> Duration {
    let started = Instant::now();
    let connection = Connection::connect(&config.url, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .basic_qos(config.prefetch, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = channel
        .basic_consume(
            config.queue.as_str().into(),
            "bare".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let every = u64::from(config.prefetch / 2).max(1);
    let mut received = 0;
    while received < messages {
        let delivery = consumer
            .next()
            .await
            .expect("the consumer stays open")
            .unwrap();
        received += 1;
        if received % every == 0 || received == messages {
            delivery
                .acker
                .ack(BasicAckOptions { multiple: true })
                .await
                .unwrap();
        }
    }
    let elapsed = started.elapsed();
    connection.close(200, "done".into()).await.unwrap();
    elapsed
}

/// Runs the pipeline on the queue until every event was committed. Returns the time taken.
async fn through_pipeline(config: &RabbitConfig, args: &Args, events: u64) -> Duration {
    let (count_tx, mut count) = watch::channel(0);
    let run = RunConfig {
        pipeline: PipelineConfig {
            workers: args.workers,
            epoch_max_events: args.epoch_max_events,
            epoch_max_wait: Duration::from_millis(args.epoch_max_ms),
            ..PipelineConfig::default()
        },
        rabbit: config.clone(),
        shutdown_timeout: Duration::from_secs(60),
        // The read model only: this measures ingest, not the stores.
        ..RunConfig::default()
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let hooks = RunHooks {
        extra_sinks: vec![Box::new(CountingSink(count_tx))],
        started: None,
    };
    let started = Instant::now();
    let task = tokio::spawn(run_pipeline_on(listener, run, hooks, async {
        let _ = stop_rx.await;
    }));
    count.wait_for(|n| *n >= events).await.unwrap();
    let elapsed = started.elapsed();
    let _ = stop_tx.send(());
    task.await.unwrap().unwrap();
    elapsed
}

fn now_ms() -> i64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    i64::try_from(since.as_millis()).unwrap()
}
