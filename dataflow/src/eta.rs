//! Speed, distance and ETA arithmetic, shared by the dataflow and everything that must
//! agree with it bit for bit.
//!
//! Distances are summed in whole millimetres and speeds are whole mm/s, so that the same
//! fixes give the same odometer and the same ETA on any worker, in any process.

use crate::event::UnixMillis;
use crate::geometry::GeoPoint;
use crate::ids::CourierId;
use crate::lifecycle::Status;
use crate::model::Eta;

/// How ETAs are estimated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EtaConfig {
    /// Assumed speed when the courier's is unknown or too low, mm/s.
    pub default_speed_mm_s: u32,
    /// Estimated speeds below this are not trusted, mm/s.
    pub min_speed_mm_s: u32,
}

impl EtaConfig {
    /// From speeds in m/s.
    pub fn from_mps(default_speed_mps: f64, min_speed_mps: f64) -> Self {
        Self {
            default_speed_mm_s: mps_to_mm_s(default_speed_mps).max(1),
            min_speed_mm_s: mps_to_mm_s(min_speed_mps),
        }
    }
}

impl Default for EtaConfig {
    fn default() -> Self {
        Self::from_mps(5.0, 0.5)
    }
}

fn mps_to_mm_s(mps: f64) -> u32 {
    if mps.is_finite() && mps > 0.0 {
        (mps * 1000.0).round().min(f64::from(u32::MAX)) as u32
    } else {
        0
    }
}

/// Distance between two fixes in whole millimetres: one odometer step.
pub fn step_mm(from: GeoPoint, to: GeoPoint) -> u64 {
    (from.distance_m(&to) * 1000.0).round() as u64
}

/// Speed over a window of fixes (oldest first): path length over elapsed time, mm/s.
/// `None` with fewer than two fixes or less than one second between the first and last.
pub fn window_speed_mm_s(window: &[(UnixMillis, GeoPoint)]) -> Option<u32> {
    let (first, last) = (window.first()?, window.last()?);
    let span_ms = last.0.checked_sub(first.0)?;
    if span_ms < 1000 {
        return None;
    }
    let path_mm: u64 = window
        .windows(2)
        .map(|pair| step_mm(pair[0].1, pair[1].1))
        .sum();
    u32::try_from(path_mm.saturating_mul(1000) / span_ms as u64).ok()
}

/// The hour bucket of a time, for counting active hours.
pub fn hour_bucket(at: UnixMillis) -> i64 {
    at.div_euclid(3_600_000)
}

/// What an ETA is computed from: an active delivery and its courier's latest fix.
#[derive(Clone, Copy, Debug)]
pub struct EtaInput {
    /// The courier.
    pub courier_id: CourierId,
    /// The delivery's status (assigned: via the pickup; otherwise straight to the dropoff).
    pub status: Status,
    /// Pickup point.
    pub pickup: GeoPoint,
    /// Dropoff point.
    pub dropoff: GeoPoint,
    /// The courier's position.
    pub position: GeoPoint,
    /// When the courier was there.
    pub at: UnixMillis,
    /// The courier's speed, if known.
    pub speed_mm_s: Option<u32>,
}

/// Remaining great-circle distance over the courier's speed (or the default speed).
pub fn estimate(input: &EtaInput, config: &EtaConfig) -> Eta {
    let remaining = match input.status {
        Status::Assigned => {
            input.position.distance_m(&input.pickup) + input.pickup.distance_m(&input.dropoff)
        }
        _ => input.position.distance_m(&input.dropoff),
    };
    let speed_mm_s = input
        .speed_mm_s
        .filter(|speed| *speed >= config.min_speed_mm_s && *speed > 0)
        .unwrap_or(config.default_speed_mm_s)
        .max(1);
    let remaining_mm = (remaining * 1000.0).round() as u64;
    let travel_ms = remaining_mm
        .saturating_mul(1000)
        .div_ceil(u64::from(speed_mm_s));
    Eta {
        courier_id: input.courier_id,
        status: input.status,
        remaining_m: u32::try_from((remaining_mm + 500) / 1000).unwrap_or(u32::MAX),
        speed_mm_s,
        eta_at: input
            .at
            .saturating_add(i64::try_from(travel_ms).unwrap_or(i64::MAX)),
        as_of: input.at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn input(status: Status, speed: Option<u32>) -> EtaInput {
        EtaInput {
            courier_id: CourierId(Uuid::from_u128(7)),
            status,
            pickup: GeoPoint::from_degrees(52.51, 13.40),
            dropoff: GeoPoint::from_degrees(52.50, 13.40),
            position: GeoPoint::from_degrees(52.52, 13.40),
            at: 1_000_000,
            speed_mm_s: speed,
        }
    }

    #[test]
    fn an_assigned_delivery_goes_via_the_pickup() {
        let config = EtaConfig::default();
        let assigned = estimate(&input(Status::Assigned, Some(10_000)), &config);
        let in_transit = estimate(&input(Status::InTransit, Some(10_000)), &config);
        // 0.01° of latitude is about 1.11 km: 2.22 km via the pickup, 2.22 km straight.
        assert!(
            (2_200..2_250).contains(&assigned.remaining_m),
            "{}",
            assigned.remaining_m
        );
        assert_eq!(assigned.remaining_m, in_transit.remaining_m);
        let mut picked_up = input(Status::PickedUp, Some(10_000));
        picked_up.position = picked_up.pickup;
        assert!((1_100..1_125).contains(&estimate(&picked_up, &config).remaining_m));
        // At 10 m/s, 2.2 km takes about 222 s.
        let travel = assigned.eta_at - assigned.as_of;
        assert!((220_000..225_000).contains(&travel), "{travel}");
    }

    #[test]
    fn unknown_or_implausible_speeds_fall_back_to_the_default() {
        let config = EtaConfig::from_mps(4.0, 0.5);
        assert_eq!(
            estimate(&input(Status::InTransit, None), &config).speed_mm_s,
            4_000
        );
        assert_eq!(
            estimate(&input(Status::InTransit, Some(100)), &config).speed_mm_s,
            4_000
        );
        assert_eq!(
            estimate(&input(Status::InTransit, Some(7_000)), &config).speed_mm_s,
            7_000
        );
    }

    #[test]
    fn window_speed_is_path_over_time() {
        let a = GeoPoint::from_degrees(52.50, 13.40);
        let b = GeoPoint::from_degrees(52.51, 13.40);
        let speed = window_speed_mm_s(&[(0, a), (100_000, b)]).unwrap_or(0);
        assert!((11_000..11_200).contains(&speed), "{speed}");
        assert_eq!(window_speed_mm_s(&[(0, a)]), None);
        assert_eq!(window_speed_mm_s(&[(0, a), (500, b)]), None);
        // Back and forth: the path counts, not the displacement.
        let there_and_back = window_speed_mm_s(&[(0, a), (50_000, b), (100_000, a)]).unwrap_or(0);
        assert!(there_and_back > 2 * speed - 10);
    }

    #[test]
    fn hour_buckets_split_at_the_hour() {
        assert_eq!(hour_bucket(3_599_999), 0);
        assert_eq!(hour_bucket(3_600_000), 1);
        assert_eq!(hour_bucket(-1), -1);
    }
}
