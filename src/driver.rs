//! The driver loop: source → epochs → dataflow → every sink → acknowledgement.
//!
//! ```text
//!  source task ──batch──► input thread ──send──► dataflow workers ──► output thread
//!      ▲   (async)   cap 1  (EpochSender)                          (EpochReceiver)
//!      │                         │ (epoch, ack token)                     │ cap 1
//!      │ ack tokens              ▼                                        ▼
//!      └──────────────────────── commit task: every sink commits epoch N, then its tokens
//! ```
//!
//! The dataflow's calls block, so they run on two dedicated threads, never on the async
//! runtime. Every channel is bounded, and the dataflow itself bounds the epochs in flight,
//! so a slow sink slows the reading of the source (ARCHITECTURE rule 6). An epoch's ack
//! token goes back to the source only after every sink has committed that epoch
//! (rule 3), and the tokens go back in the order their batches were read — a batch with no
//! events (all of it refused at decoding) waits behind the batches before it. Shutdown
//! (rule 7) is the input closing: the source task stops reading and closes the epoch the
//! source was gathering, the input thread closes the dataflow's input, the workers output
//! every epoch sent, the sinks commit them, their tokens are acknowledged, and [`drive`]
//! returns.
//!
//! The loop is generic over the [`Source`] and takes the sinks as trait objects, so
//! `delivertrack run` reuses it with RabbitMQ and the stores.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use delivertrack_dataflow::pipeline::{self, DataflowConfig, EpochReceiver, EpochSender};
use delivertrack_dataflow::restore::Restore;
use delivertrack_dataflow::{Epoch, EpochOutput, Event, Rejection};
use delivertrack_ingest::{EpochPolicy, Source, SourceBatch};
use delivertrack_sinks::{Sink, SinkError};
use futures::future::join_all;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::DriverMetrics;

/// How the driver cuts epochs and retries sinks.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// When a batch of input closes into an epoch.
    pub epoch_policy: EpochPolicy,
    /// How the dataflow runs (workers, epochs in flight).
    pub dataflow: DataflowConfig,
    /// Attempts per epoch for a sink whose error is retryable, the first included; `None`
    /// retries until the sink recovers (a store that is down pauses the pipeline: nothing
    /// is acknowledged, the source stops being read once the bounded queues fill, and it
    /// all resumes by itself when the store is back). A stop does not cut the retries
    /// short: the drain bound of the caller does.
    pub sink_attempts: Option<u32>,
    /// Wait before the first retry; doubled for each further one.
    pub sink_backoff: Duration,
    /// The longest wait between two retries.
    pub sink_max_backoff: Duration,
    /// Where to count committed epochs and their commit time; `None` counts nothing.
    pub metrics: Option<DriverMetrics>,
}

impl Default for DriverConfig {
    fn default() -> Self {
        Self {
            epoch_policy: EpochPolicy::default(),
            dataflow: DataflowConfig::default(),
            sink_attempts: None,
            sink_backoff: Duration::from_millis(100),
            sink_max_backoff: Duration::from_secs(5),
            metrics: None,
        }
    }
}

/// What a finished [`drive`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DriveReport {
    /// Epochs committed by every sink.
    pub epochs: u64,
    /// Events submitted to the dataflow.
    pub events: u64,
    /// The last epoch committed by every sink.
    pub last_epoch: Option<Epoch>,
    /// Ack tokens handed back to the source.
    pub acked: u64,
}

/// A batch's ack token, tagged with the epoch that must be committed before it goes back.
///
/// Tokens go back in the order the source returned their batches (the [`Source`] contract:
/// a RabbitMQ token multiple-acks every lower delivery tag), so a batch with no events
/// (every delivery in it refused at decoding) queues behind the batches before it instead
/// of being acknowledged at once.
struct Pending<A> {
    /// The batch's own epoch, or, for a batch with no events, the last epoch submitted
    /// before it (`None`: none was, so nothing needs committing first).
    after: Option<Epoch>,
    /// Whether the batch's events are epoch `after` (so that epoch's refusals are its own).
    has_events: bool,
    ack: A,
    /// When the batch's first event reached the source.
    first_received: Instant,
    /// When the batch was submitted to the dataflow.
    submitted: Instant,
}

