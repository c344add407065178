//! The driver loop: source → epochs → dataflow → every sink → acknowledgement.
//!
//! ```text
//!  source task ──batch──► commit task ──submission──► input thread ──► dataflow workers
//!   ▲   │ (async)  cap 1  (keeps every unacknowledged batch)  (EpochSender)         │
//!   │   ◄── room ───┤  ▲                                                           ▼
//!   │               │  └──────────────── output thread (EpochReceiver) ◄───────────┘
//!   │               ├──epoch N+1──► record's task ──┐   (a task per sink, each with a
//!   │               ├──epoch N────► Redis's task ───┤    queue of `sink_queue` epochs)
//!   │               └──epoch N────► read model's … ─┤
//!   └─ ack tokens, in read order ◄──────────────────┘ reports: committed, refused, failed
//! ```
//!
//! The dataflow's calls block, so they run on two dedicated threads, never on the async
//! runtime. Every channel is bounded, the commit task holds at most a few batches not yet
//! acknowledged, and the dataflow itself bounds the epochs in flight, so a slow sink slows
//! the reading of the source (ARCHITECTURE rule 6). An epoch's ack token goes back to the
//! source only after every sink has committed that epoch and every epoch before it (rule
//! 3), and the tokens go back in the order their batches were read — a batch with no
//! events (all of it refused at decoding) waits behind the batches before it. Shutdown
//! (rule 7) is the input closing: the source task stops reading and closes the epoch the
//! source was gathering, the commit task commits and acknowledges every batch it holds,
//! then closes the dataflow and the sinks' tasks.
//!
//! # Pipelined commits and adaptive epochs
//! Commits are the pipeline's cost, not computing: each pays a fixed price (a round trip,
//! a transaction) beside its share per event. So the commit task does not wait for one
//! epoch to be committed everywhere before the next is committed anywhere: each sink
//! commits in a task of its own, in epoch order, from a small queue, and the record
//! commits epoch N + 1 while the other sinks still commit N. The commit task hands each
//! sink what it may commit next only while that sink's queue has room, so it never waits
//! on a sink, and a sink that stalls holds no more than its queue: the unacknowledged
//! batches then reach their bound, and the source is not read any more.
//!
//! An epoch closes at `max_wait` after its first event only while the pipeline keeps up.
//! While two epochs are already on their way to the system of record (`RECORD_AHEAD`), or
//! the commit task holds as many unacknowledged batches as it may, it has no room for
//! another batch, and the source is asked for one by the size bound alone: the open batch
//! keeps growing while the commits are behind, and closes once there is room. A backlog is
//! so committed in a few large epochs rather than many small ones — the size of an epoch
//! follows the time the commits take.
//!
//! # Poison isolation (rule 11)
//! Each epoch is committed to the system of record (PostgreSQL, [`Sink::is_system_of_record`])
//! first and handed to the other sinks only once it has. When the record refuses an
//! epoch's data for good ([`SinkError::Rejected`]), that epoch has reached no store, and the
//! record holds exactly the state before it; the record's task skips the later epochs it
//! holds from the same dataflow. The driver then:
//! 1. hands the record nothing more and lets the other sinks commit the epochs before the
//!    refused one (acknowledging what is then done), so that no store has anything of the
//!    refused epoch or of the epochs computed after it, which are discarded;
//! 2. stops the dataflow (its state, and the epochs computed after the refused one, carry
//!    the refused event's effects) and reads the state back from the record
//!    ([`Rehydrate`]);
//! 3. starts a new dataflow from it and resubmits every unacknowledged batch (the commit
//!    task keeps their events), the refused epoch's events split in two halves (in their
//!    apply order, so that the halves apply as the whole would have);
//! 4. repeats on every refusal: a refused half is halved again; a refused single event is
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
use std::panic::AssertUnwindSafe;
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
use futures::FutureExt as _;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::metrics::{DriverMetrics, Stage};

/// How many epochs may be on their way to the system of record (in the dataflow, ready, or
/// being committed by it) before the driver takes no more batches: the one it commits and
/// the one ready behind it, so that it never waits for the next. More would only cut the
/// input into smaller epochs, each paying a commit's fixed cost; the batch being gathered
/// grows instead (see [`EpochPolicy::size_bound_only`]).
const RECORD_AHEAD: usize = 2;

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
    /// Epochs handed to a sink's task ahead of its commit (at least 1). Each sink commits
    /// from a queue this deep, so that the system of record commits epoch N + 1 while a
    /// slower sink still commits N; a sink that stalls holds at most this many, and the
    /// unacknowledged batches then stop the reading of the source.
    pub sink_queue: usize,
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
            sink_queue: 2,
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
    let (batch_tx, batch_rx) = mpsc::channel::<SourceBatch<S::Ack>>(1);
    let mut core = Core::new(sinks, &config, rehydrate);
    let (ack_tx, ack_rx) = mpsc::channel::<(S::Ack, Vec<Refusal>)>(core.limit());

    let reader = tokio::spawn(read_source(
        source,
        config.epoch_policy.clone(),
        batch_tx,
        core.room.subscribe(),
        ack_rx,
        halt.clone(),
    ));
    let committed = core.run(restore, batch_rx, ack_tx, &halt).await;
    if committed.is_err() {
        halt.cancel();
    }
    let read = reader.await.context("the source task panicked")?;
    let mut report = committed?;
    report.acked = read?;
    Ok(report)
}

