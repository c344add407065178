//! The GraphQL API over real HTTP and WebSocket connections, on a read model fed by the
//! fleet simulator through the real dataflow.
//!
//! The reference is the dataflow's own output accumulated by a second, independent
//! [`ReadState`]: every figure the API answers must equal the one computed from that
//! state's tallies with the dataflow's own methods (`Tally::success_rate`, ...).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use delivertrack_api::{AppState, Role};
use delivertrack_dataflow::model::{Scope, Tally};
use delivertrack_dataflow::pipeline::{self, DataflowConfig};
use delivertrack_dataflow::{EpochOutput, Status};
use delivertrack_ingest::{FleetSimulator, SimulatorConfig};
use delivertrack_sinks::read_model::ReadState;
use delivertrack_sinks::{ReadModel, ReadModelConfig};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Sunday 2026-11-29, 23:00 UTC: the run crosses midnight into Monday, so the peak-time
/// rows span two weekdays and four hours.
const START_MS: i64 = 1_795_993_200_000;
/// Simulated time per epoch.
const STEP_MS: i64 = 300_000;
/// Epochs per run: 200 simulated minutes.
const EPOCHS: usize = 40;

// ---------------------------------------------------------------------------------------
// The input: simulator → dataflow
// ---------------------------------------------------------------------------------------

/// Every epoch's output of a 30-courier city run through the dataflow (2 workers).
fn fleet_outputs(seed: u64) -> Vec<EpochOutput> {
    let config = SimulatorConfig {
        couriers: 30,
        seed,
        deliveries_per_minute: 4.0,
        fix_interval_ms: 30_000,
        rating_rate: 0.9,
        ..SimulatorConfig::default()
    };
    let mut simulator = FleetSimulator::new(config, START_MS);
    let (mut input, mut output) = pipeline::start(DataflowConfig::default()).unwrap();
    let mut outputs = Vec::with_capacity(EPOCHS);
    for epoch in 0..EPOCHS {
        let mut events = if epoch == 0 {
            simulator.initial_events()
        } else {
            Vec::new()
        };
        events.extend(simulator.step(STEP_MS));
        input.send(events).unwrap();
        let out = output.recv().expect("the dataflow outputs every epoch");
        assert_eq!(out.epoch, epoch as u64);
        outputs.push(out);
    }
    input.close();
    outputs
}

/// The reference: the outputs accumulated by a state of its own.
fn reference(outputs: &[EpochOutput]) -> ReadState {
    let mut state = ReadState::default();
    for out in outputs {
        state.apply(out);
    }
    assert_eq!(state.mismatches, 0);
    state
}

// ---------------------------------------------------------------------------------------
// The server and its clients
// ---------------------------------------------------------------------------------------

/// The whole API served on loopback.
struct Server {
    addr: SocketAddr,
    state: AppState,
    shutdown: CancellationToken,
    client: reqwest::Client,
}

