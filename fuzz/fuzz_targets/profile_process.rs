//! A group member's client processing a delivered payload.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| quicnprotochat_fuzz::profile::check(data));
