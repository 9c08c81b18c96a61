//! The MLS framing header the server reads from an enqueued payload.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| quicnprotochat_fuzz::mls::check_framing(data));
