//! `delivertrack migrate`: brings a PostgreSQL database up to the schema in `migrations/`.
//!
//! Migrations are idempotent: applied ones are recorded in the database and skipped, so
//! running this again (or at every start) changes nothing.

use anyhow::Context;
use delivertrack_sinks::PostgresConfig;
use delivertrack_sinks::postgres::{connect_pool, ensure_database, migrate};

/// Creates the configured database if the server lacks it, connects to it and applies the
/// migrations it does not have yet.
///
/// # Errors
/// The database cannot be reached (the error names it), or a migration fails.
pub async fn run_migrations(config: &PostgresConfig) -> anyhow::Result<()> {
    // The errors name the database already.
    ensure_database(config).await?;
    let pool = connect_pool(config).await?;
    let applied = migrate(&pool).await;
    pool.close().await;
    applied.context("the migrations could not be applied")?;
    tracing::info!(database = %config.target(), "The database schema is up to date.");
    Ok(())
}
