//! `quicnprotochat`: the command-line chat client.

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use quicnprotochat_client::display::terminal_safe;
use quicnprotochat_client::{
    ClientConfig, Event, FileInfo, FileStatus, Messenger, P2pOptions, ProfileKey, ServerAuth,
};
use quicnprotochat_core::Verification;
use quicnprotochat_proto::rustls::RootCertStore;
use quicnprotochat_proto::rustls::pki_types::CertificateDer;
use quicnprotochat_proto::rustls::pki_types::pem::PemObject as _;
use quicnprotochat_proto::transport;
use serde_json::json;
use tokio::io::AsyncBufReadExt as _;

/// End-to-end encrypted group chat (MLS over QUIC).
#[derive(Debug, Parser)]
#[command(name = "quicnprotochat", version, about)]
struct Cli {
    /// Profile directory (encrypted state of one identity).
    #[arg(long, env = "QUICNPROTOCHAT_PROFILE", global = true)]
    profile: Option<PathBuf>,
    /// Print one JSON object per line instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Directory received files are saved in (default: downloads in the
    /// profile directory).
    #[arg(long, env = "QUICNPROTOCHAT_DOWNLOAD_DIR", global = true)]
    download_dir: Option<PathBuf>,
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    p2p: P2pArgs,
    #[command(subcommand)]
    command: Cmd,
}

/// Direct peer-to-peer delivery over iroh (used by `listen`, `chat`, `send`).
#[derive(Debug, Clone, Args)]
struct P2pArgs {
    /// Deliver directly to group members reachable peer-to-peer; the server
    /// carries the rest (and all group changes).
    #[arg(long, global = true)]
    p2p: bool,
    /// Local UDP address of the direct endpoint (0.0.0.0:PORT to be reachable on the LAN).
    #[arg(long, default_value = "127.0.0.1:0", global = true)]
    p2p_bind: SocketAddr,
    /// Relay server URL for peers that cannot reach each other directly.
    #[arg(long, global = true)]
    p2p_relay: Option<String>,
    /// Do not announce this client's direct address in its groups.
    #[arg(long, global = true)]
    p2p_no_announce: bool,
}

impl P2pArgs {
    fn options(&self, announce: bool) -> Option<P2pOptions> {
        self.p2p.then(|| P2pOptions {
            bind: self.p2p_bind,
            relay_url: self.p2p_relay.clone(),
            announce: announce && !self.p2p_no_announce,
            redundant: false,
        })
    }
}

/// Where the server is and how to trust it (saved in the profile at
/// `register`; given again only to change them).
#[derive(Debug, Clone, Args)]
struct ServerArgs {
    /// Server UDP address; several nodes of one deployment comma-separated
    /// (the first is tried first, the others when it is unreachable); a
    /// host name stands for every address it resolves to.
    #[arg(long, env = "QUICNPROTOCHAT_SERVER", global = true, value_parser = server_list)]
    server: Option<ServerList>,
    /// TLS server name to check against the certificate (with --ca).
    #[arg(long, default_value = "localhost", global = true)]
    server_name: String,
    /// Pin the server certificate by its SHA-256 fingerprint (64 hex characters).
    #[arg(long, global = true, conflicts_with_all = ["pin_cert", "ca"])]
    pin: Option<String>,
    /// Pin the server certificate in this PEM file.
    #[arg(long, global = true, conflicts_with = "ca")]
    pin_cert: Option<PathBuf>,
    /// Verify the server certificate against the CA certificates in this PEM file.
    #[arg(long, global = true)]
    ca: Option<PathBuf>,
    /// Server access token.
    #[arg(
        long,
        env = "QUICNPROTOCHAT_TOKEN",
        hide_env_values = true,
        global = true
    )]
    token: Option<String>,
    /// Seconds to wait for a connection to the server (default 5).
    #[arg(long, global = true, value_name = "SECONDS", value_parser = seconds)]
    connect_timeout: Option<Duration>,
    /// Seconds to wait for each answer from the server (default 20).
    #[arg(long, global = true, value_name = "SECONDS", value_parser = seconds)]
    call_timeout: Option<Duration>,
}

