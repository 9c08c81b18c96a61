//! `synapse`: the Matrix reference homeserver Synapse (PyPI package
//! `matrix-synapse`, in a virtual environment `scripts/bench` makes) as a
//! peer, in the same run as our server, driven by a minimal client of the
//! client-server API over HTTP/1.1 (hyper).
//!
//! Each pair has a private room of its own: the sender creates it and
//! invites the receiver, who joins.  The sender sends with `PUT
//! /_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}` (one request
//! in flight); the receiver long-polls `/sync` from its last `next_batch`,
//! with a filter limited to the room's `m.room.message` events.
//!
//! Configuration, in a temporary directory: SQLite (WAL, SQLite's default
//! `synchronous = FULL`), a plain HTTP listener on loopback (Synapse
//! normally sits behind a TLS reverse proxy: there is no TLS here, which
//! favours it), the client API only, no federation key servers, presence
//! off, every `rc_*` rate limit raised out of reach, open registration
//! without verification and 4 bcrypt rounds (the accounts are registered
//! through the client API before the measurements), logging at WARNING.
//! Synapse answers a send once the event is persisted: like ours, it makes
//! a message durable before it acknowledges it.
//!
//! Measured: delivered messages/s with 10 pairs (each sender waiting for
//! the answer to its send), latency p50/p99 open loop at `--synapse-rate`
//! (Synapse sustains far less than the XMPP servers), server CPU per
//! message, and memory per idle logged-in client: K registered users, each
//! with its own keep-alive connection holding a `/sync` long poll.  Every
//! run checks that every message sent was delivered.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use clap::Args;
use http_body_util::{BodyExt as _, Full};
use hyper::Method;
use hyper::body::Bytes;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpStream;

use crate::common::Report;
use crate::delivery::{DeliveryArgs, Pace};
use crate::peer;

/// Options of `synapse`.
#[derive(Debug, Clone, Args)]
pub struct SynapseArgs {
    /// The Python virtual environment Synapse is installed in [default:
    /// `synapse-venv` in the target directory this binary was built in,
    /// where scripts/bench installs it].
    #[arg(long, env = "QUICNPROTOCHAT_SYNAPSE_VENV")]
    pub synapse_venv: Option<PathBuf>,
    /// Open-loop rate for Synapse's latency figures (and ours beside
    /// them), messages/s in total.
    #[arg(long, default_value_t = 10.0)]
    pub synapse_rate: f64,
    /// Idle logged-in clients (each holding a `/sync` long poll) for the
    /// memory figure.
    #[arg(long, default_value_t = 1_000)]
    pub synapse_idle: usize,
}

/// Whether the error says Synapse is not installed (the scenario is then
/// skipped by `all`).
pub fn not_installed(e: &anyhow::Error) -> bool {
    format!("{e:#}").contains("Synapse is not installed (")
}

const PASSWORD: &str = "bench-password";
/// Bound on one request (a `/sync` long poll lasts up to `POLL_MS`).
const REQUEST: Duration = Duration::from_secs(90);
/// How long one `/sync` long poll waits for an event, ms.
const POLL_MS: u64 = 30_000;

/// The virtual environment: given, or `synapse-venv` in the target
/// directory (the parent of this binary's `release` or `debug`).
fn venv(sa: &SynapseArgs) -> anyhow::Result<PathBuf> {
    if let Some(v) = &sa.synapse_venv {
        return Ok(v.clone());
    }
    let exe = std::env::current_exe()?;
    let target = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("no target directory above {}", exe.display()))?;
    Ok(target.join("synapse-venv"))
}

/// A running Synapse, killed on drop.
struct Synapse {
    proc: peer::Running,
    port: u16,
    version: String,
}

impl Synapse {
    fn pid(&self) -> String {
        self.proc.pid()
    }

