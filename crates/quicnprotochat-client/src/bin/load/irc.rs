//! `ngircd`: the IRC server ngIRCd (Debian package `ngircd`) as a peer, in
//! the same run as our server.
//!
//! ngIRCd relays private messages between connected users and stores
//! nothing, so it is a relay-class peer: it does not make a message durable
//! (it keeps no message for an offline user at all), where our figures
//! include a durable commit of every message and end-to-end encryption is
//! the clients' (the payload is opaque to both servers).  Configuration,
//! in a temporary directory: TLS only for the clients (GnuTLS, a fresh
//! self-signed certificate), loopback, no DNS or ident lookups, and
//! `MaxPenaltyTime = 0`, which turns its per-client flood throttling off
//! (our rate limits are raised for the runs likewise).
//!
//! Measured, for both servers: delivered messages/s with 10 sender/receiver
//! pairs and 256-byte payloads, send-to-receive latency p50/p99 open loop
//! at one rate, server CPU per message, and server memory per idle
//! logged-in connection at K = 1 000.  Every run checks that every message
//! sent was delivered.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use clap::Args;
use hdrhistogram::Histogram;
use quicnprotochat_proto::rustls;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

use crate::common::{self, Report};
use crate::delivery::{self, DeliveryArgs, Pace};
use crate::startup::{self, IdleArgs};

/// Options of `ngircd`.
#[derive(Debug, Clone, Args)]
pub struct IrcArgs {
    /// The ngIRCd executable.
    #[arg(long, default_value = "/usr/sbin/ngircd")]
    pub ngircd: PathBuf,
    /// Open-loop rate for the latency figures, messages/s in total.
    #[arg(long, default_value_t = 2_000.0)]
    pub irc_rate: f64,
    /// Idle logged-in connections for the memory figure.
    #[arg(long, default_value_t = 1_000)]
    pub irc_idle: usize,
}

/// Whether the error says ngIRCd is not installed (the scenario is then
/// skipped by `all`).
pub fn not_installed(e: &anyhow::Error) -> bool {
    format!("{e:#}").contains("ngIRCd is not installed")
}

/// A running ngIRCd, killed on drop.
struct Ircd {
    child: Child,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    _dir: tempfile::TempDir,
}

impl Drop for Ircd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Ircd {
    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    fn start(bin: &Path, core: Option<usize>) -> anyhow::Result<Self> {
        if !bin.exists() {
            bail!(
                "ngIRCd is not installed ({}): scripts/bench installs it",
                bin.display()
            );
        }
        let dir = tempfile::tempdir()?;
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
        let cert_path = dir.path().join("cert.pem");
        let key_path = dir.path().join("key.pem");
        std::fs::write(&cert_path, cert.cert.pem())?;
        std::fs::write(&key_path, cert.signing_key.serialize_pem())?;
        let port = std::net::TcpListener::bind(("127.0.0.1", 0))?
            .local_addr()?
            .port();
        let plain = std::net::TcpListener::bind(("127.0.0.1", 0))?
            .local_addr()?
            .port();
        let conf = dir.path().join("ngircd.conf");
        std::fs::write(
            &conf,
            format!(
                "[Global]\nName = irc.bench.invalid\nInfo = benchmark peer\nListen = 127.0.0.1\n\
                 Ports = {plain}\nMotdPhrase = \"bench\"\nPidFile = {pid}\n\
                 [Limits]\nMaxConnections = 0\nMaxConnectionsIP = 0\nMaxNickLength = 16\n\
                 MaxPenaltyTime = 0\nPingTimeout = 600\nPongTimeout = 60\n\
                 [Options]\nDNS = no\nIdent = no\nPAM = no\n\
                 [SSL]\nCertFile = {cert}\nKeyFile = {key}\nPorts = {port}\n",
                pid = dir.path().join("ngircd.pid").display(),
                cert = cert_path.display(),
                key = key_path.display(),
            ),
        )?;
        let mut cmd = match core {
            Some(c) => {
                let mut cmd = Command::new("taskset");
                cmd.arg("-c").arg(c.to_string()).arg(bin);
                cmd
            }
            None => Command::new(bin),
        };
        let mut child = cmd
            .args(["--nodaemon", "--config"])
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("no stdout of ngIRCd"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if line.contains("ready.") {
                    let _ = tx.send(());
                }
            }
        });
        if rx.recv_timeout(Duration::from_secs(60)).is_err() {
            let _ = child.kill();
            let _ = child.wait();
            bail!("ngIRCd did not report ready");
        }
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(cert.cert.der().to_vec()))?;
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Self {
            child,
            port,
            tls: Arc::new(tls),
            _dir: dir,
        })
    }
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;
type Reader = BufReader<tokio::io::ReadHalf<Tls>>;
type Writer = tokio::io::WriteHalf<Tls>;