/// A positive number of seconds, at most a day (fractions allowed).
fn seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !(secs > 0.0 && secs <= 86_400.0) {
        return Err("must be more than 0 and at most 86400 seconds".into());
    }
    Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create a profile and register USERNAME on the server.
    Register { username: String },
    /// Invite USER to GROUP (created if it does not exist).
    Invite { group: String, user: String },
    /// Send TEXT to GROUP.
    Send { group: String, text: String },
    /// Send the file at PATH to GROUP (a regular file of at most 512 KiB).
    SendFile { group: String, path: PathBuf },
    /// Print arriving messages (and join groups on invitation) until interrupted.
    Listen {
        /// Stop after this many messages.
        #[arg(long)]
        count: Option<usize>,
        /// Stop after this many seconds.
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Fetch and process everything queued, then exit.
    Sync,
    /// List groups.
    Groups,
    /// List the members of GROUP.
    Members { group: String },
    /// Show the last messages of GROUP.
    History {
        group: String,
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Remove USER from GROUP.
    Remove { group: String, user: String },
    /// Refresh your keys in GROUP (post-compromise security).
    Update { group: String },
    /// Leave GROUP.
    Leave { group: String },
    /// Interactive chat in GROUP: typed lines are sent, arriving messages are printed.
    Chat { group: String },
    /// Full-screen chat: groups, messages and members side by side, live.
    Tui,
    /// Show or set when this client refreshes its keys in each group by
    /// itself (automatic key updates).
    KeyUpdates {
        /// After this many messages sent in a group.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        messages: Option<u64>,
        /// Or after this many days.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=365))]
        days: Option<u64>,
    },
    /// Show your safety number with USER, to compare with them in person or
    /// over a call you trust; --confirm once the numbers matched.
    Verify {
        user: String,
        /// The numbers matched: mark USER's key verified (you are warned
        /// if it ever changes).
        #[arg(long)]
        confirm: bool,
    },
}

fn main() -> ExitCode {
    transport::install_default_provider();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn profile_dir(cli: &Cli) -> anyhow::Result<PathBuf> {
    if let Some(p) = &cli.profile {
        return Ok(p.clone());
    }
    let home = std::env::var_os("HOME").context("set --profile (HOME is not set)")?;
    Ok(Path::new(&home).join(".quicnprotochat"))
}

fn profile_key() -> anyhow::Result<ProfileKey> {
    if let Ok(p) = std::env::var("QUICNPROTOCHAT_PASSPHRASE") {
        if p.is_empty() {
            bail!("QUICNPROTOCHAT_PASSPHRASE is empty");
        }
        return Ok(ProfileKey::Passphrase(p));
    }
    if std::io::stdin().is_terminal() {
        let p =
            rpassword::prompt_password("profile passphrase: ").context("reading the passphrase")?;
        if p.is_empty() {
            bail!("the passphrase must not be empty");
        }
        return Ok(ProfileKey::Passphrase(p));
    }
    bail!("set QUICNPROTOCHAT_PASSPHRASE (no terminal to ask for the profile passphrase)")
}

/// Builds a server configuration from flags, if any were given.
fn server_config(args: &ServerArgs, required: bool) -> anyhow::Result<Option<ClientConfig>> {
    // The token alone (often from the environment) does not replace the
    // server saved in the profile; an address or trust setting does.
    let any =
        args.server.is_some() || args.pin.is_some() || args.pin_cert.is_some() || args.ca.is_some();
    if !any && !required {
        return Ok(None);
    }
    let nodes = args.server.clone().context("--server is required")?;
    let (addr, fallbacks) = nodes.0.split_first().context("--server names no address")?;
    let auth = if let Some(pin) = &args.pin {
        let bytes = hex::decode(pin)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok());
        ServerAuth::Pinned(
            bytes.context("--pin must be 64 hex characters (a SHA-256 fingerprint)")?,
        )
    } else if let Some(path) = &args.pin_cert {
        let cert = CertificateDer::from_pem_file(path)
            .with_context(|| format!("reading {}", path.display()))?;
        ServerAuth::Pinned(transport::fingerprint(&cert))
    } else if let Some(path) = &args.ca {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(path)
            .with_context(|| format!("reading {}", path.display()))?
        {
            roots
                .add(cert.context("parsing a CA certificate")?)
                .context("adding a CA certificate")?;
        }
        ServerAuth::Roots(Arc::new(roots))
    } else {
        bail!("say how to trust the server: --pin, --pin-cert or --ca");
    };
    let token = args
        .token
        .clone()
        .context("--token (or QUICNPROTOCHAT_TOKEN) is required")?;
    let mut cfg = ClientConfig::new(*addr, auth, token.into_bytes());
    cfg.fallback_addrs = fallbacks.to_vec();
    cfg.server_name = args.server_name.clone();
    args.tune(&mut cfg);
    Ok(Some(cfg))
}

/// The nodes `--server` names, in order, without repeats.
#[derive(Debug, Clone)]
struct ServerList(Vec<SocketAddr>);

/// Parses `--server`: comma-separated `IP:PORT` or `HOST:PORT` entries.
fn server_list(s: &str) -> Result<ServerList, String> {
    use std::net::ToSocketAddrs as _;
    let mut out: Vec<SocketAddr> = Vec::new();
    for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let addrs: Vec<SocketAddr> = match entry.parse::<SocketAddr>() {
            Ok(a) => vec![a],
            Err(_) => entry
                .to_socket_addrs()
                .map_err(|e| format!("{entry}: {e} (expected IP:PORT or HOST:PORT)"))?
                .collect(),
        };
        for a in addrs {
            if !out.contains(&a) {
                out.push(a);
            }
        }
    }
    if out.is_empty() {
        return Err("no address given".into());
    }
    Ok(ServerList(out))
}

