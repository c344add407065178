//! [`MongoSink`]: the location history and the zones, written idempotently per epoch.

use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use delivertrack_dataflow::{Epoch, EpochOutput, ZoneId};

use super::config::MongoConfig;
use super::documents::{self, CourierPosition};
use super::service::{self, Failure, MongoError, MongoStore};
use crate::sink::{BoxError, Sink, SinkError, SinkFuture};

const NAME: &str = "mongo";

/// Writes every epoch's accepted fixes to `courier_locations` and keeps `delivery_zones` in
/// step with the dataflow's zones.
///
/// A commit is two idempotent steps, neither in a transaction (a transaction would need a
/// replica set, and nothing here needs one): one unordered `insert_many` of the epoch's
/// fixes, where a fix already stored (same event id) is skipped; then the zone deletes and
/// upserts, each guarded by the zone's version. If the commit fails between them, the
/// driver commits the epoch again and the first step finds everything in place. Readers
/// may see an epoch's fixes before its zones: the two collections are independent.
#[derive(Debug)]
pub struct MongoSink {
    store: MongoStore,
    /// Set by [`close`](Sink::close); later commits are refused.
    closed: bool,
}

impl MongoSink {
    /// Connects to the server of `config`, checks that it answers, and creates the indexes.
    ///
    /// # Errors
    /// [`SinkError::Unavailable`] whose source, a [`MongoError`], names the server (password
    /// redacted): an invalid uri, no server within the timeouts, refused login, indexes that
    /// cannot be created. Never later than about the configured timeouts.
    pub async fn connect(config: &MongoConfig) -> Result<Self, SinkError> {
        let store = MongoStore::connect(config).await.map_err(unavailable)?;
        tracing::info!(server = %store.target(), "The MongoDB sink is connected.");
        Ok(Self {
            store,
            closed: false,
        })
    }

    /// A handle on the same client and collections, for readers such as the API; it stays
    /// usable while the sink commits.
    pub fn store(&self) -> MongoStore {
        self.store.clone()
    }

    /// Couriers whose latest stored position lies within the stored geometry of `zone_id`
    /// ([`MongoStore::couriers_in_zone`]).
    ///
    /// # Errors
    /// [`MongoError::UnknownZone`], [`MongoError::Query`], [`MongoError::Malformed`].
    pub async fn couriers_in_zone(
        &self,
        zone_id: ZoneId,
        since: Option<DateTime<Utc>>,
    ) -> Result<Vec<CourierPosition>, MongoError> {
        self.store.couriers_in_zone(zone_id, since).await
    }

    async fn write(&self, output: &EpochOutput) -> Result<(), SinkError> {
        let started = Instant::now();
        let epoch = output.epoch;
        let locations = documents::location_documents(output);
        let zones = documents::zone_writes(output).map_err(|source| SinkError::Rejected {
            sink: NAME,
            epoch,
            code: "geometry".into(),
            source: Box::new(source),
        })?;
        let (inserted, duplicates) = self
            .store
            .insert_locations(locations)
            .await
            .map_err(|error| commit_error(epoch, error))?;
        let (upserted, newer, deleted) = if zones.is_empty() {
            (0, 0, 0)
        } else {
            self.store
                .write_zones(&zones)
                .await
                .map_err(|error| commit_error(epoch, error))?
        };
        tracing::debug!(
            epoch,
            locations_inserted = inserted,
            locations_already_stored = duplicates,
            zones_upserted = upserted,
            zones_already_newer = newer,
            zones_deleted = deleted,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "MongoDB committed an epoch."
        );
        Ok(())
    }
}

impl Sink for MongoSink {
    fn name(&self) -> &'static str {
        NAME
    }

    fn commit(&mut self, output: Arc<EpochOutput>) -> SinkFuture<'_> {
        Box::pin(async move {
            if self.closed {
                return Err(SinkError::Closed { sink: NAME });
            }
            self.write(&output).await
        })
    }

    fn close(&mut self) -> SinkFuture<'_> {
        Box::pin(async move {
            if !self.closed {
                self.closed = true;
                self.store.shutdown().await;
            }
            Ok(())
        })
    }
}

/// A failed commit as the driver sees it: retry or give up.
pub(super) fn commit_error(epoch: Epoch, error: mongodb::error::Error) -> SinkError {
    match service::classify(&error) {
        Failure::Transient => SinkError::Unavailable {
            sink: NAME,
            source: Box::new(error),
        },
        // A server error with a code refused a document (e.g. 16755, a geometry the
        // 2dsphere index cannot hold): the data's fault. Anything else is not.
        Failure::Permanent => match server_code(&error) {
            Some(code) => SinkError::Rejected {
                sink: NAME,
                epoch,
                code: code.to_string(),
                source: Box::new(error),
            },
            None => SinkError::Failed {
                sink: NAME,
                epoch,
                source: Box::new(error),
            },
        },
        Failure::Closed => SinkError::Closed { sink: NAME },
    }
}

/// The server's error code of a refused write or command, if the error carries one.
fn server_code(error: &mongodb::error::Error) -> Option<i32> {
    use mongodb::error::{ErrorKind, WriteFailure};
    match error.kind.as_ref() {
        ErrorKind::Command(command) => Some(command.code),
        ErrorKind::Write(WriteFailure::WriteError(write)) => Some(write.code),
        ErrorKind::InsertMany(insert) => insert
            .write_errors
            .iter()
            .flatten()
            .map(|write| write.code)
            .next(),
        _ => None,
    }
}

fn unavailable(error: MongoError) -> SinkError {
    SinkError::Unavailable {
        sink: NAME,
        source: BoxError::from(Box::new(error)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use mongodb::bson::{self, doc};
    use mongodb::error::{CommandError, ErrorKind};

    use super::*;

    #[test]
    fn transient_failures_are_retried_and_refusals_are_not() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let io = mongodb::error::Error::from(ErrorKind::Io(Arc::new(refused)));
        let error = commit_error(3, io);
        assert!(error.is_retryable(), "{error:?}");
        assert_eq!(error.sink(), "mongo");

        let refusal: CommandError =
            bson::from_document(doc! { "code": 16755, "errmsg": "Can't extract geo keys" })
                .unwrap();
        let error = commit_error(3, mongodb::error::Error::from(ErrorKind::Command(refusal)));
        assert!(!error.is_retryable(), "{error:?}");
        assert!(matches!(error, SinkError::Rejected { epoch: 3, .. }));

        let shut = commit_error(3, mongodb::error::Error::from(ErrorKind::Shutdown));
        assert!(matches!(shut, SinkError::Closed { sink: "mongo" }));
    }
}
