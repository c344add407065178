//! Configuration of the read model.

/// How the read model buffers its live stream.
#[derive(Clone, Debug)]
pub struct ReadModelConfig {
    /// Epoch updates buffered per subscriber. A subscriber that falls further behind
    /// misses updates and is told so (it then takes a fresh snapshot); the publisher never
    /// waits for a subscriber (ARCHITECTURE rule 6).
    pub live_capacity: usize,
}

impl Default for ReadModelConfig {
    fn default() -> Self {
        Self { live_capacity: 64 }
    }
}
