//! The driver loop: source → epochs → dataflow → every sink → acknowledgement.
//!
//! ```text
//!  source task ──batch──► commit task ──submission──► input thread ──► dataflow workers
//!      ▲   (async)   cap 1  (keeps every unacknowledged batch)  (EpochSender)       │
//!      │                         ▲                                                  ▼
//!      │ ack tokens + refusals   └──────────── output thread (EpochReceiver) ◄──────┘
//!      └──── commit task: the system of record commits epoch N, then the other sinks
//! ```
//!
//! The dataflow's calls block, so they run on two dedicated threads, never on the async
//! runtime. Every channel is bounded, the commit task holds at most a few batches not yet
//! acknowledged, and the dataflow itself bounds the epochs in flight, so a slow sink slows
//! the reading of the source (ARCHITECTURE rule 6). An epoch's ack token goes back to the
//! source only after every sink has committed that epoch (rule 3), and the tokens go back
//! in the order their batches were read — a batch with no events (all of it refused at
//! decoding) waits behind the batches before it. Shutdown (rule 7) is the input closing:
//! the source task stops reading and closes the epoch the source was gathering, the commit
//! task commits and acknowledges every batch it holds, then closes the dataflow.
//!
//! # Poison isolation (rule 11)
//! Each epoch is committed to the system of record (PostgreSQL, [`Sink::is_system_of_record`])
//! first and to the other sinks only once it has. When the record refuses an epoch's data
//! for good ([`SinkError::Rejected`]), that epoch has reached no store, and the record holds
//! exactly the state before it. The driver then:
//! 1. stops the dataflow (its state, and the epochs computed after the refused one, carry
//!    the refused event's effects) and reads the state back from the record
//!    ([`Rehydrate`]);
//! 2. starts a new dataflow from it and resubmits every unacknowledged batch (the commit
//!    task keeps their events), the refused epoch's events split in two halves (in their
//!    apply order, so that the halves apply as the whole would have);
//! 3. repeats on every refusal: a refused half is halved again; a refused single event is
//!    the poison: it is left out and handed back with its batch's token as a
//!    [`Refusal::Sink`] (`sink_refused:<sink>:<code>`), which the source dead-letters and
//!    counts in `delivertrack_events_rejected_total{reason}`.
//!
//! The other sinks meet the new dataflow's restored epoch (which they apply over a state
//! equal to it, since they committed exactly what the record did) and then only epochs the
//! record accepted. Epoch numbers stay increasing across rebuilds (each dataflow's are
//! offset), so the idempotence guards of the sinks never mistake a new epoch for a replay.
//! A refusal for good by a sink that is *not* the system of record comes after the record
//! committed the epoch: the record keeps it, the epoch is acknowledged, and the refusal is
//! logged and counted (`delivertrack_sink_errors_total{sink}`) — see `docs/ARCHITECTURE.md`.
//!
//! The loop is generic over the [`Source`] and takes the sinks as trait objects, so
//! `delivertrack run` reuses it with RabbitMQ and the stores.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use delivertrack_dataflow::pipeline::{self, DataflowConfig, EpochReceiver, EpochSender};
use delivertrack_dataflow::restore::Restore;
use delivertrack_dataflow::{Epoch, EpochOutput, Event};
use delivertrack_ingest::{EpochPolicy, Refusal, SinkRefusal, Source, SourceBatch};
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

/// The future of [`Rehydrate::load`].
pub type RehydrateFuture<'a> =
    Pin<Box<dyn Future<Output = anyhow::Result<Vec<Restore>>> + Send + 'a>>;

/// Reads the dataflow's state back from the system of record, for a rebuild after the
/// record refused an epoch (see the module docs). `delivertrack run` reads PostgreSQL
/// (`crate::rebuild::PostgresRehydrate`).
pub trait Rehydrate: Send {
    /// The state as of the last epoch the record committed.
    ///
    /// # Errors
    /// The record cannot be read; the driver retries with the sinks' backoff.
    fn load(&mut self) -> RehydrateFuture<'_>;
}

