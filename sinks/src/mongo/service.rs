//! The I/O of the MongoDB sink: connecting, the indexes, an epoch's writes, the
//! couriers-in-zone query, and which failures are worth a retry.

use chrono::{DateTime, Utc};
use delivertrack_dataflow::ZoneId;
use mongodb::bson::{Document, doc};
use mongodb::error::{
    Error, ErrorKind, RETRYABLE_ERROR, RETRYABLE_WRITE_ERROR, SYSTEM_OVERLOADED_ERROR,
    TRANSIENT_TRANSACTION_ERROR, WriteFailure,
};
use mongodb::{Client, Collection};

use super::config::MongoConfig;
use super::documents::{
    self, CourierPosition, MalformedPosition, ZoneWrites, couriers_in_zone_pipeline, uuid_bson,
};

/// The server's duplicate key error.
pub const DUPLICATE_KEY: i32 = 11000;

/// Server error codes that describe the server's or the connection's state, not the data:
/// the driver's retryable-read set (`HostUnreachable` 6, `HostNotFound` 7, `NetworkTimeout`
/// 89, `ShutdownInProgress` 91, `ReadConcernMajorityNotAvailableYet` 134,
/// `PrimarySteppedDown` 189, `ExceededTimeLimit` 262, `SocketException` 9001,
/// `NotWritablePrimary` 10107, `InterruptedAtShutdown` 11600, `InterruptedDueToReplStateChange`
/// 11602, `NotPrimaryNoSecondaryOk` 13435, `NotPrimaryOrSecondary` 13436), plus
/// `LockTimeout` 24, `LockBusy` 46, `MaxTimeMSExpired` 50 and `WriteConcernFailed` 64.
/// A write repeated after any of them is harmless, since every write of the sink is
/// idempotent.
pub const TRANSIENT_CODES: [i32; 17] = [
    6, 7, 24, 46, 50, 64, 89, 91, 134, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436,
];

/// What went wrong talking to MongoDB outside an epoch's commit.
#[derive(Debug, thiserror::Error)]
pub enum MongoError {
    /// `MONGO_URI` does not parse (or its `mongodb+srv` records do not resolve).
    #[error("MONGO_URI {uri} is not a usable MongoDB uri")]
    InvalidUri {
        /// The uri, password redacted.
        uri: String,
        /// The driver's error.
        #[source]
        source: Error,
    },
    /// No server answered within the timeouts, or it refused the login.
    #[error("cannot connect to MongoDB at {target}")]
    Unreachable {
        /// The redacted uri and the database.
        target: String,
        /// The driver's error.
        #[source]
        source: Error,
    },
    /// The start took longer than every configured timeout together.
    #[error("cannot connect to MongoDB at {target}: no answer within {after_ms} ms")]
    TimedOut {
        /// The redacted uri and the database.
        target: String,
        /// How long the start waited.
        after_ms: u128,
    },
    /// Creating the indexes failed (an index of the same name with other keys, or stored
    /// documents the 2dsphere index refuses).
    #[error("cannot create the indexes of the MongoDB collections at {target}")]
    Indexes {
        /// The redacted uri and the database.
        target: String,
        /// The driver's error.
        #[source]
        source: Error,
    },
    /// `couriers_in_zone` for a zone that `delivery_zones` does not hold.
    #[error("zone {0} is not in delivery_zones")]
    UnknownZone(ZoneId),
    /// A stored zone has no GeoJSON `geometry` document.
    #[error("zone {0} in delivery_zones has no geometry")]
    ZoneWithoutGeometry(ZoneId),
    /// A query failed.
    #[error("a MongoDB query failed")]
    Query(#[source] Error),
    /// A result document is not of the shape this sink writes.
    #[error(transparent)]
    Malformed(#[from] MalformedPosition),
}

/// Whether a failed operation is worth repeating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The server or the way to it failed: the same epoch may well commit later.
    Transient,
    /// The server refused the data or the operation: it fails the same way again.
    Permanent,
    /// The client was shut down by us.
    Closed,
}

/// Sorts a driver error into [`Failure`].
///
/// Transient: I/O, a cleared connection pool, no server selectable, DNS, an error the
/// driver or server labels retryable or transient, a write concern error, and the server
/// codes of [`TRANSIENT_CODES`] — in a command error, a write error, or any write error of
/// an `insert_many`. Everything else is permanent, authentication and an unknown error
/// included: retrying a bug or a wrong password forever would hide it.
pub fn classify(error: &Error) -> Failure {
    let labelled = [
        RETRYABLE_WRITE_ERROR,
        TRANSIENT_TRANSACTION_ERROR,
        SYSTEM_OVERLOADED_ERROR,
        RETRYABLE_ERROR,
    ]
    .iter()
    .any(|label| error.contains_label(label));
    if labelled {
        return Failure::Transient;
    }
    let transient = |code: i32| TRANSIENT_CODES.contains(&code);
    match error.kind.as_ref() {
        ErrorKind::Io(_)
        | ErrorKind::ConnectionPoolCleared { .. }
        | ErrorKind::ServerSelection { .. }
        | ErrorKind::DnsResolve { .. } => Failure::Transient,
        ErrorKind::Shutdown => Failure::Closed,
        ErrorKind::Command(command) if transient(command.code) => Failure::Transient,
        ErrorKind::Write(WriteFailure::WriteConcernError(_)) => Failure::Transient,
        ErrorKind::Write(WriteFailure::WriteError(write)) if transient(write.code) => {
            Failure::Transient
        }
        ErrorKind::InsertMany(insert)
            if insert.write_concern_error.is_some()
                || insert
                    .write_errors
                    .iter()
                    .flatten()
                    .any(|write| transient(write.code)) =>
        {
            Failure::Transient
        }
        _ => Failure::Permanent,
    }
}

/// Is this error only duplicate keys of an `insert_many` (every document whose `_id` was
/// already stored; the others went in)? Then the insert did all there was to do.
pub fn only_duplicate_keys(error: &Error) -> Option<usize> {
    match error.kind.as_ref() {
        ErrorKind::InsertMany(insert) if insert.write_concern_error.is_none() => {
            let writes = insert.write_errors.as_ref()?;
            writes
                .iter()
                .all(|write| write.code == DUPLICATE_KEY)
                .then_some(writes.len())
        }
        _ => None,
    }
}

/// Is this a duplicate key of a single write (an upsert that met a newer stored version)?
pub fn is_duplicate_key(error: &Error) -> bool {
    matches!(
        error.kind.as_ref(),
        ErrorKind::Write(WriteFailure::WriteError(write)) if write.code == DUPLICATE_KEY
    )
}

/// What an epoch's commit wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Written {
    /// Location documents inserted.
    pub locations: usize,
    /// Location documents that were already stored (a replay).
    pub duplicates: usize,
    /// Zones replaced or inserted.
    pub zones_upserted: usize,
    /// Zone upserts skipped because a newer version is stored.
    pub zones_newer: usize,
    /// Zones deleted.
    pub zones_deleted: u64,
}

