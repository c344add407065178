//! The document against the router: every route documented, every documented operation
//! served, and every answer — real ones, from the real dataflow and PostgreSQL, and fully
//! populated views — as the document describes it.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use delivertrack_dataflow::{
    CourierId, CustomerId, DeliveryId, EpochReceiver, EpochSender, Event, EventId, EventKind,
    Status, ZoneId,
};
use delivertrack_sinks::ReadModel;
use delivertrack_sinks::read_model::{
    Counts, CourierDetail, CourierView, DeliveryDetails, DeliveryView, EtaView, LatLon,
    MetricSummary, RatingView, ScopeView, ScopedMetrics, Snapshot, ZoneView,
};
use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use uuid::Uuid;

use super::check::{check, check_component};
use super::*;
use crate::commands::settle::{Pending, Written};
use crate::{ApiConfig, EventPublisher, PublishError, Role};

/// Every route the router serves, written out by hand from the modules' `router()`s:
/// `(method, path)` with axum's `{param}` syntax, which is OpenAPI's too.
const ROUTES: &[(&str, &str)] = &[
    ("GET", "/"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/api/snapshot"),
    ("GET", "/api/couriers/{id}"),
    ("GET", "/api/deliveries/{id}"),
    ("GET", "/ws/changes"),
    ("GET", "/ws/track/{delivery_id}"),
    ("POST", "/graphql"),
    ("GET", "/graphql"),
    ("GET", "/graphql/ws"),
    ("GET", "/deliveries"),
    ("POST", "/deliveries"),
    ("GET", "/deliveries/{id}"),
    ("PUT", "/deliveries/{id}/status"),
    ("POST", "/deliveries/{id}/rating"),
    ("POST", "/locations"),
    ("GET", "/zones"),
    ("GET", "/zones/{id}"),
    ("PUT", "/zones/{id}"),
    ("DELETE", "/zones/{id}"),
    ("GET", "/couriers/{id}"),
    ("PUT", "/couriers/{id}"),
    ("GET", "/customers/{id}"),
    ("PUT", "/customers/{id}"),
];

/// The methods an operation can be documented under, as the document spells them.
const METHODS: [&str; 5] = ["get", "post", "put", "delete", "patch"];

fn app() -> Router {
    crate::router(AppState::new(
        ReadModel::default(),
        CancellationToken::new(),
    ))
}

/// The document as `GET /openapi.json` serves it.
async fn served_document() -> Value {
    let response = app()
        .oneshot(Request::get("/openapi.json").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 22)
        .await
        .unwrap();
    serde_json::from_slice(&bytes).expect("the document is JSON")
}

/// `(METHOD, path)` of every documented operation.
fn operations(document: &Value) -> BTreeSet<(String, String)> {
    let mut found = BTreeSet::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for method in METHODS {
            if item.get(method).is_some() {
                found.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    found
}

/// `path` with every `{param}` replaced by a fresh UUID.
fn concrete(path: &str) -> String {
    let mut out = String::new();
    let mut rest = path;
    while let Some(start) = rest.find('{') {
        let end = rest[start..].find('}').unwrap() + start;
        out.push_str(&rest[..start]);
        out.push_str(&Uuid::new_v4().to_string());
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

/// The status and error code (if any) of `method path` on a fresh router.
async fn answer(method: &str, path: &str) -> (u16, Option<String>) {
    let request = Request::builder()
        .method(method)
        .uri(concrete(path))
        .body(Body::empty())
        .unwrap();
    let response = app().oneshot(request).await.unwrap();
    let status = response.status().as_u16();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 22)
        .await
        .unwrap();
    let code = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|body| body["error"]["code"].as_str().map(str::to_owned));
    (status, code)
}

/// Every `$ref` in `value`.
fn refs<'a>(value: &'a Value, found: &mut Vec<&'a str>) {
    match value {
        Value::Object(map) => {
            for (key, inner) in map {
                match (key.as_str(), inner) {
                    ("$ref", Value::String(target)) => found.push(target),
                    _ => refs(inner, found),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|inner| refs(inner, found)),
        _ => {}
    }
}

#[tokio::test]
async fn the_document_is_openapi_3_1_with_the_bearer_scheme() {
    let document = served_document().await;
    let version = document["openapi"].as_str().unwrap();
    assert!(version.starts_with("3.1"), "{version}");
    assert_eq!(
        document["components"]["securitySchemes"][BEARER_JWT],
        serde_json::json!({
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": document["components"]["securitySchemes"][BEARER_JWT]["description"],
        })
    );
    // Operation ids are unique, as OpenAPI requires.
    let mut ids = BTreeSet::new();
    for (method, path) in operations(&document) {
        let operation = &document["paths"][&path][method.to_lowercase()];
        let id = operation["operationId"].as_str().unwrap();
        assert!(ids.insert(id.to_owned()), "{id} twice");
        // Every operation documents at least one success and its error answers refer
        // to the one error shape.
        let responses = operation["responses"].as_object().unwrap();
        assert!(
            responses
                .keys()
                .any(|status| status.starts_with('1') || status.starts_with('2')),
            "{method} {path}"
        );
        for (status, response) in responses {
            if status.starts_with('4') || status.starts_with('5') {
                let schema = &response["content"]["application/json"]["schema"]["$ref"];
                let shared = response["$ref"].as_str().is_some();
                assert!(
                    shared || schema == "#/components/schemas/ErrorBody" || path == "/ws/changes",
                    "{method} {path} {status}: {response}"
                );
            }
        }
    }
    // Every reference resolves.
    let mut found = Vec::new();
    refs(&document, &mut found);
    assert!(!found.is_empty());
    for target in found {
        let pointer = target.strip_prefix('#').unwrap();
        assert!(
            document.pointer(pointer).is_some(),
            "{target} does not resolve"
        );
    }
}

#[tokio::test]
async fn every_route_is_documented_and_nothing_else() {
    let document = served_document().await;
    let routes: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(method, path)| ((*method).to_owned(), (*path).to_owned()))
        .collect();
    let documented = operations(&document);
    let missing: Vec<_> = routes.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&routes).collect();
    assert!(missing.is_empty(), "routes not documented: {missing:?}");
    assert!(extra.is_empty(), "documented, not in ROUTES: {extra:?}");
}

#[tokio::test]
async fn every_documented_operation_is_served_and_no_other_method() {
    let document = served_document().await;
    let documented = operations(&document);
    assert_eq!(documented.len(), ROUTES.len());
    for (method, path) in &documented {
        let (status, code) = answer(method, path).await;
        assert_ne!(status, 405, "{method} {path} is documented but not served");
        assert_ne!(
            code.as_deref(),
            Some("route_not_found"),
            "{method} {path} is documented but not routed"
        );
    }
    // On a documented path, a method the document does not list is not served either.
    for path in document["paths"].as_object().unwrap().keys() {
        for method in METHODS.map(str::to_uppercase) {
            if !documented.contains(&(method.clone(), path.clone())) {
                let (status, code) = answer(&method, path).await;
                assert_eq!(
                    status, 405,
                    "{method} {path} is served ({status} {code:?}) but not documented"
                );
            }
        }
    }
    // The router's fallback still answers what no route serves.
    assert_eq!(
        answer("GET", "/no/such/route").await,
        (404, Some("route_not_found".to_owned()))
    );
}

// ---------------------------------------------------------------------------------------
// The schemas of the views against the views
// ---------------------------------------------------------------------------------------

fn document() -> Value {
    serde_json::to_value(ApiDoc::openapi()).unwrap()
}

fn assert_schema(document: &Value, name: &str, value: impl serde::Serialize) {
    let value = serde_json::to_value(value).unwrap();
    if let Err(error) = check_component(document, name, &value) {
        panic!("{name} does not describe {value}: {error}");
    }
}

fn metrics() -> MetricSummary {
    MetricSummary {
        deliveries: 10,
        active: 2,
        delivered: 6,
        failed: 1,
        cancelled: 1,
        success_rate: Some(0.75),
        mean_delivery_seconds: Some(1_800.5),
        mean_pickup_to_delivery_seconds: Some(900.0),
        on_time_rate: Some(0.5),
        rated: 4,
        mean_rating: Some(4.25),
        rating_histogram: [0, 0, 1, 1, 2],
        distance_km: 12.5,
        active_hours: 3,
        deliveries_per_active_hour: Some(2.0),
    }
}

fn courier_view() -> CourierView {
    CourierView {
        courier_id: CourierId(Uuid::from_u128(1)),
        position: LatLon {
            lat: 52.52,
            lon: 13.40,
        },
        at_ms: 1_796_025_600_000,
        speed_mps: Some(4.5),
        heading_deg: Some(90.0),
        odometer_m: 1234.5,
        active_hours: 2,
        inside: vec![ZoneId(Uuid::from_u128(3))],
    }
}

fn zone_view() -> ZoneView {
    ZoneView {
        zone_id: ZoneId(Uuid::from_u128(3)),
        name: "Mitte".into(),
        dwell_ms: 30_000,
        polygons: vec![vec![vec![
            [13.38, 52.51],
            [13.42, 52.51],
            [13.42, 52.53],
            [13.38, 52.51],
        ]]],
    }
}

fn delivery_view(complete: bool) -> DeliveryView {
    let some = |value: i64| complete.then_some(value);
    DeliveryView {
        details: DeliveryDetails {
            delivery_id: DeliveryId(Uuid::from_u128(2)),
            customer_id: CustomerId(Uuid::from_u128(4)),
            courier_id: complete.then_some(CourierId(Uuid::from_u128(1))),
            status: Status::InTransit,
            pickup: LatLon {
                lat: 52.52,
                lon: 13.41,
            },
            dropoff: LatLon {
                lat: 52.50,
                lon: 13.45,
            },
            promised_by_ms: some(1_796_029_200_000),
            created_at_ms: 1_796_025_600_000,
            assigned_at_ms: some(1_796_025_660_000),
            picked_up_at_ms: some(1_796_025_720_000),
            ended_at_ms: some(1_796_025_780_000),
            rating: complete.then(|| RatingView {
                score: 5,
                comment: Some("quick".into()),
                at_ms: 1_796_025_800_000,
            }),
            version: 4,
            eta: complete.then(|| EtaView {
                courier_id: CourierId(Uuid::from_u128(1)),
                status: Status::InTransit,
                eta_ms: 1_796_026_000_000,
                remaining_m: 1_500,
                speed_mps: 5.0,
                as_of_ms: 1_796_025_700_000,
            }),
        },
        dropoff_zones: vec![ZoneId(Uuid::from_u128(3))],
    }
}

/// Every view of the read model, each `Option` both set and unset and each scope kind,
/// serializes to exactly what its schema in [`schemas`] declares.
#[test]
fn the_view_schemas_describe_the_views() {
    let document = document();
    let scopes = [
        ScopeView::Overall,
        ScopeView::Courier {
            courier_id: CourierId(Uuid::from_u128(1)),
        },
        ScopeView::DropoffZone {
            zone_id: ZoneId(Uuid::from_u128(3)),
        },
        ScopeView::HourOfDay { hour: 23 },
        ScopeView::WeekdayHour {
            weekday: 6,
            hour: 0,
        },
    ];
    let scoped: Vec<ScopedMetrics> = scopes
        .into_iter()
        .map(|scope| ScopedMetrics {
            scope,
            metrics: metrics(),
        })
        .collect();
    let empty = MetricSummary {
        success_rate: None,
        mean_delivery_seconds: None,
        mean_pickup_to_delivery_seconds: None,
        on_time_rate: None,
        mean_rating: None,
        deliveries_per_active_hour: None,
        ..metrics()
    };
    assert_schema(&document, "MetricSummary", empty);
    let detail = CourierDetail {
        courier: courier_view(),
        metrics: Some(metrics()),
        active_deliveries: vec![DeliveryId(Uuid::from_u128(2))],
    };
    assert_schema(&document, "CourierDetail", &detail);
    assert_schema(
        &document,
        "CourierDetail",
        CourierDetail {
            courier: CourierView {
                speed_mps: None,
                heading_deg: None,
                ..courier_view()
            },
            metrics: None,
            active_deliveries: Vec::new(),
        },
    );
    assert_schema(&document, "DeliveryView", delivery_view(true));
    assert_schema(&document, "DeliveryView", delivery_view(false));
    assert_schema(&document, "ZoneView", zone_view());
    let snapshot = Snapshot {
        epoch: Some(7),
        counts: Counts {
            couriers: 1,
            zones: 1,
            deliveries: 1,
            active_deliveries: 1,
            deliveries_by_status: BTreeMap::from([(Status::InTransit, 1)]),
            inside: 1,
            etas: 1,
        },
        overall: metrics(),
        per_courier: scoped.clone(),
        per_zone: scoped.clone(),
        per_hour: scoped.clone(),
        per_weekday_hour: scoped,
        couriers: vec![courier_view()],
        zones: vec![zone_view()],
        rejections: BTreeMap::from([("invalid_coordinates", 2)]),
    };
    assert_schema(&document, "Snapshot", &snapshot);
    assert_schema(
        &document,
        "Snapshot",
        Snapshot {
            epoch: None,
            ..snapshot
        },
    );

    // The write routes' answers.
    let event_id = EventId(Uuid::from_u128(9));
    fn written<V>(view: V) -> Written<V> {
        Written {
            id: Uuid::from_u128(2),
            event_id: EventId(Uuid::from_u128(9)),
            view,
        }
    }
    assert_schema(&document, "DeliveryWritten", written(delivery_view(true)));
    assert_schema(&document, "CourierWritten", written(detail));
    assert_schema(&document, "ZoneWritten", written(zone_view()));
    for kind in EventKind::ALL {
        assert_schema(
            &document,
            "Pending",
            Pending {
                id: Uuid::from_u128(2),
                event_id,
                kind,
                location: "/api/deliveries/x".into(),
                message: "later".into(),
            },
        );
    }
    for status in Status::ALL {
        assert_schema(&document, "Status", status);
    }
}

/// A schema that declares a field the view does not write fails the check, and so does a
/// view field the schema does not declare: the check above can fail.
#[test]
fn a_view_and_a_schema_that_differ_fail_the_check() {
    let document = document();
    let mut zone = serde_json::to_value(zone_view()).unwrap();
    zone.as_object_mut()
        .unwrap()
        .insert("colour".into(), json!("red"));
    assert!(check_component(&document, "ZoneView", &zone).is_err());
    zone.as_object_mut().unwrap().remove("colour");
    zone.as_object_mut().unwrap().remove("dwell_ms");
    assert!(check_component(&document, "ZoneView", &zone).is_err());
    let mut delivery = serde_json::to_value(delivery_view(true)).unwrap();
    delivery["status"] = json!("lost");
    assert!(check_component(&document, "DeliveryView", &delivery).is_err());
}

// ---------------------------------------------------------------------------------------
// Real answers against the document
// ---------------------------------------------------------------------------------------

/// One answer of the router.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

/// Calls the router with `method uri`, an optional token and an optional body of a
/// content type.
async fn call(
    state: &AppState,
    method: &str,
    uri: &str,
    token: Option<&str>,
    body: Option<(&str, Vec<u8>)>,
) -> Answer {
    let mut request = Request::builder().method(method).uri(uri);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let request = match body {
        Some((content_type, bytes)) => request
            .header("content-type", content_type)
            .body(Body::from(bytes)),
        None => request.body(Body::empty()),
    }
    .unwrap();
    let response = crate::router(state.clone()).oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = axum::body::to_bytes(response.into_body(), 1 << 22)
        .await
        .unwrap()
        .to_vec();
    Answer {
        status,
        headers,
        body,
    }
}

fn json_body(value: &Value) -> Option<(&'static str, Vec<u8>)> {
    Some(("application/json", serde_json::to_vec(value).unwrap()))
}

/// Asserts that `answer` to `method` on the documented `path` is documented: its status,
/// its content type, its headers, and its JSON body against the schema (exactly, unless
/// `exact` is off).
fn assert_documented(document: &Value, method: &str, path: &str, answer: &Answer, exact: bool) {
    let place = format!("{method} {path} -> {}", answer.status.as_u16());
    let operation = &document["paths"][path][method.to_lowercase()];
    assert!(operation.is_object(), "{place}: no such operation");
    let mut response = &operation["responses"][answer.status.as_str()];
    if let Some(target) = response["$ref"].as_str() {
        response = document.pointer(target.strip_prefix('#').unwrap()).unwrap();
    }
    assert!(
        response.is_object(),
        "{place}: status not documented ({})",
        String::from_utf8_lossy(&answer.body)
    );
    if let Some(headers) = response["headers"].as_object() {
        for name in headers.keys() {
            assert!(
                answer.headers.contains_key(name.as_str()),
                "{place}: header {name} missing"
            );
        }
    }
    let content = response["content"].as_object();
    if answer.body.is_empty() {
        assert!(
            content.is_none(),
            "{place}: a body is documented, none came"
        );
        return;
    }
    let content = content.unwrap_or_else(|| panic!("{place}: a body came, none is documented"));
    let media = |text: &str| text.split(';').next().unwrap_or_default().trim().to_owned();
    let got = media(answer.headers["content-type"].to_str().unwrap());
    let (_, documented) = content
        .iter()
        .find(|(documented, _)| media(documented) == got)
        .unwrap_or_else(|| panic!("{place}: content type {got} not documented"));
    if got == "application/json" {
        let value: Value = serde_json::from_slice(&answer.body).unwrap();
        if let Err(error) = check(document, &documented["schema"], &value, "body", exact) {
            panic!("{place}: {error}\n{value}");
        }
    }
}

/// Publishes each event through the real dataflow and applies its epoch to the read model
/// before answering, so that a write is visible as soon as it is published.
struct Pipeline {
    io: Mutex<(EpochSender, EpochReceiver)>,
    model: ReadModel,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pipeline")
    }
}

impl EventPublisher for Pipeline {
    fn publish<'a>(&'a self, event: &'a Event) -> BoxFuture<'a, Result<(), PublishError>> {
        let result = (|| {
            let mut io = self.io.lock().unwrap();
            io.0.send(vec![event.clone()])
                .map_err(|_| PublishError::Unavailable("the dataflow stopped".into()))?;
            let output =
                io.1.recv()
                    .ok_or_else(|| PublishError::Unavailable("the dataflow stopped".into()))?;
            self.model.apply(&output);
            Ok(())
        })();
        async move { result }.boxed()
    }
}

/// Publishes nothing and says it did: every write is answered `202`.
#[derive(Debug)]
struct Nowhere;

impl EventPublisher for Nowhere {
    fn publish<'a>(&'a self, _event: &'a Event) -> BoxFuture<'a, Result<(), PublishError>> {
        async { Ok(()) }.boxed()
    }
}

/// A square zone around `(lat, lon)`.
fn zone_body(lat: f64, lon: f64) -> Value {
    let d = 0.01;
    json!({
        "name": "Mitte",
        "dwell_seconds": 0,
        "geometry": {"type": "Polygon", "coordinates": [[
            [lon - d, lat - d], [lon + d, lat - d], [lon + d, lat + d], [lon - d, lat + d],
            [lon - d, lat - d]
        ]]}
    })
}

/// `method uri` (documented as `template`) with a token and a body, and the status it
/// must be answered with.
type ErrorCase<'a> = (
    &'a str,
    String,
    &'a str,
    Option<&'a str>,
    Option<(&'a str, Vec<u8>)>,
    u16,
);

/// Every operation answered for real — writes through the real dataflow, reads of what it
/// made, the errors of each kind — and each answer checked against the document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_answers_are_as_documented() {
    let document = document();
    let model = ReadModel::default();
    let (input, output) =
        delivertrack_dataflow::pipeline::start(delivertrack_dataflow::DataflowConfig::default())
            .unwrap();
    let pipeline = Arc::new(Pipeline {
        io: Mutex::new((input, output)),
        model: model.clone(),
    });
    let state = AppState::new(model, CancellationToken::new()).with_commands(pipeline);
    let admin = state.auth.issue(Role::Admin, Uuid::new_v4()).unwrap();
    let courier_token = state.auth.issue(Role::Courier, Uuid::new_v4()).unwrap();
    let (courier, customer, zone) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let (lat, lon) = (52.52, 13.40);
    let admin = Some(admin.as_str());
    let ok = |document: &Value, method: &str, path: &str, answer: &Answer, status: u16| {
        assert_eq!(
            answer.status.as_u16(),
            status,
            "{method} {path}: {}",
            String::from_utf8_lossy(&answer.body)
        );
        assert_documented(document, method, path, answer, true);
    };
    let body_of = |answer: &Answer| serde_json::from_slice::<Value>(&answer.body).unwrap();

    // Writes.
    let zone_path = format!("/zones/{zone}");
    let answer = call(
        &state,
        "PUT",
        &zone_path,
        admin,
        json_body(&zone_body(lat, lon)),
    )
    .await;
    ok(&document, "PUT", "/zones/{id}", &answer, 201);
    let answer = call(
        &state,
        "PUT",
        &zone_path,
        admin,
        json_body(&zone_body(lat, lon)),
    )
    .await;
    ok(&document, "PUT", "/zones/{id}", &answer, 200);
    let fix = json!({"lat": lat, "lon": lon, "courier_id": courier, "speed_mps": 4.0});
    let answer = call(&state, "POST", "/locations", admin, json_body(&fix)).await;
    ok(&document, "POST", "/locations", &answer, 201);
    // The location limit lets two through at once (2/2s), the third is refused.
    let answer = call(&state, "POST", "/locations", admin, json_body(&fix)).await;
    ok(&document, "POST", "/locations", &answer, 201);
    let answer = call(&state, "POST", "/locations", admin, json_body(&fix)).await;
    ok(&document, "POST", "/locations", &answer, 429);
    let order = json!({
        "pickup": {"lat": lat, "lon": lon},
        "dropoff": {"lat": lat + 0.005, "lon": lon + 0.005},
        "customer_id": customer,
    });
    let answer = call(&state, "POST", "/deliveries", admin, json_body(&order)).await;
    ok(&document, "POST", "/deliveries", &answer, 201);
    let delivery = body_of(&answer)["id"].as_str().unwrap().to_owned();
    let answer = call(&state, "POST", "/deliveries", admin, json_body(&order)).await;
    ok(&document, "POST", "/deliveries", &answer, 201);
    let unrated = body_of(&answer)["id"].as_str().unwrap().to_owned();
    let status_path = format!("/deliveries/{delivery}/status");
    for step in [
        json!({"status": "assigned", "courier_id": courier}),
        json!({"status": "picked_up"}),
        json!({"status": "in_transit"}),
    ] {
        let answer = call(&state, "PUT", &status_path, admin, json_body(&step)).await;
        ok(&document, "PUT", "/deliveries/{id}/status", &answer, 200);
    }

    // Reads, while the delivery is on its way (an ETA, a courier inside a zone).
    let delivery_path = format!("/deliveries/{delivery}");
    for (path, template) in [
        (delivery_path.as_str(), "/deliveries/{id}"),
        ("/deliveries", "/deliveries"),
        ("/deliveries?limit=1&status=in_transit", "/deliveries"),
        ("/deliveries?limit=1", "/deliveries"),
        ("/zones", "/zones"),
        (zone_path.as_str(), "/zones/{id}"),
        ("/api/snapshot", "/api/snapshot"),
        (&format!("/api/couriers/{courier}"), "/api/couriers/{id}"),
        (
            &format!("/api/deliveries/{delivery}"),
            "/api/deliveries/{id}",
        ),
        ("/healthz", "/healthz"),
        ("/readyz", "/readyz"),
        ("/metrics", "/metrics"),
        ("/openapi.json", "/openapi.json"),
        ("/", "/"),
        ("/graphql", "/graphql"),
    ] {
        let answer = call(&state, "GET", path, admin, None).await;
        ok(&document, "GET", template, &answer, 200);
    }
    let page = body_of(&call(&state, "GET", "/deliveries?limit=1", admin, None).await);
    assert!(page["next_cursor"].is_string(), "{page}");
    let query = json!({"query": "{ epoch }"});
    let answer = call(&state, "POST", "/graphql", admin, json_body(&query)).await;
    assert_eq!(answer.status, 200);
    // GraphQL leaves out `errors` when there are none: not an exact check.
    assert_documented(&document, "POST", "/graphql", &answer, false);

    // The end of the delivery, its rating, and the zone's deletion.
    let answer = call(
        &state,
        "PUT",
        &status_path,
        admin,
        json_body(&json!({"status": "delivered"})),
    )
    .await;
    ok(&document, "PUT", "/deliveries/{id}/status", &answer, 200);
    let rating = json!({"score": 5, "comment": "quick"});
    let answer = call(
        &state,
        "POST",
        &format!("/deliveries/{delivery}/rating"),
        admin,
        json_body(&rating),
    )
    .await;
    ok(&document, "POST", "/deliveries/{id}/rating", &answer, 201);
    let answer = call(&state, "GET", &delivery_path, admin, None).await;
    ok(&document, "GET", "/deliveries/{id}", &answer, 200);
    assert_eq!(body_of(&answer)["rating"]["score"], 5);
    let answer = call(&state, "DELETE", &zone_path, admin, None).await;
    ok(&document, "DELETE", "/zones/{id}", &answer, 204);

    // Errors.
    let unknown = Uuid::new_v4();
    let cases: Vec<ErrorCase<'_>> = vec![
        (
            "GET",
            "/deliveries/not-a-uuid".into(),
            "/deliveries/{id}",
            admin,
            None,
            400,
        ),
        (
            "GET",
            "/deliveries?limit=0".into(),
            "/deliveries",
            admin,
            None,
            400,
        ),
        (
            "GET",
            format!("/deliveries/{unknown}"),
            "/deliveries/{id}",
            admin,
            None,
            404,
        ),
        (
            "GET",
            format!("/deliveries/{unknown}"),
            "/deliveries/{id}",
            None,
            None,
            401,
        ),
        (
            "GET",
            "/zones".into(),
            "/zones",
            Some(courier_token.as_str()),
            None,
            403,
        ),
        (
            "GET",
            format!("/zones/{zone}"),
            "/zones/{id}",
            admin,
            None,
            404,
        ),
        (
            "DELETE",
            format!("/zones/{unknown}"),
            "/zones/{id}",
            admin,
            None,
            404,
        ),
        (
            "GET",
            format!("/couriers/{courier}"),
            "/couriers/{id}",
            admin,
            None,
            503,
        ),
        (
            "GET",
            format!("/customers/{customer}"),
            "/customers/{id}",
            admin,
            None,
            503,
        ),
        (
            "GET",
            format!("/api/deliveries/{unknown}"),
            "/api/deliveries/{id}",
            admin,
            None,
            404,
        ),
        (
            "GET",
            "/api/couriers/x".into(),
            "/api/couriers/{id}",
            admin,
            None,
            400,
        ),
        (
            "GET",
            "/api/snapshot".into(),
            "/api/snapshot",
            None,
            None,
            401,
        ),
        (
            "GET",
            "/api/snapshot".into(),
            "/api/snapshot",
            Some(courier_token.as_str()),
            None,
            403,
        ),
        ("GET", "/ws/changes".into(), "/ws/changes", None, None, 401),
        (
            "GET",
            "/ws/changes".into(),
            "/ws/changes",
            Some(courier_token.as_str()),
            None,
            403,
        ),
        ("GET", "/ws/changes".into(), "/ws/changes", admin, None, 400),
        (
            "PUT",
            status_path.clone(),
            "/deliveries/{id}/status",
            admin,
            json_body(&json!({"status": "picked_up"})),
            409,
        ),
        (
            "POST",
            format!("/deliveries/{unrated}/rating"),
            "/deliveries/{id}/rating",
            admin,
            json_body(&rating),
            409,
        ),
        (
            "POST",
            "/deliveries".into(),
            "/deliveries",
            admin,
            Some(("text/plain", b"{}".to_vec())),
            415,
        ),
        (
            "POST",
            "/deliveries".into(),
            "/deliveries",
            admin,
            Some(("application/json", vec![b' '; crate::error::BODY_LIMIT + 1])),
            413,
        ),
        (
            "POST",
            "/deliveries".into(),
            "/deliveries",
            Some(courier_token.as_str()),
            json_body(&order),
            403,
        ),
        (
            "POST",
            "/graphql".into(),
            "/graphql",
            admin,
            json_body(&json!({"query": "{ epoch }", "x": 1})),
            400,
        ),
        (
            "GET",
            format!("/ws/track/{delivery}"),
            "/ws/track/{delivery_id}",
            admin,
            None,
            400,
        ),
        (
            "GET",
            format!("/ws/track/{delivery}"),
            "/ws/track/{delivery_id}",
            None,
            None,
            401,
        ),
        (
            "GET",
            format!("/ws/track/{unknown}"),
            "/ws/track/{delivery_id}",
            admin,
            None,
            404,
        ),
        ("GET", "/graphql/ws".into(), "/graphql/ws", None, None, 400),
    ];
    for (method, uri, template, token, body, status) in cases {
        let answer = call(&state, method, &uri, token, body).await;
        ok(&document, method, template, &answer, status);
        assert!(body_of(&answer)["error"]["code"].is_string());
    }

    // A write the pipeline does not apply in time is `202`, as documented.
    let nowhere = AppState::new(ReadModel::default(), CancellationToken::new())
        .with_config(ApiConfig {
            command_wait: Duration::from_millis(20),
            ..ApiConfig::default()
        })
        .with_commands(Arc::new(Nowhere));
    let token = nowhere.auth.issue(Role::Admin, Uuid::new_v4()).unwrap();
    let answer = call(
        &nowhere,
        "POST",
        "/deliveries",
        Some(&token),
        json_body(&order),
    )
    .await;
    ok(&document, "POST", "/deliveries", &answer, 202);
    let fix = json!({"lat": lat, "lon": lon, "courier_id": courier});
    let answer = call(
        &nowhere,
        "POST",
        "/locations",
        Some(&token),
        json_body(&fix),
    )
    .await;
    ok(&document, "POST", "/locations", &answer, 202);
    let answer = call(
        &nowhere,
        "PUT",
        &zone_path,
        Some(&token),
        json_body(&zone_body(lat, lon)),
    )
    .await;
    ok(&document, "PUT", "/zones/{id}", &answer, 202);
}

