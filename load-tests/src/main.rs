//! `load-tests`: load generators for DeliverTrack.
//!
//! `load-tests publish --events N --batch B` sends N `location.updated` events to the
//! exchange, B per message, and reports how fast the broker confirmed them.

use std::process::ExitCode;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::{Parser, Subcommand};
use delivertrack_load_tests::Publisher;
use delivertrack_load_tests::fleet::location_events;

/// Load generators for DeliverTrack.
#[derive(Debug, Parser)]
#[command(name = "load-tests", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Publishes location events to the event exchange, with publisher confirms.
    Publish(PublishArgs),
}

#[derive(Debug, clap::Args)]
struct PublishArgs {
    /// Events to publish.
    #[arg(long, env = "LOAD_EVENTS", default_value_t = 100_000)]
    events: usize,
    /// Events per message (1: one event per message; more: JSON arrays).
    #[arg(long, env = "LOAD_BATCH", default_value_t = 1)]
    batch: usize,
    /// Couriers the fixes are spread over.
    #[arg(long, env = "LOAD_COURIERS", default_value_t = 1_000)]
    couriers: usize,
    /// The AMQP URI of RabbitMQ.
    #[arg(
        long,
        env = "RABBITMQ_URL",
        hide_env_values = true,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    rabbitmq_url: String,
    /// The topic exchange to publish to.
    #[arg(
        long,
        env = "DELIVERTRACK_EXCHANGE",
        default_value = "delivertrack.events"
    )]
    exchange: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: the async runtime could not start: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Publish(args) => publish(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn publish(args: PublishArgs) -> anyhow::Result<()> {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("the clock is before 1970")?
        .as_millis();
    let now_ms = i64::try_from(now_ms).context("the clock is too far ahead")?;
    let events = location_events(args.couriers, args.events, now_ms);
    let publisher = Publisher::connect(&args.rabbitmq_url)
        .await
        .context("RabbitMQ cannot be reached")?;
    let started = Instant::now();
    let report = publisher
        .publish_events(&args.exchange, &events, args.batch)
        .await
        .context("publishing failed")?;
    let seconds = started.elapsed().as_secs_f64();
    publisher
        .close()
        .await
        .context("closing the connection failed")?;
    println!(
        "published {} events in {} messages to {:?} in {seconds:.2} s ({:.0} events/s, confirmed)",
        report.events,
        report.messages,
        args.exchange,
        report.events as f64 / seconds.max(f64::EPSILON),
    );
    Ok(())
}