impl ServerArgs {
    /// Applies the deadlines given on the command line (they are not saved
    /// in the profile).
    fn tune(&self, cfg: &mut ClientConfig) {
        if let Some(t) = self.connect_timeout {
            cfg.connect_timeout = t;
        }
        if let Some(t) = self.call_timeout {
            cfg.call_timeout = t;
        }
    }
}

/// A file as `--json` shows it.
fn file_json(f: &FileInfo) -> serde_json::Value {
    let mut v =
        json!({"name": f.name, "media_type": f.media_type, "size": f.size, "sha256": f.sha256});
    let (status, path, reason) = match &f.status {
        FileStatus::Sent => ("sent", None, None),
        FileStatus::Saved { path } => ("saved", Some(path.display().to_string()), None),
        FileStatus::Refused { reason } => ("refused", None, Some(reason)),
        FileStatus::NotSaved { reason } => ("not_saved", None, Some(reason)),
        _ => ("unknown", None, None),
    };
    v["status"] = status.into();
    if let Some(p) = path {
        v["path"] = p.into();
    }
    if let Some(r) = reason {
        v["reason"] = r.as_str().into();
    }
    v
}

struct Out {
    json: bool,
}

impl Out {
    /// Writes one line and flushes it: once this returned `Ok`, the user
    /// has it.
    fn line(&self, text: String, value: serde_json::Value) -> std::io::Result<()> {
        use std::io::Write as _;
        let mut stdout = std::io::stdout().lock();
        if self.json {
            writeln!(stdout, "{value}")?;
        } else {
            writeln!(stdout, "{text}")?;
        }
        stdout.flush()
    }

    /// Writes a line made of what other people sent (message text, names
    /// from their credentials): shown, never acted on by the terminal.
    fn peer_line(&self, text: String, value: serde_json::Value) -> std::io::Result<()> {
        self.line(terminal_safe(&text).into_owned(), value)
    }