impl Server {
    async fn start(model: ReadModel) -> Self {
        let shutdown = CancellationToken::new();
        let state = AppState::new(model, shutdown.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(delivertrack_api::serve(listener, state.clone()));
        Self {
            addr,
            state,
            shutdown,
            client: reqwest::Client::new(),
        }
    }

    fn token(&self, role: Role, sub: Uuid) -> String {
        self.state.auth.issue(role, sub).unwrap()
    }

    fn admin(&self) -> String {
        self.token(Role::Admin, Uuid::from_u128(0xad))
    }

    /// `POST /graphql`; the status and the JSON body.
    async fn post(&self, token: Option<&str>, body: Value) -> (u16, Value) {
        let mut request = self
            .client
            .post(format!("http://{}/graphql", self.addr))
            .json(&body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    /// A query that must succeed over HTTP: its JSON response (`data`, `errors`).
    async fn query(&self, token: &str, query: &str, variables: Value) -> Value {
        let (status, body) = self
            .post(Some(token), json!({"query": query, "variables": variables}))
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// A query whose `data` must come without errors.
    async fn data(&self, token: &str, query: &str, variables: Value) -> Value {
        let body = self.query(token, query, variables).await;
        assert!(body.get("errors").is_none(), "{query}: {body}");
        body["data"].clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The `extensions.code` of every error of a response.
fn codes(body: &Value) -> Vec<String> {
    body["errors"]
        .as_array()
        .map(|errors| {
            errors
                .iter()
                .map(|e| e["extensions"]["code"].as_str().unwrap_or("").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// A figure as the test reads it from JSON: serde_json's default float parsing is fast
/// rather than exact, so the expected figure goes through the same text → f64 path (the
/// shortest text that round-trips, then that parse). Two figures are then equal exactly
/// when the server wrote the text the expected figure serializes to.
fn via_json(value: Option<f64>) -> Option<f64> {
    value.map(|v| serde_json::from_str(&serde_json::to_string(&v).unwrap()).unwrap())
}

fn opt(value: &Value) -> Option<f64> {
    if value.is_null() {
        None
    } else {
        Some(
            value
                .as_f64()
                .unwrap_or_else(|| panic!("{value} is not a number")),
        )
    }
}

fn int(value: &Value) -> i64 {
    value
        .as_i64()
        .unwrap_or_else(|| panic!("{value} is not an integer"))
}

/// The key the API gives a scope, computed here on its own.
fn key_of(scope: &Scope) -> Value {
    match scope {
        Scope::Overall => Value::Null,
        Scope::Courier(id) => json!(id.0.to_string()),
        Scope::DropoffZone(id) => json!(id.0.to_string()),
        Scope::HourOfDay(hour) => json!(hour.to_string()),
        Scope::WeekdayHour(weekday, hour) => json!(format!("{weekday}-{hour}")),
    }
}

/// The tallies of one family in the reference, by key.
fn family(state: &ReadState, name: &str) -> BTreeMap<String, (Scope, Tally)> {
    state
        .metrics
        .iter()
        .filter(|(scope, _)| {
            matches!(
                (name, scope),
                ("OVERALL", Scope::Overall)
                    | ("ZONE", Scope::DropoffZone(_))
                    | ("COURIER", Scope::Courier(_))
                    | ("HOUR", Scope::HourOfDay(_))
                    | ("WEEKDAY_HOUR", Scope::WeekdayHour(..))
            )
        })
        .map(|(scope, tally)| {
            (
                key_of(scope).as_str().unwrap_or("").to_owned(),
                (*scope, *tally),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// The figures equal the dataflow's
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_figure_equals_the_dataflow_state() {
    let outputs = tokio::task::spawn_blocking(|| fleet_outputs(7))
        .await
        .unwrap();
    let expected = reference(&outputs);
    let model = ReadModel::default();
    for out in &outputs {
        model.apply(out);
    }
    let server = Server::start(model).await;
    let admin = server.admin();

    // The run is rich enough for every comparison to mean something.
    let overall = expected.metrics[&Scope::Overall];
    assert!(overall.delivered > 50 && overall.failed > 0 && overall.cancelled > 0);
    assert!(overall.rated > 20 && overall.promised > 0);
    assert!(family(&expected, "ZONE").len() >= 2);
    assert!(family(&expected, "COURIER").len() >= 20);
    assert!(family(&expected, "HOUR").len() >= 3);

    let data = server.data(&admin, "{ epoch }", json!({})).await;
    assert_eq!(data["epoch"], json!(expected.epoch.unwrap()));

    // Success rates, every family.
    for scope in ["OVERALL", "ZONE", "COURIER", "HOUR", "WEEKDAY_HOUR"] {
        let data = server
            .data(
                &admin,
                "query($scope: MetricScope!) { successRates(scope: $scope) {
                    epoch scope key name deliveries delivered failed cancelled active
                    successRate onTimeRate meanDeliverySeconds } }",
                json!({"scope": scope}),
            )
            .await;
        let rows = data["successRates"].as_array().unwrap();
        let want = family(&expected, scope);
        assert_eq!(rows.len(), want.len(), "{scope}");
        for row in rows {
            let key = row["key"].as_str().unwrap_or("");
            let (s, tally) = want
                .get(key)
                .unwrap_or_else(|| panic!("{scope} {key} is not in the dataflow's output"));
            assert_eq!(row["scope"], scope);
            assert_eq!(row["key"], key_of(s));
            assert_eq!(row["epoch"], json!(expected.epoch.unwrap()));
            assert_eq!(int(&row["deliveries"]), tally.deliveries, "{scope} {key}");
            assert_eq!(int(&row["delivered"]), tally.delivered, "{scope} {key}");
            assert_eq!(int(&row["failed"]), tally.failed, "{scope} {key}");
            assert_eq!(int(&row["cancelled"]), tally.cancelled, "{scope} {key}");
            assert_eq!(int(&row["active"]), tally.active, "{scope} {key}");
            assert_eq!(
                opt(&row["successRate"]),
                via_json(tally.success_rate()),
                "{scope} {key}"
            );
            assert_eq!(
                opt(&row["onTimeRate"]),
                via_json(tally.on_time_rate()),
                "{scope} {key}"
            );
            assert_eq!(
                opt(&row["meanDeliverySeconds"]),
                via_json(tally.mean_delivery_seconds()),
                "{scope} {key}"
            );
            if let Scope::DropoffZone(zone) = s {
                assert_eq!(row["name"], json!(expected.zones[zone].name));
            } else {
                assert!(row["name"].is_null());
            }
        }
    }

    // Courier efficiency: every courier, best first by delivered count.
    let data = server
        .data(
            &admin,
            "{ courierEfficiency { courierId deliveries delivered successRate meanDeliverySeconds
               meanPickupToDeliverySeconds onTimeRate distanceKm activeHours
               deliveriesPerActiveHour meanRating } }",
            json!({}),
        )
        .await;
    let rows = data["courierEfficiency"].as_array().unwrap();
    let want = family(&expected, "COURIER");
    assert_eq!(rows.len(), want.len());
    let mut previous = i64::MAX;
    for row in rows {
        let id = row["courierId"].as_str().unwrap();
        let (_, tally) = &want[id];
        assert_eq!(int(&row["deliveries"]), tally.deliveries);
        assert_eq!(int(&row["delivered"]), tally.delivered);
        assert_eq!(opt(&row["successRate"]), via_json(tally.success_rate()));
        assert_eq!(
            opt(&row["meanDeliverySeconds"]),
            via_json(tally.mean_delivery_seconds())
        );
        assert_eq!(
            opt(&row["meanPickupToDeliverySeconds"]),
            via_json(tally.mean_pickup_to_delivery_seconds())
        );
        assert_eq!(opt(&row["onTimeRate"]), via_json(tally.on_time_rate()));
        assert_eq!(
            row["distanceKm"].as_f64(),
            Some(tally.distance_mm as f64 / 1e6)
        );
        assert_eq!(int(&row["activeHours"]), tally.active_hours);
        assert_eq!(
            opt(&row["deliveriesPerActiveHour"]),
            via_json(tally.deliveries_per_active_hour())
        );
        assert_eq!(opt(&row["meanRating"]), via_json(tally.mean_rating()));
        assert!(
            tally.delivered <= previous,
            "ordered by delivered, best first"
        );
        previous = tally.delivered;
    }
    assert!(rows.iter().any(|r| opt(&r["distanceKm"]).unwrap() > 0.0));
    assert!(rows.iter().any(|r| int(&r["activeHours"]) >= 2));

    // One courier, and a limit.
    let (id, (_, tally)) = want.iter().next().unwrap();
    let data = server
        .data(
            &admin,
            "query($id: ID) { courierEfficiency(courierId: $id) { courierId delivered } }",
            json!({"id": id}),
        )
        .await;
    assert_eq!(
        data["courierEfficiency"],
        json!([{"courierId": id, "delivered": tally.delivered}])
    );
    let data = server
        .data(
            &admin,
            "{ courierEfficiency(orderBy: DISTANCE, limit: 3) { courierId distanceKm } }",
            json!({}),
        )
        .await;
    let mut by_distance: Vec<_> = want
        .iter()
        .map(|(id, (_, t))| (std::cmp::Reverse(t.distance_mm), id.clone()))
        .collect();
    by_distance.sort();
    let ids: Vec<_> = data["courierEfficiency"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["courierId"].as_str().unwrap().to_owned())
        .collect();
    let top: Vec<_> = by_distance.into_iter().take(3).map(|(_, id)| id).collect();
    assert_eq!(ids, top);

    // Peak times: every weekday × hour, busiest first.
    let data = server
        .data(
            &admin,
            "{ peakTimes { weekday weekdayName hour deliveries delivered successRate share } }",
            json!({}),
        )
        .await;
    let rows = data["peakTimes"].as_array().unwrap();
    let want = family(&expected, "WEEKDAY_HOUR");
    assert_eq!(rows.len(), want.len());
    let weekdays: BTreeSet<_> = rows.iter().map(|r| int(&r["weekday"])).collect();
    assert_eq!(weekdays, BTreeSet::from([0, 6]), "Sunday night into Monday");
    let mut previous = i64::MAX;
    for row in rows {
        let key = format!("{}-{}", row["weekday"], row["hour"]);
        let (_, tally) = &want[&key];
        assert_eq!(int(&row["deliveries"]), tally.deliveries, "{key}");
        assert_eq!(int(&row["delivered"]), tally.delivered, "{key}");
        assert_eq!(
            opt(&row["successRate"]),
            via_json(tally.success_rate()),
            "{key}"
        );
        assert_eq!(
            opt(&row["share"]),
            via_json(Some(tally.deliveries as f64 / overall.deliveries as f64))
        );
        let name = if row["weekday"] == 0 {
            "Monday"
        } else {
            "Sunday"
        };
        assert_eq!(row["weekdayName"], name);
        assert!(tally.deliveries <= previous, "busiest first");
        previous = tally.deliveries;
    }

    // Satisfaction, every family.
    for scope in ["OVERALL", "ZONE", "COURIER", "HOUR"] {
        let data = server
            .data(
                &admin,
                "query($scope: MetricScope!) { satisfaction(scope: $scope) {
                    scope key rated meanRating histogram } }",
                json!({"scope": scope}),
            )
            .await;
        let rows = data["satisfaction"].as_array().unwrap();
        let want = family(&expected, scope);
        assert_eq!(rows.len(), want.len());
        for row in rows {
            let key = row["key"].as_str().unwrap_or("");
            let (_, tally) = &want[key];
            assert_eq!(int(&row["rated"]), tally.rated);
            assert_eq!(opt(&row["meanRating"]), via_json(tally.mean_rating()));
            assert_eq!(row["histogram"], json!(tally.score_histogram));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Role checks
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_and_analytics_follow_the_rest_role_checks() {
    let outputs = tokio::task::spawn_blocking(|| fleet_outputs(11))
        .await
        .unwrap();
    let expected = reference(&outputs);
    let model = ReadModel::default();
    for out in &outputs {
        model.apply(out);
    }
    let server = Server::start(model).await;

    // A delivered one (so it has a courier) and a delivery of another customer.
    let (&id, delivery) = expected
        .deliveries
        .iter()
        .find(|(_, d)| d.status == Status::Delivered && d.rating.is_some())
        .unwrap();
    let customer = delivery.customer_id.0;
    let courier = delivery.courier_id.unwrap().0;
    let (&other_id, _) = expected
        .deliveries
        .iter()
        .find(|(_, d)| d.customer_id.0 != customer && d.courier_id.is_some_and(|c| c.0 != courier))
        .unwrap();

    let lookup = "query($id: ID!) { delivery(id: $id) { id customerId courierId status
        createdAt endedAt rating { score } dropoffZones } }";
    let as_customer = server.token(Role::Customer, customer);
    let as_courier = server.token(Role::Courier, courier);
    let as_stranger = server.token(Role::Customer, Uuid::from_u128(0x5747));
    let as_other_courier = server.token(Role::Courier, Uuid::from_u128(0xc0c0));
    let admin = server.admin();

    let own = server
        .data(&as_customer, lookup, json!({"id": id.0.to_string()}))
        .await;
    assert_eq!(own["delivery"]["id"], id.0.to_string());
    assert_eq!(own["delivery"]["customerId"], customer.to_string());
    assert_eq!(own["delivery"]["status"], "DELIVERED");
    assert_eq!(
        own["delivery"]["rating"]["score"],
        json!(delivery.rating.as_ref().unwrap().score)
    );
    // REST and GraphQL show the same delivery.
    let rest = expected.delivery(id).unwrap();
    let zones: Vec<String> = rest.dropoff_zones.iter().map(|z| z.0.to_string()).collect();
    assert_eq!(own["delivery"]["dropoffZones"], json!(zones));
    let created =
        chrono::DateTime::parse_from_rfc3339(own["delivery"]["createdAt"].as_str().unwrap())
            .unwrap();
    assert_eq!(created.timestamp_millis(), delivery.created_at);

    // Someone else's is as if it did not exist.
    let theirs = server
        .data(&as_customer, lookup, json!({"id": other_id.0.to_string()}))
        .await;
    assert_eq!(theirs["delivery"], Value::Null);
    for token in [&as_stranger, &as_other_courier] {
        let data = server
            .data(token, lookup, json!({"id": id.0.to_string()}))
            .await;
        assert_eq!(data["delivery"], Value::Null);
    }
    for token in [&as_courier, &admin] {
        let data = server
            .data(token, lookup, json!({"id": id.0.to_string()}))
            .await;
        assert_eq!(data["delivery"]["id"], id.0.to_string());
    }

    // Lists, paged: exactly what each may see.
    async fn all_pages(server: &Server, token: &str, status: Option<&str>) -> Vec<String> {
        let mut ids = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let data = server
                .data(
                    token,
                    "query($after: String, $status: DeliveryStatus) {
                        deliveries(first: 7, after: $after, status: $status) {
                            nodes { id } endCursor hasNextPage } }",
                    json!({"after": after, "status": status}),
                )
                .await;
            let page = &data["deliveries"];
            let nodes = page["nodes"].as_array().unwrap();
            assert!(nodes.len() <= 7);
            ids.extend(nodes.iter().map(|n| n["id"].as_str().unwrap().to_owned()));
            if !page["hasNextPage"].as_bool().unwrap() {
                return ids;
            }
            after = Some(page["endCursor"].as_str().unwrap().to_owned());
        }
    }
    let ids_where = |keep: &dyn Fn(&delivertrack_dataflow::model::DeliveryState) -> bool| {
        expected
            .deliveries
            .iter()
            .filter(|(_, d)| keep(d))
            .map(|(id, _)| id.0.to_string())
            .collect::<Vec<_>>()
    };
    let mine = all_pages(&server, &as_customer, None).await;
    assert!(mine.len() >= 2, "the customer has a few deliveries");
    assert_eq!(mine, ids_where(&|d| d.customer_id.0 == customer));
    let assigned = all_pages(&server, &as_courier, None).await;
    assert_eq!(
        assigned,
        ids_where(&|d| d.courier_id.is_some_and(|c| c.0 == courier))
    );
    let delivered = all_pages(&server, &as_courier, Some("DELIVERED")).await;
    assert_eq!(
        delivered,
        ids_where(
            &|d| d.status == Status::Delivered && d.courier_id.is_some_and(|c| c.0 == courier)
        )
    );
    assert!(all_pages(&server, &as_stranger, None).await.is_empty());
    let everything = all_pages(&server, &admin, Some("CANCELLED")).await;
    assert_eq!(everything, ids_where(&|d| d.status == Status::Cancelled));
    assert!(!everything.is_empty());

    // Analytics are for admins only.
    for token in [&as_customer, &as_courier] {
        for query in [
            "{ successRates { successRate } }",
            "{ courierEfficiency { delivered } }",
            "{ peakTimes { deliveries } }",
            "{ satisfaction { meanRating } }",
        ] {
            let body = server.query(token, query, json!({})).await;
            assert_eq!(codes(&body), ["FORBIDDEN"], "{query}: {body}");
            assert_eq!(body["data"], Value::Null, "{body}");
        }
    }
    // Bad arguments are the client's fault, with a code.
    let body = server
        .query(&admin, "{ delivery(id: \"42\") { id } }", json!({}))
        .await;
    assert_eq!(codes(&body), ["BAD_USER_INPUT"]);
    let body = server
        .query(
            &admin,
            "{ deliveries(first: 101) { hasNextPage } }",
            json!({}),
        )
        .await;
    assert_eq!(codes(&body), ["BAD_USER_INPUT"]);

    // No token, a bad one, an expired one: 401 in the API's error shape, before GraphQL.
    let expired = server
        .state
        .auth
        .issue_for(Role::Admin, Uuid::from_u128(1), Duration::ZERO)
        .unwrap();
    for token in [None, Some("not-a-token"), Some(expired.as_str())] {
        let (status, body) = server.post(token, json!({"query": "{ epoch }"})).await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(body["error"]["code"], "unauthorized");
        assert!(body["error"]["message"].is_string());
    }
    // A body that is not a GraphQL request: 400 in the same shape.
    let (status, body) = server
        .post(Some(&admin), json!({"query": "{ epoch }", "variabels": {}}))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("unknown_field"))
    );
    let (status, body) = server
        .post(
            Some(&admin),
            json!({"query": "{ epoch }", "variables": [1]}),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_query"))
    );

    // The GraphiQL page is served to anyone.
    let page = server
        .client
        .get(format!("http://{}/graphql", server.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status().as_u16(), 200);
    let page = page.text().await.unwrap();
    assert!(page.contains("graphiql") && page.contains("/graphql/ws"));
    assert!(
        !page.contains("<meta name=\"delivertrack-access-token\""),
        "no token preset without one"
    );
}

// ---------------------------------------------------------------------------------------
// Depth and complexity limits
// ---------------------------------------------------------------------------------------

/// The introspection query of graphql-js (as GraphiQL sends it), with `ofType` nested
/// `type_depth` times.
fn introspection_query(type_depth: usize) -> String {
    let mut type_ref = String::from("kind name");
    for _ in 0..type_depth {
        type_ref = format!("kind name ofType {{ {type_ref} }}");
    }
    format!(
        "query IntrospectionQuery {{
          __schema {{
            queryType {{ name }} mutationType {{ name }} subscriptionType {{ name }}
            types {{ ...FullType }}
            directives {{ name description locations args {{ ...InputValue }} }}
          }}
        }}
        fragment FullType on __Type {{
          kind name description
          fields(includeDeprecated: true) {{
            name description args {{ ...InputValue }} type {{ ...TypeRef }}
            isDeprecated deprecationReason
          }}
          inputFields {{ ...InputValue }}
          interfaces {{ ...TypeRef }}
          enumValues(includeDeprecated: true) {{ name description isDeprecated deprecationReason }}
          possibleTypes {{ ...TypeRef }}
        }}
        fragment InputValue on __InputValue {{ name description type {{ ...TypeRef }} defaultValue }}
        fragment TypeRef on __Type {{ {type_ref} }}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_deep_and_over_complex_queries_are_refused() {
    let server = Server::start(ReadModel::default()).await;
    let admin = server.admin();

    // GraphiQL's own introspection (ofType nine deep) passes: ofType does not count.
    let body = server
        .query(&admin, &introspection_query(9), json!({}))
        .await;
    assert!(body.get("errors").is_none(), "{body}");
    assert!(body["data"]["__schema"]["types"].as_array().unwrap().len() > 10);

    // Eleven levels of fan-out are refused, and nothing runs.
    let deep = "{ __schema { types { fields { type { fields { type { fields { type {
        fields { type { name } } } } } } } } } } }";
    let body = server.query(&admin, deep, json!({})).await;
    assert_eq!(codes(&body), ["QUERY_TOO_DEEP"], "{body}");
    assert!(body.get("data").is_none_or(Value::is_null), "{body}");
    // Ten are fine.
    let ten = "{ __schema { types { fields { type { fields { type { fields { type {
        fields { name } } } } } } } } } }";
    let body = server.query(&admin, ten, json!({})).await;
    assert!(body.get("errors").is_none(), "{body}");

    // `deliveries` costs its selection `first` times: 100 × 6 is over 500, 20 × 6 is not.
    let page = |first: u32| {
        format!(
            "{{ deliveries(first: {first}) {{ nodes {{ id status createdAt pickup {{ lat }} }} }} }}"
        )
    };
    let body = server.query(&admin, &page(100), json!({})).await;
    assert_eq!(codes(&body), ["QUERY_TOO_COMPLEX"], "{body}");
    let body = server.query(&admin, &page(20), json!({})).await;
    assert!(body.get("errors").is_none(), "{body}");
    // So does a variable `first`.
    let body = server
        .query(
            &admin,
            "query($n: Int!) { deliveries(first: $n) { nodes { id status createdAt pickup { lat } } } }",
            json!({"n": 100}),
        )
        .await;
    assert_eq!(codes(&body), ["QUERY_TOO_COMPLEX"], "{body}");

    // Many aliased fields, and fragments that would expand exponentially, are too large.
    let wide: String = (0..501).map(|i| format!("e{i}: epoch ")).collect();
    let body = server
        .query(&admin, &format!("{{ {wide} }}"), json!({}))
        .await;
    assert_eq!(codes(&body), ["QUERY_TOO_COMPLEX"], "{body}");
    let mut bomb = String::from("{ ...F0 }");
    for i in 0..25 {
        bomb.push_str(&format!(
            " fragment F{i} on Query {{ ...F{} ...F{} }}",
            i + 1,
            i + 1
        ));
    }
    bomb.push_str(" fragment F25 on Query { epoch }");
    let started = std::time::Instant::now();
    let body = server.query(&admin, &bomb, json!({})).await;
    assert_eq!(codes(&body), ["QUERY_TOO_COMPLEX"], "{body}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

// ---------------------------------------------------------------------------------------
// Subscriptions
// ---------------------------------------------------------------------------------------

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(server: &Server, query: &str) -> Result<Socket, tungstenite::Error> {
    let mut request = format!("ws://{}/graphql/ws{query}", server.addr)
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "graphql-transport-ws".parse().unwrap(),
    );
    let (socket, response) = tokio_tungstenite::connect_async(request).await?;
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        "graphql-transport-ws"
    );
    Ok(socket)
}

