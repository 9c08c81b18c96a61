//! What the chat-server peers (`ngircd`, `prosody`) share: driving sender
//! and receiver pairs through a peer over its own protocol, measuring our
//! server the same way, and the report that sets the two side by side.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::anyhow;
use quicnprotochat_proto::rustls;
use rustls::pki_types::CertificateDer;
use serde_json::{Value, json};

use crate::common::{self, Report};
use crate::delivery::{self, DeliveryArgs, Pace};
use crate::startup::{self, IdleArgs};

/// The sending end of one pair: writes one message stamped `stamp` (µs
/// since the run's base) to its receiver.
pub trait Send: std::marker::Send + 'static {
    /// Sends one message.
    fn send(&mut self, stamp: u64) -> impl Future<Output = anyhow::Result<()>> + std::marker::Send;
}

/// The receiving end of one pair.
pub trait Receive: std::marker::Send + 'static {
    /// The stamp of the next message delivered; `None` when the stream ended.
    fn next(&mut self) -> impl Future<Output = anyhow::Result<Option<u64>>> + std::marker::Send;
}

/// A peer server's process and its directory: killed, waited for and
/// removed on drop.
pub struct Running {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Running {
    /// Owns `child`, which runs in `dir`.
    pub fn new(child: std::process::Child, dir: tempfile::TempDir) -> Self {
        Self { child, _dir: dir }
    }

    /// Its pid, as the CPU and memory readings take it.
    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Drives `pairs` through the peer process `pid` (`name` in errors) for
/// `a.duration`, as fast as possible or open loop (`pace`), then waits up
/// to 30 s for every message sent to arrive: a message lost fails the run.
pub async fn drive<S: Send, R: Receive>(
    pid: &str,
    name: &str,
    base: Instant,
    pairs: Vec<(S, R)>,
    a: &DeliveryArgs,
    pace: Pace,
) -> anyhow::Result<delivery::Outcome> {
    let received = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (senders, receivers): (Vec<S>, Vec<R>) = pairs.into_iter().unzip();
    let mut recv_tasks = Vec::new();
    for mut r in receivers {
        let received = received.clone();
        let mut stop = stop_rx.clone();
        recv_tasks.push(tokio::spawn(async move {
            let mut h = common::histogram()?;
            loop {
                let stamp = tokio::select! {
                    s = r.next() => s?,
                    _ = stop.changed() => break,
                };
                let Some(stamp) = stamp else { break };
                h.record(common::micros(base.elapsed()).saturating_sub(stamp))?;
                received.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok((h, r))
        }));
    }
    let cpu0 = common::cpu_us(pid)?;
    let start = Instant::now();
    let deadline = start + Duration::from_secs(a.duration);
    let lanes = senders.len().max(1);
    let mut send_tasks = Vec::new();
    for (i, mut s) in senders.into_iter().enumerate() {
        let max = a.max_messages;
        let offset = Duration::from_secs_f64(pace.interval_secs() * i as f64 / lanes as f64);
        send_tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while n < max && pace.within(start, offset, n, deadline) {
                s.send(pace.slot(base, start, offset, n).await).await?;
                n += 1;
            }
            anyhow::Ok((n, s))
        }));
    }
    let (mut sent, mut keep) = (0, Vec::new());
    for t in send_tasks {
        let (n, s) = t.await??;
        sent += n;
        keep.push(s);
    }
    let grace = Instant::now() + Duration::from_secs(30);
    while received.load(Ordering::Relaxed) < sent && Instant::now() < grace {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = start.elapsed();
    let cpu_us = common::cpu_us(pid)?.saturating_sub(cpu0);
    let _ = stop_tx.send(true);
    let mut latency = common::histogram()?;
    for t in recv_tasks {
        latency.add(t.await??.0)?;
    }
    let got = received.load(Ordering::Relaxed);
    anyhow::ensure!(got == sent, "{name} delivered {got} of {sent} messages");
    drop(keep);
    Ok(delivery::Outcome::of_one_process(
        sent, got, elapsed, latency, cpu_us,
    ))
}

/// The peer process `pid`'s memory per connection after `login` opened
/// `k` of them (held while it is measured).
pub async fn idle_kib<C, F, Fut>(pid: &str, k: usize, login: F) -> anyhow::Result<f64>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<C>>,
{
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss0 = common::rss_kib(pid)?;
    let mut held = Vec::with_capacity(k);
    for i in 0..k {
        held.push(login(i).await?);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss = common::rss_kib(pid)?;
    drop(held);
    Ok(rss.saturating_sub(rss0) as f64 / k.max(1) as f64)
}

/// Our server measured as the peers are: (as fast as possible, open loop
/// at `rate`, KiB per idle authenticated connection at `idle`).
pub async fn ours(
    bin: &Path,
    core: Option<usize>,
    a: &DeliveryArgs,
    rate: f64,
    idle: usize,
) -> anyhow::Result<(Value, Value, f64)> {
    let max = delivery::sqlcipher(bin, core, a, None).await?;
    let open = delivery::sqlcipher(bin, core, a, Some(rate)).await?;
    for o in [&max, &open] {
        anyhow::ensure!(
            o.complete(),
            "our server delivered {} of {} messages",
            o.received(),
            o.sent()
        );
    }
    let memory = startup::idle_memory(
        bin,
        core,
        &IdleArgs {
            connections: idle,
            idle_concurrency: 16,
        },
    )
    .await?;
    let kib = memory
        .figures
        .get("kib_per_connection")
        .and_then(Value::as_f64)
        .ok_or_else(|| anyhow!("no idle memory figure"))?;
    Ok((max.figures(), open.figures(), kib))
}

/// A TLS client configuration (our ring provider) that trusts the one
/// self-signed certificate `cert` (DER).
pub fn trusting(cert: &[u8]) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(cert.to_vec()))?;
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(tls))
}

