//! The fleet driver: a [`FleetStream`] sent in real time, through RabbitMQ or the API.
//!
//! The generator takes what is due every few milliseconds (or, unpaced, as fast as the
//! senders take it) and hands each event to a sender:
//! - **RabbitMQ** ([`Via::Amqp`]): `publishers` confirmed channels, each fed by a bounded
//!   queue. All events of one courier go to the same channel, so a delivery's events stay
//!   in order. Location fixes may be grouped into JSON arrays of up to `batch` events. A
//!   settler task per channel awaits the broker's confirms in order: an event is
//!   *achieved* once confirmed; at most `window` messages await their confirm.
//! - **The API** ([`Via::Http`]): every fix is a `POST /locations` with the courier's own
//!   token, at most `http_concurrency` in flight; *achieved* is a `201`/`202` answer, whose
//!   time is the command latency (the route answers once the fix is applied). Orders and
//!   zones, which come from back-office systems rather than couriers' phones, still go
//!   through RabbitMQ.
//!
//! Just before a fix leaves, the [`SentLog`] notes its send time, for the trackers.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use delivertrack_dataflow::contract::{CONTENT_TYPE, encode_event, encode_message};
use delivertrack_dataflow::{CustomerId, DeliveryId, Event, EventBody, Status, UnixMillis};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use serde_json::{Map, Value};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::auth::Tokens;
use crate::record::{Recorder, Series};
use crate::sent::SentLog;
use crate::stream::{FleetStream, Planned};
use crate::target::Target;
use crate::tracker::LiveDeliveries;

/// How fixes reach the service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// Published to the event exchange.
    Amqp,
    /// `POST /locations`.
    Http,
}

/// How the fleet is sent.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// The route of fixes.
    pub via: Via,
    /// Location events per AMQP message (1: one per message).
    pub batch: usize,
    /// AMQP channels (each its own connection).
    pub publishers: usize,
    /// Unconfirmed messages per channel at most.
    pub window: usize,
    /// `POST /locations` in flight at most.
    pub http_concurrency: usize,
    /// `false`: ignore the schedule and send as fast as the senders take events, stamping
    /// each with the wall clock (the stream's own times would run ahead of it).
    pub paced: bool,
    /// Stop sending after this long (the stream also ends by itself).
    pub duration: Duration,
    /// The AMQP url.
    pub amqp_url: String,
    /// The event exchange.
    pub exchange: String,
}

/// What the driver needs besides its configuration.
#[derive(Debug, Clone)]
pub struct DriverContext {
    /// Measurements.
    pub recorder: Arc<Recorder>,
    /// Send times of fixes.
    pub sent: Arc<SentLog>,
    /// Deliveries trackers may follow.
    pub live: Arc<LiveDeliveries>,
    /// The API (HTTP mode).
    pub target: Target,
    /// Tokens (HTTP mode).
    pub tokens: Option<Tokens>,
    /// An HTTP client.
    pub http: reqwest::Client,
    /// Fires to stop early.
    pub stop: CancellationToken,
}

/// Why the fleet could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// RabbitMQ could not be reached or refused the channel.
    #[error("RabbitMQ at {url} cannot be used: {reason}")]
    Broker {
        /// Where, without password.
        url: String,
        /// What happened.
        reason: String,
    },
    /// A token could not be signed.
    #[error(transparent)]
    Token(#[from] crate::auth::TokenError),
}

/// One AMQP message and what it carries.
#[derive(Debug)]
struct Outgoing {
    routing_key: &'static str,
    payload: Vec<u8>,
    events: u64,
    /// `(courier, at_ms, seq)` of its fixes.
    fixes: Vec<(usize, UnixMillis, u64)>,
    /// Status changes, for the GraphQL probe and the trackers' live deliveries.
    statuses: Vec<(DeliveryId, Status, Option<usize>)>,
}

