//! The write routes end to end: real HTTP (reqwest) against `delivertrack run` in-process
//! on `127.0.0.1:0`, its commands published to the real RabbitMQ and consumed back by the
//! pipeline, and — where they matter — PostgreSQL (a fresh database of the test's own) and
//! Redis (a key prefix of its own).
//!
//! Which services each test uses: all of them use RabbitMQ (each its own exchange and
//! queues from `unique_config`, deleted at the end); only
//! [`commands_reach_postgres_and_redis_through_the_pipeline`] opens the stores, since the
//! route behaviour depends on the read model alone; the binary tests start no pipeline
//! that consumes (a refused secret stops the start first) except one, without stores.
//!
//! Tokens are signed with the test's secret ([`SECRET`]); the hand-made ones (alg `none`,
//! no `role` claim, and a correct control) are spelled out as constants.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use delivertrack::{
    DemoConfig, DriveReport, PipelineConfig, RunConfig, RunHooks, StoresConfig, run_demo_on,
    run_pipeline_on,
};
use delivertrack_api::{AuthConfig, Authenticator, Role};
use delivertrack_ingest::rabbitmq::RabbitConfig;
use delivertrack_ingest::testing::{TcpProxy, TopologyGuard, broker_addr, unique_config, url_via};
use delivertrack_sinks::{PostgresConfig, RedisConfig};
use reqwest::Method;
use reqwest::header::{HeaderMap, HeaderValue};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};
use uuid::Uuid;

use support::{Database, delete_keys, redis};

/// How long any awaited condition may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(60);

/// The tests' JWT secret.
const SECRET: &str = "api-commands-test-secret-5f0c2a9e";

/// The subject of the hand-made tokens below.
const HAND_MADE_SUB: &str = "00000000-0000-4000-8000-00000000a0a0";

/// `{"alg":"none"}` over `{"sub": HAND_MADE_SUB, "role": "admin", "exp": 4102444800}`, no
/// signature.
const ALG_NONE: &str = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiIwMDAwMDAwMC0wMDAwLTQwMDAtODAwMC0wMDAwMDAwMGEwYTAiLCJyb2xlIjoiYWRtaW4iLCJleHAiOjQxMDI0NDQ4MDB9.";

/// HS256 with [`SECRET`] over `{"sub": HAND_MADE_SUB, "exp": 4102444800}`: no `role`.
const NO_ROLE: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIwMDAwMDAwMC0wMDAwLTQwMDAtODAwMC0wMDAwMDAwMGEwYTAiLCJleHAiOjQxMDI0NDQ4MDB9.-TjDgnb_A_XDrl3irpVHz44axLkEWdO9LlojHqAyWPU";

/// HS256 with [`SECRET`] over `{"sub": HAND_MADE_SUB, "role": "admin", "exp": 4102444800,
/// "iat": 0}`: the control that shows the hand-made signatures are right.
const HAND_MADE_ADMIN: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIwMDAwMDAwMC0wMDAwLTQwMDAtODAwMC0wMDAwMDAwMGEwYTAiLCJyb2xlIjoiYWRtaW4iLCJleHAiOjQxMDI0NDQ4MDAsImlhdCI6MH0.ajEb-54B9roIlED79zaRBtCVBL5jEstTdsL7MVfwPfo";

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

fn auth_config() -> AuthConfig {
    AuthConfig {
        secret: SECRET.to_owned(),
        expiry: Duration::from_secs(3600),
    }
}

fn authenticator() -> Authenticator {
    Authenticator::new(&auth_config()).unwrap()
}

fn token(role: Role, sub: Uuid) -> String {
    authenticator().issue(role, sub).unwrap()
}

/// Small, quick epochs; the test's secret; no stores.
fn run_config(rabbit: RabbitConfig) -> RunConfig {
    RunConfig {
        pipeline: PipelineConfig {
            workers: 2,
            epoch_max_events: 100,
            epoch_max_wait: Duration::from_millis(20),
            ..PipelineConfig::default()
        },
        rabbit,
        shutdown_timeout: Duration::from_secs(30),
        auth: Some(auth_config()),
        ..RunConfig::default()
    }
}

/// A pipeline running in this process, and an HTTP client for it.
struct Running {
    addr: SocketAddr,
    http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<DriveReport>>,
}

/// An answer: status, JSON body (`Null` when empty or not JSON), headers.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: Value,
    headers: HeaderMap,
}

impl Answer {
    fn code(&self) -> Option<&str> {
        self.body["error"]["code"].as_str()
    }

    /// Asserts an error answer of the one shape with this status and code.
    #[track_caller]
    fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(
            (self.status, self.code()),
            (status, Some(code)),
            "expected {status} {code}, got {self:?}"
        );
        assert!(self.body["error"]["message"].is_string(), "{self:?}");
    }
}

