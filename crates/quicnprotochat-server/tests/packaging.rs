//! Packaging: the Dockerfile and the ignore files, checked statically (no
//! image can be built where the tests run).
//!
//! * The Dockerfile's dependency-cache layer copies the manifest of, and
//!   stubs every target file of, each `[workspace] members` entry.  A member
//!   missing there would silently fall out of the cache layer (or break the
//!   build), so the check is tested against mutated Dockerfiles too.
//! * The runtime image: numeric non-root user owning `/data`, production mode,
//!   UDP port, an exec-form health check that the real CLI accepts, and an
//!   environment with which the real binary refuses to start.
//! * `.dockerignore` and `.gitignore` keep build output, local state and key
//!   material out of the build context and the repository.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser as _;
use quicnprotochat_server::config::{Cli, Command as CliCommand};

const BIN: &str = env!("CARGO_BIN_EXE_quicnprotochat-server");

fn repo_root() -> PathBuf {
    // The run-time value: a test binary reused from another checkout must
    // still read this one.
    Path::new(
        &std::env::var_os("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("../..")
    .canonicalize()
    .unwrap()
}

fn read(rel: &str) -> String {
    let path = repo_root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn read_toml(path: &Path) -> toml::Table {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    toml::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------
// Workspace members and the files cargo needs to load each one.

/// A workspace member: its directory (relative to the root) and the target
/// source files its manifest names or cargo infers, which the cache layer
/// must stub so cargo accepts the manifest.
#[derive(Debug, Clone)]
struct Member {
    dir: String,
    target_files: Vec<String>,
}

/// `[workspace] members` of the root manifest, with `dir/*` globs expanded.
fn workspace_members(root: &Path) -> Vec<Member> {
    let manifest = read_toml(&root.join("Cargo.toml"));
    let members = manifest
        .get("workspace")
        .and_then(|w| w.get("members"))
        .and_then(|m| m.as_array())
        .expect("[workspace] members");
    let mut dirs = Vec::new();
    for m in members {
        let m = m.as_str().expect("member is a string");
        if let Some(parent) = m.strip_suffix("/*") {
            let mut found: Vec<String> = std::fs::read_dir(root.join(parent))
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.join("Cargo.toml").is_file())
                .map(|p| format!("{parent}/{}", p.file_name().unwrap().to_string_lossy()))
                .collect();
            found.sort();
            dirs.extend(found);
        } else {
            assert!(!m.contains('*'), "unsupported member glob {m}");
            dirs.push(m.trim_end_matches('/').to_string());
        }
    }
    assert!(!dirs.is_empty(), "no workspace members");
    dirs.into_iter()
        .map(|dir| Member {
            target_files: target_files(&root.join(&dir))
                .into_iter()
                .map(|f| format!("{dir}/{f}"))
                .collect(),
            dir,
        })
        .collect()
}

/// Target source files of one package, relative to its directory.
fn target_files(dir: &Path) -> Vec<String> {
    let manifest = read_toml(&dir.join("Cargo.toml"));
    let path_of = |t: &toml::Value| t.get("path").and_then(|p| p.as_str()).map(clean);
    let mut files = Vec::new();
    match manifest.get("lib").and_then(path_of) {
        Some(p) => files.push(p),
        None if dir.join("src/lib.rs").is_file() => files.push("src/lib.rs".into()),
        None => {}
    }
    let autobins = manifest
        .get("package")
        .and_then(|p| p.get("autobins"))
        .and_then(|a| a.as_bool())
        .unwrap_or(true);
    if autobins && dir.join("src/main.rs").is_file() {
        files.push("src/main.rs".into());
    }
    for (kind, default_dir) in [
        ("bin", "src/bin"),
        ("test", "tests"),
        ("bench", "benches"),
        ("example", "examples"),
    ] {
        for t in manifest
            .get(kind)
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
        {
            let file = path_of(t).unwrap_or_else(|| {
                let name = t.get("name").and_then(|n| n.as_str()).unwrap_or_default();
                let single = format!("{default_dir}/{name}.rs");
                let nested = format!("{default_dir}/{name}/main.rs");
                if dir.join(&single).is_file() {
                    single
                } else if dir.join(&nested).is_file() {
                    nested
                } else {
                    "src/main.rs".into()
                }
            });
            if !files.contains(&file) {
                files.push(file);
            }
        }
    }
    files
}

fn clean(p: &str) -> String {
    p.trim_start_matches("./").to_string()
}

// ---------------------------------------------------------------------------
// A small Dockerfile reader: instructions with continuations joined and
// comments dropped, grouped into stages.

#[derive(Debug, Clone)]
struct Instruction {
    keyword: String,
    args: String,
}

fn instructions(dockerfile: &str) -> Vec<Instruction> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in dockerfile.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(body) = t.strip_suffix('\\') {
            current.push_str(body);
            current.push(' ');
            continue;
        }
        current.push_str(t);
        let text = std::mem::take(&mut current);
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        let (keyword, args) = text.split_once(char::is_whitespace).unwrap_or((text, ""));
        out.push(Instruction {
            keyword: keyword.to_ascii_uppercase(),
            args: args.split_whitespace().collect::<Vec<_>>().join(" "),
        });
    }
    out
}

/// Stages, each starting with its FROM.
fn stages(dockerfile: &str) -> Vec<Vec<Instruction>> {
    let mut stages: Vec<Vec<Instruction>> = Vec::new();
    for i in instructions(dockerfile) {
        if i.keyword == "FROM" {
            stages.push(Vec::new());
        }
        if let Some(stage) = stages.last_mut() {
            stage.push(i);
        }
    }
    stages
}

/// Sources of a COPY/ADD instruction (flags and destination dropped).
fn copy_sources(args: &str) -> Vec<String> {
    let words: Vec<&str> = args
        .split_whitespace()
        .filter(|w| !w.starts_with("--"))
        .collect();
    match words.split_last() {
        Some((_dest, sources)) => sources.iter().map(|s| clean(s)).collect(),
        None => Vec::new(),
    }
}

fn is_copy_all(i: &Instruction) -> bool {
    i.keyword == "COPY" && {
        let s = copy_sources(&i.args);
        s.len() == 1 && (s[0] == "." || s[0].is_empty())
    }
}

/// The dependency-cache layer: the instructions of the stage that copies the
/// whole source tree, before that copy.
fn cache_layer(dockerfile: &str) -> Result<Vec<Instruction>, String> {
    for stage in stages(dockerfile) {
        if let Some(pos) = stage.iter().position(is_copy_all) {
            return Ok(stage[..pos].to_vec());
        }
    }
    Err("no stage copies the source tree (`COPY . .`)".into())
}

/// Everything wrong with the dependency-cache layer, given the members it
/// must cover; empty when it is complete.
fn cache_layer_problems(dockerfile: &str, members: &[Member], root: &Path) -> Vec<String> {
    let layer = match cache_layer(dockerfile) {
        Ok(l) => l,
        Err(e) => return vec![e],
    };
    let copied: Vec<String> = layer
        .iter()
        .filter(|i| i.keyword == "COPY")
        .flat_map(|i| copy_sources(&i.args))
        .collect();
    let run_text: String = layer
        .iter()
        .filter(|i| i.keyword == "RUN")
        .map(|i| format!("{}\n", i.args))
        .collect();
    let mut problems = Vec::new();

    for f in ["Cargo.toml", "Cargo.lock"] {
        if !copied.iter().any(|c| c == f) {
            problems.push(format!("the cache layer does not copy {f}"));
        }
    }
    for m in members {
        let manifest = format!("{}/Cargo.toml", m.dir);
        if !copied.contains(&manifest) {
            problems.push(format!(
                "workspace member {} is missing from the cache layer: no COPY of {manifest}",
                m.dir
            ));
        }
        for f in &m.target_files {
            if !run_text.contains(f.as_str()) {
                problems.push(format!(
                    "workspace member {}: the cache layer does not stub {f}",
                    m.dir
                ));
            }
        }
    }
    // Nothing stale: every copied manifest belongs to a member, and every
    // stubbed source exists (a stub with no real file behind it would survive
    // `COPY . .` and be compiled into the image).
    for c in copied.iter().filter(|c| c.ends_with("/Cargo.toml")) {
        if !members
            .iter()
            .any(|m| format!("{}/Cargo.toml", m.dir) == *c)
        {
            problems.push(format!(
                "the cache layer copies {c}, which is not a workspace member"
            ));
        }
    }
    for word in run_text.split(|c: char| c.is_whitespace() || c == '"' || c == '\'' || c == ';') {
        if word.ends_with(".rs") && !root.join(word).is_file() {
            problems.push(format!(
                "the cache layer stubs {word}, which does not exist"
            ));
        }
    }
    if !layer.iter().any(|i| {
        i.keyword == "RUN" && i.args.contains("cargo build") && i.args.contains("--locked")
    }) {
        problems.push("the cache layer never runs `cargo build --locked`".into());
    }
    problems
}

#[test]
fn dockerfile_cache_layer_covers_every_workspace_member() {
    let root = repo_root();
    let members = workspace_members(&root);
    let problems = cache_layer_problems(&read("Dockerfile"), &members, &root);
    assert!(
        problems.is_empty(),
        "Dockerfile drift:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn cache_layer_check_fails_when_a_member_is_dropped_from_the_dockerfile() {
    let root = repo_root();
    let members = workspace_members(&root);
    let dockerfile = read("Dockerfile");
    for m in &members {
        // Drop the member's manifest COPY line.
        let manifest = format!("{}/Cargo.toml", m.dir);
        let without_copy: String = dockerfile
            .lines()
            .filter(|l| !(l.trim_start().starts_with("COPY") && l.contains(&manifest)))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_ne!(without_copy, dockerfile, "no COPY line for {manifest}");
        let problems = cache_layer_problems(&without_copy, &members, &root);
        assert!(
            problems
                .iter()
                .any(|p| p.contains(&m.dir) && p.contains("missing")),
            "dropping {manifest} went unnoticed: {problems:?}"
        );
        // Drop each of its stubs in turn.
        for f in &m.target_files {
            let without_stub: String = dockerfile
                .lines()
                .filter(|l| !l.contains(f.as_str()))
                .map(|l| format!("{l}\n"))
                .collect();
            let problems = cache_layer_problems(&without_stub, &members, &root);
            assert!(
                problems.iter().any(|p| p.contains(f.as_str())),
                "dropping the stub {f} went unnoticed: {problems:?}"
            );
        }
    }
}

#[test]
fn cache_layer_check_fails_for_a_new_member_the_dockerfile_lacks() {
    let root = repo_root();
    let mut members = workspace_members(&root);
    members.push(Member {
        dir: "crates/quicnprotochat-new".into(),
        target_files: vec!["crates/quicnprotochat-new/src/lib.rs".into()],
    });
    let problems = cache_layer_problems(&read("Dockerfile"), &members, &root);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("crates/quicnprotochat-new") && p.contains("missing")),
        "{problems:?}"
    );
    // ... and for a member the workspace no longer has.
    let members = workspace_members(&root);
    let fewer = &members[..members.len() - 1];
    let problems = cache_layer_problems(&read("Dockerfile"), fewer, &root);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("not a workspace member")),
        "{problems:?}"
    );
}

