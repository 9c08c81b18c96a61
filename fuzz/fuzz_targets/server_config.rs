//! The server's TOML configuration file.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| quicnprotochat_fuzz::config::check(data));