/// The source task: reads batches while not stopped, hands them to the commit task and
/// acknowledges committed ones. While the commit task has no room for a batch (`room`:
/// its commits are behind), the source is asked for a batch by the size bound alone, so
/// the open batch keeps growing instead of closing at the time bound; once there is room,
/// the full policy closes it at once if its time is up. At a stop it closes the batch the
/// source was gathering ([`Source::take_gathered`]) and hands that on too, so the open
/// epoch is committed and acknowledged like the others. Returns the number of acks once
/// every token came back.
async fn read_source<S: Source>(
    mut source: S,
    policy: EpochPolicy,
    batch_tx: mpsc::Sender<SourceBatch<S::Ack>>,
    mut room: watch::Receiver<bool>,
    mut ack_rx: mpsc::Receiver<(S::Ack, Vec<Refusal>)>,
    stop: CancellationToken,
) -> anyhow::Result<u64> {
    let growing = policy.size_bound_only();
    let mut batch_tx = Some(batch_tx);
    let mut next: Option<SourceBatch<S::Ack>> = None;
    let mut reading = true;
    // Stopped, and the source may still hold a batch being gathered: take it, one bounded
    // batch at a time, behind the one waiting to be handed on.
    let mut closing = false;
    // The commit task's room is watched until it ends (then its acks end this loop too).
    let mut watching = true;
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
        let has_room = !watching || *room.borrow_and_update();
        let asking = if has_room { &policy } else { &growing };
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
            // Room came (or went): ask again, with the policy that now applies.
            changed = room.changed(), if watching && reading && next.is_none() && !has_room => {
                watching = changed.is_ok();
            }
            batch = source.next_batch(asking), if reading && next.is_none() => match batch {
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
    /// When the output of its last committed epoch arrived from the dataflow: the start of
    /// its `ack_wait` stage.
    ready: Option<Instant>,
}

/// An epoch handed to the dataflow and not yet output by it.
struct Submitted {
    /// As the sinks number it.
    epoch: Epoch,
    /// The batch whose front segment it is; `None`: restored state.
    batch: Option<u64>,
    /// When it was queued for the dataflow: the start of its `dataflow` stage.
    at: Instant,
}

/// An epoch the dataflow has output and not every sink has committed yet.
struct Flight {
    /// Its place in the order epochs are handed to the sinks; never reused, so that a
    /// sink's place in that order survives a rebuild.
    seq: u64,
    /// The dataflow that computed it ([`Core::generation`]).
    generation: u64,
    submitted: Submitted,
    output: Arc<EpochOutput>,
    /// When the output arrived.
    ready: Instant,
    /// Systems of record that have not committed it yet; the other sinks get it only once
    /// this is 0.
    unrecorded: usize,
    /// Other sinks that have not committed it yet.
    uncommitted: usize,
    /// The longest commit of a system of record (its `record_commit` stage).
    record_time: Duration,
}

impl Flight {
    fn is_recorded(&self) -> bool {
        self.unrecorded == 0
    }

    fn is_done(&self) -> bool {
        self.unrecorded == 0 && self.uncommitted == 0
    }
}

/// A sink in a task of its own, committing the epochs it is handed in order, so that the
/// system of record commits epoch N + 1 while a slower sink still commits N.
struct Lane {
    name: &'static str,
    record: bool,
    /// Epochs to commit; `None` once closed, which ends the task. Never full: see
    /// `outstanding`.
    epochs: Option<mpsc::Sender<Handed>>,
    /// Epochs handed and not yet reported back. At most [`DriverConfig::sink_queue`], so
    /// that neither this lane's queue nor the report channel (sized for every lane's
    /// share) can fill: the commit task never waits on a sink to hand it an epoch.
    outstanding: usize,
    /// [`Flight::seq`] of the next epoch to hand it.
    next: u64,
    /// The task; it hands the sink back when it ends, for [`Sink::close`].
    task: Option<JoinHandle<Box<dyn Sink>>>,
}

/// An epoch handed to a [`Lane`].
struct Handed {
    /// The dataflow that computed it: after refusing an epoch, the system of record skips
    /// everything else that dataflow computed (it carries the refused events' effects).
    generation: u64,
    output: Arc<EpochOutput>,
}

/// What a [`Lane`] did with an epoch.
struct LaneReport {
    lane: usize,
    epoch: Epoch,
    outcome: Outcome,
    /// The commit's duration, retries included.
    took: Duration,
}

enum Outcome {
    Committed,
    /// Not committed: its dataflow computed it after an epoch this sink refused.
    Skipped,
    /// Its last error (a refusal of the data, or a failure after the retries).
    Failed(SinkError),
}

/// What woke the commit task.
enum Step<A> {
    Output(Option<EpochOutput>),
    Batch(Option<SourceBatch<A>>),
    Report(Option<LaneReport>),
    Idle,
}

/// The commit task's state.
struct Core<'c, A> {
    config: &'c DriverConfig,
    rehydrate: Option<Box<dyn Rehydrate>>,
    /// Every batch read and not yet acknowledged, in read order; bounded by
    /// [`Core::limit`], and what a rebuild resubmits.
    unacked: VecDeque<Batch<A>>,
    next_batch: u64,
    /// The epochs submitted (or queued) to the current dataflow and not yet output.
    in_flight: VecDeque<Submitted>,
    /// Submissions waiting for room in the input thread's channel.
    queued: VecDeque<Submission>,
    /// The number the next submitted epoch gets, as the sinks see it.
    next_epoch: Epoch,
    /// Epochs output and not yet committed by every sink, in order; bounded by the
    /// unacknowledged batches.
    flights: VecDeque<Flight>,
    next_flight: u64,
    /// The current dataflow's number; a rebuild starts the next.
    generation: u64,
    /// The refused epoch while a refusal of the record is being isolated: no system of
    /// record is handed it or a later one until the rebuild.
    refusing: Option<Epoch>,
    lanes: Vec<Lane>,
    reports: mpsc::Receiver<LaneReport>,
    /// Stops the lanes at once, mid-commit, when the driver fails.
    lanes_stop: CancellationToken,
    /// Whether a batch would be taken now (see [`Core::has_room`]); watched by the source
    /// task.
    room: watch::Sender<bool>,
    report: DriveReport,
    began: Instant,
}