    fn start(sa: &SynapseArgs, core: Option<usize>) -> anyhow::Result<Self> {
        let venv = venv(sa)?;
        let python = venv.join("bin").join("python");
        if !venv.join("bin").join("synapse_homeserver").exists() || !python.exists() {
            bail!(
                "Synapse is not installed ({}): scripts/bench installs it",
                venv.display()
            );
        }
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        let port = peer::free_port()?;
        let limit = "{per_second: 1000000, burst_count: 1000000}";
        let conf = d.join("homeserver.yaml");
        let log = d.join("log.yaml");
        std::fs::write(
            &log,
            "version: 1\nformatters:\n  precise:\n    format: '%(asctime)s %(name)s %(levelname)s %(message)s'\n\
             handlers:\n  console:\n    class: logging.StreamHandler\n    formatter: precise\n    stream: ext://sys.stdout\n\
             root:\n  level: WARNING\n  handlers: [console]\ndisable_existing_loggers: false\n",
        )?;
        std::fs::write(
            &conf,
            format!(
                "server_name: \"localhost\"\npid_file: \"{pid}\"\n\
                 listeners:\n  - port: {port}\n    bind_addresses: [\"127.0.0.1\"]\n    type: http\n\
                 \x20   tls: false\n    x_forwarded: false\n    resources:\n      - names: [client]\n\
                 \x20       compress: false\n\
                 database:\n  name: sqlite3\n  args:\n    database: \"{db}\"\n\
                 log_config: \"{log}\"\nmedia_store_path: \"{media}\"\n\
                 signing_key_path: \"{key}\"\nreport_stats: false\ntrusted_key_servers: []\n\
                 suppress_key_server_warning: true\nenable_metrics: false\n\
                 enable_registration: true\nenable_registration_without_verification: true\n\
                 bcrypt_rounds: 4\npresence:\n  enabled: false\n\
                 rc_message: {limit}\nrc_registration: {limit}\n\
                 rc_login:\n  address: {limit}\n  account: {limit}\n  failed_attempts: {limit}\n\
                 rc_joins:\n  local: {limit}\n  remote: {limit}\nrc_joins_per_room: {limit}\n\
                 rc_room_creation: {limit}\n\
                 rc_invites:\n  per_room: {limit}\n  per_user: {limit}\n  per_issuer: {limit}\n",
                pid = d.join("homeserver.pid").display(),
                db = d.join("homeserver.db").display(),
                log = log.display(),
                media = d.join("media").display(),
                key = d.join("localhost.signing.key").display(),
            ),
        )?;
        let keys = std::process::Command::new(&python)
            .args(["-m", "synapse.app.homeserver", "-c"])
            .arg(&conf)
            .arg("--generate-keys")
            .current_dir(d)
            .output()
            .with_context(|| format!("starting {}", python.display()))?;
        anyhow::ensure!(
            keys.status.success(),
            "Synapse could not generate its keys: {}",
            String::from_utf8_lossy(&keys.stderr)
        );
        let mut cmd = peer::pinned(&python, core);
        cmd.args(["-m", "synapse.app.homeserver", "-c"])
            .arg(&conf)
            .current_dir(d);
        let version = std::process::Command::new(&python)
            .args(["-c", "import synapse; print(synapse.__version__)"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let child = peer::start_command(cmd, "Synapse", "Synapse", port)?;
        Ok(Self {
            proc: peer::Running::new(child, dir),
            port,
            version,
        })
    }
}

/// Aborts its task on drop.
struct Task(tokio::task::JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One keep-alive HTTP/1.1 connection to Synapse, with an access token.
struct Http {
    send: http1::SendRequest<Full<Bytes>>,
    token: Option<String>,
    _conn: Task,
}

impl Http {
    async fn connect(port: u16, token: Option<String>) -> anyhow::Result<Self> {
        let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
        tcp.set_nodelay(true)?;
        let (send, conn) = http1::handshake(TokioIo::new(tcp)).await?;
        let conn = Task(tokio::spawn(async move {
            let _ = conn.await;
        }));
        Ok(Self {
            send,
            token,
            _conn: conn,
        })
    }

    /// One request; the answer's JSON, or an error with Synapse's answer.
    async fn call(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .header("content-type", "application/json");
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req.body(Full::new(Bytes::from(
            body.map(|b| b.to_string()).unwrap_or_default(),
        )))?;
        let answer = tokio::time::timeout(REQUEST, async {
            self.send.ready().await?;
            let resp = self.send.send_request(req).await?;
            let status = resp.status();
            let bytes = resp.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, bytes))
        })
        .await
        .with_context(|| format!("Synapse: no answer to {path} within {REQUEST:?}"))??;
        let (status, bytes) = answer;
        anyhow::ensure!(
            status.is_success(),
            "Synapse answered {status} to {path}: {}",
            String::from_utf8_lossy(&bytes)
        );
        Ok(serde_json::from_slice(&bytes)?)
    }
}

/// Percent-encodes `s` for a path segment or a query value.
fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Registers `user` (the client API, dummy authentication): its token.
async fn register(h: &mut Http, user: &str) -> anyhow::Result<String> {
    let r = h
        .call(
            Method::POST,
            "/_matrix/client/v3/register",
            Some(json!({"username": user, "password": PASSWORD,
                "auth": {"type": "m.login.dummy"}})),
        )
        .await
        .with_context(|| format!("registering {user}"))?;
    r.get("access_token")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| anyhow!("Synapse: no access token for {user}: {r}"))
}