/// Runs the pipeline until the source ends or `stop` fires, then drains: every epoch
/// already read is computed, committed by every sink and acknowledged before this returns.
///
/// `restore` (hydration, see `delivertrack_dataflow::restore`) is submitted as the
/// dataflow's first epoch, before any input is read; its output reaches the sinks marked
/// `restored`, so that the read model and the caches are rebuilt and the system of record
/// skips it. Empty: the dataflow starts from nothing.
///
/// # Errors
/// The dataflow could not start or a worker failed; the source failed; a sink failed
/// (after its retries). Input read but not committed is then not acknowledged, so a source
/// that redelivers (RabbitMQ) loses nothing.
pub async fn drive<S>(
    source: S,
    sinks: Vec<Box<dyn Sink>>,
    config: DriverConfig,
    restore: Vec<Restore>,
    stop: CancellationToken,
) -> anyhow::Result<DriveReport>
where
    S: Source + 'static,
{
    let dataflow = config.dataflow.clone();
    let (input, output) = tokio::task::spawn_blocking(move || pipeline::start(dataflow))
        .await
        .context("the dataflow start-up task failed")?
        .context("the dataflow did not start")?;

    // A fatal error anywhere stops the reading of the source.
    let halt = stop.child_token();
    let (batch_tx, batch_rx) = mpsc::channel::<SourceBatch<S::Ack>>(1);
    let (pending_tx, pending_rx) =
        mpsc::channel::<Pending<S::Ack>>(config.dataflow.max_epochs_in_flight.max(1) + 2);
    let (output_tx, output_rx) = mpsc::channel::<EpochOutput>(1);
    let (ack_tx, ack_rx) =
        mpsc::channel::<(S::Ack, Vec<Rejection>)>(config.dataflow.max_epochs_in_flight.max(1) + 2);

    let input_thread = thread::Builder::new()
        .name("delivertrack-input".into())
        .spawn(move || feed_dataflow(input, restore, batch_rx, pending_tx))
        .context("the dataflow input thread did not start")?;
    let output_thread = thread::Builder::new()
        .name("delivertrack-output".into())
        .spawn(move || drain_dataflow(output, output_tx))
        .context("the dataflow output thread did not start")?;

    let reader = tokio::spawn(read_source(
        source,
        config.epoch_policy.clone(),
        batch_tx,
        ack_rx,
        halt.clone(),
    ));
    let committed = commit_epochs(sinks, output_rx, pending_rx, ack_tx, &config, &halt).await;
    if committed.is_err() {
        halt.cancel();
    }

    let read = reader.await.context("the source task panicked")?;
    // Both threads have ended or are ending (their channels are closed): join them off the
    // runtime all the same.
    let (fed, drained) = tokio::task::spawn_blocking(move || {
        (
            join_thread(input_thread, "input"),
            join_thread(output_thread, "output"),
        )
    })
    .await
    .context("joining the dataflow threads failed")?;
    let (fed, drained) = (fed?, drained?);

    let mut report = committed?;
    report.events = fed?;
    drained?;
    report.acked = read?;
    Ok(report)
}