impl<'c, A: Send + 'static> Core<'c, A> {
    /// Starts a task per sink.
    fn new(
        sinks: Vec<Box<dyn Sink>>,
        config: &'c DriverConfig,
        rehydrate: Option<Box<dyn Rehydrate>>,
    ) -> Self {
        let depth = config.sink_queue.max(1);
        let lanes_stop = CancellationToken::new();
        let (report_tx, reports) = mpsc::channel(depth * sinks.len().max(1));
        let lanes = sinks
            .into_iter()
            .enumerate()
            .map(|(index, sink)| {
                let (epochs, queue) = mpsc::channel(depth);
                let name = sink.name();
                let record = sink.is_system_of_record();
                let task = tokio::spawn(run_lane(
                    sink,
                    index,
                    queue,
                    report_tx.clone(),
                    config.clone(),
                    lanes_stop.clone(),
                ));
                Lane {
                    name,
                    record,
                    epochs: Some(epochs),
                    outstanding: 0,
                    next: 0,
                    task: Some(task),
                }
            })
            .collect();
        Self {
            config,
            rehydrate,
            unacked: VecDeque::new(),
            next_batch: 0,
            in_flight: VecDeque::new(),
            queued: VecDeque::new(),
            next_epoch: 0,
            flights: VecDeque::new(),
            next_flight: 0,
            generation: 0,
            refusing: None,
            lanes,
            reports,
            lanes_stop,
            room: watch::Sender::new(true),
            report: DriveReport::default(),
            began: Instant::now(),
        }
    }

    /// Batches held before the source stops being read.
    fn limit(&self) -> usize {
        self.config.dataflow.max_epochs_in_flight.max(1) + 2
    }

    /// Would a batch be taken now? Not while [`limit`](Self::limit) batches are held (a
    /// stalled sink stops the reading here), nor while [`RECORD_AHEAD`] epochs are already
    /// on their way to the system of record: the pipeline is behind, and the batch being
    /// gathered is better left to grow.
    fn has_room(&self) -> bool {
        let unrecorded = self.in_flight.len()
            + self
                .flights
                .iter()
                .filter(|flight| !flight.is_recorded())
                .count();
        self.unacked.len() < self.limit() && unrecorded < RECORD_AHEAD
    }

    /// Queues a submission as the next epoch.
    fn queue(&mut self, submission: Submission, batch: Option<u64>) {
        self.in_flight.push_back(Submitted {
            epoch: self.next_epoch,
            batch,
            at: Instant::now(),
        });
        self.next_epoch += 1;
        self.queued.push_back(submission);
    }

    fn observe_stage(&self, stage: Stage, took: Duration) {
        if let Some(metrics) = &self.config.metrics {
            metrics.observe_stage(stage, took);
        }
    }

    async fn run(
        &mut self,
        restore: Vec<Restore>,
        mut batch_rx: mpsc::Receiver<SourceBatch<A>>,
        ack_tx: mpsc::Sender<(A, Vec<Refusal>)>,
        halt: &CancellationToken,
    ) -> anyhow::Result<DriveReport> {
        if let Some(metrics) = &self.config.metrics {
            metrics.declare_sinks(self.lanes.iter().map(|lane| lane.name));
        }
        let result = self.pipeline(restore, &mut batch_rx, &ack_tx, halt).await;
        if result.is_err() {
            // Nothing more is acknowledged: what the sinks still hold need not be committed.
            self.lanes_stop.cancel();
        }
        let closed = self.close_lanes().await;
        result?;
        closed?;
        Ok(self.report.clone())
    }

    async fn pipeline(
        &mut self,
        restore: Vec<Restore>,
        batch_rx: &mut mpsc::Receiver<SourceBatch<A>>,
        ack_tx: &mpsc::Sender<(A, Vec<Refusal>)>,
        halt: &CancellationToken,
    ) -> anyhow::Result<()> {
        let mut generation = Generation::start(&self.config.dataflow, self.next_epoch).await?;
        if !restore.is_empty() {
            // No ack token: nothing was read for it. Its epoch is committed like any
            // other, before the first batch's.
            self.queue(Submission::Restore(restore), None);
        }
        let result = self
            .commit_loop(&mut generation, batch_rx, ack_tx, halt)
            .await;
        let ended = generation.end().await;
        result?;
        ended
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
            self.hand_out()?;
            self.complete();
            self.acknowledge(ack_tx).await?;
            if let Some(metrics) = &self.config.metrics {
                let lag = self
                    .unacked
                    .front()
                    .map_or(0.0, |oldest| oldest.submitted.elapsed().as_secs_f64());
                metrics.frontier_lag.set(lag);
            }
            if !source_open
                && self.unacked.is_empty()
                && self.in_flight.is_empty()
                && self.flights.is_empty()
            {
                return Ok(());
            }
            let room = self.has_room();
            self.room
                .send_if_modified(|open| std::mem::replace(open, room) != room);
            let step = tokio::select! {
                biased;
                report = self.reports.recv(), if !self.lanes.is_empty() => Step::Report(report),
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
                Step::Report(None) => bail!("the sinks' tasks ended before the driver did"),
                Step::Report(Some(report)) => {
                    if let Some(refused) = self.take_report(report, halt)? {
                        self.isolate(refused, generation, ack_tx, halt).await?;
                    }
                }
                Step::Output(None) => {
                    // The workers ended without being asked: one failed.
                    halt.cancel();
                    bail!("the dataflow ended before its input did");
                }
                Step::Output(Some(output)) => self.take_output(output, generation.offset)?,
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
            self.observe_stage(Stage::Decode, batch.decode_time);
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
            ready: None,
        });
    }

    /// Takes the dataflow's output of the oldest epoch in flight, for the sinks.
    fn take_output(&mut self, mut output: EpochOutput, offset: Epoch) -> anyhow::Result<()> {
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
        self.observe_stage(Stage::Dataflow, submitted.at.elapsed());
        let records = self.lanes.iter().filter(|lane| lane.record).count();
        self.flights.push_back(Flight {
            seq: self.next_flight,
            generation: self.generation,
            submitted,
            output: Arc::new(output),
            ready: Instant::now(),
            unrecorded: records,
            uncommitted: self.lanes.len() - records,
            record_time: Duration::ZERO,
        });
        self.next_flight += 1;
        Ok(())
    }

    /// Hands every sink the epochs it may commit next, as far as its queue has room: the
    /// system of record every epoch output (while a refusal is being isolated, only the
    /// epochs before the refused one), the other sinks only epochs the record has
    /// committed. Never waits.
    fn hand_out(&mut self) -> anyhow::Result<()> {
        let depth = self.config.sink_queue.max(1);
        let first = self.flights.front().map_or(self.next_flight, |f| f.seq);
        for lane in &mut self.lanes {
            let Some(epochs) = &lane.epochs else {
                continue;
            };
            while lane.outstanding < depth {
                let Some(flight) = lane
                    .next
                    .checked_sub(first)
                    .and_then(|index| usize::try_from(index).ok())
                    .and_then(|index| self.flights.get(index))
                else {
                    break;
                };
                if !lane.record && !flight.is_recorded() {
                    break;
                }
                if lane.record
                    && self
                        .refusing
                        .is_some_and(|refused| flight.output.epoch >= refused)
                {
                    break;
                }
                let handed = Handed {
                    generation: flight.generation,
                    output: Arc::clone(&flight.output),
                };
                if epochs.try_send(handed).is_err() {
                    bail!("the {} sink's task stopped taking epochs", lane.name);
                }
                lane.outstanding += 1;
                lane.next += 1;
            }
        }
        Ok(())
    }

    /// Takes a sink's report of an epoch. Returns the record's refusal of the epoch's
    /// data, for [`isolate`](Self::isolate).
    fn take_report(
        &mut self,
        report: LaneReport,
        halt: &CancellationToken,
    ) -> anyhow::Result<Option<(Epoch, SinkError)>> {
        let Some(lane) = self.lanes.get_mut(report.lane) else {
            bail!("a report from sink {}, which does not exist", report.lane);
        };
        lane.outstanding = lane.outstanding.saturating_sub(1);
        let (name, record) = (lane.name, lane.record);
        let epoch = report.epoch;
        let failure = match report.outcome {
            Outcome::Skipped => return Ok(None),
            Outcome::Committed => None,
            Outcome::Failed(error) => Some(error),
        };
        let isolating = self.rehydrate.is_some();
        let Some(flight) = self.flights.iter_mut().find(|f| f.output.epoch == epoch) else {
            bail!("the {name} sink committed epoch {epoch}, which is not in flight");
        };
        match failure {
            None => {}
            Some(error @ SinkError::Rejected { .. })
                if record && isolating && flight.submitted.batch.is_some() =>
            {
                return Ok(Some((epoch, error)));
            }
            Some(error @ SinkError::Rejected { .. }) if !record => {
                // The record holds the epoch: it stays, and is acknowledged. This store
                // misses what it refused (see docs/ARCHITECTURE.md, poison isolation).
                tracing::error!(epoch, sink = error.sink(), error = %format!("{:#}", anyhow!(error)), "A sink refused an epoch the system of record committed; the epoch stays committed there and is acknowledged, this sink misses what it refused.");
            }
            Some(error) => {
                tracing::error!(epoch, sink = error.sink(), error = %error, "A sink failed; the driver stops without acknowledging this epoch.");
                halt.cancel();
                return Err(anyhow!(error).context(format!("epoch {epoch} could not be committed")));
            }
        }
        if record {
            flight.unrecorded = flight.unrecorded.saturating_sub(1);
            flight.record_time = flight.record_time.max(report.took);
            if flight.is_recorded() {
                let took = flight.record_time;
                self.observe_stage(Stage::RecordCommit, took);
            }
        } else {
            flight.uncommitted = flight.uncommitted.saturating_sub(1);
        }
        Ok(None)
    }

    /// Retires the epochs every sink has committed, in order: counts them and marks their
    /// batches' segments committed.
    fn complete(&mut self) {
        while self.flights.front().is_some_and(Flight::is_done) {
            let Some(flight) = self.flights.pop_front() else {
                break;
            };
            self.finish(flight);
        }
    }

    fn finish(&mut self, flight: Flight) {
        let Flight {
            submitted,
            output,
            ready,
            ..
        } = flight;
        let epoch = output.epoch;
        self.report.epochs += 1;
        self.report.last_epoch = Some(epoch);
        if let Some(metrics) = &self.config.metrics {
            metrics.observe_epoch(&output);
            metrics.epochs_committed.inc();
            metrics
                .epoch_commit_duration
                .observe(ready.elapsed().as_secs_f64());
            if !output.restored {
                metrics.epoch_events.observe(output.events.len() as f64);
            }
        }
        match submitted.batch {
            Some(number) => {
                if let Some(batch) = self.unacked.iter_mut().find(|b| b.number == number) {
                    batch.segments.pop_front();
                    batch.ready = Some(ready);
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
            if let Some(ready) = batch.ready {
                self.observe_stage(Stage::AckWait, ready.elapsed());
            }
            // The source task keeps receiving acks until this task ends.
            if ack_tx.send((batch.ack, batch.refusals)).await.is_err() {
                bail!("the source task ended before every epoch was acknowledged");
            }
        }
        Ok(())
    }

    /// The system of record refused the data of epoch `refused`: lets every sink finish
    /// the epochs before it, narrows the refusal down (halves the epoch, or leaves out its
    /// single event as poison), then rebuilds the dataflow from the record and resubmits
    /// every unacknowledged batch.
    async fn isolate(
        &mut self,
        (refused, error): (Epoch, SinkError),
        generation: &mut Generation,
        ack_tx: &mpsc::Sender<(A, Vec<Refusal>)>,
        halt: &CancellationToken,
    ) -> anyhow::Result<()> {
        let SinkError::Rejected { sink, code, .. } = &error else {
            bail!("only a refusal of data is isolated");
        };
        let (sink, code) = (*sink, code.clone());
        let detail = format!("{:#}", anyhow!(error));
        self.settle(refused, ack_tx, halt).await?;
        // What is left is the refused epoch and those computed after it by the same
        // dataflow: none reached any store, and none will.
        let Some(flight) = self.flights.pop_front() else {
            bail!("epoch {refused} is no longer in flight");
        };
        self.flights.clear();
        for lane in &mut self.lanes {
            lane.next = self.next_flight;
        }
        self.refusing = None;
        let Some(batch) = self
            .unacked
            .iter_mut()
            .find(|batch| Some(batch.number) == flight.submitted.batch)
        else {
            bail!("epoch {refused} belongs to no batch held");
        };
        let Some(mut segment) = batch.segments.pop_front() else {
            bail!("epoch {refused} has no events to isolate");
        };
        if segment.len() > 1 {
            // In apply order, so that the halves apply as the whole would have.
            segment.sort_by_key(Event::apply_order);
            let second = segment.split_off(segment.len() / 2);
            tracing::warn!(epoch = refused, sink, code = %code, events = segment.len() + second.len(), error = %detail, "The system of record refused an epoch's data; rebuilding the dataflow from it and committing the epoch in halves to find the refused event.");
            batch.segments.push_front(second);
            batch.segments.push_front(segment);
        } else if let Some(event) = segment.pop() {
            tracing::warn!(epoch = refused, sink, code = %code, event_id = %event.event_id, kind = %event.kind(), error = %detail, "The system of record refused an event for good; it is dead-lettered and kept out of every store.");
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
        self.generation += 1;
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

    /// Before a rebuild: hands the record nothing more, lets the other sinks commit every
    /// epoch the record committed before `refused` (acknowledging what is then done) and
    /// waits until every sink has reported all it was handed, so that the refused epoch is
    /// the oldest one left and nothing is on its way to any store.
    async fn settle(
        &mut self,
        refused: Epoch,
        ack_tx: &mpsc::Sender<(A, Vec<Refusal>)>,
        halt: &CancellationToken,
    ) -> anyhow::Result<()> {
        self.refusing = Some(refused);
        loop {
            self.hand_out()?;
            self.complete();
            self.acknowledge(ack_tx).await?;
            let oldest = self.flights.front().map(|flight| flight.output.epoch);
            if oldest == Some(refused) && self.lanes.iter().all(|lane| lane.outstanding == 0) {
                return Ok(());
            }
            let Some(report) = self.reports.recv().await else {
                bail!("the sinks' tasks ended before the driver did");
            };
            if let Some((epoch, _)) = self.take_report(report, halt)? {
                bail!("the system of record refused epoch {epoch} after refusing {refused}");
            }
        }
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

    /// Ends every sink's task (closing its queue; after a failure, `lanes_stop` has cut
    /// its commit short) and closes the sinks they hand back.
    async fn close_lanes(&mut self) -> anyhow::Result<()> {
        for lane in &mut self.lanes {
            lane.epochs = None;
        }
        let mut failure = None;
        for lane in &mut self.lanes {
            let Some(task) = lane.task.take() else {
                continue;
            };
            match task.await {
                Ok(mut sink) => {
                    if let Err(error) = sink.close().await {
                        tracing::error!(sink = lane.name, %error, "A sink failed to close.");
                        failure.get_or_insert(anyhow!(error).context("closing a sink failed"));
                    }
                }
                Err(error) => {
                    tracing::error!(sink = lane.name, %error, "A sink's task failed.");
                    failure.get_or_insert(anyhow!("the {} sink's task failed", lane.name));
                }
            }
        }
        failure.map_or(Ok(()), Err)
    }
}

/// A sink's task: commits each epoch it is handed, in order, with
/// [`commit_with_retry`], and reports each. A system of record that refused an epoch (or
/// failed on one) commits nothing more computed by the same dataflow; any failure but a
/// refusal of data ends the task (the driver stops). Ends when its queue closes, or at
/// once, mid-commit, when `stop` fires; hands the sink back either way.
async fn run_lane(
    mut sink: Box<dyn Sink>,
    lane: usize,
    mut epochs: mpsc::Receiver<Handed>,
    reports: mpsc::Sender<LaneReport>,
    config: DriverConfig,
    stop: CancellationToken,
) -> Box<dyn Sink> {
    let record = sink.is_system_of_record();
    let name = sink.name();
    let mut refused = None;
    loop {
        let handed = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            handed = epochs.recv() => handed,
        };
        let Some(Handed { generation, output }) = handed else {
            break;
        };
        let epoch = output.epoch;
        let started = Instant::now();
        let mut go_on = true;
        let outcome = if refused == Some(generation) {
            Outcome::Skipped
        } else {
            let commit = AssertUnwindSafe(commit_with_retry(sink.as_mut(), output, &config));
            let committed = tokio::select! {
                biased;
                () = stop.cancelled() => break,
                committed = commit.catch_unwind() => committed,
            };
            match committed {
                Ok(Ok(())) => Outcome::Committed,
                Ok(Err(error)) => {
                    if record {
                        refused = Some(generation);
                    }
                    go_on = matches!(error, SinkError::Rejected { .. });
                    Outcome::Failed(error)
                }
                Err(_panic) => {
                    go_on = false;
                    Outcome::Failed(SinkError::Failed {
                        sink: name,
                        epoch,
                        source: "the sink panicked while committing".into(),
                    })
                }
            }
        };
        let report = LaneReport {
            lane,
            epoch,
            outcome,
            took: started.elapsed(),
        };
        if reports.send(report).await.is_err() || !go_on {
            break;
        }
    }
    sink
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
                decode_time: Duration::ZERO,
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
        fleet(1)
    }

    /// A simulated fleet's events over `minutes`.
    fn fleet(minutes: u32) -> Vec<Event> {
        let config = SimulatorConfig {
            couriers: 5,
            zones: 2,
            seed: 3,
            ..SimulatorConfig::default()
        };
        let mut sim = FleetSimulator::new(config, 1_700_000_000_000);
        let mut events = sim.initial_events();
        for _ in 0..minutes {
            events.extend(sim.step(60_000));
        }
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
                    decode_time: Duration::ZERO,
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
        isolates_the_poison(Duration::ZERO).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refusal_while_another_sink_is_behind_isolates_exactly_the_poison() {
        // The read model commits each epoch long after the record: when the record refuses
        // one, the read model still holds epochs before it, and the record may hold the
        // epochs computed after it.
        isolates_the_poison(Duration::from_millis(30)).await;
    }

    /// A sink after the record that takes `delay` per epoch and notes whether it was ever
    /// handed one of `poison`.
    struct Behind {
        inner: ReadModelSink,
        delay: Duration,
        poison: Vec<delivertrack_dataflow::EventId>,
        leaked: Arc<std::sync::atomic::AtomicBool>,
    }

    impl Sink for Behind {
        fn name(&self) -> &'static str {
            "behind"
        }

        fn commit(&mut self, output: Arc<EpochOutput>) -> SinkFuture<'_> {
            Box::pin(async move {
                if output
                    .events
                    .iter()
                    .any(|e| self.poison.contains(&e.event_id))
                {
                    self.leaked.store(true, std::sync::atomic::Ordering::SeqCst);
                }
                tokio::time::sleep(self.delay).await;
                self.inner.commit(output).await
            })
        }
    }

    async fn isolates_the_poison(delay: Duration) {
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
        let leaked = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sinks: Vec<Box<dyn Sink>> = vec![
            Box::new(Behind {
                inner: ReadModelSink::new(model.clone()),
                delay,
                poison: poison.clone(),
                leaked: Arc::clone(&leaked),
            }),
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
        assert!(
            !leaked.load(std::sync::atomic::Ordering::SeqCst),
            "no epoch holding a poison reaches a sink after the record"
        );

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

    /// A system of record that takes `delay` per epoch and publishes the epochs it
    /// committed (restored state aside).
    struct Ledger {
        delay: Duration,
        committed: watch::Sender<Vec<Epoch>>,
    }

    impl Sink for Ledger {
        fn name(&self) -> &'static str {
            "ledger"
        }

        fn is_system_of_record(&self) -> bool {
            true
        }

        fn commit(&mut self, output: Arc<EpochOutput>) -> SinkFuture<'_> {
            Box::pin(async move {
                tokio::time::sleep(self.delay).await;
                if !output.restored {
                    self.committed
                        .send_modify(|committed| committed.push(output.epoch));
                }
                Ok(())
            })
        }
    }

    /// A [`Scripted`] source of `batches` that never ends, with what it publishes.
    fn scripted(
        batches: VecDeque<Vec<Event>>,
    ) -> (Scripted, watch::Receiver<Vec<u32>>, watch::Receiver<u32>) {
        let (acked_tx, acked) = watch::channel(Vec::new());
        let (asked_tx, asked) = watch::channel(0);
        let source = Scripted {
            batches,
            gathered: Vec::new(),
            tokens: 0,
            acked: acked_tx,
            asked: asked_tx,
        };
        (source, acked, asked)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_record_commits_ahead_of_a_slow_sink_and_nothing_is_acknowledged_before_it() {
        const PATIENCE: Duration = Duration::from_secs(60);
        let batches: VecDeque<Vec<Event>> =
            events().chunks(30).take(4).map(<[Event]>::to_vec).collect();
        let (source, mut acked, _asked) = scripted(batches);
        let (committed_tx, mut committed) = watch::channel(Vec::new());
        let (gate, open) = watch::channel(false);
        let model = ReadModel::default();
        let sinks: Vec<Box<dyn Sink>> = vec![
            Box::new(Gate(open)),
            Box::new(ReadModelSink::new(model.clone())),
            Box::new(Ledger {
                delay: Duration::ZERO,
                committed: committed_tx,
            }),
        ];
        let metrics = DriverMetrics::register(&prometheus::Registry::new()).unwrap();
        let config = DriverConfig {
            metrics: Some(metrics.clone()),
            ..config()
        };
        let stop = CancellationToken::new();
        let driving = tokio::spawn(drive(source, sinks, config, Vec::new(), stop.clone()));

        // The gate holds the first epoch; the record goes on committing the next ones.
        timeout(
            PATIENCE,
            committed.wait_for(|epochs| *epochs == [0, 1, 2, 3]),
        )
        .await
        .expect("the record commits every epoch while another sink holds the first")
        .unwrap();
        assert!(
            acked.borrow().is_empty(),
            "no batch is acknowledged before every sink committed it"
        );

        gate.send_replace(true);
        timeout(PATIENCE, acked.wait_for(|acked| acked.len() == 4))
            .await
            .expect("every batch is acknowledged once the gate opens")
            .unwrap();
        assert_eq!(*acked.borrow(), [0, 1, 2, 3], "in read order");
        stop.cancel();
        let report = timeout(PATIENCE, driving)
            .await
            .expect("the driver drains")
            .unwrap()
            .unwrap();
        assert_eq!((report.epochs, report.acked), (4, 4));
        assert_eq!(model.epoch(), Some(3));
        // Each epoch's way, stage by stage.
        for stage in Stage::ALL {
            let observed = metrics
                .epoch_stage_duration
                .with_label_values(&[stage.label()])
                .get_sample_count();
            assert_eq!(observed, 4, "{stage:?}");
        }
        assert_eq!(metrics.epoch_events.get_sample_count(), 4);
        assert_eq!(metrics.epoch_events.get_sample_sum(), 120.0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_sink_stops_the_reading_of_the_source_within_its_bounds() {
        const PATIENCE: Duration = Duration::from_secs(60);
        let batches: VecDeque<Vec<Event>> = events().chunks(2).map(<[Event]>::to_vec).collect();
        let available = batches.len();
        let (source, mut acked, asked) = scripted(batches);
        let (committed_tx, mut committed) = watch::channel(Vec::new());
        let (gate, open) = watch::channel(false);
        let sinks: Vec<Box<dyn Sink>> = vec![
            Box::new(Gate(open)),
            Box::new(Ledger {
                delay: Duration::ZERO,
                committed: committed_tx,
            }),
        ];
        let config = config();
        // The batches the commit task holds, the one on its way to it and the one the source
        // task holds back.
        let held = config.dataflow.max_epochs_in_flight + 2;
        let bound = held + 2;
        assert!(available > 2 * bound, "the source has more to give");
        let stop = CancellationToken::new();
        let driving = tokio::spawn(drive(source, sinks, config, Vec::new(), stop.clone()));

        // The record keeps up and commits every batch held; the stalled sink commits none.
        timeout(PATIENCE, committed.wait_for(|epochs| epochs.len() >= held))
            .await
            .expect("the record commits what the driver holds")
            .unwrap();
        // Time for the source task to read on, if anything let it.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let read = *asked.borrow();
        assert!(
            read as usize <= bound,
            "{read} batches read while a sink stalls; at most {bound} may be"
        );
        assert_eq!(committed.borrow().len(), held, "no epoch beyond the bound");
        assert!(acked.borrow().is_empty());

        // Once it moves again, everything read is committed and acknowledged, in order.
        gate.send_replace(true);
        timeout(PATIENCE, acked.wait_for(|acked| acked.len() >= available))
            .await
            .expect("the source is read to its end")
            .unwrap();
        stop.cancel();
        let report = timeout(PATIENCE, driving)
            .await
            .expect("the driver drains")
            .unwrap()
            .unwrap();
        let tokens: Vec<u32> = (0..u32::try_from(available).unwrap()).collect();
        assert_eq!(*acked.borrow(), tokens);
        assert_eq!(report.acked, available as u64);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_backlog_is_committed_in_fewer_larger_epochs() {
        const PATIENCE: Duration = Duration::from_secs(120);
        let events = fleet(4);
        let count = events.len() as u64;
        assert!(
            count >= 500,
            "a stream long enough to count epochs: {count}"
        );
        // A steady stream, five events every 5 ms, into a channel that holds one: the
        // source cannot buffer a backlog, the driver has to.
        let (sender, source) = in_process(1);
        let feeder = tokio::spawn(async move {
            for chunk in events.chunks(5) {
                sender.send_batch(chunk.to_vec()).await?;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok::<_, SourceError>(())
        });
        let (committed_tx, _committed) = watch::channel(Vec::new());
        let sinks: Vec<Box<dyn Sink>> = vec![
            Box::new(Ledger {
                delay: Duration::from_millis(50),
                committed: committed_tx,
            }),
            Box::new(ReadModelSink::new(ReadModel::default())),
        ];
        let config = DriverConfig {
            epoch_policy: EpochPolicy {
                max_events: 10_000,
                max_wait: Duration::from_millis(10),
            },
            ..config()
        };
        let report = timeout(
            PATIENCE,
            drive(source, sinks, config, Vec::new(), CancellationToken::new()),
        )
        .await
        .expect("the driver ends when its source ends")
        .unwrap();
        feeder.await.unwrap().unwrap();
        assert_eq!(report.events, count);
        assert_eq!(report.acked, report.epochs);
        // Closing every 10 ms would make about one epoch per 10 events. With commits of
        // 50 ms an epoch instead grows while the one before it is committed: about 50 ms
        // of input, 50 events.
        assert!(
            report.epochs <= count / 20,
            "{} epochs for {count} events",
            report.epochs
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn while_the_commits_keep_up_an_epoch_closes_at_its_time_bound() {
        const PATIENCE: Duration = Duration::from_secs(120);
        const CHUNKS: usize = 30;
        // Five events every 40 ms; an epoch closes 10 ms after its first event, and the
        // sinks take no time: each chunk is an epoch of its own, none waits for another.
        let events: Vec<Event> = events().into_iter().take(CHUNKS * 5).collect();
        let (sender, source) = in_process(64);
        let feeder = tokio::spawn(async move {
            for chunk in events.chunks(5) {
                sender.send_batch(chunk.to_vec()).await?;
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            Ok::<_, SourceError>(())
        });
        let (committed_tx, _committed) = watch::channel(Vec::new());
        let sinks: Vec<Box<dyn Sink>> = vec![
            Box::new(Ledger {
                delay: Duration::ZERO,
                committed: committed_tx,
            }),
            Box::new(ReadModelSink::new(ReadModel::default())),
        ];
        let report = timeout(
            PATIENCE,
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
        assert_eq!(report.events, (CHUNKS * 5) as u64);
        // A slow timer may let two chunks share an epoch now and then; growing epochs
        // would merge most of them.
        assert!(
            report.epochs as usize >= CHUNKS * 4 / 5,
            "{} epochs for {CHUNKS} chunks",
            report.epochs
        );
    }

    /// Commits the epochs before `at`, then fails for good (not for the data).
    struct FailsAt(Epoch);

    impl Sink for FailsAt {
        fn name(&self) -> &'static str {
            "fails_at"
        }

        fn commit(&mut self, output: Arc<EpochOutput>) -> SinkFuture<'_> {
            Box::pin(async move {
                if output.epoch < self.0 {
                    return Ok(());
                }
                Err(SinkError::Failed {
                    sink: "fails_at",
                    epoch: output.epoch,
                    source: "no".into(),
                })
            })
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sink_failing_midway_stops_the_driver_and_only_what_every_sink_committed_is_acknowledged()
     {
        const PATIENCE: Duration = Duration::from_secs(60);
        let batches: VecDeque<Vec<Event>> =
            events().chunks(20).take(8).map(<[Event]>::to_vec).collect();
        let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
        let source = Recording {
            batches,
            next: 0,
            acked: Arc::clone(&acked),
        };
        let (committed_tx, _committed) = watch::channel(Vec::new());
        let sinks: Vec<Box<dyn Sink>> = vec![
            Box::new(Ledger {
                delay: Duration::ZERO,
                committed: committed_tx,
            }),
            Box::new(FailsAt(3)),
            Box::new(ReadModelSink::new(ReadModel::default())),
        ];
        let error = timeout(
            PATIENCE,
            drive(
                source,
                sinks,
                config(),
                Vec::new(),
                CancellationToken::new(),
            ),
        )
        .await
        .expect("a sink failure ends the driver")
        .expect_err("the failure is reported");
        assert!(format!("{error:#}").contains("fails_at"), "{error:#}");
        // The record may have committed epochs after 3; none of them, nor 3, is
        // acknowledged, and what is acknowledged is a prefix of the read order.
        let tokens: Vec<u32> = acked.lock().unwrap().iter().map(|(t, _)| *t).collect();
        assert!(
            tokens.len() <= 3 && tokens.iter().copied().eq(0..tokens.len() as u32),
            "{tokens:?}"
        );
    }
}
