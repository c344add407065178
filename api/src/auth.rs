//! Authentication: JWT bearer tokens (HS256, `JWT_SECRET`) carrying `sub`, `role`, `exp`.
//!
//! [`Principal`] is the extractor every protected handler takes: it reads the token from
//! the `Authorization: Bearer ...` header (or, for WebSocket upgrades, which browsers cannot
//! send headers with, from the `access_token` query parameter), verifies it with the
//! state's [`Authenticator`], and answers `401` when it is missing or invalid. Handlers
//! decide `403` themselves, from the principal's role and ownership.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Who a token speaks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Creates deliveries and sees only their own.
    Customer,
    /// Reports their own location and moves the deliveries assigned to them.
    Courier,
    /// Everything.
    Admin,
}

/// The verified caller of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The token's `sub`: the customer's or courier's id (an admin's own id).
    pub sub: Uuid,
    /// The token's `role`.
    pub role: Role,
}

impl Principal {
    /// Is this an admin?
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }
}

/// A verified token: whom it speaks for and until when. Long-lived sessions (WebSockets,
/// GraphQL subscriptions) take it instead of a bare [`Principal`] so that they end when
/// the token does ([`CLOSE_TOKEN_EXPIRED`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The caller.
    pub principal: Principal,
    /// The token's `exp`, Unix seconds.
    pub expires_at: u64,
}

impl Grant {
    /// How long the token has left (zero once expired), measured on the wall clock the
    /// token's `exp` speaks of.
    pub fn remaining(&self) -> Duration {
        until(self.expires_at)
    }

    /// Resolves when the token expires: the end of a session it opened.
    pub async fn expired(&self) {
        tokio::time::sleep(self.remaining()).await;
    }
}

/// How long until `expires_at` (a token's `exp`, Unix seconds) on the wall clock; zero
/// once it has passed.
pub fn until(expires_at: u64) -> Duration {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Duration::from_secs(expires_at).saturating_sub(now)
}

/// WebSocket close code of a session whose token expired (4000–4999 are the
/// application's; 4401 mirrors HTTP's 401).
pub const CLOSE_TOKEN_EXPIRED: u16 = 4401;
/// The close reason that goes with [`CLOSE_TOKEN_EXPIRED`].
pub const TOKEN_EXPIRED_REASON: &str = "the token has expired";

/// The signing secret and the lifetime of issued tokens.
#[derive(Clone)]
pub struct AuthConfig {
    /// `JWT_SECRET`: the HS256 key.
    pub secret: String,
    /// `JWT_EXPIRY`: the lifetime of a token issued by [`Authenticator::issue`].
    pub expiry: Duration,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("secret", &"***")
            .field("expiry", &self.expiry)
            .finish()
    }
}

/// Why a token was refused (all answered `401 unauthorized`, the reason in the message).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer` header (nor `access_token` query parameter).
    #[error("a bearer token is required")]
    Missing,
    /// The header is not `Bearer <token>`.
    #[error("the Authorization header must be `Bearer <token>`")]
    Malformed,
    /// The token has expired.
    #[error("the token has expired")]
    Expired,
    /// Bad signature, another algorithm (`none` included), missing or ill-typed claims.
    #[error("the token is invalid: {0}")]
    Invalid(String),
    /// The secret cannot sign or verify (empty).
    #[error("the JWT secret is unusable: {0}")]
    Secret(String),
}

/// The claims of our tokens.
#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: Uuid,
    role: Role,
    exp: u64,
    iat: u64,
}

/// Signs and verifies tokens with one HS256 secret.
#[derive(Clone)]
pub struct Authenticator {
    encoding: jsonwebtoken::EncodingKey,
    decoding: jsonwebtoken::DecodingKey,
    validation: jsonwebtoken::Validation,
    expiry: Duration,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("expiry", &self.expiry)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// An authenticator for `config`.
    ///
    /// # Errors
    /// [`AuthError::Secret`] when the secret is empty.
    pub fn new(config: &AuthConfig) -> Result<Self, AuthError> {
        let secret = config.secret.as_bytes();
        let encoding = jsonwebtoken::EncodingKey::from_secret(secret)
            .map_err(|e| AuthError::Secret(e.to_string()))?;
        let decoding = jsonwebtoken::DecodingKey::from_secret(secret)
            .map_err(|e| AuthError::Secret(e.to_string()))?;
        // HS256 only: a token announcing any other algorithm, `none` included, is refused.
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Ok(Self {
            encoding,
            decoding,
            validation,
            expiry: config.expiry,
        })
    }

    /// A signed token for `sub` in `role`, valid for the configured lifetime.
    ///
    /// # Errors
    /// [`AuthError::Secret`] if signing fails.
    pub fn issue(&self, role: Role, sub: Uuid) -> Result<String, AuthError> {
        self.issue_for(role, sub, self.expiry)
    }

