//! The dataflow equals a plain sequential reference after every epoch, on generated event
//! streams (moves, implausible jumps, zone edits and deletes, lifecycles with illegal steps,
//! ratings and re-ratings beyond the bound, out-of-order and duplicated events), with 1, 2
//! and 4 workers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};

use delivertrack_dataflow::eta::EtaConfig;
use delivertrack_dataflow::event::*;
use delivertrack_dataflow::geometry::{GeoPoint, ZoneShape};
use delivertrack_dataflow::pipeline::{self, DataflowConfig};
use delivertrack_dataflow::{Change, CourierId, CustomerId, DeliveryId, EventId, Status, ZoneId};
use geo::{LineString, MultiPolygon, Polygon};
use proptest::prelude::*;
use uuid::Uuid;

use support::reference::Reference;

/// An abstract step of a generated stream; `build` turns a list of them into events.
#[derive(Clone, Debug)]
enum Op {
    Move {
        courier: u8,
        x: u8,
        y: u8,
        speed: Option<u16>,
    },
    /// A fix about 25 km off the grid: a jump from the grid (or back to it) unless enough
    /// event time has passed.
    Jump {
        courier: u8,
    },
    Zone {
        zone: u8,
        x0: u8,
        y0: u8,
        x1: u8,
        y1: u8,
        dwell: u8,
        triangle: bool,
        /// A rectangle gets a hole in its middle; a triangle gets a detached square beside it
        /// (a multipolygon).
        hole: bool,
    },
    DeleteZone {
        zone: u8,
    },
    Create {
        delivery: u8,
        customer: u8,
        pickup: (u8, u8),
        dropoff: (u8, u8),
        promise: Option<u8>,
    },
    /// The next legal step of a delivery (as far as the generator knows), or a detour.
    Advance {
        delivery: u8,
        courier: u8,
        ending: u8,
    },
    /// Any status at all: mostly illegal.
    Status {
        delivery: u8,
        status: u8,
        courier: u8,
    },
    /// A status stamped well before the clock, arriving after steps that happened later:
    /// a late correction (a `cancelled` or `failed` before a `delivered`), or a late step
    /// that the history refuses.
    Late {
        delivery: u8,
        status: u8,
        /// How far back in time, in seconds.
        back: u8,
    },
    Rate {
        delivery: u8,
        score: u8,
    },
    /// A delivery (preferably the `pick`-th of those the generator believes delivered or
    /// failed) taken to its end if it is on its way, then rated `times` times in a row:
    /// beyond the bound if `times` is large enough or it was rated before.
    Rerate {
        pick: u8,
        times: u8,
    },
    /// Send an earlier event again (a redelivery).
    Repeat {
        back: u8,
    },
    /// Close the epoch.
    Cut,
}

#[derive(Clone, Debug)]
struct Step {
    op: Op,
    /// Clock advance before this step, in quarter seconds.
    advance: u8,
    /// How far the event's time lags the clock, in quarter seconds (out-of-order input).
    lag: u8,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..4u8, 0..12u8, 0..12u8, proptest::option::of(0..15_000u16))
            .prop_map(|(courier, x, y, speed)| Op::Move { courier, x, y, speed }),
        1 => (0..4u8).prop_map(|courier| Op::Jump { courier }),
        2 => (0..3u8, 0..12u8, 0..12u8, 0..12u8, 0..12u8, 0..3u8, any::<bool>(), any::<bool>())
            .prop_map(|(zone, x0, y0, x1, y1, dwell, triangle, hole)| Op::Zone { zone, x0, y0, x1, y1, dwell, triangle, hole }),
        1 => (0..3u8).prop_map(|zone| Op::DeleteZone { zone }),
        2 => (0..6u8, 0..2u8, (0..12u8, 0..12u8), (0..12u8, 0..12u8), proptest::option::of(0..80u8))
            .prop_map(|(delivery, customer, pickup, dropoff, promise)| Op::Create { delivery, customer, pickup, dropoff, promise }),
        5 => (0..6u8, 0..4u8, 0..10u8).prop_map(|(delivery, courier, ending)| Op::Advance { delivery, courier, ending }),
        1 => (0..6u8, 0..7u8, 0..4u8).prop_map(|(delivery, status, courier)| Op::Status { delivery, status, courier }),
        2 => (0..6u8, 0..5u8, 1..30u8).prop_map(|(delivery, status, back)| Op::Late { delivery, status, back }),
        2 => (0..6u8, 1..=5u8).prop_map(|(delivery, score)| Op::Rate { delivery, score }),
        1 => (0..6u8, 2..=7u8).prop_map(|(pick, times)| Op::Rerate { pick, times }),
        1 => (0..40u8).prop_map(|back| Op::Repeat { back }),
        2 => Just(Op::Cut),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    (op(), 0..8u8, prop_oneof![6 => Just(0u8), 1 => 1..12u8]).prop_map(|(op, advance, lag)| Step {
        op,
        advance,
        lag,
    })
}

