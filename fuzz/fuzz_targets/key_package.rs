//! Key-package validation before the server stores a published package.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| quicnprotochat_fuzz::mls::check_key_package(data));
