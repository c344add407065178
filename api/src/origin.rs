//! Which web pages may open the API's WebSockets: the `Origin` allow-list.
//!
//! A browser sends the page's origin with every WebSocket upgrade and, unlike `fetch`,
//! applies no same-origin policy to the answer: without this check any page open in a
//! browser that can reach the API could open `/ws/changes` or `/ws/track/{id}` (with a
//! token it got hold of) and read what they stream. Every upgrade (`/ws/track/{id}`,
//! `/ws/changes`, `/graphql/ws`) therefore goes through [`check`]:
//!
//! - no `Origin` header: a non-browser client (a fleet app, `websocat`, the load tests),
//!   which a web page cannot impersonate — allowed;
//! - the same origin as the API (the `Origin`'s host and port equal the request's `Host`):
//!   the map page and GraphiQL, served by the API itself — always allowed;
//! - an origin on the list of `--allowed-origins` (`DELIVERTRACK_ALLOWED_ORIGINS`,
//!   comma-separated `scheme://host[:port]`), or any origin when the list is `*`;
//! - anything else, `null` included, is refused `403 origin_not_allowed` before the
//!   upgrade.

use std::str::FromStr;

use axum::http::HeaderMap;
use axum::http::header::{HOST, ORIGIN};

use crate::error::ApiError;

/// The origins, besides the API's own, whose pages may open a WebSocket.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum AllowedOrigins {
    /// The API's own origin only (the default).
    #[default]
    SameOrigin,
    /// Any origin (`*`): for a deployment whose WebSockets are meant for every page.
    Any,
    /// The API's own origin and these, each `scheme://host[:port]`, lower case, without a
    /// default port.
    List(Vec<String>),
}

/// Why `--allowed-origins` could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OriginListError {
    /// An entry that is not `http(s)://host[:port]`.
    #[error(
        "{0:?} is not an origin: expected scheme://host[:port] (http or https, no path), or * for any"
    )]
    Invalid(String),
}

impl FromStr for AllowedOrigins {
    type Err = OriginListError;

    /// `*`, or a comma-separated list of origins; empty is [`AllowedOrigins::SameOrigin`].
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let entries: Vec<&str> = text
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .collect();
        if entries.is_empty() {
            return Ok(Self::SameOrigin);
        }
        if entries.contains(&"*") {
            return Ok(Self::Any);
        }
        entries
            .into_iter()
            .map(|entry| {
                Origin::parse(entry)
                    .map(|origin| origin.serialized())
                    .ok_or_else(|| OriginListError::Invalid(entry.to_owned()))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Self::List)
    }
}

impl std::fmt::Display for AllowedOrigins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::SameOrigin => f.write_str(""),
            Self::Any => f.write_str("*"),
            Self::List(list) => f.write_str(&list.join(",")),
        }
    }
}

/// A parsed `Origin`: scheme, host and port (the scheme's default when none is written).
#[derive(Debug, PartialEq, Eq)]
struct Origin {
    scheme: String,
    host: String,
    port: u16,
}

impl Origin {
    /// `http(s)://host[:port]`, without path, query or user; `None` otherwise (`null`
    /// included).
    fn parse(text: &str) -> Option<Self> {
        let text = text.trim().trim_end_matches('/');
        let (scheme, authority) = text.split_once("://")?;
        let scheme = scheme.to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "http" => 80,
            "https" => 443,
            _ => return None,
        };
        if authority.is_empty() || authority.contains(['/', '?', '#', '@']) {
            return None;
        }
        let (host, port) = split_host_port(authority)?;
        Some(Self {
            scheme,
            host,
            port: port.unwrap_or(default_port),
        })
    }

    /// The origin as a browser writes it (no default port).
    fn serialized(&self) -> String {
        let default = matches!(
            (self.scheme.as_str(), self.port),
            ("http", 80) | ("https", 443)
        );
        if default {
            format!("{}://{}", self.scheme, self.host)
        } else {
            format!("{}://{}:{}", self.scheme, self.host, self.port)
        }
    }
}

/// `host[:port]` (an IPv6 host in brackets), the host in lower case; `None` for a port
/// that is not a number.
fn split_host_port(authority: &str) -> Option<(String, Option<u16>)> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(port) => Some(port),
            None if after.is_empty() => None,
            None => return None,
        };
        (format!("[{host}]"), port)
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host.to_owned(), Some(port)),
            None => (authority.to_owned(), None),
        }
    };
    if host.is_empty() || host == "[]" {
        return None;
    }
    let port = port.map(str::parse::<u16>).transpose().ok()?;
    Some((host.to_ascii_lowercase(), port))
}

