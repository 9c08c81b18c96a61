//! Bytes of a peer's RPC stream: the frame guard, Cap'n Proto framing, and
//! every request and result struct read in full.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| quicnprotochat_fuzz::rpc::check(data));