/// The records' answers, against the real PostgreSQL.
#[sqlx::test(migrator = "delivertrack_sinks::MIGRATOR")]
async fn record_answers_are_as_documented(pool: sqlx::PgPool) {
    let document = document();
    let state = AppState::new(ReadModel::default(), CancellationToken::new()).with_records(pool);
    let token = state.auth.issue(Role::Admin, Uuid::new_v4()).unwrap();
    let admin = Some(token.as_str());
    let (courier, customer) = (Uuid::new_v4(), Uuid::new_v4());
    let courier_path = format!("/couriers/{courier}");
    let customer_path = format!("/customers/{customer}");
    let profile = json!({"name": "Ada", "vehicle_type": "bicycle"});
    let record = json!({"name": "Bo", "address": "Unter den Linden 1", "contact": null});
    for (method, path, template, body, status) in [
        ("GET", &courier_path, "/couriers/{id}", None, 404),
        (
            "PUT",
            &courier_path,
            "/couriers/{id}",
            json_body(&profile),
            201,
        ),
        (
            "PUT",
            &courier_path,
            "/couriers/{id}",
            json_body(&profile),
            200,
        ),
        ("GET", &courier_path, "/couriers/{id}", None, 200),
        (
            "PUT",
            &courier_path,
            "/couriers/{id}",
            json_body(&json!({"name": " "})),
            400,
        ),
        ("GET", &customer_path, "/customers/{id}", None, 404),
        (
            "PUT",
            &customer_path,
            "/customers/{id}",
            json_body(&record),
            201,
        ),
        (
            "PUT",
            &customer_path,
            "/customers/{id}",
            json_body(&record),
            200,
        ),
        ("GET", &customer_path, "/customers/{id}", None, 200),
        (
            "PUT",
            &customer_path,
            "/customers/{id}",
            json_body(&json!({"age": 3})),
            400,
        ),
    ] {
        let answer = call(&state, method, path, admin, body).await;
        assert_eq!(
            answer.status.as_u16(),
            status,
            "{method} {path}: {}",
            String::from_utf8_lossy(&answer.body)
        );
        assert_documented(&document, method, template, &answer, true);
    }
}