#[test]
fn member_target_files_follow_the_manifests() {
    let root = repo_root();
    let members = workspace_members(&root);
    let server = members
        .iter()
        .find(|m| m.dir.ends_with("quicnprotochat-server"))
        .unwrap();
    // lib + main + the explicit [[test]] target.
    for f in ["src/lib.rs", "src/main.rs", "tests/tests.rs"] {
        assert!(
            server.target_files.contains(&format!("{}/{f}", server.dir)),
            "{server:?}"
        );
    }
    let client = members
        .iter()
        .find(|m| m.dir.ends_with("quicnprotochat-client"))
        .unwrap();
    assert!(
        client
            .target_files
            .contains(&format!("{}/src/bin/load.rs", client.dir)),
        "{client:?}"
    );
    for m in &members {
        for f in &m.target_files {
            assert!(root.join(f).is_file(), "{f} does not exist");
        }
    }
}

// ---------------------------------------------------------------------------
// The runtime image.

fn runtime_stage() -> Vec<Instruction> {
    stages(&read("Dockerfile")).pop().expect("a FROM")
}

fn image_env(stage: &[Instruction]) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for i in stage.iter().filter(|i| i.keyword == "ENV") {
        for pair in i.args.split_whitespace() {
            let (k, v) = pair
                .split_once('=')
                .unwrap_or_else(|| panic!("use ENV KEY=VALUE: {}", i.args));
            env.insert(k.to_string(), v.trim_matches('"').to_string());
        }
    }
    env
}

