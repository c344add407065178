//! `contract::decode_message` on arbitrary bytes: never panics, and every event it accepts
//! survives its own encoding. See `oracle.rs`.
#![no_main]

#[path = "../oracle.rs"]
mod oracle;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    oracle::decode_message_bytes(data);
});