/// The client and the two collections: cheap to clone (the driver's handles are `Arc`s),
/// so the API can hold one beside the sink for [`couriers_in_zone`](Self::couriers_in_zone).
#[derive(Debug, Clone)]
pub struct MongoStore {
    client: Client,
    locations: Collection<Document>,
    zones: Collection<Document>,
    target: String,
}

impl MongoStore {
    /// Connects to the server of `config` and proves it answers (a `ping`), all within
    /// [`MongoConfig::start_deadline`]; then creates the indexes.
    ///
    /// `Client::with_options` connects nothing by itself (its monitors try in the
    /// background), so without the ping an unreachable server would only show at the first
    /// epoch. On failure the client is shut down, so that no monitor keeps retrying.
    ///
    /// # Errors
    /// [`MongoError::InvalidUri`], [`MongoError::Unreachable`], [`MongoError::TimedOut`] or
    /// [`MongoError::Indexes`], each naming the server (password redacted).
    pub async fn connect(config: &MongoConfig) -> Result<Self, MongoError> {
        let target = config.target();
        let deadline = config.start_deadline();
        let timed_out = || MongoError::TimedOut {
            target: target.clone(),
            after_ms: deadline.as_millis(),
        };
        let options = tokio::time::timeout(deadline, config.client_options())
            .await
            .map_err(|_| timed_out())??;
        let client = Client::with_options(options).map_err(|source| MongoError::InvalidUri {
            uri: super::config::redact(&config.uri),
            source,
        })?;
        let database = client.database(&config.database);
        let ping = tokio::time::timeout(deadline, database.run_command(doc! { "ping": 1 })).await;
        let failure = match ping {
            Ok(Ok(_)) => None,
            Ok(Err(source)) => Some(MongoError::Unreachable {
                target: target.clone(),
                source,
            }),
            Err(_) => Some(timed_out()),
        };
        if let Some(error) = failure {
            client.shutdown().immediate(true).await;
            return Err(error);
        }
        let store = Self {
            locations: database.collection(&config.locations_collection),
            zones: database.collection(&config.zones_collection),
            client,
            target,
        };
        store.ensure_indexes().await?;
        Ok(store)
    }

