//! `prosody` and `ejabberd`: the XMPP servers Prosody (Debian package
//! `prosody`) and ejabberd (Debian package `ejabberd`) as peers, in the
//! same run as our server, driven by one minimal XMPP client.
//!
//! One-to-one chat messages between online users over direct TLS (XEP-0368),
//! SASL PLAIN, a bound resource and initial presence, as XMPP clients do.
//! Each server runs from a configuration of its own in a temporary
//! directory: loopback only, TLS only, no server-to-server, HTTP or
//! components, rate limits and shapers off, `mod_offline` on.
//!
//! - Prosody: `internal` storage (files); the users' accounts are written
//!   into its store before it starts.  It keeps a message only for an
//!   offline recipient (`mod_offline`, one file append per message, without
//!   fsync).
//! - ejabberd: Mnesia in the temporary directory, the Erlang node not
//!   distributed (no epmd, no cookie); the accounts are registered in band
//!   (XEP-0077) once it is up.  It keeps a message only for an offline
//!   recipient (`mod_offline`, a Mnesia `disc_only_copies` table: written
//!   to its file without fsync).
//!
//! Neither makes a message between online users durable before it is
//! delivered: both relay it from memory, where our every message is
//! committed first.
//!
//! Measured, for both servers: delivered messages/s with 10 sender/receiver
//! pairs and 256-byte payloads, send-to-receive latency p50/p99 open loop
//! at one rate, server CPU per message, server memory per idle logged-in
//! connection at K = 1 000, and the offline path: `--offline-messages`
//! sent to logged-out recipients (stored messages/s, until an IQ ping
//! after the last one is answered), then fetched when they log in (login to
//! the last message).  Every run checks that every message sent was
//! delivered.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use quicnprotochat_proto::rustls;
use rustls::pki_types::ServerName;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::common::{self, Report};
use crate::delivery::{self, DeliveryArgs, Pace};
use crate::peer;

/// Options of `prosody` and `ejabberd`.
#[derive(Debug, Clone, Args)]
pub struct XmppArgs {
    /// The Prosody executable.
    #[arg(long, default_value = "/usr/bin/prosody")]
    pub prosody: PathBuf,
    /// The Erlang runtime ejabberd runs on.
    #[arg(long, default_value = "/usr/bin/erl")]
    pub ejabberd_erl: PathBuf,
    /// The directory holding ejabberd's Erlang applications (`ERL_LIBS`).
    #[arg(long, default_value = "/usr/lib/x86_64-linux-gnu")]
    pub ejabberd_lib: PathBuf,
    /// Open-loop rate for the latency figures, messages/s in total.
    #[arg(long, default_value_t = 2_000.0)]
    pub xmpp_rate: f64,
    /// Idle logged-in connections for the memory figure.
    #[arg(long, default_value_t = 1_000)]
    pub xmpp_idle: usize,
    /// Messages sent to logged-out recipients (spread over the pairs), then
    /// fetched when they log in.
    #[arg(long, default_value_t = 10_000)]
    pub offline_messages: u64,
}

/// Which XMPP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Prosody.
    Prosody,
    /// ejabberd.
    Ejabberd,
}

/// Whether the error says the XMPP server is not installed (the scenario
/// is then skipped by `all`).
pub fn not_installed(e: &anyhow::Error) -> bool {
    format!("{e:#}").contains("is not installed (")
}

const DOMAIN: &str = "localhost";
const PASSWORD: &str = "bench";

/// A running XMPP server, killed on drop.
struct Server {
    name: &'static str,
    proc: peer::Running,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
}

impl Server {
    fn pid(&self) -> String {
        self.proc.pid()
    }

    async fn start(
        kind: Kind,
        xa: &XmppArgs,
        core: Option<usize>,
        users: &[String],
    ) -> anyhow::Result<Self> {
        match kind {
            Kind::Prosody => start_prosody(&xa.prosody, core, users),
            Kind::Ejabberd => {
                let s = start_ejabberd(xa, core)?;
                register(&s, users)
                    .await
                    .context("ejabberd: in-band registration")?;
                Ok(s)
            }
        }
    }
}

/// A fresh self-signed certificate for `DOMAIN` written into `dir`: the
/// certificate's and the key's paths, both in one PEM text, and the client
/// configuration that trusts it.
fn certificate(
    dir: &Path,
) -> anyhow::Result<(PathBuf, PathBuf, String, Arc<rustls::ClientConfig>)> {
    // Valid for 30 days from now: ejabberd arms a timer for the expiry,
    // which fails on rcgen's default of the year 4096.
    let signing_key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec![DOMAIN.to_string()])?;
    let since_2020 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .saturating_sub(Duration::from_secs(1_577_836_800));
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = params.not_before + since_2020 + Duration::from_secs(30 * 86_400);
    let cert = rcgen::CertifiedKey {
        cert: params.self_signed(&signing_key)?,
        signing_key,
    };
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    let key = cert.signing_key.serialize_pem();
    std::fs::write(&cert_path, cert.cert.pem())?;
    std::fs::write(&key_path, &key)?;
    let both = format!("{}{key}", cert.cert.pem());
    Ok((cert_path, key_path, both, peer::trusting(cert.cert.der())?))
}

