//! The operator's HTTP endpoint of the real binary: a Prometheus scrape,
//! parsed, moves with real traffic and names no user; the probes answer
//! as Kubernetes expects, readiness following the store; the dashboard
//! and the alerts name only metrics the server exports, and Prometheus's
//! own checker accepts the alerts and their tests.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use quicnprotochat_client::harness::{PgCluster, ServerProcess, message_texts, next_messages};
use quicnprotochat_client::{Client, ServerErrorCode};
use quicnprotochat_core::Identity;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::support::{assert_code, pushed};

const BIN: &str = env!("CARGO_BIN_EXE_quicnprotochat-server");

/// One sample of the exposition.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A parsed scrape: the families declared by `# TYPE` and the samples.
#[derive(Debug)]
struct Scrape {
    types: BTreeMap<String, String>,
    samples: Vec<Sample>,
}

/// Suffixes a sample's name may add to its family's name (OpenMetrics).
const SUFFIXES: [&str; 7] = [
    "", "_total", "_bucket", "_sum", "_count", "_created", "_info",
];

impl Scrape {
    /// Parses the OpenMetrics text format strictly: every line is a
    /// descriptor or a sample of a declared family, and `# EOF` ends it.
    fn parse(text: &str) -> Self {
        let mut types = BTreeMap::new();
        let mut samples = Vec::new();
        let mut eof = false;
        for line in text.lines() {
            assert!(!eof, "a line after # EOF: {line}");
            if line == "# EOF" {
                eof = true;
                continue;
            }
            if let Some(rest) = line.strip_prefix("# ") {
                let mut parts = rest.splitn(3, ' ');
                let (kind, name) = (parts.next().unwrap(), parts.next().unwrap());
                let arg = parts.next().unwrap_or_default();
                assert!(
                    ["HELP", "TYPE", "UNIT"].contains(&kind),
                    "unknown descriptor: {line}"
                );
                if kind == "TYPE" {
                    assert!(
                        ["counter", "gauge", "histogram", "info"].contains(&arg),
                        "{line}"
                    );
                    types.insert(name.to_string(), arg.to_string());
                }
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap();
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("not a number: {line}"));
            let (name, labels) = match series.split_once('{') {
                None => (series.to_string(), BTreeMap::new()),
                Some((name, rest)) => {
                    let body = rest.strip_suffix('}').unwrap();
                    let mut labels = BTreeMap::new();
                    for pair in body.split("\",").filter(|p| !p.is_empty()) {
                        let (k, v) = pair.split_once("=\"").unwrap();
                        let v = v.strip_suffix('"').unwrap_or(v);
                        assert!(!v.contains('"') && !v.contains('\\'), "{line}");
                        labels.insert(k.to_string(), v.to_string());
                    }
                    (name.to_string(), labels)
                }
            };
            assert!(
                SUFFIXES.iter().any(|s| name
                    .strip_suffix(s)
                    .is_some_and(|family| types.contains_key(family))),
                "a sample of no declared family: {line}"
            );
            samples.push(Sample {
                name,
                labels,
                value,
            });
        }
        assert!(eof, "no # EOF");
        Self { types, samples }
    }

    /// The sum of the samples named `name` whose labels include `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }

    /// The labels of `quicnprotochat_build_info`.
    fn build_info(&self) -> &BTreeMap<String, String> {
        &self
            .samples
            .iter()
            .find(|s| s.name == "quicnprotochat_build_info")
            .expect("a build_info sample")
            .labels
    }

    /// Every sample name the scrape has.
    fn names(&self) -> BTreeSet<String> {
        self.samples.iter().map(|s| s.name.clone()).collect()
    }
}

/// One HTTP/1.1 GET (or another method): the status and the body.
async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut response))
        .await
        .expect("the endpoint answers within 20 s")
        .unwrap();
    let response = String::from_utf8(response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

async fn scrape(addr: SocketAddr) -> Scrape {
    let (status, body) = http(addr, "GET", "/metrics").await;
    assert_eq!(status, 200, "{body}");
    Scrape::parse(&body)
}

/// The HTTP endpoint's address, from the server's log.
fn http_addr(server: &ServerProcess) -> SocketAddr {
    let log = std::fs::read_to_string(server.log_path()).unwrap();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("operator endpoint bound"))
        .unwrap_or_else(|| panic!("no endpoint in the log:\n{log}"));
    let addr = line.split("http_addr=").nth(1).unwrap();
    addr.split_whitespace().next().unwrap().parse().unwrap()
}