/// A free loopback TCP port.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()?
        .port())
}

/// `bin`, pinned to `core` with taskset when given.
pub fn pinned(bin: &Path, core: Option<usize>) -> std::process::Command {
    match core {
        Some(c) => {
            let mut cmd = std::process::Command::new("taskset");
            cmd.arg("-c").arg(c.to_string()).arg(bin);
            cmd
        }
        None => std::process::Command::new(bin),
    }
}

/// Starts the peer server `bin` (pinned to `core`) with `args` and waits
/// until it accepts connections on `port`; fails with its output if it
/// does not within 60 s.  Its output is drained for its whole life.
pub fn start_server(
    bin: &Path,
    core: Option<usize>,
    args: &[&std::ffi::OsStr],
    name: &str,
    port: u16,
) -> anyhow::Result<std::process::Child> {
    let mut cmd = pinned(bin, core);
    cmd.args(args);
    start_command(cmd, &bin.display().to_string(), name, port)
}

/// Starts the peer server command `cmd` (`what` in errors) and waits until
/// it accepts connections on `port`, as [`start_server`] does.
pub fn start_command(
    mut cmd: std::process::Command,
    what: &str,
    name: &str,
    port: u16,
) -> anyhow::Result<std::process::Child> {
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| anyhow!("starting {what}: {e}"))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("no output of {name}"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut log = Vec::new();
    loop {
        log.extend(rx.try_iter());
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(child);
        }
        if Instant::now() > deadline || child.try_wait()?.is_some() {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!(
                "{name} did not listen on port {port}; its output:\n{}",
                log.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One peer's report: (as fast as possible, open loop at `rate`, KiB per
/// idle connection) for us and for the peer, with the three ratios.
pub fn compare(
    scenario: &str,
    peer: &str,
    a: &DeliveryArgs,
    rate: f64,
    idle: usize,
    ours: (Value, Value, f64),
    theirs: (Value, Value, f64),
) -> Report {
    let rate_of = |o: &Value| {
        o.get("delivered_per_sec")
            .and_then(Value::as_f64)
            .unwrap_or(0.0)
    };
    let p99 = |o: &Value| {
        o.get("latency")
            .and_then(|l| l.get("p99_ms"))
            .and_then(Value::as_f64)
            .unwrap_or(f64::NAN)
    };
    let throughput_ratio = rate_of(&ours.0) / rate_of(&theirs.0).max(1e-9);
    let p99_ratio = p99(&ours.1) / p99(&theirs.1);
    let memory_ratio = ours.2 / theirs.2.max(1e-9);
    Report {
        scenario: scenario.into(),
        params: json!({"pairs": a.pairs, "size": a.size, "duration": a.duration,
            "rate_per_sec": rate, "idle_connections": idle}),
        cpu_us_per_op: json!({
            "server": ours.0.get("server_cpu_us_per_msg"),
            "peer": theirs.0.get("server_cpu_us_per_msg"),
            "p99_ratio_at_equal_rate": p99_ratio,
            "memory_ratio": memory_ratio,
        }),
        figures: json!({
            "throughput": ours.0,
            "open_loop": ours.1,
            "kib_per_idle_connection": ours.2,
            "durable": true,
        }),
        peer: peer.into(),
        peer_figures: json!({
            "throughput": theirs.0,
            "open_loop": theirs.1,
            "kib_per_idle_connection": theirs.2,
            "durable": false,
        }),
        ratio_of: "delivered msgs/s".into(),
        ratio: Some(throughput_ratio),
        target:
            "ahead on msgs/s (>= 1), p99 at equal rate (<= 1) and memory per idle connection (<= 1)"
                .into(),
        pass: Some(throughput_ratio >= 1.0 && p99_ratio <= 1.0 && memory_ratio <= 1.0),
    }
}

/// Adds the offline path's figures (`messages` sent to logged-out
/// recipients, then fetched at login) to a peer's report, ours and theirs.
pub fn add_offline(report: &mut Report, messages: u64, ours: Value, theirs: Value) {
    if let Some(p) = report.params.as_object_mut() {
        p.insert("offline_messages".into(), json!(messages));
    }
    if let Some(f) = report.figures.as_object_mut() {
        f.insert("offline".into(), ours);
    }
    if let Some(f) = report.peer_figures.as_object_mut() {
        f.insert("offline".into(), theirs);
    }
}