const START: UnixMillis = 1_764_500_000_000; // a Sunday evening, so hours and weekdays vary

fn point(x: u8, y: u8) -> GeoPoint {
    GeoPoint::from_degrees(52.50 + f64::from(y) * 0.001, 13.40 + f64::from(x) * 0.001)
}

fn shape(x0: u8, y0: u8, x1: u8, y1: u8, triangle: bool, hole: bool) -> ZoneShape {
    let (lo_x, hi_x) = (x0.min(x1), x0.max(x1) + 1);
    let (lo_y, hi_y) = (y0.min(y1), y0.max(y1) + 1);
    let corner = |x: f64, y: f64| {
        (
            13.40 + x * 0.001, // the lon of `point`
            52.50 + y * 0.001, // the lat of `point`
        )
    };
    let square = |x0: f64, y0: f64, x1: f64, y1: f64| {
        LineString::from(vec![
            corner(x0, y0),
            corner(x1, y0),
            corner(x1, y1),
            corner(x0, y1),
            corner(x0, y0),
        ])
    };
    let (lx, hx, ly, hy) = (
        f64::from(lo_x),
        f64::from(hi_x),
        f64::from(lo_y),
        f64::from(hi_y),
    );
    let polygons = if triangle {
        let ring = LineString::from(vec![
            corner(lx, ly),
            corner(hx, ly),
            corner(lx, hy),
            corner(lx, ly),
        ]);
        let mut polygons = vec![Polygon::new(ring, vec![])];
        if hole {
            // A detached unit square beyond the triangle's right corner.
            polygons.push(Polygon::new(
                square(hx + 1.0, ly, hx + 2.0, ly + 1.0),
                vec![],
            ));
        }
        polygons
    } else if hole && hi_x - lo_x >= 3 && hi_y - lo_y >= 3 {
        // A hole 1.5 steps wide around the centre: the grid points nearest it fall inside.
        let (cx, cy) = ((lx + hx) / 2.0, (ly + hy) / 2.0);
        vec![Polygon::new(
            square(lx, ly, hx, hy),
            vec![square(cx - 0.75, cy - 0.75, cx + 0.75, cy + 0.75)],
        )]
    } else {
        vec![Polygon::new(square(lx, ly, hx, hy), vec![])]
    };
    ZoneShape(MultiPolygon(polygons))
}

