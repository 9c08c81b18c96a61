//! The real `quicnprotochat-server` binary: start-up, health probe,
//! durability under `kill -9`, and draining on SIGTERM and SIGINT.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use quicnprotochat_client::harness::ServerProcess;
use quicnprotochat_client::{Client, ClientError, EnqueueResult};
use quicnprotochat_core::{Identity, IdentityKey};

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

/// The server's write lock, held by another connection to its database: the
/// server's writer waits for it (up to its 5 s busy timeout), so a write
/// stays in flight until the lock is dropped.
struct StoreLock(rusqlite::Connection);

impl StoreLock {
    fn take(server: &ServerProcess) -> Self {
        use quicnprotochat_core::sqlcipher::{Opened, open_keyed};
        let data = server.data_dir();
        let key = std::fs::read_to_string(data.join("dev-db.key")).unwrap();
        let opened = open_keyed(
            &data.join("quicnprotochat.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE,
            &format!("x'{}'", key.trim()),
        )
        .unwrap();
        let Opened::Open(conn, _) = opened else {
            panic!("the test cannot open the server's database")
        };
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        Self(conn)
    }
}

impl Drop for StoreLock {
    fn drop(&mut self) {
        let _ = self.0.execute_batch("ROLLBACK");
    }
}

/// Errors after which a client reconnects and retries (the reference
/// client's `Supervisor::send_outgoing` does, with the same message id).
fn retryable(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Rpc(_) | ClientError::Disconnected | ClientError::Timeout { .. }
    )
}

/// Starts an enqueue from `a` to `to` that waits on the store lock,
/// and returns it once the server is running it: a `health` call sent after
/// it on the same connection has been answered (not ready: the store is
/// stalled), so the enqueue before it was taken up.
async fn enqueue_in_flight<'a>(
    a: &'a Client,
    to: &'a [IdentityKey],
    id: [u8; 16],
) -> std::pin::Pin<Box<impl std::future::Future<Output = Result<EnqueueResult, ClientError>> + 'a>>
{
    let mut enqueue = Box::pin(a.enqueue(to, id, b"in flight".to_vec()));
    // The first poll queues the call on the connection.
    assert!(futures::poll!(enqueue.as_mut()).is_pending());
    let h = a.health().await.unwrap();
    assert!(!h.ok, "the store is stalled, so the server is not ready");
    enqueue
}

/// SIGTERM and SIGINT drain: the enqueue in flight is answered and durable,
/// the subscription (a connection with no call in flight) ends at once, new
/// connections are refused, and the server exits cleanly.
async fn an_enqueue_in_flight_is_answered_and_durable_after(signal: &str) {
    let mut server =
        ServerProcess::start_with_env(BIN, &[("QUICNPROTOCHAT_DRAIN_TIMEOUT_SECS", "30")]).unwrap();
    let (alice, bob) = (Identity::generate().unwrap(), Identity::generate().unwrap());
    let a = client(&server, &alice).await;
    a.register("alice").await.unwrap();
    let b = client(&server, &bob).await;
    b.register("bob").await.unwrap();
    let mut pushed = b.subscribe(1).await.unwrap();

    let lock = StoreLock::take(&server);
    let to = [bob.public_key()];
    let enqueue = enqueue_in_flight(&a, &to, msg_id(1)).await;
    server.signal(signal).unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(2), pushed.next()).await;
    assert!(
        matches!(ended, Ok(None)),
        "the subscription ends as the drain starts: {ended:?}"
    );
    let refused = tokio::time::timeout(
        Duration::from_secs(2),
        Client::connect(server.client_config().unwrap()),
    )
    .await;
    assert!(
        matches!(refused, Ok(Err(ClientError::Connect { .. }))),
        "a draining server refuses new connections: {refused:?}"
    );
    drop(lock);
    let answer = tokio::time::timeout(Duration::from_secs(20), enqueue)
        .await
        .expect("the enqueue in flight is answered");
    assert!(
        matches!(answer, Ok(EnqueueResult::Stored(ref seqs)) if seqs == &[1]),
        "the enqueue in flight at SIG{signal} is acknowledged: {answer:?}"
    );
    let status = server
        .wait_exit(Duration::from_secs(20))
        .unwrap()
        .expect("the server exits once drained");
    assert!(status.success(), "{status}");

    server.restart().unwrap();
    let b = client(&server, &bob).await;
    let got = b.fetch(0, 16).await.unwrap();
    assert_eq!(got.len(), 1, "the acknowledged enqueue is durable");
    assert_eq!(got[0].payload, b"in flight");
}

