//! [`PostgresRehydrate`]: the driver's way back to the system of record after PostgreSQL
//! refused an epoch's data for good (poison isolation, see [`crate::driver`]).
//!
//! It reads the same state a start reads ([`load_restore`]): PostgreSQL commits each epoch
//! before any other sink does, so what it holds is exactly the state before the refused
//! epoch, and a dataflow restored from it goes on as if the refused event had never come.

use anyhow::Context;
use delivertrack_sinks::postgres::load_restore;
use sqlx::PgPool;

use crate::driver::{Rehydrate, RehydrateFuture};

/// Reads the dataflow's state back from PostgreSQL on a pool of its own.
#[derive(Clone, Debug)]
pub struct PostgresRehydrate {
    pool: PgPool,
    /// The dataflow's speed window (how many recent fixes per courier it keeps).
    speed_window: usize,
}

impl PostgresRehydrate {
    /// Reads from `pool`, keeping `speed_window` fixes per courier.
    pub fn new(pool: PgPool, speed_window: usize) -> Self {
        Self { pool, speed_window }
    }
}

impl Rehydrate for PostgresRehydrate {
    fn load(&mut self) -> RehydrateFuture<'_> {
        Box::pin(async move {
            load_restore(&self.pool, self.speed_window)
                .await
                .context("the state could not be read back from PostgreSQL")
        })
    }
}
