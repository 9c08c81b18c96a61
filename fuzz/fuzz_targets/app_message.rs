//! The application message codec (and its peer addresses).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| quicnprotochat_fuzz::app_message::check(data));
