//! Logging: `tracing` to stderr, filtered by `RUST_LOG`, for people or for machines.

use anyhow::Context;
use tracing_subscriber::EnvFilter;

/// How log lines look.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// One readable line per event.
    #[default]
    Human,
    /// One JSON object per event, for log collectors.
    Json,
}

/// Installs the global subscriber. `RUST_LOG` filters (default: `info`, the HTTP trace at
/// `info` too).
///
/// # Errors
/// A subscriber was already installed.
pub fn init(format: LogFormat) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,tower_http=info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    }
    .map_err(|error| anyhow::anyhow!(error))
    .context("the logger could not be installed")
}