/// Is `origin` the origin the request was sent to? The `Host` header names the host and
/// port the client connected to; without a port there, the origin's default port passes
/// (the API may sit behind a proxy on 80 or 443).
fn same_origin(origin: &Origin, headers: &HeaderMap) -> bool {
    let Some((host, port)) = headers
        .get(HOST)
        .and_then(|value| value.to_str().ok())
        .and_then(split_host_port)
    else {
        return false;
    };
    host == origin.host
        && match port {
            Some(port) => port == origin.port,
            None => origin.port == 80 || origin.port == 443,
        }
}

/// Lets a WebSocket upgrade through, or refuses it, by the rules of the [module](self).
///
/// # Errors
/// [`ApiError::OriginNotAllowed`] for a browser page of another origin.
pub fn check(allowed: &AllowedOrigins, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(ORIGIN) else {
        return Ok(());
    };
    let text = String::from_utf8_lossy(value.as_bytes()).into_owned();
    if *allowed == AllowedOrigins::Any {
        return Ok(());
    }
    let Some(origin) = Origin::parse(&text) else {
        return Err(ApiError::OriginNotAllowed { origin: text });
    };
    if same_origin(&origin, headers) {
        return Ok(());
    }
    match allowed {
        AllowedOrigins::List(list) if list.contains(&origin.serialized()) => Ok(()),
        _ => Err(ApiError::OriginNotAllowed { origin: text }),
    }
}

/// An extractor that refuses the request (`403 origin_not_allowed`) unless its `Origin`
/// passes [`check`] against the state's allow-list. WebSocket handlers take it first, so
/// that a page of another origin learns nothing, not even whether its token is valid.
#[derive(Clone, Copy, Debug)]
pub struct OriginAllowed;

impl axum::extract::FromRequestParts<crate::AppState> for OriginAllowed {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &crate::AppState,
    ) -> Result<Self, Self::Rejection> {
        check(&state.config.allowed_origins, &parts.headers).map(|()| OriginAllowed)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(host: &str, origin: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(HOST, HeaderValue::from_str(host).unwrap());
        if let Some(origin) = origin {
            headers.insert(ORIGIN, HeaderValue::from_str(origin).unwrap());
        }
        headers
    }

    #[test]
    fn the_list_parses_and_refuses_what_is_not_an_origin() {
        assert_eq!("".parse(), Ok(AllowedOrigins::SameOrigin));
        assert_eq!(" * ".parse(), Ok(AllowedOrigins::Any));
        assert_eq!(
            "https://Ops.Example:443, http://127.0.0.1:3000/".parse(),
            Ok(AllowedOrigins::List(vec![
                "https://ops.example".into(),
                "http://127.0.0.1:3000".into()
            ]))
        );
        for bad in [
            "ops.example",
            "ftp://ops.example",
            "https://ops.example/path",
            "https://",
            "https://h:port",
            "null",
        ] {
            assert!(bad.parse::<AllowedOrigins>().is_err(), "{bad}");
        }
    }

    #[test]
    fn same_origin_no_origin_and_listed_origins_pass_others_do_not() {
        let same = AllowedOrigins::SameOrigin;
        assert!(check(&same, &headers("127.0.0.1:8080", None)).is_ok());
        assert!(
            check(
                &same,
                &headers("127.0.0.1:8080", Some("http://127.0.0.1:8080"))
            )
            .is_ok()
        );
        assert!(check(&same, &headers("ops.example", Some("https://ops.example"))).is_ok());
        assert!(check(&same, &headers("[::1]:8080", Some("http://[::1]:8080"))).is_ok());
        for refused in [
            "http://127.0.0.1:8081",
            "http://localhost:8080",
            "https://evil.example",
            "null",
        ] {
            let answer = check(&same, &headers("127.0.0.1:8080", Some(refused)));
            assert!(
                matches!(answer, Err(ApiError::OriginNotAllowed { .. })),
                "{refused}"
            );
        }
        let listed: AllowedOrigins = "https://ops.example".parse().unwrap();
        assert!(check(&listed, &headers("api:8080", Some("https://ops.example"))).is_ok());
        assert!(
            check(
                &listed,
                &headers("api:8080", Some("https://ops.example:443"))
            )
            .is_ok()
        );
        assert!(check(&listed, &headers("api:8080", Some("http://ops.example"))).is_err());
        assert!(check(&listed, &headers("api:8080", Some("http://api:8080"))).is_ok());
        assert!(check(&AllowedOrigins::Any, &headers("api:8080", Some("null"))).is_ok());
    }
}
