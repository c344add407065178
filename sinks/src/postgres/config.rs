//! Configuration of the PostgreSQL sink.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;

use super::service::PostgresError;

/// Where the system of record is and how the sink talks to it.
///
/// The five parts follow the README's configuration table (`POSTGRES_HOST`,
/// `POSTGRES_PORT`, `POSTGRES_DB`, `POSTGRES_USER`, `POSTGRES_PASSWORD`, those names are a
/// contract); `url` is `DATABASE_URL`, which overrides all of them when set, because that
/// is how sqlx tooling and most hosting platforms hand out a database.
#[derive(Clone)]
pub struct PostgresConfig {
    /// `POSTGRES_HOST`.
    pub host: String,
    /// `POSTGRES_PORT`.
    pub port: u16,
    /// `POSTGRES_DB`.
    pub database: String,
    /// `POSTGRES_USER`.
    pub user: String,
    /// `POSTGRES_PASSWORD`; empty means none (trust or peer authentication).
    pub password: String,
    /// `DATABASE_URL` (`postgres://user:password@host:port/db?sslmode=...`): when set, the
    /// parts above are ignored.
    pub url: Option<String>,
    /// Connections in the pool. The sink writes one epoch at a time in one transaction, so
    /// it needs one; the others serve whoever shares the pool (hydration, the `migrate`
    /// command) without making the sink wait.
    pub max_connections: u32,
    /// How long to wait for a connection, at start and at every commit. Bounded, so that an
    /// unreachable database is reported (and the epoch retried) instead of hanging.
    pub connect_timeout: Duration,
}

impl Default for PostgresConfig {
    /// The local database of the README's table: `postgres@127.0.0.1:5432/delivertrack`.
    fn default() -> Self {
        Self {
            host: "127.0.0.1".to_owned(),
            port: 5432,
            database: "delivertrack".to_owned(),
            user: "postgres".to_owned(),
            password: String::new(),
            url: None,
            max_connections: 4,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

impl PostgresConfig {
    /// A configuration from a `DATABASE_URL`-style url, with the default pool settings.
    pub fn from_url(url: impl Into<String>) -> Self {
        Self {
            url: Some(url.into()),
            ..Self::default()
        }
    }

    /// A configuration from the `POSTGRES_*` parts, with the default pool settings. The
    /// parts need no escaping: they are never pasted into a url.
    pub fn from_parts(
        host: impl Into<String>,
        port: u16,
        database: impl Into<String>,
        user: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        Self {
            host: host.into(),
            port,
            database: database.into(),
            user: user.into(),
            password: password.into(),
            ..Self::default()
        }
    }

    /// The connection options sqlx uses.
    ///
    /// # Errors
    /// [`PostgresError::InvalidUrl`] when `url` is set and is not a PostgreSQL url.
    pub fn connect_options(&self) -> Result<PgConnectOptions, PostgresError> {
        let options = match &self.url {
            Some(url) => {
                PgConnectOptions::from_str(url).map_err(|source| PostgresError::InvalidUrl {
                    url: redact(url),
                    source,
                })?
            }
            None => {
                let options = PgConnectOptions::new()
                    .host(&self.host)
                    .port(self.port)
                    .database(&self.database)
                    .username(&self.user);
                if self.password.is_empty() {
                    options
                } else {
                    options.password(&self.password)
                }
            }
        };
        Ok(options.application_name("delivertrack"))
    }

    /// Which database this is, for messages: `user@host:port/db`, never the password.
    pub fn target(&self) -> String {
        match self.connect_options() {
            Ok(options) => format!(
                "{}@{}:{}/{}",
                options.get_username(),
                options.get_host(),
                options.get_port(),
                options.get_database().unwrap_or(options.get_username()),
            ),
            Err(_) => self.url.as_deref().map(redact).unwrap_or_default(),
        }
    }
}

/// Hand-written so that the password (in `password` or inside `url`) never reaches a log.
impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("target", &self.target())
            .field("max_connections", &self.max_connections)
            .field("connect_timeout", &self.connect_timeout)
            .finish_non_exhaustive()
    }
}

/// A url with its password replaced by `***`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<not a url>".to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((credentials, host)) => {
            let user = credentials.split_once(':').map_or(credentials, |(u, _)| u);
            format!("{scheme}://{user}:***@{host}{path}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_the_local_database_of_the_readme() {
        let config = PostgresConfig::default();
        assert_eq!(config.target(), "postgres@127.0.0.1:5432/delivertrack");
    }

    #[test]
    fn a_url_overrides_the_parts() {
        let mut config = PostgresConfig::from_url("postgres://app:s3cret@db.internal:6543/fleet");
        config.host = "ignored".to_owned();
        assert_eq!(config.target(), "app@db.internal:6543/fleet");
    }

    #[test]
    fn parts_with_url_syntax_in_them_are_taken_literally() {
        let config = PostgresConfig::from_parts("10.0.0.7", 5433, "dt/prod", "ops", "p@ss:/word");
        let options = config.connect_options().unwrap();
        assert_eq!(options.get_database(), Some("dt/prod"));
        assert_eq!(options.get_port(), 5433);
        assert_eq!(config.target(), "ops@10.0.0.7:5433/dt/prod");
    }

    #[test]
    fn passwords_never_reach_debug_output_or_errors() {
        let config = PostgresConfig::from_url("postgres://app:s3cret@db.internal:6543/fleet");
        assert!(!format!("{config:?}").contains("s3cret"));
        let parts = PostgresConfig::from_parts("h", 1, "d", "u", "hunter2");
        assert!(!format!("{parts:?}").contains("hunter2"));
        let bad = PostgresConfig::from_url("postgres://app:s3cret@db:notaport/fleet");
        let error = bad.connect_options().unwrap_err();
        assert!(!error.to_string().contains("s3cret"), "{error}");
        assert!(
            error
                .to_string()
                .contains("postgres://app:***@db:notaport/fleet"),
            "{error}"
        );
    }
}
