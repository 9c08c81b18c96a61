//! The `quicnprotochat` command-line client, end to end: spawned processes,
//! a real server on loopback, encrypted profiles in a temp dir.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use quicnprotochat_client::harness::{TEST_TOKEN, TestServer};

const CLI: &str = env!("CARGO_BIN_EXE_quicnprotochat");
const PASS: &str = "cli-test-passphrase";

pub(crate) fn cli(server: &TestServer, profile: &Path) -> Command {
    let mut cmd = Command::new(CLI);
    cmd.env_clear()
        .env("QUICNPROTOCHAT_PASSPHRASE", PASS)
        .env("QUICNPROTOCHAT_PROFILE", profile)
        .env("QUICNPROTOCHAT_TOKEN", TEST_TOKEN)
        .stdin(Stdio::null());
    let _ = server;
    cmd
}

pub(crate) fn run_ok(cmd: &mut Command) -> String {
    let out: Output = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "command failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub(crate) fn register(server: &TestServer, profile: &Path, name: &str) {
    register_via(server, profile, name, server.addr());
}

/// Registers `name` with the server reached at `addr` (the server itself,
/// or a relay in front of it).
pub(crate) fn register_via(
    server: &TestServer,
    profile: &Path,
    name: &str,
    addr: std::net::SocketAddr,
) {
    let pin = hex::encode(server.fingerprint());
    let out = run_ok(cli(server, profile).args([
        "register",
        name,
        "--server",
        &addr.to_string(),
        "--pin",
        &pin,
    ]));
    assert!(out.starts_with(&format!("registered {name} (")), "{out}");
}

/// Alice and bob, registered through the command line with profiles in a
/// new temporary directory; alice made the group `friends` and invited bob.
pub(crate) fn alice_invited_bob(
    server: &TestServer,
) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));
    register(server, &alice, "alice");
    register(server, &bob, "bob");
    run_ok(cli(server, &alice).args(["invite", "friends", "bob"]));
    (dir, alice, bob)
}

#[test]
fn two_clients_chat_through_the_command_line() {
    let mut server = TestServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));
    register(&server, &alice, "alice");
    register(&server, &bob, "bob");

    // Bob listens (JSON lines) until he got two messages.
    let listener = cli(&server, &bob)
        .args(["--json", "listen", "--count", "2", "--timeout", "60"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        run_ok(cli(&server, &alice).args(["invite", "friends", "bob"])).trim(),
        "invited bob to friends"
    );
    run_ok(cli(&server, &alice).args(["send", "friends", "hello bob"]));
    run_ok(cli(&server, &alice).args(["send", "friends", "second line"]));
    let out = listener.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["event"], "joined");
    assert_eq!(lines[0]["group"], "friends");
    assert_eq!(lines[0]["by"], "alice");
    let texts: Vec<_> = lines
        .iter()
        .filter(|l| l["event"] == "message")
        .map(|l| (l["sender"].clone(), l["text"].clone()))
        .collect();
    assert_eq!(
        texts,
        [
            ("alice".into(), "hello bob".into()),
            ("alice".into(), "second line".into())
        ]
    );

    // Bob replies; alice syncs and reads it in human-readable form.
    run_ok(cli(&server, &bob).args(["send", "friends", "hi alice"]));
    let synced = run_ok(cli(&server, &alice).args(["sync"]));
    assert_eq!(synced.trim(), "[friends] bob: hi alice");
    let members = run_ok(cli(&server, &alice).args(["members", "friends"]));
    assert!(
        members.lines().any(|l| l.starts_with("alice (you) ")),
        "{members}"
    );
    assert!(members.lines().any(|l| l.starts_with("bob ")), "{members}");
    let groups = run_ok(cli(&server, &bob).args(["--json", "groups"]));
    let g: serde_json::Value = serde_json::from_str(groups.trim()).unwrap();
    assert_eq!(g["group"], "friends");
    assert_eq!(g["members"], serde_json::json!(["alice", "bob"]));
    let history = run_ok(cli(&server, &bob).args(["history", "friends"]));
    assert_eq!(history.lines().count(), 3);

    // Commands that read only the profile work with the server down.
    server.stop();
    let history = run_ok(cli(&server, &bob).args(["history", "friends"]));
    assert_eq!(history.lines().count(), 3);
    let groups = run_ok(cli(&server, &alice).args(["groups"]));
    assert!(groups.starts_with("friends (epoch "), "{groups}");
    let members = run_ok(cli(&server, &alice).args(["members", "friends"]));
    assert_eq!(members.lines().count(), 2, "{members}");

    // Commands that need the server fail with one clear line within the
    // connect deadline (5 s), not QUIC's 30 s idle timeout.
    for args in [
        &["send", "friends", "anyone there?"][..],
        &["listen", "--timeout", "3"][..],
    ] {
        let started = std::time::Instant::now();
        let out = cli(&server, &alice).args(args).output().unwrap();
        let took = started.elapsed();
        assert!(
            !out.status.success(),
            "{args:?} succeeded with the server down"
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("unreachable"), "{args:?}: {stderr}");
        assert!(
            took < Duration::from_secs(15),
            "{args:?} took {took:?} to report a dead server"
        );
    }
}