/// Turns steps into epochs of events.
fn build(steps: &[Step]) -> Vec<Vec<Event>> {
    let mut epochs = vec![Vec::new()];
    let mut sent: Vec<Event> = Vec::new();
    let mut clock = START;
    let mut next_id = 1u128;
    // What the generator believes each delivery's status is, to produce mostly legal paths.
    let mut believed: BTreeMap<u8, Status> = BTreeMap::new();
    for step in steps {
        clock += i64::from(step.advance) * 250;
        let mut at = clock - i64::from(step.lag) * 250;
        let body = match &step.op {
            Op::Cut => {
                epochs.push(Vec::new());
                continue;
            }
            Op::Repeat { back } => {
                if let Some(event) = sent
                    .len()
                    .checked_sub(1 + usize::from(*back))
                    .map(|i| sent[i].clone())
                {
                    epochs.last_mut().unwrap().push(event);
                }
                continue;
            }
            Op::Rerate { pick, times } => {
                let rateable: Vec<u8> = believed
                    .iter()
                    .filter(|(_, status)| matches!(status, Status::Delivered | Status::Failed))
                    .map(|(delivery, _)| *delivery)
                    .collect();
                let delivery = *rateable
                    .get(usize::from(*pick) % rateable.len().max(1))
                    .unwrap_or(&(pick % 6));
                let mut bodies = Vec::new();
                let mut status = believed.get(&delivery).copied();
                while let Some(current) = status.filter(|s| !s.is_terminal()) {
                    let next = match current {
                        Status::Created => Status::Assigned,
                        Status::Assigned => Status::PickedUp,
                        Status::PickedUp => Status::InTransit,
                        _ => Status::Delivered,
                    };
                    bodies.push(status_changed(delivery, next, 0));
                    status = Some(next);
                }
                if let Some(status) = status {
                    believed.insert(delivery, status);
                }
                bodies.extend((0..*times).map(|n| {
                    EventBody::DeliveryRated(DeliveryRated {
                        delivery_id: delivery_id(delivery),
                        score: 1 + n % 5,
                        comment: None,
                    })
                }));
                for (n, body) in (0..).zip(bodies) {
                    let event = Event {
                        event_id: EventId(Uuid::from_u128(next_id)),
                        occurred_at: at + n,
                        body,
                    };
                    next_id += 1;
                    sent.push(event.clone());
                    epochs.last_mut().unwrap().push(event);
                }
                continue;
            }
            Op::Jump { courier } => EventBody::LocationUpdated(LocationUpdated {
                courier_id: courier_id(*courier),
                position: GeoPoint::from_degrees(52.70, 13.65),
                speed_mm_s: None,
                heading_ddeg: None,
                accuracy_cm: None,
            }),
            Op::Move {
                courier,
                x,
                y,
                speed,
            } => EventBody::LocationUpdated(LocationUpdated {
                courier_id: courier_id(*courier),
                position: point(*x, *y),
                speed_mm_s: speed.map(u32::from),
                heading_ddeg: Some(u16::from(*x) * 100),
                accuracy_cm: None,
            }),
            Op::Zone {
                zone,
                x0,
                y0,
                x1,
                y1,
                dwell,
                triangle,
                hole,
            } => EventBody::ZoneUpserted(ZoneUpserted {
                zone_id: zone_id(*zone),
                name: format!("zone {zone}"),
                shape: shape(*x0, *y0, *x1, *y1, *triangle, *hole),
                dwell_ms: [0, 1_500, 4_000][usize::from(*dwell)],
            }),
            Op::DeleteZone { zone } => EventBody::ZoneDeleted(ZoneDeleted {
                zone_id: zone_id(*zone),
            }),
            Op::Create {
                delivery,
                customer,
                pickup,
                dropoff,
                promise,
            } => {
                believed.insert(*delivery, Status::Created);
                EventBody::DeliveryCreated(DeliveryCreated {
                    delivery_id: delivery_id(*delivery),
                    customer_id: CustomerId(Uuid::from_u128(0x300 + u128::from(*customer))),
                    pickup: point(pickup.0, pickup.1),
                    dropoff: point(dropoff.0, dropoff.1),
                    promised_by: promise.map(|p| at + i64::from(p) * 250),
                })
            }
            Op::Advance {
                delivery,
                courier,
                ending,
            } => {
                let current = believed.get(delivery).copied().unwrap_or(Status::Created);
                let next = match (current, ending) {
                    (s, 0) if !s.is_terminal() => Status::Cancelled,
                    (Status::Created, _) => Status::Assigned,
                    (Status::Assigned, _) => Status::PickedUp,
                    (Status::PickedUp, _) => Status::InTransit,
                    (Status::InTransit, 1) => Status::Failed,
                    (Status::InTransit, _) => Status::Delivered,
                    (terminal, _) => terminal,
                };
                believed.insert(*delivery, next);
                status_changed(*delivery, next, *courier)
            }
            Op::Status {
                delivery,
                status,
                courier,
            } => status_changed(*delivery, Status::ALL[usize::from(*status)], *courier),
            Op::Late {
                delivery,
                status,
                back,
            } => {
                at = clock - i64::from(*back) * 1_000;
                let status = [
                    Status::Cancelled,
                    Status::Failed,
                    Status::Cancelled,
                    Status::Delivered,
                    Status::InTransit,
                ][usize::from(*status)];
                status_changed(*delivery, status, 0)
            }
            Op::Rate { delivery, score } => EventBody::DeliveryRated(DeliveryRated {
                delivery_id: delivery_id(*delivery),
                score: *score,
                comment: (*score < 3).then(|| "late".to_owned()),
            }),
        };
        let event = Event {
            event_id: EventId(Uuid::from_u128(next_id)),
            occurred_at: at,
            body,
        };
        next_id += 1;
        sent.push(event.clone());
        epochs.last_mut().unwrap().push(event);
    }
    epochs
}

fn status_changed(delivery: u8, status: Status, courier: u8) -> EventBody {
    EventBody::StatusChanged(StatusChanged {
        delivery_id: delivery_id(delivery),
        status,
        courier_id: (status == Status::Assigned).then(|| courier_id(courier)),
    })
}

fn courier_id(n: u8) -> CourierId {
    CourierId(Uuid::from_u128(0x100 + u128::from(n)))
}
fn delivery_id(n: u8) -> DeliveryId {
    DeliveryId(Uuid::from_u128(0x200 + u128::from(n)))
}
fn zone_id(n: u8) -> ZoneId {
    ZoneId(Uuid::from_u128(0x400 + u128::from(n)))
}

