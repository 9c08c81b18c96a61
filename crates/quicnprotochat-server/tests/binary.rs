//! The real `quicnprotochat-server` binary: start-up, health probe and
//! durability under `kill -9`.

use std::net::SocketAddr;
use std::process::Stdio;

use quicnprotochat_client::Client;
use quicnprotochat_client::harness::ServerProcess;
use quicnprotochat_core::Identity;

use crate::support::msg_id;

const BIN: &str = env!("CARGO_BIN_EXE_quicnprotochat-server");

fn health(server: &ServerProcess, addr: SocketAddr) -> bool {
    server
        .command()
        .args(["health", "--addr", &addr.to_string(), "--timeout-secs", "3"])
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success()
}

async fn client(server: &ServerProcess, identity: &Identity) -> Client {
    let c = Client::connect(server.client_config().unwrap())
        .await
        .unwrap();
    c.init_auth(identity).await.unwrap();
    c
}

#[tokio::test]
async fn acknowledged_enqueues_survive_kill_9_and_health_probe_works() {
    let mut server = ServerProcess::start(BIN).unwrap();
    let addr = server.addr();
    assert!(
        health(&server, addr),
        "health probe against a running server"
    );

    let (alice, bob) = (Identity::generate().unwrap(), Identity::generate().unwrap());
    let a = client(&server, &alice).await;
    a.register("alice").await.unwrap();
    let b = client(&server, &bob).await;
    b.register("bob").await.unwrap();
    for i in 1..=50u64 {
        a.enqueue(&[bob.public_key()], msg_id(i), format!("m{i}").into_bytes())
            .await
            .unwrap();
    }
    drop((a, b));
    // SIGKILL: no shutdown path runs; only what was committed survives.
    server.kill();
    assert!(
        !health(&server, addr),
        "health probe must fail with the server down"
    );

    server.restart().unwrap();
    let b = client(&server, &bob).await;
    let got = b.fetch(0, 256).await.unwrap();
    assert_eq!(got.len(), 50, "every acknowledged enqueue survives kill -9");
    assert!(
        got.iter()
            .enumerate()
            .all(|(i, e)| e.seq == i as u64 + 1 && e.payload == format!("m{}", i + 1).into_bytes())
    );
}

/// `--log-format json` (or `QUICNPROTOCHAT_LOG_FORMAT=json`): every line on
/// standard error is one JSON object a log collector can take apart, and the
/// token given in the environment appears in none of them.
#[test]
fn json_logs_are_one_object_per_line_without_secrets() {
    use std::io::{BufRead as _, BufReader};

    let dir = tempfile::tempdir().unwrap();
    let token = "json-log-test-token-0123456789abcdef0123";
    let mut child = std::process::Command::new(BIN)
        .env_clear()
        .env("QUICNPROTOCHAT_DATA_DIR", dir.path())
        .env("QUICNPROTOCHAT_AUTH_TOKEN", token)
        .env("QUICNPROTOCHAT_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let listening = loop {
        let line = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the server logged no `listening` line");
        lines.push(line.clone());
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
        if v["fields"]["message"] == "listening" {
            break v;
        }
    };
    child.kill().unwrap();
    child.wait().unwrap();
    let addr: SocketAddr = listening["fields"]["addr"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(addr.ip().is_loopback() && addr.port() != 0);
    // Development mode logs its shortcuts, as warnings, in the same format.
    assert!(lines.iter().any(|l| l.contains("DEVELOPMENT SHORTCUT")));
    assert!(lines.iter().all(|l| !l.contains(token)), "{lines:?}");
}

#[test]
fn a_start_up_error_is_one_line_with_its_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let run = |db_key: &str| {
        std::process::Command::new(BIN)
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data)
            .env("QUICNPROTOCHAT_DB_KEY", db_key)
            .env_remove("QUICNPROTOCHAT_CONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .unwrap()
    };
    // A server creates the database under one key and is stopped; the
    // next start gives another key.
    let mut first = std::process::Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .env("QUICNPROTOCHAT_DB_KEY", "11".repeat(32))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let db = data.join("quicnprotochat.db");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !db.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    // SIGTERM: the server closes its store, which checkpoints the WAL into
    // the database file.
    let term = std::process::Command::new("kill")
        .args(["-TERM", &first.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    assert!(first.wait().unwrap().success());

    let out = run(&"22".repeat(32));
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    let line = errors[0];
    let cause = "the database key does not open";
    assert_eq!(line.matches(cause).count(), 1, "cause repeated: {line}");
    assert!(
        !line.contains(&"22".repeat(32)),
        "the key must not appear: {line}"
    );

    // The right key on a file whose first page is damaged: called damaged,
    // not "wrong key".
    let mut bytes = std::fs::read(&db).unwrap();
    assert!(
        bytes.len() >= 8192,
        "the database has pages: {}",
        bytes.len()
    );
    bytes[100] ^= 0xff;
    std::fs::write(&db, &bytes).unwrap();
    let out = run(&"11".repeat(32));
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    let line = stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(
        line.contains("damaged") && line.contains("backup"),
        "{line}"
    );
    assert!(!line.contains("does not open"), "{line}");
}
