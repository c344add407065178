//! The HTML pages' security headers: a `Content-Security-Policy` made from the page itself.
//!
//! The API serves two pages, the operations map (`GET /`) and GraphiQL (`GET /graphql`).
//! Each is answered through [`html`] with:
//!
//! - `Content-Security-Policy`: `default-src 'none'`; scripts and styles only from the
//!   page's own inline `<script>` and `<style>` blocks, each allowed by its SHA-256 hash
//!   (never `'unsafe-inline'`: an injected script or style does not run), plus the exact
//!   external files a page names ([`Sources`]); `connect-src 'self'` (the API's own
//!   routes and WebSockets); `frame-ancestors 'none'` (no other site can frame the page to
//!   trick a click); `base-uri 'none'`, `form-action 'none'`;
//! - `X-Content-Type-Options: nosniff`, `X-Frame-Options: DENY` (frame-ancestors for old
//!   browsers), `Referrer-Policy: no-referrer` (a token in the page's URL never leaves in a
//!   `Referer`), `Cache-Control: no-store`.
//!
//! The hashes are computed from the served text when the policy is built, so editing a
//! page can never leave a stale hash behind.

use axum::http::HeaderValue;
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS,
    X_FRAME_OPTIONS,
};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use sha2::{Digest, Sha256};

/// External files a page may load besides its inline blocks: exact URLs, each also pinned
/// by subresource integrity in the page.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sources<'a> {
    /// `script-src` URLs.
    pub scripts: &'a [&'a str],
    /// `style-src` URLs.
    pub styles: &'a [&'a str],
    /// `font-src` sources.
    pub fonts: &'a [&'a str],
}

/// The `Content-Security-Policy` of `page`: its inline scripts and styles by hash, the
/// external `sources`, nothing else.
pub fn policy(page: &str, sources: Sources<'_>) -> String {
    let join = |hashes: Vec<String>, urls: &[&str]| {
        let all: Vec<String> = hashes
            .into_iter()
            .chain(urls.iter().map(|url| (*url).to_owned()))
            .collect();
        if all.is_empty() {
            "'none'".to_owned()
        } else {
            all.join(" ")
        }
    };
    let scripts = join(inline_hashes(page, "script"), sources.scripts);
    let styles = join(inline_hashes(page, "style"), sources.styles);
    let fonts = join(Vec::new(), sources.fonts);
    format!(
        "default-src 'none'; script-src {scripts}; style-src {styles}; font-src {fonts}; \
         img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
         frame-ancestors 'none'"
    )
}

/// `'sha256-...'` of the text of every inline `<tag>` block of `page` (those without a
/// `src`), in order.
fn inline_hashes(page: &str, tag: &str) -> Vec<String> {
    let open = format!("<{tag}");
    let close = format!("</{tag}>");
    let mut hashes = Vec::new();
    let mut rest = page;
    while let Some(start) = rest.find(&open) {
        let after = &rest[start + open.len()..];
        let Some(tag_end) = after.find('>') else {
            break;
        };
        let attributes = &after[..tag_end];
        let body = &after[tag_end + 1..];
        let Some(body_end) = body.find(&close) else {
            break;
        };
        // `<scripts>` or `<style-x>` are other tags; `src=` loads a file, hashed by SRI.
        let is_tag = attributes.is_empty() || attributes.starts_with(char::is_whitespace);
        if is_tag && !attributes.contains("src=") {
            let digest = Sha256::digest(&body.as_bytes()[..body_end]);
            hashes.push(format!(
                "'sha256-{}'",
                base64::engine::general_purpose::STANDARD.encode(digest)
            ));
        }
        rest = &body[body_end + close.len()..];
    }
    hashes
}

/// `200` with `page` as `text/html` and the headers of the [module](self), the policy
/// being `policy` (built once per page with [`policy`]).
pub fn html(page: impl Into<String>, policy: &str) -> Response {
    let mut response = page.into().into_response();
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    match HeaderValue::from_str(policy) {
        Ok(value) => {
            headers.insert(CONTENT_SECURITY_POLICY, value);
        }
        // A policy is built from hashes and constant URLs; should one ever not fit in a
        // header, the page must not go out without one.
        Err(_) => {
            tracing::error!("A page's Content-Security-Policy is not a valid header value.");
            headers.insert(
                CONTENT_SECURITY_POLICY,
                HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"),
            );
        }
    }
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_blocks_are_hashed_and_external_ones_are_not() {
        let page = "<style>a{}</style><script src=\"x.js\"></script><script>\"use strict\";</script>\
                    <scripts>no</scripts>";
        // echo -n 'a{}' | openssl dgst -sha256 -binary | base64
        assert_eq!(
            inline_hashes(page, "style"),
            ["'sha256-X1RutGBrXCt9KkSaXMK7tHftWiRscFHOhxsS8tv8hBk='"]
        );
        assert_eq!(inline_hashes(page, "script").len(), 1);
        let policy = policy(
            page,
            Sources {
                scripts: &["https://cdn.example/x.js"],
                ..Sources::default()
            },
        );
        assert!(policy.contains("frame-ancestors 'none'"), "{policy}");
        assert!(!policy.contains("unsafe-inline"), "{policy}");
        assert!(policy.contains("https://cdn.example/x.js"), "{policy}");
        assert!(policy.contains("font-src 'none'"), "{policy}");
    }
}
