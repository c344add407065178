//! The demo end to end, in-process, over real HTTP and WebSocket connections.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use delivertrack::{DemoConfig, PipelineConfig, run_demo_on};
use futures::StreamExt;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;

/// A small city that moves fast: many fixes and deliveries within seconds.
fn small_demo() -> DemoConfig {
    DemoConfig {
        pipeline: PipelineConfig {
            workers: 2,
            epoch_max_events: 500,
            epoch_max_wait: Duration::from_millis(50),
            ..PipelineConfig::default()
        },
        couriers: 20,
        zones: 4,
        deliveries_per_minute: 60.0,
        speed: 20.0,
        tick: Duration::from_millis(50),
        seed: 7,
        ..DemoConfig::default()
    }
}

/// Polls `url` until `accept` holds for the status and JSON body, or fails after `within`.
async fn eventually(
    client: &reqwest::Client,
    url: &str,
    within: Duration,
    accept: impl Fn(u16, &Value) -> bool,
) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let response = client.get(url).send().await.unwrap();
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if accept(status, &body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{url} never became acceptable; last: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn next_json(
    socket: &mut (impl StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin),
) -> Value {
    loop {
        let message = timeout(Duration::from_secs(20), socket.next())
            .await
            .expect("a live message within 20 s")
            .expect("the socket stays open")
            .expect("a well-formed frame");
        match message {
            Message::Text(text) => return serde_json::from_str(&text).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_serves_snapshots_and_live_changes_and_stops_cleanly() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let demo = tokio::spawn(run_demo_on(listener, small_demo(), async {
        let _ = stop_rx.await;
    }));

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let base = format!("http://{addr}");

    let health = client.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    assert_eq!(health.json::<Value>().await.unwrap()["status"], "ok");

    let ready = eventually(
        &client,
        &format!("{base}/readyz"),
        Duration::from_secs(30),
        |s, _| s == 200,
    )
    .await;
    assert_eq!(ready["status"], "ready");

    let snapshot = eventually(
        &client,
        &format!("{base}/api/snapshot"),
        Duration::from_secs(30),
        |s, body| {
            s == 200
                && body["counts"]["couriers"].as_u64().unwrap_or(0) > 0
                && body["counts"]["deliveries"].as_u64().unwrap_or(0) > 0
        },
    )
    .await;
    assert_eq!(snapshot["counts"]["zones"], 4);
    assert!(snapshot["overall"]["deliveries"].as_i64().unwrap() > 0);

    // Lookups of known and unknown entities.
    let courier_id = snapshot["couriers"][0]["courier_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let courier = client
        .get(format!("{base}/api/couriers/{courier_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(courier.status().as_u16(), 200);
    assert_eq!(
        courier.json::<Value>().await.unwrap()["courier_id"],
        courier_id.as_str()
    );

    let malformed = client
        .get(format!("{base}/api/deliveries/not-a-uuid"))
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status().as_u16(), 400);
    assert!(
        malformed.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    assert_eq!(
        malformed.json::<Value>().await.unwrap()["error"]["code"],
        "invalid_id"
    );

    let unknown = client
        .get(format!(
            "{base}/api/couriers/00000000-0000-0000-0000-000000000000"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status().as_u16(), 404);
    assert_eq!(
        unknown.json::<Value>().await.unwrap()["error"]["code"],
        "not_found"
    );

    // The live stream: a snapshot, then epochs in increasing order after it.
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws/changes"))
        .await
        .unwrap();
    let first = next_json(&mut socket).await;
    assert_eq!(first["type"], "snapshot");
    assert_eq!(first["reason"], "connected");
    let mut last = first["snapshot"]["epoch"].as_u64();
    let mut kinds = std::collections::BTreeSet::new();
    for _ in 0..5 {
        let message = next_json(&mut socket).await;
        assert_eq!(message["type"], "epoch", "{message}");
        let epoch = message["epoch"].as_u64().unwrap();
        assert!(
            last.is_none_or(|last| epoch > last),
            "epoch {epoch} after {last:?}"
        );
        last = Some(epoch);
        for change in message["changes"].as_array().unwrap() {
            kinds.insert(change["type"].as_str().unwrap().to_owned());
        }
    }
    assert!(kinds.contains("courier_moved"), "changes seen: {kinds:?}");

    // Shutdown: the demo drains and returns Ok; the live client gets a close frame.
    stop_tx.send(()).unwrap();
    let report = timeout(Duration::from_secs(30), demo)
        .await
        .expect("the demo stops within 30 s")
        .unwrap()
        .unwrap();
    assert!(report.epochs > 0 && report.events > 0);
    assert_eq!(
        report.acked, report.epochs,
        "every committed epoch was acknowledged"
    );

    let closed = timeout(Duration::from_secs(10), async {
        while let Some(Ok(message)) = socket.next().await {
            if let Message::Close(frame) = message {
                return frame.map(|f| u16::from(f.code));
            }
        }
        None
    })
    .await
    .expect("the socket closes after shutdown");
    assert_eq!(closed, Some(1001));
}
