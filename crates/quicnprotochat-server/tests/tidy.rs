//! Layering rules of the workspace, checked on the source text (in the
//! spirit of rust-analyzer's tidy tests), so a change that breaks one fails
//! here instead of in a reviewer's head.

use std::path::{Path, PathBuf};

/// Files outside `quicnprotochat-proto` allowed to use Cap'n Proto: one
/// adapter module on each side.
const CAPNP_ADAPTERS: [&str; 2] = [
    "crates/quicnprotochat-server/src/rpc.rs",
    "crates/quicnprotochat-client/src/connection.rs",
];

/// What marks a use of Cap'n Proto or its generated types.
const CAPNP_MARKERS: [&str; 4] = ["capnp::", "capnp_rpc", "schema::", "::capnp"];

fn workspace_root() -> PathBuf {
    // The run-time value: a test binary reused from a shared target
    // directory reads this checkout's files.
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("run by cargo");
    Path::new(&manifest)
        .ancestors()
        .nth(2)
        .expect("crates/<name> sits two levels below the root")
        .to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// (path relative to the root, text) of every source file under
/// `crates/quicnprotochat-<krate>/src` for each of `crates`.
fn sources(root: &Path, crates: &[&str]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for krate in crates {
        let mut files = Vec::new();
        rust_files(
            &root.join(format!("crates/quicnprotochat-{krate}/src")),
            &mut files,
        );
        assert!(!files.is_empty(), "no sources found for {krate}");
        for file in files {
            let rel = file
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            out.push((rel, std::fs::read_to_string(&file).unwrap()));
        }
    }
    out
}

/// Lines of `text` that are code (not comments).
fn code_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines().enumerate().filter(|(_, l)| {
        let t = l.trim_start();
        !(t.starts_with("//") || t.starts_with("*") || t.starts_with("/*"))
    })
}

#[test]
fn only_proto_and_one_adapter_per_side_know_capnp() {
    let root = workspace_root();
    let mut offenders = Vec::new();
    let mut seen_adapters = 0;
    for (rel, text) in sources(&root, &["server", "client", "core", "p2p"]) {
        let uses = code_lines(&text)
            .filter(|(_, l)| CAPNP_MARKERS.iter().any(|m| l.contains(m)))
            .map(|(n, l)| format!("{rel}:{}: {}", n + 1, l.trim()))
            .collect::<Vec<_>>();
        if CAPNP_ADAPTERS.contains(&rel.as_str()) {
            assert!(
                !uses.is_empty(),
                "{rel} is listed as an adapter but uses no Cap'n Proto"
            );
            seen_adapters += 1;
        } else {
            offenders.extend(uses);
        }
    }
    assert_eq!(
        seen_adapters,
        CAPNP_ADAPTERS.len(),
        "an adapter file is missing"
    );
    assert!(
        offenders.is_empty(),
        "Cap'n Proto outside quicnprotochat-proto and the adapters {CAPNP_ADAPTERS:?}:\n{}",
        offenders.join("\n")
    );
}

#[test]
fn the_delivery_service_knows_neither_capnp_nor_quic() {
    let root = workspace_root();
    let text =
        std::fs::read_to_string(root.join("crates/quicnprotochat-server/src/delivery.rs")).unwrap();
    let leaks: Vec<_> = code_lines(&text)
        .filter(|(_, l)| {
            CAPNP_MARKERS.iter().any(|m| l.contains(m))
                || l.contains("quinn")
                || l.contains("rustls")
        })
        .map(|(n, l)| format!("delivery.rs:{}: {}", n + 1, l.trim()))
        .collect();
    assert!(
        leaks.is_empty(),
        "transport types in the delivery service:\n{}",
        leaks.join("\n")
    );
}

/// Library code reads the time only through `quicnprotochat_core::clock`,
/// so tests can advance it.  Runtime timers (`tokio::time`, which tokio's
/// test utilities can pause) are not clocks in this sense; the load
/// generator (`src/bin/`) measures real elapsed time on purpose.
#[test]
fn only_the_clock_module_reads_the_system_clock() {
    let root = workspace_root();
    let mut offenders = Vec::new();
    for (rel, text) in sources(&root, &["proto", "core", "server", "client", "p2p"]) {
        if rel == "crates/quicnprotochat-core/src/clock.rs" || rel.contains("/src/bin/") {
            continue;
        }
        // A bare `Instant` is std's when the file imports std's.
        let std_instant = text
            .lines()
            .any(|l| l.trim_start().starts_with("use std::time::") && l.contains("Instant"));
        for (n, line) in code_lines(&text) {
            let reads_clock = line.contains("SystemTime::now")
                || line.contains("std::time::Instant::now")
                || (std_instant
                    && line.contains("Instant::now")
                    && !line.contains("tokio::time::Instant::now"));
            if reads_clock {
                offenders.push(format!("{rel}:{}: {}", n + 1, line.trim()));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "read the time through quicnprotochat_core::clock instead:\n{}",
        offenders.join("\n")
    );
}