/// Writes the account of `user` into Prosody's file store (its
/// `internal_plain` form).
fn add_prosody_account(data: &Path, user: &str) -> anyhow::Result<()> {
    let dir = data.join(DOMAIN).join("accounts");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join(format!("{user}.dat")),
        format!("return {{\n\t[\"password\"] = \"{PASSWORD}\";\n}};\n"),
    )?;
    Ok(())
}

fn start_prosody(bin: &Path, core: Option<usize>, users: &[String]) -> anyhow::Result<Server> {
    if !bin.exists() {
        bail!(
            "Prosody is not installed ({}): scripts/bench installs it",
            bin.display()
        );
    }
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    for u in users {
        add_prosody_account(&data, u)?;
    }
    let (cert_path, key_path, _, tls) = certificate(dir.path())?;
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
    Ok(Server {
        name: "Prosody",
        proc: peer::Running::new(child, dir),
        port,
        tls,
    })
}

/// Starts ejabberd on the Erlang runtime directly (as `ejabberdctl
/// foreground` does, without its node name: the node is not distributed,
/// so no epmd is started and no cookie is written), with `HOME`, the Mnesia
/// spool, the log and any crash dump in a temporary directory.
fn start_ejabberd(xa: &XmppArgs, core: Option<usize>) -> anyhow::Result<Server> {
    let installed = xa.ejabberd_erl.exists()
        && std::fs::read_dir(&xa.ejabberd_lib).is_ok_and(|d| {
            d.filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().starts_with("ejabberd-"))
        });
    if !installed {
        bail!(
            "ejabberd is not installed ({}, {}): scripts/bench installs it",
            xa.ejabberd_erl.display(),
            xa.ejabberd_lib.display()
        );
    }
    let dir = tempfile::tempdir()?;
    let (_, _, both, tls) = certificate(dir.path())?;
    let pem = dir.path().join("ejabberd.pem");
    std::fs::write(&pem, both)?;
    let port = peer::free_port()?;
    let conf = dir.path().join("ejabberd.yml");
    // Unlimited offline messages, no shaper on the listener, a large
    // process queue, in-band registration open (and not limited per IP
    // address in time), plain password storage (SASL PLAIN checks it as
    // Prosody's `internal_plain` does).
    std::fs::write(
        &conf,
        format!(
            "hosts:\n  - {DOMAIN}\nloglevel: warning\ncertfiles:\n  - \"{pem}\"\n\
             listen:\n  -\n    port: {port}\n    ip: \"127.0.0.1\"\n    module: ejabberd_c2s\n\
             \x20   tls: true\n    backlog: 1024\n    max_stanza_size: 262144\n    access: c2s\n\
             auth_method: internal\nauth_password_format: plain\nregistration_timeout: infinity\n\
             max_fsm_queue: 1000000\n\
             acl:\n  local:\n    user_regexp: \"\"\n\
             access_rules:\n  c2s:\n    allow: all\n  register:\n    allow: all\n\
             shaper_rules:\n  max_user_offline_messages: infinity\n\
             modules:\n  mod_register:\n    access: register\n    ip_access: all\n\
             \x20 mod_offline:\n    access_max_user_messages: max_user_offline_messages\n\
             \x20 mod_ping: {{}}\n  mod_disco: {{}}\n",
            pem = pem.display(),
        ),
    )?;
    let home = dir.path().join("home");
    let spool = dir.path().join("spool");
    std::fs::create_dir_all(&home)?;
    std::fs::create_dir_all(&spool)?;
    let mut cmd = peer::pinned(&xa.ejabberd_erl, core);
    cmd.current_dir(dir.path())
        .env("HOME", &home)
        .env("ERL_LIBS", &xa.ejabberd_lib)
        .env("EJABBERD_CONFIG_PATH", &conf)
        .env("EJABBERD_LOG_PATH", dir.path().join("ejabberd.log"))
        .env("ERL_CRASH_DUMP", dir.path().join("erl_crash.dump"))
        .args(["+P", "250000", "-noinput", "-mnesia", "dir"])
        .arg(format!("\"{}\"", spool.display()))
        .args(["-s", "ejabberd"]);
    let child = peer::start_command(cmd, "ejabberd", "ejabberd", port)?;
    Ok(Server {
        name: "ejabberd",
        proc: peer::Running::new(child, dir),
        port,
        tls,
    })
}