/// Sends the stream until it ends, `duration` passes or `stop` fires; returns when every
/// sent event is settled (confirmed, answered or failed).
///
/// # Errors
/// RabbitMQ cannot be reached, or tokens cannot be signed.
pub async fn drive(
    mut stream: FleetStream,
    config: DriverConfig,
    ctx: DriverContext,
) -> Result<(), DriverError> {
    let broker = |error: lapin::Error| DriverError::Broker {
        url: crate::target::redact(&config.amqp_url),
        reason: crate::target::error_chain(&error),
    };
    let mut senders = Vec::new();
    let mut tasks = Vec::new();
    let mut connections = Vec::new();
    for _ in 0..config.publishers.max(1) {
        let connection = Connection::connect(&config.amqp_url, ConnectionProperties::default())
            .await
            .map_err(broker)?;
        let channel = connection.create_channel().await.map_err(broker)?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(broker)?;
        let (tx, rx) = mpsc::channel::<Outgoing>(256);
        senders.push(tx);
        tasks.push(tokio::spawn(publisher(
            channel,
            config.exchange.clone(),
            rx,
            config.window.max(1),
            ctx.clone(),
        )));
        connections.push(connection);
    }
    let courier_tokens: Vec<String> = match (config.via, &ctx.tokens) {
        (Via::Http, Some(tokens)) => stream
            .courier_ids()
            .into_iter()
            .map(|id| tokens.courier(id))
            .collect::<Result<_, _>>()?,
        (Via::Http, None) => {
            return Err(DriverError::Token(crate::auth::TokenError::Sign(
                "HTTP mode needs --jwt-secret (JWT_SECRET)".into(),
            )));
        }
        (Via::Amqp, _) => Vec::new(),
    };
    let courier_tokens = Arc::new(courier_tokens);
    let in_flight = Arc::new(Semaphore::new(config.http_concurrency.max(1)));
    let mut http_tasks = tokio::task::JoinSet::new();

    let started = Instant::now();
    let mut due = Vec::new();
    let mut customers: HashMap<DeliveryId, CustomerId> = HashMap::new();
    let mut last_stamp: HashMap<usize, UnixMillis> = HashMap::new();
    let batch = config.batch.max(1);
    let mut pending_fixes: Vec<Vec<Planned>> = (0..senders.len()).map(|_| Vec::new()).collect();
    'outer: while !stream.is_done() && !ctx.stop.is_cancelled() {
        let elapsed = started.elapsed();
        if elapsed >= config.duration {
            break;
        }
        due.clear();
        if config.paced {
            stream.pop_due(elapsed, 20_000, &mut due);
        } else {
            stream.pop_due(Duration::MAX, 2_000, &mut due);
        }
        if due.is_empty() {
            tokio::time::sleep(Duration::from_millis(2)).await;
            continue;
        }
        ctx.recorder
            .offered
            .fetch_add(due.len() as u64, Ordering::Relaxed);
        for mut planned in due.drain(..) {
            if !config.paced {
                restamp(&mut planned, &mut last_stamp);
            }
            if let EventBody::DeliveryCreated(created) = &planned.event.body {
                customers.insert(created.delivery_id, created.customer_id);
            }
            let lane = planned.courier.map_or(0, |c| c % senders.len());
            if config.via == Via::Http && planned.fix.is_some() {
                let permit = tokio::select! {
                    permit = Arc::clone(&in_flight).acquire_owned() => permit,
                    () = ctx.stop.cancelled() => break 'outer,
                };
                let Ok(permit) = permit else { break 'outer };
                let ctx = ctx.clone();
                let tokens = Arc::clone(&courier_tokens);
                http_tasks.spawn(async move {
                    post_location(&ctx, &tokens, &planned).await;
                    drop(permit);
                });
                while http_tasks.try_join_next().is_some() {}
                continue;
            }
            if planned.fix.is_some() && batch > 1 {
                let Some(pending) = pending_fixes.get_mut(lane) else {
                    continue;
                };
                pending.push(planned);
                if pending.len() >= batch {
                    let group = std::mem::take(pending);
                    if !send(&senders, lane, message(&group, &mut customers, &ctx)).await {
                        break 'outer;
                    }
                }
                continue;
            }
            // A lifecycle event goes after the fixes already waiting on its lane.
            if let Some(pending) = pending_fixes.get_mut(lane)
                && !pending.is_empty()
            {
                let group = std::mem::take(pending);
                if !send(&senders, lane, message(&group, &mut customers, &ctx)).await {
                    break 'outer;
                }
            }
            let single = [planned];
            if !send(&senders, lane, message(&single, &mut customers, &ctx)).await {
                break 'outer;
            }
        }
        for lane in 0..pending_fixes.len() {
            if let Some(pending) = pending_fixes.get_mut(lane)
                && !pending.is_empty()
            {
                let group = std::mem::take(pending);
                if !send(&senders, lane, message(&group, &mut customers, &ctx)).await {
                    break 'outer;
                }
            }
        }
    }
    drop(senders);
    for task in tasks {
        let _ = task.await;
    }
    while http_tasks.join_next().await.is_some() {}
    for connection in connections {
        let _ = connection.close(200, "done".into()).await;
    }
    Ok(())
}

