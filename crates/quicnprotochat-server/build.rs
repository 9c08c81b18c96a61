//! Records the git revision the server is built from, for its
//! `quicnprotochat_build_info` metric: `QUICNPROTOCHAT_GIT_REVISION` when
//! the build sets it (the container build, which has no `.git`), else
//! `git rev-parse HEAD`, else `unknown`.

use std::path::PathBuf;
use std::process::Command;

const VAR: &str = "QUICNPROTOCHAT_GIT_REVISION";

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}

fn main() {
    println!("cargo:rerun-if-env-changed={VAR}");
    let revision = match std::env::var(VAR) {
        Ok(r) if !r.trim().is_empty() => r.trim().to_string(),
        _ => {
            // Built again when HEAD moves: HEAD itself (a branch switch) and
            // the files that hold the branch's commit.
            for path in ["HEAD", "packed-refs"] {
                if let Some(p) = git(&["rev-parse", "--git-path", path]) {
                    watch(p);
                }
            }
            if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"])
                && let Some(p) = git(&["rev-parse", "--git-path", &branch])
            {
                watch(p);
            }
            git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".to_string())
        }
    };
    println!("cargo:rustc-env={VAR}={revision}");
}

/// Reruns this script when `path` changes; a path that does not exist is
/// not watched (cargo would run the script at every build).
fn watch(path: String) {
    let path = PathBuf::from(path);
    if path.exists() {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
