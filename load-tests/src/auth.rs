//! [`Tokens`]: real JWTs for the routes that need them, signed with the server's secret.
//!
//! The tokens are those `delivertrack token --role R --sub ID` issues: HS256 over
//! `{sub, role, exp, iat}` with `JWT_SECRET`. The harness signs them itself, since a fleet
//! of 20 000 couriers needs 20 000 tokens and a subprocess per token would be the load
//! test's bottleneck.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use delivertrack_dataflow::{CourierId, CustomerId};
use serde::Serialize;
use uuid::Uuid;

/// Why a token could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The secret is empty or signing failed.
    #[error("a token could not be signed: {0}")]
    Sign(String),
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: Uuid,
    role: &'a str,
    exp: u64,
    iat: u64,
}

/// Signs tokens with one secret.
#[derive(Clone)]
pub struct Tokens {
    key: jsonwebtoken::EncodingKey,
    lifetime: Duration,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

impl Tokens {
    /// Tokens signed with `secret`, valid for `lifetime`.
    ///
    /// # Errors
    /// [`TokenError::Sign`] when the secret is empty.
    pub fn new(secret: &str, lifetime: Duration) -> Result<Self, TokenError> {
        if secret.is_empty() {
            return Err(TokenError::Sign("the JWT secret is empty".into()));
        }
        let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes())
            .map_err(|e| TokenError::Sign(e.to_string()))?;
        Ok(Self { key, lifetime })
    }

    /// A token for `sub` in `role` (`courier`, `customer`, `admin`).
    ///
    /// # Errors
    /// [`TokenError::Sign`].
    pub fn issue(&self, role: &str, sub: Uuid) -> Result<String, TokenError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let claims = Claims {
            sub,
            role,
            exp: now + self.lifetime.as_secs(),
            iat: now,
        };
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &self.key,
        )
        .map_err(|e| TokenError::Sign(e.to_string()))
    }

    /// A courier's token.
    ///
    /// # Errors
    /// [`TokenError::Sign`].
    pub fn courier(&self, id: CourierId) -> Result<String, TokenError> {
        self.issue("courier", id.0)
    }

    /// A customer's token.
    ///
    /// # Errors
    /// [`TokenError::Sign`].
    pub fn customer(&self, id: CustomerId) -> Result<String, TokenError> {
        self.issue("customer", id.0)
    }

    /// An admin's token (the analysts').
    ///
    /// # Errors
    /// [`TokenError::Sign`].
    pub fn admin(&self) -> Result<String, TokenError> {
        self.issue("admin", Uuid::from_u128(0x10AD_7E57))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_with_the_same_secret_and_carry_the_claims() {
        let tokens = Tokens::new("s3cret", Duration::from_secs(600)).unwrap();
        let sub = Uuid::from_u128(42);
        let token = tokens.issue("courier", sub).unwrap();
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(
            &token,
            &jsonwebtoken::DecodingKey::from_secret(b"s3cret").unwrap(),
            &validation,
        )
        .unwrap();
        assert_eq!(data.claims["sub"], sub.to_string());
        assert_eq!(data.claims["role"], "courier");
        assert!(Tokens::new("", Duration::from_secs(1)).is_err());
    }
}
