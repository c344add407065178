//! [`Readiness`]: whether the pipeline's source is connected, as `/readyz` reports it.
//!
//! The API knows nothing of RabbitMQ (it may depend only on `dataflow` and `sinks`), so the
//! binary hands it a small [`SourceProbe`] instead: `demo`'s in-process source is always
//! connected, `run` maps the RabbitMQ source's health onto [`SourceStatus`]. A probe is
//! asked on every `/readyz` request, so it must be cheap (reading a `watch` value is).

use std::fmt;
use std::sync::Arc;

/// The state of the pipeline's source, as far as readiness is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceStatus {
    /// Input can flow.
    Connected,
    /// Input cannot flow now; the reason is shown to whoever asks `/readyz`.
    Unavailable {
        /// A sentence for operators ("RabbitMQ is unreachable (attempt 3): ...").
        reason: String,
    },
}

/// Tells the current [`SourceStatus`]. Implemented for every `Fn() -> SourceStatus`, so a
/// closure over a `watch::Receiver` is a probe.
pub trait SourceProbe: Send + Sync + 'static {
    /// The status now.
    fn status(&self) -> SourceStatus;
}

impl<F> SourceProbe for F
where
    F: Fn() -> SourceStatus + Send + Sync + 'static,
{
    fn status(&self) -> SourceStatus {
        self()
    }
}

/// The probe `/readyz` asks, shared by every request.
#[derive(Clone)]
pub struct Readiness(Arc<dyn SourceProbe>);

impl Readiness {
    /// Readiness from a probe.
    pub fn new(probe: impl SourceProbe) -> Self {
        Self(Arc::new(probe))
    }

    /// A source that is always connected (the in-process source of `demo`, tests).
    pub fn always_connected() -> Self {
        Self::new(|| SourceStatus::Connected)
    }

    /// The status now.
    pub fn source_status(&self) -> SourceStatus {
        self.0.status()
    }
}

impl Default for Readiness {
    fn default() -> Self {
        Self::always_connected()
    }
}

impl fmt::Debug for Readiness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Readiness")
            .field(&self.source_status())
            .finish()
    }
}
