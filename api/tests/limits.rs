//! The per-client bounds of the API, each tried over real sockets: the header and idle
//! timeouts and the connection cap of the accept loop, `431` for oversized headers, `1009`
//! for an oversized WebSocket message on `/ws/track`, `/ws/changes` and `/graphql/ws`, the
//! GraphQL cost of aliased scans, and the cap on subscriptions per GraphQL connection.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use delivertrack_api::{ApiConfig, AppState, Role};
use delivertrack_dataflow::geometry::GeoPoint;
use delivertrack_dataflow::ids::CustomerId;
use delivertrack_dataflow::model::DeliveryState;
use delivertrack_dataflow::{Change, DeliveryId, EpochOutput, Status};
use delivertrack_sinks::ReadModel;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const DELIVERY: Uuid = Uuid::from_u128(0xde11);

/// A read model holding one delivery in progress, [`DELIVERY`].
fn model() -> ReadModel {
    let model = ReadModel::default();
    let delivery = DeliveryState {
        customer_id: CustomerId(Uuid::from_u128(3)),
        courier_id: None,
        pickup: GeoPoint::from_degrees(52.52, 13.41),
        dropoff: GeoPoint::from_degrees(52.50, 13.45),
        promised_by: None,
        status: Status::Created,
        created_at: 500,
        assigned_at: None,
        picked_up_at: None,
        ended_at: None,
        rating: None,
        version: 1,
    };
    model.apply(&EpochOutput {
        restored: false,
        epoch: 0,
        changes: vec![(Change::Delivery(DeliveryId(DELIVERY), delivery), 1)],
        rejections: Vec::new(),
        events: Vec::new(),
    });
    model
}

/// The API on loopback with `config`; its address, its state (for tokens) and its stop.
async fn serve(config: ApiConfig) -> (SocketAddr, AppState, CancellationToken) {
    let shutdown = CancellationToken::new();
    let state = AppState::new(model(), shutdown.clone()).with_config(config);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(delivertrack_api::serve(listener, state.clone()));
    (addr, state, shutdown)
}

fn admin(state: &AppState) -> String {
    state
        .auth
        .issue(Role::Admin, Uuid::from_u128(0xad))
        .unwrap()
}

const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: limits\r\n\r\n";

/// Reads one HTTP answer off `stream`: its status line (the body is read and dropped).
async fn read_answer(stream: &mut TcpStream) -> String {
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&received[..end]).into_owned();
            let length: usize = head
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .unwrap_or(0);
            while received.len() < end + 4 + length {
                let n = stream.read(&mut buf).await.unwrap();
                assert!(n > 0, "the connection closed within an answer");
                received.extend_from_slice(&buf[..n]);
            }
            return head.lines().next().unwrap_or_default().to_owned();
        }
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "the connection closed before an answer");
        received.extend_from_slice(&buf[..n]);
    }
}