/// `next_batch` of a `/sync` answer.
fn next_batch(r: &Value) -> anyhow::Result<String> {
    r.get("next_batch")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| anyhow!("Synapse: /sync without next_batch: {r}"))
}

/// A sender: one `m.room.message` per send, answered once persisted.
struct MatrixSend {
    h: Http,
    room: String,
    txn: u64,
    pad: String,
}

impl peer::Send for MatrixSend {
    async fn send(&mut self, stamp: u64) -> anyhow::Result<()> {
        self.txn += 1;
        let path = format!(
            "/_matrix/client/v3/rooms/{}/send/m.room.message/t{}",
            enc(&self.room),
            self.txn
        );
        let body = json!({"msgtype": "m.text", "body": format!("{stamp} {}", self.pad)});
        self.h.call(Method::PUT, &path, Some(body)).await?;
        Ok(())
    }
}

/// A receiver: long-polls `/sync` for its room's messages.
struct MatrixReceive {
    h: Http,
    room: String,
    filter: String,
    since: String,
    queue: VecDeque<u64>,
}

impl peer::Receive for MatrixReceive {
    async fn next(&mut self) -> anyhow::Result<Option<u64>> {
        // Bounded: each poll lasts at most POLL_MS.
        for _ in 0..10_000 {
            if let Some(s) = self.queue.pop_front() {
                return Ok(Some(s));
            }
            let path = format!(
                "/_matrix/client/v3/sync?filter={}&timeout={POLL_MS}&since={}",
                self.filter,
                enc(&self.since)
            );
            let r = self.h.call(Method::GET, &path, None).await?;
            self.since = next_batch(&r)?;
            let timeline = r
                .get("rooms")
                .and_then(|x| x.get("join"))
                .and_then(|x| x.get(&self.room))
                .and_then(|x| x.get("timeline"));
            if let Some(t) = timeline {
                anyhow::ensure!(
                    t.get("limited").and_then(Value::as_bool) != Some(true),
                    "Synapse: a /sync timeline was cut (limited): messages would be missed"
                );
                for e in t
                    .get("events")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let stamp = e
                        .get("content")
                        .and_then(|c| c.get("body"))
                        .and_then(Value::as_str)
                        .and_then(|b| b.split(' ').next())
                        .and_then(|s| s.parse().ok());
                    if let Some(s) = stamp {
                        self.queue.push_back(s);
                    }
                }
            }
        }
        bail!("Synapse: no message in 10 000 polls")
    }
}

/// The `/sync` filter for one room's messages, percent-encoded.
fn room_filter(room: &str) -> String {
    enc(&json!({
        "room": {
            "rooms": [room],
            "timeline": {"limit": 1000, "types": ["m.room.message"]},
            "state": {"types": []},
            "ephemeral": {"not_types": ["*"]},
            "account_data": {"not_types": ["*"]},
        },
        "presence": {"not_types": ["*"]},
        "account_data": {"not_types": ["*"]},
    })
    .to_string())
}

/// An initial `/sync` (no wait) with `filter`: its `next_batch`.
async fn initial_sync(h: &mut Http, filter: &str) -> anyhow::Result<String> {
    let r = h
        .call(
            Method::GET,
            &format!("/_matrix/client/v3/sync?filter={filter}&timeout=0"),
            None,
        )
        .await?;
    next_batch(&r)
}