/// Registers `users` in band (XEP-0077), 100 to a connection, every
/// registration answered with a result.
async fn register(s: &Server, users: &[String]) -> anyhow::Result<()> {
    for chunk in users.chunks(100) {
        let mut x = connect(s).await?;
        let mut batch = String::new();
        for (i, u) in chunk.iter().enumerate() {
            batch.push_str(&format!(
                "<iq type='set' id='r{i}'><query xmlns='jabber:iq:register'>\
                 <username>{u}</username><password>{PASSWORD}</password></query></iq>"
            ));
        }
        x.send(&batch).await?;
        let last = chunk.len().saturating_sub(1);
        let answer = x.read_until(&format!("id='r{last}'")).await?;
        let ok = answer.matches("type='result'").count();
        anyhow::ensure!(
            ok == chunk.len(),
            "{}: {ok} of {} registrations accepted: {answer}",
            s.name,
            chunk.len()
        );
    }
    Ok(())
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// An XMPP client connection: its stream and what it has read but not
/// consumed.
struct Xmpp {
    stream: Tls,
    buf: Vec<u8>,
    server: &'static str,
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
            anyhow::ensure!(
                n > 0,
                "{} closed the stream waiting for {marker}",
                self.server
            );
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

/// Opens a stream over direct TLS, up to the server's first features.
async fn connect(s: &Server) -> anyhow::Result<Xmpp> {
    let tcp = TcpStream::connect(("127.0.0.1", s.port)).await?;
    tcp.set_nodelay(true)?;
    let stream = tokio_rustls::TlsConnector::from(s.tls.clone())
        .connect(ServerName::try_from(DOMAIN)?, tcp)
        .await?;
    let mut x = Xmpp {
        stream,
        buf: Vec::new(),
        server: s.name,
    };
    x.send(&stream_header()).await?;
    x.read_until("</stream:features>").await?;
    Ok(x)
}

/// Logs `user` in over direct TLS: SASL PLAIN, a bound resource, initial
/// presence.
async fn login(s: &Server, user: &str) -> anyhow::Result<Xmpp> {
    login_steps(s, user)
        .await
        .with_context(|| format!("{}: login of {user}", s.name))
}

async fn login_steps(s: &Server, user: &str) -> anyhow::Result<Xmpp> {
    let mut x = connect(s).await?;
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

/// 10 pairs through the server (`run` tells the accounts of successive
/// runs apart).
async fn drive(
    s: &Server,
    a: &DeliveryArgs,
    pace: Pace,
    run: usize,
) -> anyhow::Result<crate::delivery::Outcome> {
    let base = Instant::now();
    let mut pairs = Vec::new();
    for i in 0..a.pairs {
        pairs.push((
            XmppSend {
                x: login(s, &format!("s{i}x{run}")).await?,
                to: format!("r{i}x{run}@{DOMAIN}"),
                pad: "x".repeat(a.size.saturating_sub(24)),
            },
            XmppReceive {
                x: login(s, &format!("r{i}x{run}")).await?,
                chunk: vec![0; 64 * 1024],
            },
        ));
    }
    peer::drive(&s.pid(), s.name, base, pairs, a, pace).await
}

/// Bound on each phase of the offline path.
const OFFLINE_PHASE: Duration = Duration::from_secs(120);

/// The offline path through the server: `total` messages (numbered, spread
/// over the pairs) sent as fast as possible to recipients that have never
/// logged in, each sender then waiting for the answer to an IQ ping (the
/// server handles a stream's stanzas in order, so every message before it
/// has been handed to `mod_offline`); then the recipients log in and each
/// must receive exactly its senders' numbers.
async fn offline(s: &Server, a: &DeliveryArgs, total: u64, run: usize) -> anyhow::Result<Value> {
    let pairs = a.pairs.max(1);
    let per = total / pairs as u64;
    let pad = "x".repeat(a.size.saturating_sub(24));
    let mut senders = Vec::new();
    for i in 0..pairs {
        senders.push(XmppSend {
            x: login(s, &format!("s{i}x{run}")).await?,
            to: format!("r{i}x{run}@{DOMAIN}"),
            pad: pad.clone(),
        });
    }
    let pid = s.pid();
    let cpu0 = common::cpu_us(&pid)?;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for mut sender in senders {
        tasks.push(tokio::spawn(async move {
            for n in 0..per {
                peer::Send::send(&mut sender, n).await?;
            }
            sender
                .x
                .send("<iq type='get' id='stored'><ping xmlns='urn:xmpp:ping'/></iq>")
                .await?;
            sender.x.read_until("'stored'").await?;
            anyhow::Ok(sender)
        }));
    }
    let mut keep = Vec::new();
    for t in tasks {
        keep.push(
            tokio::time::timeout(OFFLINE_PHASE, t)
                .await
                .context("offline send phase")???,
        );
    }
    let stored = start.elapsed();
    let cpu1 = common::cpu_us(&pid)?;
    let fetch_start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..pairs {
        let x = login(s, &format!("r{i}x{run}")).await?;
        tasks.push(tokio::spawn(async move {
            let mut r = XmppReceive {
                x,
                chunk: vec![0; 64 * 1024],
            };
            let mut got = Vec::new();
            while (got.len() as u64) < per {
                match peer::Receive::next(&mut r).await? {
                    Some(n) => got.push(n),
                    None => break,
                }
            }
            anyhow::Ok(got)
        }));
    }
    // Each receiver's login is part of the fetch: the clock runs from the
    // first login to the last message.
    let mut received = 0u64;
    for (i, t) in tasks.into_iter().enumerate() {
        let mut got = tokio::time::timeout(OFFLINE_PHASE, t)
            .await
            .with_context(|| format!("{}: offline fetch of r{i}x{run}", s.name))???;
        got.sort_unstable();
        anyhow::ensure!(
            got.iter().copied().eq(0..per),
            "{} delivered {} of {per} offline messages to r{i}x{run} (or out of number)",
            s.name,
            got.len()
        );
        received += got.len() as u64;
    }
    let fetched = fetch_start.elapsed();
    let cpu2 = common::cpu_us(&pid)?;
    drop(keep);
    Ok(offline_figures(
        per * pairs as u64,
        received,
        stored,
        fetched,
        cpu1.saturating_sub(cpu0),
        cpu2.saturating_sub(cpu1),
    ))
}

/// The offline path's figures, ours and the peers' alike.
pub fn offline_figures(
    sent: u64,
    received: u64,
    stored: Duration,
    fetched: Duration,
    store_cpu_us: u64,
    fetch_cpu_us: u64,
) -> Value {
    json!({
        "sent": sent,
        "received": received,
        "store_seconds": stored.as_secs_f64(),
        "fetch_seconds": fetched.as_secs_f64(),
        "stored_per_sec": sent as f64 / stored.as_secs_f64().max(1e-9),
        "fetched_per_sec": received as f64 / fetched.as_secs_f64().max(1e-9),
        "server_cpu_us_per_msg": (store_cpu_us + fetch_cpu_us) as f64 / received.max(1) as f64,
    })
}

/// Runs the scenario: our server and the XMPP server `kind`, the same
/// measurements.
pub async fn run(
    bin: &Path,
    core: Option<usize>,
    a: &DeliveryArgs,
    xa: &XmppArgs,
    kind: Kind,
) -> anyhow::Result<Report> {
    let mut users = Vec::new();
    for run in 0..3 {
        for i in 0..a.pairs {
            users.push(format!("s{i}x{run}"));
            users.push(format!("r{i}x{run}"));
        }
    }
    users.extend((0..xa.xmpp_idle).map(|i| format!("idle{i}")));
    let server = Server::start(kind, xa, core, &users).await?;
    // Senders write one message at a time (no acknowledgement to wait
    // for), so one lane per pair.
    let one_lane = DeliveryArgs {
        depth: 1,
        ..a.clone()
    };
    let theirs = drive(&server, &one_lane, Pace::at(None, &one_lane)?, 0).await?;
    let open = Pace::at(Some(xa.xmpp_rate), &one_lane)?;
    let theirs_open = drive(&server, &one_lane, open, 1).await?;
    let their_offline = offline(&server, a, xa.offline_messages, 2).await?;
    let their_kib = peer::idle_kib(&server.pid(), xa.xmpp_idle, |i| {
        let server = &server;
        async move { login(server, &format!("idle{i}")).await }
    })
    .await?;
    drop(server);
    let ours = peer::ours(bin, core, a, xa.xmpp_rate, xa.xmpp_idle).await?;
    let our_offline = delivery::offline(bin, core, a, xa.offline_messages).await?;
    let (scenario, peer) = match kind {
        Kind::Prosody => (
            "prosody",
            "Prosody 0.12 over direct TLS (relays online messages from memory)",
        ),
        Kind::Ejabberd => (
            "ejabberd",
            "ejabberd 23.01 over direct TLS (relays online messages from memory)",
        ),
    };
    let mut report = peer::compare(
        scenario,
        peer,
        a,
        xa.xmpp_rate,
        xa.xmpp_idle,
        ours,
        (theirs.figures(), theirs_open.figures(), their_kib),
    );
    peer::add_offline(&mut report, xa.offline_messages, our_offline, their_offline);
    Ok(report)
}