    fn event(&self, e: &Event) -> std::io::Result<()> {
        match e {
            Event::Message(m) => {
                let mut value = json!({"event": "message", "group": m.group, "sender": m.sender,
                                       "text": m.text, "sent_at_ms": m.sent_at_ms, "id": m.message_id});
                if let Some(f) = &m.file {
                    value["file"] = file_json(f);
                }
                self.peer_line(format!("[{}] {}: {}", m.group, m.sender, m.text), value)
            }
            Event::Joined { group, by, members } => self.peer_line(
                format!(
                    "* joined {group} (added by {by}; members: {})",
                    members.join(", ")
                ),
                json!({"event": "joined", "group": group, "by": by, "members": members}),
            ),
            Event::MembersAdded { group, by, members } => self.peer_line(
                format!("* {by} added {} to {group}", members.join(", ")),
                json!({"event": "members_added", "group": group, "by": by, "members": members}),
            ),
            Event::MembersRemoved { group, by, members } => self.peer_line(
                format!("* {by} removed {} from {group}", members.join(", ")),
                json!({"event": "members_removed", "group": group, "by": by, "members": members}),
            ),
            Event::KeyUpdated { group, by } => self.peer_line(
                format!("* {by} updated their keys in {group}"),
                json!({"event": "key_updated", "group": group, "by": by}),
            ),
            Event::Removed { group, by } => self.peer_line(
                format!("* {by} removed you from {group}"),
                json!({"event": "removed", "group": group, "by": by}),
            ),
            Event::DirectoryMismatch { group, member, key } => self.peer_line(
                format!("! WARNING: in {group}, a member calls itself {member} but its key {key} is not {member}'s key on the server"),
                json!({"event": "directory_mismatch", "group": group, "member": member, "key": key.to_string()}),
            ),
            Event::VerifiedKeyChanged { group, member, key, verified } => self.peer_line(
                format!("! WARNING: in {group}, {member} now has the identity key {key}, not the key {verified} you verified. Someone may be impersonating {member}; compare safety numbers again (`quicnprotochat verify {member}`)."),
                json!({"event": "verified_key_changed", "group": group, "member": member,
                       "identity": key.to_string(), "verified_identity": verified.to_string()}),
            ),
            Event::PeerAnnounced { group, member, .. } => self.peer_line(
                format!("* {member} can be reached directly (announced in {group})"),
                json!({"event": "peer_announced", "group": group, "member": member}),
            ),
            Event::Undecryptable { group, kept, held } => {
                let group_text = group.as_deref().unwrap_or("a group this profile is not in");
                let fate = if *kept { "kept to retry when its epoch arrives" } else { "dropped" };
                self.peer_line(
                    format!("! a message in {group_text} could not be decrypted; {fate} ({held} held)"),
                    json!({"event": "undecryptable", "group": group, "kept": kept, "held": held}),
                )
            }
            Event::ProposalsPending { group, .. } => self.peer_line(
                format!("* pending changes in {group}"),
                json!({"event": "proposals_pending", "group": group}),
            ),
            _ => Ok(()),
        }
    }

    fn ok(&self, text: String, value: serde_json::Value) -> std::io::Result<()> {
        self.line(text, value)
    }

    /// Prints `events` and then records the messages among them as shown
    /// (only once every line is out: a failure in between shows them again
    /// next time rather than never).
    async fn show(&self, m: &Messenger, events: &[Event]) -> anyhow::Result<()> {
        let mut shown = Vec::new();
        for e in events {
            self.event(e).context("writing to standard output")?;
            if let Event::Message(msg) = e {
                shown.push(msg.clone());
            }
        }
        m.mark_shown(&shown).await?;
        Ok(())
    }

    /// Prints the messages processed earlier that never reached the screen
    /// (a run that stopped or lost its connection between processing and
    /// printing them), oldest first.  Returns how many.
    async fn show_unshown(&self, m: &Messenger) -> anyhow::Result<usize> {
        let mut count = 0;
        let mut previous = None;
        // Each round marks what it printed, so the next starts further on;
        // one that does not is an error rather than a loop.
        loop {
            let batch = m.unshown(UNSHOWN_BATCH).await?;
            let n = batch.len();
            let first = batch.first().map(|msg| msg.message_id.clone());
            if first.is_some() && first == previous {
                bail!("the profile did not record printed messages as shown");
            }
            previous = first;
            let events: Vec<Event> = batch.into_iter().map(Event::Message).collect();
            self.show(m, &events).await?;
            count += n;
            if n < UNSHOWN_BATCH {
                return Ok(count);
            }
        }
    }

    /// Syncs and prints what arrived: first what earlier runs processed but
    /// never printed, then the new events.  When the sync fails half-way,
    /// what it processed before the failure is printed before the error.
    async fn sync(&self, m: &Messenger) -> anyhow::Result<()> {
        self.show_unshown(m).await?;
        match m.sync().await {
            Ok(events) => self.show(m, &events).await,
            Err(e) => {
                if let Err(shown) = self.show_unshown(m).await {
                    tracing::warn!(error = %shown, "could not print what was processed");
                }
                Err(e.into())
            }
        }
    }
}

