//! The read routes over real HTTP: deliveries (one, and pages of them) by role and
//! ownership, zones, and — against the real PostgreSQL (`DATABASE_URL`, by default
//! `postgres://postgres@127.0.0.1:5432/postgres`; each `#[sqlx::test]` gets a fresh,
//! migrated database) — the fallback to the system of record and the courier and customer
//! records. The read model is the real dataflow's output for a simulated fleet.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fleet;

use std::collections::BTreeSet;
use std::time::Duration;

use delivertrack_api::{AppState, Role};
use delivertrack_dataflow::event::DeliveryCreated;
use delivertrack_dataflow::geometry::GeoPoint;
use delivertrack_dataflow::{CustomerId, DeliveryId, EventBody, Status};
use delivertrack_sinks::{PostgresSink, ReadModel, Sink};
use fleet::{CUSTOMER, Fleet, OWN_DELIVERIES, code, event, get, put, serve, token};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

fn state(model: &ReadModel) -> AppState {
    AppState::new(model.clone(), CancellationToken::new())
}

fn json_of(value: impl serde::Serialize) -> Value {
    serde_json::to_value(value).unwrap()
}

/// Every delivery the caller can list, by walking the pages of `query` with `limit`:
/// the ids in order, and the `(created_at, id)` keys to check the order with.
async fn walk(
    addr: std::net::SocketAddr,
    token: &str,
    query: &str,
    limit: usize,
    between_pages: &mut dyn FnMut(),
) -> Vec<(i64, Uuid)> {
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10_000 {
        let mut path = format!("/deliveries?limit={limit}{query}");
        if let Some(cursor) = &cursor {
            path.push_str(&format!("&cursor={cursor}"));
        }
        let (status, body) = get(addr, &path, Some(token)).await;
        assert_eq!(status, 200, "{path}: {body}");
        let page = body["deliveries"].as_array().unwrap();
        assert!(page.len() <= limit);
        for delivery in page {
            seen.push((
                delivery["created_at_ms"].as_i64().unwrap(),
                delivery["delivery_id"].as_str().unwrap().parse().unwrap(),
            ));
        }
        match body["next_cursor"].as_str() {
            Some(next) => {
                assert_eq!(page.len(), limit, "only the last page is short");
                cursor = Some(next.to_owned());
            }
            None => return seen,
        }
        between_pages();
    }
    panic!("the walk did not end");
}

/// Newest first, ties by id, and no delivery twice.
fn assert_page_order(keys: &[(i64, Uuid)]) {
    for pair in keys.windows(2) {
        let ((t0, id0), (t1, id1)) = (pair[0], pair[1]);
        assert!(t0 > t1 || (t0 == t1 && id0 < id1), "{pair:?} out of order");
    }
}