async fn send(socket: &mut Socket, message: Value) {
    socket
        .send(Message::Text(message.to_string().into()))
        .await
        .unwrap();
}

/// The next protocol message (pings are skipped); `Err(code)` when the server closes.
async fn receive(socket: &mut Socket) -> Result<Value, u16> {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(20), socket.next())
            .await
            .expect("a message within 20 s");
        match message {
            Some(Ok(Message::Text(text))) => return Ok(serde_json::from_str(&text).unwrap()),
            Some(Ok(Message::Close(frame))) => {
                return Err(frame.map_or(1005, |f| u16::from(f.code)));
            }
            Some(Ok(_)) => {}
            other => panic!("the socket ended without a close frame: {other:?}"),
        }
    }
}

const SUBSCRIBE_OVERALL: &str = "subscription { metricChanged(scope: OVERALL) {
    epoch reason metrics { scope key deliveries delivered failed successRate meanRating } cleared { key } } }";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_receives_the_metric_changes_of_each_new_epoch() {
    let outputs = tokio::task::spawn_blocking(|| fleet_outputs(3))
        .await
        .unwrap();
    let (last, earlier) = outputs.split_last().unwrap();
    let model = ReadModel::new(ReadModelConfig { live_capacity: 64 });
    for out in earlier {
        model.apply(out);
    }
    let server = Server::start(model.clone()).await;

    // The token in the connection-init payload.
    let mut socket = connect(&server, "").await.unwrap();
    send(
        &mut socket,
        json!({"type": "connection_init", "payload": {"Authorization": format!("Bearer {}", server.admin())}}),
    )
    .await;
    assert_eq!(
        receive(&mut socket).await.unwrap()["type"],
        "connection_ack"
    );
    send(
        &mut socket,
        json!({"id": "1", "type": "subscribe", "payload": {"query": SUBSCRIBE_OVERALL}}),
    )
    .await;

    // First the current figures.
    let before = reference(earlier);
    let message = receive(&mut socket).await.unwrap();
    assert_eq!(
        (message["type"].as_str(), message["id"].as_str()),
        (Some("next"), Some("1"))
    );
    let change = &message["payload"]["data"]["metricChanged"];
    assert_eq!(change["reason"], "SNAPSHOT");
    assert_eq!(change["epoch"], json!(before.epoch.unwrap()));
    let overall = before.metrics[&Scope::Overall];
    assert_eq!(int(&change["metrics"][0]["deliveries"]), overall.deliveries);

    // A new epoch applied to the read model is pushed, with the dataflow's figures after it.
    let after = reference(&outputs);
    let overall_after = after.metrics[&Scope::Overall];
    assert_ne!(
        overall_after, overall,
        "the last epoch changes the overall figures"
    );
    model.apply(last);
    let message = receive(&mut socket).await.unwrap();
    let change = &message["payload"]["data"]["metricChanged"];
    assert_eq!(change["reason"], "CHANGED", "{message}");
    assert_eq!(change["epoch"], json!(last.epoch));
    let metrics = change["metrics"].as_array().unwrap();
    assert_eq!(metrics.len(), 1, "only the OVERALL row: {change}");
    assert_eq!(metrics[0]["scope"], "OVERALL");
    assert_eq!(int(&metrics[0]["deliveries"]), overall_after.deliveries);
    assert_eq!(int(&metrics[0]["delivered"]), overall_after.delivered);
    assert_eq!(int(&metrics[0]["failed"]), overall_after.failed);
    assert_eq!(
        opt(&metrics[0]["successRate"]),
        via_json(overall_after.success_rate())
    );
    assert_eq!(
        opt(&metrics[0]["meanRating"]),
        via_json(overall_after.mean_rating())
    );

    // Completing the subscription ends it (the server confirms), and the socket stays up.
    send(&mut socket, json!({"id": "1", "type": "complete"})).await;
    send(&mut socket, json!({"type": "ping"})).await;
    let mut reply = receive(&mut socket).await.unwrap();
    if reply["type"] == "complete" {
        assert_eq!(reply["id"], "1");
        reply = receive(&mut socket).await.unwrap();
    }
    assert_eq!(reply["type"], "pong");

    // The token as the access_token query parameter: init may then carry none. A
    // customer's subscription is refused with FORBIDDEN.
    let customer = server.token(Role::Customer, Uuid::from_u128(9));
    let mut socket = connect(&server, &format!("?access_token={customer}"))
        .await
        .unwrap();
    send(&mut socket, json!({"type": "connection_init"})).await;
    assert_eq!(
        receive(&mut socket).await.unwrap()["type"],
        "connection_ack"
    );
    send(
        &mut socket,
        json!({"id": "7", "type": "subscribe", "payload": {"query": SUBSCRIBE_OVERALL}}),
    )
    .await;
    let message = receive(&mut socket).await.unwrap();
    let errors = match message["type"].as_str() {
        Some("error") => message["payload"].clone(),
        _ => message["payload"]["errors"].clone(),
    };
    assert_eq!(errors[0]["extensions"]["code"], "FORBIDDEN", "{message}");

    // No token anywhere: the init is refused and the socket closed with 4403.
    let mut socket = connect(&server, "").await.unwrap();
    send(
        &mut socket,
        json!({"type": "connection_init", "payload": {}}),
    )
    .await;
    assert_eq!(receive(&mut socket).await, Err(4403));
    let mut socket = connect(&server, "").await.unwrap();
    send(
        &mut socket,
        json!({"type": "connection_init", "payload": {"Authorization": "Bearer forged"}}),
    )
    .await;
    assert_eq!(receive(&mut socket).await, Err(4403));

    // A bad token on the upgrade itself: 401, no WebSocket.
    match connect(&server, "?access_token=forged").await {
        Err(tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 401);
        }
        other => panic!("expected 401, got {:?}", other.map(|_| ())),
    }

    // Open sessions are counted with the other WebSockets (the ack proves this one runs),
    // and shutdown closes them with 1001.
    let mut socket = connect(&server, "").await.unwrap();
    send(
        &mut socket,
        json!({"type": "connection_init", "payload": {"Authorization": format!("Bearer {}", server.admin())}}),
    )
    .await;
    assert_eq!(
        receive(&mut socket).await.unwrap()["type"],
        "connection_ack"
    );
    let counted = server.state.metrics.websocket_connections.get();
    assert!(counted >= 1, "{counted}");
    server.shutdown.cancel();
    assert_eq!(receive(&mut socket).await, Err(1001));
}