/// Messages read from the profile per round when printing what was not
/// shown yet.
const UNSHOWN_BATCH: usize = 512;

/// The profile directory, which must hold a profile, and its key.
fn existing_profile(cli: &Cli) -> anyhow::Result<(PathBuf, ProfileKey)> {
    let dir = profile_dir(cli)?;
    if !quicnprotochat_core::Profile::exists(&dir) {
        bail!(
            "no profile in {} (run `quicnprotochat register USERNAME` first)",
            dir.display()
        );
    }
    Ok((dir, profile_key()?))
}

/// The profile with its connection to the server.
async fn open(cli: &Cli) -> anyhow::Result<Messenger> {
    let (dir, key) = existing_profile(cli)?;
    let server = server_config(&cli.server, false)?;
    let m = Messenger::open_tuned(&dir, &key, server, |cfg| cli.server.tune(cfg))
        .await
        .context("opening the profile")?;
    if let Some(d) = &cli.download_dir {
        m.set_download_dir(d).await?;
    }
    Ok(m)
}

/// The profile alone, for commands that need nothing from the server
/// (`groups`, `members`, `history`): they work with the server down.
fn open_local(cli: &Cli) -> anyhow::Result<quicnprotochat_core::Profile> {
    let (dir, key) = existing_profile(cli)?;
    quicnprotochat_core::Profile::open(&dir, &key).context("opening the profile")
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let out = Out { json: cli.json };
    match &cli.command {
        Cmd::Register { username } => {
            let dir = profile_dir(&cli)?;
            let server = server_config(&cli.server, true)?.context("server settings")?;
            let key = profile_key()?;
            let m = Messenger::register(&dir, &key, server, username).await?;
            out.ok(
                format!("registered {username} ({})", m.identity_key().await),
                json!({"ok": true, "username": username, "identity": m.identity_key().await.to_string()}),
            )?;
        }
        Cmd::Invite { group, user } => {
            let m = open(&cli).await?;
            out.sync(&m).await?;
            out.show(&m, &m.invite(group, user).await?).await?;
            out.ok(
                format!("invited {user} to {group}"),
                json!({"ok": true, "group": group, "invited": user}),
            )?;
        }
        Cmd::Send { group, text } => {
            let m = open(&cli).await?;
            if let Some(opts) = cli.p2p.options(false) {
                m.enable_p2p(opts).await?;
            }
            out.sync(&m).await?;
            m.send(group, text).await?;
            out.ok(
                format!("sent to {group}"),
                json!({"ok": true, "group": group}),
            )?;
        }
        Cmd::SendFile { group, path } => {
            let m = open(&cli).await?;
            if let Some(opts) = cli.p2p.options(false) {
                m.enable_p2p(opts).await?;
            }
            out.sync(&m).await?;
            let f = m.send_file(group, path).await?;
            out.ok(
                format!("sent {} to {group}", f.summary()),
                json!({"ok": true, "group": group, "file": file_json(&f)}),
            )?;
        }
        Cmd::Sync => {
            let m = open(&cli).await?;
            out.sync(&m).await?;
        }
        Cmd::Listen { count, timeout } => listen(&cli, &out, *count, *timeout).await?,
        Cmd::Groups => {
            for g in open_local(&cli)?.groups()? {
                out.line(
                    format!(
                        "{} (epoch {}, members: {})",
                        g.name,
                        g.epoch,
                        g.members.join(", ")
                    ),
                    json!({"group": g.name, "epoch": g.epoch, "members": g.members}),
                )?;
            }
        }
        Cmd::Members { group } => {
            let profile = open_local(&cli)?;
            for mem in profile.members(group)? {
                let state = match (mem.is_self, profile.verification(&mem.username, &mem.key)?) {
                    (true, _) => "you",
                    (false, Verification::Verified) => "verified",
                    (false, Verification::Changed { .. }) => "KEY CHANGED",
                    (false, _) => "not verified",
                };
                let text = if mem.is_self {
                    format!("{} (you) {}", mem.username, mem.key)
                } else {
                    format!("{} {} ({state})", mem.username, mem.key)
                };
                out.peer_line(
                    text,
                    json!({"username": mem.username, "identity": mem.key.to_string(), "self": mem.is_self, "verification": state}),
                )?;
            }
        }
        Cmd::History { group, limit } => {
            for msg in open_local(&cli)?.history(group, *limit)? {
                out.event(&Event::Message(msg))?;
            }
        }
        Cmd::Remove { group, user } => {
            let m = open(&cli).await?;
            out.sync(&m).await?;
            out.show(&m, &m.remove(group, user).await?).await?;
            out.ok(
                format!("removed {user} from {group}"),
                json!({"ok": true, "group": group, "removed": user}),
            )?;
        }
        Cmd::Update { group } => {
            let m = open(&cli).await?;
            out.sync(&m).await?;
            out.show(&m, &m.update(group).await?).await?;
            out.ok(
                format!("updated your keys in {group}"),
                json!({"ok": true, "group": group}),
            )?;
        }
        Cmd::Leave { group } => {
            let m = open(&cli).await?;
            m.leave(group).await?;
            out.ok(format!("left {group}"), json!({"ok": true, "left": group}))?;
        }
        Cmd::Chat { group } => chat(&cli, &out, group).await?,
        Cmd::KeyUpdates { messages, days } => {
            let profile = open_local(&cli)?;
            let mut p = profile.key_update_policy()?;
            if let Some(n) = messages {
                p.after_messages = *n;
            }
            if let Some(d) = days {
                p.after_ms = d.saturating_mul(24 * 3_600_000);
            }
            if messages.is_some() || days.is_some() {
                profile.set_key_update_policy(p)?;
            }
            let days = p.after_ms as f64 / 86_400_000.0;
            out.line(
                format!(
                    "keys are refreshed in each group after {} messages sent or {days} days",
                    p.after_messages
                ),
                json!({"after_messages": p.after_messages, "after_days": days}),
            )?;
        }
        Cmd::Tui => {
            let m = open(&cli).await?;
            quicnprotochat_client::tui::run(m).await?;
        }
        Cmd::Verify { user, confirm } => verify(&cli, &out, user, *confirm).await?,
    }
    Ok(())
}

