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
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use quicnprotochat_proto::rustls;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

use crate::common::Report;
use crate::delivery::{DeliveryArgs, Pace};
use crate::peer;

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
    proc: peer::Running,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
}

impl Ircd {
    fn pid(&self) -> String {
        self.proc.pid()
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
        let port = peer::free_port()?;
        let plain = peer::free_port()?;
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
        let child = peer::start_server(
            bin,
            core,
            &["--nodaemon".as_ref(), "--config".as_ref(), conf.as_os_str()],
            "ngIRCd",
            port,
        )?;
        Ok(Self {
            proc: peer::Running::new(child, dir),
            port,
            tls: peer::trusting(cert.cert.der())?,
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

/// A sender: private messages to its receiver `r{i}`.
struct IrcSend {
    w: Writer,
    _r: Reader,
    to: String,
    pad: String,
}

impl peer::Send for IrcSend {
    async fn send(&mut self, stamp: u64) -> anyhow::Result<()> {
        let line = format!("PRIVMSG {} :{stamp} {}\r\n", self.to, self.pad);
        self.w.write_all(line.as_bytes()).await?;
        self.w.flush().await?;
        Ok(())
    }
}

/// A receiver: answers PINGs, reads the stamp of each private message.
struct IrcReceive {
    r: Reader,
    w: Writer,
    line: String,
}

impl peer::Receive for IrcReceive {
    async fn next(&mut self) -> anyhow::Result<Option<u64>> {
        loop {
            self.line.clear();
            if self.r.read_line(&mut self.line).await? == 0 {
                return Ok(None);
            }
            if let Some(token) = self.line.strip_prefix("PING ") {
                self.w.write_all(format!("PONG {token}").as_bytes()).await?;
                continue;
            }
            // ":s0!s0@host PRIVMSG r0 :<stamp> <padding>"
            if let Some((_, text)) = self.line.split_once(" PRIVMSG ")
                && let Some((_, body)) = text.split_once(" :")
                && let Some(stamp) = body.split(' ').next().and_then(|s| s.parse().ok())
            {
                return Ok(Some(stamp));
            }
        }
    }
}

/// 10 pairs through ngIRCd (`run` tells the nicknames of successive runs
/// apart).
async fn drive(
    ircd: &Ircd,
    a: &DeliveryArgs,
    pace: Pace,
    run: usize,
) -> anyhow::Result<crate::delivery::Outcome> {
    let base = Instant::now();
    let mut pairs = Vec::new();
    for i in 0..a.pairs {
        let (sr, sw) = login(ircd, &format!("s{i}x{run}")).await?;
        let (rr, rw) = login(ircd, &format!("r{i}x{run}")).await?;
        pairs.push((
            IrcSend {
                w: sw,
                _r: sr,
                to: format!("r{i}x{run}"),
                pad: "x".repeat(a.size.saturating_sub(24)),
            },
            IrcReceive {
                r: rr,
                w: rw,
                line: String::new(),
            },
        ));
    }
    peer::drive(&ircd.pid(), "ngIRCd", base, pairs, a, pace).await
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
    let one_lane = DeliveryArgs {
        depth: 1,
        ..a.clone()
    };
    let theirs = drive(&ircd, &one_lane, Pace::at(None, &one_lane)?, 0).await?;
    let open = Pace::at(Some(irc.irc_rate), &one_lane)?;
    let theirs_open = drive(&ircd, &one_lane, open, 1).await?;
    let their_kib = peer::idle_kib(&ircd.pid(), irc.irc_idle, |i| {
        let server = &ircd;
        async move { login(server, &format!("idle{i}")).await }
    })
    .await?;
    drop(ircd);
    let ours = peer::ours(bin, core, a, irc.irc_rate, irc.irc_idle).await?;
    Ok(peer::compare(
        "ngircd",
        "ngIRCd 26 over TLS (a relay: stores nothing)",
        a,
        irc.irc_rate,
        irc.irc_idle,
        ours,
        (theirs.figures(), theirs_open.figures(), their_kib),
    ))
}
