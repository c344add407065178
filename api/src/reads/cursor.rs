//! The opaque cursor of `GET /deliveries`: where the previous page ended.
//!
//! Pages are in the order `created_at` descending, then id ascending: a total order that
//! does not change while a client walks the pages (a delivery's creation time never
//! changes, and new deliveries sort before the cursor), so a walk returns every delivery
//! that existed when it started exactly once. The cursor holds the last key of a page,
//! `(created_at, id)`, as URL-safe base64 of a version byte, the time (8 bytes, big
//! endian) and the id (16 bytes). Clients must not build or read it.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use delivertrack_dataflow::{DeliveryId, UnixMillis};
use uuid::Uuid;

/// The format version, so that a cursor of another format is refused rather than misread.
const VERSION: u8 = 1;
/// Version byte, time, id.
const LEN: usize = 1 + 8 + 16;

/// Every cursor text, and only those, as the OpenAPI document's `pattern`: 34 characters
/// of URL-safe base64 (25 bytes), starting with the version byte 1 (`A` and a character
/// whose top two bits are `01`) and ending in a character whose low four bits are unused
/// (zero). Any text it matches decodes, so a client that follows the document is never
/// refused.
pub const PATTERN: &str = "^A[Q-Za-f][A-Za-z0-9_-]{31}[AQgw]$";

/// The position of one delivery in the list's order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PageKey {
    /// `created_at` negated: ascending keys are newest first.
    newest_first: std::cmp::Reverse<UnixMillis>,
    /// Ties broken by id.
    id: DeliveryId,
}

impl PageKey {
    /// The key of a delivery created at `created_at`.
    pub fn new(created_at: UnixMillis, id: DeliveryId) -> Self {
        Self {
            newest_first: std::cmp::Reverse(created_at),
            id,
        }
    }

    /// The delivery at this position.
    pub fn id(&self) -> DeliveryId {
        self.id
    }

    /// The cursor text of this key.
    pub fn encode(&self) -> String {
        let mut bytes = [0u8; LEN];
        bytes[0] = VERSION;
        bytes[1..9].copy_from_slice(&self.newest_first.0.to_be_bytes());
        bytes[9..].copy_from_slice(self.id.0.as_bytes());
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// The key a cursor text holds; `None` when it is not one of ours.
    pub fn decode(text: &str) -> Option<Self> {
        let bytes = URL_SAFE_NO_PAD.decode(text).ok()?;
        let bytes: [u8; LEN] = bytes.try_into().ok()?;
        if bytes[0] != VERSION {
            return None;
        }
        let created_at = UnixMillis::from_be_bytes(bytes[1..9].try_into().ok()?);
        let id = Uuid::from_slice(&bytes[9..]).ok()?;
        Some(Self::new(created_at, DeliveryId(id)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// What [`PATTERN`] says, by hand (no regex engine here).
    fn matches_pattern(text: &str) -> bool {
        let b = text.as_bytes();
        let base64 = |c: &u8| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_';
        b.len() == 34
            && b[0] == b'A'
            && matches!(b[1], b'Q'..=b'Z' | b'a'..=b'f')
            && b[2..33].iter().all(base64)
            && matches!(b[33], b'A' | b'Q' | b'g' | b'w')
    }

    #[test]
    fn the_pattern_holds_exactly_the_cursors() {
        assert_eq!(
            PATTERN, "^A[Q-Za-f][A-Za-z0-9_-]{31}[AQgw]$",
            "matches_pattern must follow"
        );
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..2_000 {
            // Every key's cursor matches.
            let key = PageKey::new(
                next() as i64,
                DeliveryId(Uuid::from_u64_pair(next(), next())),
            );
            assert!(matches_pattern(&key.encode()), "{}", key.encode());
            // Every text that matches decodes.
            let mut text = String::from("A");
            text.push(b"QRSTUVWXYZabcdef"[next() as usize % 16] as char);
            for _ in 0..31 {
                text.push(ALPHABET[next() as usize % 64] as char);
            }
            text.push(b"AQgw"[next() as usize % 4] as char);
            assert!(matches_pattern(&text));
            assert!(PageKey::decode(&text).is_some(), "{text}");
        }
    }

    #[test]
    fn a_cursor_round_trips_and_garbage_is_refused() {
        let key = PageKey::new(1_796_025_600_000, DeliveryId(Uuid::from_u128(42)));
        let text = key.encode();
        assert_eq!(PageKey::decode(&text), Some(key));
        assert!(
            text.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
        for bad in ["", "x", "not base64!", &text[1..], &format!("{text}A")] {
            assert_eq!(PageKey::decode(bad), None, "{bad:?}");
        }
        let mut other_version = URL_SAFE_NO_PAD.decode(&text).unwrap();
        other_version[0] = 2;
        assert_eq!(
            PageKey::decode(&URL_SAFE_NO_PAD.encode(other_version)),
            None
        );
    }

    #[test]
    fn keys_order_newest_first_then_by_id() {
        let a = PageKey::new(2_000, DeliveryId(Uuid::from_u128(9)));
        let b = PageKey::new(1_000, DeliveryId(Uuid::from_u128(1)));
        let c = PageKey::new(1_000, DeliveryId(Uuid::from_u128(2)));
        let mut keys = vec![c, b, a];
        keys.sort();
        assert_eq!(keys, vec![a, b, c]);
    }
}