/// The JSON array of an exec-form instruction.
fn exec_form(args: &str) -> Vec<String> {
    let start = args
        .find('[')
        .unwrap_or_else(|| panic!("not exec form: {args}"));
    let parsed: toml::Value = toml::from_str(&format!("v = {}", &args[start..]))
        .unwrap_or_else(|e| panic!("not a JSON string array: {args}: {e}"));
    parsed["v"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

fn only<'a>(stage: &'a [Instruction], keyword: &str) -> &'a Instruction {
    let found: Vec<&Instruction> = stage.iter().filter(|i| i.keyword == keyword).collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {keyword} in the runtime stage"
    );
    found[0]
}

#[test]
fn image_runs_as_a_dedicated_numeric_user_owning_the_data_volume() {
    let stage = runtime_stage();
    let user = &only(&stage, "USER").args;
    let (uid, gid) = user.split_once(':').expect("USER uid:gid");
    let uid: u32 = uid.parse().expect("numeric UID");
    let gid: u32 = gid.parse().expect("numeric GID");
    assert!(
        uid >= 1000 && gid >= 1000,
        "a dedicated, non-system user: {user}"
    );
    assert!(
        ![65534, 65532].contains(&uid),
        "not nobody / the base image's shared user: {user}"
    );

    let env = image_env(&stage);
    assert_eq!(
        env.get("QUICNPROTOCHAT_DATA_DIR").map(String::as_str),
        Some("/data")
    );
    assert_eq!(exec_form(&only(&stage, "VOLUME").args), ["/data"]);
    // COPY of a directory creates the destination 0755 and copies only the
    // contents: /data must arrive as the content of a copied parent, so it
    // keeps the mode 0700 the builder gave it (the image gate of .ci/image
    // checks the built image).
    let parent = stage
        .iter()
        .filter(|i| i.keyword == "COPY" && i.args.contains(&format!("--chown={uid}:{gid}")))
        .find_map(|i| {
            let words: Vec<&str> = i.args.split_whitespace().collect();
            match words.as_slice() {
                [.., src, "/"] => src.strip_suffix('/').map(str::to_string),
                _ => None,
            }
        })
        .unwrap_or_else(|| panic!("/data must be copied, owned by {uid}:{gid}, as part of a parent directory copied to /"));
    let made_private = stages(&read("Dockerfile"))[0].iter().any(|i| {
        i.keyword == "RUN"
            && i.args
                .contains(&format!("install -d -m 0700 {parent}/data"))
    });
    assert!(
        made_private,
        "the builder creates {parent}/data with mode 0700"
    );
}

