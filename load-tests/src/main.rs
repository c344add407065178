//! `load-tests`: the load-testing harness of DeliverTrack.
//!
//! `load-tests fleet|trackers|analysts|mixed|baselines [flags]` runs a scenario against a
//! running service and writes a JSON report and a PNG (see the library's documentation and
//! `BENCHMARKS.md`); `load-tests publish --events N --batch B` sends N `location.updated`
//! events to the exchange, B per message, and reports how fast the broker confirmed them;
//! `load-tests curve RUN.json...` puts paced runs side by side as a latency-versus-rate
//! table and PNG.

use std::process::ExitCode;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::{Parser, Subcommand};
use delivertrack_load_tests::curve::{self, CurvePoint};
use delivertrack_load_tests::fleet::location_events;
use delivertrack_load_tests::{Publisher, RunArgs, Scenario};

/// Load generators for DeliverTrack.
#[derive(Debug, Parser)]
#[command(name = "load-tests", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// N couriers publishing positions at R fixes/s each (one tracker observes).
    Fleet(Box<RunArgs>),
    /// M WebSocket trackers following the live deliveries of a small fleet.
    Trackers(Box<RunArgs>),
    /// K GraphQL analysts polling the metrics query while a small fleet ingests.
    Analysts(Box<RunArgs>),
    /// Fleet, trackers and analysts at once.
    Mixed(Box<RunArgs>),
    /// The baselines alone: broker ceiling, geofence against PostGIS, GraphQL against SQL.
    Baselines(Box<RunArgs>),
    /// Publishes location events to the event exchange, with publisher confirms.
    Publish(PublishArgs),
    /// The latency-versus-rate curve of paced runs: reads their JSON reports and writes
    /// `<name>.md` (a table) and `<name>.png` (p50/p90/p99 against the rate).
    Curve(CurveArgs),
}

#[derive(Debug, clap::Args)]
struct CurveArgs {
    /// The reports of the runs (`<run>.json` as `fleet` wrote them); unpaced runs and runs
    /// without WebSocket latencies are left out.
    #[arg(required = true)]
    reports: Vec<std::path::PathBuf>,
    /// Where to write the table and the chart.
    #[arg(long, default_value = ".")]
    out: std::path::PathBuf,
    /// The files' stem.
    #[arg(long, default_value = "curve")]
    name: String,
    /// The chart's title.
    #[arg(long, default_value = "publish → WebSocket latency against the rate")]
    title: String,
    /// A TrueType font for the chart's text.
    #[arg(long, default_value = delivertrack_load_tests::plot::DEFAULT_FONT)]
    font: std::path::PathBuf,
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
        let scenario = match cli.command {
            Command::Publish(args) => return publish(args).await,
            Command::Curve(args) => return curve(&args),
            Command::Fleet(args) => (Scenario::Fleet, args),
            Command::Trackers(args) => (Scenario::Trackers, args),
            Command::Analysts(args) => (Scenario::Analysts, args),
            Command::Mixed(args) => (Scenario::Mixed, args),
            Command::Baselines(args) => (Scenario::Baselines, args),
        };
        tokio::select! {
            result = run(scenario.0, *scenario.1) => result,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted; no report written")),
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

async fn run(scenario: Scenario, args: RunArgs) -> anyhow::Result<()> {
    let (report, written) = delivertrack_load_tests::scenario::run(scenario, args).await?;
    println!("{}", report.table());
    println!("report: {}", written.report.display());
    if let Some(chart) = written.chart {
        println!("chart:  {}", chart.display());
    }
    Ok(())
}

fn curve(args: &CurveArgs) -> anyhow::Result<()> {
    let points = CurvePoint::read_all(&args.reports)?;
    if points.is_empty() {
        anyhow::bail!("none of the reports is a paced run with WebSocket latencies");
    }
    let table = curve::table(&points);
    let md = args.out.join(format!("{}.md", args.name));
    let png = args.out.join(format!("{}.png", args.name));
    std::fs::write(&md, &table).with_context(|| format!("writing {}", md.display()))?;
    curve::draw(&png, &args.title, &points, &args.font)?;
    println!("{table}");
    println!("table: {}\nchart: {}", md.display(), png.display());
    Ok(())
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