/// `verify`: the safety number with `user` from our groups (offline), or
/// from the server's directory when we share no group.
async fn verify(cli: &Cli, out: &Out, user: &str, confirm: bool) -> anyhow::Result<()> {
    let mut profile = open_local(cli)?;
    let mut contacts = profile.contacts_named(user)?;
    if contacts.is_empty() {
        drop(profile);
        let m = open(cli).await?;
        contacts = m.contacts_named(user).await?;
        if confirm && let [c] = contacts.as_slice() {
            m.mark_verified(c).await?;
        }
        profile = open_local(cli)?;
    } else if confirm && let [c] = contacts.as_slice() {
        profile.mark_verified(&c.username, &c.key)?;
    }
    if contacts.len() > 1 {
        out.line(
            format!("! WARNING: members of your groups with {} different keys all call themselves {user}; at most one of them is {user}. Compare each number below with {user} in person.", contacts.len()),
            json!({"event": "ambiguous_contact", "username": user, "keys": contacts.len()}),
        )?;
    }
    for c in &contacts {
        let state = profile.verification(&c.username, &c.key)?;
        let (label, advice) = match state {
            Verification::Verified => ("verified".to_string(), String::new()),
            Verification::Unverified => (
                "not verified".to_string(),
                format!(
                    "\nCompare this number with {user} in person or over a call you trust; if it matches, run `quicnprotochat verify {user} --confirm`."
                ),
            ),
            Verification::Changed { verified } => (
                format!("KEY CHANGED (you verified {verified})"),
                format!(
                    "\n! WARNING: this is not the key you verified for {user}. Someone may be impersonating {user}, or {user} started over with a new identity. Compare the new number with {user} before confirming it."
                ),
            ),
            _ => ("unknown".to_string(), String::new()),
        };
        out.line(
            format!(
                "safety number with {user} ({}):\n{}\n{label}{advice}",
                c.key, c.safety_number
            ),
            json!({"username": user, "identity": c.key.to_string(),
            "safety_number": c.safety_number.digits(), "state": match state {
                Verification::Verified => "verified",
                Verification::Changed { .. } => "changed",
                _ => "unverified",
            }}),
        )?;
    }
    if confirm && contacts.len() > 1 {
        bail!("not confirmed: {user} is ambiguous (more than one key); remove the impostor first");
    }
    Ok(())
}

