//! Writes the fuzz corpora (`fuzz/corpus/<target>/`) and the fixture profile
//! (`fuzz/fixtures/`) from real objects:
//!
//! ```text
//! cargo run --manifest-path fuzz/Cargo.toml --example write_seeds
//! ```

fn main() -> Result<(), Box<dyn std::error::Error>> {
    quicnprotochat_fuzz::seeds::write_all(&quicnprotochat_fuzz::profile::fuzz_dir())
}