/// 10 pairs through Synapse, each in a room of its own (`run` tells the
/// accounts of successive runs apart).
async fn drive(
    s: &Synapse,
    a: &DeliveryArgs,
    pace: Pace,
    run: usize,
) -> anyhow::Result<crate::delivery::Outcome> {
    let mut reg = Http::connect(s.port, None).await?;
    let mut pairs = Vec::new();
    for i in 0..a.pairs {
        let receiver = format!("r{i}x{run}");
        let mut sender = Http::connect(
            s.port,
            Some(register(&mut reg, &format!("s{i}x{run}")).await?),
        )
        .await?;
        let mut recv = Http::connect(s.port, Some(register(&mut reg, &receiver).await?)).await?;
        let created = sender
            .call(
                Method::POST,
                "/_matrix/client/v3/createRoom",
                Some(
                    json!({"preset": "private_chat", "invite": [format!("@{receiver}:localhost")]}),
                ),
            )
            .await?;
        let room = created
            .get("room_id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| anyhow!("Synapse: no room_id: {created}"))?;
        recv.call(
            Method::POST,
            &format!("/_matrix/client/v3/join/{}", enc(&room)),
            Some(json!({})),
        )
        .await?;
        let filter = room_filter(&room);
        let since = initial_sync(&mut recv, &filter).await?;
        pairs.push((
            MatrixSend {
                h: sender,
                room: room.clone(),
                txn: 0,
                pad: "x".repeat(a.size.saturating_sub(24)),
            },
            MatrixReceive {
                h: recv,
                room,
                filter,
                since,
                queue: VecDeque::new(),
            },
        ));
    }
    let base = Instant::now();
    peer::drive(&s.pid(), "Synapse", base, pairs, a, pace).await
}

/// An idle logged-in client: its own connection holding a `/sync` long
/// poll (polled again when it returns, a bounded number of times).
async fn idle_client(port: u16, token: String) -> anyhow::Result<Task> {
    let mut h = Http::connect(port, Some(token)).await?;
    let filter = enc(r#"{"room":{"timeline":{"limit":1}},"presence":{"not_types":["*"]}}"#);
    let mut since = initial_sync(&mut h, &filter).await?;
    Ok(Task(tokio::spawn(async move {
        for _ in 0..100 {
            let path = format!(
                "/_matrix/client/v3/sync?filter={filter}&timeout={POLL_MS}&since={}",
                enc(&since)
            );
            match h.call(Method::GET, &path, None).await {
                Ok(r) => match next_batch(&r) {
                    Ok(n) => since = n,
                    Err(_) => return,
                },
                Err(_) => return,
            }
        }
    })))
}

/// Runs the scenario: our server and Synapse, the same measurements.
pub async fn run(
    bin: &Path,
    core: Option<usize>,
    a: &DeliveryArgs,
    sa: &SynapseArgs,
) -> anyhow::Result<Report> {
    let synapse = Synapse::start(sa, core)?;
    // Each sender waits for the answer to its send: one lane per pair.
    let one_lane = DeliveryArgs {
        depth: 1,
        ..a.clone()
    };
    let theirs = drive(&synapse, &one_lane, Pace::at(None, &one_lane)?, 0).await?;
    let open = Pace::at(Some(sa.synapse_rate), &one_lane)?;
    let theirs_open = drive(&synapse, &one_lane, open, 1).await?;
    let mut reg = Http::connect(synapse.port, None).await?;
    let mut tokens = Vec::with_capacity(sa.synapse_idle);
    for i in 0..sa.synapse_idle {
        tokens.push(register(&mut reg, &format!("idle{i}")).await?);
    }
    drop(reg);
    let port = synapse.port;
    let their_kib = peer::idle_kib(&synapse.pid(), sa.synapse_idle, |i| {
        let token = tokens.get(i).cloned();
        async move {
            let token = token.ok_or_else(|| anyhow!("no idle account {i}"))?;
            idle_client(port, token).await
        }
    })
    .await?;
    let version = synapse.version.clone();
    drop(synapse);
    let ours = peer::ours(bin, core, a, sa.synapse_rate, sa.synapse_idle).await?;
    let mut report = peer::compare(
        "synapse",
        &format!(
            "Synapse {version} (Matrix) over plain HTTP, SQLite (persists each event before answering)"
        ),
        a,
        sa.synapse_rate,
        sa.synapse_idle,
        ours,
        (theirs.figures(), theirs_open.figures(), their_kib),
    );
    if let Some(p) = report.peer_figures.as_object_mut() {
        p.insert("durable".into(), json!(true));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_ids_and_filters_are_percent_encoded() {
        assert_eq!(enc("!abc-_.~:localhost"), "%21abc-_.~%3Alocalhost");
        assert_eq!(enc("s9_1 x"), "s9_1%20x");
        let f = room_filter("!r:localhost");
        assert!(!f.contains(['{', '"', '!', ':', ' ']), "{f}");
        assert!(f.contains("%21r%3Alocalhost"), "{f}");
    }
}