/// Unpaced: the wall clock, strictly increasing per courier, so its events keep their order.
fn restamp(planned: &mut Planned, last_stamp: &mut HashMap<usize, UnixMillis>) {
    let now = now_ms();
    let stamp = match planned.courier {
        Some(c) => {
            let last = last_stamp.entry(c).or_insert(0);
            *last = now.max(*last + 1);
            *last
        }
        None => now,
    };
    planned.event.occurred_at = stamp;
}

fn now_ms() -> UnixMillis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

async fn send(senders: &[mpsc::Sender<Outgoing>], lane: usize, message: Outgoing) -> bool {
    match senders.get(lane) {
        Some(sender) => sender.send(message).await.is_ok(),
        None => false,
    }
}

/// The message of `group` (one event, or fixes of one lane as an array).
fn message(
    group: &[Planned],
    customers: &mut HashMap<DeliveryId, CustomerId>,
    ctx: &DriverContext,
) -> Outgoing {
    let events: Vec<Event> = group.iter().map(|p| p.event.clone()).collect();
    let payload = match events.as_slice() {
        [one] => serde_json::to_vec(&encode_event(one)).unwrap_or_default(),
        many => encode_message(many),
    };
    let routing_key = events
        .first()
        .map_or("location.updated", |e| e.kind().as_str());
    let mut statuses = Vec::new();
    for planned in group {
        if let EventBody::StatusChanged(change) = &planned.event.body {
            statuses.push((change.delivery_id, change.status, planned.courier));
            if change.status == Status::Assigned
                && let (Some(customer), Some(courier)) =
                    (customers.get(&change.delivery_id), planned.courier)
            {
                ctx.live.assigned(change.delivery_id, *customer, courier);
            }
            if change.status.is_terminal() {
                customers.remove(&change.delivery_id);
                ctx.live.ended(change.delivery_id);
            }
        }
    }
    Outgoing {
        routing_key,
        payload,
        events: group.len() as u64,
        fixes: group
            .iter()
            .filter_map(|p| p.fix.map(|f| (f.courier, p.event.occurred_at, f.seq)))
            .collect(),
        statuses,
    }
}

