//! Runs the dataflow on timely worker threads: epochs of events in, one
//! [`EpochOutput`] per epoch out, in epoch order.
//!
//! The input half ([`EpochSender`]) splits each epoch's events across the workers (every
//! event is routed to the worker that owns its entity inside the dataflow, so any split is
//! correct) and blocks while too many epochs are in flight. The output half
//! ([`EpochReceiver`]) assembles the workers' shares of each closed epoch.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use timely::container::CapacityContainerBuilder;
use timely::dataflow::operators::Input as _;
use timely::dataflow::operators::probe::Handle as ProbeHandle;
use timely::worker::Worker;

use crate::compute::{ComputeConfig, delivery_tracking};
use crate::eta::EtaConfig;
use crate::event::Event;
use crate::model::{Epoch, EpochOutput};
use crate::operators::output::{WorkerReport, report};
use crate::restore::{Input, Restore};

/// How the dataflow computes and how many threads it uses.
#[derive(Clone, Debug)]
pub struct DataflowConfig {
    /// Timely worker threads in this process.
    pub workers: usize,
    /// ETA speed when a courier's speed is unknown or below `min_speed_mps`, m/s.
    pub default_speed_mps: f64,
    /// Slower than this, a courier's estimated speed is not trusted for an ETA, m/s.
    pub min_speed_mps: f64,
    /// Fixes (including the newest) the speed estimate spans.
    pub speed_window: usize,
    /// Epochs accepted but not yet output before [`EpochSender::send`] blocks.
    pub max_epochs_in_flight: usize,
    /// The fastest a courier moves between two fixes, m/s: a fix whose implied speed from
    /// the courier's previous accepted fix is higher is refused as `implausible_jump`.
    pub max_courier_speed_mps: f64,
}

/// The default of [`DataflowConfig::max_courier_speed_mps`]: 252 km/h, beyond any delivery
/// vehicle in a city, while a GPS glitch or a forged fix across town is far faster.
pub const DEFAULT_MAX_COURIER_SPEED_MPS: f64 = 70.0;

/// m/s as whole mm/s (at least 0, at most `u32::MAX`).
pub fn mps_to_mm_s(mps: f64) -> u32 {
    // `as` saturates, and NaN becomes 0.
    (mps * 1_000.0).round() as u32
}

impl Default for DataflowConfig {
    fn default() -> Self {
        Self {
            workers: 2,
            default_speed_mps: 5.0,
            min_speed_mps: 0.5,
            speed_window: 5,
            max_epochs_in_flight: 4,
            max_courier_speed_mps: DEFAULT_MAX_COURIER_SPEED_MPS,
        }
    }
}

impl DataflowConfig {
    fn compute(&self) -> ComputeConfig {
        ComputeConfig {
            eta: EtaConfig::from_mps(self.default_speed_mps, self.min_speed_mps),
            speed_window: self.speed_window.max(2),
            max_courier_speed_mm_s: mps_to_mm_s(self.max_courier_speed_mps),
        }
    }
}

/// The dataflow could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum DataflowError {
    /// Timely refused the configuration.
    #[error("the dataflow workers did not start: {0}")]
    Start(String),
    /// A worker thread panicked.
    #[error("a dataflow worker failed: {0}")]
    WorkerFailed(String),
}

/// The pipeline has shut down and takes no more input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the dataflow is closed")]
pub struct Closed;