    /// Creates the indexes of both collections ([`documents::location_indexes`],
    /// [`documents::zone_indexes`]). Idempotent: an index that exists with the same name
    /// and keys is left alone, so this runs at every start.
    ///
    /// # Errors
    /// [`MongoError::Indexes`].
    pub async fn ensure_indexes(&self) -> Result<(), MongoError> {
        let indexes = |source| MongoError::Indexes {
            target: self.target.clone(),
            source,
        };
        self.locations
            .create_indexes(documents::location_indexes())
            .await
            .map_err(indexes)?;
        self.zones
            .create_indexes(documents::zone_indexes())
            .await
            .map_err(indexes)?;
        Ok(())
    }

    /// The redacted uri and database, for messages.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The location history collection.
    pub fn locations(&self) -> &Collection<Document> {
        &self.locations
    }

    /// The zones collection.
    pub fn zones(&self) -> &Collection<Document> {
        &self.zones
    }

    /// Inserts an epoch's location documents in one unordered `insert_many` (the driver
    /// splits it into the server's batch size). Unordered, so that a document already
    /// stored — a replayed fix, keyed by its event id — does not stop the others; those
    /// duplicate keys are the expected outcome of a replay, not an error.
    ///
    /// Returns `(inserted, duplicates)`.
    ///
    /// # Errors
    /// The driver's error for anything but duplicate keys.
    pub async fn insert_locations(
        &self,
        documents: Vec<Document>,
    ) -> Result<(usize, usize), Error> {
        if documents.is_empty() {
            return Ok((0, 0));
        }
        let total = documents.len();
        match self.locations.insert_many(documents).ordered(false).await {
            Ok(result) => Ok((result.inserted_ids.len(), 0)),
            Err(error) => match only_duplicate_keys(&error) {
                Some(duplicates) => Ok((total.saturating_sub(duplicates), duplicates)),
                None => Err(error),
            },
        }
    }

    /// Applies an epoch's zone writes: one `delete_many` for the deleted zones, then one
    /// `replace_one` with upsert per changed zone.
    ///
    /// Not one bulk write: the driver's only bulk API is the client-level `bulkWrite`
    /// command, which needs MongoDB 8.0, and the seed asks for MongoDB 6. Zones are few and
    /// change rarely, so a round trip per changed zone costs nothing that matters.
    ///
    /// Returns `(upserted, skipped as newer, deleted)`.
    ///
    /// # Errors
    /// The driver's error for anything but an upsert meeting a newer version.
    pub async fn write_zones(&self, writes: &ZoneWrites) -> Result<(usize, usize, u64), Error> {
        let mut deleted = 0;
        if let Some(filter) = &writes.delete {
            deleted = self.zones.delete_many(filter.clone()).await?.deleted_count;
        }
        let (mut upserted, mut newer) = (0, 0);
        for upsert in &writes.upserts {
            let replaced = self
                .zones
                .replace_one(upsert.filter.clone(), upsert.replacement.clone())
                .upsert(true)
                .await;
            match replaced {
                Ok(_) => upserted += 1,
                // The filter missed because a newer version is stored, and the upsert's
                // insert met its `_id`: the store is already ahead.
                Err(error) if is_duplicate_key(&error) => newer += 1,
                Err(error) => return Err(error),
            }
        }
        Ok((upserted, newer, deleted))
    }

    /// Couriers whose latest stored position (among the fixes since `since`, when given)
    /// lies within the zone's stored geometry, ordered by courier id.
    ///
    /// Two round trips: the zone's geometry, then the aggregation of
    /// [`couriers_in_zone_pipeline`] (`$geoWithin` takes its geometry as a constant).
    ///
    /// # Errors
    /// [`MongoError::UnknownZone`] when the zone is not stored; [`MongoError::Query`] when a
    /// query fails; [`MongoError::Malformed`] for a result not of this sink's shape.
    pub async fn couriers_in_zone(
        &self,
        zone_id: ZoneId,
        since: Option<DateTime<Utc>>,
    ) -> Result<Vec<CourierPosition>, MongoError> {
        let zone = self
            .zones
            .find_one(doc! { "_id": uuid_bson(zone_id.0) })
            .projection(doc! { "geometry": 1 })
            .await
            .map_err(MongoError::Query)?
            .ok_or(MongoError::UnknownZone(zone_id))?;
        let geometry = zone
            .get_document("geometry")
            .map_err(|_| MongoError::ZoneWithoutGeometry(zone_id))?;
        let mut cursor = self
            .locations
            .aggregate(couriers_in_zone_pipeline(geometry, since))
            // The `$group` holds one entry per courier; allowed to spill for large fleets.
            .allow_disk_use(true)
            .await
            .map_err(MongoError::Query)?;
        let mut positions = Vec::new();
        while cursor.advance().await.map_err(MongoError::Query)? {
            let document = cursor.deserialize_current().map_err(MongoError::Query)?;
            positions.push(CourierPosition::from_document(&document)?);
        }
        Ok(positions)
    }