fn start(env: &[(&str, &str)]) -> (ServerProcess, SocketAddr) {
    let mut all = vec![("QUICNPROTOCHAT_METRICS_LISTEN", "127.0.0.1:0")];
    all.extend_from_slice(env);
    let server = ServerProcess::start_with_env(BIN, &all).unwrap();
    let addr = http_addr(&server);
    (server, addr)
}

/// Waits (bounded) until `GET path` answers `status`.
async fn wait_for_status(addr: SocketAddr, path: &str, status: u16, within: Duration) -> String {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let (got, body) = http(addr, "GET", path).await;
        if got == status {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} still answers {got} ({body}) after {within:?}, not {status}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_scrape_after_real_traffic_counts_it_and_names_no_user() {
    let (server, addr) = start(&[]);
    let before = scrape(addr).await;
    assert_eq!(
        before.value("quicnprotochat_messages_enqueued_total", &[]),
        0.0
    );
    // Ready without any probe having asked: the scrape probes the store.
    assert_eq!(before.value("quicnprotochat_ready", &[]), 1.0);
    let build = before.build_info();
    assert_eq!(build["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(build["store"], "sqlite");
    let revision = &build["revision"];
    assert!(
        revision == "unknown"
            || (revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())),
        "{revision}"
    );

    // Real traffic: a group of two, bob listening for pushes.
    let alice = server.messenger("alice").await.unwrap();
    let bob = server.messenger("bob").await.unwrap();
    alice.create_group("g").await.unwrap();
    alice.invite("g", "bob").await.unwrap();
    bob.sync().await.unwrap();
    let mut pushes = bob.listen().await.unwrap();
    for i in 0..5 {
        alice.send("g", &format!("pushed {i}")).await.unwrap();
    }
    assert_eq!(next_messages(&mut pushes, 5).await.unwrap().len(), 5);
    drop(pushes);
    // Left waiting in bob's queue: the queue gauges see them.
    for i in 0..3 {
        alice.send("g", &format!("waiting {i}")).await.unwrap();
    }
    // A refused login: counted by outcome.
    let mut cfg = server.client_config().unwrap();
    cfg.access_token = b"wrong-token".to_vec();
    let stranger = Client::connect(cfg).await.unwrap();
    assert_code(
        stranger.init_auth(&Identity::generate().unwrap()).await,
        ServerErrorCode::Unauthenticated,
    );
    drop(stranger);
    // The queue gauges are read at most once a second.
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let after = scrape(addr).await;
    for (family, kind) in [
        ("quicnprotochat_messages_enqueued", "counter"),
        ("quicnprotochat_connections_open", "gauge"),
        ("quicnprotochat_rpc_duration_seconds", "histogram"),
        ("quicnprotochat_push_lag_seconds", "histogram"),
        ("quicnprotochat_store_commit_seconds", "histogram"),
        ("quicnprotochat_build", "info"),
    ] {
        assert_eq!(
            after.types.get(family).map(String::as_str),
            Some(kind),
            "{family}"
        );
    }
    let grew = |name: &str, labels: &[(&str, &str)], by: f64| {
        let (was, is) = (before.value(name, labels), after.value(name, labels));
        assert!(
            is - was >= by,
            "{name}{labels:?} went from {was} to {is}, not up by {by}"
        );
    };
    grew("quicnprotochat_connections_accepted_total", &[], 3.0);
    grew(
        "quicnprotochat_authentications_total",
        &[("outcome", "ok")],
        2.0,
    );
    grew(
        "quicnprotochat_authentications_total",
        &[("outcome", "unauthenticated")],
        1.0,
    );
    grew(
        "quicnprotochat_rpc_errors_total",
        &[("method", "authenticate"), ("code", "unauthenticated")],
        1.0,
    );
    grew(
        "quicnprotochat_rpc_calls_total",
        &[("method", "enqueue")],
        8.0,
    );
    assert_eq!(
        after.value("quicnprotochat_rpc_calls_total", &[("method", "enqueue")]),
        after.value(
            "quicnprotochat_rpc_duration_seconds_count",
            &[("method", "enqueue")]
        ),
        "every answered call is timed"
    );
    grew("quicnprotochat_messages_enqueued_total", &[], 8.0);
    grew("quicnprotochat_messages_pushed_total", &[], 5.0);
    grew("quicnprotochat_push_lag_seconds_count", &[], 5.0);
    grew("quicnprotochat_messages_fetched_total", &[], 1.0);
    grew("quicnprotochat_messages_acknowledged_total", &[], 1.0);
    grew("quicnprotochat_key_packages_served_total", &[], 1.0);
    grew("quicnprotochat_store_commit_seconds_count", &[], 8.0);
    grew("quicnprotochat_store_transaction_seconds_count", &[], 8.0);
    grew("quicnprotochat_store_batch_size_count", &[], 8.0);
    assert!(after.value("quicnprotochat_queued_messages", &[]) >= 3.0);
    assert!(after.value("quicnprotochat_largest_queue_messages", &[]) >= 3.0);
    assert_eq!(
        after.value("quicnprotochat_queue_depth_limit_messages", &[]),
        10_000.0
    );
    assert_eq!(after.value("quicnprotochat_store_errors_total", &[]), 0.0);
    // The histogram's buckets are cumulative and end at +Inf with the count.
    let inf = after.value(
        "quicnprotochat_rpc_duration_seconds_bucket",
        &[("method", "enqueue"), ("le", "+Inf")],
    );
    assert_eq!(
        inf,
        after.value(
            "quicnprotochat_rpc_duration_seconds_count",
            &[("method", "enqueue")]
        )
    );

    // No label names anyone: not a username, an identity key (hex, any
    // prefix of 8 characters), nor an address.
    let mut secrets = vec![
        "alice".to_string(),
        "bob".to_string(),
        "127.0.0.1".to_string(),
    ];
    for who in [&alice, &bob] {
        let hex = hex::encode(who.identity_key().await.as_bytes());
        secrets.push(hex[..8].to_string());
    }
    for sample in &after.samples {
        for (k, v) in &sample.labels {
            assert!(
                [
                    "method", "code", "outcome", "reason", "bucket", "kind", "le", "version",
                    "revision", "store"
                ]
                .contains(&k.as_str()),
                "unexpected label {k} on {}",
                sample.name
            );
            for secret in &secrets {
                assert!(!v.contains(secret.as_str()), "{} carries {v}", sample.name);
            }
        }
    }
    assert_eq!(message_texts(bob.sync().await.unwrap()).len(), 3);
}

/// A registered client of `server` as `name`.
async fn registered(server: &ServerProcess, name: &str) -> (Client, Identity) {
    let id = Identity::generate().unwrap();
    let c = Client::connect(server.client_config().unwrap())
        .await
        .unwrap();
    c.init_auth(&id).await.unwrap();
    c.register(name).await.unwrap();
    (c, id)
}

#[tokio::test]
async fn a_push_of_what_was_just_committed_reads_nothing_from_the_store() {
    let (server, addr) = start(&[]);
    let (alice, _) = registered(&server, "alice").await;
    let (bob, bob_id) = registered(&server, "bob").await;
    let b = [bob_id.public_key()];
    let reads = |s: &Scrape| s.value("quicnprotochat_push_store_reads_total", &[]);
    assert_eq!(reads(&scrape(addr).await), 0.0);
    // The subscription's first read of the queue is the one read.
    let mut sub = bob.subscribe(1).await.unwrap();
    let mut id = 0u128;
    let mut next_id = || {
        id += 1;
        (id << 64 | u128::from(std::process::id())).to_le_bytes()
    };
    // One message at a time, each pushed before the next is sent: every
    // push comes from memory, and nothing is read after it.
    for i in 1..=40u64 {
        alice
            .enqueue(&b, next_id(), format!("m{i}").into_bytes())
            .await
            .unwrap();
        let e = pushed(&mut sub).await;
        assert_eq!(e.seq, i);
    }
    let after_one_by_one = scrape(addr).await;
    assert_eq!(
        after_one_by_one.value("quicnprotochat_messages_pushed_total", &[]),
        40.0
    );
    assert_eq!(reads(&after_one_by_one), 1.0, "one read: the first");
    // A burst of concurrent sends: completions may be announced out of
    // order, which costs a read to fill the gap, but not one per push.
    let sends = (0..64).map(|i| alice.enqueue(&b, next_id(), format!("burst {i}").into_bytes()));
    for r in futures::future::join_all(sends).await {
        r.unwrap();
    }
    for i in 41..=104u64 {
        let e = pushed(&mut sub).await;
        assert_eq!(e.seq, i);
    }
    let burst_reads = reads(&scrape(addr).await) - 1.0;
    assert!(
        burst_reads <= 6.0,
        "{burst_reads} store reads for 64 pushed messages"
    );
}

#[tokio::test]
async fn the_probes_answer_as_kubernetes_expects_and_readiness_follows_postgresql() {
    // The embedded store: live and ready; only GET on the three paths.
    let (_server, addr) = start(&[]);
    assert_eq!(http(addr, "GET", "/livez").await, (200, "ok\n".to_string()));
    assert_eq!(
        http(addr, "GET", "/readyz").await,
        (200, "ready\n".to_string())
    );
    assert_eq!(http(addr, "GET", "/nope").await.0, 404);
    assert_eq!(http(addr, "POST", "/metrics").await.0, 405);

    // A remote store: not ready while PostgreSQL is down, ready again
    // without a restart once it is back; alive throughout.
    let cluster = PgCluster::start().unwrap();
    let db = cluster.database().await.unwrap();
    let (server, addr) = start(&[("QUICNPROTOCHAT_DATABASE_URL", db.url.as_str())]);
    assert_eq!(http(addr, "GET", "/readyz").await.0, 200);
    let before = scrape(addr).await;
    assert_eq!(before.value("quicnprotochat_ready", &[]), 1.0);
    assert_eq!(before.build_info()["store"], "postgres");

    cluster.stop_server(true).unwrap();
    let body = wait_for_status(addr, "/readyz", 503, Duration::from_secs(20)).await;
    assert!(body.contains("does not take writes"), "{body}");
    assert_eq!(http(addr, "GET", "/livez").await.0, 200);
    let down = scrape(addr).await;
    assert_eq!(down.value("quicnprotochat_ready", &[]), 0.0);
    assert!(down.value("quicnprotochat_store_errors_total", &[]) >= 1.0);

    cluster.start_server().unwrap();
    wait_for_status(addr, "/readyz", 200, Duration::from_secs(30)).await;
    assert_eq!(scrape(addr).await.value("quicnprotochat_ready", &[]), 1.0);
    drop(server);
}

/// The repository's monitoring files.
fn monitoring(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../docs/monitoring")
        .join(file)
}

/// The metric names an expression file mentions.
fn mentioned_metrics(text: &str) -> BTreeSet<String> {
    let re = regex::Regex::new(r"quicnprotochat_[a-z_]+").unwrap();
    re.find_iter(text).map(|m| m.as_str().to_string()).collect()
}

#[tokio::test]
async fn the_dashboard_and_the_alerts_name_only_exported_metrics() {
    let (server, addr) = start(&[]);
    // Traffic, so that every labelled family has samples.
    let alice = server.messenger("alice").await.unwrap();
    let bob = server.messenger("bob").await.unwrap();
    alice.create_group("g").await.unwrap();
    alice.invite("g", "bob").await.unwrap();
    bob.sync().await.unwrap();
    let mut pushes = bob.listen().await.unwrap();
    alice.send("g", "hi").await.unwrap();
    next_messages(&mut pushes, 1).await.unwrap();
    // A refused login.
    let mut cfg = server.client_config().unwrap();
    cfg.access_token = b"wrong-token".to_vec();
    let stranger = Client::connect(cfg).await.unwrap();
    assert_code(
        stranger.init_auth(&Identity::generate().unwrap()).await,
        ServerErrorCode::Unauthenticated,
    );
    let exported = scrape(addr).await;
    // Every known series exists from the start, so a name without a
    // sample is a name the server does not export.
    let names = exported.names();
    let known = |m: &str| names.contains(m);

    let dashboard = std::fs::read_to_string(monitoring("grafana-dashboard.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let mut exprs = Vec::new();
    collect_exprs(&json, &mut exprs);
    assert!(
        exprs.len() >= 10,
        "the dashboard has {} queries",
        exprs.len()
    );
    let alerts = std::fs::read_to_string(monitoring("alerts.yml")).unwrap();
    for (file, text) in [("dashboard", exprs.join("\n")), ("alerts", alerts)] {
        let used = mentioned_metrics(&text);
        assert!(used.len() >= 5, "{file} names {used:?}");
        for m in used {
            assert!(
                known(&m),
                "{file} names {m}, which the server does not export"
            );
        }
    }

    // Prometheus's own checker: the rules parse, and their unit tests
    // (alerts firing on made-up series) pass.
    for args in [
        vec!["check", "rules", "alerts.yml"],
        vec!["test", "rules", "alerts.test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(&args)
            .current_dir(monitoring(""))
            .output()
            .expect("promtool (installed by scripts/bootstrap)");
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Every `expr` of a Grafana dashboard's targets.
fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| collect_exprs(i, out)),
        _ => {}
    }
}