const SPEED_WINDOW: usize = 3;
/// The maximum courier speed of these streams, m/s. The grid is about 100 m a step and the
/// clock moves in quarter seconds, so this is what "faster than a courier" means here:
/// ordinary moves pass, a move across the grid within a second or two, or to the far
/// point ([`Op::Jump`]) within half a minute, is a jump.
const MAX_SPEED_MPS: f64 = 1_000.0;

fn config(workers: usize) -> DataflowConfig {
    DataflowConfig {
        workers,
        default_speed_mps: 4.0,
        min_speed_mps: 0.5,
        speed_window: SPEED_WINDOW,
        max_epochs_in_flight: 2,
        max_courier_speed_mps: MAX_SPEED_MPS,
    }
}

fn reference() -> Reference {
    Reference::new(
        SPEED_WINDOW,
        pipeline::mps_to_mm_s(MAX_SPEED_MPS),
        EtaConfig::from_mps(4.0, 0.5),
    )
}

/// Runs the dataflow and checks every epoch's output against the reference.
fn check(epochs: &[Vec<Event>], workers: usize) -> Result<(), TestCaseError> {
    let mut reference = reference();
    let (mut sender, mut receiver) = pipeline::start(config(workers)).expect("the dataflow starts");
    let feed = epochs.to_vec();
    let feeder = std::thread::spawn(move || {
        for events in feed {
            sender.send(events).expect("the dataflow takes input");
        }
        sender.close();
    });
    let mut accumulated: BTreeMap<Change, i64> = BTreeMap::new();
    for (epoch, events) in epochs.iter().enumerate() {
        let output = receiver.recv().expect("an output per epoch");
        prop_assert_eq!(output.epoch, epoch as u64);
        let mut seen = BTreeSet::new();
        for (change, diff) in &output.changes {
            prop_assert!(
                *diff == 1 || *diff == -1,
                "unconsolidated diff {} for {:?}",
                diff,
                change
            );
            prop_assert!(
                seen.insert(change.clone()),
                "{:?} twice in one epoch",
                change
            );
            *accumulated.entry(change.clone()).or_default() += diff;
        }
        accumulated.retain(|_, count| *count != 0);
        for (change, count) in &accumulated {
            prop_assert_eq!(
                *count,
                1,
                "{:?} has multiplicity {} after epoch {}",
                change,
                count,
                epoch
            );
        }
        let expected_rejections = reference.epoch(events);
        let expected = reference.records();
        let actual: BTreeSet<Change> = accumulated.keys().cloned().collect();
        if actual != expected {
            let missing: Vec<_> = expected.difference(&actual).collect();
            let extra: Vec<_> = actual.difference(&expected).collect();
            return Err(TestCaseError::fail(format!(
                "epoch {epoch}, {workers} workers: missing {missing:#?}\nextra {extra:#?}"
            )));
        }
        prop_assert_eq!(
            &output.rejections,
            &expected_rejections,
            "rejections of epoch {}",
            epoch
        );
    }
    prop_assert!(receiver.recv().is_none(), "no output after the last epoch");
    feeder.join().expect("the feeder ends");
    prop_assert!(
        matches!(receiver.outcome(), Some(Ok(()))),
        "the workers exit cleanly"
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn dataflow_equals_the_sequential_reference(steps in proptest::collection::vec(step(), 1..160)) {
        let epochs = build(&steps);
        for workers in [1, 2, 4] {
            check(&epochs, workers)?;
        }
    }
}

/// What a pipeline held after each epoch: its records, the epoch's refusals, and the
/// epoch's accepted events (those it did not refuse).
struct History {
    states: Vec<BTreeSet<Change>>,
    rejections: Vec<Vec<delivertrack_dataflow::Rejection>>,
    accepted: Vec<Vec<Event>>,
}

/// Runs epochs through a fresh pipeline, first restoring `restore` if given.
fn run(
    epochs: &[Vec<Event>],
    workers: usize,
    restore: Option<Vec<delivertrack_dataflow::restore::Restore>>,
) -> History {
    let (mut sender, mut receiver) = pipeline::start(config(workers)).expect("the dataflow starts");
    let restoring = restore.is_some();
    let feed = epochs.to_vec();
    let feeder = std::thread::spawn(move || {
        if let Some(records) = restore {
            sender
                .restore(records)
                .expect("the dataflow takes the restore");
        }
        for events in feed {
            sender.send(events).expect("the dataflow takes input");
        }
    });
    let mut history = History {
        states: Vec::new(),
        rejections: Vec::new(),
        accepted: Vec::new(),
    };
    let mut accumulated: BTreeMap<Change, i64> = BTreeMap::new();
    while let Some(output) = receiver.recv() {
        for (change, diff) in &output.changes {
            *accumulated.entry(change.clone()).or_default() += diff;
        }
        accumulated.retain(|_, count| *count != 0);
        let refused: BTreeSet<EventId> = output.rejections.iter().map(|r| r.event_id).collect();
        history.accepted.push(
            output
                .events
                .iter()
                .filter(|e| !refused.contains(&e.event_id))
                .cloned()
                .collect(),
        );
        history.rejections.push(output.rejections);
        history.states.push(accumulated.keys().cloned().collect());
        assert_eq!(output.restored, restoring && history.states.len() == 1);
    }
    feeder.join().expect("the feeder ends");
    history
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Hydration: a pipeline restored from the records and accepted events of another one
    /// (what PostgreSQL keeps) continues exactly like the one that never stopped.
    #[test]
    fn a_restored_pipeline_continues_like_one_that_never_stopped(
        steps in proptest::collection::vec(step(), 1..120),
        split in 0.0..1.0f64,
        workers in 1..3usize,
    ) {
        let epochs = build(&steps);
        let k = ((epochs.len() as f64 * split) as usize).clamp(1, epochs.len());
        let whole = run(&epochs, workers, None);
        let restores = delivertrack_dataflow::restore::from_history(
            whole.states[k - 1].iter().cloned(),
            whole.accepted[..k].iter().flatten().cloned(),
            SPEED_WINDOW,
        );
        let resumed = run(&epochs[k..], workers, Some(restores));
        prop_assert_eq!(&resumed.states[0], &whole.states[k - 1], "the restore epoch rebuilds the state");
        prop_assert!(resumed.rejections[0].is_empty());
        for (offset, state) in resumed.states[1..].iter().enumerate() {
            let epoch = k + offset;
            if state != &whole.states[epoch] {
                let missing: Vec<_> = whole.states[epoch].difference(state).collect();
                let extra: Vec<_> = state.difference(&whole.states[epoch]).collect();
                return Err(TestCaseError::fail(format!("epoch {epoch} after restoring at {k}: missing {missing:#?}\nextra {extra:#?}")));
            }
            prop_assert_eq!(&resumed.rejections[offset + 1], &whole.rejections[epoch]);
        }
    }
}

/// Checks [`a_restored_pipeline_continues_like_one_that_never_stopped`] at every split.
fn check_every_restore_point(epochs: &[Vec<Event>], workers: usize) {
    let whole = run(epochs, workers, None);
    for k in 1..epochs.len() {
        let restores = delivertrack_dataflow::restore::from_history(
            whole.states[k - 1].iter().cloned(),
            whole.accepted[..k].iter().flatten().cloned(),
            SPEED_WINDOW,
        );
        let resumed = run(&epochs[k..], workers, Some(restores));
        for (offset, state) in resumed.states.iter().enumerate() {
            assert_eq!(
                state,
                &whole.states[k - 1 + offset],
                "restored at {k}, epoch {}",
                k - 1 + offset
            );
        }
    }
}

/// Dwell clocks survive a restart: a courier confirmed inside stays inside, one still
/// waiting out the dwell time is confirmed exactly when it would have been.
#[test]
fn restoring_mid_dwell_keeps_the_dwell_clock() {
    use Op::*;
    let s = |op, advance| Step {
        op,
        advance,
        lag: 0,
    };
    // Dwell 1.5 s. Courier 0 is present from t=0.5 s; restored after the epoch ending at
    // t=1 s, its next fix at t=2.25 s confirms it only if its clock still starts at 0.5 s.
    let steps = vec![
        s(
            Zone {
                zone: 0,
                x0: 0,
                y0: 0,
                x1: 5,
                y1: 5,
                dwell: 1,
                triangle: false,
                hole: false,
            },
            0,
        ),
        s(
            Move {
                courier: 1,
                x: 1,
                y: 1,
                speed: None,
            },
            1,
        ),
        s(
            Move {
                courier: 0,
                x: 2,
                y: 2,
                speed: None,
            },
            1,
        ),
        s(Cut, 0),
        s(
            Move {
                courier: 0,
                x: 2,
                y: 3,
                speed: None,
            },
            2,
        ),
        s(
            Move {
                courier: 1,
                x: 1,
                y: 2,
                speed: None,
            },
            4,
        ),
        s(Cut, 0),
        s(
            Move {
                courier: 0,
                x: 3,
                y: 3,
                speed: None,
            },
            1,
        ),
        s(Cut, 0),
        s(
            Move {
                courier: 0,
                x: 3,
                y: 4,
                speed: None,
            },
            4,
        ),
        s(
            Move {
                courier: 1,
                x: 9,
                y: 9,
                speed: None,
            },
            1,
        ),
    ];
    let epochs = build(&steps);
    let whole = run(&epochs, 1, None);
    let inside = |state: &BTreeSet<Change>| {
        state
            .iter()
            .filter(|c| matches!(c, Change::Inside(..)))
            .count()
    };
    assert_eq!(
        whole.states.iter().map(inside).collect::<Vec<_>>(),
        vec![0, 1, 2, 1],
        "the stream exercises dwell"
    );
    for workers in [1, 2] {
        check_every_restore_point(&epochs, workers);
    }
}

/// A hand-written stream that must exercise every collection, so the generated ones are
/// known to be able to reach them.
#[test]
fn a_full_lifecycle_touches_every_collection() {
    use Op::*;
    let s = |op| Step {
        op,
        advance: 4,
        lag: 0,
    };
    let steps = vec![
        s(Zone {
            zone: 0,
            x0: 0,
            y0: 0,
            x1: 5,
            y1: 5,
            dwell: 1,
            triangle: false,
            hole: false,
        }),
        s(Create {
            delivery: 0,
            customer: 0,
            pickup: (1, 1),
            dropoff: (3, 3),
            promise: Some(70),
        }),
        s(Cut),
        s(Move {
            courier: 0,
            x: 8,
            y: 8,
            speed: None,
        }),
        s(Advance {
            delivery: 0,
            courier: 0,
            ending: 5,
        }),
        s(Move {
            courier: 0,
            x: 2,
            y: 2,
            speed: None,
        }),
        s(Cut),
        s(Move {
            courier: 0,
            x: 2,
            y: 3,
            speed: Some(5_000),
        }),
        s(Advance {
            delivery: 0,
            courier: 0,
            ending: 5,
        }),
        s(Advance {
            delivery: 0,
            courier: 0,
            ending: 5,
        }),
        s(Cut),
        s(Advance {
            delivery: 0,
            courier: 0,
            ending: 5,
        }),
        s(Rate {
            delivery: 0,
            score: 4,
        }),
        s(Status {
            delivery: 0,
            status: 1,
            courier: 0,
        }),
        s(Repeat { back: 1 }),
        s(Cut),
        s(DeleteZone { zone: 0 }),
    ];
    let epochs = build(&steps);
    let mut kinds = std::collections::HashSet::new();
    let mut reference = reference();
    let mut rejected = 0;
    for events in &epochs {
        rejected += reference.epoch(events).len();
        for change in reference.records() {
            kinds.insert(std::mem::discriminant(&change));
        }
    }
    assert_eq!(kinds.len(), 7, "every kind of record appears");
    assert_eq!(
        rejected, 1,
        "the illegal assigned-after-delivered is refused, the replay is not"
    );
    for workers in [1, 2, 4] {
        check(&epochs, workers).unwrap();
    }
    check_every_restore_point(&epochs, 2);
}

/// Two seconds apart, one step each: delivery 0 created at 2 s (promised for 52 s when
/// `promised`), assigned at 4 s, picked up at 6 s, in transit at 8 s, delivered at 10 s;
/// then `rest`.
fn delivered_at_ten_seconds(promised: bool, rest: Vec<Op>) -> Vec<Step> {
    let advance = || Op::Advance {
        delivery: 0,
        courier: 0,
        ending: 5,
    };
    let create = Op::Create {
        delivery: 0,
        customer: 0,
        pickup: (1, 1),
        dropoff: (3, 3),
        promise: promised.then_some(200),
    };
    [create, advance(), advance(), advance(), advance()]
        .into_iter()
        .chain(rest)
        .map(|op| Step {
            op,
            advance: 8,
            lag: 0,
        })
        .collect()
}

#[test]
fn a_late_cancellation_retracts_the_delivery_and_every_aggregate_it_touched() {
    use Op::*;
    use delivertrack_dataflow::model::Scope;
    // Rated at 12 s; then, in the next epoch (clock 16 s), a `cancelled` stamped 9 s arrives.
    let steps = delivered_at_ten_seconds(
        true,
        vec![
            Rate {
                delivery: 0,
                score: 5,
            },
            Cut,
            Late {
                delivery: 0,
                status: 0,
                back: 7,
            },
        ],
    );
    let epochs = build(&steps);
    let history = run(&epochs, 2, None);
    let delivery = |states: &BTreeSet<Change>| {
        states
            .iter()
            .find_map(|change| match change {
                Change::Delivery(_, state) => Some(state.clone()),
                _ => None,
            })
            .expect("the delivery is maintained")
    };
    let tally = |states: &BTreeSet<Change>, scope: &Scope| {
        states
            .iter()
            .find_map(|change| match change {
                Change::Metric(s, tally) if s == scope => Some(*tally),
                _ => None,
            })
            .unwrap_or_default()
    };
    let scopes = [Scope::Overall, Scope::Courier(courier_id(0))];

    let before = &history.states[0];
    assert_eq!(
        delivery(before).status,
        delivertrack_dataflow::Status::Delivered
    );
    for scope in &scopes {
        let tally = tally(before, scope);
        assert_eq!(
            (tally.delivered, tally.cancelled, tally.rated),
            (1, 0, 1),
            "{scope:?}"
        );
        assert_eq!(tally.on_time, 1, "{scope:?}");
    }

    let after = &history.states[1];
    assert!(
        history.rejections[1].is_empty(),
        "the correction is accepted"
    );
    let corrected = delivery(after);
    assert_eq!(corrected.status, delivertrack_dataflow::Status::Cancelled);
    assert_eq!(corrected.ended_at, Some(START + 9_000));
    assert_eq!(
        corrected.rating, None,
        "a cancelled delivery shows no rating"
    );
    for scope in &scopes {
        let tally = tally(after, scope);
        assert_eq!(
            (
                tally.delivered,
                tally.cancelled,
                tally.rated,
                tally.score_sum
            ),
            (0, 1, 0, 0),
            "{scope:?}"
        );
        assert_eq!(
            (tally.on_time, tally.created_to_delivered_ms),
            (0, 0),
            "{scope:?}"
        );
    }

    for workers in [1, 2, 4] {
        check(&epochs, workers).unwrap();
    }
    check_every_restore_point(&epochs, 2);
}

#[test]
fn a_late_step_that_does_not_follow_where_it_stands_is_refused() {
    use Op::*;
    // In the next epoch (clock 14 s) an `in_transit` stamped 9 s arrives: after the one at
    // 8 s it is no transition.
    let steps = delivered_at_ten_seconds(
        false,
        vec![
            Cut,
            Late {
                delivery: 0,
                status: 4,
                back: 5,
            },
        ],
    );
    let epochs = build(&steps);
    let history = run(&epochs, 1, None);
    assert_eq!(history.rejections[1].len(), 1);
    assert_eq!(
        history.rejections[1][0].reason,
        delivertrack_dataflow::RejectReason::IllegalTransition {
            from: delivertrack_dataflow::Status::InTransit,
            to: delivertrack_dataflow::Status::InTransit
        }
    );
    assert_eq!(history.states[0], history.states[1], "nothing changes");
    for workers in [1, 2, 4] {
        check(&epochs, workers).unwrap();
    }
}

/// The generated streams reach every refusal the dataflow makes, the bounds included
/// (`implausible_jump`, `too_many_ratings`), in a good share of the cases: otherwise the
/// equivalence property would say little about them.
#[test]
fn the_generated_streams_reach_every_refusal() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strategy = proptest::collection::vec(step(), 1..160);
    let cases = 64;
    let mut cases_with: BTreeMap<&'static str, usize> = BTreeMap::new();
    let (mut fixes, mut jumps) = (0, 0);
    for _ in 0..cases {
        let steps = strategy.new_tree(&mut runner).unwrap().current();
        let mut reference = reference();
        let mut codes = BTreeSet::new();
        for events in build(&steps) {
            fixes += events
                .iter()
                .filter(|e| e.kind() == EventKind::LocationUpdated)
                .count();
            let refused = reference.epoch(&events);
            jumps += refused
                .iter()
                .filter(|r| r.reason.code() == "implausible_jump")
                .count();
            codes.extend(refused.iter().map(|r| r.reason.code()));
        }
        for code in codes {
            *cases_with.entry(code).or_default() += 1;
        }
    }
    eprintln!(
        "cases with each refusal, of {cases}: {cases_with:?}; fixes refused as jumps: {jumps} of {fixes}"
    );
    for code in [
        "stale",
        "unknown_delivery",
        "illegal_transition",
        "not_rateable",
        "implausible_jump",
        "too_many_ratings",
    ] {
        assert!(
            cases_with.get(code).copied().unwrap_or(0) >= cases / 8,
            "{code} in too few cases: {cases_with:?}"
        );
    }
}

