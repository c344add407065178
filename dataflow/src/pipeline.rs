//! Runs the dataflow on timely worker threads: epochs of events in, one
//! [`EpochOutput`](crate::model::EpochOutput) per epoch out, in epoch order.

use std::time::Duration;

use crate::event::Event;
use crate::model::{Epoch, EpochOutput};

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
}

impl Default for DataflowConfig {
    fn default() -> Self {
        Self {
            workers: 2,
            default_speed_mps: 5.0,
            min_speed_mps: 0.5,
            speed_window: 5,
            max_epochs_in_flight: 4,
        }
    }
}

/// The dataflow could not start.
#[derive(Debug, thiserror::Error)]
pub enum DataflowError {
    /// Timely refused the configuration.
    #[error("the dataflow workers did not start: {0}")]
    Start(String),
    /// A worker thread panicked.
    #[error("a dataflow worker failed")]
    WorkerFailed,
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
    let _ = config;
    Err(DataflowError::Start("not yet".into()))
}

/// Feeds epochs to the workers.
#[derive(Debug)]
pub struct EpochSender {
    next: Epoch,
}

impl EpochSender {
    /// Submits the events of the next epoch and returns its number. Blocks while
    /// `max_epochs_in_flight` epochs are already being computed (backpressure).
    ///
    /// # Errors
    /// [`Closed`] when the workers have stopped.
    pub fn send(&mut self, events: Vec<Event>) -> Result<Epoch, Closed> {
        let _ = events;
        let epoch = self.next;
        self.next += 1;
        Ok(epoch)
    }

    /// Closes the input: the workers finish the epochs already sent, output them and stop.
    pub fn close(self) {}
}

/// Receives the output of every epoch, in order.
#[derive(Debug)]
pub struct EpochReceiver {}

impl EpochReceiver {
    /// The next epoch's output; `None` once the input is closed and every epoch was output.
    pub fn recv(&mut self) -> Option<EpochOutput> {
        None
    }

    /// As [`recv`](Self::recv), waiting at most `timeout`; `Ok(None)` when it elapsed.
    ///
    /// # Errors
    /// [`Closed`] once the input is closed and every epoch was output.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<EpochOutput>, Closed> {
        let _ = timeout;
        Err(Closed)
    }
}
