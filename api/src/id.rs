//! Typed ids out of request paths, with malformed ones answered as [`ApiError::InvalidId`].

use axum::extract::Path;
use axum::extract::rejection::PathRejection;
use uuid::Uuid;

use crate::error::ApiError;

/// Parses the single path parameter as the id of `resource`.
///
/// # Errors
/// [`ApiError::InvalidId`] when the parameter is missing, not UTF-8, or not a UUID.
pub fn parse<T: From<Uuid>>(
    resource: &'static str,
    path: Result<Path<String>, PathRejection>,
) -> Result<T, ApiError> {
    let Path(raw) = path.map_err(|rejection| ApiError::InvalidId {
        resource,
        value: rejection.body_text(),
    })?;
    Uuid::try_parse(&raw)
        .map(T::from)
        .map_err(|_| ApiError::InvalidId {
            resource,
            value: raw,
        })
}