/// Runs the pipeline until the source ends or `stop` fires, then drains: every epoch
/// already read is computed, committed by every sink and acknowledged before this returns.
///
/// `restore` (hydration, see `delivertrack_dataflow::restore`) is submitted as the
/// dataflow's first epoch, before any input is read; its output reaches the sinks marked
/// `restored`, so that the read model and the caches are rebuilt and the system of record
/// skips it. Empty: the dataflow starts from nothing. Without a [`Rehydrate`] an epoch the
/// system of record refuses stops the driver (use [`drive_isolating`]).
///
/// # Errors
/// See [`drive_isolating`].
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
    drive_isolating(source, sinks, config, restore, None, stop).await
}

/// [`drive`], isolating the events the system of record refuses for good by rebuilding the
/// dataflow from `rehydrate` (see the module docs).
///
/// # Errors
/// The dataflow could not start or a worker failed; the source failed; a sink failed
/// (after its retries) for a reason other than refusing data, or the system of record
/// refused data and there is no `rehydrate`. Input read but not committed is then not
/// acknowledged, so a source that redelivers (RabbitMQ) loses nothing.
pub async fn drive_isolating<S>(
    source: S,
    sinks: Vec<Box<dyn Sink>>,
    config: DriverConfig,
    restore: Vec<Restore>,
    rehydrate: Option<Box<dyn Rehydrate>>,
    stop: CancellationToken,
) -> anyhow::Result<DriveReport>
where
    S: Source + 'static,
{
    // A fatal error anywhere stops the reading of the source.
    let halt = stop.child_token();
    let in_flight = config.dataflow.max_epochs_in_flight.max(1);
    let (batch_tx, batch_rx) = mpsc::channel::<SourceBatch<S::Ack>>(1);
    let (ack_tx, ack_rx) = mpsc::channel::<(S::Ack, Vec<Refusal>)>(in_flight + 2);

    let reader = tokio::spawn(read_source(
        source,
        config.epoch_policy.clone(),
        batch_tx,
        ack_rx,
        halt.clone(),
    ));
    let mut core = Core {
        sinks,
        config: &config,
        rehydrate,
        unacked: VecDeque::new(),
        next_batch: 0,
        in_flight: VecDeque::new(),
        queued: VecDeque::new(),
        next_epoch: 0,
        report: DriveReport::default(),
        began: Instant::now(),
    };
    let committed = core.run(restore, batch_rx, ack_tx, &halt).await;
    if committed.is_err() {
        halt.cancel();
    }
    let read = reader.await.context("the source task panicked")?;
    let mut report = committed?;
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
    mut ack_rx: mpsc::Receiver<(S::Ack, Vec<Refusal>)>,
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

/// What the commit task sends the input thread.
enum Submission {
    /// Restored state, as the dataflow's first epoch.
    Restore(Vec<Restore>),
    /// One epoch's events.
    Events(Vec<Event>),
}

/// One dataflow and the two threads around it; replaced whole by a rebuild.
struct Generation {
    /// Submissions to the input thread; dropping it closes the dataflow's input.
    input: Option<mpsc::Sender<Submission>>,
    /// Every epoch's output, in order.
    output: mpsc::Receiver<EpochOutput>,
    /// Added to this dataflow's epoch numbers (which start at 0) to get the numbers the
    /// sinks see, which keep increasing across rebuilds.
    offset: Epoch,
    /// The input thread and the output thread.
    threads: Option<(Worker, Worker)>,
}

/// A thread of a [`Generation`].
type Worker = thread::JoinHandle<anyhow::Result<()>>;

impl Generation {
    async fn start(config: &DataflowConfig, offset: Epoch) -> anyhow::Result<Self> {
        let dataflow = config.clone();
        let (input, output) = tokio::task::spawn_blocking(move || pipeline::start(dataflow))
            .await
            .context("the dataflow start-up task failed")?
            .context("the dataflow did not start")?;
        let (submit_tx, submit_rx) = mpsc::channel::<Submission>(1);
        let (output_tx, output_rx) = mpsc::channel::<EpochOutput>(1);
        let input_thread = thread::Builder::new()
            .name("delivertrack-input".into())
            .spawn(move || feed_dataflow(input, submit_rx))
            .context("the dataflow input thread did not start")?;
        let output_thread = thread::Builder::new()
            .name("delivertrack-output".into())
            .spawn(move || drain_dataflow(output, output_tx))
            .context("the dataflow output thread did not start")?;
        Ok(Self {
            input: Some(submit_tx),
            output: output_rx,
            offset,
            threads: Some((input_thread, output_thread)),
        })
    }

    /// Closes the input, lets the workers finish (their outputs are dropped) and joins
    /// the threads. Returns how the dataflow ended.
    async fn end(mut self) -> anyhow::Result<()> {
        self.input = None;
        while self.output.recv().await.is_some() {}
        let Some((input, output)) = self.threads.take() else {
            return Ok(());
        };
        let (fed, drained) = tokio::task::spawn_blocking(move || {
            (join_thread(input, "input"), join_thread(output, "output"))
        })
        .await
        .context("joining the dataflow threads failed")?;
        fed??;
        drained??;
        Ok(())
    }
}

/// A batch read from the source and not yet acknowledged.
struct Batch<A> {
    /// Its number, in read order.
    number: u64,
    ack: A,
    /// Its events not yet committed, one epoch per segment: the whole batch, unless an
    /// epoch of it was refused and split (see the module docs). Empty: every epoch of it
    /// is committed.
    segments: VecDeque<Vec<Event>>,
    /// Its events refused so far (by the dataflow or by a sink), for its token.
    refusals: Vec<Refusal>,
    has_events: bool,
    first_received: Instant,
    submitted: Instant,
}

/// An epoch handed to the dataflow and not yet committed.
struct Submitted {
    /// As the sinks number it.
    epoch: Epoch,
    /// The batch whose front segment it is; `None`: restored state.
    batch: Option<u64>,
}

/// What woke the commit task.
enum Step<A> {
    Output(Option<EpochOutput>),
    Batch(Option<SourceBatch<A>>),
    Idle,
}

/// The commit task's state.
struct Core<'c, A> {
    sinks: Vec<Box<dyn Sink>>,
    config: &'c DriverConfig,
    rehydrate: Option<Box<dyn Rehydrate>>,
    /// Every batch read and not yet acknowledged, in read order; bounded by
    /// [`Core::limit`], and what a rebuild resubmits.
    unacked: VecDeque<Batch<A>>,
    next_batch: u64,
    /// The epochs submitted (or queued) to the current dataflow and not yet committed.
    in_flight: VecDeque<Submitted>,
    /// Submissions waiting for room in the input thread's channel.
    queued: VecDeque<Submission>,
    /// The number the next submitted epoch gets, as the sinks see it.
    next_epoch: Epoch,
    report: DriveReport,
    began: Instant,
}