/// A jump is refused, moves nothing and adds no distance; the next fix is judged from the
/// last accepted one, so a courier that really went far is accepted once enough time has
/// passed; a fix in the same instant at another place is a jump; a restart keeps all that.
#[test]
fn an_implausible_jump_moves_nothing_and_adds_no_distance() {
    use Op::*;
    let at = |op, advance, lag| Step { op, advance, lag };
    let courier = |state: &BTreeSet<Change>| {
        state
            .iter()
            .find_map(|change| match change {
                Change::Courier(_, state) => Some(state.clone()),
                _ => None,
            })
            .expect("the courier is maintained")
    };
    let grid = |x, y| Move {
        courier: 0,
        x,
        y,
        speed: None,
    };
    let steps = vec![
        at(grid(0, 0), 0, 0),
        at(Cut, 0, 0),
        // 100 m north after 1 s: 100 m/s, accepted.
        at(grid(0, 1), 4, 0),
        at(Cut, 0, 0),
        // 25 km away 1 s later: refused.
        at(Jump { courier: 0 }, 4, 0),
        at(Cut, 0, 0),
        // Back on the grid, 100 m from the last accepted fix after 2 s: accepted.
        at(grid(0, 2), 4, 0),
        at(Cut, 0, 0),
        // The same instant as the last accepted fix, elsewhere (lag 0, advance 0): refused.
        at(grid(1, 2), 0, 0),
        at(Cut, 0, 0),
        // 25 km 30 s after the last accepted fix: 830 m/s, accepted.
        at(Jump { courier: 0 }, 120, 0),
    ];
    let epochs = build(&steps);
    let history = run(&epochs, 2, None);
    let codes: Vec<Vec<&str>> = history
        .rejections
        .iter()
        .map(|refused| refused.iter().map(|r| r.reason.code()).collect())
        .collect();
    assert_eq!(
        codes,
        vec![
            vec![],
            vec![],
            vec!["implausible_jump"],
            vec![],
            vec!["implausible_jump"],
            vec![]
        ]
    );
    assert_eq!(
        history.states[2], history.states[1],
        "a refused jump changes nothing"
    );
    let (before, after) = (courier(&history.states[3]), courier(&history.states[4]));
    assert_eq!(before, after, "nor does one at the same instant");
    assert_eq!(before.position, point(0, 2));
    let one_step = courier(&history.states[1]).odometer_mm;
    assert!(
        (one_step as i64 - 111_195).abs() < 100,
        "one grid step: {one_step} mm"
    );
    assert_eq!(before.odometer_mm, 2 * one_step, "the jump added nothing");
    let far = courier(&history.states[5]);
    assert_eq!(far.position, GeoPoint::from_degrees(52.70, 13.65));
    assert!(far.odometer_mm > before.odometer_mm + 20_000_000);
    for workers in [1, 2, 4] {
        check(&epochs, workers).unwrap();
    }
    check_every_restore_point(&epochs, 2);
}