/// Publishes what its lane receives; a settler task awaits the confirms in order.
async fn publisher(
    channel: Channel,
    exchange: String,
    mut rx: mpsc::Receiver<Outgoing>,
    window: usize,
    ctx: DriverContext,
) {
    let (confirms_tx, mut confirms_rx) = mpsc::channel(window);
    let recorder = Arc::clone(&ctx.recorder);
    let settler = tokio::spawn(async move {
        while let Some((confirm, events)) = confirms_rx.recv().await {
            let confirm: lapin::PublisherConfirm = confirm;
            match confirm.await {
                Ok(Confirmation::Ack(_) | Confirmation::NotRequested) => {
                    recorder.achieved.fetch_add(events, Ordering::Relaxed);
                }
                Ok(Confirmation::Nack(_)) => recorder.error("amqp_nack"),
                Err(_) => recorder.error("amqp_confirm"),
            }
        }
    });
    let properties = BasicProperties::default()
        .with_content_type(CONTENT_TYPE.into())
        .with_delivery_mode(2);
    while let Some(message) = rx.recv().await {
        let now = Instant::now();
        for &(courier, at, seq) in &message.fixes {
            ctx.sent.published(courier, at, seq, now);
        }
        for &(delivery, status, _) in &message.statuses {
            ctx.sent.status_published(delivery, status, now);
        }
        match channel
            .basic_publish(
                exchange.as_str().into(),
                message.routing_key.into(),
                BasicPublishOptions::default(),
                &message.payload,
                properties.clone(),
            )
            .await
        {
            Ok(confirm) => {
                if confirms_tx.send((confirm, message.events)).await.is_err() {
                    break;
                }
            }
            Err(_) => ctx.recorder.error("amqp_publish"),
        }
    }
    drop(confirms_tx);
    let _ = settler.await;
    let _ = channel.close(200, "done".into()).await;
}

/// One `POST /locations`.
async fn post_location(ctx: &DriverContext, tokens: &[String], planned: &Planned) {
    let (Some(fix), EventBody::LocationUpdated(location)) = (planned.fix, &planned.event.body)
    else {
        return;
    };
    let Some(token) = tokens.get(fix.courier) else {
        return;
    };
    let wire = encode_event(&planned.event);
    let mut body = Map::new();
    body.insert("lat".into(), Value::from(location.position.lat()));
    body.insert("lon".into(), Value::from(location.position.lon()));
    for field in ["occurred_at", "speed_mps", "heading_deg", "accuracy_m"] {
        if let Some(value) = wire.get(field) {
            body.insert(field.into(), value.clone());
        }
    }
    let sent = Instant::now();
    ctx.sent
        .published(fix.courier, planned.event.occurred_at, fix.seq, sent);
    let answer = ctx
        .http
        .post(ctx.target.http("/locations"))
        .bearer_auth(token)
        .json(&Value::Object(body))
        .timeout(Duration::from_secs(30))
        .send()
        .await;
    match answer {
        Ok(answer) if answer.status().is_success() => {
            ctx.recorder.achieved.fetch_add(1, Ordering::Relaxed);
            ctx.recorder.latency(Series::HttpCommand, sent.elapsed());
            let _ = answer.bytes().await;
        }
        Ok(answer) => {
            let status = answer.status().as_u16();
            let code = answer
                .json::<Value>()
                .await
                .ok()
                .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
                .unwrap_or_default();
            ctx.recorder.error(format!("http_{status}_{code}"));
        }
        Err(error) if error.is_timeout() => ctx.recorder.error("http_timeout"),
        Err(error) if error.is_connect() => ctx.recorder.error("http_connect"),
        Err(_) => ctx.recorder.error("http_other"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::stream::{FleetConfig, FleetStream};

    #[test]
    fn restamping_keeps_each_courier_strictly_increasing() {
        let mut stream = FleetStream::new(
            FleetConfig {
                couriers: 3,
                zones: 0,
                fixes_per_second: 50.0,
                duration: Duration::from_secs(2),
                ..FleetConfig::default()
            },
            0,
        );
        let mut due = Vec::new();
        stream.pop_due(Duration::MAX, 10_000, &mut due);
        let mut last = HashMap::new();
        let mut seen: HashMap<usize, UnixMillis> = HashMap::new();
        for mut planned in due {
            restamp(&mut planned, &mut last);
            let c = planned.courier.unwrap();
            if let Some(before) = seen.insert(c, planned.event.occurred_at) {
                assert!(planned.event.occurred_at > before);
            }
        }
    }
}
