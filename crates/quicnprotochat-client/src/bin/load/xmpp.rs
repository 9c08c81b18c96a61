//! `prosody`: the XMPP server Prosody (Debian package `prosody`) as a peer,
//! in the same run as our server.
//!
//! One-to-one chat messages between online users over direct TLS (XEP-0368),
//! SASL PLAIN, a bound resource and initial presence, as XMPP clients do.
//! Configuration, in a temporary directory: `internal` storage (files),
//! loopback only, TLS only, no server-to-server, HTTP or components, the
//! c2s rate limit off.  Prosody keeps a message only for an offline
//! recipient (`mod_offline`, in its file store, without fsync); a message
//! between online users is relayed from memory, so it is not made durable
//! before it is delivered, where our every message is.  The users' accounts
//! are written into Prosody's store before it starts.
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
use quicnprotochat_proto::rustls;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::common::{self, Report};
use crate::delivery::{self, DeliveryArgs, Pace};
use crate::startup::{self, IdleArgs};

/// Options of `prosody`.
#[derive(Debug, Clone, Args)]
pub struct XmppArgs {
    /// The Prosody executable.
    #[arg(long, default_value = "/usr/bin/prosody")]
    pub prosody: PathBuf,
    /// Open-loop rate for the latency figures, messages/s in total.
    #[arg(long, default_value_t = 2_000.0)]
    pub xmpp_rate: f64,
    /// Idle logged-in connections for the memory figure.
    #[arg(long, default_value_t = 1_000)]
    pub xmpp_idle: usize,
}

/// Whether the error says Prosody is not installed (the scenario is then
/// skipped by `all`).
pub fn not_installed(e: &anyhow::Error) -> bool {
    format!("{e:#}").contains("Prosody is not installed")
}

const DOMAIN: &str = "localhost";
const PASSWORD: &str = "bench";

/// A running Prosody, killed on drop.
struct Prosody {
    child: Child,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    _dir: tempfile::TempDir,
}

impl Drop for Prosody {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prosody {
    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// Writes the account of `user` into Prosody's file store (its
    /// `internal_plain` form).
    fn add_account(data: &Path, user: &str) -> anyhow::Result<()> {
        let dir = data.join(DOMAIN).join("accounts");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join(format!("{user}.dat")),
            format!("return {{\n\t[\"password\"] = \"{PASSWORD}\";\n}};\n"),
        )?;
        Ok(())
    }