fn ids(keys: &[(i64, Uuid)]) -> BTreeSet<Uuid> {
    keys.iter().map(|(_, id)| *id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_delivery_by_role_and_ownership() {
    let fleet = Fleet::new(1, 12, 64);
    let state = state(&fleet.model);
    let addr = serve(state.clone()).await;
    let tracked = fleet.tracked_delivery();
    let id = tracked.details.delivery_id;
    let customer = tracked.details.customer_id.0;
    let courier = tracked.details.courier_id.unwrap().0;
    let path = format!("/deliveries/{id}");
    let expected = json_of(&tracked);

    let admin = token(&state, Role::Admin, Uuid::new_v4());
    let owner = token(&state, Role::Customer, customer);
    let assigned = token(&state, Role::Courier, courier);
    let other_customer = token(&state, Role::Customer, Uuid::new_v4());
    let other_courier = token(&state, Role::Courier, Uuid::new_v4());

    for (who, token) in [("admin", &admin), ("owner", &owner), ("courier", &assigned)] {
        let (status, body) = get(addr, &path, Some(token)).await;
        assert_eq!((status, &body), (200, &expected), "{who}");
    }
    // Someone else's delivery looks exactly like a missing one.
    let unknown = DeliveryId(Uuid::new_v4());
    let (status, missing) = get(addr, &format!("/deliveries/{unknown}"), Some(&admin)).await;
    assert_eq!((status, code(&missing)), (404, "not_found"));
    for (who, token) in [("customer", &other_customer), ("courier", &other_courier)] {
        let (status, body) = get(addr, &path, Some(token)).await;
        assert_eq!((status, code(&body)), (404, "not_found"), "{who}");
        assert_eq!(
            body["error"]["message"].as_str().unwrap(),
            missing["error"]["message"]
                .as_str()
                .unwrap()
                .replace(&unknown.to_string(), &id.to_string()),
        );
    }
    // Not yet assigned: no courier sees it, its customer does.
    let own = DeliveryId(Uuid::from_u128(0xd0_0000));
    let own_view = fleet.model.delivery(own).unwrap();
    if own_view.details.courier_id.is_none() {
        let (status, _) = get(addr, &format!("/deliveries/{own}"), Some(&assigned)).await;
        assert_eq!(status, 404);
    }
    let mine = token(&state, Role::Customer, CUSTOMER);
    let (status, body) = get(addr, &format!("/deliveries/{own}"), Some(&mine)).await;
    assert_eq!((status, body), (200, json_of(&own_view)));

    let (status, body) = get(addr, &path, None).await;
    assert_eq!((status, code(&body)), (401, "unauthorized"));
    let expired = state
        .auth
        .issue_for(Role::Admin, Uuid::new_v4(), Duration::ZERO)
        .unwrap();
    let (status, body) = get(addr, &path, Some(&expired)).await;
    assert_eq!((status, code(&body)), (401, "unauthorized"));
    let (status, body) = get(addr, "/deliveries/not-a-uuid", Some(&admin)).await;
    assert_eq!((status, code(&body)), (400, "invalid_id"));
    // Without a pool there is no fallback: unknown is 404, not 503.
    assert!(state.records.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_walk_every_delivery_exactly_once() {
    let mut fleet = Fleet::new(2, 12, 64);
    let state = state(&fleet.model);
    let addr = serve(state.clone()).await;
    let admin = token(&state, Role::Admin, Uuid::new_v4());
    let all: Vec<(Uuid, Status, Uuid, Option<Uuid>)> = fleet.model.with_state(|read| {
        read.deliveries
            .iter()
            .map(|(id, d)| (id.0, d.status, d.customer_id.0, d.courier_id.map(|c| c.0)))
            .collect()
    });
    assert!(
        all.len() > 60,
        "enough deliveries for several pages: {}",
        all.len()
    );

    // Admin: everything, in order, once.
    let keys = walk(addr, &admin, "", 7, &mut || {}).await;
    assert_page_order(&keys);
    assert_eq!(keys.len(), all.len());
    assert_eq!(ids(&keys), all.iter().map(|d| d.0).collect());

    // By status.
    let mut statuses = 0;
    for status in Status::ALL {
        let expected: BTreeSet<Uuid> = all.iter().filter(|d| d.1 == status).map(|d| d.0).collect();
        statuses += usize::from(!expected.is_empty());
        let keys = walk(addr, &admin, &format!("&status={status}"), 5, &mut || {}).await;
        assert_page_order(&keys);
        assert_eq!(keys.len(), expected.len(), "{status}");
        assert_eq!(ids(&keys), expected, "{status}");
    }
    assert!(statuses >= 4, "the run has deliveries in several statuses");

    // A customer sees their own, a courier those assigned to them.
    let mine = token(&state, Role::Customer, CUSTOMER);
    let keys = walk(addr, &mine, "", 4, &mut || {}).await;
    assert_eq!(keys.len(), OWN_DELIVERIES as usize);
    assert_eq!(
        ids(&keys),
        all.iter()
            .filter(|d| d.2 == CUSTOMER)
            .map(|d| d.0)
            .collect()
    );
    let busiest = {
        let mut counts = std::collections::BTreeMap::new();
        for courier in all.iter().filter_map(|d| d.3) {
            *counts.entry(courier).or_insert(0) += 1;
        }
        counts.into_iter().max_by_key(|(_, n)| *n).unwrap().0
    };
    let courier = token(&state, Role::Courier, busiest);
    let keys = walk(addr, &courier, "", 2, &mut || {}).await;
    assert!(keys.len() >= 2);
    assert_eq!(
        ids(&keys),
        all.iter()
            .filter(|d| d.3 == Some(busiest))
            .map(|d| d.0)
            .collect()
    );
    let stranger = token(&state, Role::Customer, Uuid::new_v4());
    let (status, body) = get(addr, "/deliveries", Some(&stranger)).await;
    assert_eq!(
        (status, body),
        (200, json!({"deliveries": [], "next_cursor": null}))
    );

    // The default page is 50, the largest 200.
    let (_, body) = get(addr, "/deliveries", Some(&admin)).await;
    assert_eq!(body["deliveries"].as_array().unwrap().len(), 50);
    assert!(body["next_cursor"].is_string());
    assert_eq!(
        body["deliveries"][0],
        json_of(fleet.model.delivery(DeliveryId(keys_first(&body))).unwrap())
    );
    let (status, body) = get(addr, "/deliveries?limit=200", Some(&admin)).await;
    assert_eq!(status, 200);
    assert_eq!(
        body["deliveries"].as_array().unwrap().len(),
        all.len().min(200)
    );

    // The pipeline moves on while a client walks: new deliveries sort before the cursor,
    // status changes do not move a delivery; every delivery of the start is seen once.
    let keys = {
        let fleet = &mut fleet;
        let mut steps = 0;
        walk(addr, &admin, "", 9, &mut || {
            if steps < 3 {
                fleet.step();
                steps += 1;
            }
        })
        .await
    };
    assert_page_order(&keys);
    assert_eq!(ids(&keys).len(), keys.len(), "no delivery twice");
    assert_eq!(ids(&keys), all.iter().map(|d| d.0).collect());
    assert!(
        fleet.model.with_state(|read| read.deliveries.len()) > all.len(),
        "the steps created deliveries"
    );
}

fn keys_first(body: &Value) -> Uuid {
    body["deliveries"][0]["delivery_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_queries_are_refused_with_their_codes() {
    let fleet = Fleet::new(3, 3, 64);
    let state = state(&fleet.model);
    let addr = serve(state.clone()).await;
    let admin = token(&state, Role::Admin, Uuid::new_v4());
    let cases = [
        ("status=bogus", "invalid_status"),
        ("status=", "invalid_status"),
        ("limit=0", "invalid_query"),
        ("limit=201", "invalid_query"),
        ("limit=-1", "invalid_query"),
        ("limit=ten", "invalid_query"),
        ("cursor=not-a-cursor", "invalid_query"),
        ("cursor=", "invalid_query"),
        ("colour=blue", "invalid_query"),
        ("status=created&status=assigned", "invalid_query"),
    ];
    for (query, expected) in cases {
        let (status, body) = get(addr, &format!("/deliveries?{query}"), Some(&admin)).await;
        assert_eq!((status, code(&body)), (400, expected), "{query}: {body}");
        assert!(body["error"]["message"].is_string());
    }
    let (status, body) = get(addr, "/deliveries?status=created", None).await;
    assert_eq!((status, code(&body)), (401, "unauthorized"));
    // The token may also come as a query parameter.
    let (status, _) = get(addr, &format!("/deliveries?access_token={admin}"), None).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zones_are_for_admins() {
    let fleet = Fleet::new(4, 2, 64);
    let state = state(&fleet.model);
    let addr = serve(state.clone()).await;
    let admin = token(&state, Role::Admin, Uuid::new_v4());
    let snapshot = fleet.model.snapshot();
    assert!(!snapshot.zones.is_empty());

    let (status, body) = get(addr, "/zones", Some(&admin)).await;
    assert_eq!(
        (status, body),
        (200, json!({"zones": json_of(&snapshot.zones)}))
    );
    let zone = &snapshot.zones[0];
    let path = format!("/zones/{}", zone.zone_id);
    let (status, body) = get(addr, &path, Some(&admin)).await;
    assert_eq!((status, body), (200, json_of(zone)));
    let (status, body) = get(addr, &format!("/zones/{}", Uuid::new_v4()), Some(&admin)).await;
    assert_eq!((status, code(&body)), (404, "not_found"));
    let (status, body) = get(addr, "/zones/nope", Some(&admin)).await;
    assert_eq!((status, code(&body)), (400, "invalid_id"));

    for role in [Role::Customer, Role::Courier] {
        let token = token(&state, role, Uuid::new_v4());
        for path in ["/zones", path.as_str()] {
            let (status, body) = get(addr, path, Some(&token)).await;
            assert_eq!((status, code(&body)), (403, "forbidden"), "{role:?} {path}");
        }
    }
    let (status, _) = get(addr, "/zones", None).await;
    assert_eq!(status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_without_postgres_are_503() {
    let fleet = Fleet::new(5, 1, 64);
    let state = state(&fleet.model);
    let addr = serve(state.clone()).await;
    let admin = token(&state, Role::Admin, Uuid::new_v4());
    let id = Uuid::new_v4();
    for path in [format!("/couriers/{id}"), format!("/customers/{id}")] {
        let (status, body) = get(addr, &path, Some(&admin)).await;
        assert_eq!((status, code(&body)), (503, "store_unavailable"), "{path}");
        let (status, body) = put(addr, &path, &admin, &json!({"name": "Ada"})).await;
        assert_eq!((status, code(&body)), (503, "store_unavailable"), "{path}");
    }
}

// ---------------------------------------------------------------------------------------
// Against PostgreSQL
// ---------------------------------------------------------------------------------------

/// A fleet whose every epoch is committed by the real PostgreSQL sink as well as applied
/// to the read model.
async fn recorded_fleet(pool: &PgPool, seed: u64, epochs: usize) -> (Fleet, PostgresSink) {
    let fleet = Fleet::new(seed, epochs, 64);
    let mut sink = PostgresSink::with_pool(pool.clone()).await.unwrap();
    for output in &fleet.outputs {
        sink.commit(std::sync::Arc::clone(output)).await.unwrap();
    }
    (fleet, sink)
}

#[sqlx::test(migrator = "delivertrack_sinks::MIGRATOR")]
async fn a_delivery_missing_from_the_read_model_comes_from_postgres(pool: PgPool) {
    let (mut fleet, mut sink) = recorded_fleet(&pool, 6, 12).await;

    // Every delivery, read from PostgreSQL alone (an empty read model), is what the read
    // model shows: status, courier, times, rating, ETA, dropoff zones.
    let empty =
        AppState::new(ReadModel::default(), CancellationToken::new()).with_records(pool.clone());
    let addr = serve(empty.clone()).await;
    let admin = token(&empty, Role::Admin, Uuid::new_v4());
    let views = fleet.model.with_state(|read| {
        read.deliveries
            .keys()
            .map(|id| read.delivery(*id).unwrap())
            .collect::<Vec<_>>()
    });
    let (mut rated, mut with_eta, mut zoned) = (0, 0, 0);
    for view in &views {
        let id = view.details.delivery_id;
        let (status, body) = get(addr, &format!("/deliveries/{id}"), Some(&admin)).await;
        assert_eq!((status, &body), (200, &json_of(view)), "{id}");
        rated += usize::from(view.details.rating.is_some());
        with_eta += usize::from(view.details.eta.is_some());
        zoned += usize::from(!view.dropoff_zones.is_empty());
    }
    assert!(
        rated > 0 && with_eta > 0 && zoned > 0,
        "{rated} {with_eta} {zoned}"
    );

    // A delivery created in an epoch that PostgreSQL committed and the read model has not
    // applied: found, with its owner's token only.
    let customer = Uuid::new_v4();
    let fresh = DeliveryId(Uuid::new_v4());
    let output = fleet.run(vec![event(
        fleet.simulator.now() + 1_000,
        EventBody::DeliveryCreated(DeliveryCreated {
            delivery_id: fresh,
            customer_id: CustomerId(customer),
            pickup: GeoPoint::from_degrees(52.51, 13.39),
            dropoff: GeoPoint::from_degrees(52.52, 13.42),
            promised_by: None,
        }),
    )]);
    sink.commit(std::sync::Arc::clone(&output)).await.unwrap();
    let expected = fleet.model.with_state(|read| {
        let mut ahead = read.clone();
        ahead.apply(&output).unwrap();
        ahead.delivery(fresh).unwrap()
    });
    assert!(fleet.model.delivery(fresh).is_none());

    let state = state(&fleet.model).with_records(pool.clone());
    let addr = serve(state.clone()).await;
    let path = format!("/deliveries/{fresh}");
    let owner = token(&state, Role::Customer, customer);
    let (status, body) = get(addr, &path, Some(&owner)).await;
    assert_eq!((status, body), (200, json_of(&expected)));
    let admin = token(&state, Role::Admin, Uuid::new_v4());
    let (status, _) = get(addr, &path, Some(&admin)).await;
    assert_eq!(status, 200);
    for role in [Role::Customer, Role::Courier] {
        let (status, body) = get(addr, &path, Some(&token(&state, role, Uuid::new_v4()))).await;
        assert_eq!((status, code(&body)), (404, "not_found"), "{role:?}");
    }
    let (status, body) = get(
        addr,
        &format!("/deliveries/{}", Uuid::new_v4()),
        Some(&admin),
    )
    .await;
    assert_eq!((status, code(&body)), (404, "not_found"));

    // PostgreSQL gone: a delivery the read model lacks cannot be looked up (503); one it
    // holds still can.
    pool.close().await;
    let (status, body) = get(addr, &path, Some(&admin)).await;
    assert_eq!((status, code(&body)), (503, "store_unavailable"));
    let held = &views[0].details.delivery_id;
    let (status, _) = get(addr, &format!("/deliveries/{held}"), Some(&admin)).await;
    assert_eq!(status, 200);
}

#[sqlx::test(migrator = "delivertrack_sinks::MIGRATOR")]
async fn courier_records_by_role(pool: PgPool) {
    let (mut fleet, mut sink) = recorded_fleet(&pool, 7, 4).await;
    let state = state(&fleet.model).with_records(pool.clone());
    let addr = serve(state.clone()).await;
    let admin = token(&state, Role::Admin, Uuid::new_v4());
    let courier = fleet.tracked_delivery().details.courier_id.unwrap();
    let path = format!("/couriers/{courier}");

    // Known to the sink by its fixes: no profile yet, the live state joined in.
    let (status, body) = get(addr, &path, Some(&admin)).await;
    assert_eq!(status, 200, "{body}");
    let live = fleet.model.courier(courier).unwrap();
    assert_eq!(body["courier_id"], courier.to_string());
    assert_eq!(
        (&body["name"], &body["vehicle_type"]),
        (&Value::Null, &Value::Null)
    );
    assert_eq!(body["live"], json_of(&live));
    assert_eq!(body["stored"]["position"], json_of(live.courier.position));
    assert_eq!(body["stored"]["at_ms"], live.courier.at_ms);

    // The row exists (the sink made it): updated, 200.
    let profile = json!({"name": "Ada Lovelace", "vehicle_type": "bicycle"});
    let (status, body) = put(addr, &path, &admin, &profile).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (&body["name"], &body["vehicle_type"]),
        (&profile["name"], &profile["vehicle_type"])
    );

    // The sink keeps writing the courier's fixes; the profile stays.
    for _ in 0..2 {
        let output = fleet.step();
        sink.commit(output).await.unwrap();
    }
    let (status, body) = get(addr, &path, Some(&admin)).await;
    assert_eq!(status, 200);
    let live = fleet.model.courier(courier).unwrap();
    assert_eq!(
        (&body["name"], &body["vehicle_type"]),
        (&profile["name"], &profile["vehicle_type"])
    );
    assert_eq!(body["live"], json_of(&live));
    assert_eq!(
        body["stored"]["at_ms"], live.courier.at_ms,
        "the sink moved it"
    );

    // A courier nobody knows yet: created (201), then updated (200); cleared with null.
    let newcomer = format!("/couriers/{}", Uuid::new_v4());
    let (status, _) = get(addr, &newcomer, Some(&admin)).await;
    assert_eq!(status, 404);
    let (status, body) = put(addr, &newcomer, &admin, &json!({"name": "Grace"})).await;
    assert_eq!(
        (status, &body["name"], &body["live"]),
        (201, &json!("Grace"), &Value::Null)
    );
    let (status, body) = put(
        addr,
        &newcomer,
        &admin,
        &json!({"name": " Grace H. ", "vehicle_type": "van"}),
    )
    .await;
    assert_eq!(
        (status, &body["name"], &body["vehicle_type"]),
        (200, &json!("Grace H."), &json!("van"))
    );
    let (status, body) = put(
        addr,
        &newcomer,
        &admin,
        &json!({"name": null, "vehicle_type": "van"}),
    )
    .await;
    assert_eq!((status, &body["name"]), (200, &Value::Null));

    // Bad bodies.
    for (body, expected) in [
        (json!({"name": "Ada", "colour": "red"}), "unknown_field"),
        (json!({"name": 42}), "malformed_json"),
        (json!({"name": "   "}), "invalid_field"),
        (json!({"vehicle_type": "x".repeat(51)}), "invalid_field"),
    ] {
        let (status, answer) = put(addr, &path, &admin, &body).await;
        assert_eq!((status, code(&answer)), (400, expected), "{body}");
    }
    let response = reqwest::Client::new()
        .put(format!("http://{addr}{path}"))
        .bearer_auth(&admin)
        .body("name=Ada")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 415);

    // Roles.
    for role in [Role::Customer, Role::Courier] {
        // Even the courier's own record is the admins'.
        let token = token(&state, role, courier.0);
        let (status, body) = get(addr, &path, Some(&token)).await;
        assert_eq!((status, code(&body)), (403, "forbidden"), "{role:?}");
        let (status, body) = put(addr, &path, &token, &profile).await;
        assert_eq!((status, code(&body)), (403, "forbidden"), "{role:?}");
    }
    let (status, _) = get(addr, &path, None).await;
    assert_eq!(status, 401);
    let (status, body) = get(addr, "/couriers/42", Some(&admin)).await;
    assert_eq!((status, code(&body)), (400, "invalid_id"));
}

#[sqlx::test(migrator = "delivertrack_sinks::MIGRATOR")]
async fn customer_records_by_role(pool: PgPool) {
    let (mut fleet, mut sink) = recorded_fleet(&pool, 8, 3).await;
    let state = state(&fleet.model).with_records(pool.clone());
    let addr = serve(state.clone()).await;
    let admin = token(&state, Role::Admin, Uuid::new_v4());
    let path = format!("/customers/{CUSTOMER}");

    // The sink made a bare row when the customer's first delivery came.
    let (status, body) = get(addr, &path, Some(&admin)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["customer_id"], CUSTOMER.to_string());
    assert_eq!(body["name"], Value::Null);
    assert!(body["first_seen_at_ms"].is_i64());

    let profile =
        json!({"name": "Ada", "address": "Unter den Linden 1, Berlin", "contact": "+49 30 123"});
    let (status, body) = put(addr, &path, &admin, &profile).await;
    assert_eq!(status, 200, "{body}");
    for field in ["name", "address", "contact"] {
        assert_eq!(body[field], profile[field], "{field}");
    }
    // The customer reads their own record; the sink, writing their deliveries, keeps it.
    let own = token(&state, Role::Customer, CUSTOMER);
    fleet.apply(vec![event(
        fleet.simulator.now() + 1_000,
        EventBody::DeliveryCreated(DeliveryCreated {
            delivery_id: DeliveryId(Uuid::new_v4()),
            customer_id: CustomerId(CUSTOMER),
            pickup: GeoPoint::from_degrees(52.51, 13.39),
            dropoff: GeoPoint::from_degrees(52.52, 13.42),
            promised_by: None,
        }),
    )]);
    sink.commit(fleet.outputs.last().unwrap().clone())
        .await
        .unwrap();
    let (status, body) = get(addr, &path, Some(&own)).await;
    assert_eq!(status, 200);
    for field in ["name", "address", "contact"] {
        assert_eq!(body[field], profile[field], "{field}");
    }

    // Someone else's record looks missing; couriers may not read them at all.
    let other = token(&state, Role::Customer, Uuid::new_v4());
    let (status, body) = get(addr, &path, Some(&other)).await;
    assert_eq!((status, code(&body)), (404, "not_found"));
    let courier = token(&state, Role::Courier, CUSTOMER);
    let (status, body) = get(addr, &path, Some(&courier)).await;
    assert_eq!((status, code(&body)), (403, "forbidden"));
    // Writing is for admins, even one's own.
    let (status, body) = put(addr, &path, &own, &profile).await;
    assert_eq!((status, code(&body)), (403, "forbidden"));
    let (status, _) = get(addr, &path, None).await;
    assert_eq!(status, 401);

    // A new customer: 404, created (201), updated (200).
    let newcomer = format!("/customers/{}", Uuid::new_v4());
    let (status, body) = get(addr, &newcomer, Some(&admin)).await;
    assert_eq!((status, code(&body)), (404, "not_found"));
    let (status, body) = put(addr, &newcomer, &admin, &json!({"name": "Grace"})).await;
    assert_eq!(
        (status, &body["name"], &body["address"]),
        (201, &json!("Grace"), &Value::Null)
    );
    let (status, _) = put(
        addr,
        &newcomer,
        &admin,
        &json!({"contact": "grace@example.org"}),
    )
    .await;
    assert_eq!(status, 200);
    let (status, body) = put(
        addr,
        &newcomer,
        &admin,
        &json!({"name": "Grace", "phone": "1"}),
    )
    .await;
    assert_eq!((status, code(&body)), (400, "unknown_field"));
}
