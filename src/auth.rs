//! The JWT settings of `run` and `token`: the secret's checks, and tokens for operators.
//!
//! `run` verifies tokens with `JWT_SECRET` and refuses to start with an empty secret, one
//! shorter than [`MIN_SECRET_BYTES`] (an HS256 key weaker than its hash, open to offline
//! guessing from any one token), or the sample one the README and examples show
//! ([`SAMPLE_SECRET`]) — a deployment that copied the example would accept tokens anyone
//! can forge — unless told `--insecure-dev-secret`. `token` signs with the same secret under the same checks, so a
//! token it prints is one `run` accepts. `demo` needs none of this: it signs with a random
//! secret of its own process ([`random_secret`]) and prints an admin token.

use std::time::Duration;

use anyhow::bail;
use delivertrack_api::{AuthConfig, Authenticator, Role};

/// The secret of the README's examples, which `run` refuses.
pub const SAMPLE_SECRET: &str = "change-me";

/// The shortest `JWT_SECRET` `run` and `token` accept: HS256's own output size, so that the
/// key is not the weaker part (RFC 7518 §3.2).
pub const MIN_SECRET_BYTES: usize = 32;

/// The longest token lifetime `JWT_EXPIRY` may set: a year.
pub const MAX_EXPIRY: Duration = Duration::from_secs(366 * 24 * 3600);

/// `JWT_EXPIRY`: a duration with its unit (`24h`, `15m`, `3600s`, `1h 30m`, `2days`; the
/// units of [`humantime`]) or a bare number of seconds (`3600`), between one second and
/// [`MAX_EXPIRY`].
///
/// # Errors
/// A sentence naming `JWT_EXPIRY`, the value and the accepted forms.
pub fn parse_expiry(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    let parsed = if !trimmed.is_empty() && trimmed.bytes().all(|b| b.is_ascii_digit()) {
        trimmed
            .parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|error| error.to_string())
    } else {
        humantime::parse_duration(trimmed).map_err(|error| error.to_string())
    };
    match parsed {
        Ok(expiry) if expiry >= Duration::from_secs(1) && expiry <= MAX_EXPIRY => Ok(expiry),
        Ok(_) => Err(format!(
            "JWT_EXPIRY {text:?} is out of range: a token lives from 1s to 366days"
        )),
        Err(error) => Err(format!(
            "JWT_EXPIRY {text:?} is not a duration ({error}): write it with its unit (24h, 15m, 3600s) or as seconds (3600)"
        )),
    }
}

/// The secret's checks: not empty; at least [`MIN_SECRET_BYTES`] and not [`SAMPLE_SECRET`]
/// unless `insecure_dev_secret`.
///
/// # Errors
/// Naming `JWT_SECRET` and saying what to do.
pub fn check_secret(secret: &str, insecure_dev_secret: bool) -> anyhow::Result<()> {
    if secret.is_empty() {
        bail!(
            "JWT_SECRET is empty: set JWT_SECRET (or --jwt-secret) to a long random value, e.g. `openssl rand -hex 32`"
        );
    }
    if secret == SAMPLE_SECRET && !insecure_dev_secret {
        bail!(
            "JWT_SECRET is the README's sample secret {SAMPLE_SECRET:?}, with which anyone can forge tokens: set a long random value, or pass --insecure-dev-secret on a developer's machine"
        );
    }
    if secret.len() < MIN_SECRET_BYTES && !insecure_dev_secret {
        bail!(
            "JWT_SECRET is {} bytes long; it must be at least {MIN_SECRET_BYTES} bytes (e.g. `openssl rand -hex 32`), or pass --insecure-dev-secret (DELIVERTRACK_INSECURE_DEV_SECRET=true) on a developer's machine",
            secret.len()
        );
    }
    Ok(())
}

/// An authenticator for `config` once [`check_secret`] passed.
///
/// # Errors
/// As [`check_secret`], or the secret cannot sign.
pub fn authenticator(
    config: &AuthConfig,
    insecure_dev_secret: bool,
) -> anyhow::Result<Authenticator> {
    check_secret(&config.secret, insecure_dev_secret)?;
    Authenticator::new(config)
        .map_err(|error| anyhow::anyhow!("JWT_SECRET cannot be used: {error}"))
}

/// A token for `sub` in `role`, signed with `config` (after [`check_secret`]), valid for
/// its expiry: what `delivertrack token` prints.
///
/// # Errors
/// As [`authenticator`].
pub fn issue_token(
    config: &AuthConfig,
    insecure_dev_secret: bool,
    role: Role,
    sub: uuid::Uuid,
) -> anyhow::Result<String> {
    authenticator(config, insecure_dev_secret)?
        .issue(role, sub)
        .map_err(|error| anyhow::anyhow!("the token could not be signed: {error}"))
}

/// A random 64-hex-digit secret, valid for `expiry`: the demo's, known to this process only.
pub fn random_secret(expiry: Duration) -> AuthConfig {
    AuthConfig {
        secret: format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        ),
        expiry,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_or_sample_secret_is_refused_naming_the_variable() {
        let empty = check_secret("", true).unwrap_err().to_string();
        assert!(empty.contains("JWT_SECRET"), "{empty}");
        let sample = check_secret(SAMPLE_SECRET, false).unwrap_err().to_string();
        assert!(
            sample.contains("JWT_SECRET") && sample.contains("--insecure-dev-secret"),
            "{sample}"
        );
        check_secret(SAMPLE_SECRET, true).unwrap();
        check_secret("a-long-random-secret-of-32-bytes", false).unwrap();
    }

    #[test]
    fn a_secret_shorter_than_32_bytes_is_refused_unless_insecure() {
        let short = check_secret("recovery-test-jwt-key-3b8e", false)
            .unwrap_err()
            .to_string();
        assert!(
            short.contains("JWT_SECRET is 26 bytes long")
                && short.contains("at least 32 bytes")
                && short.contains("--insecure-dev-secret"),
            "{short}"
        );
        check_secret(&"x".repeat(31), false).unwrap_err();
        check_secret(&"x".repeat(32), false).unwrap();
        check_secret("short", true).unwrap();
    }

    #[test]
    fn the_expiry_takes_units_or_bare_seconds() {
        assert_eq!(parse_expiry("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_expiry("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_expiry("3600s"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_expiry("3600"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_expiry(" 1h 30m "), Ok(Duration::from_secs(5400)));
        for refused in ["", "0", "0s", "soon", "-5", "24 hours ago", "400days"] {
            let error = parse_expiry(refused).unwrap_err();
            assert!(error.contains("JWT_EXPIRY"), "{refused:?}: {error}");
        }
    }

    #[test]
    fn an_issued_token_verifies_with_the_same_secret() {
        let config = AuthConfig {
            secret: "s3cret-for-this-test-0123456789abcdef".into(),
            expiry: Duration::from_secs(60),
        };
        let sub = uuid::Uuid::new_v4();
        let token = issue_token(&config, false, Role::Courier, sub).unwrap();
        let principal = authenticator(&config, false)
            .unwrap()
            .verify(&token)
            .unwrap();
        assert_eq!((principal.sub, principal.role), (sub, Role::Courier));
        let demo = random_secret(Duration::from_secs(60));
        assert_eq!(demo.secret.len(), 64);
        assert!(authenticator(&demo, false).unwrap().verify(&token).is_err());
    }
}