impl<A: Send + 'static> Core<'_, A> {
    /// Batches held before the source stops being read.
    fn limit(&self) -> usize {
        self.config.dataflow.max_epochs_in_flight.max(1) + 2
    }

    /// Queues a submission as the next epoch.
    fn queue(&mut self, submission: Submission, batch: Option<u64>) {
        self.in_flight.push_back(Submitted {
            epoch: self.next_epoch,
            batch,
        });
        self.next_epoch += 1;
        self.queued.push_back(submission);
    }

    async fn run(
        &mut self,
        restore: Vec<Restore>,
        mut batch_rx: mpsc::Receiver<SourceBatch<A>>,
        ack_tx: mpsc::Sender<(A, Vec<Refusal>)>,
        halt: &CancellationToken,
    ) -> anyhow::Result<DriveReport> {
        if let Some(metrics) = &self.config.metrics {
            metrics.declare_sinks(self.sinks.iter().map(|sink| sink.name()));
        }
        let mut generation = Generation::start(&self.config.dataflow, self.next_epoch).await?;
        if !restore.is_empty() {
            // No ack token: nothing was read for it. Its epoch is committed like any
            // other, before the first batch's.
            self.queue(Submission::Restore(restore), None);
        }
        let result = self
            .commit_loop(&mut generation, &mut batch_rx, &ack_tx, halt)
            .await;
        let ended = generation.end().await;
        let closed = self.close_sinks().await;
        result?;
        ended?;
        closed?;
        Ok(self.report.clone())
    }