    /// Shuts the client down: its monitors and pooled connections end.
    pub async fn shutdown(&self) {
        self.client.clone().shutdown().await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::Arc;

    use mongodb::bson::{self, doc};
    use mongodb::error::{CommandError, InsertManyError, WriteConcernError, WriteError};

    use super::*;

    fn command(code: i32) -> Error {
        let command: CommandError =
            bson::from_document(doc! { "code": code, "codeName": "X", "errmsg": "x" }).unwrap();
        Error::from(ErrorKind::Command(command))
    }

    fn write(code: i32) -> Error {
        let write: WriteError = bson::from_document(doc! { "code": code, "errmsg": "x" }).unwrap();
        Error::from(ErrorKind::Write(WriteFailure::WriteError(write)))
    }

    fn insert_many(codes: &[i32], write_concern: bool) -> Error {
        let write_errors: Vec<Document> = codes
            .iter()
            .enumerate()
            .map(|(index, code)| doc! { "index": index as i64, "code": code, "errmsg": "x" })
            .collect();
        let mut failure = doc! { "writeErrors": write_errors };
        if write_concern {
            failure.insert(
                "writeConcernError",
                doc! { "code": 64, "errmsg": "timeout" },
            );
        }
        let insert: InsertManyError = bson::from_document(failure).unwrap();
        Error::from(ErrorKind::InsertMany(insert))
    }

    #[test]
    fn the_way_to_the_server_failing_is_transient() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(
            classify(&Error::from(ErrorKind::Io(Arc::new(refused)))),
            Failure::Transient
        );
        assert_eq!(classify(&Error::from(ErrorKind::Shutdown)), Failure::Closed);
    }

    #[test]
    fn server_state_codes_are_transient_data_errors_are_not() {
        for code in [91, 189, 10107, 11600, 13435, 6, 89, 9001, 262, 50, 64] {
            assert_eq!(classify(&command(code)), Failure::Transient, "{code}");
            assert_eq!(classify(&write(code)), Failure::Transient, "{code}");
        }
        for code in [
            11000, // DuplicateKey
            16755, // Can't extract geo keys: a geometry the 2dsphere index refuses
            121,   // DocumentValidationFailure
            2,     // BadValue
            13,    // Unauthorized
            18,    // AuthenticationFailed
            85,    // IndexOptionsConflict
        ] {
            assert_eq!(classify(&command(code)), Failure::Permanent, "{code}");
            assert_eq!(classify(&write(code)), Failure::Permanent, "{code}");
        }
    }

    #[test]
    fn write_concern_errors_are_transient_and_labels_are_honoured() {
        // A write concern error (the write may not be replicated yet): repeating an
        // idempotent write is the cure. Its labels reach the error, as from a server.
        let concern: WriteConcernError = bson::from_document(doc! {
            "code": 100, "errmsg": "x", "errorLabels": [RETRYABLE_WRITE_ERROR],
        })
        .unwrap();
        let error = Error::from(ErrorKind::Write(WriteFailure::WriteConcernError(concern)));
        assert!(error.contains_label(RETRYABLE_WRITE_ERROR));
        assert_eq!(classify(&error), Failure::Transient);
        // An error the sink does not know is permanent.
        assert_eq!(classify(&Error::custom("unknown")), Failure::Permanent);
    }

    #[test]
    fn an_insert_of_only_duplicates_is_a_replay() {
        let replay = insert_many(&[DUPLICATE_KEY, DUPLICATE_KEY], false);
        assert_eq!(only_duplicate_keys(&replay), Some(2));
        assert_eq!(classify(&replay), Failure::Permanent);

        let mixed = insert_many(&[DUPLICATE_KEY, 16755], false);
        assert_eq!(only_duplicate_keys(&mixed), None);
        assert_eq!(classify(&mixed), Failure::Permanent);

        let stepped_down = insert_many(&[DUPLICATE_KEY, 10107], false);
        assert_eq!(only_duplicate_keys(&stepped_down), None);
        assert_eq!(classify(&stepped_down), Failure::Transient);

        let unconfirmed = insert_many(&[DUPLICATE_KEY], true);
        assert_eq!(only_duplicate_keys(&unconfirmed), None);
        assert_eq!(classify(&unconfirmed), Failure::Transient);

        assert_eq!(only_duplicate_keys(&command(DUPLICATE_KEY)), None);
        assert!(is_duplicate_key(&write(DUPLICATE_KEY)));
        assert!(!is_duplicate_key(&write(16755)));
        assert!(!is_duplicate_key(&command(DUPLICATE_KEY)));
    }
}
