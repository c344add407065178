//! The reference's own speed and ETA arithmetic, written out from the specification rather
//! than taken from the crate, so that the equivalence test checks the crate's ETAs and speeds
//! instead of comparing them with themselves.
//!
//! Only the units and rounding are shared with the crate, because the outputs must be equal:
//! great-circle distances by the haversine formula on a sphere of the GRS80 mean radius,
//! steps rounded to whole millimetres, speeds in whole mm/s (truncated), travel times rounded
//! up to the next millisecond, remaining distance rounded to the nearest metre.

use delivertrack_dataflow::eta::EtaConfig;
use delivertrack_dataflow::event::UnixMillis;
use delivertrack_dataflow::geometry::GeoPoint;
use delivertrack_dataflow::model::{CourierState, DeliveryState, Eta};
use delivertrack_dataflow::{CourierId, Status};

/// Mean earth radius in metres (GRS80 R₁), the sphere the crate measures on.
const EARTH_RADIUS_M: f64 = 6_371_008.8;

/// A fixed-point position (1e-7 degrees) as (latitude, longitude) in degrees.
fn degrees(point: GeoPoint) -> (f64, f64) {
    (f64::from(point.lat_e7) / 1e7, f64::from(point.lon_e7) / 1e7)
}

/// Great-circle distance in metres, by the haversine formula.
pub fn great_circle_m(from: GeoPoint, to: GeoPoint) -> f64 {
    let (lat1, lon1) = degrees(from);
    let (lat2, lon2) = degrees(to);
    let sin_half_dlat = ((lat2 - lat1).to_radians() / 2.0).sin();
    let sin_half_dlon = ((lon2 - lon1).to_radians() / 2.0).sin();
    let h = sin_half_dlat * sin_half_dlat
        + lat1.to_radians().cos() * lat2.to_radians().cos() * sin_half_dlon * sin_half_dlon;
    EARTH_RADIUS_M * (2.0 * h.sqrt().asin())
}

/// Metres to whole millimetres, rounded to the nearest.
fn to_mm(metres: f64) -> u64 {
    (metres * 1000.0).round() as u64
}

/// Speed over the given fixes (oldest first): the path along them, in millimetres step by
/// step, over the time from the first to the last, in mm/s. Unknown with less than one second
/// between the first and the last fix (so also with fewer than two fixes).
pub fn window_speed_mm_s(fixes: &[(UnixMillis, GeoPoint)]) -> Option<u32> {
    let (first_at, _) = *fixes.first()?;
    let (last_at, _) = *fixes.last()?;
    let span_ms = last_at.checked_sub(first_at)?;
    if span_ms < 1000 {
        return None;
    }
    let mut path_mm: u64 = 0;
    for i in 1..fixes.len() {
        path_mm += to_mm(great_circle_m(fixes[i - 1].1, fixes[i].1));
    }
    let speed = path_mm.saturating_mul(1000) / span_ms as u64;
    u32::try_from(speed).ok()
}

/// The ETA of an active delivery from its courier's latest fix: the remaining great-circle
/// distance (courier → pickup → dropoff while assigned, courier → dropoff once picked up) over
/// the courier's speed, or the default speed when that is unknown, zero or below the minimum.
pub fn estimate(
    courier_id: CourierId,
    courier: &CourierState,
    delivery: &DeliveryState,
    config: &EtaConfig,
) -> Eta {
    let remaining = if delivery.status == Status::Assigned {
        great_circle_m(courier.position, delivery.pickup)
            + great_circle_m(delivery.pickup, delivery.dropoff)
    } else {
        great_circle_m(courier.position, delivery.dropoff)
    };
    let remaining_mm = to_mm(remaining);

    let speed_mm_s = match courier.speed_mm_s {
        Some(speed) if speed > 0 && speed >= config.min_speed_mm_s => speed,
        _ => config.default_speed_mm_s.max(1),
    };

    // Milliseconds to cover the remaining distance, rounded up.
    let distance_mm_ms = remaining_mm.saturating_mul(1000);
    let speed = u64::from(speed_mm_s);
    let mut travel_ms = distance_mm_ms / speed;
    if !distance_mm_ms.is_multiple_of(speed) {
        travel_ms += 1;
    }

    Eta {
        courier_id,
        status: delivery.status,
        remaining_m: u32::try_from((remaining_mm + 500) / 1000).unwrap_or(u32::MAX),
        speed_mm_s,
        eta_at: courier
            .at
            .saturating_add(i64::try_from(travel_ms).unwrap_or(i64::MAX)),
        as_of: courier.at,
    }
}

#[test]
fn the_reference_measures_great_circles_in_metres() {
    // 0.01° along a meridian is R · π/180 · 0.01 ≈ 1 111.95 m on any longitude.
    let a = GeoPoint::from_degrees(52.50, 13.40);
    let b = GeoPoint::from_degrees(52.51, 13.40);
    assert!((great_circle_m(a, b) - 1_111.95).abs() < 0.01);
    // New York to London, about 5 570 km.
    let new_york = GeoPoint::from_degrees(40.7128, -74.006);
    let london = GeoPoint::from_degrees(51.5074, -0.1278);
    assert!((great_circle_m(new_york, london) - 5_570_230.0).abs() < 10.0);
    // 1 111.95 m in 100 s; too short a window has no speed.
    assert_eq!(window_speed_mm_s(&[(0, a), (100_000, b)]), Some(11_119));
    assert_eq!(window_speed_mm_s(&[(0, a), (999, b)]), None);
    assert_eq!(window_speed_mm_s(&[(0, a)]), None);
}
