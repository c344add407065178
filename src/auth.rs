//! The JWT settings of `run` and `token`: the secret's checks, and tokens for operators.
//!
//! `run` verifies tokens with `JWT_SECRET` and refuses to start with an empty secret or the
//! sample one the README and examples show ([`SAMPLE_SECRET`]) — a deployment that copied
//! the example would accept tokens anyone can forge — unless told
//! `--insecure-dev-secret`. `token` signs with the same secret under the same checks, so a
//! token it prints is one `run` accepts. `demo` needs none of this: it signs with a random
//! secret of its own process ([`random_secret`]) and prints an admin token.

use std::time::Duration;

use anyhow::bail;
use delivertrack_api::{AuthConfig, Authenticator, Role};

/// The secret of the README's examples, which `run` refuses.
pub const SAMPLE_SECRET: &str = "change-me";

/// The secret's checks: not empty, not [`SAMPLE_SECRET`] unless `insecure_dev_secret`.
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
        check_secret("a-long-random-secret", false).unwrap();
    }

    #[test]
    fn an_issued_token_verifies_with_the_same_secret() {
        let config = AuthConfig {
            secret: "s3cret-for-this-test".into(),
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