#[test]
fn image_defaults_to_production_on_a_public_udp_port() {
    let stage = runtime_stage();
    let env = image_env(&stage);
    assert_eq!(
        env.get("QUICNPROTOCHAT_MODE").map(String::as_str),
        Some("production")
    );
    let listen: std::net::SocketAddr = env["QUICNPROTOCHAT_LISTEN"].parse().unwrap();
    assert!(
        listen.ip().is_unspecified(),
        "reachable from outside: {listen}"
    );
    assert_eq!(
        only(&stage, "EXPOSE").args,
        format!("{}/udp", listen.port()),
        "QUIC is UDP"
    );
    // No secret is baked into the image, in any stage.
    for i in instructions(&read("Dockerfile")) {
        for secret in ["QUICNPROTOCHAT_AUTH_TOKEN", "QUICNPROTOCHAT_DB_KEY"] {
            assert!(
                !i.args.contains(secret),
                "the Dockerfile sets {secret}: {} {}",
                i.keyword,
                i.args
            );
        }
    }
}

#[test]
fn image_commands_are_exec_form_and_accepted_by_the_cli() {
    let stage = runtime_stage();
    let entrypoint = exec_form(&only(&stage, "ENTRYPOINT").args);
    let cmd = exec_form(&only(&stage, "CMD").args);
    let health = only(&stage, "HEALTHCHECK");
    let health_cmd = exec_form(health.args.split_once("CMD").expect("HEALTHCHECK CMD").1);

    let binary = "/usr/local/bin/quicnprotochat-server";
    assert_eq!(entrypoint, [binary]);
    assert_eq!(health_cmd[0], binary);
    let copied = stage
        .iter()
        .any(|i| i.keyword == "COPY" && i.args.split_whitespace().last() == Some(binary));
    assert!(copied, "the runtime stage installs {binary}");

    // The real CLI parses both command lines into the intended subcommands.
    let serve = Cli::try_parse_from(entrypoint.iter().chain(&cmd)).unwrap();
    assert!(
        matches!(serve.command, Some(CliCommand::Serve)),
        "{serve:?}"
    );
    let probe = Cli::try_parse_from(&health_cmd).unwrap();
    match probe.command {
        Some(CliCommand::Health(h)) => {
            // The probe must give up before Docker's own timeout kills it.
            let docker_timeout = health
                .args
                .split_whitespace()
                .find_map(|w| w.strip_prefix("--timeout="))
                .and_then(|t| t.strip_suffix('s'))
                .map(|t| t.parse::<u64>().unwrap())
                .expect("HEALTHCHECK --timeout=<n>s");
            assert!(
                h.timeout_secs < docker_timeout,
                "{h:?} vs {docker_timeout}s"
            );
        }
        other => panic!("HEALTHCHECK does not run `health`: {other:?}"),
    }
}