/// A logged-in IRC user over TLS: registered as `nick`, the welcome (001)
/// received.
async fn login(ircd: &Ircd, nick: &str) -> anyhow::Result<(Reader, Writer)> {
    let tcp = TcpStream::connect(("127.0.0.1", ircd.port)).await?;
    tcp.set_nodelay(true)?;
    let tls = tokio_rustls::TlsConnector::from(ircd.tls.clone())
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    let (r, mut w) = tokio::io::split(tls);
    let mut r = BufReader::new(r);
    w.write_all(format!("NICK {nick}\r\nUSER {nick} 0 * :{nick}\r\n").as_bytes())
        .await?;
    let mut line = String::new();
    loop {
        line.clear();
        let n = tokio::time::timeout(Duration::from_secs(20), r.read_line(&mut line))
            .await
            .context("no welcome within 20 s")??;
        anyhow::ensure!(n > 0, "ngIRCd closed the connection at login");
        if let Some(token) = line.strip_prefix("PING ") {
            w.write_all(format!("PONG {token}").as_bytes()).await?;
        }
        if line.split(' ').nth(1) == Some("001") {
            return Ok((r, w));
        }
    }
}

/// What one IRC run measured.
struct Outcome {
    sent: u64,
    received: u64,
    elapsed: Duration,
    latency: Histogram<u64>,
    cpu_us: u64,
}

impl Outcome {
    fn figures(&self) -> Value {
        let per_sec = self.received as f64 / self.elapsed.as_secs_f64().max(1e-9);
        json!({
            "sent": self.sent,
            "received": self.received,
            "seconds": self.elapsed.as_secs_f64(),
            "delivered_per_sec": per_sec,
            "latency": common::summary(&self.latency),
            "server_cpu_us_per_msg": self.cpu_us as f64 / self.received.max(1) as f64,
        })
    }
}