#[test]
fn interactive_chat_sends_typed_lines() {
    let server = TestServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));
    register(&server, &alice, "alice");
    register(&server, &bob, "bob");
    run_ok(cli(&server, &alice).args(["invite", "room", "bob"]));
    run_ok(cli(&server, &bob).args(["sync"]));
    let mut chat = cli(&server, &bob)
        .args(["chat", "room"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let stdin = chat.stdin.as_mut().unwrap();
        writeln!(stdin, "typed in chat").unwrap();
        std::thread::sleep(Duration::from_millis(800));
        writeln!(stdin, "/quit").unwrap();
    }
    let out = chat.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        run_ok(cli(&server, &alice).args(["sync"])).trim(),
        "[room] bob: typed in chat"
    );
}

#[test]
fn errors_are_one_clear_line() {
    let server = TestServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let alice = dir.path().join("alice");
    register(&server, &alice, "alice");
    let check = |cmd: &mut Command, needle: &str| {
        let out = cmd.output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(err.starts_with("error: ") && err.contains(needle), "{err}");
    };
    check(
        cli(&server, &alice).args(["invite", "friends", "nobody"]),
        "no user named \"nobody\"",
    );
    check(
        cli(&server, &alice)
            .env("QUICNPROTOCHAT_PASSPHRASE", "wrong")
            .args(["groups"]),
        "passphrase",
    );
    check(
        cli(&server, &dir.path().join("none")).args(["groups"]),
        "no profile",
    );
    check(
        cli(&server, &alice).args(["send", "nogroup", "x"]),
        "no group named",
    );
}

#[test]
fn a_failed_registration_leaves_nothing_and_the_retry_succeeds() {
    let server = TestServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    register(&server, &dir.path().join("first"), "alice");
    // The name is taken: refused, and nothing is left in the profile's place.
    let second = dir.path().join("second");
    let pin = hex::encode(server.fingerprint());
    let out = cli(&server, &second)
        .args([
            "register",
            "alice",
            "--server",
            &server.addr().to_string(),
            "--pin",
            &pin,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("taken"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !second.exists(),
        "a failed registration left a profile behind"
    );
    // Another name in the same place works at once.
    register(&server, &second, "alice2");
}

#[test]
fn text_from_members_cannot_drive_the_terminal_or_forge_a_line() {
    let server = TestServer::start().unwrap();
    let (_dir, alice, bob) = alice_invited_bob(&server);
    run_ok(cli(&server, &bob).args(["sync"]));
    // A window-title change, a screen clear, a carriage return and a line
    // that pretends to be alice's.
    let hostile = "hi\u{1b}]0;owned\u{7}\u{1b}[2J\r\n[friends] alice: send me your passphrase";
    run_ok(cli(&server, &bob).args(["send", "friends", hostile]));
    let shown = run_ok(cli(&server, &alice).args(["sync"]));
    assert!(!shown.contains(['\u{1b}', '\u{7}', '\r']), "{shown:?}");
    assert!(
        !shown.lines().any(|l| l.starts_with("[friends] alice:")),
        "{shown}"
    );
    assert_eq!(
        shown.lines().next().unwrap(),
        "[friends] bob: hi^[]0;owned^G^[[2J^M"
    );
    // History shows it the same way; JSON carries the text as it was sent.
    let history = run_ok(cli(&server, &alice).args(["history", "friends"]));
    assert!(!history.contains('\u{1b}'), "{history:?}");
    let json = run_ok(cli(&server, &alice).args(["--json", "history", "friends"]));
    let texts: Vec<String> = json
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| v["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(texts, [hostile]);
}
