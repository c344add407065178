//! `contract::decode_geometry` (the `geometry` of `zone.upserted`) on arbitrary JSON: never
//! panics, and every shape it accepts is usable. See `oracle.rs`.
#![no_main]

#[path = "../oracle.rs"]
mod oracle;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    oracle::zone_geometry_bytes(data);
});
