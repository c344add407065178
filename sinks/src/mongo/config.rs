//! Configuration of the MongoDB sink.

use std::time::Duration;

use mongodb::options::ClientOptions;

use super::service::MongoError;

/// The README's default `MONGO_URI`.
pub const DEFAULT_URI: &str = "mongodb://127.0.0.1:27017";
/// The README's default `MONGO_DB`.
pub const DEFAULT_DATABASE: &str = "delivertrack";
/// The seed's collection of GeoJSON location history.
pub const LOCATIONS_COLLECTION: &str = "courier_locations";
/// The seed's collection of geofence polygons.
pub const ZONES_COLLECTION: &str = "delivery_zones";

/// Where the geospatial store is and how the sink talks to it.
///
/// `uri` and `database` are `MONGO_URI` and `MONGO_DB` of the README's configuration table
/// (those names are a contract, ARCHITECTURE rule 8). The timeouts bound how long an
/// unreachable server can hold the start and each commit; a timeout written into the uri
/// (`serverSelectionTimeoutMS`, `connectTimeoutMS`) wins over the field, because whoever
/// wrote it there meant it for this deployment.
#[derive(Clone)]
pub struct MongoConfig {
    /// `MONGO_URI`: `mongodb://` or `mongodb+srv://`, with credentials and options.
    pub uri: String,
    /// `MONGO_DB`: the database holding both collections.
    pub database: String,
    /// How long an operation waits for a usable server before it fails. The driver's own
    /// default is 30 s, far too long for a start that must report an unreachable store.
    pub server_selection_timeout: Duration,
    /// How long one TCP (and TLS) connect may take.
    pub connect_timeout: Duration,
    /// The location history collection (`courier_locations`).
    pub locations_collection: String,
    /// The zones collection (`delivery_zones`).
    pub zones_collection: String,
}

impl Default for MongoConfig {
    /// The local server of the README's table: `mongodb://127.0.0.1:27017`, `delivertrack`.
    fn default() -> Self {
        Self {
            uri: DEFAULT_URI.to_owned(),
            database: DEFAULT_DATABASE.to_owned(),
            server_selection_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            locations_collection: LOCATIONS_COLLECTION.to_owned(),
            zones_collection: ZONES_COLLECTION.to_owned(),
        }
    }
}

impl MongoConfig {
    /// A configuration for `uri` and `database`, with the default timeouts and collections.
    pub fn new(uri: impl Into<String>, database: impl Into<String>) -> Self {
        Self {
            uri: uri.into(),
            database: database.into(),
            ..Self::default()
        }
    }

    /// The driver's options: the uri parsed, our timeouts where the uri sets none, and the
    /// application name that shows in the server's logs and `currentOp`.
    ///
    /// Parsing a `mongodb+srv://` uri resolves DNS records, hence `async`; the caller bounds
    /// it.
    ///
    /// # Errors
    /// [`MongoError::InvalidUri`] when the uri cannot be parsed or resolved.
    pub async fn client_options(&self) -> Result<ClientOptions, MongoError> {
        let mut options =
            ClientOptions::parse(&self.uri)
                .await
                .map_err(|source| MongoError::InvalidUri {
                    uri: redact(&self.uri),
                    source,
                })?;
        options
            .server_selection_timeout
            .get_or_insert(self.server_selection_timeout);
        options.connect_timeout.get_or_insert(self.connect_timeout);
        options
            .app_name
            .get_or_insert_with(|| "delivertrack".to_owned());
        Ok(options)
    }

    /// Which server and database this is, for messages: the uri without its password, and
    /// the database (`mongodb://ops:***@db1:27017/?replicaSet=rs0 (database fleet)`).
    pub fn target(&self) -> String {
        format!("{} (database {})", redact(&self.uri), self.database)
    }

    /// The longest a start may take: resolving the uri, selecting a server (which includes
    /// connecting to it), one round trip. Used as an outer bound, because a host that drops
    /// packets can otherwise hold a connect longer than the driver's timers suggest.
    pub fn start_deadline(&self) -> Duration {
        self.server_selection_timeout
            .max(self.connect_timeout)
            .saturating_add(Duration::from_secs(2))
    }
}

/// Hand-written so that a password inside `uri` never reaches a log.
impl std::fmt::Debug for MongoConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MongoConfig")
            .field("target", &self.target())
            .field("server_selection_timeout", &self.server_selection_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("locations_collection", &self.locations_collection)
            .field("zones_collection", &self.zones_collection)
            .finish()
    }
}

/// A uri with its password replaced by `***` (the user stays: it helps tell deployments
/// apart). A MongoDB uri may list several hosts, `user:pass@h1,h2/`; only the part before
/// the last `@` of the authority is credentials.
pub(super) fn redact(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return "<not a uri>".to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((credentials, hosts)) => {
            let user = credentials.split_once(':').map_or(credentials, |(u, _)| u);
            format!("{scheme}://{user}:***@{hosts}{path}")
        }
        None => uri.to_owned(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_the_local_server_of_the_readme() {
        let config = MongoConfig::default();
        assert_eq!(config.uri, "mongodb://127.0.0.1:27017");
        assert_eq!(config.database, "delivertrack");
        assert_eq!(config.locations_collection, "courier_locations");
        assert_eq!(config.zones_collection, "delivery_zones");
        assert_eq!(
            config.target(),
            "mongodb://127.0.0.1:27017 (database delivertrack)"
        );
    }

    #[test]
    fn passwords_never_reach_debug_output_or_targets() {
        let config = MongoConfig::new(
            "mongodb://ops:s3cret@db1:27017,db2:27017/admin?replicaSet=rs0",
            "fleet",
        );
        assert_eq!(
            config.target(),
            "mongodb://ops:***@db1:27017,db2:27017/admin?replicaSet=rs0 (database fleet)"
        );
        assert!(!format!("{config:?}").contains("s3cret"));
        assert_eq!(redact("not a uri"), "<not a uri>");
        assert_eq!(redact("mongodb://h:1/?a=b@c"), "mongodb://h:1/?a=b@c");
    }

    #[tokio::test]
    async fn timeouts_in_the_uri_win_over_the_fields() {
        let mut config =
            MongoConfig::new("mongodb://127.0.0.1:1/?serverSelectionTimeoutMS=500", "x");
        config.connect_timeout = Duration::from_millis(700);
        let options = config.client_options().await.unwrap();
        assert_eq!(
            options.server_selection_timeout,
            Some(Duration::from_millis(500))
        );
        assert_eq!(options.connect_timeout, Some(Duration::from_millis(700)));
        assert_eq!(options.app_name.as_deref(), Some("delivertrack"));
    }

    #[tokio::test]
    async fn an_invalid_uri_is_named_without_its_password() {
        let config = MongoConfig::new("mongodb://ops:s3cret@db1:notaport", "x");
        let error = config.client_options().await.unwrap_err();
        let text = error.to_string();
        assert!(text.contains("mongodb://ops:***@db1:notaport"), "{text}");
        assert!(!text.contains("s3cret"), "{text}");
    }
}