/// Starts the workers. Returns the input half and the output half, which may live on
/// different threads.
///
/// # Errors
/// [`DataflowError::Start`] when timely cannot start the workers.
pub fn start(config: DataflowConfig) -> Result<(EpochSender, EpochReceiver), DataflowError> {
    let workers = config.workers.max(1);
    let in_flight = config.max_epochs_in_flight.max(1);
    let compute = config.compute();

    let (report_tx, report_rx) = sync_channel::<WorkerReport>(workers * in_flight);
    let (final_tx, final_rx) = sync_channel::<Result<(), String>>(1);
    let mut inputs = Vec::with_capacity(workers);
    let mut worker_inputs = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (tx, rx) = sync_channel::<Vec<Input>>(in_flight);
        inputs.push(tx);
        worker_inputs.push(Some(rx));
    }
    let worker_inputs = Arc::new(Mutex::new(worker_inputs));

    let guards = timely::execute(timely::Config::process(workers), move |worker| {
        let index = worker.index();
        let events = worker_inputs
            .lock()
            .ok()
            .and_then(|mut inputs| inputs.get_mut(index).and_then(Option::take));
        let Some(events) = events else { return };
        let probe = ProbeHandle::new();
        let sender = report_tx.clone();
        let mut input = worker.dataflow::<u64, _, _>(|scope| {
            let (input, stream) = scope.new_input::<Vec<Input>>();
            let (changes, rejections) = delivery_tracking(stream, compute).changes();
            report(changes, rejections, index, sender, &probe);
            input
        });
        drive(worker, &mut input, &events, &probe, in_flight as u64);
        drop(input);
        while worker.step_or_park(Some(Duration::from_millis(1))) {}
    })
    .map_err(DataflowError::Start)?;

    // The supervisor waits for the workers so that a failure reaches the receiver.
    std::thread::Builder::new()
        .name("dataflow-supervisor".into())
        .spawn(move || {
            let failures: Vec<String> = guards.join().into_iter().filter_map(Result::err).collect();
            let outcome = if failures.is_empty() {
                Ok(())
            } else {
                Err(failures.join("; "))
            };
            let _ = final_tx.send(outcome);
        })
        .map_err(|error| DataflowError::Start(error.to_string()))?;

    let submitted = Arc::new(AtomicU64::new(0));
    let inputs_kept = Arc::new(Mutex::new(BTreeMap::new()));
    let sender = EpochSender {
        inputs,
        next: 0,
        submitted: Arc::clone(&submitted),
        inputs_kept: Arc::clone(&inputs_kept),
    };
    let receiver = EpochReceiver {
        reports: report_rx,
        inputs_kept,
        finished: final_rx,
        submitted,
        frontiers: vec![Some(0); workers],
        open: BTreeMap::new(),
        next: 0,
        outcome: None,
    };
    Ok((sender, receiver))
}

/// A worker's loop: admit epochs while fewer than `in_flight` are unfinished, step the
/// dataflow, until the input is closed.
fn drive(
    worker: &mut Worker,
    input: &mut timely::dataflow::InputHandle<u64, CapacityContainerBuilder<Vec<Input>>>,
    events: &Receiver<Vec<Input>>,
    probe: &ProbeHandle<u64>,
    in_flight: u64,
) {
    loop {
        let epoch = *input.time();
        let idle = !probe.less_than(&epoch);
        if !probe.less_than(&epoch.saturating_sub(in_flight)) {
            let next = if idle {
                // Nothing to compute: wait for input rather than spin.
                events
                    .recv_timeout(Duration::from_millis(20))
                    .map_err(|error| match error {
                        RecvTimeoutError::Timeout => TryRecvError::Empty,
                        RecvTimeoutError::Disconnected => TryRecvError::Disconnected,
                    })
            } else {
                events.try_recv()
            };
            match next {
                Ok(mut batch) => {
                    input.send_batch(&mut batch);
                    input.advance_to(epoch + 1);
                }
                Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Disconnected) => return,
            }
        }
        worker.step_or_park(Some(Duration::from_millis(1)));
    }
}

/// Feeds epochs to the workers.
#[derive(Debug)]
pub struct EpochSender {
    inputs: Vec<SyncSender<Vec<Input>>>,
    next: Epoch,
    submitted: Arc<AtomicU64>,
    /// Each epoch's events (`None`: a restore epoch), until the receiver attaches them to
    /// the epoch's output.
    inputs_kept: Arc<Mutex<BTreeMap<Epoch, Option<Vec<Event>>>>>,
}

impl EpochSender {
    /// Submits the events of the next epoch and returns its number. Blocks while
    /// `max_epochs_in_flight` epochs are already being computed (backpressure).
    ///
    /// # Errors
    /// [`Closed`] when the workers have stopped.
    pub fn send(&mut self, events: Vec<Event>) -> Result<Epoch, Closed> {
        let kept = Some(events.clone());
        self.submit(kept, events.into_iter().map(Input::Event).collect())
    }

    /// Submits restored state as the next epoch (hydration): must come before any event,
    /// as the pipeline's first epoch. Its output has `restored` set and holds the restored
    /// records (and what they imply: `inside`, ETAs, aggregates). Blocks like [`send`](Self::send).
    ///
    /// # Errors
    /// [`Closed`] when the workers have stopped.
    pub fn restore(&mut self, records: Vec<Restore>) -> Result<Epoch, Closed> {
        self.submit(
            None,
            records
                .into_iter()
                .map(|record| Input::Restore(Box::new(record)))
                .collect(),
        )
    }

    fn submit(
        &mut self,
        kept: Option<Vec<Event>>,
        mut inputs: Vec<Input>,
    ) -> Result<Epoch, Closed> {
        if let Ok(mut kept_inputs) = self.inputs_kept.lock() {
            kept_inputs.insert(self.next, kept);
        }
        let workers = self.inputs.len();
        let share = inputs.len().div_ceil(workers.max(1));
        let mut shares = Vec::with_capacity(workers);
        for _ in 1..workers {
            let rest = inputs.split_off(share.min(inputs.len()));
            shares.push(std::mem::replace(&mut inputs, rest));
        }
        shares.push(inputs);
        for (input, share) in self.inputs.iter().zip(shares) {
            input.send(share).map_err(|_| Closed)?;
        }
        let epoch = self.next;
        self.next += 1;
        self.submitted.store(self.next, Ordering::Release);
        Ok(epoch)
    }