#[tokio::test]
async fn sigterm_answers_the_enqueue_in_flight_before_closing() {
    an_enqueue_in_flight_is_answered_and_durable_after("TERM").await;
}

#[tokio::test]
async fn sigint_answers_the_enqueue_in_flight_before_closing() {
    an_enqueue_in_flight_is_answered_and_durable_after("INT").await;
}

/// An enqueue still running when the drain deadline passes gets no answer:
/// the client sees a connection error and retries with the same message id
/// on the next server, which stores it exactly once whatever became of the
/// first attempt.
#[tokio::test]
async fn an_enqueue_cut_off_at_the_drain_deadline_fails_retryably_and_is_stored_once() {
    let mut server =
        ServerProcess::start_with_env(BIN, &[("QUICNPROTOCHAT_DRAIN_TIMEOUT_SECS", "1")]).unwrap();
    let (alice, bob) = (Identity::generate().unwrap(), Identity::generate().unwrap());
    let a = client(&server, &alice).await;
    a.register("alice").await.unwrap();
    let b = client(&server, &bob).await;
    b.register("bob").await.unwrap();
    drop(b);

    let lock = StoreLock::take(&server);
    let to = [bob.public_key()];
    let enqueue = enqueue_in_flight(&a, &to, msg_id(7)).await;
    server.signal("TERM").unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), enqueue)
        .await
        .expect("the connection is closed at the deadline");
    match answer {
        Err(e) => assert!(retryable(&e), "not a retryable error: {e:?}"),
        Ok(r) => panic!("answered although the store was stalled: {r:?}"),
    }
    drop(lock);
    let status = server
        .wait_exit(Duration::from_secs(20))
        .unwrap()
        .expect("the server exits after the drain deadline");
    assert!(status.success(), "{status}");

    server.restart().unwrap();
    let a = client(&server, &alice).await;
    let retried = a
        .enqueue(&[bob.public_key()], msg_id(7), b"in flight".to_vec())
        .await
        .unwrap();
    let b = client(&server, &bob).await;
    let got = b.fetch(0, 16).await.unwrap();
    assert_eq!(got.len(), 1, "stored exactly once ({retried:?})");
    assert_eq!(got[0].payload, b"in flight");
}

/// The mode bits of `path`.
fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// The store's files are readable by the server's user only, whatever the
/// umask: a server started under umask 000 creates its data directory 0700
/// and every file in it 0600 (the database, its write-ahead log and
/// shared-memory file, the development key and certificate), and a store
/// whose files others could read is narrowed to 0600 at the next start.
#[tokio::test]
async fn store_files_are_private_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt as _;
    let mut server = ServerProcess::start_with_umask(BIN, "000").unwrap();
    let alice = Identity::generate().unwrap();
    let a = client(&server, &alice).await;
    // A committed write: the write-ahead log and shared-memory file exist.
    a.register("alice").await.unwrap();
    let data = server.data_dir();
    let db = data.join("quicnprotochat.db");
    let companions = [
        db.clone(),
        data.join("quicnprotochat.db-wal"),
        data.join("quicnprotochat.db-shm"),
    ];
    assert_eq!(mode(&data), 0o700, "data directory");
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        assert_eq!(mode(&path), 0o600, "{}", path.display());
        seen.push(path);
    }
    for file in &companions {
        assert!(seen.contains(file), "{} exists: {seen:?}", file.display());
    }

    drop(a);
    server.kill();
    for file in &companions {
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    server.restart().unwrap();
    for file in &companions {
        assert_eq!(mode(file), 0o600, "narrowed at start: {}", file.display());
    }
}
