//! The checked-in generated code must match what the schema produces.
//!
//! Regenerate with `QUICNPROTOCHAT_BLESS=1 cargo test -p quicnprotochat-proto --test generated`
//! (needs the `capnp` compiler: Debian package `capnproto`).

use std::path::PathBuf;

#[test]
fn generated_code_is_fresh() {
    // The run-time value: a test binary reused from another checkout must
    // still read this one.
    let crate_dir = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    );
    let schemas = crate_dir.join("../../schemas");
    let out = tempfile::tempdir().unwrap();
    let mut cmd = capnpc::CompilerCommand::new();
    cmd.src_prefix(&schemas)
        .import_path(&schemas)
        .file(schemas.join("quicnprotochat.capnp"))
        .output_path(out.path())
        .default_parent_module(vec!["schema".into()]);
    if let Err(e) = cmd.run() {
        panic!(
            "running the Cap'n Proto compiler failed ({e}); install it (Debian: apt-get install capnproto)"
        );
    }
    let fresh = std::fs::read_to_string(out.path().join("quicnprotochat_capnp.rs")).unwrap();
    let checked_in = crate_dir.join("src/generated/quicnprotochat_capnp.rs");
    if std::env::var_os("QUICNPROTOCHAT_BLESS").is_some() {
        std::fs::write(&checked_in, &fresh).unwrap();
        return;
    }
    let current = std::fs::read_to_string(&checked_in).unwrap_or_default();
    assert!(
        current == fresh,
        "src/generated/quicnprotochat_capnp.rs is stale: rerun with QUICNPROTOCHAT_BLESS=1"
    );
}
