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
use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use quicnprotochat_proto::rustls;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::common::Report;
use crate::delivery::{DeliveryArgs, Pace};
use crate::peer;

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
        let port = peer::free_port()?;
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
        let child = peer::start_server(
            bin,
            core,
            &["-F".as_ref(), "--config".as_ref(), conf.as_os_str()],
            "Prosody",
            port,
        )?;
        Ok(Self {
            child,
            port,
            tls: peer::trusting(cert.cert.der())?,
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

/// A sender: chat messages to its receiver.
struct XmppSend {
    x: Xmpp,
    to: String,
    pad: String,
}

impl peer::Send for XmppSend {
    async fn send(&mut self, stamp: u64) -> anyhow::Result<()> {
        let stanza = format!(
            "<message to='{}' type='chat'><body>{stamp} {}</body></message>",
            self.to, self.pad
        );
        self.x.send(&stanza).await
    }
}

/// A receiver: the stamp of each message body, "<body>STAMP PADDING</body>".
struct XmppReceive {
    x: Xmpp,
    chunk: Vec<u8>,
}

impl peer::Receive for XmppReceive {
    async fn next(&mut self) -> anyhow::Result<Option<u64>> {
        loop {
            if let Some(open) = find(&self.x.buf, b"<body>")
                && let Some(close) = find(&self.x.buf[open..], b"</body>")
            {
                let stamp = std::str::from_utf8(&self.x.buf[open + 6..open + close])
                    .ok()
                    .and_then(|b| b.split(' ').next())
                    .and_then(|s| s.parse().ok());
                self.x.buf.drain(..open + close + 7);
                if stamp.is_some() {
                    return Ok(stamp);
                }
                continue;
            }
            let n = self.x.stream.read(&mut self.chunk).await?;
            if n == 0 {
                return Ok(None);
            }
            self.x.buf.extend_from_slice(&self.chunk[..n]);
        }
    }
}

/// 10 pairs through Prosody (`run` tells the accounts of successive runs
/// apart).
async fn drive(
    p: &Prosody,
    a: &DeliveryArgs,
    pace: Pace,
    run: usize,
) -> anyhow::Result<peer::Outcome> {
    let base = Instant::now();
    let mut pairs = Vec::new();
    for i in 0..a.pairs {
        pairs.push((
            XmppSend {
                x: login(p, &format!("s{i}x{run}")).await?,
                to: format!("r{i}x{run}@{DOMAIN}"),
                pad: "x".repeat(a.size.saturating_sub(24)),
            },
            XmppReceive {
                x: login(p, &format!("r{i}x{run}")).await?,
                chunk: vec![0; 64 * 1024],
            },
        ));
    }
    peer::drive(&p.pid(), "Prosody", base, pairs, a, pace).await
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
    let open = Pace::at(Some(xa.xmpp_rate), &one_lane)?;
    let theirs_open = drive(&prosody, &one_lane, open, 1).await?;
    let their_kib = peer::idle_kib(&prosody.pid(), xa.xmpp_idle, |i| {
        let server = &prosody;
        async move { login(server, &format!("idle{i}")).await }
    })
    .await?;
    drop(prosody);
    let ours = peer::ours(bin, core, a, xa.xmpp_rate, xa.xmpp_idle).await?;
    Ok(peer::compare(
        "prosody",
        "Prosody 0.12 over direct TLS (relays online messages from memory)",
        a,
        xa.xmpp_rate,
        xa.xmpp_idle,
        ours,
        (theirs.figures(), theirs_open.figures(), their_kib),
    ))
}