/// 10 sender/receiver pairs through ngIRCd: as fast as TLS and the server
/// allow (`pace` without interval) or open loop.  Every sent message must
/// arrive.
async fn drive(ircd: &Ircd, a: &DeliveryArgs, pace: Pace) -> anyhow::Result<Outcome> {
    let base = Instant::now();
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for i in 0..a.pairs {
        senders.push(login(ircd, &format!("s{i}")).await?);
        receivers.push(login(ircd, &format!("r{i}")).await?);
    }
    let received = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut recv_tasks = Vec::new();
    for (mut r, mut w) in receivers {
        let received = received.clone();
        let mut stop = stop_rx.clone();
        recv_tasks.push(tokio::spawn(async move {
            let mut h = common::histogram()?;
            let mut line = String::new();
            loop {
                line.clear();
                let n = tokio::select! {
                    n = r.read_line(&mut line) => n?,
                    _ = stop.changed() => break,
                };
                if n == 0 {
                    break;
                }
                if let Some(token) = line.strip_prefix("PING ") {
                    w.write_all(format!("PONG {token}").as_bytes()).await?;
                    continue;
                }
                // ":s0!s0@host PRIVMSG r0 :<stamp> <padding>"
                if let Some((_, text)) = line.split_once(" PRIVMSG ")
                    && let Some((_, body)) = text.split_once(" :")
                    && let Some(stamp) = body.split(' ').next().and_then(|s| s.parse::<u64>().ok())
                {
                    h.record(common::micros(base.elapsed()).saturating_sub(stamp))?;
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
            anyhow::Ok(h)
        }));
    }
    let cpu0 = common::cpu_us(&ircd.pid())?;
    let start = Instant::now();
    let deadline = start + Duration::from_secs(a.duration);
    let mut send_tasks = Vec::new();
    for (i, (_r, mut w)) in senders.into_iter().enumerate() {
        let pad = "x".repeat(a.size.saturating_sub(24));
        let max = a.max_messages;
        let offset =
            Duration::from_secs_f64(pace.interval_secs() * i as f64 / a.pairs.max(1) as f64);
        send_tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while n < max && pace.within(start, offset, n, deadline) {
                let stamp = pace.slot(base, start, offset, n).await;
                w.write_all(format!("PRIVMSG r{i} :{stamp} {pad}\r\n").as_bytes())
                    .await?;
                w.flush().await?;
                n += 1;
            }
            anyhow::Ok((n, w, _r))
        }));
    }
    let mut sent = 0;
    let mut keep = Vec::new();
    for t in send_tasks {
        let (n, w, r) = t.await??;
        sent += n;
        keep.push((w, r));
    }
    // Everything sent is delivered, or the run fails.
    let grace = Instant::now() + Duration::from_secs(20);
    while received.load(Ordering::Relaxed) < sent && Instant::now() < grace {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = start.elapsed();
    let cpu_us = common::cpu_us(&ircd.pid())?.saturating_sub(cpu0);
    let _ = stop_tx.send(true);
    let mut latency = common::histogram()?;
    for t in recv_tasks {
        latency.add(t.await??)?;
    }
    let got = received.load(Ordering::Relaxed);
    anyhow::ensure!(got == sent, "ngIRCd delivered {got} of {sent} messages");
    drop(keep);
    Ok(Outcome {
        sent,
        received: got,
        elapsed,
        latency,
        cpu_us,
    })
}

/// ngIRCd's memory per idle logged-in connection at `k`.
async fn idle_kib(ircd: &Ircd, k: usize) -> anyhow::Result<f64> {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss0 = common::rss_kib(&ircd.pid())?;
    let mut held = Vec::with_capacity(k);
    for i in 0..k {
        held.push(login(ircd, &format!("idle{i}")).await?);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss = common::rss_kib(&ircd.pid())?;
    drop(held);
    Ok(rss.saturating_sub(rss0) as f64 / k.max(1) as f64)
}

/// Runs the scenario: our server and ngIRCd, the same measurements.
pub async fn run(
    bin: &Path,
    core: Option<usize>,
    a: &DeliveryArgs,
    irc: &IrcArgs,
) -> anyhow::Result<Report> {
    let ircd = Ircd::start(&irc.ngircd, core)?;
    // Senders write one message at a time (IRC has no acknowledgement to
    // wait for), so one lane per pair.
    let irc_args = DeliveryArgs {
        depth: 1,
        ..a.clone()
    };
    let theirs = drive(&ircd, &irc_args, Pace::at(None, &irc_args)?).await?;
    let theirs_open = drive(&ircd, &irc_args, Pace::at(Some(irc.irc_rate), &irc_args)?).await?;
    let their_kib = idle_kib(&ircd, irc.irc_idle).await?;
    drop(ircd);

    let ours = delivery::sqlcipher(bin, core, a, None).await?;
    let ours_open = delivery::sqlcipher(bin, core, a, Some(irc.irc_rate)).await?;
    let idle = startup::idle_memory(
        bin,
        core,
        &IdleArgs {
            connections: irc.irc_idle,
            idle_concurrency: 16,
        },
    )
    .await?;
    let our_kib = idle
        .figures
        .get("kib_per_connection")
        .and_then(Value::as_f64)
        .ok_or_else(|| anyhow!("no idle memory figure"))?;

    Ok(compare(
        "ngircd",
        "ngIRCd 26 over TLS (a relay: stores nothing)",
        a,
        irc.irc_rate,
        irc.irc_idle,
        (ours.figures(), ours_open.figures(), our_kib),
        (theirs.figures(), theirs_open.figures(), their_kib),
    ))
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