#[test]
fn the_image_environment_alone_refuses_to_start() {
    // The binary started with exactly the image's environment (data directory
    // and listen address moved to a temporary directory and loopback) must
    // refuse to run: no token, database key or certificate is built in.
    let env = image_env(&runtime_stage());
    let data = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .env_clear()
        .envs(&env)
        .env("QUICNPROTOCHAT_DATA_DIR", data.path())
        .env("QUICNPROTOCHAT_LISTEN", "127.0.0.1:0")
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the server started with the image's default environment");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("refusing to start in production mode"),
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------
// Ignore files.

#[test]
fn dockerignore_keeps_build_output_history_and_state_out_of_the_context() {
    let entries: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_start_matches('/').trim_end_matches('/').to_string())
        .collect();
    for needed in ["target", ".git", "data"] {
        assert!(
            entries.iter().any(|e| e == needed),
            ".dockerignore lacks {needed}: {entries:?}"
        );
    }
    // Nothing the build needs is excluded.
    for needed in ["crates", "Cargo.toml", "Cargo.lock", "schemas", "src", "*"] {
        assert!(
            !entries.iter().any(|e| e == needed),
            ".dockerignore excludes {needed}"
        );
    }
}

/// Asks git itself which of `paths` a repository with only our .gitignore
/// ignores.
fn git_ignored(paths: &[&str]) -> Vec<String> {
    let repo = tempfile::tempdir().unwrap();
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(repo.path())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("git is needed for this test")
    };
    assert!(git(&["init", "-q"]).status.success());
    std::fs::copy(
        repo_root().join(".gitignore"),
        repo.path().join(".gitignore"),
    )
    .unwrap();
    let mut args = vec!["check-ignore", "--no-index"];
    args.extend_from_slice(paths);
    let out = git(&args);
    // Exit 0: some ignored, 1: none ignored, anything else: an error.
    assert!(matches!(out.status.code(), Some(0 | 1)), "{out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn gitignore_covers_secrets_state_and_build_output() {
    let must_ignore = [
        "target/debug/quicnprotochat-server",
        "data/quicnprotochat.db",
        "crates/quicnprotochat-server/data/dev-key",
        "server.db",
        "server.db-wal",
        "server.db-shm",
        "deploy/tls.pem",
        "tls.key",
        "cert.der",
        "secrets/server.toml",
    ];
    let ignored = git_ignored(&must_ignore);
    for p in must_ignore {
        assert!(ignored.iter().any(|i| i == p), "{p} is not ignored");
    }
    let must_keep = [
        "Cargo.toml",
        "Cargo.lock",
        "Dockerfile",
        "deny.toml",
        "compose.yaml",
        "crates/quicnprotochat-server/src/store/sqlite.rs",
        "crates/quicnprotochat-proto/src/generated/mod.rs",
        "schemas/quicnprotochat.capnp",
        ".github/workflows/ci.yml",
        "docs/operations.md",
    ];
    let ignored = git_ignored(&must_keep);
    assert!(ignored.is_empty(), "ignored by mistake: {ignored:?}");
}