/// A delivery takes five ratings; the sixth and later are refused (a replay of an
/// accepted one is still a replay), also after a restart between them.
#[test]
fn a_delivery_takes_five_ratings_and_refuses_the_rest() {
    use Op::*;
    let steps = delivered_at_ten_seconds(
        false,
        vec![
            Rate {
                delivery: 0,
                score: 1,
            },
            Rate {
                delivery: 0,
                score: 2,
            },
            Cut,
            Rerate { pick: 0, times: 3 },
            Repeat { back: 0 },
            Cut,
            Rate {
                delivery: 0,
                score: 5,
            },
            Rerate { pick: 0, times: 2 },
        ],
    );
    let epochs = build(&steps);
    let history = run(&epochs, 2, None);
    let codes: Vec<Vec<&str>> = history
        .rejections
        .iter()
        .map(|refused| refused.iter().map(|r| r.reason.code()).collect())
        .collect();
    assert_eq!(
        codes,
        vec![
            vec![],
            vec![],
            vec!["too_many_ratings", "too_many_ratings", "too_many_ratings"]
        ]
    );
    let rating = |state: &BTreeSet<Change>| {
        state.iter().find_map(|change| match change {
            Change::Delivery(_, state) => state.rating.as_ref().map(|r| r.score),
            _ => None,
        })
    };
    assert_eq!(
        rating(&history.states[1]),
        Some(3),
        "the fifth rating shows"
    );
    assert_eq!(rating(&history.states[2]), Some(3), "and stays");
    for workers in [1, 2, 4] {
        check(&epochs, workers).unwrap();
    }
    check_every_restore_point(&epochs, 2);
}