/// A head over the size limit is a documented `431` on every operation (a few of each kind
/// tried), in the error shape.
#[tokio::test]
async fn oversized_headers_are_a_documented_431_everywhere() {
    let document = document();
    let state = AppState::new(ReadModel::default(), CancellationToken::new());
    let padding = "a".repeat(crate::server::HEADER_LIMIT + 1);
    let delivery = Uuid::new_v4();
    for (method, template, uri) in [
        ("GET", "/healthz", "/healthz".to_owned()),
        ("POST", "/deliveries", "/deliveries".to_owned()),
        (
            "POST",
            "/deliveries/{id}/rating",
            format!("/deliveries/{delivery}/rating"),
        ),
        ("POST", "/graphql", "/graphql".to_owned()),
        ("GET", "/ws/changes", "/ws/changes".to_owned()),
    ] {
        let request = Request::builder()
            .method(method)
            .uri(&uri)
            .header("x-padding", padding.as_str())
            .body(Body::empty())
            .unwrap();
        let response = crate::router(state.clone()).oneshot(request).await.unwrap();
        let answer = Answer {
            status: response.status(),
            headers: response.headers().clone(),
            body: axum::body::to_bytes(response.into_body(), 1 << 20)
                .await
                .unwrap()
                .to_vec(),
        };
        assert_eq!(answer.status.as_u16(), 431, "{method} {uri}");
        assert_documented(&document, method, template, &answer, true);
    }
}