    fn start(bin: &Path, core: Option<usize>, users: &[String]) -> anyhow::Result<Self> {
        if !bin.exists() {
            bail!(
                "Prosody is not installed ({}): scripts/bench installs it",
                bin.display()
            );
        }
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("data");
        for u in users {
            Self::add_account(&data, u)?;
        }
        let cert = rcgen::generate_simple_self_signed(vec![DOMAIN.to_string()])?;
        let cert_path = dir.path().join("cert.pem");
        let key_path = dir.path().join("key.pem");
        std::fs::write(&cert_path, cert.cert.pem())?;
        std::fs::write(&key_path, cert.signing_key.serialize_pem())?;
        let port = std::net::TcpListener::bind(("127.0.0.1", 0))?
            .local_addr()?
            .port();
        let conf = dir.path().join("prosody.cfg.lua");
        std::fs::write(
            &conf,
            format!(
                "run_as_root = true\npidfile = \"{pid}\"\ndata_path = \"{data}\"\n\
                 interfaces = {{ \"127.0.0.1\" }}\nc2s_ports = {{}}\n\
                 c2s_direct_tls_ports = {{ {port} }}\ns2s_ports = {{}}\ncomponent_ports = {{}}\n\
                 http_ports = {{}}\nhttps_ports = {{}}\nc2s_direct_tls_ssl = {{ certificate = \"{cert}\"; key = \"{key}\"; }}\n\
                 c2s_require_encryption = true\nauthentication = \"internal_plain\"\nstorage = \"internal\"\n\
                 modules_enabled = {{ \"roster\"; \"saslauth\"; \"tls\"; \"disco\"; \"offline\"; \"ping\"; }}\n\
                 modules_disabled = {{ \"s2s\"; \"posix\"; }}\nlimits = {{}}\n\
                 log = {{ info = \"*stdout\"; }}\n\
                 VirtualHost \"{DOMAIN}\"\n  ssl = {{ certificate = \"{cert}\"; key = \"{key}\"; }}\n",
                pid = dir.path().join("prosody.pid").display(),
                data = data.display(),
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
            .args(["-F", "--config"])
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("no stdout of Prosody"))?;
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
        // Ready once the TLS port accepts connections.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut log = Vec::new();
        loop {
            while let Ok(line) = rx.try_recv() {
                log.push(line);
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            if Instant::now() > deadline || child.try_wait()?.is_some() {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "Prosody did not listen on port {port}; its log:\n{}",
                    log.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::spawn(move || while rx.recv().is_ok() {});
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

/// A logged-in XMPP client: its stream after the bound resource and
/// initial presence, and what it has read but not consumed.
struct Xmpp {
    stream: Tls,
    buf: Vec<u8>,
}

impl Xmpp {
    /// Reads until `marker` appears in the unconsumed input; drops the
    /// input up to and including it.
    async fn read_until(&mut self, marker: &str) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(at) = find(&self.buf, marker.as_bytes()) {
                let end = at + marker.len();
                let text = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                self.buf.drain(..end);
                return Ok(text);
            }
            let mut chunk = [0u8; 16 * 1024];
            let left = deadline.saturating_duration_since(Instant::now());
            let n = tokio::time::timeout(left, self.stream.read(&mut chunk))
                .await
                .with_context(|| format!("no {marker} within 20 s"))??;
            anyhow::ensure!(n > 0, "Prosody closed the stream waiting for {marker}");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn send(&mut self, text: &str) -> anyhow::Result<()> {
        self.stream.write_all(text.as_bytes()).await?;
        self.stream.flush().await?;
        Ok(())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn stream_header() -> String {
    format!(
        "<?xml version='1.0'?><stream:stream to='{DOMAIN}' xmlns='jabber:client' \
         xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>"
    )
}

/// Logs `user` in over direct TLS: SASL PLAIN, a bound resource, initial
/// presence.
async fn login(p: &Prosody, user: &str) -> anyhow::Result<Xmpp> {
    let tcp = TcpStream::connect(("127.0.0.1", p.port)).await?;
    tcp.set_nodelay(true)?;
    let stream = tokio_rustls::TlsConnector::from(p.tls.clone())
        .connect(ServerName::try_from(DOMAIN)?, tcp)
        .await?;
    let mut x = Xmpp {
        stream,
        buf: Vec::new(),
    };
    x.send(&stream_header()).await?;
    x.read_until("</stream:features>").await?;
    let credentials =
        quicnprotochat_core::base64::encode(format!("\0{user}\0{PASSWORD}").as_bytes());
    x.send(&format!(
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{credentials}</auth>"
    ))
    .await?;
    let answer = x.read_until("/>").await?;
    anyhow::ensure!(
        answer.contains("<success"),
        "login of {user} refused: {answer}"
    );
    x.send(&stream_header()).await?;
    x.read_until("</stream:features>").await?;
    x.send(
        "<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>\
         <resource>bench</resource></bind></iq>",
    )
    .await?;
    x.read_until("</iq>").await?;
    x.send("<presence/>").await?;
    Ok(x)
}

/// What one XMPP run measured.
struct Outcome {
    sent: u64,
    received: u64,
    elapsed: Duration,
    latency: hdrhistogram::Histogram<u64>,
    cpu_us: u64,
}

impl Outcome {
    fn figures(&self) -> Value {
        json!({
            "sent": self.sent,
            "received": self.received,
            "seconds": self.elapsed.as_secs_f64(),
            "delivered_per_sec": self.received as f64 / self.elapsed.as_secs_f64().max(1e-9),
            "latency": common::summary(&self.latency),
            "server_cpu_us_per_msg": self.cpu_us as f64 / self.received.max(1) as f64,
        })
    }
}

/// 10 sender/receiver pairs through Prosody, as fast as possible or open
/// loop; every message must arrive.
async fn drive(p: &Prosody, a: &DeliveryArgs, pace: Pace, run: usize) -> anyhow::Result<Outcome> {
    let base = Instant::now();
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for i in 0..a.pairs {
        senders.push(login(p, &format!("s{i}x{run}")).await?);
        receivers.push(login(p, &format!("r{i}x{run}")).await?);
    }
    let received = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut recv_tasks = Vec::new();
    for mut x in receivers {
        let received = received.clone();
        let mut stop = stop_rx.clone();
        recv_tasks.push(tokio::spawn(async move {
            let mut h = common::histogram()?;
            let mut chunk = vec![0u8; 64 * 1024];
            loop {
                // Every complete body in the input: "<body>STAMP PADDING</body>".
                while let Some(open) = find(&x.buf, b"<body>") {
                    let Some(close) = find(&x.buf[open..], b"</body>") else {
                        break;
                    };
                    let body = &x.buf[open + 6..open + close];
                    if let Some(stamp) = std::str::from_utf8(body)
                        .ok()
                        .and_then(|b| b.split(' ').next())
                        .and_then(|s| s.parse::<u64>().ok())
                    {
                        h.record(common::micros(base.elapsed()).saturating_sub(stamp))?;
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                    x.buf.drain(..open + close + 7);
                }
                let n = tokio::select! {
                    n = x.stream.read(&mut chunk) => n?,
                    _ = stop.changed() => break,
                };
                if n == 0 {
                    break;
                }
                x.buf.extend_from_slice(&chunk[..n]);
            }
            anyhow::Ok(h)
        }));
    }
    let cpu0 = common::cpu_us(&p.pid())?;
    let start = Instant::now();
    let deadline = start + Duration::from_secs(a.duration);
    let mut send_tasks = Vec::new();
    for (i, mut x) in senders.into_iter().enumerate() {
        let pad = "x".repeat(a.size.saturating_sub(24));
        let max = a.max_messages;
        let offset =
            Duration::from_secs_f64(pace.interval_secs() * i as f64 / a.pairs.max(1) as f64);
        send_tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while n < max && pace.within(start, offset, n, deadline) {
                let stamp = pace.slot(base, start, offset, n).await;
                x.send(&format!(
                    "<message to='r{i}x{run}@{DOMAIN}' type='chat'><body>{stamp} {pad}</body></message>"
                ))
                .await?;
                n += 1;
            }
            anyhow::Ok((n, x))
        }));
    }
    let mut sent = 0;
    let mut keep = Vec::new();
    for t in send_tasks {
        let (n, x) = t.await??;
        sent += n;
        keep.push(x);
    }
    let grace = Instant::now() + Duration::from_secs(30);
    while received.load(Ordering::Relaxed) < sent && Instant::now() < grace {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = start.elapsed();
    let cpu_us = common::cpu_us(&p.pid())?.saturating_sub(cpu0);
    let _ = stop_tx.send(true);
    let mut latency = common::histogram()?;
    for t in recv_tasks {
        latency.add(t.await??)?;
    }
    let got = received.load(Ordering::Relaxed);
    anyhow::ensure!(got == sent, "Prosody delivered {got} of {sent} messages");
    drop(keep);
    Ok(Outcome {
        sent,
        received: got,
        elapsed,
        latency,
        cpu_us,
    })
}

/// Prosody's memory per idle logged-in connection at `k`.
async fn idle_kib(p: &Prosody, k: usize) -> anyhow::Result<f64> {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss0 = common::rss_kib(&p.pid())?;
    let mut held = Vec::with_capacity(k);
    for i in 0..k {
        held.push(login(p, &format!("idle{i}")).await?);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss = common::rss_kib(&p.pid())?;
    drop(held);
    Ok(rss.saturating_sub(rss0) as f64 / k.max(1) as f64)
}

/// Runs the scenario: our server and Prosody, the same measurements.
pub async fn run(
    bin: &Path,
    core: Option<usize>,
    a: &DeliveryArgs,
    xa: &XmppArgs,
) -> anyhow::Result<Report> {
    let mut users = Vec::new();
    for run in 0..2 {
        for i in 0..a.pairs {
            users.push(format!("s{i}x{run}"));
            users.push(format!("r{i}x{run}"));
        }
    }
    users.extend((0..xa.xmpp_idle).map(|i| format!("idle{i}")));
    let prosody = Prosody::start(&xa.prosody, core, &users)?;
    // Senders write one message at a time (no acknowledgement to wait
    // for), so one lane per pair.
    let one_lane = DeliveryArgs {
        depth: 1,
        ..a.clone()
    };
    let theirs = drive(&prosody, &one_lane, Pace::at(None, &one_lane)?, 0).await?;
    let theirs_open = drive(
        &prosody,
        &one_lane,
        Pace::at(Some(xa.xmpp_rate), &one_lane)?,
        1,
    )
    .await?;
    let their_kib = idle_kib(&prosody, xa.xmpp_idle).await?;
    drop(prosody);

    let ours = delivery::sqlcipher(bin, core, a, None).await?;
    let ours_open = delivery::sqlcipher(bin, core, a, Some(xa.xmpp_rate)).await?;
    let idle = startup::idle_memory(
        bin,
        core,
        &IdleArgs {
            connections: xa.xmpp_idle,
            idle_concurrency: 16,
        },
    )
    .await?;
    let our_kib = idle
        .figures
        .get("kib_per_connection")
        .and_then(Value::as_f64)
        .ok_or_else(|| anyhow!("no idle memory figure"))?;
    Ok(crate::irc::compare(
        "prosody",
        "Prosody 0.12 over direct TLS (relays online messages from memory)",
        a,
        xa.xmpp_rate,
        xa.xmpp_idle,
        (ours.figures(), ours_open.figures(), our_kib),
        (theirs.figures(), theirs_open.figures(), their_kib),
    ))
}
