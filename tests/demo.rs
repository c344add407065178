//! The demo end to end: in-process over real HTTP and WebSocket connections, and as the
//! real `delivertrack demo` process stopped by SIGINT.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use delivertrack::{DemoConfig, PipelineConfig, run_demo_on};
use delivertrack_api::Role;
use futures::StreamExt;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;

use support::{auth_config, token};

/// An HTTP client that sends an admin's token with every request (the read model is
/// theirs).
fn admin_client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {}", token(Role::Admin)).parse().unwrap(),
    );
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .default_headers(headers)
        .build()
        .unwrap()
}

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
        auth: Some(auth_config()),
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

    let client = admin_client();
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
    let admin = token(Role::Admin);
    let (mut socket, _) =
        tokio_tungstenite::connect_async(format!("ws://{addr}/ws/changes?access_token={admin}"))
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

/// How long the binary may take to print its banner, to answer `/healthz` after being
/// started, and to exit after SIGINT. Generous: the machine may be busy building.
const PROCESS_PATIENCE: Duration = Duration::from_secs(30);

/// The messages of the binary's JSON log lines (`--log-format json`), in order.
fn log_messages(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter_map(|line| line["fields"]["message"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_binary_prints_where_to_look_and_exits_0_on_sigint() {
    let spawned = Instant::now();
    // Port 0: the system picks a free port, and the banner has to say which.
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_delivertrack"))
        .args(["--log-format", "json", "demo", "--listen", "127.0.0.1:0"])
        .args(["--workers", "1", "--couriers", "20", "--zones", "4"])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Read stderr all along, so that the log never fills the pipe and blocks the demo.
    let mut stderr = child.stderr.take().unwrap();
    let log = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        text
    });
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();

    let mut banner = Vec::new();
    while !banner
        .last()
        .is_some_and(|line: &String| line.contains("Ctrl-C"))
    {
        match timeout(PROCESS_PATIENCE, stdout.next_line()).await {
            Ok(Ok(Some(line))) => banner.push(line),
            other => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                panic!(
                    "the banner did not finish ({other:?}) after {banner:?}; stderr:\n{}",
                    log.await.unwrap()
                );
            }
        }
    }
    let banner = banner.join("\n");
    let addr: SocketAddr = banner
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("no address in the banner:\n{banner}"));
    assert_ne!(addr.port(), 0, "the banner names the port actually bound");
    for place in [
        format!("http://{addr}/#access_token="),
        format!("http://{addr}/api/snapshot"),
        format!("ws://{addr}/ws/changes"),
        format!("http://{addr}/healthz"),
    ] {
        assert!(banner.contains(&place), "{place} missing from:\n{banner}");
    }
    // The map's link carries the banner's admin token, which opens the read model.
    let admin_token = banner
        .lines()
        .find_map(|line| line.trim().strip_prefix("admin token:"))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no admin token in the banner:\n{banner}"))
        .to_owned();
    assert!(
        banner.contains(&format!("http://{addr}/#access_token={admin_token}")),
        "{banner}"
    );

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let healthy = loop {
        let status = client
            .get(format!("http://{addr}/healthz"))
            .send()
            .await
            .map(|response| response.status().as_u16());
        if let Ok(200) = status {
            break spawned.elapsed();
        }
        assert!(
            spawned.elapsed() < PROCESS_PATIENCE,
            "/healthz never answered 200 (last: {status:?})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("spawn to /healthz 200: {healthy:?}");
    let status = |token: Option<String>| {
        let mut request = client.get(format!("http://{addr}/api/snapshot"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(status(None).await, 401);
    assert_eq!(status(Some(admin_token.clone())).await, 200);

    // SIGINT is what Ctrl-C in a terminal sends.
    let pid = child.id().expect("the demo is still running").to_string();
    let sent = std::process::Command::new("sh")
        .args(["-c", &format!("kill -INT {pid}")])
        .status()
        .unwrap();
    assert!(sent.success());
    let signalled = Instant::now();
    let status = timeout(PROCESS_PATIENCE, child.wait())
        .await
        .expect("the demo exits within the bound after SIGINT")
        .unwrap();
    eprintln!("SIGINT to exit: {:?}", signalled.elapsed());
    let rest_of_stdout = timeout(PROCESS_PATIENCE, async {
        let mut rest = Vec::new();
        while let Ok(Some(line)) = stdout.next_line().await {
            rest.push(line);
        }
        rest
    })
    .await
    .expect("stdout closes with the process");
    let log = timeout(PROCESS_PATIENCE, log)
        .await
        .expect("stderr closes with the process")
        .unwrap();
    assert_eq!(status.code(), Some(0), "exit {status:?}; stderr:\n{log}");
    assert!(
        rest_of_stdout.is_empty(),
        "stdout holds the banner only: {rest_of_stdout:?}"
    );
    // It stopped because of the signal, through the clean path.
    let messages = log_messages(&log);
    for expected in ["Ctrl-C received.", "DeliverTrack stopped cleanly."] {
        assert!(
            messages.iter().any(|message| message == expected),
            "no {expected:?} in the log:\n{log}"
        );
    }
}

/// Commands the API accepts and the dataflow refuses are counted in `demo` as in `run`, in
/// `delivertrack_events_rejected_total{reason}`: a courier's implausible jump, and an
/// illegal transition (two operators setting an in-transit delivery `delivered` and
/// `failed` at the same moment: the API checks each against the read model, where both are
/// legal, and sends both on; the dataflow applies one and refuses the other).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_counts_the_dataflows_refusals_of_api_commands() {
    use delivertrack_api::{AuthConfig, Authenticator, Role};
    use serde_json::json;
    use uuid::Uuid;

    let auth = AuthConfig {
        secret: "demo-refusals-test-secret-0c41b7e2d9a8".to_owned(),
        expiry: Duration::from_secs(3600),
    };
    let tokens = Authenticator::new(&auth).unwrap();
    let admin = tokens.issue(Role::Admin, Uuid::new_v4()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let config = DemoConfig {
        auth: Some(auth),
        ..small_demo()
    };
    let demo = tokio::spawn(run_demo_on(listener, config, async {
        let _ = stop_rx.await;
    }));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let base = format!("http://{addr}");
    eventually(
        &client,
        &format!("{base}/readyz"),
        Duration::from_secs(30),
        |s, _| s == 200,
    )
    .await;
    let put_status = |id: String, body: Value| {
        let request = client
            .put(format!("{base}/deliveries/{id}/status"))
            .bearer_auth(&admin)
            .json(&body);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };

    let rejected = |reason: &'static str| {
        let request = client.get(format!("{base}/metrics")).bearer_auth(&admin);
        async move {
            let metrics = request.send().await.unwrap().text().await.unwrap();
            let line = format!("delivertrack_events_rejected_total{{reason=\"{reason}\"}}");
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(line.as_str()))
                .and_then(|rest| rest.trim().parse::<u64>().ok())
                .unwrap_or(0)
        }
    };
    // Whether the count of `reason` rises above `before` within `bound` (the demo's own
    // simulated fleet runs beside the test, so counts are compared with a baseline).
    let counted_within = |reason: &'static str, before: u64, bound: Duration| {
        let rejected = &rejected;
        async move {
            let deadline = Instant::now() + bound;
            loop {
                if rejected(reason).await > before {
                    return true;
                }
                if Instant::now() >= deadline {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };

    // A courier's fix 10 km from its previous one a second later: the API cannot judge the
    // speed (it does not keep positions), the dataflow refuses it as `implausible_jump`.
    let courier = Uuid::new_v4();
    let courier_token = tokens.issue(Role::Courier, courier).unwrap();
    let jumps_before = rejected("implausible_jump").await;
    for (lat, lon) in [(52.52, 13.40), (52.61, 13.40)] {
        let posted = client
            .post(format!("{base}/locations"))
            .bearer_auth(&courier_token)
            .json(&json!({"lat": lat, "lon": lon}))
            .send()
            .await
            .unwrap();
        assert!(
            [201, 202].contains(&posted.status().as_u16()),
            "{:?}",
            posted.text().await
        );
        // The location route takes one fix per second per courier.
        tokio::time::sleep(Duration::from_millis(1_100)).await;
    }
    assert!(
        counted_within("implausible_jump", jumps_before, Duration::from_secs(20)).await,
        "the jump's refusal was never counted"
    );

    // Two operators set an in-transit delivery `delivered` and `failed` at once. Both must
    // pass the API's check before either is applied, and the one applied second must also
    // be the later in event time (otherwise it is a late step before the other, which the
    // dataflow accepts): a race, so the test tries up to 20 deliveries.
    let mut counted = false;
    for _ in 0..20 {
        let created = client
            .post(format!("{base}/deliveries"))
            .bearer_auth(&admin)
            .json(&json!({
                "customer_id": Uuid::new_v4(),
                "pickup": {"lat": 52.52, "lon": 13.40},
                "dropoff": {"lat": 52.53, "lon": 13.41},
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(created.status().as_u16(), 201);
        let id = created.json::<Value>().await.unwrap()["delivery_id"]
            .as_str()
            .unwrap()
            .to_owned();
        for body in [
            json!({"status": "assigned", "courier_id": Uuid::new_v4()}),
            json!({"status": "picked_up"}),
            json!({"status": "in_transit"}),
        ] {
            let (status, answer) = put_status(id.clone(), body).await;
            assert_eq!(status, 200, "{answer}");
        }
        let refused_before = rejected("illegal_transition").await;
        let (delivered, failed) = tokio::join!(
            put_status(id.clone(), json!({"status": "delivered"})),
            put_status(id.clone(), json!({"status": "failed"})),
        );
        let passed = |status: u16| status == 200 || status == 202;
        if !(passed(delivered.0) && passed(failed.0)) {
            // One was refused by the API itself (409): it saw the other applied first.
            assert!(
                [delivered.0, failed.0].contains(&409),
                "{delivered:?} {failed:?}"
            );
            continue;
        }
        if counted_within("illegal_transition", refused_before, Duration::from_secs(3)).await {
            counted = true;
            break;
        }
    }
    assert!(
        counted,
        "no illegal transition sent through the API was counted in 20 tries"
    );

    stop_tx.send(()).unwrap();
    timeout(Duration::from_secs(30), demo)
        .await
        .expect("the demo stops within 30 s")
        .unwrap()
        .unwrap();
}

// ---------------------------------------------------------------------------------------
// The map page in a real browser
// ---------------------------------------------------------------------------------------

/// Debian's `chromium` (or `CHROMIUM`), if installed (`scripts/test.sh` installs it).
fn chromium() -> Option<std::path::PathBuf> {
    if let Some(path) = std::env::var_os("CHROMIUM") {
        return Some(path.into());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| ["chromium", "chromium-browser"].map(|name| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

/// The DOM of `url` after headless Chromium ran the page for a few (virtual) seconds, and
/// what the browser logged (CSP refusals among it).
async fn render(browser: &std::path::Path, url: &str) -> (String, String) {
    let profile = std::env::temp_dir().join(format!("dt-chromium-{}", uuid::Uuid::new_v4()));
    let output = timeout(
        Duration::from_secs(90),
        tokio::process::Command::new(browser)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(["--enable-logging=stderr", "--virtual-time-budget=8000"])
            .args(["--dump-dom", url])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium renders the page within 90 s")
    .unwrap();
    let _ = std::fs::remove_dir_all(&profile);
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The text of the element with this `id` in a dumped DOM.
fn text_of(dom: &str, id: &str) -> String {
    let marker = format!("id=\"{id}\"");
    dom.split_once(&marker)
        .and_then(|(_, rest)| rest.split_once('>'))
        .and_then(|(_, rest)| rest.split_once('<'))
        .map(|(text, _)| text.trim().to_owned())
        .unwrap_or_else(|| panic!("no element #{id} in:\n{dom}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_map_page_signs_in_with_its_fragment_and_draws_live_data_in_a_browser() {
    let Some(browser) = chromium() else {
        support::skip_without(
            "no chromium on the PATH (scripts/test.sh installs Debian's chromium)",
        );
        return;
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let demo = tokio::spawn(run_demo_on(listener, small_demo(), async {
        let _ = stop_rx.await;
    }));
    eventually(
        &admin_client(),
        &format!("http://{addr}/api/snapshot"),
        Duration::from_secs(30),
        |s, body| s == 200 && body["counts"]["couriers"].as_u64().unwrap_or(0) > 0,
    )
    .await;

    // Signed in from the fragment: the snapshot and the live stream under the page's
    // Content-Security-Policy, which must let its own inline script and style run.
    // The dump comes when Chromium's virtual time runs out, which does not wait for the
    // WebSocket: on a busy machine the stream may not be open yet, so a few tries.
    let url = format!("http://{addr}/#access_token={}", token(Role::Admin));
    let (mut dom, mut log) = render(&browser, &url).await;
    for _ in 0..4 {
        if text_of(&dom, "status") == "live" {
            break;
        }
        (dom, log) = render(&browser, &url).await;
    }
    assert_eq!(text_of(&dom, "status"), "live", "{dom}\n{log}");
    let couriers: u64 = text_of(&dom, "couriers").parse().unwrap_or(0);
    assert_eq!(couriers, 20, "{dom}");
    assert_eq!(text_of(&dom, "zones"), "4", "{dom}");
    assert!(text_of(&dom, "epoch").parse::<u64>().is_ok(), "{dom}");
    assert!(dom.contains("class=\"dot live\""), "{dom}");
    assert!(
        !log.contains("Content Security Policy"),
        "the page breaks none of its own policy:\n{log}"
    );

    // No token: the sign-in form and no data. Another role's token: refused.
    let (dom, _) = render(&browser, &format!("http://{addr}/")).await;
    assert_eq!(text_of(&dom, "status"), "sign in with an admin token");
    assert_eq!(text_of(&dom, "couriers"), "–");
    assert!(
        dom.contains("<form id=\"signin\">"),
        "the form is shown: {dom}"
    );
    let (dom, _) = render(
        &browser,
        &format!("http://{addr}/#access_token={}", token(Role::Customer)),
    )
    .await;
    assert_eq!(
        text_of(&dom, "status"),
        "this token is not an admin's: sign in again"
    );
    assert_eq!(text_of(&dom, "couriers"), "–");

    stop_tx.send(()).unwrap();
    timeout(Duration::from_secs(30), demo)
        .await
        .expect("the demo stops within 30 s")
        .unwrap()
        .unwrap();
}