    /// The epoch the next [`send`](Self::send) will get.
    pub fn next_epoch(&self) -> Epoch {
        self.next
    }

    /// Closes the input: the workers finish the epochs already sent, output them and stop.
    pub fn close(self) {}
}

/// Receives the output of every epoch, in order.
#[derive(Debug)]
pub struct EpochReceiver {
    reports: Receiver<WorkerReport>,
    inputs_kept: Arc<Mutex<BTreeMap<Epoch, Option<Vec<Event>>>>>,
    finished: Receiver<Result<(), String>>,
    submitted: Arc<AtomicU64>,
    /// Per worker: every epoch below is closed there (`None`: done).
    frontiers: Vec<Option<Epoch>>,
    /// Shares received for epochs not yet complete everywhere.
    open: BTreeMap<Epoch, EpochOutput>,
    /// The next epoch to hand out.
    next: Epoch,
    /// Set once the workers have exited.
    outcome: Option<Result<(), String>>,
}

impl EpochReceiver {
    /// The next epoch's output; `None` once the input is closed and every epoch was output
    /// (or a worker failed: see [`outcome`](Self::outcome)).
    pub fn recv(&mut self) -> Option<EpochOutput> {
        loop {
            match self.recv_timeout(Duration::from_secs(3600)) {
                Ok(Some(output)) => return Some(output),
                Ok(None) => continue,
                Err(Closed) => return None,
            }
        }
    }

    /// As [`recv`](Self::recv), waiting at most `timeout`; `Ok(None)` when it elapsed.
    ///
    /// # Errors
    /// [`Closed`] once the input is closed and every epoch was output.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<EpochOutput>, Closed> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(output) = self.pop_complete() {
                return Ok(Some(output));
            }
            if self.outcome.is_some() {
                return Err(Closed);
            }
            let wait = deadline.saturating_duration_since(Instant::now());
            match self
                .reports
                .recv_timeout(wait.min(Duration::from_millis(50)))
            {
                Ok(report) => self.absorb(report),
                Err(RecvTimeoutError::Timeout) => {
                    if let Ok(outcome) = self.finished.try_recv() {
                        self.absorb_remaining();
                        self.outcome = Some(outcome);
                    } else if Instant::now() >= deadline {
                        return Ok(None);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let outcome = self
                        .finished
                        .recv()
                        .unwrap_or_else(|_| Err("the supervisor vanished".into()));
                    self.outcome = Some(outcome);
                }
            }
        }
    }

    /// How the workers ended, once they have: `Err` with the failure if one panicked.
    ///
    /// # Errors
    /// [`DataflowError::WorkerFailed`] when a worker panicked.
    pub fn outcome(&self) -> Option<Result<(), DataflowError>> {
        self.outcome
            .as_ref()
            .map(|outcome| outcome.clone().map_err(DataflowError::WorkerFailed))
    }

    fn absorb_remaining(&mut self) {
        while let Ok(report) = self.reports.try_recv() {
            self.absorb(report);
        }
    }

    fn absorb(&mut self, report: WorkerReport) {
        if let Some(frontier) = self.frontiers.get_mut(report.worker) {
            *frontier = report.frontier;
        }
        for share in report.shares {
            let epoch = share.epoch;
            let output = self.open.entry(epoch).or_insert_with(|| EpochOutput {
                epoch,
                ..EpochOutput::default()
            });
            output.changes.extend(share.changes);
            output.rejections.extend(share.rejections);
        }
    }

    /// The next epoch, if every worker has closed it.
    fn pop_complete(&mut self) -> Option<EpochOutput> {
        let closed_below = self
            .frontiers
            .iter()
            .map(|f| f.unwrap_or(Epoch::MAX))
            .min()
            .unwrap_or(Epoch::MAX);
        let submitted = self.submitted.load(Ordering::Acquire);
        if self.next >= closed_below || (closed_below == Epoch::MAX && self.next >= submitted) {
            return None;
        }
        let epoch = self.next;
        self.next += 1;
        let mut output = self.open.remove(&epoch).unwrap_or(EpochOutput {
            epoch,
            ..EpochOutput::default()
        });
        output.changes.sort();
        output.rejections.sort();
        if let Ok(mut kept) = self.inputs_kept.lock() {
            match kept.remove(&epoch) {
                Some(Some(events)) => output.events = events,
                Some(None) => output.restored = true,
                None => {}
            }
        }
        Some(output)
    }
}
