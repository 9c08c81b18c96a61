//! What the fuzz targets run on each input, and the seed writer that makes
//! their corpora (`fuzz/corpus/<target>/`) and the profile fixture from real
//! objects.  Each target in `fuzz_targets/` is one line calling into here.

pub mod app_message;
pub mod config;
pub mod mls;
pub mod profile;
pub mod rpc;
pub mod seeds;