/// The source task: reads batches while not stopped, hands them to the input thread and
/// acknowledges committed ones. At a stop it closes the batch the source was gathering
/// ([`Source::take_gathered`]) and hands that on too, so the open epoch is committed and
/// acknowledged like the others. Returns the number of acks once every token came back.
async fn read_source<S: Source>(
    mut source: S,
    policy: EpochPolicy,
    batch_tx: mpsc::Sender<SourceBatch<S::Ack>>,
    mut ack_rx: mpsc::Receiver<(S::Ack, Vec<Rejection>)>,
    stop: CancellationToken,
) -> anyhow::Result<u64> {
    let mut batch_tx = Some(batch_tx);
    let mut next: Option<SourceBatch<S::Ack>> = None;
    let mut reading = true;
    // Stopped, and the source may still hold a batch being gathered: take it, one bounded
    // batch at a time, behind the one waiting to be handed on.
    let mut closing = false;
    let mut failure = None;
    let mut acked = 0;
    loop {
        if closing && next.is_none() {
            next = source.take_gathered(&policy);
            closing = next.is_some();
        }
        if !reading && next.is_none() {
            // Nothing more goes in: closing the batch channel closes the dataflow's input.
            batch_tx = None;
        }
        tokio::select! {
            biased;
            ack = ack_rx.recv() => match ack {
                Some((ack, rejected)) => {
                    if let Err(error) = source.ack(ack, rejected).await {
                        tracing::error!(%error, "The source could not acknowledge a committed epoch.");
                        failure.get_or_insert(anyhow!(error).context("acknowledging the source failed"));
                        reading = false;
                        closing = false;
                        stop.cancel();
                    } else {
                        acked += 1;
                    }
                }
                // The commit task has ended: every token that will come back came back.
                None => break,
            },
            () = stop.cancelled(), if reading => {
                tracing::info!("The driver stops reading its source, closes its open epoch and drains the epochs in flight.");
                reading = false;
                closing = true;
            }
            permit = reserve(batch_tx.as_ref()), if next.is_some() => match (permit, next.take()) {
                (Some(permit), Some(batch)) => permit.send(batch),
                // The input thread has ended: nothing more can go in.
                _ => {
                    reading = false;
                    closing = false;
                }
            },
            batch = source.next_batch(&policy), if reading && next.is_none() => match batch {
                // Also a batch with no events: its token goes back in order, after those of
                // the batches before it (see `Pending`).
                Ok(Some(batch)) => next = Some(batch),
                Ok(None) => {
                    tracing::info!("The source has ended; the driver drains the epochs in flight.");
                    reading = false;
                }
                Err(error) => {
                    tracing::error!(%error, "The source failed; the driver drains the epochs in flight.");
                    failure = Some(anyhow!(error).context("the source failed"));
                    reading = false;
                    stop.cancel();
                }
            },
        }
    }
    drop(batch_tx);
    // Every acknowledgement has been handed to the source: close it so that they reach
    // the broker before the process may exit.
    source.close().await;
    match failure {
        Some(error) => Err(error),
        None => Ok(acked),
    }
}

async fn reserve<T>(tx: Option<&mpsc::Sender<T>>) -> Option<mpsc::Permit<'_, T>> {
    tx?.reserve().await.ok()
}

/// The input thread: submits the restored state first (if any), then every batch as an
/// epoch, in order, and passes its ack token on to the commit task. Ends when the source
/// task closes the batch channel; closing the dataflow's input then lets the workers
/// finish. Returns the number of events submitted.
fn feed_dataflow<A>(
    mut input: EpochSender,
    restore: Vec<Restore>,
    mut batch_rx: mpsc::Receiver<SourceBatch<A>>,
    pending_tx: mpsc::Sender<Pending<A>>,
) -> anyhow::Result<u64> {
    // The last epoch submitted: a batch with no events is acknowledged after it.
    let mut last: Option<Epoch> = None;
    if !restore.is_empty() {
        // No ack token: nothing was read for it. Its epoch is committed like any other,
        // before the first batch's.
        last = Some(
            input
                .restore(restore)
                .context("the dataflow stopped taking input")?,
        );
    }
    let mut events = 0;
    while let Some(SourceBatch {
        events: batch,
        ack,
        first_received,
    }) = batch_rx.blocking_recv()
    {
        let has_events = !batch.is_empty();
        if has_events {
            events += batch.len() as u64;
            last = Some(submit(&mut input, batch)?);
        }
        let pending = Pending {
            after: last,
            has_events,
            ack,
            first_received,
            submitted: Instant::now(),
        };
        if pending_tx.blocking_send(pending).is_err() {
            bail!("the commit task ended before the input did");
        }
    }
    input.close();
    Ok(events)
}

