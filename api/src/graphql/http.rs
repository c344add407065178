//! `POST /graphql` (queries) and `GET /graphql` (the GraphiQL page).

use async_graphql::{Request, Variables};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;

use super::AnalyticsSchema;
use crate::auth::Principal;
use crate::error::{ApiError, ApiJson, ErrorBody};
use crate::state::AppState;

/// The body of `POST /graphql`: the GraphQL-over-HTTP request object.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct GraphQlBody {
    /// The document.
    #[schema(example = "{ successRates(scope: OVERALL) { successRate } }")]
    query: String,
    /// Which of its operations to run, when it has several.
    #[serde(default)]
    operation_name: Option<String>,
    /// The variables, an object (or `null`).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    variables: Option<serde_json::Value>,
    /// Protocol extensions some clients send (persisted-query hashes): an object (or
    /// `null`), accepted and unused.
    #[serde(default, rename = "extensions")]
    #[schema(value_type = Option<Object>)]
    _extensions: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Runs one query for an authenticated caller. `200` with `{"data", "errors"}` (GraphQL
/// errors, `FORBIDDEN` included, are in the body); `401` without a valid token and `400`
/// / `413` / `415` for a body that is not a GraphQL request, in the API's error shape.
#[utoipa::path(
    post,
    path = "/graphql",
    operation_id = "graphqlQuery",
    tag = "graphql",
    summary = "Run a GraphQL query",
    description = "Analytics (success rates, courier efficiency, peak times, satisfaction: \
        admins) and deliveries (by role and ownership, as over REST). GraphQL errors, \
        `FORBIDDEN` included, are answered `200` in `errors`; a body that is not a GraphQL \
        request is answered in the API's error shape. The schema is introspectable.",
    security(("bearer_jwt" = []), ("access_token" = [])),
    request_body = GraphQlBody,
    responses(
        (status = 200, description = "The result, with any GraphQL errors.", body = crate::openapi::schemas::GraphQlResponse),
        (status = 400, description = "`malformed_json` (also a body, or `extensions`, that is \
            not an object), `unknown_field`, or `invalid_query` (variables that are not an \
            object).", body = ErrorBody),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 413, response = crate::openapi::PayloadTooLarge),
        (status = 415, response = crate::openapi::UnsupportedMediaType),
    )
)]
pub(super) async fn execute(
    State(state): State<AppState>,
    Extension(schema): Extension<AnalyticsSchema>,
    principal: Principal,
    ApiJson(body): ApiJson<GraphQlBody>,
) -> Result<Response, ApiError> {
    let variables = match body.variables {
        None | Some(serde_json::Value::Null) => Variables::default(),
        Some(value @ serde_json::Value::Object(_)) => Variables::from_json(value),
        Some(_) => {
            return Err(ApiError::BadRequest {
                code: "invalid_query",
                message: "variables must be a JSON object".into(),
            });
        }
    };
    let mut request = Request::new(body.query)
        .variables(variables)
        .data(principal)
        .data(state.read_model.clone());
    if let Some(name) = body.operation_name {
        request = request.operation_name(name);
    }
    Ok(Json(schema.execute(request).await).into_response())
}

/// The query string of `GET /graphql`.
#[derive(Debug, Deserialize)]
pub(super) struct PageQuery {
    /// A token to preset in the page (for queries and subscriptions alike).
    access_token: Option<String>,
}

/// The GraphiQL page: its assets pinned by version and subresource integrity, its one
/// inline script static (so that the Content-Security-Policy allows it by hash).
const GRAPHIQL_PAGE: &str = include_str!("graphiql.html");

/// Where a verified token is written into the page (a `<meta>` element the script reads).
const TOKEN_SLOT: &str = "<!--ACCESS_TOKEN-->";

/// The external files of [`GRAPHIQL_PAGE`], each exactly as its `src` / `href` names it.
const GRAPHIQL_SCRIPTS: [&str; 3] = [
    "https://unpkg.com/react@18.3.1/umd/react.production.min.js",
    "https://unpkg.com/react-dom@18.3.1/umd/react-dom.production.min.js",
    "https://unpkg.com/graphiql@4.1.2/graphiql.min.js",
];
const GRAPHIQL_STYLES: [&str; 1] = ["https://unpkg.com/graphiql@4.1.2/graphiql.min.css"];

/// The page's Content-Security-Policy: its inline script and style by hash, the pinned
/// files of unpkg.com, fonts inlined by the stylesheet.
static GRAPHIQL_POLICY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    crate::page::policy(
        GRAPHIQL_PAGE,
        crate::page::Sources {
            scripts: &GRAPHIQL_SCRIPTS,
            styles: &GRAPHIQL_STYLES,
            fonts: &["data:", "https://unpkg.com/graphiql@4.1.2/"],
        },
    )
});

/// The GraphiQL page. It needs no token; `?access_token=...` (or a `#access_token=`
/// fragment, which never reaches the server) presets one for the page's queries (the
/// `Authorization` header) and subscriptions (the connection-init payload). A query token
/// that does not verify is ignored: only a valid token, which holds nothing but base64url
/// and dots, is ever written into the page.
#[utoipa::path(
    get,
    path = "/graphql",
    operation_id = "graphiql",
    tag = "graphql",
    summary = "The GraphiQL page",
    description = "Needs no token; a valid `access_token` presets it for the page's queries \
        and subscriptions (an invalid one is ignored). Its assets are pinned by version and \
        subresource integrity; sent with a Content-Security-Policy (`frame-ancestors 'none'`) \
        and `X-Content-Type-Options: nosniff`.",
    params(("access_token" = Option<String>, Query, description = "A token to preset in the page.")),
    responses((status = 200, description = "The page.", body = String, content_type = "text/html"))
)]
pub(super) async fn graphiql(
    State(state): State<AppState>,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Response {
    let token = query
        .ok()
        .and_then(|Query(q)| q.access_token)
        .filter(|token| state.auth.verify(token).is_ok());
    let slot = match &token {
        Some(token) => format!(r#"<meta name="delivertrack-access-token" content="{token}">"#),
        None => String::new(),
    };
    crate::page::html(
        GRAPHIQL_PAGE.replacen(TOKEN_SLOT, &slot, 1),
        &GRAPHIQL_POLICY,
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use serde_json::json;

    use super::GraphQlBody;

    #[test]
    fn extensions_must_be_an_object_or_null() {
        let body = |extensions| {
            serde_json::from_value::<GraphQlBody>(
                json!({"query": "{ x }", "extensions": extensions}),
            )
        };
        assert!(body(json!({"persistedQuery": {"version": 1}})).is_ok());
        assert!(body(json!(null)).is_ok());
        for wrong in [json!([null, null]), json!("x"), json!(1), json!(true)] {
            assert!(body(wrong.clone()).is_err(), "{wrong} was accepted");
        }
    }
}