/// Waits until the server closes `stream` (end of file or reset); how long that took.
async fn closed_within(stream: &mut TcpStream, bound: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 256];
    loop {
        match timeout(
            bound.saturating_sub(started.elapsed()),
            stream.read(&mut buf),
        )
        .await
        {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

// ---------------------------------------------------------------------------------------
// Connections
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_sent_a_byte_at_a_time_is_cut_off_at_the_header_timeout() {
    let (addr, _state, _stop) = serve(ApiConfig {
        http_header_timeout: Duration::from_secs(1),
        http_idle_timeout: Duration::from_secs(30),
        ..ApiConfig::default()
    })
    .await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let (mut reader, mut writer) = stream.split();
    let trickle = async {
        // A byte every 400 ms: the whole head would take 16 s.
        for byte in HEALTHZ {
            if writer.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
    };
    let closed = async {
        let started = Instant::now();
        let mut buf = [0u8; 256];
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => started.elapsed(),
            Ok(n) => panic!("an answer to a head never finished: {:?}", &buf[..n]),
        }
    };
    let took = tokio::select! {
        took = closed => took,
        () = trickle => panic!("the whole head was sent a byte at a time and the connection stayed open"),
    };
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "closed after {took:?}"
    );

    // A prompt client is served as usual.
    let mut prompt = TcpStream::connect(addr).await.unwrap();
    prompt.write_all(HEALTHZ).await.unwrap();
    assert_eq!(read_answer(&mut prompt).await, "HTTP/1.1 200 OK");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_kept_alive_connection_is_closed_at_the_idle_timeout_not_before() {
    let (addr, _state, _stop) = serve(ApiConfig {
        http_header_timeout: Duration::from_secs(1),
        http_idle_timeout: Duration::from_secs(3),
        ..ApiConfig::default()
    })
    .await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(HEALTHZ).await.unwrap();
    assert_eq!(read_answer(&mut stream).await, "HTTP/1.1 200 OK");
    // Kept alive: a second request on it is served, past the header timeout.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stream.write_all(HEALTHZ).await.unwrap();
    assert_eq!(read_answer(&mut stream).await, "HTTP/1.1 200 OK");
    let idle_from = Instant::now();
    // Idle longer than the header timeout: still open ...
    assert_eq!(
        closed_within(&mut stream, Duration::from_millis(2000)).await,
        None,
        "an idle connection was closed before the idle timeout"
    );
    // ... and closed once idle for the idle timeout.
    let closed = closed_within(&mut stream, Duration::from_secs(5)).await;
    assert!(closed.is_some(), "an idle connection stayed open");
    let idle = idle_from.elapsed();
    assert!(
        idle >= Duration::from_millis(2900) && idle < Duration::from_secs(5),
        "closed after {idle:?} idle"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_its_answers_is_cut_off() {
    // hyper takes the next pipelined request only once the previous answer is written, so a
    // peer that stops reading leaves its connection idle: the idle timeout cuts it off (and
    // the request and send timeouts would, were a request still in flight).
    let (addr, _state, _stop) = serve(ApiConfig {
        request_timeout: Duration::from_secs(1),
        ws_send_timeout: Duration::from_secs(1),
        http_idle_timeout: Duration::from_secs(2),
        ..ApiConfig::default()
    })
    .await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // 2 000 pipelined requests for the OpenAPI document (hundreds of megabytes of
    // answers), none of them read: the socket's buffers fill and the server can write no
    // more.
    let pipelined = b"GET /openapi.json HTTP/1.1\r\nHost: api\r\n\r\n".repeat(2_000);
    let _ = timeout(Duration::from_secs(5), stream.write_all(&pipelined)).await;
    // Longer than the idle timeout with nothing taken.
    tokio::time::sleep(Duration::from_secs(4)).await;
    // Closed: what was buffered drains, then the end. Kept open, the answers would go on
    // streaming for far longer than this.
    assert!(
        closed_within(&mut stream, Duration::from_secs(10))
            .await
            .is_some(),
        "a connection whose answers nobody reads stayed open"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_wait_until_one_closes() {
    let (addr, _state, _stop) = serve(ApiConfig {
        max_connections: 2,
        ..ApiConfig::default()
    })
    .await;
    let mut first = TcpStream::connect(addr).await.unwrap();
    let mut second = TcpStream::connect(addr).await.unwrap();
    first.write_all(HEALTHZ).await.unwrap();
    assert_eq!(read_answer(&mut first).await, "HTTP/1.1 200 OK");
    second.write_all(HEALTHZ).await.unwrap();
    assert_eq!(read_answer(&mut second).await, "HTTP/1.1 200 OK");

    // A third connects (the backlog takes it) but is not served while two are open.
    let mut third = TcpStream::connect(addr).await.unwrap();
    third.write_all(HEALTHZ).await.unwrap();
    assert!(
        timeout(Duration::from_millis(1500), read_answer(&mut third))
            .await
            .is_err(),
        "a third connection was served beside two open ones with a cap of 2"
    );
    // Once one closes, it is.
    drop(first);
    let answered = timeout(Duration::from_secs(5), read_answer(&mut third))
        .await
        .expect("the waiting connection is served once another closes");
    assert_eq!(answered, "HTTP/1.1 200 OK");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_over_64_kib_are_refused_431() {
    let (addr, _state, _stop) = serve(ApiConfig::default()).await;
    let client = reqwest::Client::new();
    let get = |size: usize| {
        client
            .get(format!("http://{addr}/healthz"))
            .header("x-padding", "a".repeat(size))
            .send()
    };
    let fine = get(60 * 1024).await.unwrap();
    assert_eq!(fine.status(), 200);
    let big = get(70 * 1024).await.unwrap();
    assert_eq!(big.status(), 431);
    let body: Value = big.json().await.unwrap();
    assert_eq!(body["error"]["code"], "headers_too_large", "{body}");
}

// ---------------------------------------------------------------------------------------
// WebSockets
// ---------------------------------------------------------------------------------------

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn open(addr: SocketAddr, path: &str, token: &str, protocol: Option<&str>) -> Socket {
    let mut request = format!("ws://{addr}{path}").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    if let Some(protocol) = protocol {
        request
            .headers_mut()
            .insert("sec-websocket-protocol", protocol.parse().unwrap());
    }
    tokio_tungstenite::connect_async(request).await.unwrap().0
}

/// Reads until the server's close frame; its code.
async fn close_code(socket: &mut Socket) -> Option<CloseCode> {
    loop {
        let message = timeout(Duration::from_secs(10), socket.next())
            .await
            .expect("the server answers within 10 s");
        match message {
            Some(Ok(Message::Close(frame))) => return frame.map(|f| f.code),
            Some(Ok(_)) => {}
            other => panic!("the socket ended without a close frame: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_message_over_the_limit_is_closed_1009() {
    let (addr, state, _stop) = serve(ApiConfig::default()).await;
    let token = admin(&state);
    let big = "x".repeat(70 * 1024);
    for (path, protocol) in [
        (format!("/ws/track/{DELIVERY}"), None),
        ("/ws/changes".to_owned(), None),
        ("/graphql/ws".to_owned(), Some("graphql-transport-ws")),
    ] {
        let mut socket = open(addr, &path, &token, protocol).await;
        // A message within the limit is fine (the GraphQL protocol answers it as it likes).
        if protocol.is_none() {
            socket
                .send(Message::Text("y".repeat(60 * 1024).into()))
                .await
                .unwrap();
        }
        socket
            .send(Message::Text(big.clone().into()))
            .await
            .unwrap();
        assert_eq!(
            close_code(&mut socket).await,
            Some(CloseCode::Size),
            "{path}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// GraphQL
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aliased_scans_cost_what_they_scan() {
    let (addr, state, _stop) = serve(ApiConfig::default()).await;
    let token = admin(&state);
    let query = |query: String| {
        let token = token.clone();
        async move {
            reqwest::Client::new()
                .post(format!("http://{addr}/graphql"))
                .bearer_auth(token)
                .json(&json!({ "query": query }))
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let one = query("{ deliveries(first: 0) { hasNextPage } }".into()).await;
    assert_eq!(one["data"]["deliveries"]["hasNextPage"], true, "{one}");

    let aliased: String = (0..240)
        .map(|i| format!("a{i}: deliveries(first: 0) {{ hasNextPage }} "))
        .collect();
    let body = query(format!("{{ {aliased} }}")).await;
    assert_eq!(
        body["errors"][0]["extensions"]["code"], "QUERY_TOO_COMPLEX",
        "{body}"
    );
    assert!(body.get("data").is_none_or(Value::is_null), "{body}");
    // The other scans alike.
    let aliased: String = (0..11)
        .map(|i| format!("a{i}: peakTimes(limit: 0) {{ deliveries }} "))
        .collect();
    let body = query(format!("{{ {aliased} }}")).await;
    assert_eq!(
        body["errors"][0]["extensions"]["code"], "QUERY_TOO_COMPLEX",
        "{body}"
    );
}

async fn send_json(socket: &mut Socket, message: Value) {
    socket
        .send(Message::Text(message.to_string().into()))
        .await
        .unwrap();
}

/// The next protocol message (pings skipped).
async fn next_json(socket: &mut Socket) -> Value {
    loop {
        let message = timeout(Duration::from_secs(10), socket.next())
            .await
            .expect("a message within 10 s")
            .expect("the socket is open")
            .expect("a valid frame");
        if let Message::Text(text) = message {
            return serde_json::from_str(&text).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_over_the_cap_are_refused_and_the_connection_stays_usable() {
    let (addr, state, _stop) = serve(ApiConfig {
        graphql_max_subscriptions: 3,
        ..ApiConfig::default()
    })
    .await;
    let mut socket = open(
        addr,
        "/graphql/ws",
        &admin(&state),
        Some("graphql-transport-ws"),
    )
    .await;
    send_json(&mut socket, json!({"type": "connection_init"})).await;
    assert_eq!(next_json(&mut socket).await["type"], "connection_ack");
    let subscribe = |id: &str, snapshot: bool| {
        json!({"type": "subscribe", "id": id, "payload": {
            "query": format!("subscription {{ metricChanged(snapshot: {snapshot}) {{ epoch }} }}")
        }})
    };
    for id in ["1", "2", "3"] {
        send_json(&mut socket, subscribe(id, false)).await;
    }
    send_json(&mut socket, subscribe("4", true)).await;
    let refused = next_json(&mut socket).await;
    assert_eq!(
        (&refused["type"], &refused["id"]),
        (&json!("error"), &json!("4")),
        "{refused}"
    );
    assert_eq!(
        refused["payload"][0]["extensions"]["code"], "TOO_MANY_SUBSCRIPTIONS",
        "{refused}"
    );

    // Ending one makes room; the connection went on working meanwhile.
    send_json(&mut socket, json!({"type": "complete", "id": "1"})).await;
    send_json(&mut socket, subscribe("5", true)).await;
    loop {
        let message = next_json(&mut socket).await;
        assert_ne!(message["type"], "error", "{message}");
        if message["id"] == "5" && message["type"] == "next" {
            break;
        }
    }
}