fn submit(input: &mut EpochSender, batch: Vec<Event>) -> anyhow::Result<Epoch> {
    input
        .send(batch)
        .context("the dataflow stopped taking input")
}

/// The output thread: passes every epoch's output on, in order, until the workers are done.
fn drain_dataflow(
    mut output: EpochReceiver,
    output_tx: mpsc::Sender<EpochOutput>,
) -> anyhow::Result<()> {
    while let Some(epoch) = output.recv() {
        if output_tx.blocking_send(epoch).is_err() {
            bail!("the commit task ended before the dataflow did");
        }
    }
    match output.outcome() {
        Some(Err(error)) => Err(error).context("a dataflow worker failed"),
        _ => Ok(()),
    }
}

/// The commit task: every sink commits each epoch (the sinks in parallel, the epochs in
/// order), then the tokens of every batch up to that epoch go back to the source.
async fn commit_epochs<A>(
    mut sinks: Vec<Box<dyn Sink>>,
    mut output_rx: mpsc::Receiver<EpochOutput>,
    mut pending_rx: mpsc::Receiver<Pending<A>>,
    ack_tx: mpsc::Sender<(A, Vec<Rejection>)>,
    config: &DriverConfig,
    halt: &CancellationToken,
) -> anyhow::Result<DriveReport> {
    let mut report = DriveReport::default();
    let mut waiting: VecDeque<Pending<A>> = VecDeque::new();
    // The refusals of committed epochs, until their batch's token goes back.
    let mut refused: BTreeMap<Epoch, Vec<Rejection>> = BTreeMap::new();
    let mut failure: Option<anyhow::Error> = None;
    let (mut outputs_open, mut pending_open) = (true, true);
    if let Some(metrics) = &config.metrics {
        metrics.declare_sinks(sinks.iter().map(|sink| sink.name()));
    }
    // The lag gauge must move while nothing else happens (a stalled sink is exactly when).
    let began = Instant::now();
    let mut lag_tick = tokio::time::interval(Duration::from_secs(1));
    lag_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while outputs_open || pending_open {
        tokio::select! {
            pending = pending_rx.recv(), if pending_open => match pending {
                Some(pending) => waiting.push_back(pending),
                None => pending_open = false,
            },
            _ = lag_tick.tick() => {}
            output = output_rx.recv(), if outputs_open => match output {
                Some(output) if failure.is_none() => {
                    let epoch = output.epoch;
                    let output = Arc::new(output);
                    let started = Instant::now();
                    let results = join_all(sinks.iter_mut().map(|sink| commit_with_retry(sink.as_mut(), Arc::clone(&output), config))).await;
                    if let Some(error) = results.into_iter().find_map(Result::err) {
                        tracing::error!(epoch, sink = error.sink(), error = %error, "A sink failed; the driver stops without acknowledging this epoch.");
                        failure = Some(anyhow!(error).context(format!("epoch {epoch} could not be committed")));
                        halt.cancel();
                        continue;
                    }
                    report.epochs += 1;
                    report.last_epoch = Some(epoch);
                    if let Some(metrics) = &config.metrics {
                        metrics.observe_epoch(&output);
                        metrics.epochs_committed.inc();
                        metrics.epoch_commit_duration.observe(started.elapsed().as_secs_f64());
                    }
                    if !output.rejections.is_empty() {
                        refused.insert(epoch, output.rejections.clone());
                    }
                    if output.restored {
                        // Hydration's second half: the dataflow rebuilt the state and every
                        // sink took it (the read model and the caches are whole again).
                        let rebuilt = began.elapsed();
                        if let Some(metrics) = &config.metrics {
                            metrics.hydration_duration.add(rebuilt.as_secs_f64());
                        }
                        tracing::info!(epoch, changes = output.changes.len(), rebuild_ms = rebuilt.as_millis() as u64, "The restored state is rebuilt and committed.");
                    }
                    tracing::debug!(epoch, changes = output.changes.len(), rejected = output.rejections.len(), "Every sink committed an epoch.");
                }
                // After a failure, outputs are only drained so that the dataflow can stop.
                Some(_) => {}
                None => {
                    // The dataflow is done (input closed, or a worker failed): stop reading.
                    outputs_open = false;
                    halt.cancel();
                }
            },
        }
        if failure.is_none() {
            while let Some(front) = waiting.front() {
                let committed = front
                    .after
                    .is_none_or(|after| report.last_epoch.is_some_and(|last| after <= last));
                if !committed {
                    break;
                }
                if let Some(pending) = waiting.pop_front() {
                    let rejected = match pending.after {
                        Some(epoch) if pending.has_events => {
                            if let Some(metrics) = &config.metrics {
                                metrics
                                    .epoch_latency
                                    .observe(pending.first_received.elapsed().as_secs_f64());
                            }
                            refused.remove(&epoch).unwrap_or_default()
                        }
                        _ => Vec::new(),
                    };
                    // The source task keeps receiving acks until this task ends.
                    if ack_tx.send((pending.ack, rejected)).await.is_err() {
                        bail!("the source task ended before every epoch was acknowledged");
                    }
                }
            }
        }
        if let Some(metrics) = &config.metrics {
            let lag = waiting
                .front()
                .map_or(0.0, |oldest| oldest.submitted.elapsed().as_secs_f64());
            metrics.frontier_lag.set(lag);
        }
    }
    if !waiting.is_empty() && failure.is_none() {
        tracing::warn!(
            unacknowledged = waiting.len(),
            "Some batches never came out of the dataflow and stay unacknowledged."
        );
    }
    for sink in &mut sinks {
        if let Err(error) = sink.close().await {
            tracing::error!(sink = sink.name(), %error, "A sink failed to close.");
            failure.get_or_insert(anyhow!(error).context("closing a sink failed"));
        }
    }
    match failure {
        Some(error) => Err(error),
        None => Ok(report),
    }
}