    /// A signed token valid for `lifetime` (tests issue already expired ones with zero).
    ///
    /// # Errors
    /// [`AuthError::Secret`] if signing fails.
    pub fn issue_for(
        &self,
        role: Role,
        sub: Uuid,
        lifetime: Duration,
    ) -> Result<String, AuthError> {
        let now = jsonwebtoken::get_current_timestamp();
        let claims = Claims {
            sub,
            role,
            iat: now,
            exp: now.saturating_add(lifetime.as_secs()),
        };
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &self.encoding,
        )
        .map_err(|e| AuthError::Secret(e.to_string()))
    }

    /// The principal of a valid token.
    ///
    /// # Errors
    /// [`AuthError::Expired`] or [`AuthError::Invalid`].
    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        self.verify_grant(token).map(|grant| grant.principal)
    }

    /// The principal of a valid token, with its expiry.
    ///
    /// # Errors
    /// [`AuthError::Expired`] or [`AuthError::Invalid`].
    pub fn verify_grant(&self, token: &str) -> Result<Grant, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        match jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation) {
            Ok(data) if data.claims.exp <= jsonwebtoken::get_current_timestamp() => {
                Err(AuthError::Expired)
            }
            Ok(data) => Ok(Grant {
                principal: Principal {
                    sub: data.claims.sub,
                    role: data.claims.role,
                },
                expires_at: data.claims.exp,
            }),
            Err(error) => match error.kind() {
                ErrorKind::ExpiredSignature => Err(AuthError::Expired),
                _ => Err(AuthError::Invalid(error.to_string())),
            },
        }
    }

    /// The principal of a request: its `Authorization: Bearer` header, else (for
    /// WebSocket upgrades) its `access_token` query parameter.
    ///
    /// # Errors
    /// Any [`AuthError`] but `Secret`.
    pub fn authenticate(&self, parts: &axum::http::request::Parts) -> Result<Principal, AuthError> {
        self.authenticate_grant(parts).map(|grant| grant.principal)
    }

    /// [`authenticate`](Self::authenticate), with the token's expiry.
    ///
    /// # Errors
    /// Any [`AuthError`] but `Secret`.
    pub fn authenticate_grant(
        &self,
        parts: &axum::http::request::Parts,
    ) -> Result<Grant, AuthError> {
        if let Some(header) = parts.headers.get(axum::http::header::AUTHORIZATION) {
            let value = header.to_str().map_err(|_| AuthError::Malformed)?;
            let token = value
                .strip_prefix("Bearer ")
                .or_else(|| value.strip_prefix("bearer "))
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .ok_or(AuthError::Malformed)?;
            return self.verify_grant(token);
        }
        let query = parts.uri.query().unwrap_or_default();
        let token = query
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(key, _)| *key == "access_token")
            .map(|(_, value)| value)
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Missing)?;
        self.verify_grant(token)
    }
}

impl axum::extract::FromRequestParts<crate::AppState> for Principal {
    type Rejection = crate::ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &crate::AppState,
    ) -> Result<Self, Self::Rejection> {
        Grant::from_request_parts(parts, state)
            .await
            .map(|grant| grant.principal)
    }
}

impl axum::extract::FromRequestParts<crate::AppState> for Grant {
    type Rejection = crate::ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &crate::AppState,
    ) -> Result<Self, Self::Rejection> {
        state
            .auth
            .authenticate_grant(parts)
            .map_err(|error| crate::ApiError::Unauthorized {
                reason: error.to_string(),
            })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn authenticator(secret: &str) -> Authenticator {
        Authenticator::new(&AuthConfig {
            secret: secret.to_owned(),
            expiry: Duration::from_secs(3600),
        })
        .unwrap()
    }

    #[test]
    fn a_token_round_trips_and_carries_its_claims() {
        let auth = authenticator("s3cret-for-tests");
        let sub = Uuid::from_u128(7);
        let token = auth.issue(Role::Courier, sub).unwrap();
        assert_eq!(
            auth.verify(&token).unwrap(),
            Principal {
                sub,
                role: Role::Courier
            }
        );
    }

    #[test]
    fn expired_foreign_and_unsigned_tokens_are_refused() {
        let auth = authenticator("s3cret-for-tests");
        let sub = Uuid::from_u128(7);
        let expired = auth.issue_for(Role::Admin, sub, Duration::ZERO).unwrap();
        assert!(matches!(auth.verify(&expired), Err(AuthError::Expired)));
        let foreign = authenticator("another-secret")
            .issue(Role::Admin, sub)
            .unwrap();
        assert!(matches!(auth.verify(&foreign), Err(AuthError::Invalid(_))));
        // alg "none": header {"alg":"none","typ":"JWT"}, no signature.
        let claims = format!(
            r#"{{"sub":"{sub}","role":"admin","exp":{}}}"#,
            jsonwebtoken::get_current_timestamp() + 600
        );
        let b64 = |s: &str| {
            use base64::Engine as _;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
        };
        let none = format!("{}.{}.", b64(r#"{"alg":"none","typ":"JWT"}"#), b64(&claims));
        assert!(matches!(auth.verify(&none), Err(AuthError::Invalid(_))));
        // HS512 with the right secret is still another algorithm.
        let hs512 = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
            &Claims {
                sub,
                role: Role::Admin,
                exp: jsonwebtoken::get_current_timestamp() + 600,
                iat: 0,
            },
            &jsonwebtoken::EncodingKey::from_secret(b"s3cret-for-tests").unwrap(),
        )
        .unwrap();
        assert!(matches!(auth.verify(&hs512), Err(AuthError::Invalid(_))));
        // A token without `role`.
        let no_role = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &serde_json::json!({"sub": sub, "exp": jsonwebtoken::get_current_timestamp() + 600}),
            &jsonwebtoken::EncodingKey::from_secret(b"s3cret-for-tests").unwrap(),
        )
        .unwrap();
        assert!(matches!(auth.verify(&no_role), Err(AuthError::Invalid(_))));
        assert!(matches!(auth.verify("garbage"), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn an_empty_secret_cannot_make_an_authenticator() {
        assert!(matches!(
            Authenticator::new(&AuthConfig {
                secret: String::new(),
                expiry: Duration::from_secs(1)
            }),
            Err(AuthError::Secret(_))
        ));
    }
}