    async fn commit_loop(
        &mut self,
        generation: &mut Generation,
        batch_rx: &mut mpsc::Receiver<SourceBatch<A>>,
        ack_tx: &mpsc::Sender<(A, Vec<Refusal>)>,
        halt: &CancellationToken,
    ) -> anyhow::Result<()> {
        let mut source_open = true;
        // The lag gauge must move while nothing else happens (a stalled sink is exactly when).
        let mut lag_tick = tokio::time::interval(Duration::from_secs(1));
        lag_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.acknowledge(ack_tx).await?;
            if let Some(metrics) = &self.config.metrics {
                let lag = self
                    .unacked
                    .front()
                    .map_or(0.0, |oldest| oldest.submitted.elapsed().as_secs_f64());
                metrics.frontier_lag.set(lag);
            }
            if !source_open && self.unacked.is_empty() && self.in_flight.is_empty() {
                return Ok(());
            }
            let room = self.unacked.len() < self.limit();
            let step = tokio::select! {
                biased;
                output = generation.output.recv() => Step::Output(output),
                permit = reserve(generation.input.as_ref()), if !self.queued.is_empty() => {
                    match (permit, self.queued.pop_front()) {
                        (Some(permit), Some(submission)) => permit.send(submission),
                        _ => bail!("the dataflow stopped taking input"),
                    }
                    Step::Idle
                }
                batch = batch_rx.recv(), if source_open && room => Step::Batch(batch),
                _ = lag_tick.tick() => Step::Idle,
            };
            match step {
                Step::Idle => {}
                Step::Batch(None) => source_open = false,
                Step::Batch(Some(batch)) => self.take_batch(batch),
                Step::Output(None) => {
                    // The workers ended without being asked: one failed.
                    halt.cancel();
                    bail!("the dataflow ended before its input did");
                }
                Step::Output(Some(output)) => {
                    if let Some(refused) = self.commit(output, generation.offset, halt).await? {
                        self.isolate(refused, generation).await?;
                    }
                }
            }
        }
    }

    /// Holds a batch read from the source and queues its events as one epoch.
    fn take_batch(&mut self, batch: SourceBatch<A>) {
        let number = self.next_batch;
        self.next_batch += 1;
        let has_events = !batch.events.is_empty();
        self.report.events += batch.events.len() as u64;
        let mut segments = VecDeque::new();
        if has_events {
            // The commit task keeps the events until the batch is acknowledged, for a
            // rebuild; the dataflow gets its own copy.
            self.queue(Submission::Events(batch.events.clone()), Some(number));
            segments.push_back(batch.events);
        }
        self.unacked.push_back(Batch {
            number,
            ack: batch.ack,
            segments,
            refusals: Vec::new(),
            has_events,
            first_received: batch.first_received,
            submitted: Instant::now(),
        });
    }

    /// Commits one output: the system of record first, then the other sinks. Returns the
    /// record's refusal of its data, for [`isolate`](Self::isolate).
    async fn commit(
        &mut self,
        mut output: EpochOutput,
        offset: Epoch,
        halt: &CancellationToken,
    ) -> anyhow::Result<Option<(Submitted, SinkError)>> {
        output.epoch += offset;
        let epoch = output.epoch;
        let Some(submitted) = self.in_flight.pop_front() else {
            bail!("the dataflow output epoch {epoch}, which was never submitted");
        };
        if submitted.epoch != epoch {
            bail!(
                "the dataflow output epoch {epoch} where {} was due",
                submitted.epoch
            );
        }
        let output = Arc::new(output);
        let started = Instant::now();
        let config = self.config;
        let (record, others): (Vec<_>, Vec<_>) = self
            .sinks
            .iter_mut()
            .partition(|sink| sink.is_system_of_record());
        let results = join_all(
            record
                .into_iter()
                .map(|sink| commit_with_retry(sink.as_mut(), Arc::clone(&output), config)),
        )
        .await;
        for result in results {
            match result {
                Ok(()) => {}
                Err(error @ SinkError::Rejected { .. })
                    if submitted.batch.is_some() && self.rehydrate.is_some() =>
                {
                    return Ok(Some((submitted, error)));
                }
                Err(error) => {
                    tracing::error!(epoch, sink = error.sink(), error = %error, "A sink failed; the driver stops without acknowledging this epoch.");
                    halt.cancel();
                    return Err(
                        anyhow!(error).context(format!("epoch {epoch} could not be committed"))
                    );
                }
            }
        }
        let results = join_all(
            others
                .into_iter()
                .map(|sink| commit_with_retry(sink.as_mut(), Arc::clone(&output), config)),
        )
        .await;
        for result in results {
            match result {
                Ok(()) => {}
                Err(error @ SinkError::Rejected { .. }) => {
                    // The record holds the epoch: it stays, and is acknowledged. This store
                    // misses what it refused (see docs/ARCHITECTURE.md, poison isolation).
                    tracing::error!(epoch, sink = error.sink(), error = %format!("{:#}", anyhow!(error)), "A sink refused an epoch the system of record committed; the epoch stays committed there and is acknowledged, this sink misses what it refused.");
                }
                Err(error) => {
                    tracing::error!(epoch, sink = error.sink(), error = %error, "A sink failed; the driver stops without acknowledging this epoch.");
                    halt.cancel();
                    return Err(
                        anyhow!(error).context(format!("epoch {epoch} could not be committed"))
                    );
                }
            }
        }

        self.report.epochs += 1;
        self.report.last_epoch = Some(epoch);
        if let Some(metrics) = &self.config.metrics {
            metrics.observe_epoch(&output);
            metrics.epochs_committed.inc();
            metrics
                .epoch_commit_duration
                .observe(started.elapsed().as_secs_f64());
        }
        match submitted.batch {
            Some(number) => {
                if let Some(batch) = self.unacked.iter_mut().find(|b| b.number == number) {
                    batch.segments.pop_front();
                    batch
                        .refusals
                        .extend(output.rejections.iter().cloned().map(Refusal::Dataflow));
                }
            }
            None => {
                // A dataflow's first half of hydration: it rebuilt the state and every sink
                // took it (the read model and the caches are whole again).
                let rebuilt = self.began.elapsed();
                if let Some(metrics) = &self.config.metrics {
                    metrics.hydration_duration.add(rebuilt.as_secs_f64());
                }
                tracing::info!(
                    epoch,
                    changes = output.changes.len(),
                    rebuild_ms = rebuilt.as_millis() as u64,
                    "The restored state is rebuilt and committed."
                );
            }
        }
        tracing::debug!(
            epoch,
            changes = output.changes.len(),
            rejected = output.rejections.len(),
            "Every sink committed an epoch."
        );
        Ok(None)
    }

    /// Hands back, in read order, the tokens of the batches whose every epoch is committed.
    async fn acknowledge(
        &mut self,
        ack_tx: &mpsc::Sender<(A, Vec<Refusal>)>,
    ) -> anyhow::Result<()> {
        while self
            .unacked
            .front()
            .is_some_and(|batch| batch.segments.is_empty())
        {
            let Some(batch) = self.unacked.pop_front() else {
                break;
            };
            if batch.has_events
                && let Some(metrics) = &self.config.metrics
            {
                metrics
                    .epoch_latency
                    .observe(batch.first_received.elapsed().as_secs_f64());
            }
            // The source task keeps receiving acks until this task ends.
            if ack_tx.send((batch.ack, batch.refusals)).await.is_err() {
                bail!("the source task ended before every epoch was acknowledged");
            }
        }
        Ok(())
    }

    /// The system of record refused the data of `refused`'s epoch: narrows the refusal down
    /// (halves the epoch, or leaves out its single event as poison), then rebuilds the
    /// dataflow from the record and resubmits every unacknowledged batch.
    async fn isolate(
        &mut self,
        (refused, error): (Submitted, SinkError),
        generation: &mut Generation,
    ) -> anyhow::Result<()> {
        let SinkError::Rejected { sink, code, .. } = &error else {
            bail!("only a refusal of data is isolated");
        };
        let (sink, code) = (*sink, code.clone());
        let detail = format!("{:#}", anyhow!(error));
        let Some(batch) = self
            .unacked
            .iter_mut()
            .find(|batch| Some(batch.number) == refused.batch)
        else {
            bail!("epoch {} belongs to no batch held", refused.epoch);
        };
        let Some(mut segment) = batch.segments.pop_front() else {
            bail!("epoch {} has no events to isolate", refused.epoch);
        };
        if segment.len() > 1 {
            // In apply order, so that the halves apply as the whole would have.
            segment.sort_by_key(Event::apply_order);
            let second = segment.split_off(segment.len() / 2);
            tracing::warn!(epoch = refused.epoch, sink, code = %code, events = segment.len() + second.len(), error = %detail, "The system of record refused an epoch's data; rebuilding the dataflow from it and committing the epoch in halves to find the refused event.");
            batch.segments.push_front(second);
            batch.segments.push_front(segment);
        } else if let Some(event) = segment.pop() {
            tracing::warn!(epoch = refused.epoch, sink, code = %code, event_id = %event.event_id, kind = %event.kind(), error = %detail, "The system of record refused an event for good; it is dead-lettered and kept out of every store.");
            batch.refusals.push(Refusal::Sink(SinkRefusal {
                event_id: event.event_id,
                kind: event.kind(),
                sink,
                code,
                detail,
            }));
        }

        // The dataflow's state (and every epoch computed after the refused one) carries the
        // refused events: replace it by one restored from the record.
        let old = std::mem::replace(
            generation,
            Generation::start(&self.config.dataflow, self.next_epoch).await?,
        );
        if let Err(error) = old.end().await {
            tracing::warn!(error = %format!("{error:#}"), "The replaced dataflow did not end cleanly.");
        }
        let restore = self.load_restore().await?;
        self.in_flight.clear();
        self.queued.clear();
        generation.offset = self.next_epoch;
        self.queue(Submission::Restore(restore), None);
        let resubmit: Vec<(u64, Vec<Event>)> = self
            .unacked
            .iter()
            .flat_map(|batch| {
                batch
                    .segments
                    .iter()
                    .map(move |segment| (batch.number, segment.clone()))
            })
            .collect();
        for (number, segment) in resubmit {
            self.queue(Submission::Events(segment), Some(number));
        }
        Ok(())
    }

    /// The record's state, retried like a sink's commit while it cannot be read.
    async fn load_restore(&mut self) -> anyhow::Result<Vec<Restore>> {
        let Some(rehydrate) = self.rehydrate.as_mut() else {
            bail!("there is no system of record to rebuild the dataflow from");
        };
        let mut backoff = self.config.sink_backoff;
        let mut attempt: u32 = 1;
        loop {
            match rehydrate.load().await {
                Ok(restore) => return Ok(restore),
                Err(error) => {
                    if self.config.sink_attempts.is_some_and(|max| attempt >= max) {
                        return Err(error.context("the state could not be read back for a rebuild"));
                    }
                    tracing::warn!(attempt, error = %format!("{error:#}"), "The state cannot be read back from the system of record yet; retrying.");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.config.sink_max_backoff);
                    attempt = attempt.saturating_add(1);
                }
            }
        }
    }

    async fn close_sinks(&mut self) -> anyhow::Result<()> {
        let mut failure = None;
        for sink in &mut self.sinks {
            if let Err(error) = sink.close().await {
                tracing::error!(sink = sink.name(), %error, "A sink failed to close.");
                failure.get_or_insert(anyhow!(error).context("closing a sink failed"));
            }
        }
        failure.map_or(Ok(()), Err)
    }
}