/// Commits one epoch to one sink, retrying retryable errors with capped exponential
/// backoff ([`DriverConfig::sink_attempts`] times, or until it succeeds).
///
/// An outage is logged twice, not once per attempt: when it starts, with its cause, and
/// when the sink recovers, with how long it took. Every failed attempt is counted.
async fn commit_with_retry(
    sink: &mut dyn Sink,
    output: Arc<EpochOutput>,
    config: &DriverConfig,
) -> Result<(), SinkError> {
    let name = sink.name();
    let started = Instant::now();
    let mut backoff = config.sink_backoff;
    let mut attempt: u32 = 1;
    let result = loop {
        match sink.commit(Arc::clone(&output)).await {
            Ok(()) => break Ok(()),
            Err(error) => {
                if let Some(metrics) = &config.metrics {
                    metrics.sink_errors.with_label_values(&[name]).inc();
                }
                let exhausted = config.sink_attempts.is_some_and(|max| attempt >= max);
                if !error.is_retryable() || exhausted {
                    break Err(error);
                }
                if attempt == 1 {
                    tracing::warn!(sink = name, epoch = output.epoch, error = %error, "A sink cannot commit; retrying with backoff until it can (nothing is acknowledged meanwhile).");
                } else {
                    tracing::debug!(sink = name, epoch = output.epoch, attempt, error = %error, "A sink still cannot commit.");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(config.sink_max_backoff);
                attempt = attempt.saturating_add(1);
            }
        }
    };
    if result.is_ok() && attempt > 1 {
        tracing::info!(
            sink = name,
            epoch = output.epoch,
            attempts = attempt,
            waited_s = started.elapsed().as_secs_f64(),
            "A sink recovered and committed the epoch."
        );
    }
    if let Some(metrics) = &config.metrics {
        metrics
            .sink_commit_duration
            .with_label_values(&[name])
            .observe(started.elapsed().as_secs_f64());
    }
    result
}

fn join_thread<T>(
    handle: thread::JoinHandle<anyhow::Result<T>>,
    name: &str,
) -> anyhow::Result<anyhow::Result<T>> {
    handle
        .join()
        .map_err(|_| anyhow!("the dataflow {name} thread panicked"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use delivertrack_ingest::{FleetSimulator, SimulatorConfig, SourceError, in_process};
    use delivertrack_sinks::{ReadModel, ReadModelSink, SinkFuture};
    use tokio::sync::watch;
    use tokio::time::timeout;

    /// Hands out its batches in order (each acknowledged with its number), then waits,
    /// holding `gathered` until a stop takes it. Publishes the tokens it is acknowledged
    /// with, in order, and how often it was asked for a batch.
    struct Scripted {
        batches: VecDeque<Vec<Event>>,
        gathered: Vec<Event>,
        tokens: u32,
        acked: watch::Sender<Vec<u32>>,
        asked: watch::Sender<u32>,
    }

    impl Scripted {
        fn batch(&mut self, events: Vec<Event>) -> SourceBatch<u32> {
            self.tokens += 1;
            SourceBatch {
                events,
                ack: self.tokens - 1,
                first_received: Instant::now(),
            }
        }
    }

    impl Source for Scripted {
        type Ack = u32;

        async fn next_batch(
            &mut self,
            _policy: &EpochPolicy,
        ) -> Result<Option<SourceBatch<u32>>, SourceError> {
            self.asked.send_modify(|asked| *asked += 1);
            match self.batches.pop_front() {
                Some(events) => Ok(Some(self.batch(events))),
                None => std::future::pending().await,
            }
        }

        async fn ack(&mut self, ack: u32, _rejected: Vec<Rejection>) -> Result<(), SourceError> {
            self.acked.send_modify(|acked| acked.push(ack));
            Ok(())
        }

        fn take_gathered(&mut self, policy: &EpochPolicy) -> Option<SourceBatch<u32>> {
            if self.gathered.is_empty() {
                return None;
            }
            let rest = self
                .gathered
                .split_off(self.gathered.len().min(policy.batch_limit()));
            let events = std::mem::replace(&mut self.gathered, rest);
            Some(self.batch(events))
        }
    }

    /// Holds every commit until the gate opens.
    struct Gate(watch::Receiver<bool>);

    impl Sink for Gate {
        fn name(&self) -> &'static str {
            "gate"
        }

        fn commit(&mut self, _output: Arc<EpochOutput>) -> SinkFuture<'_> {
            Box::pin(async move {
                let _ = self.0.wait_for(|open| *open).await;
                Ok(())
            })
        }
    }

    /// Fails every commit, without retry.
    struct Refusing;

    impl Sink for Refusing {
        fn name(&self) -> &'static str {
            "refusing"
        }

        fn commit(&mut self, output: Arc<EpochOutput>) -> SinkFuture<'_> {
            Box::pin(async move {
                Err(SinkError::Rejected {
                    sink: "refusing",
                    epoch: output.epoch,
                    source: "no".into(),
                })
            })
        }
    }

    fn events() -> Vec<Event> {
        let config = SimulatorConfig {
            couriers: 5,
            zones: 2,
            seed: 3,
            ..SimulatorConfig::default()
        };
        let mut sim = FleetSimulator::new(config, 1_700_000_000_000);
        let mut events = sim.initial_events();
        events.extend(sim.step(60_000));
        events
    }

    fn config() -> DriverConfig {
        DriverConfig {
            epoch_policy: EpochPolicy {
                max_events: 50,
                max_wait: Duration::from_millis(10),
            },
            dataflow: DataflowConfig {
                workers: 2,
                ..DataflowConfig::default()
            },
            ..DriverConfig::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_ended_source_is_drained_through_every_sink_and_acknowledged() {
        let events = events();
        let (sender, source) = in_process(64);
        let feeder = tokio::spawn({
            let events = events.clone();
            async move { sender.send_batch(events).await }
        });
        let model = ReadModel::default();
        let sinks: Vec<Box<dyn Sink>> = vec![Box::new(ReadModelSink::new(model.clone()))];
        let report = timeout(
            Duration::from_secs(60),
            drive(
                source,
                sinks,
                config(),
                Vec::new(),
                CancellationToken::new(),
            ),
        )
        .await
        .expect("the driver ends when its source ends")
        .unwrap();
        feeder.await.unwrap().unwrap();
        assert_eq!(report.events, events.len() as u64);
        assert!(report.epochs >= (events.len() as u64).div_ceil(50));
        assert_eq!(report.acked, report.epochs);
        assert_eq!(model.epoch(), report.last_epoch);
        assert_eq!(model.snapshot().counts.couriers, 5);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tokens_go_back_in_read_order_and_a_stop_commits_the_open_batch() {
        const PATIENCE: Duration = Duration::from_secs(60);
        let events = events();
        let (first, gathered) = events.split_at(40);
        let (acked_tx, mut acked) = watch::channel(Vec::new());
        let (asked_tx, mut asked) = watch::channel(0);
        // An empty batch before any epoch, one with events, an empty one after it (every
        // delivery of a RabbitMQ batch refused at decoding), then the source gathers.
        let source = Scripted {
            batches: VecDeque::from([Vec::new(), first.to_vec(), Vec::new()]),
            gathered: gathered.to_vec(),
            tokens: 0,
            acked: acked_tx,
            asked: asked_tx,
        };
        let (gate, open) = watch::channel(false);
        let model = ReadModel::default();
        let sinks: Vec<Box<dyn Sink>> = vec![
            Box::new(ReadModelSink::new(model.clone())),
            Box::new(Gate(open)),
        ];
        let stop = CancellationToken::new();
        let driving = tokio::spawn(drive(source, sinks, config(), Vec::new(), stop.clone()));

        // Nothing was read before the first empty batch: it goes back at once.
        timeout(PATIENCE, acked.wait_for(|acked| acked.contains(&0)))
            .await
            .expect("the first empty batch is acknowledged")
            .unwrap();
        // Every scripted batch has been handed on: the source is asked for a fourth ...
        timeout(PATIENCE, asked.wait_for(|asked| *asked >= 4))
            .await
            .unwrap()
            .unwrap();
        // ... yet the empty batch read after the held epoch waits behind it.
        assert_eq!(
            *acked.borrow(),
            [0],
            "no token passes a batch not yet committed"
        );

        gate.send_replace(true);
        timeout(PATIENCE, acked.wait_for(|acked| *acked == [0, 1, 2]))
            .await
            .expect("the held epoch and the empty batch behind it are acknowledged, in order")
            .unwrap();

        // Stopped while gathering: the open batch is committed and acknowledged too.
        stop.cancel();
        let report = timeout(PATIENCE, driving)
            .await
            .expect("the driver drains")
            .unwrap()
            .unwrap();
        assert_eq!(report.events, events.len() as u64);
        assert_eq!(report.acked, 3 + (gathered.len() as u64).div_ceil(50));
        let tokens: Vec<u32> = (0..u32::try_from(report.acked).unwrap()).collect();
        assert_eq!(*acked.borrow(), tokens);
        assert_eq!(model.epoch(), report.last_epoch);
        assert_eq!(model.snapshot().counts.couriers, 5);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_sink_stops_the_driver_without_acknowledging() {
        let (sender, source) = in_process(64);
        let feeder = tokio::spawn(async move {
            let _ = sender.send_batch(events()).await;
            // Keep the source open: only the failure may end the driver.
            sender.closed().await;
        });
        let model = ReadModel::default();
        let sinks: Vec<Box<dyn Sink>> =
            vec![Box::new(ReadModelSink::new(model)), Box::new(Refusing)];
        let result = timeout(
            Duration::from_secs(60),
            drive(
                source,
                sinks,
                config(),
                Vec::new(),
                CancellationToken::new(),
            ),
        )
        .await
        .expect("a sink failure ends the driver");
        let error = result.expect_err("the failure is reported");
        assert!(format!("{error:#}").contains("refusing"), "{error:#}");
        feeder.await.unwrap();
    }
}