/// Runs `fut` until `deadline` (none: to completion); `None` when the
/// deadline came first.
async fn within<T>(
    deadline: Option<tokio::time::Instant>,
    fut: impl std::future::Future<Output = T>,
) -> Option<T> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d, fut).await.ok(),
        None => Some(fut.await),
    }
}

/// `listen`: prints what arrives until `count` messages or `timeout`
/// seconds, counted from the start: connecting and catching up count too.
async fn listen(
    cli: &Cli,
    out: &Out,
    count: Option<usize>,
    timeout: Option<u64>,
) -> anyhow::Result<()> {
    let deadline = timeout.map(|t| tokio::time::Instant::now() + Duration::from_secs(t));
    let Some(m) = within(deadline, open(cli)).await else {
        bail!(
            "server unreachable: no connection within the --timeout of {} s",
            timeout.unwrap_or_default()
        );
    };
    let m = m?;
    let started = within(deadline, async {
        if let Some(opts) = cli.p2p.options(true) {
            m.enable_p2p(opts).await?;
        }
        let earlier = out.show_unshown(&m).await?;
        if count.is_some_and(|c| earlier >= c) {
            return Ok(None);
        }
        match m.listen().await {
            Ok(events) => Ok(Some((earlier, events))),
            Err(e) => {
                // What the catch-up processed before failing is printed.
                if let Err(shown) = out.show_unshown(&m).await {
                    tracing::warn!(error = %shown, "could not print what was processed");
                }
                Err(anyhow::Error::from(e))
            }
        }
    })
    .await;
    // The time ran out while catching up: what arrived was printed, and
    // what was processed but not printed is printed next time.
    let Some(started) = started else {
        return Ok(());
    };
    let Some((mut messages, mut events)) = started? else {
        return Ok(());
    };
    loop {
        if count.is_some_and(|c| messages >= c) {
            break;
        }
        let Some(next) = within(deadline, events.next()).await else {
            break;
        };
        let Some(e) = next else { break };
        if matches!(e, Event::Message(_)) {
            messages += 1;
        }
        out.show(&m, std::slice::from_ref(&e)).await?;
    }
    Ok(())
}

async fn chat(cli: &Cli, out: &Out, group: &str) -> anyhow::Result<()> {
    let m = open(cli).await?;
    if let Some(opts) = cli.p2p.options(true) {
        m.enable_p2p(opts).await?;
    }
    let recent: Vec<Event> = m
        .history(group, 20)
        .await?
        .into_iter()
        .map(Event::Message)
        .collect();
    out.show(&m, &recent).await?;
    out.show_unshown(&m).await?;
    let mut events = match m.listen().await {
        Ok(events) => events,
        Err(e) => {
            if let Err(shown) = out.show_unshown(&m).await {
                tracing::warn!(error = %shown, "could not print what was processed");
            }
            return Err(e.into());
        }
    };
    let me = m.username().await;
    if !out.json {
        out.line(
            format!(
                "-- chatting in {group} as {me}; type a line to send, /send-file PATH to send a file, /quit to leave --"
            ),
            serde_json::Value::Null,
        )?;
    }
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            e = events.next() => match e {
                Some(e) => out.show(&m, std::slice::from_ref(&e)).await?,
                None => bail!("the connection to the server was lost"),
            },
            line = lines.next_line() => match line.context("reading input")? {
                None => break,
                Some(l) if l.trim() == "/quit" => break,
                Some(l) if l.trim().is_empty() => {}
                Some(l) if l.starts_with("/send-file ") => {
                    let path = l["/send-file ".len()..].trim();
                    match m.send_file(group, Path::new(path)).await {
                        Ok(f) => out.ok(
                            format!("sent {} to {group}", f.summary()),
                            json!({"ok": true, "group": group, "file": file_json(&f)}),
                        )?,
                        Err(e) => eprintln!("error: {e:#}"),
                    }
                }
                Some(l) => {
                    if let Err(e) = m.send(group, l.trim_end()).await {
                        eprintln!("error: {e:#}");
                    }
                }
            },
        }
    }
    Ok(())
}