impl Running {
    async fn start(config: RunConfig) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (started_tx, started_rx) = oneshot::channel();
        let hooks = RunHooks {
            started: Some(started_tx),
            ..RunHooks::default()
        };
        let task = tokio::spawn(run_pipeline_on(listener, config, hooks, async {
            let _ = stop_rx.await;
        }));
        let started = timeout(PATIENCE, started_rx)
            .await
            .expect("the pipeline starts in time")
            .expect("the pipeline started (or it failed: see the task's error)");
        assert_eq!(started.addr, addr);
        Self {
            addr,
            http: reqwest::Client::new(),
            stop: Some(stop_tx),
            task,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The text of `GET /metrics`.
    async fn metrics(&self) -> String {
        let response = self.http.get(self.url("/metrics")).send().await.unwrap();
        response.text().await.unwrap()
    }

    /// A request with an optional bearer token and an optional JSON body.
    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Answer {
        // The read model (`/api/*`) is the admins': read without a token of its own, it is
        // an operator's look at what the pipeline applied.
        let operator;
        let token = match token {
            None if path.starts_with("/api/") => {
                operator = self::token(Role::Admin, Uuid::new_v4());
                Some(operator.as_str())
            }
            other => other,
        };
        let mut request = self.http.request(method, self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        answer(request.send().await.unwrap()).await
    }

    /// `POST /deliveries` of [`new_delivery`] for `customer` with `token`.
    async fn create_delivery(&self, token: &str, customer: Option<Uuid>) -> Answer {
        let body = new_delivery(customer);
        self.call(Method::POST, "/deliveries", Some(token), Some(body))
            .await
    }

    /// `PUT /deliveries/{delivery}/status` with `body` and `token`.
    async fn set_status(&self, token: &str, delivery: Uuid, body: Value) -> Answer {
        let path = format!("/deliveries/{delivery}/status");
        self.call(Method::PUT, &path, Some(token), Some(body)).await
    }

    /// A request with raw headers and body bytes.
    async fn raw(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Answer {
        let mut request = self.http.request(method, self.url(path)).body(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        answer(request.send().await.unwrap()).await
    }

    /// Stops it (as Ctrl-C would).
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        timeout(PATIENCE, self.task)
            .await
            .expect("the pipeline stops within the bound")
            .expect("the pipeline task did not panic")
            .expect("the pipeline stopped cleanly");
    }
}

async fn answer(response: reqwest::Response) -> Answer {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.unwrap();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Answer {
        status,
        body,
        headers,
    }
}

fn new_delivery(customer: Option<Uuid>) -> Value {
    let mut body = json!({
        "pickup": {"lat": 52.52, "lon": 13.40},
        "dropoff": {"lat": 52.50, "lon": 13.45},
        // An hour from now: a promise within seven days of the event, whenever this runs.
        "promised_by": humantime::format_rfc3339_seconds(
            std::time::SystemTime::now() + Duration::from_secs(3_600)
        )
        .to_string(),
    });
    if let Some(customer) = customer {
        body["customer_id"] = json!(customer);
    }
    body
}

fn square(name: &str) -> Value {
    json!({
        "name": name,
        "geometry": {"type": "Polygon", "coordinates": [[[13.39, 52.51], [13.42, 52.51], [13.42, 52.53], [13.39, 52.53], [13.39, 52.51]]]},
        "dwell_seconds": 30,
    })
}

fn id_of(answer: &Answer) -> Uuid {
    answer.body["id"]
        .as_str()
        .and_then(|id| Uuid::parse_str(id).ok())
        .unwrap_or_else(|| panic!("no id in {answer:?}"))
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_jwt_failure_is_401_and_a_wrong_role_is_403() {
    let rabbit = unique_config("api-jwt");
    let _cleanup = TopologyGuard::new(&rabbit);
    let running = Running::start(run_config(rabbit)).await;
    let delivery = Uuid::new_v4();
    let zone = Uuid::new_v4();
    let routes: Vec<(Method, String, Value)> = vec![
        (Method::POST, "/deliveries".into(), new_delivery(None)),
        (
            Method::PUT,
            format!("/deliveries/{delivery}/status"),
            json!({"status": "cancelled"}),
        ),
        (
            Method::POST,
            format!("/deliveries/{delivery}/rating"),
            json!({"score": 5}),
        ),
        (
            Method::POST,
            "/locations".into(),
            json!({"lat": 52.5, "lon": 13.4}),
        ),
        (Method::PUT, format!("/zones/{zone}"), square("z")),
        (Method::DELETE, format!("/zones/{zone}"), Value::Null),
    ];
    let sub = Uuid::new_v4();
    let expired = authenticator()
        .issue_for(Role::Admin, sub, Duration::ZERO)
        .unwrap();
    let foreign = Authenticator::new(&AuthConfig {
        secret: "another-secret".into(),
        expiry: Duration::from_secs(3600),
    })
    .unwrap()
    .issue(Role::Admin, sub)
    .unwrap();
    let body_of = |body: &Value| (!body.is_null()).then(|| serde_json::to_vec(body).unwrap());
    for (method, path, body) in &routes {
        let bytes = body_of(body).unwrap_or_default();
        let json = ("content-type", "application/json");
        let failures: Vec<(&str, Vec<(&str, String)>)> = vec![
            ("no token", vec![]),
            (
                "not a bearer header",
                vec![("authorization", "Token abc".into())],
            ),
            ("an empty bearer", vec![("authorization", "Bearer ".into())]),
            (
                "garbage",
                vec![("authorization", "Bearer not.a.jwt".into())],
            ),
            (
                "a bad signature",
                vec![("authorization", format!("Bearer {foreign}"))],
            ),
            (
                "an expired token",
                vec![("authorization", format!("Bearer {expired}"))],
            ),
            (
                "alg none",
                vec![("authorization", format!("Bearer {ALG_NONE}"))],
            ),
            (
                "no role claim",
                vec![("authorization", format!("Bearer {NO_ROLE}"))],
            ),
        ];
        for (what, headers) in failures {
            let mut all: Vec<(&str, &str)> =
                headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            all.push(json);
            let answer = running.raw(method.clone(), path, &all, bytes.clone()).await;
            assert_eq!(
                (answer.status, answer.code()),
                (401, Some("unauthorized")),
                "{method} {path} with {what}: {answer:?}"
            );
            assert_eq!(
                answer.headers.get("www-authenticate"),
                Some(&HeaderValue::from_static("Bearer")),
                "{what}"
            );
        }
    }
    // The control: a hand-made token signed like the two above is accepted (its admin may
    // delete; the zone does not exist, so 404 — past authentication).
    running
        .call(
            Method::DELETE,
            &format!("/zones/{zone}"),
            Some(HAND_MADE_ADMIN),
            None,
        )
        .await
        .assert_error(404, "not_found");

    // Wrong roles: 403, whatever the body.
    let customer = token(Role::Customer, Uuid::new_v4());
    let courier = token(Role::Courier, Uuid::new_v4());
    let forbidden: Vec<(&str, Method, String, Option<Value>)> = vec![
        (
            &courier,
            Method::POST,
            "/deliveries".into(),
            Some(new_delivery(None)),
        ),
        (
            &courier,
            Method::POST,
            "/deliveries".into(),
            Some(json!({"not": "even valid"})),
        ),
        (
            &courier,
            Method::POST,
            format!("/deliveries/{delivery}/rating"),
            Some(json!({"score": 5})),
        ),
        (
            &customer,
            Method::POST,
            "/locations".into(),
            Some(json!({"lat": 52.5, "lon": 13.4})),
        ),
        (
            &customer,
            Method::PUT,
            format!("/zones/{zone}"),
            Some(square("z")),
        ),
        (
            &courier,
            Method::PUT,
            format!("/zones/{zone}"),
            Some(square("z")),
        ),
        (&customer, Method::DELETE, format!("/zones/{zone}"), None),
        (&courier, Method::DELETE, format!("/zones/{zone}"), None),
    ];
    for (token, method, path, body) in forbidden {
        let answer = running.call(method.clone(), &path, Some(token), body).await;
        assert_eq!(
            (answer.status, answer.code()),
            (403, Some("forbidden")),
            "{method} {path}: {answer:?}"
        );
    }
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_role_and_ownership_matrix() {
    let rabbit = unique_config("api-matrix");
    let _cleanup = TopologyGuard::new(&rabbit);
    let running = Running::start(run_config(rabbit)).await;
    let admin = token(Role::Admin, Uuid::new_v4());
    let (c1, c2) = (Uuid::new_v4(), Uuid::new_v4());
    let (k1, k2) = (Uuid::new_v4(), Uuid::new_v4());
    let (customer1, customer2) = (token(Role::Customer, c1), token(Role::Customer, c2));
    let (courier1, courier2) = (token(Role::Courier, k1), token(Role::Courier, k2));
    let put_status = |token: String, delivery: Uuid, body: Value| {
        let running = &running;
        async move {
            running
                .call(
                    Method::PUT,
                    &format!("/deliveries/{delivery}/status"),
                    Some(&token),
                    Some(body),
                )
                .await
        }
    };

    // POST /deliveries: a customer for themselves, an admin for anyone, a courier never.
    running
        .create_delivery(&admin, None)
        .await
        .assert_error(400, "missing_field");
    let created = running.create_delivery(&admin, Some(c1)).await;
    assert_eq!(created.status, 201, "{created:?}");
    assert_eq!(created.body["status"], "created");
    assert_eq!(created.body["customer_id"], json!(c1));
    let d1 = id_of(&created);
    assert_eq!(
        created.headers.get("location").unwrap(),
        &format!("/deliveries/{d1}")
    );
    let d2_answer = running.create_delivery(&customer2, None).await;
    assert_eq!(
        (d2_answer.status, &d2_answer.body["customer_id"]),
        (201, &json!(c2))
    );
    let d2 = id_of(&d2_answer);
    running
        .create_delivery(&customer1, Some(c2))
        .await
        .assert_error(403, "forbidden");
    let d3_answer = running.create_delivery(&customer1, Some(c1)).await;
    assert_eq!(d3_answer.status, 201, "{d3_answer:?}");
    let d3 = id_of(&d3_answer);

    // Status: someone else's delivery is a 404 for a customer; a customer only cancels.
    put_status(customer1.clone(), d2, json!({"status": "cancelled"}))
        .await
        .assert_error(404, "not_found");
    put_status(
        customer1.clone(),
        d1,
        json!({"status": "assigned", "courier_id": k1}),
    )
    .await
    .assert_error(403, "forbidden");
    // A courier acts only on what is assigned to them, and never assigns or cancels.
    put_status(courier1.clone(), d1, json!({"status": "picked_up"}))
        .await
        .assert_error(403, "forbidden");
    let assigned = put_status(
        admin.clone(),
        d1,
        json!({"status": "assigned", "courier_id": k1}),
    )
    .await;
    assert_eq!(assigned.status, 200, "{assigned:?}");
    assert_eq!(
        (&assigned.body["status"], &assigned.body["courier_id"]),
        (&json!("assigned"), &json!(k1))
    );
    put_status(courier2.clone(), d1, json!({"status": "picked_up"}))
        .await
        .assert_error(403, "forbidden");
    put_status(
        courier1.clone(),
        d1,
        json!({"status": "assigned", "courier_id": k1}),
    )
    .await
    .assert_error(403, "forbidden");
    put_status(courier1.clone(), d1, json!({"status": "cancelled"}))
        .await
        .assert_error(403, "forbidden");
    put_status(courier1.clone(), d1, json!({"status": "delivered"}))
        .await
        .assert_error(409, "illegal_transition");
    put_status(
        courier1.clone(),
        Uuid::new_v4(),
        json!({"status": "picked_up"}),
    )
    .await
    .assert_error(404, "not_found");
    let picked = put_status(courier1.clone(), d1, json!({"status": "picked_up"})).await;
    assert_eq!(
        (picked.status, &picked.body["status"]),
        (200, &json!("picked_up"))
    );

    // Rating: only once delivered (or failed), by its customer or an admin.
    let rate = |token: String, delivery: Uuid, body: Value| {
        let running = &running;
        async move {
            running
                .call(
                    Method::POST,
                    &format!("/deliveries/{delivery}/rating"),
                    Some(&token),
                    Some(body),
                )
                .await
        }
    };
    rate(customer1.clone(), d1, json!({"score": 5}))
        .await
        .assert_error(409, "not_rateable");
    for step in ["in_transit", "delivered"] {
        let moved = put_status(courier1.clone(), d1, json!({"status": step})).await;
        assert_eq!(
            (moved.status, &moved.body["status"]),
            (200, &json!(step)),
            "{moved:?}"
        );
    }
    rate(courier1.clone(), d1, json!({"score": 5}))
        .await
        .assert_error(403, "forbidden");
    rate(customer2.clone(), d1, json!({"score": 1}))
        .await
        .assert_error(404, "not_found");
    let rated = rate(
        customer1.clone(),
        d1,
        json!({"score": 5, "comment": "quick"}),
    )
    .await;
    assert_eq!(rated.status, 201, "{rated:?}");
    assert_eq!(rated.body["rating"]["score"], 5);
    assert_eq!(rated.body["rating"]["comment"], "quick");
    let rerated = rate(admin.clone(), d1, json!({"score": 4})).await;
    assert_eq!(
        (rerated.status, &rerated.body["rating"]["score"]),
        (201, &json!(4))
    );
    rate(admin.clone(), d2, json!({"score": 4}))
        .await
        .assert_error(409, "not_rateable");

    // A customer cancels their own delivery, once.
    let cancelled = put_status(customer1.clone(), d3, json!({"status": "cancelled"})).await;
    assert_eq!(
        (cancelled.status, &cancelled.body["status"]),
        (200, &json!("cancelled"))
    );
    put_status(customer1.clone(), d3, json!({"status": "cancelled"}))
        .await
        .assert_error(409, "illegal_transition");
    // An admin may do any legal step on anyone's delivery.
    let by_admin = put_status(admin.clone(), d2, json!({"status": "cancelled"})).await;
    assert_eq!(
        (by_admin.status, &by_admin.body["status"]),
        (200, &json!("cancelled"))
    );

    // Locations: a courier reports their own; an admin names the courier; a customer never.
    let fix = running
        .call(
            Method::POST,
            "/locations",
            Some(&courier1),
            Some(json!({"lat": 52.51, "lon": 13.41, "speed_mps": 4.5, "heading_deg": 90, "accuracy_m": 5})),
        )
        .await;
    assert_eq!(fix.status, 201, "{fix:?}");
    assert_eq!(fix.body["id"], json!(k1));
    assert!((fix.body["position"]["lat"].as_f64().unwrap() - 52.51).abs() < 1e-6);
    assert_eq!(fix.body["speed_mps"], 4.5);
    assert_eq!(
        fix.headers.get("location").unwrap(),
        &format!("/api/couriers/{k1}")
    );
    running
        .call(
            Method::POST,
            "/locations",
            Some(&courier1),
            Some(json!({"lat": 52.51, "lon": 13.41, "courier_id": k2})),
        )
        .await
        .assert_error(403, "forbidden");
    running
        .call(
            Method::POST,
            "/locations",
            Some(&admin),
            Some(json!({"lat": 52.51, "lon": 13.41})),
        )
        .await
        .assert_error(400, "missing_field");
    let relayed = running
        .call(
            Method::POST,
            "/locations",
            Some(&admin),
            Some(json!({"lat": 52.49, "lon": 13.39, "courier_id": k2})),
        )
        .await;
    assert_eq!(
        (relayed.status, &relayed.body["id"]),
        (201, &json!(k2)),
        "{relayed:?}"
    );

    // Zones: an admin's.
    let zone = Uuid::new_v4();
    let made = running
        .call(
            Method::PUT,
            &format!("/zones/{zone}"),
            Some(&admin),
            Some(square("Mitte")),
        )
        .await;
    assert_eq!(
        (made.status, &made.body["name"]),
        (201, &json!("Mitte")),
        "{made:?}"
    );
    assert_eq!(made.body["dwell_ms"], 30_000);
    let renamed = running
        .call(
            Method::PUT,
            &format!("/zones/{zone}"),
            Some(&admin),
            Some(square("Mitte Nord")),
        )
        .await;
    assert_eq!(
        (renamed.status, &renamed.body["name"]),
        (200, &json!("Mitte Nord"))
    );
    let deleted = running
        .call(
            Method::DELETE,
            &format!("/zones/{zone}"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(deleted.status, 204, "{deleted:?}");
    running
        .call(
            Method::DELETE,
            &format!("/zones/{zone}"),
            Some(&admin),
            None,
        )
        .await
        .assert_error(404, "not_found");

    // Everything above is what the pipeline holds now.
    let snapshot = running.call(Method::GET, "/api/snapshot", None, None).await;
    assert_eq!(snapshot.body["counts"]["deliveries"], 3);
    assert_eq!(snapshot.body["counts"]["couriers"], 2);
    assert_eq!(snapshot.body["counts"]["zones"], 0);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_4xx_with_a_stable_code_never_a_500() {
    let rabbit = unique_config("api-input");
    let _cleanup = TopologyGuard::new(&rabbit);
    let running = Running::start(run_config(rabbit)).await;
    let admin = token(Role::Admin, Uuid::new_v4());
    let courier = Uuid::new_v4();
    let courier_token = token(Role::Courier, courier);
    let created = running.create_delivery(&admin, Some(Uuid::new_v4())).await;
    assert_eq!(created.status, 201, "{created:?}");
    let delivery = id_of(&created);
    let zone = Uuid::new_v4();
    let status_path = format!("/deliveries/{delivery}/status");
    let rating_path = format!("/deliveries/{delivery}/rating");
    let zone_path = format!("/zones/{zone}");
    // Beyond the contract's allowed clock skew (minutes).
    let future = "2999-01-01T00:00:00Z";
    let bowtie =
        json!({"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]]});

    // (token, method, path, body, status, code)
    let cases: Vec<(&str, Method, &str, Value, u16, &str)> = vec![
        (
            &admin,
            Method::POST,
            "/deliveries",
            json!({"pickup": {"lat": 52.5, "lon": 13.4}, "dropoff": {"lat": 52.5, "lon": 13.4}, "customer_id": Uuid::new_v4(), "colour": "red"}),
            400,
            "unknown_field",
        ),
        (
            &admin,
            Method::POST,
            "/deliveries",
            json!({"pickup": {"lat": 52.5, "lon": 13.4, "alt": 30}, "dropoff": {"lat": 52.5, "lon": 13.4}, "customer_id": Uuid::new_v4()}),
            400,
            "unknown_field",
        ),
        (
            &admin,
            Method::POST,
            "/deliveries",
            json!({"pickup": {"lat": 52.5, "lon": 13.4}, "customer_id": Uuid::new_v4()}),
            400,
            "malformed_json",
        ),
        (
            &admin,
            Method::POST,
            "/deliveries",
            json!({"pickup": {"lat": "52.5", "lon": 13.4}, "dropoff": {"lat": 52.5, "lon": 13.4}, "customer_id": Uuid::new_v4()}),
            400,
            "malformed_json",
        ),
        (
            &admin,
            Method::POST,
            "/deliveries",
            json!({"pickup": {"lat": 91.0, "lon": 13.4}, "dropoff": {"lat": 52.5, "lon": 13.4}, "customer_id": Uuid::new_v4()}),
            400,
            "invalid_coordinates",
        ),
        (
            &admin,
            Method::POST,
            "/deliveries",
            json!({"pickup": {"lat": 52.5, "lon": 13.4}, "dropoff": {"lat": 52.5, "lon": -181.0}, "customer_id": Uuid::new_v4()}),
            400,
            "invalid_coordinates",
        ),
        (
            &admin,
            Method::POST,
            "/deliveries",
            json!({"pickup": {"lat": 52.5, "lon": 13.4}, "dropoff": {"lat": 52.5, "lon": 13.4}, "customer_id": "not-a-uuid"}),
            400,
            "invalid_value",
        ),
        (
            &admin,
            Method::POST,
            "/deliveries",
            json!({"pickup": {"lat": 52.5, "lon": 13.4}, "dropoff": {"lat": 52.5, "lon": 13.4}, "customer_id": Uuid::new_v4(), "promised_by": "tomorrow"}),
            400,
            "invalid_value",
        ),
        (
            &admin,
            Method::PUT,
            &status_path,
            json!({"status": "lost"}),
            400,
            "invalid_status",
        ),
        (
            &admin,
            Method::PUT,
            &status_path,
            json!({"status": "created"}),
            400,
            "invalid_status",
        ),
        (
            &admin,
            Method::PUT,
            &status_path,
            json!({"status": 3}),
            400,
            "malformed_json",
        ),
        (
            &admin,
            Method::PUT,
            &status_path,
            json!({"status": "picked_up", "courier_id": courier}),
            400,
            "courier_not_allowed",
        ),
        (
            &admin,
            Method::PUT,
            &status_path,
            json!({"status": "assigned"}),
            400,
            "courier_required",
        ),
        (
            &admin,
            Method::PUT,
            &status_path,
            json!({"status": "assigned", "courier_id": "nope"}),
            400,
            "invalid_value",
        ),
        (
            &admin,
            Method::PUT,
            &status_path,
            json!({"status": "delivered"}),
            409,
            "illegal_transition",
        ),
        (
            &admin,
            Method::PUT,
            "/deliveries/not-a-uuid/status",
            json!({"status": "cancelled"}),
            400,
            "invalid_id",
        ),
        (
            &admin,
            Method::POST,
            "/deliveries/42/rating",
            json!({"score": 5}),
            400,
            "invalid_id",
        ),
        (
            &admin,
            Method::POST,
            &rating_path,
            json!({"score": 6}),
            400,
            "invalid_score",
        ),
        (
            &admin,
            Method::POST,
            &rating_path,
            json!({"score": 4.5}),
            400,
            "invalid_value",
        ),
        (
            &admin,
            Method::POST,
            &rating_path,
            json!({"score": "five"}),
            400,
            "malformed_json",
        ),
        (
            &admin,
            Method::POST,
            &rating_path,
            json!({"score": 5, "comment": "x".repeat(2_001)}),
            400,
            "string_too_long",
        ),
        (
            &admin,
            Method::POST,
            &rating_path,
            json!({"score": 5, "stars": 5}),
            400,
            "unknown_field",
        ),
        (
            &admin,
            Method::POST,
            &rating_path,
            json!({"score": 5}),
            409,
            "not_rateable",
        ),
        (
            &courier_token,
            Method::POST,
            "/locations",
            json!({"lat": 100.0, "lon": 13.4}),
            400,
            "invalid_coordinates",
        ),
        (
            &courier_token,
            Method::POST,
            "/locations",
            json!({"lat": 52.0, "lon": 13.4, "speed_mps": 1000}),
            400,
            "value_out_of_range",
        ),
        (
            &courier_token,
            Method::POST,
            "/locations",
            json!({"lat": 52.0, "lon": 13.4, "heading_deg": 360}),
            400,
            "value_out_of_range",
        ),
        (
            &courier_token,
            Method::POST,
            "/locations",
            json!({"lat": 52.0, "lon": 13.4, "occurred_at": future}),
            400,
            "timestamp_in_future",
        ),
        (
            &courier_token,
            Method::POST,
            "/locations",
            json!({"lat": 52.0, "lon": 13.4, "altitude": 3}),
            400,
            "unknown_field",
        ),
        (
            &admin,
            Method::PUT,
            &zone_path,
            json!({"name": "bowtie", "geometry": bowtie}),
            400,
            "invalid_geometry",
        ),
        (
            &admin,
            Method::PUT,
            &zone_path,
            json!({"name": "a point", "geometry": {"type": "Point", "coordinates": [13.4, 52.5]}}),
            400,
            "invalid_geometry",
        ),
        (
            &admin,
            Method::PUT,
            &zone_path,
            json!({"name": "x".repeat(201), "geometry": square("a")["geometry"]}),
            400,
            "string_too_long",
        ),
        (
            &admin,
            Method::PUT,
            &zone_path,
            json!({"name": "negative", "geometry": square("a")["geometry"], "dwell_seconds": -1}),
            400,
            "value_out_of_range",
        ),
        (
            &admin,
            Method::PUT,
            "/zones/zone-1",
            square("a"),
            400,
            "invalid_id",
        ),
        (
            &admin,
            Method::DELETE,
            "/zones/zone-1",
            Value::Null,
            400,
            "invalid_id",
        ),
    ];
    for (token, method, path, body, status, code) in cases {
        let body = (!body.is_null()).then_some(body);
        let answer = running
            .call(method.clone(), path, Some(token), body.clone())
            .await;
        assert_eq!(
            (answer.status, answer.code()),
            (status, Some(code)),
            "{method} {path} {body:?}: {answer:?}"
        );
        assert!(answer.body["error"]["message"].is_string());
    }

    // Bodies that are not JSON objects of the right type, too large, or not JSON at all.
    let json = [
        ("authorization", format!("Bearer {admin}")),
        ("content-type", "application/json".into()),
    ];
    let json: Vec<(&str, &str)> = json.iter().map(|(n, v)| (*n, v.as_str())).collect();
    for (bytes, status, code) in [
        (b"{\"pickup\": ".to_vec(), 400, "malformed_json"),
        (b"[1, 2]".to_vec(), 400, "malformed_json"),
        (b"".to_vec(), 400, "malformed_json"),
        (b"\xff\xfe".to_vec(), 400, "malformed_json"),
    ] {
        running
            .raw(Method::POST, "/deliveries", &json, bytes)
            .await
            .assert_error(status, code);
    }
    let huge = serde_json::to_vec(&json!({"score": 5, "comment": "x".repeat(70 * 1024)})).unwrap();
    running
        .raw(Method::POST, &rating_path, &json, huge)
        .await
        .assert_error(413, "payload_too_large");
    let text = [
        ("authorization", format!("Bearer {admin}")),
        ("content-type", "text/plain".into()),
    ];
    let text: Vec<(&str, &str)> = text.iter().map(|(n, v)| (*n, v.as_str())).collect();
    running
        .raw(
            Method::POST,
            "/deliveries",
            &text,
            serde_json::to_vec(&new_delivery(None)).unwrap(),
        )
        .await
        .assert_error(415, "unsupported_media_type");

    // None of it reached the pipeline: the one delivery is untouched.
    let unchanged = running
        .call(
            Method::GET,
            &format!("/api/deliveries/{delivery}"),
            None,
            None,
        )
        .await;
    assert_eq!(
        (
            unchanged.status,
            &unchanged.body["status"],
            &unchanged.body["version"]
        ),
        (200, &json!("created"), &json!(1))
    );
    assert_eq!(
        running
            .call(Method::GET, "/api/snapshot", None, None)
            .await
            .body["counts"]["couriers"],
        0
    );
    running.stop().await;
}

/// What the stores cannot hold is refused before it is published: a rating comment or a
/// zone name with a NUL, a lone surrogate escape in a body, a fix from year 1, a promise a
/// month away — each a `400` with the contract's code. And a delivery takes five ratings:
/// the sixth is published, refused by the pipeline and answered `409 too_many_ratings`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_the_stores_cannot_hold_is_a_400_and_a_sixth_rating_a_409() {
    let rabbit = unique_config("api-contract");
    let _cleanup = TopologyGuard::new(&rabbit);
    // Events up to an hour old (`--max-event-age-secs 3600`): the API decodes with the
    // pipeline's limits.
    let mut config = run_config(rabbit);
    config.pipeline.api.contract =
        delivertrack_dataflow::contract::ContractLimits::with_max_event_age_ms(3_600_000);
    let running = Running::start(config).await;
    let admin = token(Role::Admin, Uuid::new_v4());
    let customer = Uuid::new_v4();
    let customer_token = token(Role::Customer, customer);
    let courier = Uuid::new_v4();

    let created = running.create_delivery(&customer_token, None).await;
    assert_eq!(created.status, 201, "{created:?}");
    let delivery = id_of(&created);
    for step in [
        json!({"status": "assigned", "courier_id": courier}),
        json!({"status": "picked_up"}),
        json!({"status": "in_transit"}),
        json!({"status": "delivered"}),
    ] {
        let answer = running.set_status(&admin, delivery, step.clone()).await;
        assert_eq!(answer.status, 200, "{step}: {answer:?}");
    }
    let rating_path = format!("/deliveries/{delivery}/rating");
    let rate = |body: Value| {
        running.call(
            Method::POST,
            &rating_path,
            Some(&customer_token),
            Some(body),
        )
    };

    // A NUL in a rating's comment and in a zone's name.
    let answer = rate(json!({"score": 5, "comment": "a\u{0}b"})).await;
    answer.assert_error(400, "control_character");
    assert!(
        answer.body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("comment")),
        "{answer:?}"
    );
    let zone_path = format!("/zones/{}", Uuid::new_v4());
    running
        .call(
            Method::PUT,
            &zone_path,
            Some(&admin),
            Some(square("Mi\u{0}tte")),
        )
        .await
        .assert_error(400, "control_character");
    // Line breaks are fine in a comment, not in a name.
    running
        .call(
            Method::PUT,
            &zone_path,
            Some(&admin),
            Some(square("Mitte\nOst")),
        )
        .await
        .assert_error(400, "control_character");

    // A lone surrogate escape: not JSON a Rust string can hold; named, with its own code.
    let json_headers = [
        ("authorization", format!("Bearer {customer_token}")),
        ("content-type", "application/json".into()),
    ];
    let json_headers: Vec<(&str, &str)> =
        json_headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let answer = running
        .raw(
            Method::POST,
            &rating_path,
            &json_headers,
            br#"{"score": 5, "comment": "a\ud800b"}"#.to_vec(),
        )
        .await;
    answer.assert_error(400, "invalid_unicode");
    assert!(
        answer.body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("comment")),
        "{answer:?}"
    );

    // Timestamps bounded in the past as in the future.
    running
        .call(
            Method::POST,
            "/locations",
            Some(&admin),
            Some(json!({"courier_id": courier, "lat": 52.5, "lon": 13.4,
                "occurred_at": "0001-01-01T00:00:00Z"})),
        )
        .await
        .assert_error(400, "timestamp_too_old");
    let two_hours_ago = humantime::format_rfc3339_seconds(
        std::time::SystemTime::now() - Duration::from_secs(2 * 3_600),
    )
    .to_string();
    running
        .call(
            Method::POST,
            "/locations",
            Some(&admin),
            Some(json!({"courier_id": courier, "lat": 52.5, "lon": 13.4,
                "occurred_at": two_hours_ago})),
        )
        .await
        .assert_error(400, "timestamp_too_old");
    let mut far_promise = new_delivery(None);
    far_promise["promised_by"] = json!(
        humantime::format_rfc3339_seconds(
            std::time::SystemTime::now() + Duration::from_secs(30 * 86_400)
        )
        .to_string()
    );
    running
        .call(
            Method::POST,
            "/deliveries",
            Some(&customer_token),
            Some(far_promise),
        )
        .await
        .assert_error(400, "timestamp_in_future");

    // Five ratings are taken, each replacing the one before; the sixth is refused.
    for score in 1..=5 {
        let answer = rate(json!({"score": score, "comment": "Line one,\nline two"})).await;
        assert_eq!(answer.status, 201, "rating {score}: {answer:?}");
        assert_eq!(answer.body["rating"]["score"], score, "{answer:?}");
    }
    let answer = rate(json!({"score": 1})).await;
    answer.assert_error(409, "too_many_ratings");
    let delivery_now = running
        .call(
            Method::GET,
            &format!("/deliveries/{delivery}"),
            Some(&customer_token),
            None,
        )
        .await;
    assert_eq!(
        delivery_now.body["rating"]["score"], 5,
        "the refused rating changed nothing: {delivery_now:?}"
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_is_readable_at_once_and_a_status_change_travels_through_rabbitmq() {
    const DELIVERIES: usize = 20;
    let rabbit = unique_config("api-ryw");
    let _cleanup = TopologyGuard::new(&rabbit);
    let running = Running::start(run_config(rabbit)).await;
    let admin = token(Role::Admin, Uuid::new_v4());
    let courier = Uuid::new_v4();
    let mut latencies = Vec::new();
    for _ in 0..DELIVERIES {
        // A customer of its own each: delivery creation is limited per customer.
        let customer = Uuid::new_v4();
        let customer_token = token(Role::Customer, customer);
        let started = Instant::now();
        let created = running.create_delivery(&customer_token, None).await;
        latencies.push(started.elapsed());
        assert_eq!(created.status, 201, "{created:?}");
        assert_eq!(created.body["status"], "created");
        let id = id_of(&created);
        assert_eq!(created.body["delivery_id"], json!(id));
        // Read-your-writes: the very next GET has it, on both read routes.
        let read = running
            .call(Method::GET, &format!("/api/deliveries/{id}"), None, None)
            .await;
        assert_eq!(read.status, 200, "{read:?}");
        assert_eq!(read.body["status"], "created");
        assert_eq!(read.body["customer_id"], json!(customer));
        let own = running
            .call(
                Method::GET,
                &format!("/deliveries/{id}"),
                Some(&customer_token),
                None,
            )
            .await;
        assert_eq!(
            (own.status, &own.body["delivery_id"]),
            (200, &json!(id)),
            "{own:?}"
        );

        let assigned = running
            .set_status(
                &admin,
                id,
                json!({"status": "assigned", "courier_id": courier}),
            )
            .await;
        assert_eq!(assigned.status, 200, "{assigned:?}");
        let read = running
            .call(Method::GET, &format!("/api/deliveries/{id}"), None, None)
            .await;
        assert_eq!(
            (
                &read.body["status"],
                &read.body["courier_id"],
                &read.body["version"]
            ),
            (&json!("assigned"), &json!(courier), &json!(2))
        );
    }
    // The events came back through the broker: the source decoded them.
    let metrics = running.metrics().await;
    for (kind, count) in [
        ("delivery.created", DELIVERIES),
        ("status.changed", DELIVERIES),
    ] {
        let line = format!("delivertrack_events_ingested_total{{kind=\"{kind}\"}} {count}");
        assert!(metrics.contains(&line), "no {line:?} in\n{metrics}");
    }
    latencies.sort();
    eprintln!(
        "POST /deliveries (publish, confirm, pipeline applied, answer), {DELIVERIES} sequential: p50 {:?}, max {:?}",
        latencies[DELIVERIES / 2],
        latencies[DELIVERIES - 1]
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_cannot_confirm_is_a_503_and_commands_resume_after_it() {
    let rabbit = unique_config("api-outage");
    let _cleanup = TopologyGuard::new(&rabbit);
    let proxy = TcpProxy::start(broker_addr(&rabbit.url).await.unwrap())
        .await
        .unwrap();
    let via_proxy = RabbitConfig {
        url: url_via(&rabbit.url, proxy.addr()),
        ..rabbit.clone()
    };
    let running = Running::start(run_config(via_proxy)).await;
    let admin = token(Role::Admin, Uuid::new_v4());
    let create = || running.create_delivery(&admin, Some(Uuid::new_v4()));
    assert_eq!(create().await.status, 201);

    proxy.cut();
    for _ in 0..3 {
        create().await.assert_error(503, "commands_unavailable");
    }
    proxy.restore();
    // Once the broker is reachable again (the publisher's backoff is at most 5 s), commands
    // are taken again and applied.
    let deadline = Instant::now() + PATIENCE;
    let created = loop {
        let answer = create().await;
        if answer.status == 201 {
            break answer;
        }
        answer.assert_error(503, "commands_unavailable");
        assert!(
            Instant::now() < deadline,
            "commands never resumed: {answer:?}"
        );
        sleep(Duration::from_millis(200)).await;
    };
    let id = id_of(&created);
    let read = running
        .call(Method::GET, &format!("/api/deliveries/{id}"), None, None)
        .await;
    assert_eq!(read.status, 200);
    running.stop().await;
}

// ---------------------------------------------------------------------------------------
// With the stores
// ---------------------------------------------------------------------------------------

/// The server's maintenance database, where the test's database is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_reach_postgres_and_redis_through_the_pipeline() {
    let rabbit = unique_config("api-stores");
    let _cleanup = TopologyGuard::new(&rabbit);
    let database = Database::new("api_commands");
    let prefix = format!("dt-test-{}:", Uuid::new_v4().simple());
    let host = std::env::var("REDIS_HOST").unwrap_or_else(|_| "127.0.0.1".to_owned());
    let port = std::env::var("REDIS_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(6379);
    let config = RunConfig {
        stores: StoresConfig {
            postgres: Some(PostgresConfig::from_url(database.url())),
            redis: Some(RedisConfig {
                key_prefix: prefix.clone(),
                ..RedisConfig::new(host, port)
            }),
            ..StoresConfig::default()
        },
        ..run_config(rabbit)
    };
    let running = Running::start(config).await;
    let customer = Uuid::new_v4();
    let customer_token = token(Role::Customer, customer);
    let courier = Uuid::new_v4();
    let created = running.create_delivery(&customer_token, None).await;
    assert_eq!(created.status, 201, "{created:?}");
    let id = id_of(&created);
    let cancelled = running
        .set_status(&customer_token, id, json!({"status": "cancelled"}))
        .await;
    assert_eq!(cancelled.status, 200, "{cancelled:?}");
    let fix = running
        .call(
            Method::POST,
            "/locations",
            Some(&token(Role::Courier, courier)),
            Some(json!({"lat": 52.51, "lon": 13.41})),
        )
        .await;
    assert_eq!(fix.status, 201, "{fix:?}");

    // The sinks commit an epoch in parallel: the read model may show it a moment before
    // the stores do. Both must hold the commands' events soon after.
    let pool = sqlx::PgPool::connect(&database.url()).await.unwrap();
    let ids: Vec<Uuid> = [&created, &cancelled, &fix]
        .iter()
        .map(|a| Uuid::parse_str(a.body["event_id"].as_str().unwrap()).unwrap())
        .collect();
    let expected = vec![
        (ids[0], "delivery.created".to_owned()),
        (ids[1], "status.changed".to_owned()),
        (ids[2], "location.updated".to_owned()),
    ];
    let deadline = Instant::now() + PATIENCE;
    loop {
        let rows: Vec<(Uuid, String)> = sqlx::query_as(
            "SELECT event_id, kind FROM event_log WHERE event_id = ANY($1) ORDER BY occurred_at",
        )
        .bind(&ids)
        .fetch_all(&pool)
        .await
        .unwrap();
        let status: Option<(String,)> =
            sqlx::query_as("SELECT status FROM deliveries WHERE id = $1")
                .bind(id)
                .fetch_optional(&pool)
                .await
                .unwrap();
        if rows == expected && status.as_ref().is_some_and(|(s,)| s == "cancelled") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "PostgreSQL never held the commands: {rows:?}, status {status:?}"
        );
        sleep(Duration::from_millis(50)).await;
    }
    pool.close().await;

    let mut redis = redis().await;
    loop {
        let cached: Option<String> = redis::cmd("GET")
            .arg(format!("{prefix}delivery:{id}"))
            .query_async(&mut redis)
            .await
            .unwrap();
        let status = cached
            .as_deref()
            .and_then(|c| serde_json::from_str::<Value>(c).ok())
            .map(|c| c["status"].clone());
        let location: Option<String> = redis::cmd("GET")
            .arg(format!("{prefix}courier:{courier}:location"))
            .query_async(&mut redis)
            .await
            .unwrap();
        if status == Some(json!("cancelled")) && location.is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Redis never held the commands: delivery {status:?}, location {location:?}"
        );
        sleep(Duration::from_millis(50)).await;
    }

    running.stop().await;
    delete_keys(&prefix).await;
    database.drop_now().await;
}

// ---------------------------------------------------------------------------------------
// The demo and the binary
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_takes_commands_through_its_in_process_channel() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let config = DemoConfig {
        pipeline: PipelineConfig {
            epoch_max_wait: Duration::from_millis(50),
            ..PipelineConfig::default()
        },
        couriers: 5,
        zones: 2,
        deliveries_per_minute: 1.0,
        tick: Duration::from_millis(100),
        auth: Some(auth_config()),
        ..DemoConfig::default()
    };
    let demo = tokio::spawn(run_demo_on(listener, config, async {
        let _ = stop_rx.await;
    }));
    let http = reqwest::Client::new();
    let customer = Uuid::new_v4();
    let response = http
        .post(format!("http://{addr}/deliveries"))
        .bearer_auth(token(Role::Customer, customer))
        .json(&new_delivery(None))
        .send()
        .await
        .unwrap();
    let created = answer(response).await;
    assert_eq!(created.status, 201, "{created:?}");
    let id = id_of(&created);
    let read = answer(
        http.get(format!("http://{addr}/api/deliveries/{id}"))
            .bearer_auth(token(Role::Admin, Uuid::new_v4()))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (read.status, &read.body["customer_id"]),
        (200, &json!(customer))
    );
    let _ = stop_tx.send(());
    timeout(PATIENCE, demo).await.unwrap().unwrap().unwrap();
}

/// Runs the binary with `args` and `JWT_SECRET` = `secret` (unset when `None`); returns
/// the exit success, stdout and stderr.
async fn binary(args: &[&str], secret: Option<&str>) -> (bool, String, String) {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_delivertrack"));
    command
        .args(args)
        .env_remove("JWT_SECRET")
        .kill_on_drop(true);
    if let Some(secret) = secret {
        command.env("JWT_SECRET", secret);
    }
    let output = timeout(PATIENCE, command.output())
        .await
        .expect("the binary ends in time")
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_command_prints_a_token_run_accepts() {
    let sub = Uuid::new_v4();
    let (ok, stdout, stderr) = binary(
        &["token", "--role", "courier", "--sub", &sub.to_string()],
        Some(SECRET),
    )
    .await;
    assert!(ok, "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "the token alone on stdout: {stdout:?}");
    let principal = authenticator().verify(lines[0]).unwrap();
    assert_eq!((principal.sub, principal.role), (sub, Role::Courier));

    // The lifetime is JWT_EXPIRY's.
    let (ok, stdout, _) = binary(
        &[
            "token",
            "--role",
            "admin",
            "--sub",
            &sub.to_string(),
            "--jwt-expiry-secs",
            "1",
        ],
        Some(SECRET),
    )
    .await;
    assert!(ok);
    sleep(Duration::from_millis(2_100)).await;
    assert!(
        authenticator().verify(stdout.trim()).is_err(),
        "expired after 1 s"
    );

    // No secret, the sample secret, a bad role, a bad subject: refused, nothing on stdout.
    for (args, secret, needle) in [
        (
            vec!["token", "--role", "admin", "--sub", HAND_MADE_SUB],
            None,
            "JWT_SECRET",
        ),
        (
            vec!["token", "--role", "admin", "--sub", HAND_MADE_SUB],
            Some("change-me"),
            "JWT_SECRET",
        ),
        (
            vec!["token", "--role", "root", "--sub", HAND_MADE_SUB],
            Some(SECRET),
            "root",
        ),
        (
            vec!["token", "--role", "admin", "--sub", "42"],
            Some(SECRET),
            "42",
        ),
    ] {
        let (ok, stdout, stderr) = binary(&args, secret).await;
        assert!(!ok && stdout.is_empty(), "{args:?}: {stdout:?}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    let (ok, stdout, _) = binary(
        &[
            "token",
            "--role",
            "admin",
            "--sub",
            HAND_MADE_SUB,
            "--insecure-dev-secret",
        ],
        Some("change-me"),
    )
    .await;
    assert!(ok && stdout.lines().count() == 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_refuses_an_empty_or_sample_secret_unless_told_otherwise() {
    let rabbit = unique_config("api-secret");
    let _cleanup = TopologyGuard::new(&rabbit);
    let base = [
        "run",
        "--listen",
        "127.0.0.1:0",
        "--exchange",
        &rabbit.exchange,
        "--queue",
        &rabbit.queue,
        "--dead-letter-exchange",
        &rabbit.dead_letter_exchange,
        "--dead-letter-queue",
        &rabbit.dead_letter_queue,
        "--no-postgres",
        "--no-redis",
        "--no-mongo",
        "--no-derived",
    ];
    for secret in [None, Some(""), Some("change-me")] {
        let (ok, _, stderr) = binary(&base, secret).await;
        assert!(!ok, "{secret:?} must be refused");
        assert!(stderr.contains("JWT_SECRET"), "{secret:?}: {stderr}");
    }

    // With --insecure-dev-secret the sample secret starts: the banner comes, then SIGTERM.
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_delivertrack"))
        .args(base)
        .arg("--insecure-dev-secret")
        .env("JWT_SECRET", "change-me")
        .env("RABBITMQ_URL", &rabbit.url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let banner = timeout(PATIENCE, stdout.next_line())
        .await
        .expect("the banner within the bound")
        .unwrap()
        .expect("a banner line");
    assert!(banner.contains("http://"), "{banner}");
    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("sh")
        .args(["-c", &format!("kill -TERM {pid}")])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = timeout(PATIENCE, child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "{status:?}");
}

// ---------------------------------------------------------------------------------------
// Live tracking and rate limits, end to end
// ---------------------------------------------------------------------------------------

/// The next JSON text message of a WebSocket (pings and pongs skipped), within the bound.
async fn next_json<S>(socket: &mut S) -> Value
where
    S: futures::Stream<
            Item = Result<
                tokio_tungstenite::tungstenite::Message,
                tokio_tungstenite::tungstenite::Error,
            >,
        > + Unpin,
{
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        let message = timeout(PATIENCE, socket.next())
            .await
            .expect("a message within the bound")
            .expect("the socket is open")
            .expect("a well-formed frame");
        match message {
            Message::Text(text) => return serde_json::from_str(&text).unwrap(),
            Message::Close(frame) => panic!("closed: {frame:?}"),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tracker_sees_the_courier_move_and_the_eta_change_after_post_locations() {
    let rabbit = unique_config("api-track");
    let _guard = TopologyGuard::new(&rabbit);
    let running = Running::start(run_config(rabbit)).await;
    let (customer, courier, admin) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let (customer_token, courier_token) = (
        token(Role::Customer, customer),
        token(Role::Courier, courier),
    );
    let admin_token = token(Role::Admin, admin);

    let created = running.create_delivery(&customer_token, None).await;
    assert_eq!(created.status, 201, "{created:?}");
    let delivery = id_of(&created);
    // Ten minutes ago: the move below (1.35 km) is then a courier's pace, not a jump.
    let ten_minutes_ago =
        humantime::format_rfc3339_seconds(std::time::SystemTime::now() - Duration::from_secs(600))
            .to_string();
    let first_fix = running
        .call(
            Method::POST,
            "/locations",
            Some(&courier_token),
            Some(json!({"lat": 52.530, "lon": 13.380, "occurred_at": ten_minutes_ago})),
        )
        .await;
    assert_eq!(first_fix.status, 201, "{first_fix:?}");
    let assigned = running
        .set_status(
            &admin_token,
            delivery,
            json!({"status": "assigned", "courier_id": courier}),
        )
        .await;
    assert_eq!(assigned.status, 200, "{assigned:?}");

    // The customer follows the delivery.
    let (mut socket, _) = tokio_tungstenite::connect_async(format!(
        "ws://{}/ws/track/{delivery}?access_token={customer_token}",
        running.addr
    ))
    .await
    .unwrap();
    let snapshot = next_json(&mut socket).await;
    assert_eq!(snapshot["type"], "snapshot", "{snapshot}");
    let snapshot_epoch = snapshot["epoch"].as_u64().unwrap();

    // The courier reports a position closer to the pickup (the rate limit allows one fix
    // per second per courier), some 45 m on: a plausible step for the time it took.
    sleep(Duration::from_millis(1_100)).await;
    let moved = running
        .call(
            Method::POST,
            "/locations",
            Some(&courier_token),
            Some(json!({"lat": 52.5298, "lon": 13.3806, "speed_mps": 6.0})),
        )
        .await;
    assert_eq!(moved.status, 201, "{moved:?}");

    let (mut seen_move, mut seen_eta) = (None, None);
    while seen_move.is_none() || seen_eta.is_none() {
        let message = next_json(&mut socket).await;
        let epoch = message["epoch"].as_u64().unwrap_or(0);
        match message["type"].as_str() {
            Some("courier_moved") => {
                assert!(epoch > snapshot_epoch, "{message}");
                assert_eq!(message["courier_id"], json!(courier));
                assert!((message["position"]["lat"].as_f64().unwrap() - 52.5298).abs() < 1e-6);
                seen_move = Some(epoch);
            }
            Some("eta") => {
                assert!(epoch > snapshot_epoch, "{message}");
                assert!(message["eta_ms"].as_i64().is_some(), "{message}");
                seen_eta = Some(epoch);
            }
            _ => {}
        }
    }
    assert_eq!(
        seen_move, seen_eta,
        "the move and its ETA arrive in the same epoch"
    );

    // Someone else's delivery cannot be followed.
    let stranger = token(Role::Customer, Uuid::new_v4());
    let refused = tokio_tungstenite::connect_async(format!(
        "ws://{}/ws/track/{delivery}?access_token={stranger}",
        running.addr
    ))
    .await;
    assert!(refused.is_err(), "a stranger's upgrade is refused");
    drop(socket);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_rate_limit_is_a_429_with_retry_after_shared_through_redis() {
    use delivertrack_api::{Quota, RateLimitConfig};
    let rabbit = unique_config("api-limits");
    let _guard = TopologyGuard::new(&rabbit);
    let prefix = format!("dt-test-{}:", Uuid::new_v4().simple());
    let mut config = run_config(rabbit);
    config.stores = StoresConfig {
        redis: Some(RedisConfig {
            key_prefix: prefix.clone(),
            ..RedisConfig::new(
                std::env::var("REDIS_HOST").unwrap_or_else(|_| "127.0.0.1".into()),
                std::env::var("REDIS_PORT")
                    .ok()
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(6379),
            )
        }),
        ..StoresConfig::default()
    };
    config.rate_limits = RateLimitConfig {
        delivery_creation: "2/h".parse::<Quota>().unwrap(),
        api_keys: RateLimitConfig::parse_api_keys("fleet-key=3/min").unwrap(),
        ..RateLimitConfig::default()
    };
    let running = Running::start(config).await;
    let customer = token(Role::Customer, Uuid::new_v4());
    let courier = token(Role::Courier, Uuid::new_v4());

    // Delivery creation: 2 per hour per customer.
    for _ in 0..2 {
        let created = running.create_delivery(&customer, None).await;
        assert_eq!(created.status, 201, "{created:?}");
    }
    let third = running.create_delivery(&customer, None).await;
    third.assert_error(429, "rate_limited");
    let retry: u64 = third.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((60..=1800).contains(&retry), "retry after {retry} s");
    // Another customer is not limited by the first one's use.
    let other = token(Role::Customer, Uuid::new_v4());
    let created = running.create_delivery(&other, None).await;
    assert_eq!(created.status, 201, "{created:?}");

    // Location updates: one per second per courier in the long run, two at once.
    let fix = json!({"lat": 52.51, "lon": 13.41});
    for n in 0..2 {
        let sent = running
            .call(
                Method::POST,
                "/locations",
                Some(&courier),
                Some(fix.clone()),
            )
            .await;
        assert!(
            sent.status == 201 || sent.status == 202,
            "fix {n} of the burst: {sent:?}"
        );
    }
    let third = running
        .call(
            Method::POST,
            "/locations",
            Some(&courier),
            Some(fix.clone()),
        )
        .await;
    third.assert_error(429, "rate_limited");
    assert_eq!(third.headers["retry-after"], "1");

    // API keys: the listed key has 3 a minute; an unlisted key is refused.
    for _ in 0..3 {
        let ok = running
            .raw(
                Method::GET,
                "/healthz",
                &[("x-api-key", "fleet-key")],
                Vec::new(),
            )
            .await;
        assert_eq!(ok.status, 200, "{ok:?}");
    }
    running
        .raw(
            Method::GET,
            "/healthz",
            &[("x-api-key", "fleet-key")],
            Vec::new(),
        )
        .await
        .assert_error(429, "rate_limited");
    running
        .raw(
            Method::GET,
            "/healthz",
            &[("x-api-key", "made-up")],
            Vec::new(),
        )
        .await
        .assert_error(401, "unauthorized");

    // The limits live in Redis, under the deployment's prefix; the refusals are counted.
    let mut redis = redis().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}ratelimit:*"))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(keys.len() >= 3, "{keys:?}");
    let metrics = running.metrics().await;
    for limit in ["delivery_creation", "location_update", "api_key"] {
        assert!(
            metrics.contains(&format!(
                "delivertrack_rate_limited_total{{route=\"{limit}\"}} 1"
            )),
            "{limit}: {metrics}"
        );
    }
    running.stop().await;
    delete_keys(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ratings_are_rate_limited_per_customer() {
    use delivertrack_api::{Quota, RateLimitConfig};
    let rabbit = unique_config("api-rating-limit");
    let _guard = TopologyGuard::new(&rabbit);
    let mut config = run_config(rabbit);
    config.rate_limits = RateLimitConfig {
        rating: "2/h".parse::<Quota>().unwrap(),
        ..RateLimitConfig::default()
    };
    let running = Running::start(config).await;
    let admin = token(Role::Admin, Uuid::new_v4());
    let (customer_id, other_id) = (Uuid::new_v4(), Uuid::new_v4());
    let customer = token(Role::Customer, customer_id);
    let other = token(Role::Customer, other_id);

    // A delivered delivery for each customer.
    let mut delivered = Vec::new();
    for (owner, owner_token) in [(customer_id, &customer), (other_id, &other)] {
        let created = running.create_delivery(owner_token, Some(owner)).await;
        assert_eq!(created.status, 201, "{created:?}");
        let delivery = id_of(&created);
        for step in [
            json!({"status": "assigned", "courier_id": Uuid::new_v4()}),
            json!({"status": "picked_up"}),
            json!({"status": "in_transit"}),
            json!({"status": "delivered"}),
        ] {
            let moved = running.set_status(&admin, delivery, step).await;
            assert_eq!(moved.status, 200, "{moved:?}");
        }
        delivered.push(delivery);
    }
    let rate = |token: String, delivery: Uuid, score: u8| {
        let running = &running;
        async move {
            running
                .call(
                    Method::POST,
                    &format!("/deliveries/{delivery}/rating"),
                    Some(&token),
                    Some(json!({ "score": score })),
                )
                .await
        }
    };

    // Two ratings an hour per customer, re-ratings included; the third is refused ...
    for score in [5, 4] {
        let rated = rate(customer.clone(), delivered[0], score).await;
        assert_eq!(rated.status, 201, "{rated:?}");
    }
    let refused = rate(customer.clone(), delivered[0], 1).await;
    refused.assert_error(429, "rate_limited");
    let retry: u64 = refused.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((60..=1800).contains(&retry), "retry after {retry} s");
    // ... also when an admin rates for them: the bound is the customer's.
    rate(admin.clone(), delivered[0], 1)
        .await
        .assert_error(429, "rate_limited");
    // Another customer is not limited by the first one's ratings.
    let rated = rate(other.clone(), delivered[1], 3).await;
    assert_eq!(rated.status, 201, "{rated:?}");

    let metrics = running.metrics().await;
    assert!(
        metrics.contains("delivertrack_rate_limited_total{route=\"rating\"} 2"),
        "{metrics}"
    );
    running.stop().await;
}
