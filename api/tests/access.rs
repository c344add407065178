//! Who may read what, over real HTTP and WebSocket connections: the read model (`/api/*`,
//! `/ws/changes`) for admins only, the `Origin` allow-list on every WebSocket upgrade,
//! sessions that end when their right does (4401 at the token's expiry, 4403 when a
//! courier's delivery goes to another courier), and the HTML pages' security headers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fleet;

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use delivertrack_api::{AllowedOrigins, ApiConfig, AppState, Role};
use delivertrack_dataflow::event::StatusChanged;
use delivertrack_dataflow::{CourierId, DeliveryId, EventBody, Status};
use fleet::{CUSTOMER, Fleet, get, serve, token};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

fn state(fleet: &Fleet) -> AppState {
    AppState::new(fleet.model.clone(), CancellationToken::new())
}

/// A token of `role` valid for `lifetime` only.
fn short_token(state: &AppState, role: Role, sub: Uuid, lifetime: Duration) -> String {
    state.auth.issue_for(role, sub, lifetime).unwrap()
}

/// A refused upgrade: its HTTP status and error code.
#[derive(Debug, PartialEq)]
struct Refused(u16, Option<String>);

/// Opens a WebSocket on `path` with these headers (`(name, value)`); the refusal otherwise.
async fn open(
    addr: SocketAddr,
    path: &str,
    headers: &[(&'static str, String)],
) -> Result<Socket, Refused> {
    let mut request = format!("ws://{addr}{path}").into_client_request().unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(*name, value.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((socket, _)) => Ok(socket),
        Err(WsError::Http(response)) => {
            let code = response
                .body()
                .as_deref()
                .and_then(|body| serde_json::from_slice::<Value>(body).ok())
                .and_then(|body| body["error"]["code"].as_str().map(str::to_owned));
            Err(Refused(response.status().as_u16(), code))
        }
        Err(other) => panic!("the upgrade failed: {other}"),
    }
}

fn bearer(token: &str) -> (&'static str, String) {
    ("authorization", format!("Bearer {token}"))
}

/// What the server sent next, pings skipped: a JSON text, or the close frame's code and
/// reason.
#[derive(Debug)]
enum Received {
    Json(Value),
    Close(u16, String),
}

async fn next(socket: &mut Socket, within: Duration) -> Received {
    loop {
        let message = tokio::time::timeout(within, socket.next())
            .await
            .expect("a message in time")
            .expect("the socket is open")
            .expect("a valid frame");
        match message {
            Message::Text(text) => return Received::Json(serde_json::from_str(&text).unwrap()),
            Message::Close(frame) => {
                let (code, reason) = frame.map_or((1005, String::new()), |f| {
                    (u16::from(f.code), f.reason.to_string())
                });
                return Received::Close(code, reason);
            }
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Reads until the close frame (every JSON message before it is returned too).
async fn until_closed(socket: &mut Socket, within: Duration) -> (Vec<Value>, u16, String) {
    let mut seen = Vec::new();
    loop {
        match next(socket, within).await {
            Received::Json(value) => seen.push(value),
            Received::Close(code, reason) => return (seen, code, reason),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The read model is for admins
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_model_routes_are_for_admins_only() {
    let fleet = Fleet::new(21, 4, 64);
    let state = state(&fleet);
    let addr = serve(state.clone()).await;
    let tracked = fleet.tracked_delivery();
    let delivery = tracked.details.delivery_id;
    let courier = tracked.details.courier_id.unwrap();
    let owner = token(&state, Role::Customer, tracked.details.customer_id.0);
    let its_courier = token(&state, Role::Courier, courier.0);
    let admin = token(&state, Role::Admin, Uuid::new_v4());

    for path in [
        "/api/snapshot".to_owned(),
        format!("/api/couriers/{courier}"),
        format!("/api/deliveries/{delivery}"),
    ] {
        let (status, body) = get(addr, &path, None).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (401, Some("unauthorized")),
            "{path} without a token: {body}"
        );
        let (status, _) = get(addr, &path, Some("not.a.token")).await;
        assert_eq!(status, 401, "{path} with a forged token");
        // The delivery's own customer and courier are no admins either: they read it
        // through GET /deliveries/{id}.
        for who in [&owner, &its_courier] {
            let (status, body) = get(addr, &path, Some(who)).await;
            assert_eq!(
                (status, body["error"]["code"].as_str()),
                (403, Some("forbidden")),
                "{path}: {body}"
            );
        }
        let (status, body) = get(addr, &path, Some(&admin)).await;
        assert_eq!(status, 200, "{path} for an admin: {body}");
    }
    let (status, _) = get(addr, &format!("/deliveries/{delivery}"), Some(&owner)).await;
    assert_eq!(status, 200, "the owner reads it on the authenticated route");
    for path in ["/healthz", "/readyz"] {
        assert_eq!(get(addr, path, None).await.0, 200, "{path} stays public");
    }
    state.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_change_stream_is_for_admins_only() {
    let fleet = Fleet::new(22, 3, 64);
    let state = state(&fleet);
    let addr = serve(state.clone()).await;
    let customer = token(&state, Role::Customer, CUSTOMER);
    let courier = token(&state, Role::Courier, Uuid::new_v4());
    let admin = token(&state, Role::Admin, Uuid::new_v4());

    assert_eq!(
        open(addr, "/ws/changes", &[]).await.err(),
        Some(Refused(401, Some("unauthorized".into())))
    );
    assert_eq!(
        open(addr, "/ws/changes?access_token=forged", &[])
            .await
            .err(),
        Some(Refused(401, Some("unauthorized".into())))
    );
    for who in [&customer, &courier] {
        assert_eq!(
            open(addr, "/ws/changes", &[bearer(who)]).await.err(),
            Some(Refused(403, Some("forbidden".into())))
        );
        assert_eq!(
            open(addr, &format!("/ws/changes?access_token={who}"), &[])
                .await
                .err(),
            Some(Refused(403, Some("forbidden".into())))
        );
    }
    // An admin, with the header or (as a browser) the query parameter.
    for (path, headers) in [
        ("/ws/changes".to_owned(), vec![bearer(&admin)]),
        (format!("/ws/changes?access_token={admin}"), Vec::new()),
    ] {
        let mut socket = open(addr, &path, &headers).await.unwrap();
        match next(&mut socket, Duration::from_secs(10)).await {
            Received::Json(message) => assert_eq!(message["type"], "snapshot"),
            other => panic!("expected the snapshot, got {other:?}"),
        }
    }
    state.shutdown.cancel();
}

// ---------------------------------------------------------------------------------------
// Origin
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_check_the_origin() {
    let fleet = Fleet::new(23, 4, 64);
    let state = state(&fleet);
    let addr = serve(state.clone()).await;
    let admin = token(&state, Role::Admin, Uuid::new_v4());
    let delivery = fleet.tracked_delivery().details.delivery_id;
    let graphql = ("sec-websocket-protocol", "graphql-transport-ws".to_owned());
    let routes: [(String, Vec<(&str, String)>); 3] = [
        ("/ws/changes".into(), vec![bearer(&admin)]),
        (format!("/ws/track/{delivery}"), vec![bearer(&admin)]),
        ("/graphql/ws".into(), vec![bearer(&admin), graphql.clone()]),
    ];
    let with_origin = |headers: &[(&'static str, String)], origin: &str| {
        let mut headers = headers.to_vec();
        headers.push(("origin", origin.to_owned()));
        headers
    };
    for (path, headers) in &routes {
        // A page elsewhere, even with a valid token: refused before the upgrade.
        for foreign in ["https://evil.example", "http://localhost:1", "null"] {
            assert_eq!(
                open(addr, path, &with_origin(headers, foreign)).await.err(),
                Some(Refused(403, Some("origin_not_allowed".into()))),
                "{path} from {foreign}"
            );
        }
        // The API's own pages, and clients that send no Origin (not browsers).
        open(addr, path, &with_origin(headers, &format!("http://{addr}")))
            .await
            .unwrap_or_else(|refused| panic!("{path} from its own origin: {refused:?}"));
        open(addr, path, headers)
            .await
            .unwrap_or_else(|refused| panic!("{path} without an Origin: {refused:?}"));
    }
    state.shutdown.cancel();

    // An allow-list: its origins pass, others still do not; `*` lets every one through.
    for (allowed, origin, passes) in [
        ("https://ops.example", "https://ops.example", true),
        ("https://ops.example", "https://evil.example", false),
        ("*", "https://evil.example", true),
    ] {
        let state = state_with_origins(&fleet, allowed.parse().unwrap());
        let addr = serve(state.clone()).await;
        let admin = token(&state, Role::Admin, Uuid::new_v4());
        let answer = open(
            addr,
            "/ws/changes",
            &[bearer(&admin), ("origin", origin.to_owned())],
        )
        .await;
        assert_eq!(
            answer.is_ok(),
            passes,
            "{origin} with {allowed}: {:?}",
            answer.err()
        );
        state.shutdown.cancel();
    }
}

fn state_with_origins(fleet: &Fleet, allowed_origins: AllowedOrigins) -> AppState {
    state(fleet).with_config(ApiConfig {
        allowed_origins,
        ..ApiConfig::default()
    })
}

// ---------------------------------------------------------------------------------------
// Sessions end with their right
// ---------------------------------------------------------------------------------------

/// Lifetime of the short tokens: `exp` is whole seconds, so such a token expires 1–2 s
/// after it is issued.
const SHORT: Duration = Duration::from_secs(2);
/// How long a test waits for the close at expiry.
const EXPIRY_PATIENCE: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_sessions_close_when_their_token_expires() {
    let fleet = Fleet::new(24, 4, 64);
    let state = state(&fleet);
    let addr = serve(state.clone()).await;
    let tracked = fleet.tracked_delivery();
    let owner = short_token(&state, Role::Customer, tracked.details.customer_id.0, SHORT);
    let admin = short_token(&state, Role::Admin, Uuid::new_v4(), SHORT);
    let lasting = token(&state, Role::Admin, Uuid::new_v4());

    let mut tracking = open(
        addr,
        &format!(
            "/ws/track/{}?access_token={owner}",
            tracked.details.delivery_id
        ),
        &[],
    )
    .await
    .unwrap();
    let mut changes = open(addr, "/ws/changes", &[bearer(&admin)]).await.unwrap();
    let mut lasts = open(addr, "/ws/changes", &[bearer(&lasting)])
        .await
        .unwrap();
    let opened = tokio::time::Instant::now();
    for socket in [&mut tracking, &mut changes] {
        let (seen, code, reason) = until_closed(socket, EXPIRY_PATIENCE).await;
        assert_eq!(seen[0]["type"], "snapshot");
        assert_eq!((code, reason.as_str()), (4401, "the token has expired"));
    }
    assert!(
        opened.elapsed() <= SHORT + Duration::from_millis(500),
        "{:?}",
        opened.elapsed()
    );
    // A token that lasts keeps its session open past that.
    match next(&mut lasts, Duration::from_secs(10)).await {
        Received::Json(message) => assert_eq!(message["type"], "snapshot"),
        other => panic!("expected the snapshot, got {other:?}"),
    }
    let more = tokio::time::timeout(Duration::from_millis(500), lasts.next()).await;
    assert!(
        !matches!(more, Ok(Some(Ok(Message::Close(_))))),
        "a lasting token's session stays open: {more:?}"
    );
    state.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graphql_subscriptions_close_when_their_token_expires() {
    let fleet = Fleet::new(25, 4, 64);
    let state = state(&fleet);
    let addr = serve(state.clone()).await;
    let protocol = ("sec-websocket-protocol", "graphql-transport-ws".to_owned());
    let subscribe = json!({"id": "1", "type": "subscribe", "payload": {
        "query": "subscription { metricChanged(scope: OVERALL) { epoch reason } }"}});

    // The token in connection_init, and the token on the upgrade.
    for on_upgrade in [false, true] {
        let short = short_token(&state, Role::Admin, Uuid::new_v4(), SHORT);
        let headers = if on_upgrade {
            vec![protocol.clone(), bearer(&short)]
        } else {
            vec![protocol.clone()]
        };
        let mut socket = open(addr, "/graphql/ws", &headers).await.unwrap();
        let payload = if on_upgrade {
            json!({})
        } else {
            json!({"Authorization": format!("Bearer {short}")})
        };
        socket
            .send(Message::Text(
                json!({"type": "connection_init", "payload": payload})
                    .to_string()
                    .into(),
            ))
            .await
            .unwrap();
        socket
            .send(Message::Text(subscribe.to_string().into()))
            .await
            .unwrap();
        let (seen, code, reason) = until_closed(&mut socket, EXPIRY_PATIENCE).await;
        assert_eq!(seen[0]["type"], "connection_ack", "{seen:?}");
        assert!(
            seen.iter().any(|m| m["type"] == "next" && m["id"] == "1"),
            "the subscription ran until then: {seen:?}"
        );
        assert_eq!((code, reason.as_str()), (4401, "the token has expired"));
    }
    state.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_couriers_tracking_closes_when_the_delivery_goes_to_another_courier() {
    let mut fleet = Fleet::new(26, 6, 64);
    let state = state(&fleet);
    let addr = serve(state.clone()).await;
    // One of our customer's own deliveries, still unassigned, and two located couriers.
    let id = DeliveryId(Uuid::from_u128(0xd0_0002));
    assert_eq!(
        fleet.model.delivery(id).unwrap().details.status,
        Status::Created
    );
    let (first, second): (CourierId, CourierId) = fleet.model.with_state(|read| {
        let mut couriers = read.couriers.keys().copied();
        (couriers.next().unwrap(), couriers.next().unwrap())
    });
    let assign = |courier: CourierId, at: i64| {
        fleet::event(
            at,
            EventBody::StatusChanged(StatusChanged {
                delivery_id: id,
                status: Status::Assigned,
                courier_id: Some(courier),
            }),
        )
    };
    let now = fleet.simulator.now();
    fleet.apply(vec![assign(first, now + 2_000)]);
    let courier_token = token(&state, Role::Courier, first.0);
    let owner = token(&state, Role::Customer, CUSTOMER);
    let path = format!("/ws/track/{id}");
    let mut courier = open(addr, &path, &[bearer(&courier_token)]).await.unwrap();
    let mut customer = open(addr, &path, &[bearer(&owner)]).await.unwrap();
    for socket in [&mut courier, &mut customer] {
        match next(socket, Duration::from_secs(10)).await {
            Received::Json(snapshot) => {
                assert_eq!(snapshot["delivery"]["courier_id"], first.to_string());
            }
            other => panic!("expected the snapshot, got {other:?}"),
        }
    }

    // A correction: the delivery was assigned to the second courier before the first
    // assignment (event time), so the second courier has it now.
    fleet.apply(vec![assign(second, now + 1_000)]);
    assert_eq!(
        fleet.model.delivery(id).unwrap().details.courier_id,
        Some(second)
    );
    let (seen, code, reason) = until_closed(&mut courier, Duration::from_secs(10)).await;
    assert_eq!(
        (code, reason.as_str()),
        (4403, "the delivery was assigned to another courier")
    );
    assert!(
        !seen
            .iter()
            .any(|m| m.to_string().contains(&second.to_string())),
        "the first courier is not told who has it now: {seen:?}"
    );
    // The customer follows the new courier.
    let message = match next(&mut customer, Duration::from_secs(10)).await {
        Received::Json(message) => message,
        other => panic!("the customer's stream goes on: {other:?}"),
    };
    assert_eq!(message["courier_id"], second.to_string(), "{message}");
    // And the first courier cannot open it again.
    assert!(open(addr, &path, &[bearer(&courier_token)]).await.is_err());
    state.shutdown.cancel();
}

// ---------------------------------------------------------------------------------------
// HTML pages
// ---------------------------------------------------------------------------------------

/// `'sha256-…'` of every inline `<tag>` block (no `src`) of `page`.
fn inline_hashes(page: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    page.split(&open)
        .skip(1)
        .filter_map(|rest| rest.split_once(&close).map(|(body, _)| body))
        .map(|body| {
            format!(
                "'sha256-{}'",
                base64::engine::general_purpose::STANDARD.encode(Sha256::digest(body.as_bytes()))
            )
        })
        .collect()
}

/// The page at `path`: its body and its headers, by lower-case name.
async fn page(addr: SocketAddr, path: &str) -> (String, reqwest::header::HeaderMap) {
    let response = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
    assert_eq!(response.status(), 200, "{path}");
    let headers = response.headers().clone();
    (response.text().await.unwrap(), headers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn html_pages_send_a_content_security_policy_and_nosniff() {
    let state = AppState::new(
        delivertrack_sinks::ReadModel::default(),
        CancellationToken::new(),
    );
    let addr = serve(state.clone()).await;
    for path in ["/", "/graphql"] {
        let (body, headers) = page(addr, path).await;
        let policy = headers["content-security-policy"].to_str().unwrap();
        assert_eq!(headers["x-content-type-options"], "nosniff", "{path}");
        assert!(
            headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/html"),
            "{path}"
        );
        assert!(!policy.contains("unsafe-inline"), "{path}: {policy}");
        assert!(!policy.contains("unsafe-eval"), "{path}: {policy}");
        assert!(
            policy.contains("frame-ancestors 'none'"),
            "{path}: {policy}"
        );
        assert!(policy.starts_with("default-src 'none'"), "{path}: {policy}");
        // Every inline block is allowed by its own hash, so the page runs as written.
        let scripts = inline_hashes(&body, "script");
        let styles = inline_hashes(&body, "style");
        assert!(!scripts.is_empty() && !styles.is_empty(), "{path}");
        for hash in scripts.iter().chain(&styles) {
            assert!(
                policy.contains(hash.as_str()),
                "{path}: {hash} missing from {policy}"
            );
        }
        assert!(
            !body.contains(" style=\""),
            "{path}: no inline style attribute"
        );
    }

    // GraphiQL's assets: pinned versions, each with its integrity, each (and nothing else
    // of unpkg.com) in the policy.
    let (body, headers) = page(addr, "/graphql").await;
    let policy = headers["content-security-policy"].to_str().unwrap();
    for (url, integrity) in [
        (
            "https://unpkg.com/react@18.3.1/umd/react.production.min.js",
            "sha384-DGyLxAyjq0f9SPpVevD6IgztCFlnMF6oW/XQGmfe+IsZ8TqEiDrcHkMLKI6fiB/Z",
        ),
        (
            "https://unpkg.com/react-dom@18.3.1/umd/react-dom.production.min.js",
            "sha384-gTGxhz21lVGYNMcdJOyq01Edg0jhn/c22nsx0kyqP0TxaV5WVdsSH1fSDUf5YJj1",
        ),
        (
            "https://unpkg.com/graphiql@4.1.2/graphiql.min.js",
            "sha384-9XdHu7ajgGJziD4J1zNBKQ842Q/+zZfDv+ib1eMhZWBH6hPAs806x+Jbcf0yNO6B",
        ),
        (
            "https://unpkg.com/graphiql@4.1.2/graphiql.min.css",
            "sha384-1el1QShFBnnXTx9x/Cprg82hZWKt0ry29OAYIXt05swbi0KcZDFoj0CWguMpopJr",
        ),
    ] {
        let tag = body
            .split('<')
            .find(|tag| tag.contains(&format!("\"{url}\"")))
            .unwrap_or_else(|| panic!("{url} is not loaded by the page"));
        assert!(tag.contains(&format!("integrity=\"{integrity}\"")), "{tag}");
        assert!(tag.contains("crossorigin=\"anonymous\""), "{tag}");
        assert!(policy.contains(url), "{url} missing from {policy}");
    }
    assert_eq!(
        body.matches("https://unpkg.com/").count(),
        4,
        "no other asset"
    );
    assert!(
        !policy.contains("https://unpkg.com "),
        "only the exact files: {policy}"
    );
    assert!(
        !policy.contains("https://unpkg.com;"),
        "only the exact files: {policy}"
    );

    // A valid token is preset (in an element, not the script, whose hash stays put).
    let admin = token(&state, Role::Admin, Uuid::new_v4());
    let (preset, headers) = page(addr, &format!("/graphql?access_token={admin}")).await;
    assert!(preset.contains(&format!("content=\"{admin}\"")));
    assert_eq!(headers["content-security-policy"].to_str().unwrap(), policy);
    let (ignored, _) = page(addr, "/graphql?access_token=%22%3E%3Cscript%3E").await;
    assert!(!ignored.contains("<meta name=\"delivertrack-access-token\""));
    state.shutdown.cancel();
}