/// The input thread: submits each submission as the dataflow's next epoch, in order. Ends
/// when the commit task closes the channel; closing the dataflow's input then lets the
/// workers finish.
fn feed_dataflow(
    mut input: EpochSender,
    mut submissions: mpsc::Receiver<Submission>,
) -> anyhow::Result<()> {
    while let Some(submission) = submissions.blocking_recv() {
        match submission {
            Submission::Restore(restore) => input.restore(restore),
            Submission::Events(events) => input.send(events),
        }
        .context("the dataflow stopped taking input")?;
    }
    input.close();
    Ok(())
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

        async fn ack(&mut self, ack: u32, _rejected: Vec<Refusal>) -> Result<(), SourceError> {
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

    /// Fails every commit for good, for a reason that is not the data (no retry).
    struct Refusing;

    impl Sink for Refusing {
        fn name(&self) -> &'static str {
            "refusing"
        }

        fn commit(&mut self, output: Arc<EpochOutput>) -> SinkFuture<'_> {
            Box::pin(async move {
                Err(SinkError::Failed {
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

    /// A system of record kept in memory: the committed records (a read model) and the
    /// accepted events, from which [`FromRecord`] restores as PostgreSQL's hydration does.
    /// Refuses for good every epoch holding one of `poison`, like a `CHECK` constraint.
    #[derive(Clone, Default)]
    struct Record {
        model: ReadModel,
        accepted: Arc<std::sync::Mutex<Vec<Event>>>,
        poison: Vec<delivertrack_dataflow::EventId>,
    }

    impl Sink for Record {
        fn name(&self) -> &'static str {
            "record"
        }

        fn is_system_of_record(&self) -> bool {
            true
        }

        fn commit(&mut self, output: Arc<EpochOutput>) -> SinkFuture<'_> {
            Box::pin(async move {
                if output.restored {
                    return Ok(());
                }
                if output
                    .events
                    .iter()
                    .any(|e| self.poison.contains(&e.event_id))
                {
                    return Err(SinkError::Rejected {
                        sink: "record",
                        epoch: output.epoch,
                        code: "23514".into(),
                        source: "violates check constraint".into(),
                    });
                }
                let refused: Vec<_> = output.rejections.iter().map(|r| r.event_id).collect();
                self.accepted.lock().unwrap().extend(
                    output
                        .events
                        .iter()
                        .filter(|e| !refused.contains(&e.event_id))
                        .cloned(),
                );
                self.model.apply(&output);
                Ok(())
            })
        }
    }

    struct FromRecord(Record);

    impl Rehydrate for FromRecord {
        fn load(&mut self) -> RehydrateFuture<'_> {
            Box::pin(async move {
                let records =
                    self.0.model.with_state(|state| {
                        let mut records = Vec::new();
                        records.extend(
                            state.couriers.iter().map(|(id, s)| {
                                delivertrack_dataflow::Change::Courier(*id, s.clone())
                            }),
                        );
                        records.extend(
                            state
                                .zones
                                .iter()
                                .map(|(id, s)| delivertrack_dataflow::Change::Zone(*id, s.clone())),
                        );
                        records.extend(state.deliveries.iter().map(|(id, s)| {
                            delivertrack_dataflow::Change::Delivery(*id, s.clone())
                        }));
                        records
                    });
                let accepted = self.0.accepted.lock().unwrap().clone();
                Ok(delivertrack_dataflow::restore::from_history(
                    records,
                    accepted,
                    DataflowConfig::default().speed_window,
                ))
            })
        }
    }

    /// Hands out its batches, then ends; keeps every token and refusal it is given back.
    struct Recording {
        batches: VecDeque<Vec<Event>>,
        next: u32,
        acked: Acked,
    }

    /// Every token a [`Recording`] was given back, with its refusals.
    type Acked = Arc<std::sync::Mutex<Vec<(u32, Vec<Refusal>)>>>;

    impl Source for Recording {
        type Ack = u32;

        async fn next_batch(
            &mut self,
            _policy: &EpochPolicy,
        ) -> Result<Option<SourceBatch<u32>>, SourceError> {
            Ok(self.batches.pop_front().map(|events| {
                self.next += 1;
                SourceBatch {
                    events,
                    ack: self.next - 1,
                    first_received: Instant::now(),
                }
            }))
        }

        async fn ack(&mut self, ack: u32, rejected: Vec<Refusal>) -> Result<(), SourceError> {
            self.acked.lock().unwrap().push((ack, rejected));
            Ok(())
        }
    }

    /// What the read model holds, for comparing two runs.
    fn held(model: &ReadModel) -> String {
        model.with_state(|s| {
            format!(
                "{:?}",
                (
                    &s.couriers,
                    &s.zones,
                    &s.inside,
                    &s.deliveries,
                    &s.dropoff_zones,
                    &s.etas,
                    &s.metrics
                )
            )
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_the_record_refuses_are_isolated_and_the_rest_commits_everywhere() {
        const PATIENCE: Duration = Duration::from_secs(120);
        let events = events();
        // Two poisons in different batches: a delivery's creation (its later steps are then
        // refused by the dataflow, as if it had never been sent) and a fix.
        let created = events
            .iter()
            .skip(10)
            .find(|e| e.kind() == delivertrack_dataflow::EventKind::DeliveryCreated)
            .expect("the simulator creates deliveries")
            .event_id;
        let fix = events
            .iter()
            .skip(80)
            .find(|e| e.kind() == delivertrack_dataflow::EventKind::LocationUpdated)
            .expect("the simulator moves couriers")
            .event_id;
        let poison = vec![created, fix];
        let batches: VecDeque<Vec<Event>> = events.chunks(37).map(<[Event]>::to_vec).collect();
        let batch_count = batches.len();

        // Isolating: the record refuses the poison, the read model is a sink after it.
        let record = Record {
            poison: poison.clone(),
            ..Record::default()
        };
        let model = ReadModel::default();
        let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
        let source = Recording {
            batches,
            next: 0,
            acked: Arc::clone(&acked),
        };
        let sinks: Vec<Box<dyn Sink>> = vec![
            Box::new(ReadModelSink::new(model.clone())),
            Box::new(record.clone()),
        ];
        let report = timeout(
            PATIENCE,
            drive_isolating(
                source,
                sinks,
                config(),
                Vec::new(),
                Some(Box::new(FromRecord(record.clone()))),
                CancellationToken::new(),
            ),
        )
        .await
        .expect("the driver ends when its source ends")
        .expect("a refused event does not stop the driver");
        assert_eq!(report.acked, batch_count as u64);
        let acked = acked.lock().unwrap().clone();
        let tokens: Vec<u32> = acked.iter().map(|(token, _)| *token).collect();
        assert_eq!(tokens, (0..batch_count as u32).collect::<Vec<_>>());
        let mut sink_refused: Vec<(delivertrack_dataflow::EventId, String)> = acked
            .iter()
            .flat_map(|(_, refusals)| refusals.iter())
            .filter(|r| matches!(r, Refusal::Sink(_)))
            .map(|r| (r.event_id(), r.reason().into_owned()))
            .collect();
        sink_refused.sort();
        let mut expected: Vec<_> = poison
            .iter()
            .map(|id| (*id, "sink_refused:record:23514".to_owned()))
            .collect();
        expected.sort();
        assert_eq!(sink_refused, expected, "each poison is dead-lettered, once");
        let accepted = record.accepted.lock().unwrap().clone();
        assert!(accepted.iter().all(|e| !poison.contains(&e.event_id)));

        // The reference: the same input without the poison, nothing refused.
        let clean: Vec<Event> = events
            .iter()
            .filter(|e| !poison.contains(&e.event_id))
            .cloned()
            .collect();
        let reference = ReadModel::default();
        let source = Recording {
            batches: clean.chunks(37).map(<[Event]>::to_vec).collect(),
            next: 0,
            acked: Arc::default(),
        };
        timeout(
            PATIENCE,
            drive(
                source,
                vec![Box::new(ReadModelSink::new(reference.clone()))],
                config(),
                Vec::new(),
                CancellationToken::new(),
            ),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(held(&model), held(&reference), "the read model");
        assert_eq!(held(&record.model), held(&reference), "the record");
    }
}
